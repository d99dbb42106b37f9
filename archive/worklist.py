"""The Modality Worklist (PS3.4 K.6.1): the orders on the worklist as Scheduled Procedure Steps.

A worklist query is a :class:`archive.query.Query` of the ``MODALITY_WORKLIST`` model, matched
by the one matcher of :mod:`archive.query` (its value checks, wildcard, range, list and
universal matching, its shapes and their cached SQL) over this module's attribute table: the
columns of :class:`archive.orders.ImagingOrder` joined to its :class:`archive.models.Patient`,
for the orders whose status is in :data:`archive.orders.ON_WORKLIST`. One SQL query per search.

The identifier's keys come in two places (PS3.4 Table K.6-1):

- the Requested Procedure, Imaging Service Request and Patient keys, in the identifier itself;
- the Scheduled Procedure Step keys, in the one item of Scheduled Procedure Step Sequence
  (0040,0100): sequence matching (PS3.4 C.2.2.2.6), its item's keys matched as the identifier's
  are. Such keys carry the sequence's tag as their ``parent``.

Matching keys: the required ones of Table K.6-1 (Scheduled Station AE Title, Scheduled
Procedure Step Start Date and Time, Modality, Scheduled Performing Physician's Name, Patient's
Name, Patient ID) and the optional ones the index holds (Accession Number, Requested Procedure
ID, Scheduled Procedure Step ID and Status, Scheduled Station Name, Patient's Birth Date and
Sex, Issuer of Patient ID, Referring and Requesting Physician, Requested Procedure Priority…).
The Scheduled Procedure Step Start Date and Time, both given, are range-matched as one
date-time (the combined matching of PS3.4 C.2.2.2.5.2), whatever ``combine_date_time`` says:
worklist queries always matched that pair so (Annex K; CP-601 gave composite queries the same
only by negotiation), and DCMTK's ``wlmscpfs`` does the same. Either alone is matched alone.
Scheduled Performing Physician's Name has no value in an order: a matching value other than
universal matches nothing. A key of any other attribute is a return key: matching values on
it are not supported (:attr:`WorklistMatches.unsupported`, the C-FIND 0xFF01 warning) and it
is returned with no value (PS3.4 C.2.2.1.3), as every requested attribute the order has no
value for.

The patient's demographics are those the views show: an EHR's record's when the patient has
one (``Patient.record_*``), else the DICOM header's.
"""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from sqlalchemy import ColumnElement, Select, bindparam, case, null, select

from archive.db import Database
from archive.models import Patient
from archive.orders import ON_WORKLIST, ImagingOrder
from archive.query import (
    Attribute,
    Key,
    Query,
    QueryError,
    QueryLevel,
    QueryModel,
    Shape,
    TooManyMatches,
    _column_json,
    _combined_shape,
    _compile,
    _condition_shape,
    _condition_sql,
    _Matcher,
    _normalise_date,
)


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag)


#: Scheduled Procedure Step Sequence (0040,0100): the one item of a worklist item's step.
STEP_SEQUENCE = _tag("ScheduledProcedureStepSequence")
#: Requested Procedure Code Sequence (0032,1064), Scheduled Protocol Code Sequence (0040,0008).
REQUESTED_PROCEDURE_CODE = _tag("RequestedProcedureCodeSequence")
SCHEDULED_PROTOCOL_CODE = _tag("ScheduledProtocolCodeSequence")
_CODE_SEQUENCES = frozenset({REQUESTED_PROCEDURE_CODE, SCHEDULED_PROTOCOL_CODE})
_CODE_KEYWORDS = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")

#: Keys of the identifier that are part of the protocol, not of a worklist item.
_PROTOCOL_KEYS = frozenset({"SpecificCharacterSet", "QueryRetrieveLevel", "TimezoneOffsetFromUTC"})

_HAS_RECORD = Patient.record_version.is_not(None)


