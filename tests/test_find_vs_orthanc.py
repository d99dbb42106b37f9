"""C-FIND differential against Orthanc: same data, same queries, same answers.

The synthetic archive of :mod:`tests.find_dataset` (300 studies, 120 patients, names in mixed
case, several components, UTF-8 and Latin-1) is loaded into pacsbridge (SQLite and PostgreSQL)
and into Debian's Orthanc. Every query of ``CASES`` goes to both over C-FIND (pynetdicom SCU, one
association per query and server) and the sets of the level's unique key are compared with the
answer the standard gives, computed here in Python from the generated records:

- pacsbridge must return exactly the standard's answer;
- Orthanc must return the standard's answer too, unless the case carries an ``OrthancDiffers``
  entry: then Orthanc must return what that entry says it does (modelled in Python, so a change of
  Orthanc's behaviour fails the test) and the entry says why the standard disagrees;
- a known pacsbridge bug is an ``xfail(strict=True)`` with its reason (``Bug``): it fails when
  the bug is fixed, so the mark is removed then.

README.md ("Differences from Orthanc in C-FIND matching") lists the differences found here.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from archive import Archive
from bench.peers import ORTHANC_BIN, OrthancTarget
from config import Settings
from tests.conftest import IN_CI, Backend, RunningServer, start_server
from tests.find_dataset import (
    PatientRecord,
    StudyRecord,
    datasets,
    generate,
    part10,
)

RECORDS = generate()
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
MODELS = {
    "study": StudyRootQueryRetrieveInformationModelFind,
    "patient": PatientRootQueryRetrieveInformationModelFind,
}


# --- the standard's matching rules, in plain Python (PS3.4 C.2.2.2) ----------------------------


def _regex(pattern: str) -> re.Pattern[str]:
    """``*`` any run of characters, ``?`` exactly one character (C.2.2.2.4)."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL)


def text_match(query: str) -> Callable[[str], bool]:
    """Single value or wildcard matching, case-sensitive (C.2.2.2.1, C.2.2.2.4)."""
    if "*" in query or "?" in query:
        rx = _regex(query)
        return lambda value: rx.fullmatch(value) is not None
    return lambda value: value == query


def _pn_normal(name: str) -> str:
    """A person name without trailing empty components and groups (PS3.5 6.2.1.1: "trailing
    null components and their delimiters may be omitted"), upper-cased."""
    groups = [group.rstrip("^") for group in name.split("=")]
    return "=".join(groups).rstrip("=").upper()


def pn_match(query: str) -> Callable[[str], bool]:
    """PN matching, insensitive to case (C.2.2.2.1 allows it for PN; both servers are set up so:
    pacsbridge's default, Orthanc's CaseSensitivePN=false)."""
    if "*" in query or "?" in query:
        rx = _regex(query.upper())
        return lambda v: bool(rx.fullmatch(v.upper()) or rx.fullmatch(_pn_normal(v)))
    wanted = _pn_normal(query)
    return lambda v: _pn_normal(v) == wanted


def _tm(value: str, *, upper: bool) -> float:
    """A TM value as seconds since midnight: the first (``upper`` False) or last instant of the
    period it denotes ("1200" is the minute 12:00, PS3.5 6.2 TM)."""
    hhmmss, _, fraction = value.partition(".")
    parts = [int(hhmmss[i : i + 2]) for i in range(0, len(hhmmss), 2)]
    seconds: float = parts[0] * 3600 + (parts[1] if len(parts) > 1 else 0) * 60
    seconds += parts[2] if len(parts) > 2 else 0
    if fraction:
        seconds += float("0." + fraction)
    if upper:
        seconds += {1: 3599, 2: 59, 3: 0}[len(parts)] + (0.999999 if not fraction else 0)
    return seconds


def tm_match(query: str) -> Callable[[str], bool]:
    """TM range or single value: the stored time (its first instant) within the query's period,
    bounds inclusive (C.2.2.2.5, "In the absence of Extended Negotiation")."""
    if "-" in query:
        low, _, high = query.partition("-")
    else:
        low = high = query
    lo = _tm(low, upper=False) if low else 0.0
    hi = _tm(high, upper=True) if high else 86400.0
    return lambda value: bool(value) and lo <= _tm(value, upper=False) <= hi


