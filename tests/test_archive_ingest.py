"""Ingest, duplicates, delete and reconciliation on every index and blob backend."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from archive import Archive, IngestError, IngestErrorKind, IngestOutcome
from archive.blobstore import instance_key
from archive.models import Instance, Patient, PendingBlobDeletion, Series, Study
from tests.dicom_factory import ct_slice, iter_pydicom_test_files, write_series


def _bytes(ds: pydicom.Dataset, tmp_path: Path) -> bytes:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_ingest_stores_bytes_as_received_and_indexes_attributes(archive: Archive, tmp_path: Path):
    study, series = generate_uid(), generate_uid()
    ds = ct_slice(study_uid=study, series_uid=series, index=4, patient_name="Müller^Jürgen")
    data = _bytes(ds, tmp_path)

    result = archive.ingest(data, calling_ae_title="MODALITY1")

    assert result.outcome is IngestOutcome.STORED
    key = instance_key(study, series, ds.SOPInstanceUID)
    assert archive.blobs.read(key) == data
    assert b"".join(archive.blobs.open(key, chunk_size=1000)) == data
    with archive.db.session() as s:
        inst = s.scalars(select(Instance)).one()
        assert inst.sop_instance_uid == ds.SOPInstanceUID
        assert inst.instance_number == 5
        assert inst.size_bytes == len(data)
        assert inst.calling_ae_title == "MODALITY1"
        assert inst.rows == 64 and inst.columns == 64
        # DICOM JSON (PS3.18 F.2): header values inline, pixel data as a BulkDataURI.
        assert inst.dicom_json["00100010"] == {
            "vr": "PN",
            "Value": [{"Alphabetic": "Müller^Jürgen"}],
        }
        assert inst.dicom_json["7FE00010"] == {"vr": "OW", "BulkDataURI": "bulkdata/7FE00010"}
        assert inst.dicom_json["00200013"]["Value"] == [5]
        ser = s.scalars(select(Series)).one()
        assert (ser.series_instance_uid, ser.modality, ser.body_part_examined) == (
            series,
            "CT",
            "HEAD",
        )
        st = s.scalars(select(Study)).one()
        assert (st.study_instance_uid, st.study_date, st.study_description) == (
            study,
            "20240115",
            "CT HEAD",
        )
        assert st.referring_physician_name_search == "HOUSE^GREGORY"
        pat = s.scalars(select(Patient)).one()
        assert (pat.patient_id, pat.patient_name, pat.patient_name_search) == (
            "PAT-1",
            "Müller^Jürgen",
            "MÜLLER^JÜRGEN",
        )
    assert archive.stats().instances == 1
    assert archive.stats().bytes == len(data)


def test_duplicate_keep_leaves_first_copy(archive: Archive, tmp_path: Path):
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    first = _bytes(ds, tmp_path)
    ds.SeriesDescription = "CHANGED"
    second = _bytes(ds, tmp_path)
    assert archive.ingest(first).outcome is IngestOutcome.STORED
    assert archive.ingest(second).outcome is IngestOutcome.DUPLICATE
    key = instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert archive.blobs.read(key) == first
    assert archive.stats().instances == 1


def test_duplicate_overwrite_replaces_blob_and_row(make_backend, tmp_path: Path):
    arc = Archive(make_backend(duplicate_policy="overwrite").settings)
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    first = _bytes(ds, tmp_path)
    old_series = ds.SeriesInstanceUID
    ds.SeriesInstanceUID = generate_uid()  # moved to another series: old blob must go
    second = _bytes(ds, tmp_path)
    assert arc.ingest(first).outcome is IngestOutcome.STORED
    assert arc.ingest(second).outcome is IngestOutcome.OVERWRITTEN
    assert arc.stats().instances == 1
    new_key = instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    old_key = instance_key(ds.StudyInstanceUID, old_series, ds.SOPInstanceUID)
    assert arc.blobs.read(new_key) == second
    arc.flush_pending_deletions()
    assert not arc.blobs.exists(old_key)
    arc.close()


def test_overwrite_answers_a_cached_series_without_a_connection(make_backend, tmp_path: Path):
    """Policy overwrite: the series check of a series this process has cached takes no
    database connection, only the index transaction does; a series held in another study is
    still refused from the cache."""
    archive = Archive(make_backend(duplicate_policy="overwrite").settings)
    try:
        study, series = generate_uid(), generate_uid()
        archive.ingest(_bytes(ct_slice(study_uid=study, series_uid=series, index=0), tmp_path))
        opened: list[int] = []
        real = archive.db.direct

        def counting() -> Any:
            opened.append(1)
            return real()

        archive.db.direct = counting  # type: ignore[method-assign]
        second = ct_slice(study_uid=study, series_uid=series, index=1)
        assert archive.ingest(_bytes(second, tmp_path)).outcome is IngestOutcome.STORED
        assert len(opened) == 1  # the index transaction
        intruder = ct_slice(study_uid=generate_uid(), series_uid=series, index=2)
        with pytest.raises(IngestError) as info:
            archive.ingest(_bytes(intruder, tmp_path))
        assert info.value.kind is IngestErrorKind.DATASET_MISMATCH
        assert len(opened) == 1
    finally:
        archive.close()


@pytest.mark.parametrize(
    ("mutate", "kind", "reason"),
    [
        (
            lambda ds: delattr(ds, "SOPInstanceUID"),
            IngestErrorKind.DATASET_MISMATCH,
            "SOPInstanceUID",
        ),
        (
            lambda ds: delattr(ds, "StudyInstanceUID"),
            IngestErrorKind.DATASET_MISMATCH,
            "StudyInstanceUID",
        ),
        (
            lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.abc"),
            IngestErrorKind.DATASET_MISMATCH,
            "not a valid UID",
        ),
    ],
)
def test_invalid_instances_are_refused_and_nothing_is_written(
    archive: Archive, tmp_path: Path, mutate, kind, reason
):
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    mutate(ds)
    path = tmp_path / "bad.dcm"
    ds.preamble = b"\x00" * 128
    ds.save_as(path, enforce_file_format=False)
    with pytest.raises(IngestError) as info:
        archive.ingest(path.read_bytes())
    assert info.value.kind is kind
    assert reason in info.value.reason
    assert archive.stats().instances == 0
    assert list(archive.blobs.keys()) == []


def test_truncated_and_garbage_streams_cannot_be_understood(archive: Archive, tmp_path: Path):
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    data = _bytes(ds, tmp_path)
    for broken in (data[: len(data) - 100], b"\x00" * 128 + b"DICM" + b"\xff" * 50, b"hello"):
        with pytest.raises(IngestError) as info:
            archive.ingest(broken)
        assert info.value.kind is IngestErrorKind.CANNOT_UNDERSTAND, info.value.reason
    # Cut inside the header: what is left lacks the identifying UIDs.
    with pytest.raises(IngestError) as info:
        archive.ingest(data[:300])
    assert info.value.kind in (IngestErrorKind.CANNOT_UNDERSTAND, IngestErrorKind.DATASET_MISMATCH)
    assert archive.stats().instances == 0
    assert list(archive.blobs.keys()) == []


def test_envelope_mismatch_is_refused(archive: Archive, tmp_path: Path):
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    data = _bytes(ds, tmp_path)
    with pytest.raises(IngestError) as info:
        archive.ingest(data, expected_sop_instance_uid=generate_uid())
    assert info.value.kind is IngestErrorKind.DATASET_MISMATCH
    with pytest.raises(IngestError):
        archive.ingest(data, expected_study_instance_uid=generate_uid())
    assert (
        archive.ingest(data, expected_sop_class_uid=ds.SOPClassUID).outcome is IngestOutcome.STORED
    )


def test_refused_sop_class_setting(make_backend, tmp_path: Path):
    arc = Archive(make_backend(refused_sop_classes=["CTImageStorage"]).settings)
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    with pytest.raises(IngestError) as info:
        arc.ingest(_bytes(ds, tmp_path))
    assert info.value.kind is IngestErrorKind.REFUSED
    arc.close()


@pytest.mark.parametrize("index", ["sqlite", "postgresql"])
def test_pydicom_test_files_in_every_transfer_syntax(make_backend, index: str):
    # Several of pydicom's files share a SOP Instance UID: overwrite so each is stored once.
    archive = Archive(make_backend(index, duplicate_policy="overwrite").settings)
    stored_syntaxes = set()
    for path in iter_pydicom_test_files():
        data = path.read_bytes()
        try:
            result = archive.ingest(data)
        except IngestError as exc:
            # Files without File Meta or without the identifying UIDs are refused, never crash.
            assert exc.kind in (IngestErrorKind.CANNOT_UNDERSTAND, IngestErrorKind.DATASET_MISMATCH)
            continue
        if result.outcome is not IngestOutcome.DUPLICATE:
            stored_syntaxes.add(result.transfer_syntax_uid)
            key = instance_key(
                result.study_instance_uid, result.series_instance_uid, result.sop_instance_uid
            )
            assert archive.blobs.read(key) == data
    for uid in (
        "1.2.840.10008.1.2",  # implicit VR little endian
        "1.2.840.10008.1.2.1",  # explicit VR little endian
        "1.2.840.10008.1.2.2",  # explicit VR big endian
        "1.2.840.10008.1.2.1.99",  # deflated
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.51",  # JPEG extended
        "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.5",  # RLE
    ):
        assert uid in stored_syntaxes, uid
    archive.close()


def test_concurrent_ingest_of_one_study_creates_each_row_once(archive: Archive, tmp_path: Path):
    study, series_a, series_b = generate_uid(), generate_uid(), generate_uid()
    blobs = []
    for i in range(12):
        ds = ct_slice(study_uid=study, series_uid=series_a if i % 2 else series_b, index=i)
        blobs.append(_bytes(ds, tmp_path))
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def worker(chunk: list[bytes]) -> None:
        try:
            barrier.wait()
            for data in chunk:
                archive.ingest(data)
                archive.ingest(data)  # and duplicates, concurrently
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(blobs[i::6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = archive.stats()
    assert (stats.patients, stats.studies, stats.series, stats.instances) == (1, 1, 2, 12)


def test_delete_levels_remove_rows_and_blobs(archive: Archive, tmp_path: Path):
    study = generate_uid()
    s1 = write_series(tmp_path / "a", 3, study_uid=study)
    s2 = write_series(tmp_path / "b", 2, study_uid=study)
    other = write_series(tmp_path / "c", 2, patient_id="PAT-2")
    for p in [*s1, *s2, *other]:
        archive.ingest(p.read_bytes())
    assert archive.stats().instances == 7

    first = pydicom.dcmread(s1[0], stop_before_pixels=True)
    assert archive.delete_instance(first.SOPInstanceUID) == 1
    assert archive.stats().instances == 6
    assert archive.delete_series(first.SeriesInstanceUID) == 2
    assert archive.stats().series == 2
    assert archive.delete_study(study) == 2
    st = archive.stats()
    assert (st.patients, st.studies, st.series, st.instances) == (1, 1, 1, 2)
    assert archive.delete_patient("PAT-2") == 2
    st = archive.stats()
    assert (st.patients, st.studies, st.series, st.instances, st.bytes) == (0, 0, 0, 0, 0)
    assert list(archive.blobs.keys()) == []
    with archive.db.session() as s:
        assert s.scalars(select(PendingBlobDeletion)).all() == []
    assert archive.delete_study(study) == 0


def test_instances_without_patient_id_share_one_patient_row(archive: Archive, tmp_path: Path):
    # Patient ID is type 2 (PS3.3 C.7.1.1): missing or empty, it is indexed as "".
    study = generate_uid()
    uids = []
    for index in range(2):
        ds = ct_slice(study_uid=study, series_uid=generate_uid(), index=index)
        del ds.PatientID
        uids.append(ds.SOPInstanceUID)
        assert archive.ingest(_bytes(ds, tmp_path)).outcome is IngestOutcome.STORED
    with archive.db.session() as s:
        patients = s.scalars(select(Patient)).all()
        assert [p.patient_id for p in patients] == [""]
        stored = s.scalars(select(Instance.sop_instance_uid)).all()
    assert sorted(stored) == sorted(uids)


def test_parent_rows_deleted_by_another_process_are_created_again(
    backend, archive: Archive, tmp_path: Path
):
    # Two archives on one index stand for two processes: the first caches the ids of the
    # patient, study and series rows that the second then deletes.
    study, series = generate_uid(), generate_uid()
    first = ct_slice(study_uid=study, series_uid=series, index=0)
    assert archive.ingest(_bytes(first, tmp_path)).outcome is IngestOutcome.STORED
    other = Archive(backend.settings, migrate=False)
    try:
        assert other.delete_study(study) == 1
    finally:
        other.close()
    second = ct_slice(study_uid=study, series_uid=series, index=1)
    assert archive.ingest(_bytes(second, tmp_path)).outcome is IngestOutcome.STORED
    with archive.db.session() as s:
        row = s.execute(
            select(Series.series_instance_uid, Study.study_instance_uid)
            .join(Study, Series.study_fk == Study.id)
            .join(Instance, Instance.series_fk == Series.id)
            .where(Instance.sop_instance_uid == second.SOPInstanceUID)
        ).one()
    assert tuple(row) == (series, study)
    assert archive.stats().instances == 1


def test_reconcile_indexes_orphan_blobs_and_finishes_deletions(archive: Archive, tmp_path: Path):
    kept, orphan = write_series(tmp_path / "a", 2)
    archive.ingest(kept.read_bytes())
    # A crash between blob write and index commit: the blob exists, the row does not.
    ds = pydicom.dcmread(orphan, stop_before_pixels=True)
    orphan_key = instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    archive.blobs.put(orphan_key, orphan.read_bytes())
    # A crash after a delete's commit and before its blob deletion.
    gone = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    gone_key = instance_key(gone.StudyInstanceUID, gone.SeriesInstanceUID, gone.SOPInstanceUID)
    archive.blobs.put(gone_key, _bytes(gone, tmp_path))
    with archive.db.write_session() as s:
        s.add(PendingBlobDeletion(blob_key=gone_key))

    report = archive.reconcile()

    assert (report.reindexed, report.deleted_blobs) == (1, 1)
    assert archive.stats().instances == 2
    assert not archive.blobs.exists(gone_key)
    assert archive.reconcile().reindexed == 0


@pytest.mark.parametrize("index", ["sqlite", "postgresql"])
def test_concurrent_start_up_migrations(make_backend, index: str):
    # Several processes starting at once on one new index: each migrates or finds it done.
    backend = make_backend(index)
    env = {**os.environ, **backend.env}
    exe = Path(sys.executable).parent / "pacsbridge"
    procs = [
        subprocess.Popen([str(exe), "db", "upgrade"], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    archive = Archive(backend.settings, migrate=False)
    assert archive.stats().instances == 0
    archive.close()


@pytest.mark.parametrize("url", ["sqlite://", "postgresql+psycopg2://pb@127.0.0.1/none"])
def test_direct_statement_parameters_are_sqlalchemys(url: str):
    """The ingest statements' parameters, built without construct_params, are what
    SQLAlchemy would send the driver for the same values (JSON and date-time processing)."""
    from datetime import UTC, datetime

    from sqlalchemy import bindparam, create_engine, insert, update
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.dialects import sqlite as sqlite_dialect

    from archive.ingest import _DirectStatement

    engine = create_engine(url)  # never connects: statements are only compiled
    table: Any = Instance.__table__
    values = {
        "sop_instance_uid": "1.2.3",
        "series_fk": 7,
        "dicom_json": {"00080018": {"vr": "UI", "Value": ["1.2.3"]}},
        "received_at": datetime(2026, 11, 22, 8, 30, 1, 123456, tzinfo=UTC),
        "calling_ae_title": None,
    }
    dialect_insert = postgresql.insert if url.startswith("postgresql") else sqlite_dialect.insert
    statements: list[tuple[Any, dict[str, Any], bool]] = [
        (dialect_insert(table).on_conflict_do_nothing().returning(table.c.id), values, True),
        (
            update(table)
            .where(table.c.id == bindparam("row"))
            .values(received_at=bindparam("now")),
            {"row": 3, "now": values["received_at"]},
            True,
        ),
        # A literal in the statement: SQLAlchemy's construct_params builds the parameters.
        (insert(table).values(series_fk=5), {"sop_instance_uid": "1.2.4"}, False),
    ]
    for statement, params, planned in statements:
        direct = _DirectStatement(statement, engine, list(params))
        assert (direct._plan is not None) is planned
        compiled = direct._compiled
        expected = compiled.construct_params(params)
        for name, process in compiled._bind_processors.items():
            if name in expected:
                expected[name] = process(expected[name])
        if compiled.positional:
            expected = tuple(expected[n] for n in compiled.positiontup)
        assert direct._parameters(params) == expected
    engine.dispose()