def _effective(record: Any, dicom: Any) -> Any:
    """The patient's value as the views show it: the EHR record's once there is one."""
    return case((_HAS_RECORD, record), else_=dicom)


#: FHIR request-priority → Requested Procedure Priority (0040,1003), whose defined terms are
#: STAT, HIGH, ROUTINE, MEDIUM, LOW (PS3.3 C.4.11).
PRIORITIES = {"stat": "STAT", "asap": "HIGH", "urgent": "HIGH", "routine": "ROUTINE"}
_PRIORITY = case(PRIORITIES, value=ImagingOrder.priority, else_=None)

# The worklist has one entity (PS3.4 K.6.1.1); Attribute's level is not used for it.
_W = QueryLevel.STUDY


def _w(keyword: str, column: Any, search: Any = None) -> Attribute:
    return Attribute(keyword, _W, column, search)


#: The attributes of the identifier that the index holds (Table K.6-1: Patient, Imaging
#: Service Request and Requested Procedure keys).
ITEM: dict[str, Attribute] = {
    a.keyword: a
    for a in (
        _w(
            "PatientName",
            _effective(Patient.record_name, Patient.patient_name),
            _effective(Patient.record_name_search, Patient.patient_name_search),
        ),
        _w("PatientID", Patient.patient_id),
        _w("IssuerOfPatientID", Patient.issuer_of_patient_id),
        _w("PatientBirthDate", _effective(Patient.record_birth_date, Patient.patient_birth_date)),
        _w("PatientSex", _effective(Patient.record_sex, Patient.patient_sex)),
        _w("AccessionNumber", ImagingOrder.accession_number),
        _w("ReferringPhysicianName", ImagingOrder.requesting_physician),
        _w("RequestingPhysician", ImagingOrder.requesting_physician),
        _w("RequestedProcedureID", ImagingOrder.requested_procedure_id),
        _w("RequestedProcedureDescription", ImagingOrder.procedure_display),
        _w("StudyInstanceUID", ImagingOrder.study_instance_uid),
        _w("RequestedProcedurePriority", _PRIORITY),
        _w("ReasonForTheRequestedProcedure", ImagingOrder.reason),
    )
}
#: The attributes of the Scheduled Procedure Step Sequence's item that the index holds.
STEP: dict[str, Attribute] = {
    a.keyword: a
    for a in (
        _w("ScheduledStationAETitle", ImagingOrder.scheduled_station_ae_title),
        _w("ScheduledStationName", ImagingOrder.scheduled_station_name),
        _w("Modality", ImagingOrder.modality),
        _w("ScheduledProcedureStepStartDate", ImagingOrder.scheduled_start_date),
        _w("ScheduledProcedureStepStartTime", ImagingOrder.scheduled_start_time),
        _w("ScheduledProcedureStepID", ImagingOrder.scheduled_procedure_step_id),
        _w("ScheduledProcedureStepDescription", ImagingOrder.procedure_display),
        _w("ScheduledProcedureStepStatus", ImagingOrder.step_status),
        # Required matching key (Table K.6-1) that an order has no value for.
        _w("ScheduledPerformingPhysicianName", null()),
    )
}
#: Both tables, by keyword (no keyword is in both), as the shapes' SQL looks attributes up.
_ATTRIBUTES: dict[str, Attribute] = {**ITEM, **STEP}
#: What a Scheduled Procedure Step Sequence item holds when the key asks for all of it (a
#: sequence key with no item): every attribute of the step the index has.
_STEP_RETURN = (*STEP, "ScheduledProtocolCodeSequence")

_DATE, _TIME = "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime"

#: FHIR code systems → DICOM Coding Scheme Designators (PS3.16 Table 8-1).
_SCHEMES = {
    "http://loinc.org": "LN",
    "http://radlex.org": "RADLEX",
    "http://www.radlex.org": "RADLEX",
    "http://snomed.info/sct": "SCT",
    "http://dicom.nema.org/resources/ontology/DCM": "DCM",
    "http://www.ama-assn.org/go/cpt": "C4",
}
#: The designator of a code whose system has no DICOM designator (PS3.16 8.2: private
#: coding schemes begin with "99").
LOCAL_SCHEME = "99PACSBRIDGE"


