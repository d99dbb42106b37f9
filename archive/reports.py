"""The index of structured reports (PS3.3 C.17): documents, their measurements, and tombstones.

Ingest indexes every SR document it stores (:func:`index_report`) from the instance's DICOM
JSON (PS3.18 F.2), in the transaction that stores the instance: the document header and
document-level content in ``report_document``, and every measurement and qualitative
evaluation in ``report_measurement``. Deletes write ``tombstone`` rows (:func:`tombstone`,
:func:`retire_reports`) so that views can tell "gone" from "never was".

Versions of a report are chained by Predecessor Documents Sequence (PS3.3 C.17.2.3):
``root_uid`` is the SOP Instance UID of the chain's first version and ``version`` counts
from 1; a document that a later one names as predecessor, or that a later version of its
chain follows, is ``superseded``. A version that arrives before its predecessor starts a
chain of its own; when the predecessor arrives, that chain is joined to the predecessor's
(root and versions renumbered).

The walk over the content tree knows TID 2000 (Basic Diagnostic Imaging Report: sections of
TEXT items, impressions and conclusions) and TID 1500 (Measurement Report: measurement groups
of TID 1501 / 1410 / 1411, each with its tracking identifiers, finding, finding site,
algorithm identification, image and segmentation references, and its TID 300 measurements
and qualitative evaluations); any other template's NUM items are measurements too.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any, Literal, cast

from sqlalchemy import (
    Connection,
    Table,
    and_,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.types import String

from archive.announce import report_indexed
from archive.dicom import ParsedInstance, _json_key, _person_name_string, normalise_person_name
from archive.models import ReportDocument, ReportMeasurement, Tombstone

__all__ = [
    "REPORT_SOP_CLASSES",
    "index_report",
    "is_report",
    "retire_reports",
    "tombstone",
]

log = logging.getLogger(__name__)

_DOCUMENT = cast(Table, ReportDocument.__table__)
_MEASUREMENT = cast(Table, ReportMeasurement.__table__)
_TOMBSTONE = cast(Table, Tombstone.__table__)

#: Storage SOP Classes of structured report documents (PS3.4 B.5) that ingest indexes: the
#: general SR IODs (Basic Text, Enhanced, Comprehensive, Comprehensive 3D, Extensible) and the
#: reports of specific templates (CAD, dose, echo, waveform annotation). Key Object Selection
#: documents, procedure logs, plans and acquisition context are not reports.
REPORT_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
        "1.2.840.10008.5.1.4.1.1.88.35",  # Extensible SR
        "1.2.840.10008.5.1.4.1.1.88.50",  # Mammography CAD SR
        "1.2.840.10008.5.1.4.1.1.88.65",  # Chest CAD SR
        "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
        "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR
        "1.2.840.10008.5.1.4.1.1.88.69",  # Colon CAD SR
        "1.2.840.10008.5.1.4.1.1.88.72",  # Simplified Adult Echo SR
        "1.2.840.10008.5.1.4.1.1.88.73",  # Patient Radiation Dose SR
        "1.2.840.10008.5.1.4.1.1.88.76",  # Enhanced X-Ray Radiation Dose SR
        "1.2.840.10008.5.1.4.1.1.88.77",  # Waveform Annotation SR
    }
)


def is_report(sop_class_uid: str) -> bool:
    """Whether ingest indexes instances of this SOP Class as report documents."""
    return sop_class_uid in REPORT_SOP_CLASSES


# --- DICOM JSON keys (PS3.18 F.2: tags as eight upper-case hex digits) ----------------------

_K = _json_key
_CONTENT = _K("ContentSequence")
_VALUE_TYPE = _K("ValueType")
_RELATIONSHIP = _K("RelationshipType")
_CONCEPT_NAME = _K("ConceptNameCodeSequence")
_CONCEPT_CODE = _K("ConceptCodeSequence")
_TEXT_VALUE = _K("TextValue")
_PERSON_NAME = _K("PersonName")
_UID = _K("UID")
_MEASURED_VALUE = _K("MeasuredValueSequence")
_NUMERIC_VALUE = _K("NumericValue")
_FLOATING_POINT_VALUE = _K("FloatingPointValue")
_UNITS = _K("MeasurementUnitsCodeSequence")
_REFERENCED_SOP = _K("ReferencedSOPSequence")
_REFERENCED_SOP_INSTANCE = _K("ReferencedSOPInstanceUID")
_REFERENCED_SEGMENT_NUMBER = _K("ReferencedSegmentNumber")
_REFERENCED_SERIES = _K("ReferencedSeriesSequence")
_CODE_VALUE = _K("CodeValue")
_LONG_CODE_VALUE = _K("LongCodeValue")
_URN_CODE_VALUE = _K("URNCodeValue")
_SCHEME = _K("CodingSchemeDesignator")
_MEANING = _K("CodeMeaning")
_TEMPLATE = _K("ContentTemplateSequence")
_TEMPLATE_ID = _K("TemplateIdentifier")
_COMPLETION = _K("CompletionFlag")
_VERIFICATION = _K("VerificationFlag")
_CONTENT_DATE = _K("ContentDate")
_CONTENT_TIME = _K("ContentTime")
_TIMEZONE = _K("TimezoneOffsetFromUTC")
_VERIFYING_OBSERVERS = _K("VerifyingObserverSequence")
_VERIFYING_OBSERVER_NAME = _K("VerifyingObserverName")
_VERIFICATION_DATETIME = _K("VerificationDateTime")
_AUTHOR_OBSERVERS = _K("AuthorObserverSequence")
_PREDECESSORS = _K("PredecessorDocumentsSequence")
_MANUFACTURER = _K("Manufacturer")


# --- coded concepts (PS3.16) -----------------------------------------------------------------

_Key = tuple[str, str]
"""(code value, coding scheme designator) of a coded concept."""

# SNOMED codes were written with the scheme SRT (and SNOMED RT codes) before 2019.
_SNOMED_SCHEMES = frozenset({"SRT", "SNM3", "99SDM"})

_MEASUREMENT_GROUP: frozenset[_Key] = frozenset({("125007", "DCM")})
_QUALITATIVE_EVALUATIONS: frozenset[_Key] = frozenset({("C0034375", "UMLS")})
_CONCLUSIONS: frozenset[_Key] = frozenset(
    {
        ("121072", "DCM"),  # Impressions
        ("121073", "DCM"),  # Impression
        ("121076", "DCM"),  # Conclusions
        ("121077", "DCM"),  # Conclusion
        ("19005-8", "LN"),  # Impression
        ("55110-1", "LN"),  # Conclusions
    }
)
_PERSON_OBSERVER_NAME: _Key = ("121008", "DCM")
_ALGORITHM_NAME: _Key = ("111001", "DCM")
_ALGORITHM_VERSION: _Key = ("111003", "DCM")
_FINDING: _Key = ("121071", "DCM")
_FINDING_CATEGORY: _Key = ("276214006", "SCT")
_FINDING_SITE: frozenset[_Key] = frozenset({("363698007", "SCT"), ("G-C0E3", "SCT")})
_LATERALITY: frozenset[_Key] = frozenset({("272741003", "SCT"), ("G-C171", "SCT")})
_METHOD: frozenset[_Key] = frozenset({("370129005", "SCT"), ("G-C036", "SCT")})
_TRACKING_IDENTIFIER: _Key = ("112039", "DCM")
_TRACKING_UID: _Key = ("112040", "DCM")
_REFERENCED_SEGMENT: frozenset[_Key] = frozenset(
    {("121191", "DCM"), ("121214", "DCM")}  # Referenced Segment / Segmentation Frame
)
_SOURCE_SERIES_FOR_SEGMENTATION: _Key = ("121232", "DCM")
#: Items of a measurement group (TID 1501 / 1410 / 1411) that describe the group rather than
#: evaluate anything: never measurements of their own.
_GROUP_CONTEXT: frozenset[_Key] = frozenset(
    {
        _FINDING,
        _FINDING_CATEGORY,
        _TRACKING_IDENTIFIER,
        _TRACKING_UID,
        _ALGORITHM_NAME,
        _ALGORITHM_VERSION,
        ("111002", "DCM"),  # Algorithm Parameters
        ("C67447", "NCIt"),  # Activity Session
        ("130400", "DCM"),  # Geometric purpose of region
        ("121401", "DCM"),  # Derivation
        ("121049", "DCM"),  # Language of Content Item and Descendants
        *_FINDING_SITE,
        *_LATERALITY,
        *_METHOD,
    }
)
#: Relationships of items that qualify their parent instead of saying something of their own
#: (PS3.3 C.17.3.2.4): their TEXT is no part of the narrative.
_MODIFIER_RELATIONSHIPS = frozenset({"HAS OBS CONTEXT", "HAS CONCEPT MOD", "HAS ACQ CONTEXT"})


@dataclass(frozen=True, slots=True)
class _Code:
    scheme: str
    value: str
    meaning: str | None

    @property
    def key(self) -> _Key:
        scheme = "SCT" if self.scheme in _SNOMED_SCHEMES else self.scheme
        return (self.value, scheme)


def _first(item: dict[str, Any], key: str) -> Any:
    element = item.get(key)
    if not element:
        return None
    values = element.get("Value")
    return values[0] if values else None


def _string(item: dict[str, Any], key: str) -> str | None:
    value = _first(item, key)
    if value is None:
        return None
    if isinstance(value, dict):
        value = _person_name_string(value)
    text = str(value).strip(" \x00")
    return text or None


def _person(item: dict[str, Any], key: str) -> str | None:
    return normalise_person_name(_string(item, key))


def _code(item: dict[str, Any] | None) -> _Code | None:
    """A Code Sequence Macro item (PS3.3 8.8) as a code; None when it has no value."""
    if not item:
        return None
    value = (
        _string(item, _CODE_VALUE)
        or _string(item, _LONG_CODE_VALUE)
        or _string(item, _URN_CODE_VALUE)
    )
    if value is None:
        return None
    return _Code(_string(item, _SCHEME) or "", value, _string(item, _MEANING))


def _items(item: dict[str, Any], key: str = _CONTENT) -> list[dict[str, Any]]:
    element = item.get(key)
    values = element.get("Value") if element else None
    return [v for v in values if isinstance(v, dict)] if values else []


def _concept(item: dict[str, Any]) -> _Code | None:
    return _code(_first(item, _CONCEPT_NAME))


def _key(item: dict[str, Any]) -> _Key | None:
    concept = _concept(item)
    return concept.key if concept else None


# --- dates and times (PS3.5 6.2: DA, TM, DT) -------------------------------------------------

_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")
_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?")
_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")


def _offset(value: str | None) -> timezone | None:
    match = _OFFSET.fullmatch(value.strip()) if value else None
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    delta = timedelta(hours=int(hours), minutes=int(minutes))
    if delta > timedelta(hours=14):
        return None
    return timezone(-delta if sign == "-" else delta)


def _moment(parts: Sequence[str | None], tz: tzinfo) -> datetime | None:
    """A datetime in UTC from (year, month, day, hour, minute, second, fraction) strings in
    ``tz``, where absent components take their smallest value; None when they name no moment.
    (UTC because SQLite's DateTime keeps the wall-clock time and drops the offset.)"""
    year, month, day, hour, minute, second, fraction = parts
    try:
        moment = datetime(
            int(year or 0),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            min(int(second or 0), 59),  # a leap second (60) is the last second
            int((fraction or "0").ljust(6, "0")),
            tzinfo=tz,
        )
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _content_datetime(j: dict[str, Any], zone: tzinfo) -> datetime | None:
    date = _string(j, _CONTENT_DATE)
    if date is None or not re.fullmatch(r"\d{8}", date):
        return None
    time = (_string(j, _CONTENT_TIME) or "").replace(":", "")
    match = _TM.fullmatch(time) if time else None
    hour, minute, second, fraction = match.groups() if match else (None, None, None, None)
    tz = _offset(_string(j, _TIMEZONE)) or zone
    return _moment((date[:4], date[4:6], date[6:8], hour, minute, second, fraction), tz)


def _datetime(value: str | None, default_tz: tzinfo) -> datetime | None:
    match = _DT.fullmatch(value.strip()) if value else None
    if match is None:
        return None
    *parts, offset = match.groups()
    return _moment(parts, _offset(offset) or default_tz)


# --- the content tree ------------------------------------------------------------------------


@dataclass(slots=True)
class _Context:
    """What a measurement group (or a measurement's own modifiers) says of its measurements."""

    finding: _Code | None = None
    finding_category: _Code | None = None
    site: _Code | None = None
    laterality: str | None = None
    method: str | None = None
    tracking_identifier: str | None = None
    tracking_uid: str | None = None
    series: str | None = None
    instances: list[str] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)

    def read(self, items: Iterable[dict[str, Any]]) -> _Context:
        """Fill the fields from ``items`` (a group's or a measurement's children)."""
        for item in items:
            key = _key(item)
            value_type = _string(item, _VALUE_TYPE)
            if value_type == "CODE":
                value = _code(_first(item, _CONCEPT_CODE))
                if value is None:
                    continue
                if key == _FINDING:
                    self.finding = self.finding or value
                elif key == _FINDING_CATEGORY:
                    self.finding_category = self.finding_category or value
                elif key in _FINDING_SITE:
                    if self.site is None:
                        self.site = value
                        for child in _items(item):
                            if _key(child) in _LATERALITY:
                                laterality = _code(_first(child, _CONCEPT_CODE))
                                if laterality is not None:
                                    self.laterality = laterality.value
                elif key in _LATERALITY:
                    self.laterality = self.laterality or value.value
                elif key in _METHOD:
                    self.method = self.method or value.meaning or value.value
            elif value_type == "TEXT" and key == _TRACKING_IDENTIFIER:
                self.tracking_identifier = self.tracking_identifier or _string(item, _TEXT_VALUE)
            elif value_type == "UIDREF":
                if key == _TRACKING_UID:
                    self.tracking_uid = self.tracking_uid or _string(item, _UID)
                elif key == _SOURCE_SERIES_FOR_SEGMENTATION:
                    self.series = self.series or _string(item, _UID)
            elif value_type == "IMAGE":
                self._image(item, segment=key in _REFERENCED_SEGMENT)
            elif value_type == "SCOORD":
                # An image region (TID 1410, TID 300 coordinates): the image it was drawn on.
                for child in _items(item):
                    if _string(child, _VALUE_TYPE) == "IMAGE":
                        self._image(child, segment=False)
        return self

    def _image(self, item: dict[str, Any], *, segment: bool) -> None:
        for ref in _items(item, _REFERENCED_SOP):
            sop = _string(ref, _REFERENCED_SOP_INSTANCE)
            if sop is None:
                continue
            if segment:
                numbers = (ref.get(_REFERENCED_SEGMENT_NUMBER) or {}).get("Value") or [None]
                for number in numbers:
                    entry = {"sop": sop, "segment": None if number is None else int(number)}
                    if entry not in self.segments:
                        self.segments.append(entry)
            elif sop not in self.instances:
                self.instances.append(sop)

    def under(self, own: _Context) -> _Context:
        """This context with a measurement's own modifiers ``own`` taking precedence."""
        site = own.site or self.site
        return _Context(
            finding=own.finding or self.finding,
            finding_category=own.finding_category or self.finding_category,
            site=site,
            laterality=own.laterality if own.site else (own.laterality or self.laterality),
            method=own.method or self.method,
            tracking_identifier=own.tracking_identifier or self.tracking_identifier,
            tracking_uid=own.tracking_uid or self.tracking_uid,
            series=own.series or self.series,
            instances=self.instances + [i for i in own.instances if i not in self.instances],
            segments=self.segments + [s for s in own.segments if s not in self.segments],
        )

    def columns(self) -> dict[str, Any]:
        finding = self.finding or self.finding_category
        referenced = (
            {"series": self.series, "instances": self.instances, "segments": self.segments}
            if self.series or self.instances or self.segments
            else None
        )
        return {
            "finding_scheme": finding.scheme if finding else None,
            "finding_code": finding.value if finding else None,
            "finding_meaning": finding.meaning if finding else None,
            "site_scheme": self.site.scheme if self.site else None,
            "site_code": self.site.value if self.site else None,
            "site_meaning": self.site.meaning if self.site else None,
            "laterality_code": self.laterality,
            "method_meaning": self.method,
            "tracking_identifier": self.tracking_identifier,
            "tracking_uid": self.tracking_uid,
            "referenced": referenced,
        }


