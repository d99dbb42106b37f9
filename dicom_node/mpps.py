"""Modality Performed Procedure Step SCP (PS3.4 F.7, SOP Class 1.2.840.10008.3.1.2.3.3) and
Modality Performed Procedure Step Retrieve SCP (PS3.4 F.8, SOP Class 1.2.840.10008.3.1.2.3.4).

A modality reports the procedure step it performs: N-CREATE when it starts (IN PROGRESS), N-SET
as it goes and when it ends (COMPLETED or DISCONTINUED). The steps and their effect on the
orders they name are :mod:`archive.mpps`'s; this module decodes the DIMSE attribute lists into
DICOM JSON and answers with the statuses PS3.4 F.7.2.1.2 / F.7.2.2.2 and PS3.7 C give:

- 0111H Duplicate SOP Instance: an N-CREATE for a step that exists;
- 0112H No Such Object Instance: an N-SET for a step that does not;
- 0110H Processing Failure, Error ID A710H, Error Comment "Performed Procedure Step Object may
  no longer be updated": an N-SET on a COMPLETED or DISCONTINUED step;
- 0106H Invalid Attribute Value: an N-CREATE not IN PROGRESS, a status that is none of
  PS3.3 C.4.14's, a date or time that is not one, an N-SET that changes what Table F.7.2-1
  does not allow it to;
- 0120H Missing Attribute / 0121H Missing Attribute Value: an N-CREATE without a Type 1
  attribute, a COMPLETED or DISCONTINUED step without its final-state attributes (the N-SET
  response names them in its Attribute Identifier List);
- 0211H Unrecognized Operation: an N-CREATE or N-SET on the Retrieve SOP Class (recorded as a
  refused request, like the others).

**Retrieve.** An N-GET (PS3.4 F.8.2.1) returns the attributes its Attribute Identifier List
names, as the step holds them (sequences whole; PS3.7 10.1.2: no list, every attribute), with
the step's Specific Character Set (0008,0005) so that its values decode as they were sent.
Attributes the step does not hold are left out (F.8.2.1.1: the SCU copes); text an N-SET in
another character set made unrepresentable in the step's goes out in ISO_IR 192. An unknown
step is 0112H No Such Object Instance; an N-GET that names the Modality Performed Procedure
Step SOP Class rather than the Retrieve class is 0211H (F.8.2: it names the Retrieve class).

**Who may.** Reporting performed steps changes orders, so it needs the ``store`` permission of
the calling AE (``archive.peers.PERMISSIONS``), checked by the node's access control before the
request is served (``dicom_node.access``: an undeclared AE may store, and so report steps,
unless ``auth = "required"``; a declared peer without ``store`` is refused with 0124H).
Reading a step back (N-GET) discloses the patient's demographics as a query does: it needs
``find``.

**Audit.** Each step created or changed is a "Procedure Record" event (PS3.15 A.5.3, 110111;
action C for N-CREATE, U for N-SET) committed with the step; an N-GET is one with action R; a
refused request is recorded with its outcome (minor failure).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any, cast

from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import N_CREATE, N_GET, N_SET
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityPerformedProcedureStepRetrieve,
)

from archive import Archive
from archive.audit import MINOR_FAILURE, SERIOUS_FAILURE, AuditEvent
from archive.dicom_json import dataset_to_json
from archive.mpps import (
    NO_LONGER_UPDATABLE_ERROR_ID,
    MppsError,
    MppsErrorKind,
    create_step,
    read_step,
    update_step,
)
from config import Settings
from dicom_node.audit import agent_of
from dicom_node.services import Handler
from dicom_node.status import (
    STATUS_DUPLICATE_SOP_INSTANCE,
    STATUS_INVALID_ATTRIBUTE_VALUE,
    STATUS_MISSING_ATTRIBUTE,
    STATUS_MISSING_ATTRIBUTE_VALUE,
    STATUS_NO_SUCH_OBJECT_INSTANCE,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    STATUS_UNRECOGNIZED_OPERATION,
)

log = logging.getLogger(__name__)

MPPS_SOP_CLASS = str(ModalityPerformedProcedureStep)
MPPS_RETRIEVE_SOP_CLASS = str(ModalityPerformedProcedureStepRetrieve)
_SPECIFIC_CHARACTER_SET = 0x00080005

# The failure status of each refusal (PS3.4 F.7.2.1.2, F.7.2.2.2; PS3.7 Annex C).
_STATUS_FOR_ERROR = {
    MppsErrorKind.DUPLICATE: STATUS_DUPLICATE_SOP_INSTANCE,
    MppsErrorKind.NO_SUCH_INSTANCE: STATUS_NO_SUCH_OBJECT_INSTANCE,
    MppsErrorKind.INVALID_VALUE: STATUS_INVALID_ATTRIBUTE_VALUE,
    MppsErrorKind.MISSING_ATTRIBUTE: STATUS_MISSING_ATTRIBUTE,
    MppsErrorKind.MISSING_VALUE: STATUS_MISSING_ATTRIBUTE_VALUE,
    MppsErrorKind.NOT_UPDATABLE: STATUS_PROCESSING_FAILURE,
}
#: Bulk values are not expected in a step; any there is kept inline.
_INLINE = 1 << 62


def _no_bulk(tag: int, vr: str, path: str) -> str:  # never called below _INLINE
    raise ValueError("bulk data in a performed procedure step")


def _comment(text: str) -> str:
    """An Error Comment (0000,0902): LO, at most 64 characters, no backslash (PS3.7 C.4)."""
    return text.replace("\\", "/")[:64]


def _failure(
    code: int, comment: str, *, error_id: int | None = None, tags: tuple[str, ...] = ()
) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = _comment(comment)
    if error_id is not None:
        ds.ErrorID = error_id
    if tags:
        ds.AttributeIdentifierList = [Tag(int(tag, 16)) for tag in tags]
    return ds


_SERVICE_OF_ACTION = {"C": "N-CREATE", "U": "N-SET", "R": "N-GET"}


def _selected(step: Dataset, identifiers: Any) -> Dataset:
    """The N-GET's Attribute List: the attributes the Attribute Identifier List names (all
    when it names none, PS3.7 10.1.2.1), and the Specific Character Set their values need."""
    if identifiers is None or identifiers == []:
        return step
    wanted = {int(tag) for tag in (identifiers if isinstance(identifiers, list) else [identifiers])}
    wanted.add(_SPECIFIC_CHARACTER_SET)
    reply = Dataset()
    for element in step:
        if int(element.tag) in wanted:
            reply.add(element)
    return reply


#: Value representations whose values are text in the Specific Character Set (PS3.5 6.1.2.3).
_TEXT_VRS = frozenset(("SH", "LO", "ST", "LT", "UC", "UT", "PN"))


def _texts(dataset: Dataset) -> Iterator[str]:
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value or []:
                yield from _texts(item)
        elif element.VR in _TEXT_VRS and element.value is not None:
            values = element.value if element.VM > 1 else [element.value]
            yield from (str(v) for v in values)


def _in_a_character_set_that_holds(reply: Dataset) -> Dataset:
    """The reply with a Specific Character Set its text can be written in: the step's, else
    ISO_IR 192 (UTF-8). A step holds decoded text, and an N-SET in another character set than
    the N-CREATE's replaced the step's: the values of both must still come out as sent."""
    declared = reply.get("SpecificCharacterSet") or ""
    codecs = convert_encodings(list(declared) if isinstance(declared, MultiValue) else declared)

    def fits(character: str) -> bool:
        for codec in codecs:
            try:
                character.encode(codec)
                return True
            except (UnicodeError, LookupError):
                continue
        return False

    if any(not fits(c) for text in _texts(reply) for c in set(text) if ord(c) > 0x7F):
        reply.SpecificCharacterSet = "ISO_IR 192"
    return reply


class MppsService:
    """N-CREATE and N-SET of the Modality Performed Procedure Step SOP Class, N-GET of its
    Retrieve SOP Class."""

    def __init__(self, archive: Archive, settings: Settings) -> None:
        self.archive = archive
        self.settings = settings

    def add_contexts(self, ae: AE) -> None:
        ae.add_supported_context(MPPS_SOP_CLASS)
        ae.add_supported_context(MPPS_RETRIEVE_SOP_CLASS)

    def handlers(self) -> list[Handler]:
        return [
            (evt.EVT_N_CREATE, self.handle_create),
            (evt.EVT_N_SET, self.handle_set),
            (evt.EVT_N_GET, self.handle_get),
        ]

    # --- N-CREATE --------------------------------------------------------------------------
    def handle_create(self, event: Event) -> tuple[Dataset | int, Dataset | None]:
        request = cast(N_CREATE, event.request)
        given = request.AffectedSOPInstanceUID
        # PS3.4 F.7.2.1.2: the SCU gives the SOP Instance UID, or the SCP assigns one (and
        # returns it in the response's Affected SOP Instance UID).
        uid = str(given) if given else f"2.25.{uuid.uuid4().int}"
        if not self._managed_here(event):
            return self._unrecognized(event, "C", uid, "N-CREATE of the Retrieve SOP Class"), None
        attributes = self._decode(event, "attribute_list")
        if isinstance(attributes, Dataset):
            self._refused(event, "C", uid, attributes.ErrorComment)
            return attributes, None
        try:
            create_step(
                self.archive.db,
                uid,
                attributes,
                calling_ae_title=str(event.assoc.requestor.ae_title or ""),
                audit=self._event(event, "C"),
            )
        except MppsError as exc:
            return self._answer_error(event, "C", uid, exc, with_tags=False), None
        except Exception:
            log.exception("MPPS N-CREATE failed", extra={"sop": uid})
            self._refused(event, "C", uid, "processing failure", serious=True)
            return _failure(STATUS_PROCESSING_FAILURE, "processing failure"), None
        log.info("MPPS N-CREATE", extra={"sop": uid, "calling_ae": event.assoc.requestor.ae_title})
        if given:
            return STATUS_SUCCESS, None
        reply = Dataset()
        reply.AffectedSOPInstanceUID = uid
        return STATUS_SUCCESS, reply

    # --- N-SET -----------------------------------------------------------------------------
    def handle_set(self, event: Event) -> tuple[Dataset | int, Dataset | None]:
        request = cast(N_SET, event.request)
        uid = str(request.RequestedSOPInstanceUID or "")
        if not self._managed_here(event):
            return self._unrecognized(event, "U", uid, "N-SET of the Retrieve SOP Class"), None
        modifications = self._decode(event, "modification_list")
        if isinstance(modifications, Dataset):
            self._refused(event, "U", uid, modifications.ErrorComment)
            return modifications, None
        try:
            result = update_step(self.archive.db, uid, modifications, audit=self._event(event, "U"))
        except MppsError as exc:
            return self._answer_error(event, "U", uid, exc, with_tags=True), None
        except Exception:
            log.exception("MPPS N-SET failed", extra={"sop": uid})
            self._refused(event, "U", uid, "processing failure", serious=True)
            return _failure(STATUS_PROCESSING_FAILURE, "processing failure"), None
        log.info(
            "MPPS N-SET",
            extra={
                "sop": uid,
                "status": result.status,
                "order": ",".join(result.order_resource_ids) or "-",
            },
        )
        return STATUS_SUCCESS, None

    # --- N-GET -----------------------------------------------------------------------------
    def handle_get(self, event: Event) -> tuple[Dataset | int, Dataset | None]:
        request = cast(N_GET, event.request)
        uid = str(request.RequestedSOPInstanceUID or "")
        if str(event.context.abstract_syntax) != MPPS_RETRIEVE_SOP_CLASS:
            # PS3.4 F.8.2: the N-GET names the Retrieve SOP Class; the MPPS SOP Class itself
            # has N-CREATE and N-SET only (F.7.1).
            return self._unrecognized(event, "R", uid, "N-GET of the MPPS SOP Class"), None
        try:
            step = read_step(self.archive.db, uid)
            if step is None:
                self._refused(event, "R", uid, f"no step {uid}")
                return _failure(STATUS_NO_SUCH_OBJECT_INSTANCE, f"no step {uid}"), None
            reply = _in_a_character_set_that_holds(
                _selected(Dataset.from_json(step.attributes), request.AttributeIdentifierList)
            )
        except Exception:
            log.exception("MPPS N-GET failed", extra={"sop": uid})
            self._refused(event, "R", uid, "processing failure", serious=True)
            return _failure(STATUS_PROCESSING_FAILURE, "processing failure"), None
        audit = self._event(event, "R")
        audit.entity = f"Procedure/{uid}"
        audit.patient_id = step.patient_id
        audit.study_uid = step.study_instance_uid
        self.archive.audit.submit(audit)
        return STATUS_SUCCESS, reply

    # --- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _managed_here(event: Event) -> bool:
        """N-CREATE and N-SET belong to the Modality Performed Procedure Step SOP Class only
        (PS3.4 F.7.1; the Retrieve SOP Class has N-GET alone, F.8.1)."""
        return str(event.context.abstract_syntax) == MPPS_SOP_CLASS

    def _unrecognized(self, event: Event, action: str, uid: str, what: str) -> Dataset:
        """0211H Unrecognized Operation (PS3.7 C): an operation the SOP Class does not have."""
        log.warning(
            "MPPS request refused",
            extra={"sop": uid, "service": _SERVICE_OF_ACTION[action], "reason": what},
        )
        self._refused(event, action, uid, what)
        return _failure(STATUS_UNRECOGNIZED_OPERATION, what)

    @staticmethod
    def _decode(event: Event, name: str) -> dict[str, Any] | Dataset:
        """The request's attribute list as DICOM JSON, or the failure to answer with."""
        try:
            dataset: Dataset = getattr(event, name)
            return dataset_to_json(dataset, _no_bulk, _INLINE)
        except Exception as exc:
            log.warning(
                "MPPS attribute list not decodable", extra={"err": f"{type(exc).__name__}: {exc}"}
            )
            return _failure(STATUS_PROCESSING_FAILURE, "the attribute list cannot be decoded")

    @staticmethod
    def _event(event: Event, action: str) -> AuditEvent:
        agent, address = agent_of(event.assoc)
        return AuditEvent(
            action=action,
            type_code="110111",  # Procedure Record (PS3.15 A.5.3)
            agent=agent,
            agent_address=address,
            source="dimse",
            entity=_SERVICE_OF_ACTION[action],
        )

    def _answer_error(
        self, event: Event, action: str, uid: str, exc: MppsError, *, with_tags: bool
    ) -> Dataset:
        status = _STATUS_FOR_ERROR[exc.kind]
        log.warning(
            "MPPS request refused",
            extra={
                "sop": uid,
                "service": _SERVICE_OF_ACTION[action],
                "status": f"0x{status:04X}",
                "reason": exc.reason,
            },
        )
        self._refused(event, action, uid, exc.reason)
        return _failure(
            status,
            exc.reason,
            error_id=NO_LONGER_UPDATABLE_ERROR_ID
            if exc.kind is MppsErrorKind.NOT_UPDATABLE
            else None,
            tags=exc.tags if with_tags else (),
        )

    def _refused(
        self, event: Event, action: str, uid: str, reason: str, *, serious: bool = False
    ) -> None:
        audit = self._event(event, action)
        audit.outcome = SERIOUS_FAILURE if serious else MINOR_FAILURE
        audit.outcome_text = reason
        audit.entity = f"Procedure/{uid}" if uid else audit.entity
        self.archive.audit.submit(audit)