def da_match(query: str) -> Callable[[str], bool]:
    if "-" in query:
        low, _, high = query.partition("-")
        return lambda v: bool(v) and (not low or v >= low) and (not high or v <= high)
    return lambda v: v == query


# --- what Orthanc 1.10 does instead, where it differs ---------------------------------------


def orthanc_tm_string(query: str) -> Callable[[str], bool]:
    """Orthanc compares TM values as strings: "120000" > "1200", so a bound given to the minute
    excludes the very minute it names; a single value must be the same string."""
    if "-" not in query:
        return lambda v: v == query
    low, _, high = query.partition("-")
    return lambda v: bool(v) and (not low or v >= low) and (not high or v <= high)


def orthanc_pn_bytes(query: str) -> Callable[[str], bool]:
    """Orthanc's PN wildcard works on UTF-8 bytes: ``?`` is one byte, so it never matches a
    character of two or more bytes (ü, 田). Case folding includes accented letters."""
    parts = [
        b".*" if c == "*" else b"." if c == "?" else re.escape(c.encode()) for c in query.upper()
    ]
    rx = re.compile(b"".join(parts), re.DOTALL)
    return lambda v: rx.fullmatch(v.upper().encode()) is not None


def orthanc_pn_literal(query: str) -> Callable[[str], bool]:
    """Orthanc compares person names as whole strings (case-folded): "BROWN^" is not "BROWN",
    and "SMITH^JOHN^PETER^DR" is not "SMITH^JOHN^PETER^DR^"."""
    return lambda v: v.upper() == query.upper()


# --- the query table ------------------------------------------------------------------------


@dataclass(frozen=True)
class OrthancDiffers:
    """Orthanc returns what ``predicate`` selects instead of the standard's answer."""

    why: str
    predicate: Callable[[Any], bool]


@dataclass(frozen=True)
class Bug:
    """pacsbridge does not return the standard's answer: a reported bug (xfail strict)."""

    why: str
    backends: tuple[str, ...] = ("sqlite", "postgresql")


@dataclass(frozen=True)
class Case:
    id: str
    level: str
    keys: dict[str, str]
    expect: Callable[[Any], bool]
    """The standard's answer: is this entity (a record of the query level) a match?"""
    model: str = "study"
    orthanc: OrthancDiffers | None = None
    bug: Bug | None = None
    may_be_empty: bool = False


def study(**matchers: Callable[[Any], bool]) -> Callable[[StudyRecord], bool]:
    """A study-level predicate: every named attribute (a StudyRecord accessor) matches."""
    getters: dict[str, Callable[[StudyRecord], Any]] = {
        "patient_id": lambda s: s.patient.patient_id,
        "name": lambda s: s.patient.name,
        "birth_date": lambda s: s.patient.birth_date,
        "sex": lambda s: s.patient.sex,
        "date": lambda s: s.date,
        "time": lambda s: s.time,
        "accession": lambda s: s.accession,
        "description": lambda s: s.description,
        "referrer": lambda s: s.referrer,
        "uid": lambda s: s.uid,
    }

    def predicate(s: StudyRecord) -> bool:
        if "modalities" in matchers and not matchers["modalities"](s.modalities):
            return False
        return all(m(getters[k](s)) for k, m in matchers.items() if k != "modalities")

    return predicate


def any_of(*wanted: str) -> Callable[[set[str]], bool]:
    return lambda modalities: bool(modalities & set(wanted))


def patient(**matchers: Callable[[str], bool]) -> Callable[[PatientRecord], bool]:
    return lambda p: all(m(getattr(p, k)) for k, m in matchers.items())


def _first(pred: Callable[[StudyRecord], bool]) -> StudyRecord:
    return next(s for s in RECORDS if pred(s))


