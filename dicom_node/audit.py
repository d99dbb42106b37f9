"""The audit of the DICOM edge (DICOM PS3.15 A.5.3): who (the Calling AE Title and its
address) stored, queried or retrieved which patient's studies.

- C-STORE: one "DICOM Instances Transferred" (110104, action C) per study per association, as
  PS3.15 A.5.3.4 describes the event ("one or more instances of one study"), recorded when the
  association's first instance of the study is stored (and again for the first one that fails,
  with its outcome): not one event per instance. The success event is written in the index
  transaction of that first instance (``archive.ingest``'s ``audit``), so a stored study is
  never without its record, whatever happens to the process after the commit.
- C-FIND: one "Query" (110112, action E) per request, however many matches it returns, with the
  identifier's keys as the query (PS3.15 A.5.3.12).
- C-MOVE and C-GET: one "DICOM Instances Transferred" (110104, action R) per study the
  identifier names (PS3.15 A.5.3.4), when the request is accepted; the move destination is the
  entity.

The other events (reads, refusals) are queued for the archive's background writer: an
association never waits for them.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset

from archive import Archive
from archive.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, AuditEvent

_QUERY_LIMIT = 4096


def agent_of(assoc: Any) -> tuple[str, str | None]:
    """(``ae:TITLE``, address) of an association's requestor."""
    requestor = getattr(assoc, "requestor", None)
    title = str(getattr(requestor, "ae_title", "") or "").strip()
    address = getattr(requestor, "address", None)
    return f"ae:{title or '?'}", str(address) if address else None


def _single(value: Any) -> str | None:
    """A single-valued key without wildcards (a key that names one patient or study)."""
    if value is None:
        return None
    text = str(value).strip()
    if not text or "\\" in text or "*" in text or "?" in text:
        return None
    return text


def query_text(sop_class_uid: str, identifier: Dataset | None) -> str:
    """The request's keys as ``SOPClass KEY=value ...`` (only keys with a value; the keys of a
    sequence's item as ``SEQUENCE.KEY=value``, as a worklist query's step keys come)."""
    parts = [sop_class_uid]
    if identifier is not None:
        try:
            parts += _key_texts(identifier, "")
        except Exception:  # a key that cannot be decoded: keep what was read
            parts.append("(undecodable)")
    return " ".join(parts)[:_QUERY_LIMIT]


def _key_texts(identifier: Dataset, prefix: str) -> list[str]:
    parts: list[str] = []
    for element in identifier:
        name = element.keyword or f"({element.tag.group:04X},{element.tag.element:04X})"
        if element.VR == "SQ":
            for item in (element.value or [])[:1]:  # sequence matching: one item
                parts += _key_texts(item, f"{prefix}{name}.")
            continue
        if element.value in (None, ""):
            continue
        parts.append(f"{prefix}{name}={element.value}")
    return parts


class DimseAudit:
    """The DIMSE events of one node."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        # association -> (study, outcome) already recorded on it
        self._stored: weakref.WeakKeyDictionary[Any, set[tuple[str, int]]] = (
            weakref.WeakKeyDictionary()
        )
        # association -> its store_event function (made once per association)
        self._store_events: weakref.WeakKeyDictionary[
            Any, Callable[[str, str], AuditEvent | None]
        ] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def store_event(self, assoc: Any) -> Callable[[str, str], AuditEvent | None]:
        """The ``audit`` of an ingest on ``assoc``: the C-STORE event when the instance is the
        association's first of its study, else None (nothing more to write). Made once per
        association; it holds the association weakly (the association keys the cache)."""
        if assoc is not None:
            made = self._store_events.get(assoc)
            if made is not None:
                return made
        agent, address = agent_of(assoc)
        held = weakref.ref(assoc) if assoc is not None else None

        def event(study_uid: str, patient_id: str) -> AuditEvent | None:
            on = held() if held is not None else None
            if on is not None:
                with self._lock:
                    if (study_uid, SUCCESS) in self._stored.get(on, ()):
                        return None
            return AuditEvent(
                action="C",
                type_code="110104",
                agent=agent,
                agent_address=address,
                source="dimse",
                study_uid=study_uid,
                patient_id=patient_id or None,
                entity="C-STORE",
            )

        if assoc is not None:
            self._store_events[assoc] = event
        return event

    def stored(
        self,
        assoc: Any,
        *,
        study_uid: str | None,
        patient_id: str | None = None,
        failure: int | None = None,
        reason: str | None = None,
        recorded: bool = False,
    ) -> None:
        """One instance stored (``failure`` None) or refused (the EventOutcomeIndicator);
        ``recorded``: its event was committed with it (:meth:`store_event`)."""
        outcome = SUCCESS if failure is None else failure
        key = (study_uid or "", outcome)
        if assoc is not None:
            with self._lock:
                seen = self._stored.setdefault(assoc, set())
                if key in seen:
                    return
                seen.add(key)
        if recorded:
            return
        agent, address = agent_of(assoc)
        self.archive.audit.submit(
            AuditEvent(
                action="C",
                type_code="110104",
                agent=agent,
                agent_address=address,
                source="dimse",
                outcome=outcome,
                outcome_text=reason,
                study_uid=study_uid,
                patient_id=patient_id,
                entity="C-STORE",
            )
        )

    def queried(
        self,
        assoc: Any,
        sop_class_uid: str,
        identifier: Dataset | None,
        *,
        failed: str | None = None,
    ) -> None:
        agent, address = agent_of(assoc)
        patient = study = None
        if identifier is not None:
            try:
                patient = _single(identifier.get("PatientID"))
                study = _single(identifier.get("StudyInstanceUID"))
            except Exception:
                patient = study = None
        self.archive.audit.submit(
            AuditEvent(
                action="E",
                type_code="110112",
                agent=agent,
                agent_address=address,
                source="dimse",
                outcome=SUCCESS if failed is None else MINOR_FAILURE,
                outcome_text=failed,
                patient_id=patient,
                study_uid=study,
                entity="C-FIND",
                query=query_text(sop_class_uid, identifier),
            )
        )

    def retrieved(
        self,
        assoc: Any,
        service: str,
        study_uids: tuple[str, ...],
        patient_id: str | None,
        *,
        destination: str | None = None,
        failed: str | None = None,
        serious: bool = False,
    ) -> None:
        """A C-MOVE or C-GET accepted (or refused: ``failed``)."""
        agent, address = agent_of(assoc)
        outcome = SUCCESS
        if failed is not None:
            outcome = SERIOUS_FAILURE if serious else MINOR_FAILURE
        entity = f"{service} to ae:{destination}" if destination else service
        for study in study_uids or (None,):
            self.archive.audit.submit(
                AuditEvent(
                    action="R",
                    type_code="110104",
                    agent=agent,
                    agent_address=address,
                    source="dimse",
                    outcome=outcome,
                    outcome_text=failed,
                    study_uid=study,
                    patient_id=patient_id if patient_id else None,
                    entity=entity,
                )
            )
