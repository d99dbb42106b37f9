"""One query matcher for C-FIND and QIDO-RS (PS3.4 C.2.2.2 attribute matching).

A :class:`Query` names a level (PATIENT / STUDY / SERIES / IMAGE), the information model, and
matching keys as DICOM text values. :func:`find` turns the indexed keys into parameterised SQL,
matches everything else against each candidate's stored DICOM JSON (slower, still correct), and
yields one DICOM JSON object (PS3.18 F.2) per match holding the requested return keys.

Matching rules implemented (PS3.4 C.2.2.2):
- single value matching; case-insensitive for person names when ``case_insensitive_pn``;
- universal matching: an empty value (or ``*`` alone) matches everything, including no value;
- wildcard matching with ``*`` and ``?`` for text VRs (AE CS LO LT PN SH ST UC UR UT);
- range matching ``a-b``, ``a-``, ``-b`` for DA, TM, DT; a date and a time range of one pair
  (e.g. StudyDate + StudyTime) combine into one date-time range only when asked
  (``combine_date_time``, C.2.2.2.5.2), else each is matched on its own;
- list of UID matching: ``uid1\\uid2\\…`` (C.2.2.2.2);
- sequence matching is not supported by the Q/R models: a sequence key is a return key only.
  The Modality Worklist model (:mod:`archive.worklist`) matches the keys of the Scheduled
  Procedure Step Sequence's one item (C.2.2.2.6) with these same rules and SQL.

Matching values are held to what their VR can hold (PS3.5 6.2) before any SQL is built, the
same for C-FIND and QIDO-RS: integers within their VR's range, decimals finite, text no longer
than the VR's maximum length (wildcards aside, with a bounded number of ``*``), months, days
and times of day that exist, at most :data:`MAX_LIST_VALUES` values in lists, no NUL. A value
outside those bounds cannot match a stored value; it is refused with a :class:`QueryError`
that names the attribute, and never reaches the database as an error (a number beyond 64
bits, a LIKE pattern too complex).
"""

from __future__ import annotations

import enum
import functools
import itertools
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    case,
    distinct,
    exists,
    false,
    func,
    literal,
    or_,
    select,
    true,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import aliased

from archive.db import Database
from archive.dicom import normalise_person_name, valid_uid
from archive.models import Instance, Patient, Series, Study