def coding_scheme(system: str | None) -> str:
    """The Coding Scheme Designator of an order's code system (a FHIR URI)."""
    if not system:
        return LOCAL_SCHEME
    if system in _SCHEMES:
        return _SCHEMES[system]
    if system.startswith("urn:dicom:coding-scheme:"):
        return system.rsplit(":", 1)[1]
    return LOCAL_SCHEME


@dataclass(frozen=True)
class WorklistMatches:
    """The worklist items a query matched, as DICOM JSON (PS3.18 F.2), one per order."""

    items: Iterator[dict[str, Any]]
    unsupported: bool
    """The identifier held matching values on attributes whose matching is not supported
    (returned, not matched: the C-FIND 0xFF01 warning, PS3.4 K.4.1.1.4 / C.4.1.1.4)."""


def worklist_query(keys: list[Key], **kwargs: Any) -> Query:
    """A query of the Modality Worklist model on ``keys``."""
    return Query(_W, QueryModel.MODALITY_WORKLIST, keys, **kwargs)


def _matching_attribute(key: Key) -> Attribute | None:
    if key.parent is None:
        return ITEM.get(key.keyword)
    if key.parent == STEP_SEQUENCE:
        return STEP.get(key.keyword)
    return None


def find_worklist(db: Database, query: Query) -> WorklistMatches:
    """Run a worklist ``query``: one SQL query now, the items as they are iterated."""
    if query.model is not QueryModel.MODALITY_WORKLIST:
        raise QueryError(f"not a Modality Worklist query: {query.model}")
    matchers: dict[str, _Matcher] = {}
    unsupported = False
    for key in query.keys:
        if key.vr == "SQ" or key.keyword in _PROTOCOL_KEYS:
            continue
        matcher = _compile(key, query.case_insensitive_pn)  # the value checks of every query
        if matcher.kind == "universal":
            continue
        if _matching_attribute(key) is None:
            unsupported = True
            continue
        matchers[key.keyword] = matcher
    shapes: list[Shape] = []
    values: list[Any] = []
    date_m, time_m = matchers.get(_DATE), matchers.get(_TIME)
    if date_m is not None and time_m is not None and time_m.kind == "range":
        # One date-time range (PS3.4 C.2.2.2.5.2); a single date is the range of that day.
        if date_m.kind == "single":
            day = _normalise_date(date_m.values[0])
            date_m = _Matcher(date_m.key, "range", low=day, high=day)
        shape, shape_values = _combined_shape(date_m, time_m)
        shapes.append(shape)
        values += shape_values
        del matchers[_DATE], matchers[_TIME]
    for keyword, matcher in matchers.items():
        shape, shape_values = _condition_shape(matcher, _ATTRIBUTES[keyword])
        shapes.append(shape)
        values += shape_values
    params = {f"p{n}": value for n, value in enumerate(values)}
    paging = ""
    if query.limit is not None:
        paging = "limit"
        params["limit"], params["offset"] = query.limit, query.offset
    elif query.offset:
        paging = "offset"
        params["offset"] = query.offset
    capped = query.max_matches is not None and paging != "limit"
    if capped:
        assert query.max_matches is not None
        paging = "limit"  # one more than allowed tells a query over the limit
        params["limit"], params["offset"] = query.max_matches + 1, query.offset
    stmt = _worklist_select(tuple(shapes), paging)
    with db.engine.connect() as conn:
        rows = conn.execute(stmt, params).mappings().all()
    if capped and query.max_matches is not None and len(rows) > query.max_matches:
        raise TooManyMatches(query.max_matches)
    return WorklistMatches(_items(query.keys, rows), unsupported)


