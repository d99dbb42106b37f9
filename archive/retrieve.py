"""Which stored instances a retrieve names (C-MOVE, C-GET; PS3.4 C.4.2 / C.4.3).

A retrieve identifier carries unique keys only (PS3.4 C.4.2.2.1, C.4.3.2.1), following the
hierarchical model (C.4.2.1.4 / C.4.3.1.2):

- at the Query/Retrieve level: the level's unique key, a single value or, for the UID levels,
  a list of UIDs (``uid1\\uid2``);
- above it: each higher level's unique key as a single value (Patient Root only: Patient ID).

:class:`RetrieveKeys` reads and validates such an identifier; :func:`find_instances` turns the
keys into one indexed SQL query and returns what to send, in study / series / instance order.
Nothing here knows about DIMSE: the edge maps :class:`InvalidRetrieveIdentifier` to its status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, select

from archive.db import Database
from archive.dicom import valid_uid
from archive.models import Instance, Patient, Series, Study
from archive.query import QueryLevel as RetrieveLevel
from archive.query import QueryModel as RetrieveModel

__all__ = [
    "InvalidRetrieveIdentifier",
    "RetrieveItem",
    "RetrieveKeys",
    "RetrieveLevel",
    "RetrieveModel",
    "find_instances",
]

_LEVELS = {
    RetrieveModel.PATIENT_ROOT: (
        RetrieveLevel.PATIENT,
        RetrieveLevel.STUDY,
        RetrieveLevel.SERIES,
        RetrieveLevel.IMAGE,
    ),
    RetrieveModel.STUDY_ROOT: (RetrieveLevel.STUDY, RetrieveLevel.SERIES, RetrieveLevel.IMAGE),
}
_UNIQUE_KEY = {
    RetrieveLevel.PATIENT: "PatientID",
    RetrieveLevel.STUDY: "StudyInstanceUID",
    RetrieveLevel.SERIES: "SeriesInstanceUID",
    RetrieveLevel.IMAGE: "SOPInstanceUID",
}


class InvalidRetrieveIdentifier(ValueError):
    """The identifier does not name instances the way PS3.4 requires.

    ``keyword`` names the offending attribute when there is one (DIMSE Offending Element).
    """

    def __init__(self, reason: str, keyword: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.keyword = keyword


@dataclass(frozen=True, slots=True)
class RetrieveKeys:
    """The unique keys of a retrieve, validated against the information model."""

    model: RetrieveModel
    level: RetrieveLevel
    patient_id: str | None = None
    """Patient Root only: the patient (single value; empty names the patient with no ID)."""
    issuer_of_patient_id: str | None = None
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_instance_uids: tuple[str, ...] = ()

    @classmethod
    def from_identifier(cls, identifier: Dataset, model: RetrieveModel) -> RetrieveKeys:
        """Read a C-MOVE / C-GET identifier. Raises :class:`InvalidRetrieveIdentifier`."""
        try:
            raw_level = identifier.get("QueryRetrieveLevel")
        except Exception as exc:  # pydicom decodes lazily: a broken element surfaces here
            raise InvalidRetrieveIdentifier(
                f"cannot read Query/Retrieve Level: {exc}", "QueryRetrieveLevel"
            ) from exc
        level_text = str(raw_level or "").strip().upper()
        if not level_text:
            raise InvalidRetrieveIdentifier(
                "the identifier has no Query/Retrieve Level", "QueryRetrieveLevel"
            )
        try:
            level = RetrieveLevel(level_text)
        except ValueError:
            raise InvalidRetrieveIdentifier(
                f"unknown Query/Retrieve Level {level_text!r}", "QueryRetrieveLevel"
            ) from None
        levels = _LEVELS[model]
        if level not in levels:
            raise InvalidRetrieveIdentifier(
                f"level {level} is not part of the {model.replace('_', ' ').title()} model",
                "QueryRetrieveLevel",
            )
        values: dict[RetrieveLevel, tuple[str, ...]] = {}
        for current in levels[: levels.index(level) + 1]:
            keyword = _UNIQUE_KEY[current]
            listed = current is level and current is not RetrieveLevel.PATIENT
            values[current] = _unique_key(identifier, keyword, allow_list=listed)
        patient = values.get(RetrieveLevel.PATIENT)
        issuer = _text(identifier, "IssuerOfPatientID") if patient is not None else None
        return cls(
            model=model,
            level=level,
            patient_id=patient[0] if patient is not None else None,
            issuer_of_patient_id=issuer or None,
            study_uids=values.get(RetrieveLevel.STUDY, ()),
            series_uids=values.get(RetrieveLevel.SERIES, ()),
            sop_instance_uids=values.get(RetrieveLevel.IMAGE, ()),
        )


def _text(identifier: Dataset, keyword: str) -> str | None:
    try:
        value = identifier.get(keyword)
    except Exception as exc:
        raise InvalidRetrieveIdentifier(f"cannot read {keyword}: {exc}", keyword) from exc
    if value is None:
        return None
    return str(value).strip()


def _unique_key(identifier: Dataset, keyword: str, *, allow_list: bool) -> tuple[str, ...]:
    if keyword not in identifier:
        raise InvalidRetrieveIdentifier(f"the identifier has no {keyword}", keyword)
    try:
        value: Any = identifier[keyword].value
    except Exception as exc:
        raise InvalidRetrieveIdentifier(f"cannot read {keyword}: {exc}", keyword) from exc
    if keyword == "PatientID":
        if isinstance(value, Sequence) and not isinstance(value, str):
            raise InvalidRetrieveIdentifier("Patient ID must be a single value", keyword)
        return (str(value or "").strip(),)
    items = [value] if isinstance(value, str) or value is None else list(value)
    uids = tuple(str(v).strip().rstrip("\x00") for v in items if v is not None and str(v).strip())
    if not uids:
        raise InvalidRetrieveIdentifier(f"{keyword} is empty; a retrieve names its UIDs", keyword)
    if len(uids) > 1 and not allow_list:
        raise InvalidRetrieveIdentifier(
            f"{keyword} must be a single UID above the Query/Retrieve Level", keyword
        )
    for uid in uids:
        if not valid_uid(uid):
            raise InvalidRetrieveIdentifier(f"{keyword} {uid!r} is not a valid UID", keyword)
    return uids


@dataclass(frozen=True, slots=True)
class RetrieveItem:
    """One stored instance to send."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size: int


