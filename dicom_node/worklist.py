"""C-FIND SCP of the Modality Worklist Information Model - FIND (PS3.4 K.4, K.6.1).

A modality asks for its scheduled procedure steps; the archive's orders on the worklist
answer (:mod:`archive.worklist`, the one matcher of C-FIND and QIDO-RS). The node's C-FIND
service (:class:`dicom_node.find.FindService`) hands this SOP class's requests and extended
negotiation here; access control (the calling AE's ``find`` permission) and the audit are those
of every C-FIND.

Responses (PS3.4 K.4.1.1.4, Table K.4-2): Pending 0xFF00 per item, 0xFF01 when the identifier
held matching values on keys whose matching is not supported; Success; 0xA900 Identifier does
not match SOP Class (a value its VR cannot hold, a sequence key with more than one item);
0xC000 Unable to process (an identifier that cannot be decoded, a failed query); 0xFE00 when
the requestor cancelled (C-CANCEL).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.events import Event

from archive import Archive
from archive.metrics import observe_query
from archive.query import Key, QueryError, TooManyMatches
from archive.worklist import find_worklist, worklist_query
from config import Settings
from dicom_node.audit import DimseAudit
from dicom_node.find import _failure, _response_charset, _text_value
from dicom_node.status import (
    STATUS_CANCEL,
    STATUS_IDENTIFIER_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PENDING,
    STATUS_PENDING_OPTIONAL_KEYS_UNSUPPORTED,
    STATUS_UNABLE_TO_PROCESS,
)

log = logging.getLogger(__name__)

#: Modality Worklist Information Model - FIND (PS3.4 K.6.1.2).
WORKLIST_FIND = "1.2.840.10008.5.1.4.31"


def worklist_keys(identifier: Dataset, parent: int | None = None) -> list[Key]:
    """The identifier's attributes as query keys; a sequence's item's keys with the
    sequence's tag as their parent (PS3.4 C.2.2.2.6). A sequence key holds at most one item
    (:class:`QueryError` otherwise)."""
    keys: list[Key] = []
    for elem in identifier:
        if elem.tag.group in (0x0000, 0x0002) or elem.tag.element == 0:
            continue
        if elem.VR == "SQ":
            keys.append(Key(int(elem.tag), "SQ", parent=parent))
            items = list(elem.value or [])
            if len(items) > 1:
                raise QueryError(
                    f"{elem.keyword or elem.tag}: a sequence key holds one item at most "
                    "(PS3.4 C.2.2.2.6)"
                )
            if items:
                keys += worklist_keys(items[0], int(elem.tag))
            continue
        keys.append(Key(int(elem.tag), str(elem.VR), _text_value(elem.value), parent))
    return keys


def _flat(result: dict[str, Any]) -> dict[str, Any]:
    """The identifier's elements and those of its sequences' items, in one mapping (for
    the character set the texts need)."""
    out: dict[str, Any] = {}
    for n, (tag, element) in enumerate(result.items()):
        if element.get("vr") == "SQ":
            for m, item in enumerate(element.get("Value") or ()):
                for sub, value in _flat(item).items():
                    out[f"{n}.{m}.{sub}"] = value
        else:
            out[tag] = element
    return out


class WorklistFind:
    """The Modality Worklist C-FIND of one node."""

    def __init__(self, archive: Archive, settings: Settings, audit: DimseAudit) -> None:
        self.archive = archive
        self.settings = settings
        self.audit = audit

    def extended(self, info: bytes) -> bytes:
        """The reply to SOP Class Extended Negotiation for this SOP class (PS3.4 K.5; the
        bytes as C.5.1.1.2 numbers them): byte 1 relational queries does not apply to the
        worklist's one level (0); byte 2 combined date-time matching is what the worklist
        always does with the start date and time (1 when offered, :mod:`archive.worklist`);
        byte 3 fuzzy semantic matching of person names and byte 4 timezone query adjustment
        are not supported (0)."""
        reply = bytearray(len(info))
        if len(info) > 1 and info[1] == 1:
            reply[1] = 1
        return bytes(reply)

    def handle_find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        sop_class = str(event.request.AffectedSOPClassUID)
        identifier: Dataset | None = None
        try:
            identifier = event.identifier
            keys = worklist_keys(identifier)
        except QueryError as exc:
            self.audit.queried(event.assoc, sop_class, identifier, failed=str(exc))
            yield _failure(STATUS_IDENTIFIER_MISMATCH, str(exc))
            return
        except Exception as exc:
            log.warning("worklist C-FIND identifier cannot be decoded", extra={"err": str(exc)})
            self.audit.queried(event.assoc, sop_class, None, failed="identifier cannot be decoded")
            yield _failure(STATUS_UNABLE_TO_PROCESS, f"identifier cannot be decoded: {exc}")
            return
        query = worklist_query(
            keys,
            case_insensitive_pn=self.settings.query_case_insensitive_pn,
            max_matches=self.settings.query_max_matches,
        )
        request_charset = identifier.get("SpecificCharacterSet")
        started = time.perf_counter()
        failed: str | None = None
        try:
            matches = find_worklist(self.archive.db, query)
            unsupported = matches.unsupported
            pending = STATUS_PENDING_OPTIONAL_KEYS_UNSUPPORTED if unsupported else STATUS_PENDING
            for result in matches.items:
                if event.is_cancelled or not event.assoc.is_established:
                    yield STATUS_CANCEL, None
                    return
                charset = _response_charset(request_charset, _flat(result))
                if charset:
                    result["00080005"] = {"vr": "CS", "Value": charset.split("\\")}
                yield pending, Dataset.from_json(result)
        except QueryError as exc:
            failed = str(exc)
            yield _failure(STATUS_IDENTIFIER_MISMATCH, str(exc))
        except TooManyMatches as exc:
            failed = str(exc)
            yield _failure(STATUS_OUT_OF_RESOURCES, str(exc))
        except Exception as exc:
            log.exception("worklist C-FIND failed")
            failed = f"query failed: {type(exc).__name__}"
            yield _failure(STATUS_UNABLE_TO_PROCESS, failed)
        finally:
            observe_query("C-FIND", "WORKLIST", time.perf_counter() - started)
            self.audit.queried(event.assoc, sop_class, identifier, failed=failed)