SERIES_STUDY = RECORDS[4]  # four series of three instances (see find_dataset.generate)
LOCALIZER, AXIAL, AXIAL_1MM, DOSE = SERIES_STUDY.series
SOME_STUDIES = [RECORDS[10].uid, RECORDS[20].uid, RECORDS[30].uid]
LOWER_ID = _first(lambda s: s.patient.patient_id.startswith("pb-")).patient.patient_id
TRAILING = "SMITH^JOHN^PETER^DR^"  # as stored: an empty name suffix with its delimiter

TM_STRING = (
    'PS3.4 C.2.2.2.5: the range includes its bounds; "1200" names the minute 12:00 '
    '(PS3.5 6.2 TM), so 12:00:00 and 12:00:30 are within "-1200". Orthanc compares the strings, '
    'and "120000" > "1200"'
)
PN_QUESTION_MARK = (
    "PS3.4 C.2.2.2.4: '?' matches any single character; Orthanc matches one byte of UTF-8, so "
    "'?' never matches ü, ñ or 田"
)

CASES: list[Case] = [
    # --- STUDY level, Study Root ---------------------------------------------------------
    Case("universal", "STUDY", {}, lambda s: True),
    Case(
        "uid-list",
        "STUDY",
        {"StudyInstanceUID": "\\".join(SOME_STUDIES)},
        study(uid=lambda u: u in SOME_STUDIES),
    ),
    Case("patient-id", "STUDY", {"PatientID": "PB00003"}, study(patient_id=text_match("PB00003"))),
    Case(
        "patient-id-lower-case",
        "STUDY",
        {"PatientID": LOWER_ID},
        study(patient_id=text_match(LOWER_ID)),
    ),
    Case(
        "patient-id-other-case",
        "STUDY",
        {"PatientID": LOWER_ID.upper()},
        study(patient_id=text_match(LOWER_ID.upper())),
        may_be_empty=True,
    ),
    Case(
        "patient-id-?", "STUDY", {"PatientID": "MRN0000?"}, study(patient_id=text_match("MRN0000?"))
    ),
    Case(
        "patient-id-pb*",
        "STUDY",
        {"PatientID": "pb*"},
        study(patient_id=text_match("pb*")),
    ),
    Case("name-exact", "STUDY", {"PatientName": "SMITH^JOHN"}, study(name=pn_match("SMITH^JOHN"))),
    Case(
        "name-exact-mixed-case",
        "STUDY",
        {"PatientName": "Smith^Anna"},
        study(name=pn_match("Smith^Anna")),
    ),
    Case("name-prefix", "STUDY", {"PatientName": "SMITH*"}, study(name=pn_match("SMITH*"))),
    Case("name-prefix-lower", "STUDY", {"PatientName": "smith*"}, study(name=pn_match("smith*"))),
    Case("name-infix", "STUDY", {"PatientName": "*SMITH*"}, study(name=pn_match("*SMITH*"))),
    Case("name-suffix", "STUDY", {"PatientName": "*^^Dr"}, study(name=pn_match("*^^Dr"))),
    Case("name-?", "STUDY", {"PatientName": "SM?TH*"}, study(name=pn_match("SM?TH*"))),
    Case("name-spaces", "STUDY", {"PatientName": "van der*"}, study(name=pn_match("van der*"))),
    Case("name-umlaut", "STUDY", {"PatientName": "Müller*"}, study(name=pn_match("Müller*"))),
    Case(
        "name-umlaut-lower",
        "STUDY",
        {"PatientName": "müller^hans"},
        study(name=pn_match("müller^hans")),
    ),
    Case(
        "name-ascii-no-accent-folding",
        "STUDY",
        {"PatientName": "MULLER*"},
        study(name=pn_match("MULLER*")),
    ),
    Case("name-infix-u-umlaut", "STUDY", {"PatientName": "*ü*"}, study(name=pn_match("*ü*"))),
    Case("name-enye", "STUDY", {"PatientName": "ñúñez*"}, study(name=pn_match("ñúñez*"))),
    Case(
        "name-o-slash",
        "STUDY",
        {"PatientName": "ØDEGÅRD^NILS"},
        study(name=pn_match("ØDEGÅRD^NILS")),
    ),
    Case("name-kanji", "STUDY", {"PatientName": "山田*"}, study(name=pn_match("山田*"))),
    Case(
        "name-greek-lower",
        "STUDY",
        {"PatientName": "παπαδοπούλου*"},
        study(name=pn_match("παπαδοπούλου*")),
    ),
    Case(
        "name-cyrillic-lower", "STUDY", {"PatientName": "иванов*"}, study(name=pn_match("иванов*"))
    ),
    Case(
        "name-?-umlaut",
        "STUDY",
        {"PatientName": "M?ller*"},
        study(name=pn_match("M?ller*")),
        orthanc=OrthancDiffers(PN_QUESTION_MARK, study(name=orthanc_pn_bytes("M?ller*"))),
    ),
    Case(
        "name-?-kanji",
        "STUDY",
        {"PatientName": "山?^太郎"},
        study(name=pn_match("山?^太郎")),
        orthanc=OrthancDiffers(PN_QUESTION_MARK, study(name=orthanc_pn_bytes("山?^太郎"))),
    ),
    Case(
        "name-trailing-caret-query",
        "STUDY",
        {"PatientName": "BROWN^"},
        study(name=pn_match("BROWN^")),
        orthanc=OrthancDiffers(
            "PS3.5 6.2.1.1: trailing empty components and their delimiters may be omitted, so "
            '"BROWN^" and "BROWN" are the same name; Orthanc compares the strings',
            study(name=orthanc_pn_literal("BROWN^")),
        ),
    ),
    Case(
        "name-trailing-caret-stored",
        "STUDY",
        {"PatientName": TRAILING},
        study(name=pn_match(TRAILING)),
    ),
    Case(
        "name-trailing-caret-stored-omitted",
        "STUDY",
        {"PatientName": TRAILING.rstrip("^")},
        study(name=pn_match(TRAILING.rstrip("^"))),
        orthanc=OrthancDiffers(
            'PS3.5 6.2.1.1 (as above): the stored "…^DR^" is the name "…^DR"; Orthanc compares '
            "the strings",
            study(name=orthanc_pn_literal(TRAILING.rstrip("^"))),
        ),
    ),
    Case("date-single", "STUDY", {"StudyDate": "20210310"}, study(date=da_match("20210310"))),
    Case(
        "date-range",
        "STUDY",
        {"StudyDate": "20210101-20211231"},
        study(date=da_match("20210101-20211231")),
    ),
    Case("date-from", "STUDY", {"StudyDate": "20230601-"}, study(date=da_match("20230601-"))),
    Case("date-until", "STUDY", {"StudyDate": "-20190331"}, study(date=da_match("-20190331"))),
    Case(
        "time-range-seconds",
        "STUDY",
        {"StudyTime": "100000-120000"},
        study(time=tm_match("100000-120000")),
    ),
    Case(
        "time-from-fraction",
        "STUDY",
        {"StudyTime": "115959.999999-"},
        study(time=tm_match("115959.999999-")),
    ),
    Case(
        "time-range-minutes",
        "STUDY",
        {"StudyTime": "1000-1200"},
        study(time=tm_match("1000-1200")),
        orthanc=OrthancDiffers(TM_STRING, study(time=orthanc_tm_string("1000-1200"))),
    ),
    Case(
        "time-until-minutes",
        "STUDY",
        {"StudyTime": "-1200"},
        study(time=tm_match("-1200")),
        orthanc=OrthancDiffers(TM_STRING, study(time=orthanc_tm_string("-1200"))),
    ),
    Case(
        "time-single-minutes",
        "STUDY",
        {"StudyTime": "1200"},
        study(time=tm_match("1200")),
        orthanc=OrthancDiffers(
            '"1200" is the minute 12:00 (PS3.5 6.2 TM); pacsbridge matches the times within it. '
            "Orthanc wants the same string. (PS3.4 does not spell out single value matching of "
            "a TM given to the minute: this is pacsbridge's reading, consistent with its ranges)",
            study(time=orthanc_tm_string("1200")),
        ),
    ),
    Case(
        "time-range-stored-without-seconds",
        "STUDY",
        {"StudyTime": "093000-093500"},
        study(time=tm_match("093000-093500")),
        orthanc=OrthancDiffers(
            'Orthanc compares the strings too: the stored "0930" < "093000"',
            study(time=orthanc_tm_string("093000-093500")),
        ),
    ),
    Case(
        "date-single-and-time-range",
        "STUDY",
        {"StudyDate": "20210310", "StudyTime": "0900-1000"},
        study(date=da_match("20210310"), time=tm_match("0900-1000")),
    ),
    Case(
        "date-range-and-time-range",
        "STUDY",
        {"StudyDate": "20210101-20210630", "StudyTime": "080000-170000"},
        study(date=da_match("20210101-20210630"), time=tm_match("080000-170000")),
    ),
    Case(
        "accession-exact",
        "STUDY",
        {"AccessionNumber": RECORDS[5].accession},
        study(accession=text_match(RECORDS[5].accession)),
    ),
    Case(
        "accession-acc*", "STUDY", {"AccessionNumber": "acc*"}, study(accession=text_match("acc*"))
    ),
    Case(
        "accession-ACC*",
        "STUDY",
        {"AccessionNumber": "ACC*"},
        study(accession=text_match("ACC*")),
        may_be_empty=True,
    ),
    Case("modality-CT", "STUDY", {"ModalitiesInStudy": "CT"}, study(modalities=any_of("CT"))),
    Case("modality-SR", "STUDY", {"ModalitiesInStudy": "SR"}, study(modalities=any_of("SR"))),
    Case(
        "modality-CT-or-MR",
        "STUDY",
        {"ModalitiesInStudy": "CT\\MR"},
        study(modalities=any_of("CT", "MR")),
    ),
    Case(
        "modality-PT-DX-US",
        "STUDY",
        {"ModalitiesInStudy": "PT\\DX\\US"},
        study(modalities=any_of("PT", "DX", "US")),
    ),
    Case(
        "modality-lower-case",
        "STUDY",
        {"ModalitiesInStudy": "ct"},
        study(modalities=any_of("ct")),
        may_be_empty=True,
    ),
    Case(
        "modality-MR-and-date",
        "STUDY",
        {"ModalitiesInStudy": "MR", "StudyDate": "20220101-20221231"},
        study(modalities=any_of("MR"), date=da_match("20220101-20221231")),
    ),
    Case(
        "description-exact",
        "STUDY",
        {"StudyDescription": "CT HEAD"},
        study(description=text_match("CT HEAD")),
    ),
    Case(
        "description-other-case",
        "STUDY",
        {"StudyDescription": "ct head"},
        study(description=text_match("ct head")),
        may_be_empty=True,
    ),
    Case(
        "description-CT*",
        "STUDY",
        {"StudyDescription": "CT*"},
        study(description=text_match("CT*")),
    ),
    Case(
        "description-*HEAD*",
        "STUDY",
        {"StudyDescription": "*HEAD*"},
        study(description=text_match("*HEAD*")),
    ),
    Case(
        "description-?R-*",
        "STUDY",
        {"StudyDescription": "?R *"},
        study(description=text_match("?R *")),
    ),
    Case(
        "referrer-exact-other-case",
        "STUDY",
        {"ReferringPhysicianName": "CUDDY^LISA"},
        study(referrer=pn_match("CUDDY^LISA")),
    ),
    Case(
        "referrer-prefix",
        "STUDY",
        {"ReferringPhysicianName": "house*"},
        study(referrer=pn_match("house*")),
    ),
    Case(
        "birth-date-and-sex",
        "STUDY",
        {"PatientBirthDate": "-19400101", "PatientSex": "M"},
        study(birth_date=da_match("-19400101"), sex=text_match("M")),
    ),
    Case(
        "name-and-modality-and-date",
        "STUDY",
        {"PatientName": "*a*", "ModalitiesInStudy": "CT", "StudyDate": "20200101-"},
        study(name=pn_match("*a*"), modalities=any_of("CT"), date=da_match("20200101-")),
    ),
    # --- PATIENT level, Patient Root ------------------------------------------------------
    Case("patients-universal", "PATIENT", {}, lambda p: True, model="patient"),
    Case(
        "patients-name",
        "PATIENT",
        {"PatientName": "smith*"},
        patient(name=pn_match("smith*")),
        model="patient",
    ),
    Case(
        "patients-name-enye",
        "PATIENT",
        {"PatientName": "*ñ*"},
        patient(name=pn_match("*ñ*")),
        model="patient",
    ),
    Case(
        "patients-sex",
        "PATIENT",
        {"PatientSex": "F"},
        patient(sex=text_match("F")),
        model="patient",
    ),
    Case(
        "patients-birth-from",
        "PATIENT",
        {"PatientBirthDate": "19600101-"},
        patient(birth_date=da_match("19600101-")),
        model="patient",
    ),
    Case(
        "patient-root-studies",
        "STUDY",
        {"PatientID": "PB00003", "StudyDate": "20200101-"},
        study(patient_id=text_match("PB00003"), date=da_match("20200101-")),
        model="patient",
    ),
    # --- SERIES and IMAGE levels (hierarchical: the unique keys above are single values) -----
    Case(
        "series-all",
        "SERIES",
        {"StudyInstanceUID": SERIES_STUDY.uid},
        lambda se: se[0] is SERIES_STUDY,
    ),
    Case(
        "series-modality",
        "SERIES",
        {"StudyInstanceUID": SERIES_STUDY.uid, "Modality": "CT"},
        lambda se: se[0] is SERIES_STUDY and se[1].modality == "CT",
    ),
    Case(
        "series-description-Ax*",
        "SERIES",
        {"StudyInstanceUID": SERIES_STUDY.uid, "SeriesDescription": "Ax*"},
        lambda se: se[0] is SERIES_STUDY and text_match("Ax*")(se[1].description),
    ),
    Case(
        "series-number",
        "SERIES",
        {"StudyInstanceUID": SERIES_STUDY.uid, "SeriesNumber": "3"},
        lambda se: se[0] is SERIES_STUDY and se[1].number == 3,
    ),
    Case(
        "series-uid-list",
        "SERIES",
        {"StudyInstanceUID": SERIES_STUDY.uid, "SeriesInstanceUID": f"{AXIAL.uid}\\{DOSE.uid}"},
        lambda se: se[1] in (AXIAL, DOSE),
    ),
    Case(
        "images-of-series",
        "IMAGE",
        {"StudyInstanceUID": SERIES_STUDY.uid, "SeriesInstanceUID": AXIAL.uid},
        lambda im: im[1] is AXIAL,
    ),
    Case(
        "image-number",
        "IMAGE",
        {
            "StudyInstanceUID": SERIES_STUDY.uid,
            "SeriesInstanceUID": AXIAL_1MM.uid,
            "InstanceNumber": "2",
        },
        lambda im: im[1] is AXIAL_1MM and im[2].number == 2,
    ),
    Case(
        "image-uid-list",
        "IMAGE",
        {
            "StudyInstanceUID": SERIES_STUDY.uid,
            "SeriesInstanceUID": LOCALIZER.uid,
            "SOPInstanceUID": "\\".join(i.uid for i in LOCALIZER.instances[::2]),
        },
        lambda im: im[2] in LOCALIZER.instances[::2],
    ),
]