def find_instances(db: Database, keys: RetrieveKeys) -> list[RetrieveItem]:
    """The instances the keys name, ordered by study, series number, instance number.

    One SQL statement on indexed columns. The list is materialised (a few hundred bytes per
    instance) because a retrieve announces its number of sub-operations before the first one.
    """
    where: list[ColumnElement[bool]] = []
    if keys.patient_id is not None:
        where.append(Patient.patient_id == keys.patient_id)
        if keys.issuer_of_patient_id:
            where.append(Patient.issuer_of_patient_id == keys.issuer_of_patient_id)
    if keys.study_uids:
        where.append(_in(Study.study_instance_uid, keys.study_uids))
    if keys.series_uids:
        where.append(_in(Series.series_instance_uid, keys.series_uids))
    if keys.sop_instance_uids:
        where.append(_in(Instance.sop_instance_uid, keys.sop_instance_uids))
    if not where:
        raise InvalidRetrieveIdentifier("a retrieve names at least one unique key")
    statement = (
        select(
            Instance.sop_class_uid,
            Instance.sop_instance_uid,
            Instance.transfer_syntax_uid,
            Instance.blob_key,
            Instance.size_bytes,
        )
        .join(Series, Instance.series_fk == Series.id)
        .join(Study, Series.study_fk == Study.id)
        .where(*where)
        .order_by(
            Study.id,
            Series.series_number.asc().nulls_last(),
            Series.id,
            Instance.instance_number.asc().nulls_last(),
            Instance.id,
        )
    )
    if keys.patient_id is not None:
        statement = statement.join(Patient, Study.patient_fk == Patient.id)
    with db.engine.connect() as conn:
        return [
            RetrieveItem(
                sop_class_uid=row.sop_class_uid,
                sop_instance_uid=row.sop_instance_uid,
                transfer_syntax_uid=row.transfer_syntax_uid,
                blob_key=row.blob_key,
                size=int(row.size_bytes),
            )
            for row in conn.execute(statement)
        ]


def _in(column: Any, values: tuple[str, ...]) -> ColumnElement[bool]:
    return column == values[0] if len(values) == 1 else column.in_(values)
