"""C-FIND SCP: Patient Root and Study Root Query/Retrieve Information Models (PS3.4 C.4.1)."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from archive import Archive
from archive.query import Key, Query, QueryError, QueryLevel, QueryModel, find
from config import Settings
from dicom_node.identifier import EncodedIdentifier, Unencodable, codec_for, encode_identifier
from dicom_node.identifier import texts as identifier_texts
from dicom_node.services import Handler

log = logging.getLogger(__name__)

# PS3.4 C.4.1.1.4 C-FIND status codes.
STATUS_PENDING = 0xFF00
STATUS_PENDING_OPTIONAL_KEYS_UNSUPPORTED = 0xFF01
STATUS_CANCEL = 0xFE00
STATUS_IDENTIFIER_MISMATCH = 0xA900
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_UNABLE_TO_PROCESS = 0xC000

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

    def add_contexts(self, ae: AE) -> None:
        for uid in MODELS:
            ae.add_supported_context(uid)

    def handlers(self) -> list[Handler]:
        return [(evt.EVT_C_FIND, self.handle_find), (evt.EVT_SOP_EXTENDED, self.handle_extended)]

    def handle_extended(self, event: Event) -> dict[Any, bytes]:
        """SOP Class Extended Negotiation for C-FIND (PS3.4 C.5.1.1.2): byte 1 relational
        queries (not supported: 0), byte 2 combined date-time matching (supported), byte 3
        fuzzy semantic matching of person names (not supported), byte 4 timezone adjustment
        (not supported)."""
        accepted: dict[Any, bytes] = {}
        app_info: dict[Any, bytes] = getattr(event, "app_info", None) or {}
        for uid, info in app_info.items():
            if str(uid) not in MODELS or not info:
                continue
            combined = len(info) > 1 and info[1] == 1
            reply = bytearray(len(info))
            if combined:
                reply[1] = 1
                self._combined.setdefault(event.assoc, set()).add(str(uid))
            accepted[uid] = bytes(reply)
        return accepted

    def handle_find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        model = MODELS.get(str(event.request.AffectedSOPClassUID))
        try:
            identifier = event.identifier
            level_text = str(identifier.get("QueryRetrieveLevel", "")).strip()
            keys, sequence_matching = identifier_keys(identifier)
        except Exception as exc:
            log.warning("C-FIND identifier cannot be decoded", extra={"err": str(exc)})
            yield _failure(STATUS_UNABLE_TO_PROCESS, f"identifier cannot be decoded: {exc}")
            return
        if model is None or level_text not in QueryLevel.__members__:
            yield _failure(
                STATUS_IDENTIFIER_MISMATCH,
                f"Query/Retrieve Level {level_text!r} is not PATIENT, STUDY, SERIES or IMAGE",
            )
            return
        query = Query(
            QueryLevel(level_text),
            model,
            keys,
            hierarchical=True,
            case_insensitive_pn=self.settings.query_case_insensitive_pn,
            combine_date_time=str(event.request.AffectedSOPClassUID)
            in self._combined.get(event.assoc, set()),
        )
        wants_retrieve_ae = identifier.get("RetrieveAETitle") is not None
        wants_availability = identifier.get("InstanceAvailability") is not None
        pending = STATUS_PENDING_OPTIONAL_KEYS_UNSUPPORTED if sequence_matching else STATUS_PENDING
        request_charset = identifier.get("SpecificCharacterSet")
        transfer_syntax = event.context.transfer_syntax
        # Identifiers are encoded straight from the JSON (dicom_node/identifier.py) for the
        # little endian, not deflated syntaxes; pydicom encodes the rest.
        direct = bool(transfer_syntax.is_little_endian and not transfer_syntax.is_deflated)
        implicit_vr = bool(transfer_syntax.is_implicit_VR)
        try:
            results = find(self.archive.db, query)
            for result in results:
                if event.is_cancelled:
                    yield STATUS_CANCEL, None
                    return
                if wants_retrieve_ae:
                    result["00080054"] = {"vr": "AE", "Value": [self.settings.ae_title]}
                if wants_availability:
                    result["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
                charset = _response_charset(request_charset, result)
                if charset:
                    result["00080005"] = {"vr": "CS", "Value": charset.split("\\")}
                if direct:
                    try:
                        encoded = encode_identifier(
                            result, implicit_vr=implicit_vr, codec=codec_for(charset)
                        )
                    except Unencodable:
                        pass
                    else:
                        yield pending, EncodedIdentifier(encoded)
                        continue
                yield pending, Dataset.from_json(result)
        except QueryError as exc:
            yield _failure(STATUS_IDENTIFIER_MISMATCH, str(exc))
        except Exception as exc:
            log.exception("C-FIND failed")
            yield _failure(STATUS_OUT_OF_RESOURCES, f"query failed: {type(exc).__name__}")


def _failure(status: int, comment: str) -> tuple[Dataset, None]:
    """A failure response: the status data set carries an ErrorComment (PS3.7 C.4.1)."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds, None