_RESULT_COLUMNS = (
    *(a.column.label(keyword) for keyword, a in _ATTRIBUTES.items()),  # type: ignore[union-attr]
    ImagingOrder.procedure_scheme.label("_scheme"),
    ImagingOrder.procedure_code.label("_code"),
)


@functools.lru_cache(maxsize=256)
def _worklist_select(conditions: tuple[Shape, ...], paging: str) -> Select[Any]:
    """The orders on the worklist that meet the conditions of these shapes, in the order of
    their scheduled start (then as they were placed)."""
    names = (f"p{n}" for n in itertools.count())
    where: list[ColumnElement[bool]] = [ImagingOrder.status.in_(ON_WORKLIST)]
    where += [_condition_sql(shape, names, _ATTRIBUTES) for shape in conditions]
    stmt = (
        select(*_RESULT_COLUMNS)
        .select_from(ImagingOrder)
        .join(Patient, ImagingOrder.patient_fk == Patient.id)
        .where(*where)
        .order_by(
            ImagingOrder.scheduled_start_date,
            ImagingOrder.scheduled_start_time,
            ImagingOrder.id,
        )
    )
    if paging == "limit":
        stmt = stmt.limit(bindparam("limit")).offset(bindparam("offset"))
    elif paging == "offset":
        stmt = stmt.offset(bindparam("offset"))
    return stmt


# --- the items -------------------------------------------------------------------------------


def _items(keys: list[Key], rows: Any) -> Iterator[dict[str, Any]]:
    top = [k for k in keys if k.parent is None and k.keyword not in _PROTOCOL_KEYS]
    nested: dict[int, list[Key]] = defaultdict(list)
    for key in keys:
        if key.parent is not None:
            nested[key.parent].append(key)
    for row in rows:
        yield _element_values(row, top, nested, ITEM)


def _element_values(
    row: Any, keys: list[Key], nested: dict[int, list[Key]], table: dict[str, Attribute]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        tag = f"{key.tag:08X}"
        if key.vr == "SQ":
            out[tag] = _sequence(row, key.tag, nested)
        elif key.keyword in table:
            out[tag] = _column_json(key.keyword, key.vr, row[key.keyword])
        else:
            out[tag] = {"vr": key.vr}  # not held: returned with no value (PS3.4 C.2.2.1.3)
    return out


def _sequence(row: Any, tag: int, nested: dict[int, list[Key]]) -> dict[str, Any]:
    """A sequence return key: its one item with the item's keys (all the item has when the
    key holds no item), or no item when the order has nothing for it."""
    keys = nested.get(tag, [])
    if tag == STEP_SEQUENCE:
        if not keys:
            keys = [Key(_tag(k), "SQ" if k.endswith("Sequence") else _vr(k)) for k in _STEP_RETURN]
        return {"vr": "SQ", "Value": [_element_values(row, keys, nested, STEP)]}
    if tag in _CODE_SEQUENCES:
        if not row["_code"]:
            return {"vr": "SQ"}
        code = {
            "CodeValue": row["_code"],
            "CodingSchemeDesignator": coding_scheme(row["_scheme"]),
            "CodeMeaning": row["RequestedProcedureDescription"],
        }
        wanted = [k.keyword for k in keys] or list(_CODE_KEYWORDS)
        item: dict[str, Any] = {}
        for keyword in wanted:
            key_tag = _tag(keyword) if keyword in _CODE_KEYWORDS else None
            if key_tag is None:
                continue
            value = code[keyword]
            vr = _vr(keyword)
            item[f"{key_tag:08X}"] = {"vr": vr, "Value": [value]} if value else {"vr": vr}
        for key in keys:
            if key.keyword not in _CODE_KEYWORDS:
                item[f"{key.tag:08X}"] = {"vr": key.vr}
        return {"vr": "SQ", "Value": [item]}
    return {"vr": "SQ"}  # a sequence the index does not hold: returned empty


@functools.cache
def _vr(keyword: str) -> str:
    return str(dictionary_VR(keyword))