def entities(level: str) -> dict[str, Any]:
    """Every entity of ``level`` in the generated data, by its unique key."""
    if level == "PATIENT":
        return {s.patient.patient_id: s.patient for s in RECORDS}
    if level == "STUDY":
        return {s.uid: s for s in RECORDS}
    if level == "SERIES":
        return {se.uid: (s, se) for s in RECORDS for se in s.series}
    return {i.uid: (s, se, i) for s in RECORDS for se in s.series for i in se.instances}


def selected(level: str, predicate: Callable[[Any], bool]) -> set[str]:
    return {uid for uid, entity in entities(level).items() if predicate(entity)}


# --- the two servers ------------------------------------------------------------------------


@dataclass
class Peer:
    name: str
    port: int
    ae_title: str
    cache: dict[str, tuple[int, set[str]]] = field(default_factory=dict)


def c_find(peer: Peer, case: Case) -> tuple[int, set[str]]:
    """Send ``case`` on a new association; (final status, set of the level's unique key)."""
    model = MODELS[case.model]
    identifier = Dataset()
    identifier.QueryRetrieveLevel = case.level
    keys = {UNIQUE_KEYS[case.level]: "", **case.keys}
    if not all(v.isascii() for v in keys.values()):
        identifier.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    ae = AE(ae_title="DIFFSCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", peer.port, ae_title=peer.ae_title)
    assert assoc.is_established, f"{peer.name} refused the association"
    found: set[str] = set()
    status = -1
    try:
        for status_ds, response in assoc.send_c_find(identifier, model):
            assert status_ds is not None and "Status" in status_ds, f"{peer.name}: no response"
            status = int(status_ds.Status)
            if response is not None and status in (0xFF00, 0xFF01):
                found.add(str(response.get(UNIQUE_KEYS[case.level], "")))
    finally:
        assoc.release()
    return status, found


