"""The audit event of a FHIR write, committed in the write's own transaction.

Issue 15 item 5: the record of a change of PHI is written "in the same transaction as the
change". A FHIR create, update or operation describes its change here as an
``archive.audit.AuditEvent`` (DICOM PS3.15 A.5.3.9 "Patient Record", EventID 110110, with the
action of the interaction: C for create, U for update, E for an operation, FHIR R4
``audit-event-action``) and hands it to the domain function that writes, which inserts it in its
session before the commit. Once committed, :meth:`ChangeAudit.committed` marks the request
recorded in the scope's audit note, and the application's audit middleware writes no second
event for the same change (``pacsbridge.audit_http``). A write that fails rolls its event back
with it; the middleware then records the refused request with its HTTP outcome.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

from archive.audit import AuditEvent

NOTE = "pacsbridge.audit"
"""Scope key of the request's audit note (left there by the application's audit middleware)."""

_OPERATION = re.compile(r"/\$[A-Za-z-]+$")
_ACTIONS = {"POST": "C", "PUT": "U", "PATCH": "U", "DELETE": "D"}


class ChangeAudit:
    """Who makes one FHIR write, and the note that tells the middleware it is recorded."""

    __slots__ = ("action", "address", "agent", "note")

    def __init__(
        self,
        agent: str,
        address: str | None,
        action: str,
        note: MutableMapping[str, Any] | None = None,
    ) -> None:
        self.agent = agent
        self.address = address
        self.action = action
        self.note = note

    @classmethod
    def of_scope(cls, scope: MutableMapping[str, Any]) -> ChangeAudit:
        """The writer of a request: the token's subject (``pacsbridge.principal``), the
        client's address, and the action of its method and path."""
        principal = scope.get("pacsbridge.principal")
        subject = getattr(principal, "subject", None)
        client = scope.get("client")
        method = str(scope.get("method", "POST"))
        path = str(scope.get("path", ""))
        # An operation that changes a record updates it (PS3.15 A.5.3.9: C, R, U or D).
        action = "U" if _OPERATION.search(path) else _ACTIONS.get(method, "U")
        note = scope.get(NOTE)
        return cls(
            str(subject) if subject else "anonymous",
            str(client[0]) if client else None,
            action,
            note if isinstance(note, MutableMapping) else None,
        )

    def event(
        self,
        entity: str,
        *,
        patient_row: int | None = None,
        patient_id: str | None = None,
        study_uid: str | None = None,
        action: str | None = None,
    ) -> AuditEvent:
        """The event of the change of ``entity`` (``Type/id``) made by this request."""
        return AuditEvent(
            action=action or self.action,
            type_code="110110",
            agent=self.agent,
            agent_address=self.address,
            source="fhir",
            entity=entity,
            patient_row=patient_row,
            patient_id=patient_id,
            study_uid=study_uid,
        )

    def committed(self) -> None:
        """The change and its event are committed: the request is recorded."""
        if self.note is not None:
            self.note["recorded"] = True


def change_event(
    audit: ChangeAudit | None,
    entity: str,
    *,
    patient_row: int | None = None,
    patient_id: str | None = None,
    study_uid: str | None = None,
) -> AuditEvent | None:
    """The event of a write, when the request carries a writer (None for a write made
    outside a request)."""
    if audit is None:
        return None
    return audit.event(entity, patient_row=patient_row, patient_id=patient_id, study_uid=study_uid)


def committed(audit: ChangeAudit | None) -> None:
    if audit is not None:
        audit.committed()