_NO_CONTEXT = _Context()


@dataclass(slots=True)
class _Walk:
    """One depth-first pass over a document's content tree, in document order."""

    narrative: list[str] = field(default_factory=list)
    conclusion: list[str] = field(default_factory=list)
    algorithm_name: str | None = None
    algorithm_version: str | None = None
    measurements: list[dict[str, Any]] = field(default_factory=list)

    def children(
        self,
        item: dict[str, Any],
        *,
        group: _Context | None,
        qualitative: bool,
        concluding: bool,
        depth: int,
    ) -> None:
        if depth > 64:  # a tree this deep is no report: stop rather than recurse without end
            return
        for child in _items(item):
            self.item(
                child, group=group, qualitative=qualitative, concluding=concluding, depth=depth
            )

    def item(
        self,
        item: dict[str, Any],
        *,
        group: _Context | None,
        qualitative: bool,
        concluding: bool,
        depth: int,
    ) -> None:
        value_type = _string(item, _VALUE_TYPE)
        relationship = _string(item, _RELATIONSHIP)
        concept = _concept(item)
        key = concept.key if concept else None
        concluding = concluding or key in _CONCLUSIONS
        # An item that evaluates something in a measurement group or a qualitative
        # evaluations container (not one that describes the group).
        evaluation = (
            (group is not None or qualitative)
            and relationship == "CONTAINS"
            and key not in _GROUP_CONTEXT
        )
        if value_type == "TEXT":
            text = _string(item, _TEXT_VALUE)
            if text is not None:
                if key == _ALGORITHM_NAME:
                    self.algorithm_name = self.algorithm_name or text
                elif key == _ALGORITHM_VERSION:
                    self.algorithm_version = self.algorithm_version or text
                if relationship not in _MODIFIER_RELATIONSHIPS:
                    self.narrative.append(text)
                    if concluding:
                        self.conclusion.append(text)
                if evaluation and concept is not None:
                    self._add(concept, "TEXT", item, group, text_value=text)
        elif value_type == "NUM" and concept is not None:
            measured = _first(item, _MEASURED_VALUE)
            number = _number(measured) if isinstance(measured, dict) else None
            if number is not None:
                assert isinstance(measured, dict)
                unit = _code(_first(measured, _UNITS))
                self._add(
                    concept,
                    "NUM",
                    item,
                    group,
                    numeric_value=number,
                    unit_code=unit.value if unit else None,
                    unit_meaning=unit.meaning if unit else None,
                )
        elif value_type == "CODE" and evaluation and concept is not None:
            value = _code(_first(item, _CONCEPT_CODE))
            if value is not None:
                self._add(
                    concept,
                    "CODE",
                    item,
                    group,
                    value_scheme=value.scheme,
                    value_code=value.value,
                    value_meaning=value.meaning,
                )
        elif value_type == "CONTAINER":
            if key in _MEASUREMENT_GROUP:
                group = _Context().read(_items(item))
                qualitative = False
            elif key in _QUALITATIVE_EVALUATIONS:
                qualitative = True
        self.children(
            item, group=group, qualitative=qualitative, concluding=concluding, depth=depth + 1
        )

    def _add(
        self,
        concept: _Code,
        value_type: str,
        item: dict[str, Any],
        group: _Context | None,
        **values: Any,
    ) -> None:
        context = (group or _NO_CONTEXT).under(_Context().read(_items(item)))
        self.measurements.append(
            {
                "position": len(self.measurements),
                "concept_scheme": concept.scheme,
                "concept_code": concept.value,
                "concept_meaning": concept.meaning,
                "value_type": value_type,
                "numeric_value": None,
                "unit_code": None,
                "unit_meaning": None,
                "value_scheme": None,
                "value_code": None,
                "value_meaning": None,
                "text_value": None,
                **values,
                **context.columns(),
            }
        )