def _skip_or_fail(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


BLOBS: list[bytes] = []


def blobs() -> list[bytes]:
    if not BLOBS:
        BLOBS.extend(part10(ds) for ds in datasets(RECORDS))
    return BLOBS


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    if not os.access(ORTHANC_BIN, os.X_OK):
        _skip_or_fail(f"{ORTHANC_BIN} is not installed (apt-get install orthanc)")
    target = OrthancTarget(
        tmp_path_factory.mktemp("orthanc") / "orthanc",
        nodelay=True,  # DCMTK's Nagle default would add ~40 ms to every C-FIND response
        name="orthanc",
        config={"DicomAlwaysAllowFind": True, "CaseSensitivePN": False},
    )
    try:
        target.start()
        with httpx.Client(base_url=target.http, timeout=30) as client:
            for blob in blobs():
                client.post("/instances", content=blob).raise_for_status()
            stats = client.get("/statistics").json()
        assert int(stats["CountInstances"]) == len(blobs())
        yield Peer("orthanc", target.dimse_port, target.ae)
    finally:
        target.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def pacsbridge(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Peer]:
    index = request.param
    tmp = tmp_path_factory.mktemp(f"pacsbridge-{index}")
    values: dict[str, Any] = {"data_dir": str(tmp / "data"), "storage_fsync": False}
    admin_url = None
    db_name = f"pacsbridge_diff_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    if index == "postgresql":
        admin_url = request.getfixturevalue("postgres_admin")
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db_name}"'))
        admin.dispose()
        values["database_url"] = (
            make_url(admin_url).set(database=db_name).render_as_string(hide_password=False)
        )
    server: RunningServer | None = None
    try:
        settings = Settings(**values)
        archive = Archive(settings)
        try:
            for blob in blobs():
                archive.ingest(blob)
        finally:
            archive.close()
        env = {
            f"PACSBRIDGE_{k.upper()}": v if isinstance(v, str) else json.dumps(v)
            for k, v in values.items()
        }
        server = start_server(Backend(index, "file", settings, env), tmp)
        yield Peer(f"pacsbridge-{index}", server.dimse_port, server.ae_title)
    finally:
        if server is not None:
            server.stop()
        if admin_url is not None:
            admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
            admin.dispose()


