"""DICOM access control by Calling AE Title (dicom_node/access.py), against a running
``pacsbridge serve`` with DCMTK's clients, and pynetdicom where a status must be read exactly.

The default, as on Orthanc: C-ECHO and C-STORE from any calling AE; C-FIND, C-MOVE and C-GET
only from a declared peer with the permission (0124H "Refused: Not Authorized" otherwise);
``auth = required`` rejects associations from undeclared calling AE titles.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from archive import Archive
from archive.peers import InvalidPeer
from config import PeerSettings, Settings
from dicom_node.access import CACHE_SECONDS, AccessControl
from tests.conftest import Backend, RunningServer, free_port, require_tool, start_server
from tests.dicom_factory import write_series

NOT_AUTHORIZED = 0x0124
#: Longer than a decision is cached for: the registry as it now is applies.
AFTER_CACHE = CACHE_SECONDS + 0.3


def _peers(viewer_port: int) -> dict[str, dict[str, Any]]:
    return {
        "viewer": {"ae_title": "VIEWER", "host": "127.0.0.1", "port": viewer_port},
        "modality": {
            "ae_title": "NOQUERY",
            "host": "127.0.0.1",
            "port": 104,
            "permissions": ["echo", "store"],
        },
        "reader": {
            "ae_title": "NOSTORE",
            "host": "127.0.0.1",
            "port": 104,
            "permissions": ["find", "get"],
        },
        "elsewhere": {
            "ae_title": "ELSEWHERE",
            "host": "192.0.2.1",  # TEST-NET-1 (RFC 5737): never this machine
            "port": 104,
            "check_host": True,
        },
        "here": {"ae_title": "HERE", "host": "localhost", "port": 104, "check_host": True},
    }


@pytest.fixture
def viewer_port() -> int:
    return free_port()


@contextlib.contextmanager
def _server(
    make_backend: Any, tmp_path: Path, viewer_port: int, **env: str
) -> Iterator[RunningServer]:
    backend: Backend = make_backend(
        "sqlite",
        "file",
        dimse_query_from_any_ae=False,
        worker_in_serve=False,
        peers=_peers(viewer_port),
    )
    server = start_server(backend, tmp_path, PACSBRIDGE_DIMSE_PROCESSES="2", **env)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()[-3000:]


@pytest.fixture
def server(make_backend: Any, tmp_path: Path, viewer_port: int) -> Iterator[RunningServer]:
    with _server(make_backend, tmp_path, viewer_port) as running:
        yield running


@pytest.fixture
def study(tmp_path: Path) -> tuple[str, list[Path]]:
    files = write_series(tmp_path / "study", 3, size=16)
    import pydicom

    return str(pydicom.dcmread(files[0]).StudyInstanceUID), files


def dcmtk(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    require_tool(argv[0])
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def echoscu(server: RunningServer, calling: str) -> subprocess.CompletedProcess[str]:
    return dcmtk(
        "echoscu",
        "-v",
        "-aet",
        calling,
        "-aec",
        server.ae_title,
        "127.0.0.1",
        str(server.dimse_port),
    )


def storescu(
    server: RunningServer, calling: str, files: list[Path]
) -> subprocess.CompletedProcess[str]:
    return dcmtk(
        "storescu",
        "-v",
        "-aet",
        calling,
        "-aec",
        server.ae_title,
        "127.0.0.1",
        str(server.dimse_port),
        *map(str, files),
    )


def findscu(
    server: RunningServer, calling: str, study_uid: str
) -> subprocess.CompletedProcess[str]:
    return dcmtk(
        "findscu",
        "-v",
        "-S",
        "-aet",
        calling,
        "-aec",
        server.ae_title,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "-k",
        "PatientID",
        "127.0.0.1",
        str(server.dimse_port),
    )


def movescu(
    server: RunningServer, calling: str, study_uid: str, port: int, outdir: Path
) -> subprocess.CompletedProcess[str]:
    outdir.mkdir(parents=True, exist_ok=True)
    return dcmtk(
        "movescu",
        "-v",
        "-S",
        "-aet",
        calling,
        "-aem",
        calling,
        "-aec",
        server.ae_title,
        "--port",
        str(port),
        "-od",
        str(outdir),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "127.0.0.1",
        str(server.dimse_port),
    )


def getscu(
    server: RunningServer, calling: str, study_uid: str, outdir: Path
) -> subprocess.CompletedProcess[str]:
    outdir.mkdir(parents=True, exist_ok=True)
    return dcmtk(
        "getscu",
        "-v",
        "-S",
        "-aet",
        calling,
        "-aec",
        server.ae_title,
        "-od",
        str(outdir),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "127.0.0.1",
        str(server.dimse_port),
    )


def refused_in(result: subprocess.CompletedProcess[str]) -> bool:
    """Whether DCMTK's verbose output shows the status 0124H (DCMTK 3.6.7 knows no name for
    it: "Unknown Status: 0x124")."""
    return re.search(r"\b0x0?124\b", output(result).lower()) is not None


def pn_assoc(server: RunningServer, calling: str, *contexts: Any) -> Any:
    ae = AE(ae_title=calling)
    for context in contexts or (Verification,):
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)


def study_identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    ds.PatientID = ""
    return ds


def find_statuses(assoc: Any, study_uid: str, model: Any = None) -> list[tuple[int, str]]:
    model = model or StudyRootQueryRetrieveInformationModelFind
    return [
        (int(status.Status), str(status.get("ErrorComment", "")))
        for status, _ in assoc.send_c_find(study_identifier(study_uid), model)
        if status is not None and "Status" in status
    ]


# --- undeclared calling AE titles ------------------------------------------------------------


def test_an_undeclared_ae_may_echo_and_store_but_not_query_or_retrieve(
    server: RunningServer, study: tuple[str, list[Path]], tmp_path: Path
):
    study_uid, files = study
    echo = echoscu(server, "STRANGER")
    assert echo.returncode == 0, output(echo)
    store = storescu(server, "STRANGER", files)
    assert store.returncode == 0 and "Success" in output(store), output(store)

    find = findscu(server, "STRANGER", study_uid)
    assert refused_in(find), output(find)
    move = movescu(server, "STRANGER", study_uid, free_port(), tmp_path / "moved")
    assert refused_in(move), output(move)
    assert not list((tmp_path / "moved").iterdir())
    get = getscu(server, "STRANGER", study_uid, tmp_path / "got")
    assert refused_in(get), output(get)
    assert not list((tmp_path / "got").iterdir())

    # Exactly, with pynetdicom: the refusal, its Error Comment, and the association stays
    # usable (every information model: Patient Root too).
    assoc = pn_assoc(
        server,
        "STRANGER",
        Verification,
        StudyRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
        StudyRootQueryRetrieveInformationModelGet,
    )
    assert assoc.is_established
    try:
        [(status, comment)] = find_statuses(assoc, study_uid)
        assert status == NOT_AUTHORIZED
        assert comment == "calling AE 'STRANGER' is not a declared peer"
        patient_root = study_identifier(study_uid)
        patient_root.QueryRetrieveLevel = "PATIENT"
        del patient_root.StudyInstanceUID
        statuses = [
            s.Status
            for s, _ in assoc.send_c_find(
                patient_root, PatientRootQueryRetrieveInformationModelFind
            )
        ]
        assert statuses == [NOT_AUTHORIZED]
        moves = [
            s.Status
            for s, _ in assoc.send_c_move(
                study_identifier(study_uid), "VIEWER", StudyRootQueryRetrieveInformationModelMove
            )
        ]
        assert moves == [NOT_AUTHORIZED]
        gets = [
            s.Status
            for s, _ in assoc.send_c_get(
                study_identifier(study_uid), StudyRootQueryRetrieveInformationModelGet
            )
        ]
        assert gets == [NOT_AUTHORIZED]
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.is_established
    finally:
        assoc.release()

    # The server goes on serving, and says why in its log.
    assert echoscu(server, "STRANGER").returncode == 0
    assert server.proc.poll() is None
    log = server.log()
    assert "DIMSE request refused: not authorized" in log
    assert "PACSBRIDGE_DIMSE_QUERY_FROM_ANY_AE" in log


# --- declared peers ----------------------------------------------------------------------------


def test_a_declared_peer_finds_moves_and_gets(
    server: RunningServer, study: tuple[str, list[Path]], tmp_path: Path, viewer_port: int
):
    study_uid, files = study
    assert storescu(server, "VIEWER", files).returncode == 0

    find = findscu(server, "VIEWER", study_uid)
    assert find.returncode == 0 and not refused_in(find), output(find)
    assert study_uid in output(find) or "Find Response: 1" in output(find), output(find)

    move = movescu(server, "VIEWER", study_uid, viewer_port, tmp_path / "moved")
    assert move.returncode == 0 and not refused_in(move), output(move)
    assert len(list((tmp_path / "moved").iterdir())) == len(files)

    get = getscu(server, "VIEWER", study_uid, tmp_path / "got")
    assert get.returncode == 0 and not refused_in(get), output(get)
    assert len(list((tmp_path / "got").iterdir())) == len(files)

    # C-MOVE destinations are declared peers only: STRANGER is none (0xA801).
    assoc = pn_assoc(server, "VIEWER", StudyRootQueryRetrieveInformationModelMove)
    try:
        statuses = [
            s.Status
            for s, _ in assoc.send_c_move(
                study_identifier(study_uid), "STRANGER", StudyRootQueryRetrieveInformationModelMove
            )
        ]
        assert statuses == [0xA801]
    finally:
        assoc.release()


def test_a_peer_has_only_its_permissions(
    server: RunningServer, study: tuple[str, list[Path]], tmp_path: Path
):
    study_uid, files = study
    # NOQUERY: echo and store only.
    assert echoscu(server, "NOQUERY").returncode == 0
    assert storescu(server, "NOQUERY", files).returncode == 0
    find = findscu(server, "NOQUERY", study_uid)
    assert refused_in(find), output(find)
    assoc = pn_assoc(server, "NOQUERY", StudyRootQueryRetrieveInformationModelFind)
    try:
        [(status, comment)] = find_statuses(assoc, study_uid)
        assert (status, comment) == (
            NOT_AUTHORIZED,
            "calling AE 'NOQUERY' has no 'find' permission",
        )
    finally:
        assoc.release()

    # NOSTORE: find and get, no store and no echo.
    store = storescu(server, "NOSTORE", files[:1])
    assert refused_in(store), output(store)
    assoc = pn_assoc(server, "NOSTORE", Verification, CTImageStorage)
    try:
        for path in files:  # several on one association: none is stored
            assert assoc.send_c_store(path).Status == NOT_AUTHORIZED
        assert assoc.send_c_echo().Status == NOT_AUTHORIZED
        assert assoc.is_established
    finally:
        assoc.release()
    echo = echoscu(server, "NOSTORE")
    assert refused_in(echo) or echo.returncode != 0, output(echo)
    find = findscu(server, "NOSTORE", study_uid)
    assert find.returncode == 0 and not refused_in(find), output(find)
    get = getscu(server, "NOSTORE", study_uid, tmp_path / "got")
    assert len(list((tmp_path / "got").iterdir())) == len(files), output(get)
    assert server.proc.poll() is None


def test_check_host(server: RunningServer, study: tuple[str, list[Path]]):
    study_uid, files = study
    assert storescu(server, "HERE", files).returncode == 0
    # ELSEWHERE must call from 192.0.2.1: from here its title is as good as undeclared.
    find = findscu(server, "ELSEWHERE", study_uid)
    assert refused_in(find), output(find)
    assoc = pn_assoc(server, "ELSEWHERE", StudyRootQueryRetrieveInformationModelFind)
    try:
        [(status, comment)] = find_statuses(assoc, study_uid)
        assert status == NOT_AUTHORIZED
        assert comment == "calling AE 'ELSEWHERE' is a peer's, not from its host"
    finally:
        assoc.release()
    assert "check_host" in server.log()
    # HERE's host, localhost, resolves to the address it calls from.
    find = findscu(server, "HERE", study_uid)
    assert find.returncode == 0 and not refused_in(find), output(find)


def test_api_peers_apply_at_run_time(
    server: RunningServer, study: tuple[str, list[Path]], tmp_path: Path
):
    study_uid, files = study
    assert storescu(server, "APIWS", files).returncode == 0
    assoc = pn_assoc(server, "APIWS", StudyRootQueryRetrieveInformationModelFind)
    try:
        assert find_statuses(assoc, study_uid)[-1][0] == NOT_AUTHORIZED
    finally:
        assoc.release()

    body = {"ae_title": "APIWS", "host": "127.0.0.1", "port": 104, "permissions": ["find"]}
    response = httpx.put(f"{server.http}/api/peers/workstation", json=body, timeout=10)
    assert response.status_code == 201, response.text
    assert response.json()["permissions"] == ["find"]
    assert response.json()["check_host"] is False
    time.sleep(AFTER_CACHE)
    find = findscu(server, "APIWS", study_uid)
    assert find.returncode == 0 and not refused_in(find), output(find)
    get = getscu(server, "APIWS", study_uid, tmp_path / "got")  # no 'get' permission
    assert refused_in(get), output(get)

    assert httpx.delete(f"{server.http}/api/peers/workstation", timeout=10).status_code == 204
    time.sleep(AFTER_CACHE)
    find = findscu(server, "APIWS", study_uid)
    assert refused_in(find), output(find)


# --- auth = required -------------------------------------------------------------------------


def test_auth_required_rejects_undeclared_calling_aes_at_association(
    make_backend: Any, tmp_path: Path, viewer_port: int, study: tuple[str, list[Path]]
):
    study_uid, files = study
    # start_server lets any AE query (PACSBRIDGE_DIMSE_QUERY_FROM_ANY_AE=true): ignored here.
    with _server(
        make_backend,
        tmp_path,
        viewer_port,
        PACSBRIDGE_AUTH="required",
        PACSBRIDGE_DIMSE_QUERY_FROM_ANY_AE="true",
    ) as server:
        echo = echoscu(server, "STRANGER")
        assert echo.returncode != 0, output(echo)
        assert "rejected" in output(echo).lower(), output(echo)
        assert storescu(server, "STRANGER", files).returncode != 0

        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
        state = {"aborted": assoc.is_aborted, "established": assoc.is_established}
        assert assoc.is_rejected, (state, server.log()[-3000:])
        rj = assoc.acceptor.primitive
        assert rj is not None
        # Rejected-permanent; DICOM UL service-user; calling-AE-title-not-recognized.
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)

        # A declared peer associates, and has its permissions.
        echo = echoscu(server, "VIEWER")
        assert echo.returncode == 0, output(echo)
        assert storescu(server, "VIEWER", files).returncode == 0
        find = findscu(server, "VIEWER", study_uid)
        assert find.returncode == 0 and not refused_in(find), output(find)
        find = findscu(server, "NOQUERY", study_uid)
        assert refused_in(find), output(find)
        # From the wrong host a peer's title is not recognized either.
        assert echoscu(server, "ELSEWHERE").returncode != 0
        assert echoscu(server, "HERE").returncode == 0
        assert server.proc.poll() is None
        assert "calling AE title not recognized" in server.log()


# --- the decision itself, in this process ----------------------------------------------------


@pytest.fixture
def registry_archive(make_backend: Any, viewer_port: int) -> Iterator[Archive]:
    backend: Backend = make_backend("sqlite", "file", peers=_peers(viewer_port))
    archive = Archive(backend.settings)
    try:
        yield archive
    finally:
        archive.close()


def _control(archive: Archive, **settings: Any) -> AccessControl:
    return AccessControl(archive.peers, archive.settings.model_copy(update=settings))


def test_decisions(registry_archive: Archive):
    default = _control(registry_archive, dimse_query_from_any_ae=False, auth="auto")
    stranger = default.decide("STRANGER", "10.0.0.1")
    assert stranger.peer is None and stranger.allowed == {"echo", "store"}
    assert stranger.refusal("echo") is None
    assert stranger.refusal("find") is not None
    viewer = default.decide("  VIEWER ", "10.0.0.1")  # spaces are not significant
    assert viewer.peer is not None and viewer.allowed == {"echo", "store", "find", "move", "get"}
    assert default.decide("ELSEWHERE", "127.0.0.1").peer is None
    assert default.decide("ELSEWHERE", "192.0.2.1").peer is not None
    assert default.decide("HERE", "::ffff:127.0.0.1").peer is not None  # IPv4-mapped

    anyone = _control(registry_archive, dimse_query_from_any_ae=True, auth="auto")
    assert anyone.decide("STRANGER", "10.0.0.1").allowed == {
        "echo",
        "store",
        "find",
        "move",
        "get",
    }
    # A peer keeps its own permissions even then.
    assert anyone.decide("NOSTORE", "127.0.0.1").allowed == {"find", "get"}
    required = _control(registry_archive, dimse_query_from_any_ae=True, auth="required")
    assert required.decide("STRANGER", "10.0.0.1").allowed == {"echo", "store"}


def test_permissions_are_validated(registry_archive: Archive):
    base = {"ae_title": "X", "host": "h", "port": 1}
    with pytest.raises(ValueError, match="permission"):
        PeerSettings.model_validate({**base, "permissions": ["read"]})
    peer = PeerSettings.model_validate({**base, "permissions": ["get", "find", "get"]})
    assert peer.permissions == ["find", "get"] and peer.check_host is False
    assert PeerSettings.model_validate(base).permissions == ["echo", "store", "find", "move", "get"]

    peers = registry_archive.peers
    with pytest.raises(InvalidPeer, match="unknown permission 'write'"):
        peers.put("ws", "WS", "h", 1, ["find", "write"])
    with pytest.raises(InvalidPeer):
        peers.put("ws", "WS", "h", 1, "find")  # a string, not a list
    record, created = peers.put("ws", "WS", "h", 1, ["get", "echo"], True)
    assert created and record.permissions == ("echo", "get") and record.check_host
    assert peers.by_ae_title("WS") == record
    record, _ = peers.put("ws", "WS", "h", 1, [])
    assert record.permissions == () and not record.check_host


def test_settings_env_json_peers(monkeypatch: pytest.MonkeyPatch, viewer_port: int):
    monkeypatch.setenv("PACSBRIDGE_PEERS", json.dumps(_peers(viewer_port)))
    peers = Settings().peers
    assert peers["reader"].permissions == ["find", "get"]
    assert peers["elsewhere"].check_host is True
