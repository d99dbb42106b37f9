"""The SQL of a search is built once per shape (archive/query.py: which keys, how each
matches, paging) and reused with the values of each search. These tests run searches of one
shape with different values, interleaved with other shapes, on SQLite and PostgreSQL, and hold
every answer to the data set and to SQL built afresh for that search alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from archive import Archive
from archive import query as query_module
from archive.query import Query, QueryLevel, QueryModel, find
from tests import find_dataset
from tests.conftest import Backend

RECORDS = find_dataset.generate(studies=40)


@pytest.fixture
def archive(index_backend: Backend) -> Iterator[Archive]:
    arc = Archive(index_backend.settings)
    for ds in find_dataset.datasets(RECORDS):
        arc.ingest(find_dataset.part10(ds))
    yield arc
    arc.close()


def _search(archive: Archive, level: QueryLevel, **keys: str) -> list[str]:
    """The unique keys of the matches, in the order given."""
    unique = {
        QueryLevel.STUDY: "StudyInstanceUID",
        QueryLevel.SERIES: "SeriesInstanceUID",
        QueryLevel.IMAGE: "SOPInstanceUID",
    }[level]
    limit = keys.pop("limit", None)
    offset = keys.pop("offset", "0")
    query = Query.from_keywords(
        level,
        {unique: "", **keys},
        model=QueryModel.STUDY_ROOT,
        hierarchical=False,
        limit=int(limit) if limit is not None else None,
        offset=int(offset),
    )
    tag = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E"}.get(unique, "00080018")
    return [match[tag]["Value"][0] for match in find(archive.db, query)]


def _fresh(archive: Archive, level: QueryLevel, **keys: str) -> list[str]:
    """The same search with its SQL built anew."""
    query_module._shaped_select.cache_clear()
    return _search(archive, level, **keys)


def _studies(pred) -> set[str]:
    return {s.uid for s in RECORDS if pred(s)}


def test_one_shape_many_values(archive: Archive):
    patients = sorted({s.patient.patient_id for s in RECORDS})[:6]
    dates = sorted({s.date for s in RECORDS})
    months = [(d[:6] + "01", d[:6] + "31") for d in dates[:: max(1, len(dates) // 5)]]
    modalities = sorted({m for s in RECORDS for m in s.modalities})
    query_module._shaped_select.cache_clear()
    for round_ in range(2):  # the second round runs on SQL made in the first
        for n, patient in enumerate(patients):
            found = _search(archive, QueryLevel.STUDY, PatientID=patient)
            assert set(found) == _studies(lambda s, p=patient: s.patient.patient_id == p)
            low, high = months[n % len(months)]
            found = _search(archive, QueryLevel.STUDY, StudyDate=f"{low}-{high}")
            assert set(found) == _studies(lambda s, a=low, b=high: a <= s.date <= b)
            modality = modalities[n % len(modalities)]
            found = _search(
                archive, QueryLevel.STUDY, ModalitiesInStudy=modality, StudyDate=f"{low}-"
            )
            assert set(found) == _studies(
                lambda s, m=modality, a=low: m in s.modalities and s.date >= a
            )
            two = [s.uid for s in RECORDS[n : n + 2 + round_]]  # 2, then 3 values
            found = _search(archive, QueryLevel.STUDY, StudyInstanceUID="\\".join(two))
            assert sorted(found) == sorted(two)
        assert query_module._shaped_select.cache_info().currsize == 4, round_


def test_paging_is_bound_per_search(archive: Archive):
    everything = _search(archive, QueryLevel.STUDY)
    assert len(everything) == len(RECORDS)
    pages = []
    for offset in range(0, len(RECORDS), 7):
        pages += _search(archive, QueryLevel.STUDY, limit="7", offset=str(offset))
    assert pages == everything
    assert _search(archive, QueryLevel.STUDY, offset="35") == everything[35:]
    assert _search(archive, QueryLevel.STUDY, limit="3") == everything[:3]


@pytest.mark.parametrize(
    ("level", "keys"),
    [
        (QueryLevel.STUDY, {"PatientName": "*a*"}),
        (QueryLevel.STUDY, {"PatientName": "SMITH*", "StudyDate": "-20220630"}),
        (QueryLevel.STUDY, {"StudyTime": "0800-1200", "StudyDate": "20200101-"}),
        (QueryLevel.STUDY, {"ModalitiesInStudy": "C*"}),
        (QueryLevel.STUDY, {"ModalitiesInStudy": "CT\\MR", "limit": "5", "offset": "2"}),
        (QueryLevel.STUDY, {"NumberOfStudyRelatedSeries": "2"}),
        (QueryLevel.STUDY, {"SOPClassesInStudy": "1.2.840.10008.5.1.4.1.1.2"}),
        (QueryLevel.SERIES, {"Modality": "MR", "SeriesNumber": "2"}),
        (QueryLevel.SERIES, {"SeriesNumber": "999"}),
        (QueryLevel.IMAGE, {"InstanceNumber": "3", "Modality": "CT"}),
    ],
)
def test_cached_sql_answers_as_fresh_sql(archive: Archive, level: QueryLevel, keys):
    fresh = _fresh(archive, level, **keys)
    for _ in range(2):
        assert _search(archive, level, **keys) == fresh
    if level is QueryLevel.SERIES and keys.get("SeriesNumber") == "999":
        assert fresh == []
    else:
        assert fresh, keys  # every case matches something in the data set
