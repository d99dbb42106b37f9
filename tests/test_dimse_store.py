"""C-ECHO and C-STORE against a running `pacsbridge serve`, driven by DCMTK and pynetdicom."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_preamble
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    Verification,
)

from archive.blobstore import instance_key
from tests.conftest import Backend, RunningServer, require_tool, start_server
from tests.dicom_factory import ct_slice, iter_pydicom_test_files, write_series

pytestmark = pytest.mark.dcmtk


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def dataset_bytes(data: bytes) -> bytes:
    """The data set of a Part-10 stream, without preamble and File Meta Information."""
    import io

    fp = io.BytesIO(data)
    read_preamble(fp, False)
    pydicom.filereader._read_file_meta_info(fp)
    return fp.read()


def assert_stored_as_sent(server: RunningServer, files: list[Path]) -> None:
    archive = server.archive()
    try:
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            key = instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            stored = archive.blobs.read(key)
            assert dataset_bytes(stored) == dataset_bytes(path.read_bytes()), path
            stored_ds = pydicom.dcmread(__import__("io").BytesIO(stored), stop_before_pixels=True)
            assert stored_ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    finally:
        archive.close()


def stats(server: RunningServer) -> tuple[int, int, int, int]:
    archive = server.archive()
    try:
        st = archive.stats()
        return st.patients, st.studies, st.series, st.instances
    finally:
        archive.close()


def blob_count(server: RunningServer) -> int:
    archive = server.archive()
    try:
        return len(list(archive.blobs.keys()))
    finally:
        archive.close()


@pytest.fixture
def storescu() -> str:
    return require_tool("storescu")


def test_echoscu(server: RunningServer):
    echoscu = require_tool("echoscu")
    result = run([echoscu, "-aec", server.ae_title, "127.0.0.1", str(server.dimse_port)])
    assert result.returncode == 0, result.stderr


def test_storescu_files_and_directory(server: RunningServer, storescu: str, tmp_path: Path):
    single = write_series(tmp_path / "single", 1)
    result = run(
        [storescu, "-aec", server.ae_title, "127.0.0.1", str(server.dimse_port), *map(str, single)]
    )
    assert result.returncode == 0, result.stderr
    assert stats(server) == (1, 1, 1, 1)

    study = generate_uid()
    tree = write_series(tmp_path / "tree" / "a", 6, study_uid=study) + write_series(
        tmp_path / "tree" / "b", 5, study_uid=study
    )
    result = run(
        [
            storescu,
            "-aec",
            server.ae_title,
            "+sd",
            "+r",
            "127.0.0.1",
            str(server.dimse_port),
            str(tmp_path / "tree"),
        ]
    )
    assert result.returncode == 0, result.stderr
    assert stats(server) == (1, 2, 3, 12)
    assert_stored_as_sent(server, single + tree)


def test_concurrent_storescu_of_one_study(server: RunningServer, storescu: str, tmp_path: Path):
    study = generate_uid()
    files: list[Path] = []
    for n in range(4):
        files += write_series(tmp_path / f"s{n}", 10, study_uid=study, seed=n)
    # Four modalities send the same study at once, each all 40 instances (overlapping sends).
    procs = [
        subprocess.Popen(
            [
                storescu,
                "-aec",
                server.ae_title,
                "-aet",
                f"MOD{n}",
                "127.0.0.1",
                str(server.dimse_port),
            ]
            + [str(f) for f in files[n * 10 :] + files[: n * 10]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert stats(server) == (1, 1, 4, 40)
    assert_stored_as_sent(server, files)


def _ae() -> AE:
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def test_pynetdicom_compressed_transfer_syntaxes(
    server: RunningServer, chunked_send: None, tmp_path: Path
):
    files = []
    seen: set[str] = set()
    sops: set[str] = set()  # several of pydicom's files share a SOP Instance UID
    for path in iter_pydicom_test_files():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        needed = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if not ts or ts in seen or not all(k in ds for k in needed):
            continue
        if str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")) != ds.SOPInstanceUID:
            continue
        if ds.SOPInstanceUID in sops:
            # Give the copy its own UID, keeping its transfer syntax and encoded pixel data.
            full = pydicom.dcmread(path)
            full.SOPInstanceUID = full.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = tmp_path / path.name
            full.save_as(path, enforce_file_format=True)
            ds = full
        seen.add(ts)
        sops.add(ds.SOPInstanceUID)
        files.append((path, str(ds.SOPClassUID), ts))
    assert {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
    } <= seen
    ae = _ae()
    contexts = [build_context(sop, ts) for _path, sop, ts in files]
    assoc = ae.associate(
        "127.0.0.1", server.dimse_port, contexts=contexts, ae_title=server.ae_title
    )
    assert assoc.is_established
    try:
        for path, _sop, ts in files:
            status = assoc.send_c_store(path)
            assert status.Status == 0x0000, (path.name, ts, status)
    finally:
        assoc.release()
    archive = server.archive()
    try:
        for path, _sop, ts in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            key = instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            stored = archive.blobs.read(key)
            assert dataset_bytes(stored) == dataset_bytes(path.read_bytes()), path.name
            assert (
                pydicom.dcmread(__import__("io").BytesIO(stored)).file_meta.TransferSyntaxUID == ts
            )
    finally:
        archive.close()


def test_htj2k_is_accepted_as_received(server: RunningServer, tmp_path: Path):
    from pydicom.encaps import encapsulate

    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.201")  # HTJ2K Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])  # stored, never decoded
    ds["PixelData"].VR = "OB"
    ae = _ae()
    assoc = ae.associate(
        "127.0.0.1",
        server.dimse_port,
        contexts=[build_context(CTImageStorage, "1.2.840.10008.1.2.4.201")],
        ae_title=server.ae_title,
    )
    assert assoc.is_established
    assert assoc.accepted_contexts[0].transfer_syntax[0] == "1.2.840.10008.1.2.4.201"
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert stats(server)[3] == 1


def _broken_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    good = write_series(tmp_path / "good", 2)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good[0].read_bytes()[:-2000])
    # A data set without SOP Instance UID (the File Meta still names one, for the command).
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    sop = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    no_uid = tmp_path / "no_sop_instance_uid.dcm"
    ds.preamble = b"\x00" * 128
    ds.save_as(no_uid, enforce_file_format=False)
    return truncated, no_uid, good[1]


def test_bad_input_gets_failure_status_and_association_goes_on(
    server: RunningServer, chunked_send: None, tmp_path: Path
):
    truncated, no_uid, good = _broken_files(tmp_path)
    ae = _ae()
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(truncated)
        assert status.Status == 0xC000
        assert "Pixel Data" in status.ErrorComment
        status = assoc.send_c_store(no_uid)
        assert status.Status in (0xA900, 0xC000)
        assert "SOPInstanceUID" in status.ErrorComment
        # The association is still usable, and a good instance after them is stored.
        assert assoc.send_c_store(good).Status == 0x0000
    finally:
        assoc.release()
    assert stats(server)[3] == 1
    assert blob_count(server) == 1
    # And the next association works too.
    assoc = _ae().associate(
        "127.0.0.1",
        server.dimse_port,
        contexts=[build_context(Verification)],
        ae_title=server.ae_title,
    )
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_refused_storage_class_and_called_ae_check(
    make_backend, tmp_path: Path, storescu: str, chunked_send: None
):
    backend: Backend = make_backend(
        refused_sop_classes=["CTImageStorage"], require_called_ae_title=True
    )
    server = start_server(backend, tmp_path)
    try:
        ct = write_series(tmp_path / "ct", 1)[0]
        result = run(
            [storescu, "-aec", server.ae_title, "127.0.0.1", str(server.dimse_port), str(ct)]
        )
        assert result.returncode != 0
        assert "no presentation context" in (result.stderr + result.stdout).lower() or (
            "no acceptable presentation contexts" in (result.stderr + result.stdout).lower()
        )
        # An MR is still stored by the same node.
        mr = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
        mr.SOPClassUID = MRImageStorage
        mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
        mr.Modality = "MR"
        mr_path = tmp_path / "mr.dcm"
        mr.save_as(mr_path, enforce_file_format=True)
        result = run(
            [storescu, "-aec", server.ae_title, "127.0.0.1", str(server.dimse_port), str(mr_path)]
        )
        assert result.returncode == 0, result.stderr
        assert stats(server)[3] == 1
        # Wrong Called AE Title: the association is rejected (PS3.8 7.1.1.1 A-ASSOCIATE-RJ).
        echoscu = require_tool("echoscu")
        wrong = run([echoscu, "-aec", "NOT_PACSBRIDGE", "127.0.0.1", str(server.dimse_port)])
        assert wrong.returncode != 0
        assert "reject" in (wrong.stderr + wrong.stdout).lower()
        right = run([echoscu, "-aec", server.ae_title, "127.0.0.1", str(server.dimse_port)])
        assert right.returncode == 0, right.stderr
    finally:
        server.stop()


def test_many_associations_at_once(server: RunningServer, tmp_path: Path):
    files = write_series(tmp_path / "many", 16)

    def send(path: Path) -> int:
        ae = _ae()
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(path).Status)
        finally:
            assoc.release()

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(send, files)) == [0] * 16
    assert stats(server) == (1, 1, 1, 16)


def test_out_of_space_answers_a700(make_backend, tmp_path: Path):
    # More free space demanded than any disk has: every store must be refused, not half-done.
    server = start_server(make_backend(min_free_disk_mb=2**40), tmp_path)
    try:
        path = write_series(tmp_path / "full", 1)[0]
        ae = _ae()
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
        assert status.Status == 0xA700
        assert "MiB free" in status.ErrorComment
        assert stats(server)[3] == 0
    finally:
        server.stop()


def test_transfer_syntax_choice_keeps_vrs_and_lossless(server: RunningServer, tmp_path: Path):
    """One context offering several syntaxes: Explicit VR Little Endian before Implicit, and
    lossless compression before lossy (PS3.8 9.3.3.2, the acceptor chooses)."""
    ae = _ae()
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
    ae.add_requested_context(MRImageStorage, ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90"])
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    assert assoc.is_established
    chosen = {str(cx.abstract_syntax): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    assoc.release()
    assert chosen[CTImageStorage] == "1.2.840.10008.1.2.1"
    assert chosen[MRImageStorage] == "1.2.840.10008.1.2.4.90"
