"""C-FIND SCP: Patient Root and Study Root Query/Retrieve Information Models (PS3.4 C.4.1),
and the Modality Worklist Information Model (PS3.4 K.4, served by ``dicom_node/worklist.py``).

Queries are hierarchical (PS3.4 C.4.1.2.2.1) unless the requestor negotiated relational
queries for the SOP class (SOP Class Extended Negotiation byte 1, C.5.1.1.1; C.4.1.2.2.2), or
``query_lenient`` lets SERIES and IMAGE queries leave out the unique keys of the levels above
(they are then run as relational queries)."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from archive import Archive
from archive.metrics import observe_query
from archive.query import (
    Key,
    Query,
    QueryError,
    QueryLevel,
    QueryModel,
    TooManyMatches,
    find_matches,
)
from config import Settings
from dicom_node.audit import DimseAudit
from dicom_node.identifier import RowEncoder, Unencodable, codec_for, encode_identifier
from dicom_node.identifier import texts as identifier_texts
from dicom_node.pdata import PrebuiltPData, c_find_pending_command, pdata_pdus
from dicom_node.services import Handler
from dicom_node.status import (  # PS3.4 C.4.1.1.4
    STATUS_CANCEL,
    STATUS_IDENTIFIER_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PENDING,
    STATUS_PENDING_OPTIONAL_KEYS_UNSUPPORTED,
    STATUS_UNABLE_TO_PROCESS,
)

log = logging.getLogger(__name__)

MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): QueryModel.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelFind): QueryModel.STUDY_ROOT,
}


def _text_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, MultiValue)):
        return "\\".join(_text_value(v) or "" for v in value) or None
    if isinstance(value, PersonName):
        return str(value) or None
    if isinstance(value, bytes):
        return value.decode("ascii", "replace") or None
    text = str(value)
    return text or None


def identifier_keys(identifier: Dataset) -> tuple[list[Key], bool]:
    """The identifier's attributes as query keys, and whether it asks for sequence matching."""
    keys: list[Key] = []
    sequence_matching = False
    for elem in identifier:
        if elem.tag.group in (0x0000, 0x0002) or elem.tag.element == 0:
            continue
        if elem.VR == "SQ":
            sequence_matching |= any(len(item) for item in elem.value or [])
            keys.append(Key(int(elem.tag), "SQ"))
            continue
        keys.append(Key(int(elem.tag), str(elem.VR), _text_value(elem.value)))
    return keys, sequence_matching


def _response_charset(request_charset: Any, result: dict[str, Any]) -> str | None:
    """Keep the request's character set when it can carry every value, else UTF-8."""
    texts = list(identifier_texts(result))
    if all(t.isascii() for t in texts):
        return _text_value(request_charset)
    if request_charset:
        names = (
            list(request_charset) if isinstance(request_charset, MultiValue) else [request_charset]
        )
        try:
            codecs = convert_encodings(names)
            if len(codecs) == 1:
                for text in texts:
                    text.encode(codecs[0])
                return _text_value(request_charset)
        except (LookupError, UnicodeError, ValueError):
            pass
    return "ISO_IR 192"


