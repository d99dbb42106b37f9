"""Routing: stable studies and arriving instances forwarded to real peers (DCMTK storescp, Orthanc
over its REST API and over DICOMweb STOW-RS), retried while a destination is down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from bench.peers import OrthancTarget, StorescpTarget
from tests.conftest import IN_CI, Backend, RunningServer, free_port, require_tool, start_server
from tests.dicom_factory import write_series

pytestmark = pytest.mark.dcmtk

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
FAST_JOBS = {
    "stable_age": 1.0,
    "stable_scan_interval": 0.3,
    "worker_poll_interval": 0.1,
    "job_backoff_base": 0.5,
    "job_backoff_max": 2.0,
}


def wait_until(check: Callable[[], bool], timeout: float = 60.0, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s: {message}")


def storescu(server: RunningServer, files: list[Path], calling: str = "MODALITY") -> None:
    tool = require_tool("storescu")
    result = subprocess.run(
        [tool, "-aet", calling, "-aec", server.ae_title, "127.0.0.1", str(server.dimse_port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def dataset_part(data: bytes) -> bytes:
    ds = pydicom.dcmread(__import__("io").BytesIO(data))
    return ds.SOPInstanceUID, ds.PixelData  # type: ignore[return-value]


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StorescpTarget]:
    require_tool("storescp")
    target = StorescpTarget(tmp_path / "storescp", nodelay=True)
    target.start()
    yield target
    target.stop()


def _orthanc(tmp_path: Path, **config: object) -> OrthancTarget:
    if not os.access(ORTHANC_BIN, os.X_OK):
        message = f"{ORTHANC_BIN} is not installed (apt-get install orthanc orthanc-dicomweb)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return OrthancTarget(tmp_path / "orthanc", nodelay=True, name="orthanc", config=config)


def _jobs(server: RunningServer, **params: str) -> list[dict]:
    response = httpx.get(f"{server.http}/api/jobs", params=params, timeout=10)
    response.raise_for_status()
    body = response.json()
    return body["jobs"] if isinstance(body, dict) else body


def test_stable_study_goes_to_storescp(make_backend, tmp_path: Path, storescp: StorescpTarget):
    backend: Backend = make_backend(
        peers={"lab": {"ae_title": storescp.ae, "host": "127.0.0.1", "port": storescp.dimse_port}},
        routes={"ct": {"modality": "CT", "calling_ae_title": "MOD*", "destinations": ["lab"]}},
        **FAST_JOBS,
    )
    server = start_server(backend, tmp_path)
    try:
        files = write_series(tmp_path / "ct", 5)
        storescu(server, files, calling="MODALITY1")
        wait_until(lambda: storescp.instance_count() == 5, message="storescp got the study")
        received = sorted(p for p in storescp.output.rglob("*") if p.is_file())
        assert {dataset_part(p.read_bytes()) for p in received} == {
            dataset_part(f.read_bytes()) for f in files
        }
        wait_until(
            lambda: any(j["status"] == "done" for j in _jobs(server, kind="forward")),
            message="forward job done",
        )
        (forward,) = _jobs(server, kind="forward")
        assert forward["payload"]["destination"] == "lab"
        # A study that does not match the rule stays here.
        other = write_series(tmp_path / "other", 2)
        storescu(server, other, calling="WORKSTATION")
        time.sleep(3)
        assert storescp.instance_count() == 5
    finally:
        assert server.stop() == 0


def test_destination_down_then_back_is_delivered(make_backend, tmp_path: Path):
    require_tool("storescp")
    port = free_port()
    backend: Backend = make_backend(
        peers={"later": {"ae_title": "LATER", "host": "127.0.0.1", "port": port}},
        routes={"all": {"on": "arrival", "destinations": ["later"]}},
        job_max_attempts=1000,  # never dead while the peer is down, however slow the machine
        **FAST_JOBS,
    )
    server = start_server(backend, tmp_path)
    received = tmp_path / "later"
    received.mkdir()
    scp = None
    try:
        files = write_series(tmp_path / "s", 3)
        storescu(server, files)
        wait_until(
            lambda: (
                sum(j["attempts"] for j in _jobs(server, kind="forward")) >= 3
                and all(j["last_error"] for j in _jobs(server, kind="forward"))
            ),
            message="the sends failed while the peer was down",
        )
        assert all(
            j["status"] in ("failed", "running", "queued") for j in _jobs(server, kind="forward")
        )
        scp = subprocess.Popen(
            ["storescp", "--fork", "-aet", "LATER", "-od", str(received), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: sum(1 for p in received.iterdir()) == 3,
            timeout=90,
            message="delivered once the peer came back",
        )
        wait_until(
            lambda: all(j["status"] == "done" for j in _jobs(server, kind="forward")),
            message="jobs done",
        )
    finally:
        if scp is not None:
            scp.terminate()
            scp.wait(10)
        assert server.stop() == 0


def test_route_to_orthanc_rest_and_stow(make_backend, tmp_path: Path):
    orthanc = _orthanc(
        tmp_path,
        Plugins=[DICOMWEB_PLUGIN],
        DicomWeb={"Enable": True, "Root": "/dicom-web/"},
    )
    orthanc.start()
    try:
        backend: Backend = make_backend(
            destinations={
                "orthanc-rest": {"orthanc_url": orthanc.http},
                "orthanc-stow": {"stow_url": f"{orthanc.http}/dicom-web"},
            },
            routes={
                "mr-rest": {"modality": "MR", "destinations": ["orthanc-rest"]},
                "ct-stow": {"modality": "CT", "destinations": ["orthanc-stow"]},
            },
            **FAST_JOBS,
        )
        server = start_server(backend, tmp_path)
        try:
            ct = write_series(tmp_path / "ct", 3)
            mr = write_series(tmp_path / "mr", 2)
            for path in mr:
                ds = pydicom.dcmread(path)
                ds.Modality = "MR"
                ds.save_as(path, enforce_file_format=True)
            storescu(server, ct + mr)
            ct_study = pydicom.dcmread(ct[0]).StudyInstanceUID
            mr_study = pydicom.dcmread(mr[0]).StudyInstanceUID

            def orthanc_studies() -> set[str]:
                found = set()
                with httpx.Client(base_url=orthanc.http, timeout=10) as client:
                    for study_id in client.get("/studies").json():
                        tags = client.get(f"/studies/{study_id}").json()["MainDicomTags"]
                        count = len(client.get(f"/studies/{study_id}/instances").json())
                        found.add(f"{tags['StudyInstanceUID']}:{count}")
                return found

            wait_until(
                lambda: orthanc_studies() == {f"{ct_study}:3", f"{mr_study}:2"},
                message="both studies arrived in Orthanc",
            )
            with httpx.Client(base_url=orthanc.http, timeout=10) as client:
                instance = client.get("/instances").json()[0]
                stored = client.get(f"/instances/{instance}/file").content
            sop = pydicom.dcmread(__import__("io").BytesIO(stored)).SOPInstanceUID
            sources = {pydicom.dcmread(p).SOPInstanceUID: p for p in ct + mr}
            assert dataset_part(stored) == dataset_part(sources[sop].read_bytes())
        finally:
            assert server.stop() == 0
    finally:
        orthanc.stop()


def test_send_command(make_backend, tmp_path: Path, storescp: StorescpTarget):
    backend: Backend = make_backend(
        peers={"lab": {"ae_title": storescp.ae, "host": "127.0.0.1", "port": storescp.dimse_port}},
    )
    from archive import Archive

    archive = Archive(backend.settings)
    files = write_series(tmp_path / "s", 4)
    for path in files:
        archive.ingest(path.read_bytes())
    archive.close()
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    exe = Path(sys.executable).parent / "pacsbridge"
    env = {**os.environ, **backend.env}
    result = subprocess.run(
        [str(exe), "send", study, "--to", "lab"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "done"
    assert storescp.instance_count() == 4
    unknown = subprocess.run(
        [str(exe), "send", study, "--to", "nowhere", "--timeout", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert unknown.returncode == 1
    outcome = json.loads(unknown.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "dead"
    assert "unknown destination" in outcome["error"]