class QueryLevel(enum.StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class QueryModel(enum.StrEnum):
    PATIENT_ROOT = "PATIENT_ROOT"
    STUDY_ROOT = "STUDY_ROOT"
    MODALITY_WORKLIST = "MODALITY_WORKLIST"
    """The Modality Worklist Information Model (PS3.4 K.6.1): one entity, the Scheduled
    Procedure Step of an order, matched over the orders on the worklist
    (:mod:`archive.worklist`). It has no levels: ``Query.level`` is not used."""


class QueryError(ValueError):
    """The query cannot be run as given (C-FIND 0xA900 / 0xC000, QIDO-RS 400)."""


class TooManyMatches(Exception):
    """The query matches more records than :attr:`Query.max_matches` (C-FIND 0xA700)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} matches; narrow the query")
        self.limit = limit


_LEVEL_ORDER = [QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE]
UNIQUE_KEYS = {
    QueryLevel.PATIENT: "PatientID",
    QueryLevel.STUDY: "StudyInstanceUID",
    QueryLevel.SERIES: "SeriesInstanceUID",
    QueryLevel.IMAGE: "SOPInstanceUID",
}
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_RANGE_VRS = frozenset({"DA", "TM", "DT"})
_INT_VRS = frozenset({"IS", "US", "UL", "SS", "SL"})

#: The values of the integer VRs (PS3.5 Table 6.2-1).
_INT_RANGES: dict[str, tuple[int, int]] = {
    "IS": (-(2**31), 2**31 - 1),
    "SS": (-(2**15), 2**15 - 1),
    "US": (0, 2**16 - 1),
    "SL": (-(2**31), 2**31 - 1),
    "UL": (0, 2**32 - 1),
    "SV": (-(2**63), 2**63 - 1),
    "UV": (0, 2**64 - 1),
}
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})
#: The most characters a value of each text VR holds (PS3.5 Table 6.2-1; PN: per component
#: group, UI: per UID of a list, CS: per code of a list). Matching values are held to these, or
#: to :data:`MATCHING_LENGTH_FLOOR` where that is more, ``*`` wildcards aside. UC, UR and UT are
#: unbounded in the standard: matching values of those (and of any other VR) are held to
#: :data:`_MAX_OTHER_LENGTH`.
_MAX_LENGTH: dict[str, int] = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "UI": 64,
}
_MAX_OTHER_LENGTH = 10240
#: Matching values of the short text VRs may be longer than the VR allows, up to this many
#: characters (wildcards aside): an SCU whose accession numbers, say, are longer than SH
#: allows gets what such a value matches (ingest keeps values within their VR, so nothing),
#: not a failure; what is refused is the value no client sends, which would only load the
#: index (a pattern of 30,000 characters). UIDs are held to their 64 characters.
MATCHING_LENGTH_FLOOR = 1024
#: The most ``*`` wildcards one matching value may hold (runs of ``*`` count once: they mean
#: the same). Enough for every component of a three-group person name.
MAX_WILDCARDS = 32
#: The most values the lists of one query may hold together (UID lists, CS lists): far below
#: the bind-parameter limits of SQLite (32,766) and PostgreSQL (65,535).
MAX_LIST_VALUES = 10_000
_STAR_RUNS = re.compile(r"\*{2,}")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


@dataclass(frozen=True, slots=True)
class Attribute:
    """An attribute the index holds in a column (or computes)."""

    keyword: str
    level: QueryLevel
    column: Any | None = None  # an InstrumentedAttribute of the models
    search_column: Any | None = None  # upper-cased copy for case-insensitive PN matching
    computed: bool = False


def _attr(keyword: str, level: QueryLevel, column: Any = None, search: Any = None) -> Attribute:
    return Attribute(keyword, level, column, search)


P, ST, SE, IM = QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE

#: Attributes held in index columns: matched in SQL, returned without reading any file.
INDEXED: dict[str, Attribute] = {
    a.keyword: a
    for a in (
        _attr("PatientID", P, Patient.patient_id),
        _attr("IssuerOfPatientID", P, Patient.issuer_of_patient_id),
        _attr("PatientName", P, Patient.patient_name, Patient.patient_name_search),
        _attr("PatientBirthDate", P, Patient.patient_birth_date),
        _attr("PatientSex", P, Patient.patient_sex),
        _attr("StudyInstanceUID", ST, Study.study_instance_uid),
        _attr("StudyDate", ST, Study.study_date),
        _attr("StudyTime", ST, Study.study_time),
        _attr("AccessionNumber", ST, Study.accession_number),
        _attr("StudyID", ST, Study.study_id),
        _attr("StudyDescription", ST, Study.study_description),
        _attr(
            "ReferringPhysicianName",
            ST,
            Study.referring_physician_name,
            Study.referring_physician_name_search,
        ),
        _attr("InstitutionName", ST, Study.institution_name),
        _attr("SeriesInstanceUID", SE, Series.series_instance_uid),
        _attr("Modality", SE, Series.modality),
        _attr("SeriesNumber", SE, Series.series_number),
        _attr("SeriesDescription", SE, Series.series_description),
        _attr("BodyPartExamined", SE, Series.body_part_examined),
        _attr("SeriesDate", SE, Series.series_date),
        _attr("SeriesTime", SE, Series.series_time),
        _attr("ProtocolName", SE, Series.protocol_name),
        _attr("StationName", SE, Series.station_name),
        _attr("Manufacturer", SE, Series.manufacturer),
        _attr("PerformedProcedureStepStartDate", SE, Series.performed_procedure_step_start_date),
        _attr("PerformedProcedureStepStartTime", SE, Series.performed_procedure_step_start_time),
        _attr("SOPInstanceUID", IM, Instance.sop_instance_uid),
        _attr("SOPClassUID", IM, Instance.sop_class_uid),
        _attr("InstanceNumber", IM, Instance.instance_number),
        _attr("NumberOfFrames", IM, Instance.number_of_frames),
        _attr("Rows", IM, Instance.rows),
        _attr("Columns", IM, Instance.columns),
        _attr("ContentDate", IM, Instance.content_date),
        _attr("ContentTime", IM, Instance.content_time),
    )
}

#: Attributes computed from the index (PS3.4 C.3.4, C.6.1.1.x "computed" keys).
COMPUTED: dict[str, QueryLevel] = {
    "NumberOfPatientRelatedStudies": P,
    "NumberOfPatientRelatedSeries": P,
    "NumberOfPatientRelatedInstances": P,
    "ModalitiesInStudy": ST,
    "SOPClassesInStudy": ST,
    "NumberOfStudyRelatedSeries": ST,
    "NumberOfStudyRelatedInstances": ST,
    "NumberOfSeriesRelatedInstances": SE,
}

#: Date/time pairs that combine into one date-time range (PS3.4 C.2.2.2.5.2).
_DATE_TIME_PAIRS = {
    "StudyDate": "StudyTime",
    "SeriesDate": "SeriesTime",
    "ContentDate": "ContentTime",
    "PerformedProcedureStepStartDate": "PerformedProcedureStepStartTime",
}

#: Attributes of the query/retrieve protocol itself: never matched, never stored.
_PROTOCOL_KEYS = frozenset(
    {
        "QueryRetrieveLevel",
        "SpecificCharacterSet",
        "RetrieveAETitle",
        "InstanceAvailability",
        "TimezoneOffsetFromUTC",
        "RetrieveURL",
        "RetrieveURI",
    }
)


@functools.cache
def _keyword(tag: int) -> str:
    return keyword_for_tag(tag) or f"{tag:08X}"


@dataclass(slots=True)
class Key:
    """One attribute of the query: a matching key (``value`` not empty) or a return key."""

    tag: int
    vr: str
    value: str | None = None
    parent: int | None = None
    """The tag of the sequence whose item holds the key (sequence matching, PS3.4
    C.2.2.2.6); None for a key of the identifier itself."""

    @property
    def keyword(self) -> str:
        return _keyword(self.tag)

    @property
    def matching(self) -> bool:
        return bool(self.value) and self.value != "*" and self.vr != "SQ"


@dataclass
class Query:
    level: QueryLevel
    model: QueryModel = QueryModel.STUDY_ROOT
    keys: list[Key] = field(default_factory=list)
    hierarchical: bool = True
    """Unique keys of the levels above must be single values (PS3.4 C.4.1.2.2.1 baseline)."""
    case_insensitive_pn: bool = True
    combine_date_time: bool = False
    """Match a date and a time range of one pair (StudyDate + StudyTime) as one date-time range
    (PS3.4 C.2.2.2.5.2). C-FIND does so only when the requestor negotiated it (C.5.1.1.2,
    extended negotiation byte 2); otherwise date and time are matched independently."""
    limit: int | None = None
    offset: int = 0
    max_matches: int | None = None
    """Without ``limit``: at most this many records are read, and a query that matches more
    raises :class:`TooManyMatches` (where keys are matched from the stored JSON, the records
    the index selects count)."""
    patient: int | None = None
    """Only the studies (and their series and instances) of the patient row with this key:
    the index's patient identity, one row per Patient ID and Issuer of Patient ID. An exact
    condition on that row, apart from the matching keys (a ``PatientID`` key still matches
    as DICOM says, within it); a key no row has matches nothing."""

    @classmethod
    def from_keywords(
        cls, level: QueryLevel | str, values: dict[str, str | None], **kwargs: Any
    ) -> Query:
        keys = []
        for name, value in values.items():
            tag = _tag(name)
            keys.append(Key(tag, _vr(tag), value))
        return cls(QueryLevel(level), keys=keys, **kwargs)

    def key(self, keyword: str) -> Key | None:
        tag = tag_for_keyword(keyword)
        return next((k for k in self.keys if k.tag == tag), None)


def _tag(name: str) -> int:
    tag = tag_for_keyword(name)
    if tag is not None:
        return int(tag)
    text = name.replace(",", "").replace("(", "").replace(")", "")
    if re.fullmatch(r"[0-9A-Fa-f]{8}", text):
        return int(text, 16)
    raise QueryError(f"unknown attribute {name!r}: give a keyword or an 8-digit hex tag")


def _vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return "US" if vr == "US or SS" else ("OB" if " or " in vr else vr)


# --- value matching --------------------------------------------------------------------------


def _like_pattern(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _split_range(value: str, vr: str) -> tuple[str | None, str | None] | None:
    if vr not in _RANGE_VRS or "-" not in value:
        return None
    if vr == "DT":
        # A DT may carry a UTC offset "-hhmm"; a range has exactly one separating "-"
        # between two DT values: split on the "-" that is followed by a full value or nothing.
        parts = re.split(r"-(?=\d{4}|$)", value, maxsplit=1)
        if len(parts) != 2:
            return None
        low, high = parts
    else:
        low, _, high = value.partition("-")
    return (low.strip() or None, high.strip() or None)


_TM_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DA_RE = re.compile(r"^\d{8}$")


def shown(value: str, limit: int = 40) -> str:
    """``value`` as an error message quotes it: ``repr``, cut to about ``limit`` characters."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


def _normalise_date(value: str) -> str:
    text = value.replace(".", "") if len(value) == 10 else value  # ACR-NEMA "yyyy.mm.dd"
    if not _DA_RE.match(text):
        raise QueryError(f"{shown(value)} is not a DICOM date (YYYYMMDD)")
    # Months 01-12 and days 01-31: a range bound such as "20240231" ("to the end of February")
    # is understood as a string compares it, as clients mean it.
    if not ("01" <= text[4:6] <= "12" and "01" <= text[6:] <= "31"):
        raise QueryError(f"{shown(value)} is not a DICOM date: no such month or day")
    return text


def _normalise_time(value: str, upper: bool) -> str:
    text = value.replace(":", "")
    if not _TM_RE.match(text):
        raise QueryError(f"{shown(value)} is not a DICOM time (HHMMSS.FFFFFF)")
    # PS3.5 6.2 TM: hours 00-23, minutes 00-59, seconds 00-60 (a leap second).
    if text[:2] > "23" or text[2:4] > "59" or text[4:6] > "60":
        raise QueryError(f"{shown(value)} is not a DICOM time: no such time of day")
    if upper:
        # "11" means up to 11:59:59.999999 (PS3.4 C.2.2.2.5: range bounds are inclusive)
        base, _, frac = text.partition(".")
        base = base + "5959"[: 6 - len(base)] if len(base) < 6 else base
        text = f"{base}.{(frac + '999999')[:6]}" if frac or len(base) == 6 else base
    return text


def _bound(value: str | None, vr: str, upper: bool) -> str | None:
    if value is None:
        return None
    if vr == "DA":
        return _normalise_date(value)
    if vr == "TM":
        return _normalise_time(value, upper)
    if not re.fullmatch(r"\d{4,14}(\.\d{1,6})?([+-]\d{4})?", value):
        raise QueryError(f"{shown(value)} is not a DICOM date-time (YYYYMMDDHHMMSS.FFFFFF&ZZXX)")
    return value + ("99999999999999"[len(value) - 4 :] if upper and len(value) < 14 else "")


@dataclass(slots=True)
class _Matcher:
    """A compiled matching key: SQL for indexed columns, a predicate for JSON values."""

    key: Key
    kind: str  # "single" | "wildcard" | "range" | "uids" | "universal"
    values: tuple[str, ...] = ()
    low: str | None = None
    high: str | None = None
    fold_case: bool = False


def _check_number(key: Key, value: str) -> None:
    """An integer within its VR's range, or a finite decimal (PS3.5 Table 6.2-1)."""
    vr = key.vr
    if vr in _INT_RANGES:
        low, high = _INT_RANGES[vr]
        if not _INTEGER.fullmatch(value):
            raise QueryError(f"{key.keyword}: {shown(value)} is not an integer ({vr})")
        if len(value) > 21 or not low <= int(value) <= high:
            raise QueryError(
                f"{key.keyword}: {shown(value)} is outside the range of {vr} "
                f"({low} to {high}, PS3.5 6.2)"
            )
        return
    try:
        number = float(value)
    except ValueError:
        raise QueryError(f"{key.keyword}: {shown(value)} is not a number") from None
    if not math.isfinite(number):
        raise QueryError(f"{key.keyword}: {shown(value)} is not a finite decimal number ({vr})")
    if vr == "DS" and (len(value) > 16 or _DECIMAL.fullmatch(value) is None):
        raise QueryError(
            f"{key.keyword}: {shown(value)} is not a decimal string (DS: at most 16 characters, "
            "PS3.5 6.2)"
        )


def _check_text(key: Key, value: str) -> str:
    """The matching value of a text VR held to the VR's length (wildcards aside) and to
    :data:`MAX_WILDCARDS`; runs of ``*`` become one ``*``."""
    vr = key.vr
    limit = _MAX_LENGTH.get(vr, _MAX_OTHER_LENGTH)
    if vr != "UI":
        limit = max(limit, MATCHING_LENGTH_FLOOR)
    if len(value) <= limit and "*" not in value and (vr != "PN" or value.count("=") < 3):
        return value  # no longer than one value may be, and no wildcard: within every bound
    wildcards = vr in _WILDCARD_VRS
    if wildcards and "**" in value:
        value = _STAR_RUNS.sub("*", value)
    if vr == "PN":
        parts = value.split("=")
        if len(parts) > 3:
            raise QueryError(
                f"{key.keyword}: a person name has at most 3 component groups (PS3.5 6.2.1)"
            )
        what = "per component group"
    elif vr in ("UI", "CS"):
        parts = value.split("\\")
        what = "per value"
    else:
        parts = [value]
        what = ""
    if len(parts) > MAX_LIST_VALUES:
        raise QueryError(
            f"{key.keyword}: a list holds at most {MAX_LIST_VALUES} values; this one has "
            f"{len(parts)}"
        )
    for part in parts:
        length = len(part) - part.count("*") if wildcards else len(part)
        if length > limit:
            if vr == "UI":
                raise QueryError(
                    f"{key.keyword}: a UI value holds at most {limit} characters per value "
                    f"(PS3.5 6.2); this one has {length}"
                )
            raise QueryError(
                f"{key.keyword}: a matching value holds at most {limit} characters"
                f"{' ' + what if what else ''}, wildcards aside; this one has {length}"
            )
    if wildcards and value.count("*") > MAX_WILDCARDS:
        raise QueryError(
            f"{key.keyword}: a matching value holds at most {MAX_WILDCARDS} '*' wildcards; "
            f"this one has {value.count('*')}"
        )
    return value


def check_key(key: Key) -> None:
    """Raise :class:`QueryError` when ``key``'s matching value is not one its VR can hold
    (the checks every query makes), for values matched outside :func:`find`."""
    _compile(key, case_insensitive_pn=False)


def _compile(key: Key, case_insensitive_pn: bool) -> _Matcher:
    value = (key.value or "").strip() if key.vr not in ("LT", "ST", "UT") else key.value or ""
    if "\x00" in value:
        # UI values are padded with NUL (PS3.5 6.2); anywhere else a NUL has no place.
        value = value.rstrip("\x00 ")
        if "\x00" in value:
            raise QueryError(f"{key.keyword}: the matching value holds a NUL character")
    if key.vr == "PN":
        value = normalise_person_name(value) or ""
    fold = key.vr == "PN" and case_insensitive_pn
    if fold:
        value = value.upper()
    if not value or value == "*" or key.vr == "SQ":
        return _Matcher(key, "universal")
    if key.vr in _INT_RANGES or key.vr in _FLOAT_VRS:
        _check_number(key, value)
    elif key.vr not in _RANGE_VRS:
        value = _check_text(key, value)
        if value == "*":
            return _Matcher(key, "universal")  # "**…" is "*"
    if key.vr == "UI":
        uids = tuple(u.strip() for u in value.split("\\") if u.strip())
        if any(_has_wildcard(u) for u in uids):
            raise QueryError(f"{key.keyword}: wildcards are not allowed in UIDs (PS3.4 C.2.2.2.4)")
        for uid in uids:
            if not valid_uid(uid):
                raise QueryError(
                    f"{key.keyword}: {shown(uid)} is not a UID (PS3.5 9.1: digits and dots)"
                )
        return _Matcher(key, "uids", uids)
    try:
        bounds = _split_range(value, key.vr)
        if bounds is not None:
            low, high = bounds
            if low is None and high is None:
                return _Matcher(key, "universal")
            return _Matcher(
                key, "range", low=_bound(low, key.vr, False), high=_bound(high, key.vr, True)
            )
        if key.vr in _RANGE_VRS:
            _bound(value, key.vr, False)  # validate
            if key.vr == "TM":
                # A single time names the whole minute/second it spells: "1015" is 10:15:00
                # to 10:15:59.999999 (PS3.5 6.2 TM), matched as that range.
                return _Matcher(
                    key, "range", low=_bound(value, "TM", False), high=_bound(value, "TM", True)
                )
    except QueryError as exc:
        raise QueryError(f"{key.keyword}: {exc}") from None
    if key.vr in _WILDCARD_VRS and _has_wildcard(value):
        return _Matcher(key, "wildcard", (value,), fold_case=fold)
    if "\\" in value and key.vr in ("CS",):
        return _Matcher(key, "uids", tuple(v.strip() for v in value.split("\\")), fold_case=fold)
    return _Matcher(key, "single", (value,), fold_case=fold)


# --- SQL of a query shape -------------------------------------------------------------------
#
# A condition is reduced to its shape (a tuple: what is compared, how) and its values. The SQL
# of a shape is built once with one bind parameter per value (p0, p1, … in order) and reused:
# building and compiling the SQL of a search cost more than running it on an indexed column.

#: Integer attributes held as integers in the index.
_NUMBER_COLUMNS = frozenset({"SeriesNumber", "InstanceNumber", "NumberOfFrames", "Rows", "Columns"})

Shape = tuple[Any, ...]


def _condition_shape(m: _Matcher, attr: Attribute) -> tuple[Shape, list[Any]]:
    """The shape of an indexed key's condition and its values."""
    keyword = attr.keyword
    search = m.fold_case and attr.search_column is not None
    upper = m.fold_case and attr.search_column is None
    if keyword in _NUMBER_COLUMNS:
        try:
            numbers = [int(v) for v in m.values]  # integers of their VR's range (_check_number)
        except ValueError:
            raise QueryError(f"{keyword}: {shown(m.values[0])} is not an integer") from None
        if m.kind in ("uids", "single"):
            return ("in", keyword, search), [numbers]
        return ("false",), []
    if m.kind == "uids":
        return ("in", keyword, search), [list(m.values)]
    if m.kind == "single":
        return ("eq", keyword, search, upper), [m.values[0]]
    if m.kind == "wildcard":
        return ("like", keyword, search, upper), [_like_pattern(m.values[0])]
    bounds = [v for v in (m.low, m.high) if v is not None]
    shape = ("range", keyword, search, m.key.vr == "TM", m.low is not None, m.high is not None)
    return shape, bounds


def _combined_shape(date_m: _Matcher, time_m: _Matcher) -> tuple[Shape, list[Any]]:
    """Date and time ranges as one date-time range (PS3.4 C.2.2.2.5.2)."""
    values: list[Any] = []
    if date_m.low is not None:
        values += [date_m.low, time_m.low or ""]
    if date_m.high is not None:
        values += [date_m.high, time_m.high or "999999"]
    shape = ("datetime", date_m.key.keyword, time_m.key.keyword)
    return (*shape, date_m.low is not None, date_m.high is not None), values


def _computed_shape(keyword: str, m: _Matcher) -> tuple[Shape, list[Any]]:
    if keyword == "ModalitiesInStudy":
        if m.kind == "wildcard":
            return ("modalities like",), [_like_pattern(m.values[0])]
        return ("modalities in",), [[v for part in m.values for v in part.split("\\")]]
    if keyword == "SOPClassesInStudy":
        return ("sop classes in",), [list(m.values)]
    # Counts are return keys; matching on them compares the number (an IS: _check_number).
    try:
        number = int(m.values[0]) if m.values else None
    except ValueError:
        raise QueryError(f"{keyword}: {shown(m.values[0])} is not an integer") from None
    if number is None:
        return ("false",), []
    return ("count", keyword), [number]


def _bind(params: Iterator[str], expanding: bool = False) -> Any:
    """The next bind parameter (a list of values when ``expanding``)."""
    return bindparam(next(params), expanding=expanding)


def _condition_sql(
    shape: Shape, params: Iterator[str], attributes: Mapping[str, Attribute] = INDEXED
) -> ColumnElement[bool]:
    """The condition of ``shape``, its values bound to the names ``params`` yields; the
    columns of its attributes are those of ``attributes`` (the Q/R index's, or the
    worklist's: :mod:`archive.worklist`)."""
    form = shape[0]
    if form == "false":
        return false()
    if form == "patient":
        return Patient.id == _bind(params)
    if form in ("in", "eq", "like", "range"):
        attr = attributes[shape[1]]
        column: Any = attr.search_column if shape[2] else attr.column
        if form == "in":
            return column.in_(_bind(params, expanding=True))
        if form == "range":
            _, _, _, is_time, has_low, has_high = shape
            if is_time:
                column = tm_sql(column)
            bounds = []
            if has_low:
                bounds.append(column >= _bind(params))
            if has_high:
                bounds.append(column <= _bind(params))
            return and_(*bounds)
        target: Any = func.upper(column) if shape[3] else column
        if form == "eq":
            return target == _bind(params)
        return target.like(_bind(params), escape="\\")
    if form == "datetime":
        _, date_kw, time_kw, has_low, has_high = shape
        date_col: Any = attributes[date_kw].column
        time_col: Any = attributes[time_kw].column
        time_or_zero = func.coalesce(tm_sql(time_col), "")
        lower: ColumnElement[bool] = true()
        upper: ColumnElement[bool] = true()
        if has_low:
            low, low_time = _bind(params), _bind(params)
            lower = or_(date_col > low, and_(date_col == low, time_or_zero >= low_time))
        if has_high:
            high, high_time = _bind(params), _bind(params)
            upper = or_(date_col < high, and_(date_col == high, time_or_zero <= high_time))
        return and_(lower, upper)
    if form in ("modalities like", "modalities in"):
        s = _alias(Series, "modalities")
        if form == "modalities like":
            cond = s.modality.like(_bind(params), escape="\\")
        else:
            cond = s.modality.in_(_bind(params, expanding=True))
        return exists(select(literal(1)).where(s.study_fk == Study.id, cond))
    if form == "sop classes in":
        uids = _bind(params, expanding=True)
        s, i = _alias(Series, "sop_classes"), _alias(Instance, "sop_classes")
        return exists(
            select(literal(1))
            .select_from(i)
            .join(s, i.series_fk == s.id)
            .where(s.study_fk == Study.id, i.sop_class_uid.in_(uids))
        )
    assert form == "count", shape
    return _count_expression(shape[1]) == _bind(params)


@functools.lru_cache(maxsize=512)
def _shaped_select(level: QueryLevel, conditions: tuple[Shape, ...], paging: str) -> Select[Any]:
    """The select of a query level with the conditions of these shapes, ordered by the row id;
    ``paging``: "" or "limit" (both bound: :limit, :offset) or "offset" (:offset only)."""
    stmt, ids, _positions = _base_select(level)
    names = (f"p{n}" for n in itertools.count())
    stmt = stmt.where(*(_condition_sql(shape, names) for shape in conditions)).order_by(ids)
    if paging == "limit":
        stmt = stmt.limit(bindparam("limit")).offset(bindparam("offset"))
    elif paging == "offset":
        stmt = stmt.offset(bindparam("offset"))
    return stmt


def tm_sql(column: Any) -> Any:
    """A stored TM as ``HHMMSS[.F…]`` in SQL, so that times compare as strings: ``0930``
    (PS3.5 6.2 lets minutes and seconds be left out) counts as ``093000``; ACR-NEMA
    ``09:30:00`` too."""
    text = func.replace(column, ":", "")
    return case(
        (func.length(text) == 2, text + "0000"),
        (func.length(text) == 4, text + "00"),
        else_=text,
    )


def tm_text(value: str) -> str:
    """:func:`tm_sql` for a value in Python."""
    text = value.replace(":", "").strip()
    return text + "0000" if len(text) == 2 else text + "00" if len(text) == 4 else text


# --- JSON-side matching (not indexed attributes) ---------------------------------------------


@functools.lru_cache(maxsize=256)
def glob_matcher(pattern: str) -> Callable[[str], bool]:
    """Whether a whole text matches ``pattern``, whose ``*`` stands for any characters and
    ``?`` for one (PS3.4 C.2.2.2.4). The pieces between the ``*`` are found leftmost first
    (which finds a match whenever there is one), in time at most the text's length times the
    pattern's: a regular expression of many ``.*`` would backtrack exponentially on a text
    that almost matches."""
    pieces = pattern.split("*")
    compiled = [
        re.compile("".join("." if c == "?" else re.escape(c) for c in piece), re.DOTALL)
        for piece in pieces
    ]
    if len(pieces) == 1:
        only = compiled[0]
        return lambda text: only.fullmatch(text) is not None
    first, *middle, last = compiled
    last_length = len(pieces[-1])

    def matches(text: str) -> bool:
        found = first.match(text)
        if found is None:
            return False
        position = found.end()
        for piece in middle:
            found = piece.search(text, position)
            if found is None:
                return False
            position = found.end()
        tail = len(text) - last_length
        return tail >= position and last.fullmatch(text, tail) is not None

    return matches


def _json_texts(element: dict[str, Any] | None) -> list[str]:
    if not element:
        return []
    texts = []
    for value in element.get("Value", []):
        if value is None:
            continue
        if isinstance(value, dict):
            groups = [value.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic")]
            while groups and not groups[-1]:
                groups.pop()
            texts.append("=".join(groups))
        else:
            texts.append(str(value))
    return texts


def _match_text(m: _Matcher, texts: list[str]) -> bool:
    if m.kind == "universal":
        return True
    if m.key.vr == "PN":
        texts = [normalise_person_name(t) or "" for t in texts]
    if m.fold_case:
        texts = [t.upper() for t in texts]
    if m.kind == "uids":
        return any(t in m.values for t in texts)
    if m.kind == "single":
        if m.key.vr in _INT_VRS or m.key.vr in ("DS", "FL", "FD"):
            try:
                return any(float(t) == float(m.values[0]) for t in texts)
            except ValueError:
                return False
        return m.values[0] in texts
    if m.kind == "wildcard":
        matches = glob_matcher(m.values[0])
        return any(matches(t) for t in texts)
    if m.key.vr == "TM":
        texts = [tm_text(t) for t in texts]
    return any((m.low is None or t >= m.low) and (m.high is None or t <= m.high) for t in texts)


# --- the query -------------------------------------------------------------------------------


def _levels_for(query: Query) -> list[QueryLevel]:
    """The levels from the root of the model down to the query level."""
    if query.model is QueryModel.MODALITY_WORKLIST:
        raise QueryError("the Modality Worklist model has no levels: match it with find()")
    index = _LEVEL_ORDER.index(query.level)
    start = 0 if query.model is QueryModel.PATIENT_ROOT else 1
    if query.model is QueryModel.STUDY_ROOT and query.level is QueryLevel.PATIENT:
        raise QueryError("the Study Root model has no PATIENT level (PS3.4 C.6.2)")
    return _LEVEL_ORDER[start : index + 1]


def validate(query: Query) -> None:
    """Check the identifier against the model (hierarchical unique keys, known values)."""
    levels = _levels_for(query)
    if not query.hierarchical:
        return
    for level in levels[:-1]:
        keyword = UNIQUE_KEYS[level]
        if query.model is QueryModel.STUDY_ROOT and level is QueryLevel.PATIENT:
            continue
        key = query.key(keyword)
        if key is None or not (key.value or "").strip():
            raise QueryError(
                f"{keyword} is required for a {query.level} query in the "
                f"{query.model.replace('_', ' ').title()} model (PS3.4 C.4.1.2.2.1)"
            )
        value = key.value or ""
        if "\\" in value or _has_wildcard(value):
            raise QueryError(f"{keyword} above the query level must be a single value")


def find(db: Database, query: Query) -> Iterator[dict[str, Any]]:
    """Run ``query``; yield DICOM JSON of each match with the requested keys."""
    if query.model is QueryModel.MODALITY_WORKLIST:
        from archive.worklist import find_worklist  # it builds on this module

        yield from find_worklist(db, query).items
        return
    matches = find_matches(db, query)
    for match in matches.items:
        yield matches.json(match)


#: One returned attribute: (source, tag, keyword, VR, position in the index row or -1).
PlanItem = tuple[int, str, str, str, int]
#: One match: its index row, its computed attributes, its representative document (or {}).
Match = tuple[Any, dict[str, Any], dict[str, Any]]


@dataclass(frozen=True)
class Matches:
    """The matches of a query before they become DICOM JSON: what each returns (``plan``,
    the same for all) and, per match, what its JSON is made of (see :meth:`json`). Callers
    that encode the matches themselves (C-FIND identifiers) can skip the JSON."""

    level: QueryLevel
    plan: list[PlanItem]
    items: Iterator[Match]

    def json(self, match: Match) -> dict[str, Any]:
        return _result(self.plan, self.level, *match)


def find_matches(db: Database, query: Query) -> Matches:
    """Run ``query``: the SQL now, the matches as they are iterated."""
    validate(query)
    level = query.level
    matchers = [
        _compile(k, query.case_insensitive_pn)
        for k in query.keys
        if k.keyword not in _PROTOCOL_KEYS
    ]
    by_keyword = {m.key.keyword: m for m in matchers}

    shapes: list[Shape] = []
    values: list[Any] = []
    json_matchers: list[_Matcher] = []
    combined: set[str] = set()
    for date_kw, time_kw in _DATE_TIME_PAIRS.items():
        dm, tm = by_keyword.get(date_kw), by_keyword.get(time_kw)
        pair_ranges = dm and tm and dm.kind == "range" and tm.kind == "range"
        in_scope = _LEVEL_ORDER.index(INDEXED[date_kw].level) <= _LEVEL_ORDER.index(level)
        if pair_ranges and query.combine_date_time and in_scope:
            assert dm is not None and tm is not None
            shape, shape_values = _combined_shape(dm, tm)
            shapes.append(shape)
            values += shape_values
            combined |= {date_kw, time_kw}
    for m in matchers:
        keyword = m.key.keyword
        if m.kind == "universal" or keyword in combined:
            continue
        attr = INDEXED.get(keyword)
        if attr is not None and _LEVEL_ORDER.index(attr.level) <= _LEVEL_ORDER.index(level):
            shape, shape_values = _condition_shape(m, attr)
        elif keyword in COMPUTED:
            if _LEVEL_ORDER.index(COMPUTED[keyword]) > _LEVEL_ORDER.index(level):
                continue  # below the query level a computed key has no meaning: matches all
            shape, shape_values = _computed_shape(keyword, m)
        else:
            json_matchers.append(m)
            continue
        shapes.append(shape)
        values += shape_values
    if query.patient is not None:
        shapes.append(("patient",))
        values.append(query.patient)
    listed = sum(len(v) for v in values if isinstance(v, list))
    if listed > MAX_LIST_VALUES:
        raise QueryError(
            f"the query's value lists hold {listed} values together; at most {MAX_LIST_VALUES}"
        )
    params = {f"p{n}": value for n, value in enumerate(values)}
    paging = ""
    if query.limit is not None and not json_matchers:
        paging = "limit"
        params["limit"], params["offset"] = query.limit, query.offset
    elif query.offset and not json_matchers:
        paging = "offset"
        params["offset"] = query.offset
    capped = query.max_matches is not None and paging != "limit"
    if capped:
        assert query.max_matches is not None
        paging = "limit"  # one more than allowed tells a query over the limit
        params["limit"] = query.max_matches + 1
        params["offset"] = 0 if json_matchers else query.offset
    stmt = _shaped_select(level, tuple(shapes), paging)
    positions = _base_select(level)[2]

    return_keys = [k for k in query.keys if k.keyword not in ("QueryRetrieveLevel",)]
    needs_json = bool(json_matchers) or any(
        k.keyword not in INDEXED and k.keyword not in COMPUTED and k.keyword not in _PROTOCOL_KEYS
        for k in return_keys
    )
    with db.engine.connect() as conn:
        rows = conn.execute(stmt, params).all()  # rows read by position: by name costs more
        if capped and query.max_matches is not None and len(rows) > query.max_matches:
            raise TooManyMatches(query.max_matches)
        # The computed attributes and documents of the first rows, on the same connection.
        first = _extras(conn, level, rows[:_CHUNK], return_keys, needs_json)
    plan = _result_plan(query, return_keys, positions)
    items = _matches(db, query, rows, return_keys, json_matchers, needs_json, first)
    return Matches(level, plan, items)


#: Matches are completed (computed attributes, documents) this many rows at a time.
_CHUNK = 500
_Extras = tuple[dict[int, dict[str, Any]], dict[int, Any]]


def _extras(
    conn: Connection,
    level: QueryLevel,
    chunk: Sequence[Any],
    return_keys: list[Key],
    needs_json: bool,
) -> _Extras:
    """The computed attributes and the representative documents of a chunk of rows."""
    if not chunk:
        return {}, {}
    ids = [row[0] for row in chunk]
    computed = _computed_values(conn, level, ids, return_keys)
    documents = _representative_json(conn, level, ids) if needs_json else {}
    return computed, documents


def _matches(
    db: Database,
    query: Query,
    rows: Sequence[Any],
    return_keys: list[Key],
    json_matchers: list[_Matcher],
    needs_json: bool,
    first: _Extras,
) -> Iterator[Match]:
    level = query.level
    skipped = 0
    emitted = 0
    for chunk_start in range(0, len(rows), _CHUNK):
        chunk = rows[chunk_start : chunk_start + _CHUNK]
        if chunk_start == 0:
            computed, documents = first
        else:
            with db.engine.connect() as conn:
                computed, documents = _extras(conn, level, chunk, return_keys, needs_json)
        for row in chunk:
            document = documents.get(row[0], {})
            if json_matchers and not all(
                _match_text(m, _json_texts(document.get(f"{m.key.tag:08X}"))) for m in json_matchers
            ):
                continue
            if json_matchers:
                if skipped < query.offset:
                    skipped += 1
                    continue
                if query.limit is not None and emitted >= query.limit:
                    return
            emitted += 1
            yield row, computed.get(row[0], {}), document


_STUDY_PATIENT = select(Study.patient_fk).where(Study.study_instance_uid == bindparam("study"))


def study_patient(db: Database, study_instance_uid: str) -> int | None:
    """The key of the patient row a study belongs to (see :attr:`Query.patient`); None when
    the index has no such study. One lookup on the study's unique index."""
    with db.engine.connect() as conn:
        return conn.execute(_STUDY_PATIENT, {"study": study_instance_uid}).scalar()


@functools.cache
def _base_select(level: QueryLevel) -> tuple[Select[Any], Any, dict[str, int]]:
    """The select of a level's indexed attributes, its id column, and the position of each
    attribute in its rows (the id comes first)."""
    columns: list[Any] = []
    positions: dict[str, int] = {}
    for attr in INDEXED.values():
        if _LEVEL_ORDER.index(attr.level) <= _LEVEL_ORDER.index(level):
            positions[attr.keyword] = len(columns) + 1
            columns.append(attr.column.label(attr.keyword))  # type: ignore[union-attr]
    if level is QueryLevel.PATIENT:
        ids = Patient.id
        stmt = select(ids.label("_id"), *columns)
    elif level is QueryLevel.STUDY:
        ids = Study.id
        stmt = select(ids.label("_id"), *columns).join(Patient, Study.patient_fk == Patient.id)
    elif level is QueryLevel.SERIES:
        ids = Series.id
        stmt = (
            select(ids.label("_id"), *columns)
            .join(Study, Series.study_fk == Study.id)
            .join(Patient, Study.patient_fk == Patient.id)
        )
    else:
        ids = Instance.id
        stmt = (
            select(ids.label("_id"), *columns)
            .join(Series, Instance.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id)
            .join(Patient, Study.patient_fk == Patient.id)
        )
    return stmt, ids, positions


@functools.cache
def _alias(model: Any, use: str) -> Any:
    """One alias of ``model`` per use, made once: an alias adapts its columns on first use,
    which costs more than the rest of building a condition on it."""
    return aliased(model, name=f"{use}_{model.__tablename__}")


def _count_expression(keyword: str) -> Any:
    s, i, st = aliased(Series), aliased(Instance), aliased(Study)
    if keyword == "NumberOfStudyRelatedSeries":
        return select(func.count()).where(s.study_fk == Study.id).scalar_subquery()
    if keyword == "NumberOfStudyRelatedInstances":
        return (
            select(func.count())
            .select_from(i)
            .join(s, i.series_fk == s.id)
            .where(s.study_fk == Study.id)
            .scalar_subquery()
        )
    if keyword == "NumberOfSeriesRelatedInstances":
        return select(func.count()).where(i.series_fk == Series.id).scalar_subquery()
    if keyword == "NumberOfPatientRelatedStudies":
        return select(func.count()).where(st.patient_fk == Patient.id).scalar_subquery()
    if keyword == "NumberOfPatientRelatedSeries":
        return (
            select(func.count())
            .select_from(s)
            .join(st, s.study_fk == st.id)
            .where(st.patient_fk == Patient.id)
            .scalar_subquery()
        )
    return (
        select(func.count())
        .select_from(i)
        .join(s, i.series_fk == s.id)
        .join(st, s.study_fk == st.id)
        .where(st.patient_fk == Patient.id)
        .scalar_subquery()
    )


def _computed_values(
    conn: Connection, level: QueryLevel, ids: list[int], keys: Iterable[Key]
) -> dict[int, dict[str, Any]]:
    """Computed attributes for the matched rows, one grouped query per attribute."""
    wanted = [k.keyword for k in keys if k.keyword in COMPUTED]
    out: dict[int, dict[str, Any]] = defaultdict(dict)
    if not wanted or not ids:
        return out
    summary = [k for k in wanted if k in _STUDY_SUMMARY]
    if len(summary) > 1 and level is not P:
        # One query answers them all: a row per series of each matched row's study.
        for row_id, modality, count in conn.execute(_study_summary_select(level), {"ids": ids}):
            values = out[row_id]
            values.setdefault("ModalitiesInStudy", []).append(modality)
            series = values.get("NumberOfStudyRelatedSeries", 0)
            values["NumberOfStudyRelatedSeries"] = series + 1
            instances = values.get("NumberOfStudyRelatedInstances", 0)
            values["NumberOfStudyRelatedInstances"] = instances + count
        wanted = [k for k in wanted if k not in summary]
    for keyword in wanted:
        owner = COMPUTED[keyword]
        if _LEVEL_ORDER.index(owner) > _LEVEL_ORDER.index(level):
            continue
        stmt = _computed_select(keyword, level)
        for row_id, value in conn.execute(stmt, {"ids": ids}):
            if keyword in ("ModalitiesInStudy", "SOPClassesInStudy"):
                out[row_id].setdefault(keyword, []).append(value)
            else:
                out[row_id][keyword] = value
    for values in out.values():
        for keyword in ("ModalitiesInStudy", "SOPClassesInStudy"):
            if keyword in values:
                values[keyword] = sorted({v for v in values[keyword] if v})
    return out


_STUDY_SUMMARY = frozenset(
    {"ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"}
)


@functools.cache
def _study_summary_select(level: QueryLevel) -> Select[Any]:
    """(row, modality, instances) for every series of the study of each row ``:ids``."""
    ids: Any = bindparam("ids", expanding=True)
    study_id = {ST: Study.id, SE: Series.study_fk, IM: Series.study_fk}[level]
    row_id = {ST: Study.id, SE: Series.id, IM: Instance.id}[level]
    base = select(row_id.label("rid"), study_id.label("sid"))
    if level is SE:
        base = base.select_from(Series)
    elif level is IM:
        base = base.select_from(Instance).join(Series, Instance.series_fk == Series.id)
    else:
        base = base.select_from(Study)
    rows = base.where(row_id.in_(ids)).subquery()
    s, i = aliased(Series), aliased(Instance)
    # Counted once per study, however many of the rows (instances, series) share it.
    per_series = (
        select(s.study_fk.label("sid"), s.modality.label("modality"), func.count(i.id).label("n"))
        .outerjoin(i, i.series_fk == s.id)
        .where(s.study_fk.in_(select(rows.c.sid)))
        .group_by(s.id, s.study_fk, s.modality)
        .subquery()
    )
    return select(rows.c.rid, per_series.c.modality, per_series.c.n).join(
        per_series, per_series.c.sid == rows.c.sid
    )


@functools.cache
def _computed_select(keyword: str, level: QueryLevel) -> Select[Any]:
    """The grouped query of one computed attribute for the rows ``:ids`` (built once: building
    and compiling it costs more than running it)."""
    ids: Any = bindparam("ids", expanding=True)
    owner = COMPUTED[keyword]
    # Results of a lower level report the computed attributes of their ancestors.
    if owner is ST:
        study_id = {ST: Study.id, SE: Series.study_fk, IM: Series.study_fk}[level]
        row_id = {ST: Study.id, SE: Series.id, IM: Instance.id}[level]
        base = select(row_id.label("rid"), study_id.label("sid"))
        if level is SE:
            base = base.select_from(Series)
        elif level is IM:
            base = base.select_from(Instance).join(Series, Instance.series_fk == Series.id)
        else:
            base = base.select_from(Study)
        base = base.where(row_id.in_(ids))
        rows = base.subquery()
        if keyword == "ModalitiesInStudy":
            return (
                select(rows.c.rid, Series.modality)
                .join(Series, Series.study_fk == rows.c.sid)
                .distinct()
            )
        if keyword == "SOPClassesInStudy":
            return (
                select(rows.c.rid, Instance.sop_class_uid)
                .join(Series, Series.study_fk == rows.c.sid)
                .join(Instance, Instance.series_fk == Series.id)
                .distinct()
            )
        if keyword == "NumberOfStudyRelatedSeries":
            return (
                select(rows.c.rid, func.count(Series.id))
                .join(Series, Series.study_fk == rows.c.sid)
                .group_by(rows.c.rid)
            )
        return (
            select(rows.c.rid, func.count(Instance.id))
            .join(Series, Series.study_fk == rows.c.sid)
            .join(Instance, Instance.series_fk == Series.id)
            .group_by(rows.c.rid)
        )
    if owner is SE:
        row_id = {SE: Series.id, IM: Instance.id}[level]
        series_id = {SE: Series.id, IM: Instance.series_fk}[level]
        base = select(row_id.label("rid"), series_id.label("seid")).where(row_id.in_(ids))
        rows = base.subquery()
        i = aliased(Instance)
        return (
            select(rows.c.rid, func.count(i.id))
            .join(i, i.series_fk == rows.c.seid)
            .group_by(rows.c.rid)
        )
    # Patient-level counts
    row_id = {P: Patient.id, ST: Study.id, SE: Series.id, IM: Instance.id}[level]
    if level is P:
        base = select(Patient.id.label("rid"), Patient.id.label("pid")).where(Patient.id.in_(ids))
    elif level is ST:
        base = select(Study.id.label("rid"), Study.patient_fk.label("pid")).where(Study.id.in_(ids))
    elif level is SE:
        base = (
            select(Series.id.label("rid"), Study.patient_fk.label("pid"))
            .join(Study, Series.study_fk == Study.id)
            .where(Series.id.in_(ids))
        )
    else:
        base = (
            select(Instance.id.label("rid"), Study.patient_fk.label("pid"))
            .join(Series, Instance.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id)
            .where(Instance.id.in_(ids))
        )
    rows = base.subquery()
    st, se, i = aliased(Study), aliased(Series), aliased(Instance)
    del row_id
    if keyword == "NumberOfPatientRelatedStudies":
        counted = st.id
        stmt = select(rows.c.rid, func.count(distinct(counted))).join(
            st, st.patient_fk == rows.c.pid
        )
    elif keyword == "NumberOfPatientRelatedSeries":
        stmt = (
            select(rows.c.rid, func.count(distinct(se.id)))
            .join(st, st.patient_fk == rows.c.pid)
            .join(se, se.study_fk == st.id)
        )
    else:
        stmt = (
            select(rows.c.rid, func.count(distinct(i.id)))
            .join(st, st.patient_fk == rows.c.pid)
            .join(se, se.study_fk == st.id)
            .join(i, i.series_fk == se.id)
        )
    return stmt.group_by(rows.c.rid)


def _representative_json(conn: Connection, level: QueryLevel, ids: list[int]) -> dict[int, Any]:
    """The DICOM JSON of one instance per matched row (its first instance)."""
    return {row[0]: row[1] for row in conn.execute(_representative_select(level), {"ids": ids})}


@functools.cache
def _representative_select(level: QueryLevel) -> Select[Any]:
    """(row id, DICOM JSON of the row's first instance) for the rows ``:ids``."""
    ids: Any = bindparam("ids", expanding=True)
    if level is QueryLevel.IMAGE:
        return select(Instance.id, Instance.dicom_json).where(Instance.id.in_(ids))
    owner = {P: Patient.id, ST: Study.id, SE: Series.id}[level]
    first = select(owner.label("oid"), func.min(Instance.id).label("iid")).select_from(Instance)
    first = first.join(Series, Instance.series_fk == Series.id)
    if level in (P, ST):
        first = first.join(Study, Series.study_fk == Study.id)
    if level is P:
        first = first.join(Patient, Study.patient_fk == Patient.id)
    sub = first.where(owner.in_(ids)).group_by(owner).subquery()
    return select(sub.c.oid, Instance.dicom_json).join(Instance, Instance.id == sub.c.iid)


def _column_json(keyword: str, vr: str, value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        groups = str(value).split("=")
        pn = {
            name: group
            for name, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False)
            if group
        }
        return {"vr": vr, "Value": [pn]}
    if vr in _INT_VRS:
        return {"vr": vr, "Value": [int(value)]}
    if vr == "DS":
        return {"vr": vr, "Value": [float(value)]}
    if vr in ("CS",) and "\\" in str(value):
        return {"vr": vr, "Value": str(value).split("\\")}
    return {"vr": vr, "Value": [str(value)]}


# How one returned attribute is filled (see _result_plan).
FROM_COLUMN, FROM_LIST, FROM_COUNT, FROM_DOCUMENT = range(4)


def _result_plan(query: Query, return_keys: list[Key], positions: dict[str, int]) -> list[PlanItem]:
    """What each match returns, worked out once per query: (source, tag, keyword, VR, position
    in the row or -1) for every requested key and the unique keys of the query level and the
    levels above."""
    level_index = _LEVEL_ORDER.index(query.level)
    wanted = list(return_keys)
    # The unique key of the query level (and of the levels above) is always returned.
    for level in _levels_for(query):
        unique_tag = int(tag_for_keyword(UNIQUE_KEYS[level]))  # type: ignore[arg-type]
        if not any(k.tag == unique_tag for k in wanted):
            wanted.append(Key(unique_tag, _vr(unique_tag)))
    plan: list[PlanItem] = []
    for key in wanted:
        keyword = key.keyword
        tag = f"{key.tag:08X}"
        if keyword in _PROTOCOL_KEYS:
            continue
        attr = INDEXED.get(keyword)
        if attr is not None and _LEVEL_ORDER.index(attr.level) <= level_index:
            plan.append((FROM_COLUMN, tag, keyword, key.vr, positions[keyword]))
        elif keyword in COMPUTED:
            listed = keyword in ("ModalitiesInStudy", "SOPClassesInStudy")
            plan.append((FROM_LIST if listed else FROM_COUNT, tag, keyword, key.vr, -1))
        else:
            plan.append((FROM_DOCUMENT, tag, keyword, key.vr, -1))
    return plan


def _result(
    plan: list[PlanItem],
    level: QueryLevel,
    row: Any,
    computed: dict[str, Any],
    document: dict[str, Any],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for source, tag, keyword, vr, position in plan:
        if source == FROM_COLUMN:
            out[tag] = _column_json(keyword, vr, row[position])
        elif source == FROM_LIST:
            value = computed.get(keyword)
            out[tag] = {"vr": vr, "Value": value} if value else {"vr": vr}
        elif source == FROM_COUNT:
            out[tag] = {"vr": vr, "Value": [int(computed.get(keyword) or 0)]}
        elif tag in document:
            out[tag] = document[tag]
        else:
            out[tag] = {"vr": vr}
    out["00080052"] = {"vr": "CS", "Value": [level.value]}
    return out
