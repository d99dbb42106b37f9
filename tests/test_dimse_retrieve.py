"""C-MOVE and C-GET SCP against a running `pacsbridge serve`: DCMTK movescu / getscu / storescp
and pynetdicom SCUs; peers from the TOML file and from /api/peers."""

from __future__ import annotations

import io
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.conftest import (
    Backend,
    RunningServer,
    free_port,
    require_tool,
    start_server,
    wait_for_port,
)
from tests.dicom_factory import ct_slice, write_series
from tests.test_dimse_store import dataset_bytes, run

pytestmark = pytest.mark.dcmtk

SCP_AE = "STORESCP"

# A storescp association profile that accepts MR Image Storage only (and Verification).
MR_ONLY_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[MROnly]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = MRImageStorage\\Uncompressed
[[Profiles]]
[MROnly]
PresentationContexts = MROnly
"""


# --- a DCMTK storescp as the move destination ----------------------------------------------


@dataclass
class StoreSCP:
    proc: subprocess.Popen
    port: int
    directory: Path
    ae_title: str = SCP_AE

    def received(self) -> dict[str, Path]:
        """Files received, by SOP Instance UID."""
        files = {}
        for path in self.directory.iterdir():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            files[str(ds.SOPInstanceUID)] = path
        return files

    def clear(self) -> None:
        for path in self.directory.iterdir():
            path.unlink()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


_STARTED: list[StoreSCP] = []


@pytest.fixture(autouse=True)
def _stop_every_storescp() -> Iterator[None]:
    """Stop the storescp processes a test started, even when it failed before its `finally`."""
    yield
    while _STARTED:
        _STARTED.pop().stop()


def start_storescp(tmp_path: Path, *options: str, ae_title: str = SCP_AE) -> StoreSCP:
    exe = require_tool("storescp")
    port = free_port()
    directory = tmp_path / f"storescp-{port}"
    directory.mkdir()
    # +B: write each data set exactly as received.
    proc = subprocess.Popen(
        [exe, "+B", "-od", str(directory), "-aet", ae_title, *options, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    scp = StoreSCP(proc, port, directory, ae_title)
    _STARTED.append(scp)
    wait_for_port(port, proc=proc)
    return scp


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = start_storescp(tmp_path)
    yield scp
    scp.stop()


def peers_toml(tmp_path: Path, peers: dict[str, StoreSCP]) -> Path:
    path = tmp_path / "pacsbridge.toml"
    lines = []
    for name, scp in peers.items():
        lines += [
            f"[peers.{name}]",
            f'ae_title = "{scp.ae_title}"',
            'host = "127.0.0.1"',
            f"port = {scp.port}",
            "",
        ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def start_with_peers(backend: Backend, tmp_path: Path, peers: dict[str, StoreSCP]) -> RunningServer:
    return start_server(
        backend,
        tmp_path,
        PACSBRIDGE_CONFIG=str(peers_toml(tmp_path, peers)),
        PACSBRIDGE_LOG_LEVEL="DEBUG",
    )


# --- data -----------------------------------------------------------------------------------


@dataclass
class Archived:
    """Files ingested through the archive, by SOP Instance UID."""

    files: dict[str, Path] = field(default_factory=dict)

    def of(self, *, study: str | None = None, series: str | None = None) -> set[str]:
        out = set()
        for sop, path in self.files.items():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if study and ds.StudyInstanceUID != study:
                continue
            if series and ds.SeriesInstanceUID != series:
                continue
            out.add(sop)
        return out


def ingest(server: RunningServer, paths: list[Path], into: Archived | None = None) -> Archived:
    archived = into or Archived()
    archive = server.archive()
    try:
        for path in paths:
            result = archive.ingest(path.read_bytes())
            archived.files[result.sop_instance_uid] = path
    finally:
        archive.close()
    return archived


@dataclass
class TwoPatients:
    archived: Archived
    study_a: str
    series_a1: str
    series_a2: str
    study_b: str


def two_patients(server: RunningServer, tmp_path: Path) -> TwoPatients:
    study_a, series_a1, series_a2, study_b = (generate_uid() for _ in range(4))
    files = (
        write_series(
            tmp_path / "a1", 3, study_uid=study_a, series_uid=series_a1, patient_id="PAT-A"
        )
        + write_series(
            tmp_path / "a2", 2, study_uid=study_a, series_uid=series_a2, patient_id="PAT-A", seed=7
        )
        + write_series(tmp_path / "b", 2, study_uid=study_b, patient_id="PAT-B", seed=11)
    )
    return TwoPatients(ingest(server, files), study_a, series_a1, series_a2, study_b)


def assert_received_as_stored(received: dict[str, Path], archived: Archived, sops: set[str]):
    assert set(received) == sops
    for sop in sops:
        sent = dataset_bytes(archived.files[sop].read_bytes())
        got = received[sop].read_bytes()
        assert dataset_bytes(got) == sent, sop


# --- DCMTK command lines --------------------------------------------------------------------


def movescu(
    server: RunningServer, *keys: str, model: str = "-S", destination: str = SCP_AE
) -> subprocess.CompletedProcess[str]:
    exe = require_tool("movescu")
    args = [exe, "-v", model, "-aec", server.ae_title, "-aem", destination]
    for key in keys:
        args += ["-k", key]
    return run([*args, "127.0.0.1", str(server.dimse_port)])


def getscu(
    server: RunningServer, directory: Path, *keys: str, model: str = "-S", options: tuple = ()
) -> subprocess.CompletedProcess[str]:
    exe = require_tool("getscu")
    directory.mkdir(parents=True, exist_ok=True)
    args = [exe, "-v", model, "+B", "-od", str(directory), "-aec", server.ae_title, *options]
    for key in keys:
        args += ["-k", key]
    return run([*args, "127.0.0.1", str(server.dimse_port)])


def assert_get_succeeded(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Received C-GET Response (Success)" in output, output
    assert re.search(r"Number of Failed Suboperations\s*:\s*0\b", output), output


def received_in(directory: Path) -> dict[str, Path]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for p in directory.iterdir()
    }


# --- pynetdicom SCU -------------------------------------------------------------------------


def _scu() -> AE:
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def pynetdicom_move(
    server: RunningServer,
    identifier: Dataset,
    destination: str = SCP_AE,
    model: str = StudyRootQueryRetrieveInformationModelMove,
) -> list[tuple[Dataset, Dataset | None]]:
    ae = _scu()
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        return list(assoc.send_c_move(identifier, destination, model))
    finally:
        assoc.release()


def final(responses: list[tuple[Dataset, Dataset | None]]) -> tuple[Dataset, Dataset | None]:
    status, identifier = responses[-1]
    assert status.Status != 0xFF00
    return status, identifier


# === C-MOVE =================================================================================


def test_movescu_every_level_both_models(backend: Backend, tmp_path: Path, storescp: StoreSCP):
    server = start_with_peers(backend, tmp_path, {"viewer": storescp})
    try:
        data = two_patients(server, tmp_path)
        a1 = data.archived.of(series=data.series_a1)
        a2 = data.archived.of(series=data.series_a2)
        b = data.archived.of(study=data.study_b)
        cases = [
            ("-S", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={data.study_a}"], a1 | a2),
            (
                "-S",
                [
                    "QueryRetrieveLevel=STUDY",
                    f"StudyInstanceUID={data.study_a}\\{data.study_b}",
                ],
                a1 | a2 | b,
            ),
            (
                "-S",
                [
                    "QueryRetrieveLevel=SERIES",
                    f"StudyInstanceUID={data.study_a}",
                    f"SeriesInstanceUID={data.series_a2}",
                ],
                a2,
            ),
            (
                "-S",
                [
                    "QueryRetrieveLevel=IMAGE",
                    f"StudyInstanceUID={data.study_a}",
                    f"SeriesInstanceUID={data.series_a1}",
                    "SOPInstanceUID=" + "\\".join(sorted(a1)[:2]),
                ],
                set(sorted(a1)[:2]),
            ),
            ("-P", ["QueryRetrieveLevel=PATIENT", "PatientID=PAT-B"], b),
            (
                "-P",
                ["QueryRetrieveLevel=STUDY", "PatientID=PAT-A", f"StudyInstanceUID={data.study_a}"],
                a1 | a2,
            ),
            (
                "-P",
                [
                    "QueryRetrieveLevel=SERIES",
                    "PatientID=PAT-A",
                    f"StudyInstanceUID={data.study_a}",
                    f"SeriesInstanceUID={data.series_a1}",
                ],
                a1,
            ),
            (
                "-P",
                [
                    "QueryRetrieveLevel=IMAGE",
                    "PatientID=PAT-A",
                    f"StudyInstanceUID={data.study_a}",
                    f"SeriesInstanceUID={data.series_a1}",
                    f"SOPInstanceUID={sorted(a1)[2]}",
                ],
                {sorted(a1)[2]},
            ),
            # The study exists, but not under this patient: nothing matches.
            (
                "-P",
                ["QueryRetrieveLevel=STUDY", "PatientID=PAT-B", f"StudyInstanceUID={data.study_a}"],
                set(),
            ),
        ]
        for model, keys, expected in cases:
            storescp.clear()
            result = movescu(server, *keys, model=model)
            assert result.returncode == 0, (keys, result.stderr)
            output = result.stdout + result.stderr
            assert "Received Final Move Response (Success)" in output, (keys, output)
            assert output.count("Received Move Response") == len(expected), keys
            assert_received_as_stored(storescp.received(), data.archived, expected)
    finally:
        server.stop()


def test_move_counters_unknown_destination_and_invalid_identifiers(
    backend: Backend, tmp_path: Path, storescp: StoreSCP
):
    server = start_with_peers(backend, tmp_path, {"viewer": storescp})
    try:
        data = two_patients(server, tmp_path)
        responses = pynetdicom_move(server, _identifier("STUDY", StudyInstanceUID=data.study_a))
        pending = [s for s, _ in responses if s.Status == 0xFF00]
        assert [s.NumberOfRemainingSuboperations for s in pending] == [4, 3, 2, 1, 0]
        assert [s.NumberOfCompletedSuboperations for s in pending] == [1, 2, 3, 4, 5]
        status, _ = final(responses)
        assert status.Status == 0x0000
        assert status.NumberOfCompletedSuboperations == 5
        assert status.NumberOfFailedSuboperations == 0
        assert status.NumberOfWarningSuboperations == 0
        assert len(storescp.received()) == 5

        status, _ = final(
            pynetdicom_move(server, _identifier("STUDY", StudyInstanceUID=data.study_a), "NOBODY")
        )
        assert status.Status == 0xA801
        result = movescu(
            server,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={data.study_a}",
            destination="NOBODY",
        )
        assert "Final Move Response (Refused: MoveDestinationUnknown)" in result.stderr

        invalid = [
            _identifier("STUDY"),  # no Study Instance UID
            _identifier("SERIES", StudyInstanceUID=data.study_a),  # no Series Instance UID
            _identifier("PATIENT", PatientID="PAT-A"),  # no PATIENT level in Study Root
            _identifier("FRAME", StudyInstanceUID=data.study_a),
            _identifier(
                "SERIES",
                StudyInstanceUID=f"{data.study_a}\\{data.study_b}",  # a list above the level
                SeriesInstanceUID=data.series_a1,
            ),
            _identifier("STUDY", StudyInstanceUID="not-a-uid"),
        ]
        for identifier in invalid:
            storescp.clear()
            status, _ = final(pynetdicom_move(server, identifier))
            assert status.Status == 0xA900, identifier
            assert status.ErrorComment, identifier
            assert storescp.received() == {}
        status, _ = final(
            pynetdicom_move(
                server,
                _identifier("STUDY", StudyInstanceUID=data.study_a),  # Patient Root needs PatientID
                model=PatientRootQueryRetrieveInformationModelMove,
            )
        )
        assert status.Status == 0xA900
        assert "PatientID" in status.ErrorComment
        # Nothing matches: success, no sub-operations.
        status, _ = final(pynetdicom_move(server, _identifier("STUDY", StudyInstanceUID="1.2.3")))
        assert status.Status == 0x0000
        assert status.NumberOfCompletedSuboperations == 0
    finally:
        server.stop()


def test_move_to_peer_refusing_the_sop_class(backend: Backend, tmp_path: Path):
    config = tmp_path / "mr-only.cfg"
    config.write_text(MR_ONLY_PROFILE, encoding="utf-8")
    scp = start_storescp(tmp_path, "-xf", str(config), "MROnly")
    server = start_with_peers(backend, tmp_path, {"mr_only": scp})
    try:
        study = generate_uid()
        ct = write_series(tmp_path / "ct", 3, study_uid=study)
        mr_series = generate_uid()
        mr = []
        for i in range(2):
            ds = ct_slice(study_uid=study, series_uid=mr_series, index=i, seed=5)
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.Modality = "MR"
            path = tmp_path / f"mr{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            mr.append(path)
        archived = ingest(server, ct)
        ct_sops = set(archived.files)
        # Every sub-operation fails: 0xA702 with every SOP Instance UID listed.
        status, failed = final(
            pynetdicom_move(server, _identifier("STUDY", StudyInstanceUID=study), scp.ae_title)
        )
        assert status.Status == 0xA702
        assert status.NumberOfFailedSuboperations == 3
        assert status.NumberOfCompletedSuboperations == 0
        assert failed is not None
        assert set(failed.FailedSOPInstanceUIDList) == ct_sops
        assert scp.received() == {}

        ingest(server, mr, into=archived)
        mr_sops = set(archived.files) - ct_sops
        # Some fail: 0xB000, the failed ones listed, the others delivered as stored.
        status, failed = final(
            pynetdicom_move(server, _identifier("STUDY", StudyInstanceUID=study), scp.ae_title)
        )
        assert status.Status == 0xB000
        assert status.NumberOfFailedSuboperations == 3
        assert status.NumberOfCompletedSuboperations == 2
        assert failed is not None
        assert set(failed.FailedSOPInstanceUIDList) == ct_sops
        assert_received_as_stored(scp.received(), archived, mr_sops)
        # movescu reports the warning too.
        scp.clear()
        result = movescu(
            server,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study}",
            destination=scp.ae_title,
        )
        assert "Warning" in result.stdout + result.stderr
    finally:
        server.stop()
        scp.stop()


# === compressed instances and peers that accept only some transfer syntaxes ==================

REFERENCE_FILES = [
    "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    "JPEG2000.dcm",  # JPEG 2000 (lossy)
    "MR_small_RLE.dcm",  # RLE Lossless
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian (retired)
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
]


@dataclass
class Reference:
    path: Path
    transfer_syntax: UID
    pixels: np.ndarray


def reference_study(tmp_path: Path) -> tuple[str, dict[str, Reference]]:
    """pydicom's test files in one new study, each with its own SOP Instance UID, their pixel
    data kept exactly as encoded."""
    study, series = generate_uid(), generate_uid()
    refs = {}
    for name in REFERENCE_FILES:
        src = get_testdata_file(name)
        assert src is not None, name
        ds = pydicom.dcmread(src)
        pixels = ds.pixel_array.copy()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / "refs" / name
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        refs[str(ds.SOPInstanceUID)] = Reference(path, UID(ds.file_meta.TransferSyntaxUID), pixels)
    return study, refs


def assert_same_pictures(received: dict[str, Path], refs: dict[str, Reference], allowed: set[UID]):
    assert set(received) == set(refs)
    for sop, path in received.items():
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID in allowed, (refs[sop].path.name, ds.file_meta)
        assert str(ds.SOPInstanceUID) == sop
        assert np.array_equal(ds.pixel_array, refs[sop].pixels), refs[sop].path.name


def test_move_converts_only_what_the_peer_refuses(backend: Backend, tmp_path: Path):
    uncompressed = start_storescp(tmp_path, ae_title="UNCOMPR")  # storescp's default
    implicit = start_storescp(tmp_path, "+xi", ae_title="IMPLICIT")
    everything = start_storescp(tmp_path, "+xa", ae_title="EVERYTHING")
    server = start_with_peers(
        backend, tmp_path, {"uncompr": uncompressed, "implicit": implicit, "all": everything}
    )
    try:
        study, refs = reference_study(tmp_path)
        archived = ingest(server, [r.path for r in refs.values()])
        keys = ("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")

        result = movescu(server, *keys, destination="EVERYTHING")
        assert "Final Move Response (Success)" in result.stdout + result.stderr, result.stderr
        assert_received_as_stored(everything.received(), archived, set(refs))
        for sop, path in everything.received().items():
            assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == refs[sop].transfer_syntax

        result = movescu(server, *keys, destination="UNCOMPR")
        assert "Final Move Response (Success)" in result.stdout + result.stderr, result.stderr
        received = uncompressed.received()
        assert_same_pictures(
            received, refs, {ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian}
        )
        for sop, ref in refs.items():
            if not ref.transfer_syntax.is_compressed and not ref.transfer_syntax.is_deflated:
                # Accepted as stored (big endian included): sent byte for byte.
                assert dataset_bytes(received[sop].read_bytes()) == dataset_bytes(
                    ref.path.read_bytes()
                )

        result = movescu(server, *keys, destination="IMPLICIT")
        assert "Final Move Response (Success)" in result.stdout + result.stderr, result.stderr
        assert_same_pictures(implicit.received(), refs, {ImplicitVRLittleEndian})
    finally:
        server.stop()
        for scp in (uncompressed, implicit, everything):
            scp.stop()


# === C-GET ==================================================================================


def test_getscu_study_and_series(backend: Backend, tmp_path: Path):
    server = start_server(backend, tmp_path)
    try:
        data = two_patients(server, tmp_path)
        a1 = data.archived.of(series=data.series_a1)
        a2 = data.archived.of(series=data.series_a2)

        result = getscu(
            server,
            tmp_path / "get-study",
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={data.study_a}",
        )
        assert_get_succeeded(result)
        assert_received_as_stored(received_in(tmp_path / "get-study"), data.archived, a1 | a2)

        result = getscu(
            server,
            tmp_path / "get-series",
            "QueryRetrieveLevel=SERIES",
            "PatientID=PAT-A",
            f"StudyInstanceUID={data.study_a}",
            f"SeriesInstanceUID={data.series_a2}",
            model="-P",
        )
        assert_get_succeeded(result)
        assert_received_as_stored(received_in(tmp_path / "get-series"), data.archived, a2)

        result = getscu(
            server,
            tmp_path / "get-patient",
            "QueryRetrieveLevel=PATIENT",
            "PatientID=PAT-B",
            model="-P",
        )
        assert_get_succeeded(result)
        assert_received_as_stored(
            received_in(tmp_path / "get-patient"),
            data.archived,
            data.archived.of(study=data.study_b),
        )
    finally:
        server.stop()


def pynetdicom_get(
    server: RunningServer, study: str, sop_classes: set[str], syntaxes: set[str]
) -> tuple[Dataset, dict[str, tuple[str, bytes]]]:
    """C-GET a study proposing one storage context per (SOP class, transfer syntax); returns
    the final status and, by SOP Instance UID, each received data set's syntax and bytes."""
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event):
        received[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax),
            event.request.DataSet.getvalue(),
        )
        return 0x0000

    ae = _scu()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles: list = []
    for sop_class in sorted(sop_classes):
        roles.append(build_role(sop_class, scp_role=True))
        for ts in sorted(syntaxes):
            ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(
        "127.0.0.1",
        server.dimse_port,
        ae_title=server.ae_title,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        responses = list(
            assoc.send_c_get(
                _identifier("STUDY", StudyInstanceUID=study),
                StudyRootQueryRetrieveInformationModelGet,
            )
        )
    finally:
        assoc.release()
    return final(responses)[0], received


def test_get_compressed_study(backend: Backend, tmp_path: Path):
    server = start_server(backend, tmp_path)
    try:
        study, refs = reference_study(tmp_path)
        archived = ingest(server, [r.path for r in refs.values()])
        keys = ("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
        # getscu proposes one context per storage class listing uncompressed syntaxes (and
        # JPEG 2000 first with +xv): Explicit VR Little Endian is accepted and every instance
        # arrives in it, decompressed or converted from big endian / deflate.
        for options in ((), ("+xv",)):
            directory = tmp_path / f"getscu{len(options)}"
            assert_get_succeeded(getscu(server, directory, *keys, options=options))
            assert_same_pictures(received_in(directory), refs, {ExplicitVRLittleEndian})

        sop_classes = {str(pydicom.dcmread(r.path).SOPClassUID) for r in refs.values()}
        # A requestor proposing one context per transfer syntax gets every instance as stored.
        status, received = pynetdicom_get(
            server, study, sop_classes, {str(r.transfer_syntax) for r in refs.values()}
        )
        assert status.Status == 0x0000
        assert set(received) == set(refs)
        for sop, (syntax, data) in received.items():
            assert syntax == refs[sop].transfer_syntax, refs[sop].path.name
            assert data == dataset_bytes(archived.files[sop].read_bytes()), refs[sop].path.name

        # Implicit VR Little Endian only: everything converted to it.
        status, received = pynetdicom_get(server, study, sop_classes, {ImplicitVRLittleEndian})
        assert status.Status == 0x0000
        assert set(received) == set(refs)
        for sop, (syntax, data) in received.items():
            assert syntax == ImplicitVRLittleEndian
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            assert str(ds.SOPInstanceUID) == sop
            assert np.array_equal(ds.pixel_array, refs[sop].pixels), refs[sop].path.name
    finally:
        server.stop()


def _get_scu(sop_classes: list[str], transfer_syntaxes: list[str], on_store) -> AE:
    ae = _scu()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class, transfer_syntaxes)
    return ae


def test_get_without_storage_contexts_fails_every_suboperation(backend: Backend, tmp_path: Path):
    server = start_server(backend, tmp_path)
    try:
        data = two_patients(server, tmp_path)
        ae = _get_scu([MRImageStorage], [ExplicitVRLittleEndian], None)
        assoc = ae.associate(
            "127.0.0.1",
            server.dimse_port,
            ae_title=server.ae_title,
            ext_neg=[build_role(MRImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
        )
        assert assoc.is_established
        try:
            responses = list(
                assoc.send_c_get(
                    _identifier("STUDY", StudyInstanceUID=data.study_b),
                    StudyRootQueryRetrieveInformationModelGet,
                )
            )
        finally:
            assoc.release()
        status, failed = final(responses)
        assert status.Status == 0xA702
        assert status.NumberOfFailedSuboperations == 2
        assert failed is not None
        assert set(failed.FailedSOPInstanceUIDList) == data.archived.of(study=data.study_b)
        assert "accepted no presentation context" in server.log()
    finally:
        server.stop()


def _ct_get_association(server: RunningServer, on_store) -> Association:
    """A C-GET requestor for CT images (Explicit VR Little Endian), Verification too."""
    ae = _get_scu([CTImageStorage], [ExplicitVRLittleEndian], on_store)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    assoc = ae.associate(
        "127.0.0.1",
        server.dimse_port,
        ae_title=server.ae_title,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    return assoc


def test_get_cancel(backend: Backend, tmp_path: Path):
    server = start_server(backend, tmp_path)
    try:
        study = generate_uid()
        archived = ingest(server, write_series(tmp_path / "s", 30, study_uid=study))
        stored: list[str] = []
        first_store = threading.Event()

        def on_store(event):
            stored.append(str(event.request.AffectedSOPInstanceUID))
            first_store.set()
            threading.Event().wait(0.05)  # a slow receiver, so that the cancel lands mid-way
            return 0x0000

        assoc = _ct_get_association(server, on_store)
        try:
            responses = assoc.send_c_get(
                _identifier("STUDY", StudyInstanceUID=study),
                StudyRootQueryRetrieveInformationModelGet,
                msg_id=7,
            )
            status, _ = next(responses)
            assert status.Status == 0xFF00
            cx = assoc._get_valid_context(StudyRootQueryRetrieveInformationModelGet, "", "scu")
            assoc.send_c_cancel(7, cx.context_id)
            rest = list(responses)
        finally:
            assoc.release()
        status, _ = rest[-1]
        assert status.Status == 0xFE00
        assert 0 < status.NumberOfCompletedSuboperations < 30
        assert status.NumberOfRemainingSuboperations == 30 - status.NumberOfCompletedSuboperations
        assert len(stored) == status.NumberOfCompletedSuboperations
        assert set(stored) <= set(archived.files)
    finally:
        server.stop()


def test_get_store_responses_with_status_details(backend: Backend, tmp_path: Path):
    """C-STORE responses that carry an Error Comment (PS3.7 C.4.2): the sub-operations after
    the first such response leave the fast path, and every response still counts, in order."""
    server = start_server(backend, tmp_path)
    try:
        study = generate_uid()
        archived = ingest(server, write_series(tmp_path / "s", 12, study_uid=study))
        stored: list[str] = []

        def on_store(event):
            stored.append(str(event.request.AffectedSOPInstanceUID))
            number = len(stored)
            if number in (4, 9):
                status = Dataset()
                status.Status = 0xB000  # Warning: coercion of data elements
                status.ErrorComment = f"coerced #{number}"
                return status
            return 0xA700 if number == 6 else 0x0000  # Out of resources

        assoc = _ct_get_association(server, on_store)
        try:
            responses = list(
                assoc.send_c_get(
                    _identifier("STUDY", StudyInstanceUID=study),
                    StudyRootQueryRetrieveInformationModelGet,
                )
            )
            # The association is still usable afterwards.
            echo = assoc.send_c_echo()
        finally:
            assoc.release()
        assert echo.Status == 0x0000
        pending = [status for status, _ in responses[:-1]]
        assert [s.Status for s in pending] == [0xFF00] * 12
        assert [s.NumberOfRemainingSuboperations for s in pending] == list(range(11, -1, -1))
        assert [s.NumberOfWarningSuboperations for s in pending][3:5] == [1, 1]
        assert [s.NumberOfFailedSuboperations for s in pending][4:6] == [0, 1]
        final, identifier = responses[-1]
        assert final.Status == 0xB000
        assert final.NumberOfCompletedSuboperations == 9
        assert final.NumberOfWarningSuboperations == 2
        assert final.NumberOfFailedSuboperations == 1
        assert identifier is not None
        assert identifier.FailedSOPInstanceUIDList == stored[5]  # one value
        assert sorted(stored) == sorted(archived.files)
    finally:
        server.stop()


# === peers over the REST API ================================================================


def test_peers_api_moves_to_a_created_peer(backend: Backend, tmp_path: Path, storescp: StoreSCP):
    configured = start_storescp(tmp_path, ae_title="CONFIGURED")
    server = start_with_peers(backend, tmp_path, {"configured": configured})
    try:
        data = two_patients(server, tmp_path)
        api = f"{server.http}/api/peers"
        assert httpx.get(api).json() == [
            {
                "name": "configured",
                "ae_title": "CONFIGURED",
                "host": "127.0.0.1",
                "port": configured.port,
                "permissions": ["echo", "store", "find", "move", "get"],
                "check_host": False,
                "tls": False,
                "source": "config",
                "created_at": None,
                "updated_at": None,
            }
        ]
        keys = ("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={data.study_b}")
        identifier = _identifier("STUDY", StudyInstanceUID=data.study_b)
        assert final(pynetdicom_move(server, identifier))[0].Status == 0xA801
        created = httpx.put(
            f"{api}/viewer", json={"ae_title": SCP_AE, "host": "127.0.0.1", "port": storescp.port}
        )
        assert created.status_code == 201, created.text
        assert created.json()["source"] == "api"
        result = movescu(server, *keys)
        assert "Final Move Response (Success)" in result.stdout + result.stderr
        assert set(storescp.received()) == data.archived.of(study=data.study_b)
        # The configured peer works too.
        result = movescu(server, *keys, destination="CONFIGURED")
        assert set(configured.received()) == data.archived.of(study=data.study_b)

        assert httpx.delete(f"{api}/viewer").status_code == 204
        assert final(pynetdicom_move(server, identifier))[0].Status == 0xA801
    finally:
        server.stop()
        configured.stop()


def test_config_peers_need_distinct_ae_titles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pydantic import ValidationError

    from config import Settings

    peers = {
        "a": {"ae_title": "SAME", "host": "h1", "port": 104},
        "b": {"ae_title": "SAME", "host": "h2", "port": 104},
    }
    with pytest.raises(ValidationError, match="share AE title"):
        Settings(peers=peers)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="AE title"):
        Settings(peers={"a": {"ae_title": "X" * 17, "host": "h", "port": 1}})  # type: ignore[dict-item]
    monkeypatch.setenv(
        "PACSBRIDGE_PEERS", json.dumps({"ok": {"ae_title": "OK", "host": "h", "port": 1}})
    )
    assert Settings().peers["ok"].ae_title == "OK"


def test_move_originator_is_the_requestor(backend: Backend, tmp_path: Path):
    """The C-STORE sub-operations carry the AE title and Message ID of the C-MOVE request
    (PS3.7 9.3.1.1); the destination here is a pynetdicom Storage SCP from PACSBRIDGE_PEERS."""
    seen: list[tuple[str, int, str]] = []

    def on_store(event):
        request = event.request
        seen.append(
            (
                request.MoveOriginatorApplicationEntityTitle,
                request.MoveOriginatorMessageID,
                str(request.AffectedSOPInstanceUID),
            )
        )
        return 0x0000

    scp_ae = AE(ae_title="PYSTORE")
    scp_ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    scp_ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    peers = {"py": {"ae_title": "PYSTORE", "host": "127.0.0.1", "port": port}}
    server = start_server(backend, tmp_path, PACSBRIDGE_PEERS=json.dumps(peers))
    try:
        study = generate_uid()
        archived = ingest(server, write_series(tmp_path / "s", 2, study_uid=study))
        ae = _scu()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
        responses = list(
            assoc.send_c_move(
                _identifier("STUDY", StudyInstanceUID=study),
                "PYSTORE",
                StudyRootQueryRetrieveInformationModelMove,
                msg_id=42,
            )
        )
        assoc.release()
        assert final(responses)[0].Status == 0x0000
        assert sorted(seen) == sorted(("PYSCU", 42, sop) for sop in archived.files)
    finally:
        server.stop()
        scp_ae.shutdown()
