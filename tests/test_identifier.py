"""C-FIND identifiers encoded from the JSON (dicom_node/identifier.py) are byte for byte what
pydicom writes for the same identifier, in both little endian transfer syntaxes, for every
match of the differential data set at every level (non-ASCII names in Latin-1 and UTF-8,
computed attributes, empty return keys)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from archive import Archive
from archive.query import Key, Query, QueryLevel, QueryModel, find
from config import Settings
from dicom_node.find import _encode_directly, _response_charset
from dicom_node.identifier import Unencodable, codec_for, encode_identifier
from dicom_node.identifier import texts as identifier_texts
from tests import find_dataset

RETURN_KEYS = {
    QueryLevel.PATIENT: [
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "IssuerOfPatientID",
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances", "OtherPatientIDs",
    ],
    QueryLevel.STUDY: [
        "PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
        "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy", "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "InstitutionName",
        "RetrieveAETitle", "InstanceAvailability", "PatientAge",
    ],
    QueryLevel.SERIES: [
        "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "SeriesDate",
        "NumberOfSeriesRelatedInstances", "ProtocolName", "Manufacturer", "StationName",
    ],
    QueryLevel.IMAGE: [
        "SOPClassUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames", "ContentDate",
        "ImageType", "BitsAllocated", "PhotometricInterpretation",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("identifier") / "data")
    arc = Archive(settings)
    records = find_dataset.generate(studies=60)
    for ds in find_dataset.datasets(records):
        arc.ingest(find_dataset.part10(ds))
    yield arc
    arc.close()


def _keys(level: QueryLevel) -> list[Key]:
    keys = []
    for keyword in RETURN_KEYS[level]:
        tag = tag_for_keyword(keyword)
        assert tag is not None
        keys.append(Key(int(tag), dictionary_VR(tag)))
    return keys


def _pydicom_bytes(result: dict, implicit: bool) -> bytes:
    encoded = encode(Dataset.from_json(result), implicit, True)
    assert encoded is not None
    return encoded


@pytest.mark.parametrize("request_charset", [None, "ISO_IR 100", "ISO_IR 192"])
@pytest.mark.parametrize("level", list(QueryLevel))
def test_identifiers_match_pydicom(archive: Archive, level: QueryLevel, request_charset):
    query = Query(level, QueryModel.PATIENT_ROOT, _keys(level), hierarchical=False)
    results = list(find(archive.db, query))
    assert results
    direct = 0
    for result in results:
        result["00080054"] = {"vr": "AE", "Value": ["PACSBRIDGE"]}
        charset = _response_charset(request_charset, result)
        if charset:
            result["00080005"] = {"vr": "CS", "Value": charset.split("\\")}
        for implicit in (True, False):
            try:
                ours = encode_identifier(result, implicit_vr=implicit, codec=codec_for(charset))
            except Unencodable:
                continue
            direct += 1
            assert ours == _pydicom_bytes(result, implicit), result
    # Every identifier of these levels takes the direct path.
    assert direct == 2 * len(results)


@pytest.mark.parametrize("request_charset", [None, "ISO_IR 100", "ISO_IR 192", "ISO_IR 144"])
def test_response_character_set_on_the_direct_path(archive: Archive, request_charset):
    """What handle_find sends: the request's character set while it can carry the values,
    else UTF-8, exactly as pydicom would encode the same identifier."""
    query = Query(QueryLevel.STUDY, QueryModel.STUDY_ROOT, _keys(QueryLevel.STUDY))
    for result in find(archive.db, query):
        expected = dict(result)
        charset = _response_charset(request_charset, expected)
        if charset:
            expected["00080005"] = {"vr": "CS", "Value": charset.split("\\")}
        for implicit in (True, False):
            ours = _encode_directly(dict(result), request_charset, implicit)
            assert ours == _pydicom_bytes(expected, implicit)


def test_non_ascii_names_are_in_the_data(archive: Archive):
    query = Query(QueryLevel.PATIENT, QueryModel.PATIENT_ROOT, _keys(QueryLevel.PATIENT))
    names = [
        r["00100010"].get("Value", [{}])[0].get("Alphabetic", "") for r in find(archive.db, query)
    ]
    assert any(not name.isascii() for name in names)


# Return keys the row encoder covers (index columns and computed attributes).
ROW_KEYS = {
    QueryLevel.PATIENT: [
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances", "RetrieveAETitle", "InstanceAvailability",
    ],
    QueryLevel.STUDY: [
        "PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
        "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances", "RetrieveAETitle",
    ],
    QueryLevel.SERIES: [
        "Modality", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances",
    ],
    QueryLevel.IMAGE: ["SOPClassUID", "InstanceNumber"],
}  # fmt: skip


@pytest.mark.parametrize("request_charset", [None, "ISO_IR 100", "ISO_IR 192"])
@pytest.mark.parametrize("level", list(QueryLevel))
def test_row_encoder_is_the_json_path(archive: Archive, level: QueryLevel, request_charset):
    """Identifiers encoded straight from index rows (RowEncoder) are byte for byte what the
    JSON path (_encode_directly) sends; matches it leaves to that path are the non-ASCII
    ones."""
    from archive.query import find_matches
    from dicom_node.identifier import RowEncoder

    keys = []
    for keyword in ROW_KEYS[level]:
        tag = tag_for_keyword(keyword)
        assert tag is not None
        keys.append(Key(int(tag), dictionary_VR(tag)))
    query = Query(level, QueryModel.PATIENT_ROOT, keys, hierarchical=False)
    wants_ae = "RetrieveAETitle" in ROW_KEYS[level]
    wants_availability = "InstanceAvailability" in ROW_KEYS[level]
    fixed = {}
    if request_charset:
        fixed["00080005"] = ("CS", request_charset)
    if wants_ae:
        fixed["00080054"] = ("AE", "PACSBRIDGE")
    if wants_availability:
        fixed["00080056"] = ("CS", "ONLINE")
    for implicit in (True, False):
        matches = find_matches(archive.db, query)
        encoder = RowEncoder.build(matches.plan, level.value, implicit_vr=implicit, fixed=fixed)
        assert encoder is not None
        fast = left = 0
        for match in matches.items:
            result = matches.json(match)
            if wants_ae:
                result["00080054"] = {"vr": "AE", "Value": ["PACSBRIDGE"]}
            if wants_availability:
                result["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
            expected = _encode_directly(result, request_charset, implicit)
            ours = encoder.encode(match)
            if ours is None:
                left += 1
                assert any(not text.isascii() for text in identifier_texts(result)), result
            else:
                fast += 1
                assert ours == expected, result
        assert fast
        if level in (QueryLevel.PATIENT, QueryLevel.STUDY):
            assert left  # the non-ASCII names


def test_row_encoder_leaves_stored_json_attributes_to_the_json_path(archive: Archive):
    from archive.query import find_matches
    from dicom_node.identifier import RowEncoder

    query = Query(QueryLevel.STUDY, QueryModel.STUDY_ROOT, _keys(QueryLevel.STUDY))
    matches = find_matches(archive.db, query)
    assert RowEncoder.build(matches.plan, "STUDY", implicit_vr=True, fixed={}) is None


def test_what_is_left_to_pydicom():
    with pytest.raises(Unencodable):
        encode_identifier(
            {"00081115": {"vr": "SQ", "Value": [{"0020000E": {"vr": "UI", "Value": ["1.2"]}}]}},
            implicit_vr=True,
            codec="ascii",
        )
    with pytest.raises(Unencodable):
        encode_identifier(
            {"00101030": {"vr": "DS", "Value": [72.5]}}, implicit_vr=True, codec="ascii"
        )
    with pytest.raises(Unencodable):
        codec_for("ISO 2022 IR 87")
    with pytest.raises(Unencodable):  # a name that ASCII cannot carry
        encode_identifier(
            {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller"}]}},
            implicit_vr=False,
            codec="ascii",
        )
    assert "Жанна".encode(codec_for("ISO_IR 144")) == "Жанна".encode("iso8859_5")