class FindService:
    def __init__(self, archive: Archive, settings: Settings) -> None:
        self.archive = archive
        self.settings = settings
        # association -> information models for which combined date-time matching was agreed
        self._combined: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        # association -> information models for which relational queries were agreed
        self._relational: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self.audit = DimseAudit(archive)
        # Imported here: dicom_node.worklist builds on this module's helpers.
        from dicom_node.worklist import WORKLIST_FIND, WorklistFind

        self.worklist_uid = WORKLIST_FIND
        self.worklist = WorklistFind(archive, settings, self.audit)

    def add_contexts(self, ae: AE) -> None:
        for uid in MODELS:
            ae.add_supported_context(uid)
        ae.add_supported_context(self.worklist_uid)

    def handlers(self) -> list[Handler]:
        return [(evt.EVT_C_FIND, self.handle_find), (evt.EVT_SOP_EXTENDED, self.handle_extended)]

    def handle_extended(self, event: Event) -> dict[Any, bytes]:
        """SOP Class Extended Negotiation for C-FIND (PS3.4 C.5.1.1.2): byte 1 relational
        queries (supported, C.5.1.1.1), byte 2 combined date-time matching (supported), byte 3
        fuzzy semantic matching of person names (not supported), byte 4 timezone adjustment
        (not supported). The worklist's are answered by ``dicom_node.worklist``."""
        accepted: dict[Any, bytes] = {}
        app_info: dict[Any, bytes] = getattr(event, "app_info", None) or {}
        for uid, info in app_info.items():
            if not info:
                continue
            if str(uid) == self.worklist_uid:
                accepted[uid] = self.worklist.extended(bytes(info))
                continue
            if str(uid) not in MODELS:
                continue
            reply = bytearray(len(info))
            if info[0] == 1:
                reply[0] = 1
                self._relational.setdefault(event.assoc, set()).add(str(uid))
            if len(info) > 1 and info[1] == 1:
                reply[1] = 1
                self._combined.setdefault(event.assoc, set()).add(str(uid))
            accepted[uid] = bytes(reply)
        return accepted

    def handle_find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        if str(event.request.AffectedSOPClassUID) == self.worklist_uid:
            yield from self.worklist.handle_find(event)
            return
        model = MODELS.get(str(event.request.AffectedSOPClassUID))
        try:
            identifier = event.identifier
            level_text = str(identifier.get("QueryRetrieveLevel", "")).strip()
            keys, sequence_matching = identifier_keys(identifier)
        except Exception as exc:
            log.warning("C-FIND identifier cannot be decoded", extra={"err": str(exc)})
            self.audit.queried(
                event.assoc,
                str(event.request.AffectedSOPClassUID),
                None,
                failed="identifier cannot be decoded",
            )
            yield _failure(STATUS_UNABLE_TO_PROCESS, f"identifier cannot be decoded: {exc}")
            return
        if model is None or level_text not in QueryLevel.__members__:
            self.audit.queried(
                event.assoc,
                str(event.request.AffectedSOPClassUID),
                identifier,
                failed="bad Query/Retrieve Level",
            )
            yield _failure(
                STATUS_IDENTIFIER_MISMATCH,
                f"Query/Retrieve Level {level_text!r} is not PATIENT, STUDY, SERIES or IMAGE",
            )
            return
        level = QueryLevel(level_text)
        sop_class = str(event.request.AffectedSOPClassUID)
        relational = sop_class in self._relational.get(event.assoc, set()) or (
            self.settings.query_lenient and level in (QueryLevel.SERIES, QueryLevel.IMAGE)
        )
        query = Query(
            level,
            model,
            keys,
            hierarchical=not relational,
            case_insensitive_pn=self.settings.query_case_insensitive_pn,
            combine_date_time=str(event.request.AffectedSOPClassUID)
            in self._combined.get(event.assoc, set()),
            max_matches=self.settings.query_max_matches,
        )
        wants_retrieve_ae = identifier.get("RetrieveAETitle") is not None
        wants_availability = identifier.get("InstanceAvailability") is not None
        pending = STATUS_PENDING_OPTIONAL_KEYS_UNSUPPORTED if sequence_matching else STATUS_PENDING
        request_charset = identifier.get("SpecificCharacterSet")
        transfer_syntax = event.context.transfer_syntax
        # Identifiers are encoded straight from the JSON (dicom_node/identifier.py) for the
        # little endian, not deflated syntaxes, and their pending responses go out in batches
        # (_PendingBatch); pydicom encodes the rest and pynetdicom sends those.
        direct = bool(transfer_syntax.is_little_endian and not transfer_syntax.is_deflated)
        implicit_vr = bool(transfer_syntax.is_implicit_VR)
        batch = _PendingBatch(event, pending)
        started = time.perf_counter()
        failed: str | None = None
        try:
            matches = find_matches(self.archive.db, query)
            # Most identifiers are encoded straight from the index rows (RowEncoder); the
            # others (non-ASCII values, attributes from the stored JSON...) from their JSON.
            encoder = None
            if direct:
                fixed: dict[str, tuple[str, str]] = {}
                requested = _text_value(request_charset)
                if requested:
                    fixed["00080005"] = ("CS", requested)
                if wants_retrieve_ae:
                    fixed["00080054"] = ("AE", self.settings.ae_title)
                if wants_availability:
                    fixed["00080056"] = ("CS", "ONLINE")
                encoder = RowEncoder.build(
                    matches.plan, query.level.value, implicit_vr=implicit_vr, fixed=fixed
                )
            for match in matches.items:
                if event.is_cancelled or not event.assoc.is_established:
                    batch.flush()
                    yield STATUS_CANCEL, None
                    return
                if encoder is not None:
                    encoded = encoder.encode(match)
                    if encoded is not None:
                        batch.add(encoded)
                        continue
                result = matches.json(match)
                if wants_retrieve_ae:
                    result["00080054"] = {"vr": "AE", "Value": [self.settings.ae_title]}
                if wants_availability:
                    result["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
                if direct:
                    encoded = _encode_directly(result, request_charset, implicit_vr)
                    if encoded is not None:
                        batch.add(encoded)
                        continue
                charset = _response_charset(request_charset, result)
                if charset:
                    result["00080005"] = {"vr": "CS", "Value": charset.split("\\")}
                batch.flush()  # keep the order of the responses
                yield pending, Dataset.from_json(result)
            batch.flush()
        except QueryError as exc:
            failed = str(exc)
            batch.flush()
            yield _failure(STATUS_IDENTIFIER_MISMATCH, str(exc))
        except TooManyMatches as exc:  # raised before the first response
            failed = str(exc)
            yield _failure(STATUS_OUT_OF_RESOURCES, str(exc))
        except Exception as exc:
            log.exception("C-FIND failed")
            failed = f"query failed: {type(exc).__name__}"
            batch.flush()
            yield _failure(STATUS_OUT_OF_RESOURCES, f"query failed: {type(exc).__name__}")
        finally:
            observe_query("C-FIND", query.level.value, time.perf_counter() - started)
            self.audit.queried(
                event.assoc, str(event.request.AffectedSOPClassUID), identifier, failed=failed
            )


def _encode_directly(
    result: dict[str, Any], request_charset: Any, implicit_vr: bool
) -> bytes | None:
    """The identifier encoded from its JSON, with the Specific Character Set the response
    needs, or None to leave it to pydicom."""
    requested = _text_value(request_charset)
    try:
        # Most values are ASCII: then the response keeps the request's character set and no
        # value needs a look first.
        if requested:
            result["00080005"] = {"vr": "CS", "Value": requested.split("\\")}
        return encode_identifier(result, implicit_vr=implicit_vr, codec="ascii")
    except Unencodable:
        pass
    result.pop("00080005", None)
    charset = _response_charset(request_charset, result)
    if charset:
        result["00080005"] = {"vr": "CS", "Value": charset.split("\\")}
    try:
        return encode_identifier(result, implicit_vr=implicit_vr, codec=codec_for(charset))
    except Unencodable:
        result.pop("00080005", None)  # set again on pydicom's path
        return None


class _PendingBatch:
    """Pending C-FIND responses (PS3.7 9.1.2.1.6), several per hand-over to the DUL.

    pynetdicom sends each response of the handler's generator on its own: a primitive, its
    checks and log lines, one queued P-DATA and one pass of the state machine per match, which
    on a large C-FIND costs more than the query. Responses whose identifier is already encoded
    are instead written here as finished P-DATA-TF PDUs (the command set is the same for all of
    them) and handed to the DUL a batch at a time, from the handler's own thread, so that they
    stay in order with what pynetdicom sends (the final response comes after the generator
    ends). The peer sees exactly the same PDUs.
    """

    #: A batch goes out at this many responses or bytes, whichever comes first: small enough
    #: that a C-CANCEL (read by the DUL thread between batches) still stops a large C-FIND.
    MAX_RESPONSES = 32
    MAX_BYTES = 128 * 1024

    def __init__(self, event: Event, status: int) -> None:
        request = event.request
        primitive = C_FIND()
        primitive.MessageIDBeingRespondedTo = request.MessageID
        primitive.AffectedSOPClassUID = request.AffectedSOPClassUID
        primitive.Status = status
        self.command = c_find_pending_command(primitive)
        self.assoc = event.assoc
        self.context_id = int(event.context.context_id or 0)
        self.max_pdu = event.assoc.dimse.maximum_pdu_size
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, identifier: bytes) -> None:
        pdus = pdata_pdus(self.context_id, self.command, identifier, self.max_pdu)
        self.parts.append(pdus)
        self.size += len(pdus)
        if self.size >= self.MAX_BYTES or len(self.parts) >= self.MAX_RESPONSES:
            self.flush()

    def flush(self) -> None:
        if self.parts and self.assoc.is_established:
            self.assoc.dul.send_pdu(PrebuiltPData(b"".join(self.parts)))
            time.sleep(0)  # let the DUL thread send, and read what the peer sent (C-CANCEL)
        self.parts.clear()
        self.size = 0


def _failure(status: int, comment: str) -> tuple[Dataset, None]:
    """A failure response: the status data set carries an ErrorComment (PS3.7 C.4.1)."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds, None