def _number(measured: dict[str, Any]) -> float | None:
    value = _first(measured, _FLOATING_POINT_VALUE)
    if value is None:
        value = _first(measured, _NUMERIC_VALUE)
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None


def _fit(table: Table, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with strings cut to their column's length."""
    out = dict(values)
    for name, value in values.items():
        if isinstance(value, str):
            column_type = table.c[name].type
            if isinstance(column_type, String) and column_type.length:
                out[name] = value[: column_type.length]
    return out


def _predecessor(j: dict[str, Any]) -> str | None:
    for study in _items(j, _PREDECESSORS):
        for series in _items(study, _REFERENCED_SERIES):
            for ref in _items(series, _REFERENCED_SOP):
                uid = _string(ref, _REFERENCED_SOP_INSTANCE)
                if uid:
                    return uid
    return None


def _author(j: dict[str, Any]) -> str | None:
    for item in _items(j):
        if (
            _string(item, _RELATIONSHIP) == "HAS OBS CONTEXT"
            and _string(item, _VALUE_TYPE) == "PNAME"
            and _key(item) == _PERSON_OBSERVER_NAME
        ):
            name = _person(item, _PERSON_NAME)
            if name:
                return name
    for observer in _items(j, _AUTHOR_OBSERVERS):
        name = _person(observer, _PERSON_NAME)
        if name:
            return name
    return None


def _document(parsed: ParsedInstance, zone: tzinfo) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``report_document`` columns read from the data set (not its chain) and its
    ``report_measurement`` rows; dates and times without Timezone Offset From UTC are in
    ``zone`` (the archive's ``dicom_timezone``)."""
    j = parsed.dicom_json
    title = _concept(j)
    template = next(iter(_items(j, _TEMPLATE)), None)
    tz = _offset(_string(j, _TIMEZONE)) or zone
    verifiers = _items(j, _VERIFYING_OBSERVERS)
    verifier = verifiers[-1] if verifiers else None
    walk = _Walk()
    try:
        walk.children(j, group=None, qualitative=False, concluding=False, depth=0)
    except Exception:  # content this walk cannot read: the document is stored all the same
        log.warning(
            "report content not indexed", extra={"sop": parsed.sop_instance_uid}, exc_info=True
        )
        walk = _Walk()
    manufacturer = _string(j, _MANUFACTURER)
    device_key = None
    if walk.algorithm_name:
        identity = f"{manufacturer or ''}|{walk.algorithm_name}|{walk.algorithm_version or ''}"
        device_key = hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()
    document = {
        "sop_instance_uid": parsed.sop_instance_uid,
        "sop_class_uid": parsed.sop_class_uid,
        "template_id": _string(template, _TEMPLATE_ID) if template else None,
        "title_scheme": title.scheme if title else None,
        "title_code": title.value if title else None,
        "title_meaning": title.meaning if title else None,
        "completion_flag": _string(j, _COMPLETION),
        "verification_flag": _string(j, _VERIFICATION),
        "content_datetime": _content_datetime(j, zone),
        "verification_datetime": (
            _datetime(_string(verifier, _VERIFICATION_DATETIME), tz) if verifier else None
        ),
        "verifying_observer": _person(verifier, _VERIFYING_OBSERVER_NAME) if verifier else None,
        "author": _author(j),
        "conclusion": "\n\n".join(walk.conclusion) or None,
        "narrative": "\n\n".join(walk.narrative) or None,
        "algorithm_name": walk.algorithm_name,
        "algorithm_version": walk.algorithm_version,
        "manufacturer": manufacturer,
        "device_key": device_key,
    }
    return document, walk.measurements


# --- the tables ------------------------------------------------------------------------------


def index_report(
    conn: Connection,
    *,
    instance_id: int,
    study_fk: int,
    parsed: ParsedInstance,
    now: datetime,
    zone: tzinfo = UTC,
    announce: bool = True,
) -> None:
    """Index the SR document ``parsed`` (stored as instance row ``instance_id`` of study row
    ``study_fk``), replacing what was indexed of that instance before (overwrite policy).

    Runs in the ingest transaction: a document is indexed if and only if it is stored.
    ``announce``: write the ``report.final`` / ``report.amended`` outbox event of a final
    document in this transaction (not when reports are only indexed again).
    """
    document, measurements = _document(parsed, zone)
    uid = parsed.sop_instance_uid
    d = _DOCUMENT.c
    old = conn.execute(
        select(d.root_uid, d.status, d.verification_flag).where(
            or_(d.instance_fk == instance_id, d.sop_instance_uid == uid)
        )
    ).first()
    if old is not None:
        conn.execute(
            delete(_DOCUMENT).where(or_(d.instance_fk == instance_id, d.sop_instance_uid == uid))
        )
    predecessor = _predecessor(parsed.dicom_json)
    if predecessor == uid:
        predecessor = None
    # Versions that arrived before this one name it as predecessor (or, re-indexed, it is
    # not the newest version of its chain).
    successors = conn.execute(
        select(d.sop_instance_uid, d.root_uid).where(d.predecessor_uid == uid)
    ).all()
    root, version = uid, 1
    if predecessor is not None:
        found = conn.execute(
            select(d.root_uid, d.version).where(d.sop_instance_uid == predecessor)
        ).first()
        if found is not None and successors:
            root, version = found.root_uid, found.version + 1
        elif found is not None:
            # The newest version of its chain. Two documents may name the same predecessor
            # (two writers amending one version, processes racing): the chain stays one,
            # numbered on, and the newest is its only current version.
            newest = conn.execute(
                select(func.max(d.version)).where(d.root_uid == found.root_uid)
            ).scalar()
            root, version = found.root_uid, max(found.version, int(newest or 0)) + 1
            conn.execute(
                update(_DOCUMENT)
                .where(d.root_uid == root, d.superseded.is_(False))
                .values(superseded=True)
            )
    # Versions that arrived before this one began chains of their own: join them to this
    # one's.
    for successor in successors:
        if successor.root_uid == successor.sop_instance_uid and successor.root_uid != root:
            conn.execute(
                update(_DOCUMENT)
                .where(d.root_uid == successor.root_uid)
                .values(root_uid=root, version=d.version + version)
            )
    document_id = conn.execute(
        insert(_DOCUMENT)
        .values(
            **_fit(
                _DOCUMENT,
                {
                    **document,
                    "instance_fk": instance_id,
                    "study_fk": study_fk,
                    "root_uid": root,
                    "predecessor_uid": predecessor,
                    "version": version,
                    "superseded": bool(successors),
                    "status": parsed.report_status,
                    "created_at": now,
                },
            )
        )
        .returning(d.id)
    ).scalar_one()
    if measurements:
        # A JSON column given None holds JSON null, not SQL NULL: leave ``referenced`` out of
        # the rows that reference nothing.
        with_refs: list[dict[str, Any]] = []
        without: list[dict[str, Any]] = []
        for measurement in measurements:
            row = _fit(_MEASUREMENT, {**measurement, "document_fk": document_id})
            if row["referenced"] is None:
                del row["referenced"]
                without.append(row)
            else:
                with_refs.append(row)
        for batch in (with_refs, without):
            if batch:
                conn.execute(insert(_MEASUREMENT), batch)
    status = report_status(parsed.report_status, document)
    if announce and status in FINAL_STATUSES:
        was_final = old is not None and report_status(old.status, old._mapping) in FINAL_STATUSES
        if not was_final:  # the same final document sent again announces nothing new
            earlier_final = conn.execute(
                select(d.id)
                .where(d.root_uid == root, d.sop_instance_uid != uid, _FINAL_DOCUMENT)
                .limit(1)
            ).first()
            report_indexed(
                conn,
                parsed=parsed,
                study_fk=study_fk,
                root_uid=root,
                version=version,
                status=status,
                amends=status != "final" or earlier_final is not None,
            )
    if old is not None and old.root_uid != root:
        # Re-indexed into another chain: the old one may have lost its newest version.
        _settle_roots(conn, {old.root_uid}, now)


#: DiagnosticReport statuses of a released report (R4 valueset-diagnostic-report-status):
#: ``final``, and the later versions of a final report.
FINAL_STATUSES = ("final", "amended", "corrected", "appended")
_FINAL_DOCUMENT = or_(
    _DOCUMENT.c.status.in_(FINAL_STATUSES),
    and_(_DOCUMENT.c.status.is_(None), _DOCUMENT.c.verification_flag == "VERIFIED"),
)


def report_status(asked: str | None, document: Any) -> str:
    """A document's DiagnosticReport status: the status its writer asked for, else from the
    SR's flags (PS3.3 C.17.2.1: Verification Flag VERIFIED is final, Completion Flag PARTIAL
    is partial). ``document``: a mapping with ``verification_flag`` and ``completion_flag``."""
    if asked:
        return asked
    if document.get("verification_flag") == "VERIFIED":
        return "final"
    return "partial" if document.get("completion_flag") == "PARTIAL" else "preliminary"


def retire_reports(conn: Connection, instance_ids: Sequence[int], now: datetime) -> None:
    """Remove the report documents of instances about to be deleted (call it before the
    instance rows go): a report (its root UID) of which no version remains gets a tombstone,
    and the versions that remain are marked superseded again as their chain now says."""
    d = _DOCUMENT.c
    found: list[Any] = []
    for start in range(0, len(instance_ids), 500):
        chunk = list(instance_ids[start : start + 500])
        found += conn.execute(select(d.id, d.root_uid).where(d.instance_fk.in_(chunk))).all()
    if not found:
        return
    ids = [row.id for row in found]
    for start in range(0, len(ids), 500):
        conn.execute(delete(_DOCUMENT).where(d.id.in_(ids[start : start + 500])))
    _settle_roots(conn, {row.root_uid for row in found}, now)


def _settle_roots(conn: Connection, roots: set[str], now: datetime) -> None:
    """After documents of the chains ``roots`` went: tombstone the chains left empty and
    recompute ``superseded`` of the documents left in the others."""
    d = _DOCUMENT.c
    roots_list = sorted(roots)
    remaining: set[str] = set()
    for start in range(0, len(roots_list), 500):
        chunk = roots_list[start : start + 500]
        remaining |= set(conn.scalars(select(d.root_uid).where(d.root_uid.in_(chunk)).distinct()))
    for root in roots_list:
        if root not in remaining:
            tombstone(conn, "report", root, now)
    if remaining:
        later = _DOCUMENT.alias("later")
        successor = exists().where(
            or_(
                later.c.predecessor_uid == d.sop_instance_uid,
                and_(later.c.root_uid == d.root_uid, later.c.version > d.version),
            )
        )
        chunk_list = sorted(remaining)
        for start in range(0, len(chunk_list), 500):
            conn.execute(
                update(_DOCUMENT)
                .where(d.root_uid.in_(chunk_list[start : start + 500]))
                .values(superseded=successor)
            )


def tombstone(conn: Connection, kind: Literal["study", "report"], key: str, now: datetime) -> None:
    """Record that the study (key: its Study Instance UID) or report (key: its root SOP
    Instance UID) ``key`` was deleted at ``now``; a second deletion moves the date."""
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = dialect_insert(_TOMBSTONE).values(kind=kind, key=key[:64], deleted_at=now)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=["kind", "key"], set_={"deleted_at": statement.excluded.deleted_at}
        )
    )