# --- the tests ------------------------------------------------------------------------------


def test_the_table_is_meaningful():
    """Enough queries, distinct ids, and every documented difference shows in the data."""
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    for case in CASES:
        expected = selected(case.level, case.expect)
        assert expected or case.may_be_empty, f"{case.id}: the standard's answer is empty"
        if case.orthanc is not None:
            assert selected(case.level, case.orthanc.predicate) != expected, case.id


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_c_find_matches_the_standard_and_orthanc(
    case: Case, pacsbridge: Peer, orthanc: Peer, request: pytest.FixtureRequest
):
    expected = selected(case.level, case.expect)

    if case.id not in orthanc.cache:
        orthanc.cache[case.id] = c_find(orthanc, case)
    orthanc_status, orthanc_found = orthanc.cache[case.id]
    assert orthanc_status == 0x0000
    if case.orthanc is None:
        assert orthanc_found == expected, "Orthanc disagrees with the standard (not documented)"
    else:  # Orthanc does what the table says it does, and that is not the standard's answer
        assert orthanc_found == selected(case.level, case.orthanc.predicate)

    pb_status, pb_found = c_find(pacsbridge, case)
    assert pb_status == 0x0000
    index = pacsbridge.name.removeprefix("pacsbridge-")
    if case.bug is not None and index in case.bug.backends:
        request.applymarker(pytest.mark.xfail(reason=case.bug.why, strict=True))
    assert pb_found == expected, (
        f"pacsbridge: {len(pb_found - expected)} more, {len(expected - pb_found)} fewer "
        "than the standard's answer"
    )
    if case.orthanc is None:
        assert pb_found == orthanc_found


RETURN_KEYS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
]


def _study_answers(peer: Peer) -> dict[str, dict[str, Any]]:
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 192"
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    for keyword in RETURN_KEYS:
        setattr(identifier, keyword, "")
    ae = AE(ae_title="DIFFSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", peer.port, ae_title=peer.ae_title)
    assert assoc.is_established
    answers: dict[str, dict[str, Any]] = {}
    try:
        for status, ds in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if ds is None or status.Status not in (0xFF00, 0xFF01):
                continue
            row: dict[str, Any] = {}
            for keyword in RETURN_KEYS:
                value = ds.get(keyword)
                if keyword == "ModalitiesInStudy":
                    values = value if isinstance(value, MultiValue) else [value] if value else []
                    row[keyword] = {str(v) for v in values}
                elif keyword.startswith("NumberOf"):
                    row[keyword] = int(value) if value not in (None, "") else None
                else:
                    row[keyword] = str(value) if value is not None else ""
            answers[str(ds.StudyInstanceUID)] = row
    finally:
        assoc.release()
    return answers


def latin1_only(name: str) -> str:
    return "".join(c for c in name if ord(c) < 256)


def test_returned_attributes_agree(pacsbridge: Peer, orthanc: Peer):
    """A universal STUDY query (request in ISO_IR 192) returning 12 keys: pacsbridge returns the
    stored values; so does Orthanc, except that it answers in its DefaultEncoding (Latin1 as
    shipped) whatever the request's character set, and drops what Latin-1 cannot hold."""
    ours, theirs = _study_answers(pacsbridge), _study_answers(orthanc)
    assert set(ours) == set(theirs) == {s.uid for s in RECORDS}
    lossy = {s.uid for s in RECORDS if latin1_only(s.patient.name) != s.patient.name}
    assert lossy  # 山田^太郎, Παπαδοπούλου^Ζωή, Иванов^Иван...
    for record in RECORDS:
        truth = {
            "PatientName": record.patient.name,
            "PatientID": record.patient.patient_id,
            "PatientBirthDate": record.patient.birth_date,
            "PatientSex": record.patient.sex,
            "StudyDate": record.date,
            "StudyTime": record.time,
            "AccessionNumber": record.accession,
            "StudyDescription": record.description,
            "ReferringPhysicianName": record.referrer,
            "ModalitiesInStudy": record.modalities,
            "NumberOfStudyRelatedSeries": len(record.series),
            "NumberOfStudyRelatedInstances": sum(len(se.instances) for se in record.series),
        }
        assert ours[record.uid] == truth, record.uid
        truth["PatientName"] = latin1_only(record.patient.name)
        assert theirs[record.uid] == truth, record.uid
