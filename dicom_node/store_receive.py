"""C-STORE requests received over a leased socket, past pynetdicom's receive path.

A modality sends an association's instances one after another: for each a C-STORE-RQ command
set and the data set in P-DATA-TF PDUs (PS3.8 9.3.5), then it waits for the C-STORE-RSP.
Through pynetdicom every PDU is decoded into objects and passes the state machine, the command
set is decoded by pydicom, the message is handed from the DUL thread to the association thread
and the response back the same way: for small instances that costs more CPU than storing them.

Once an association has served a C-STORE through pynetdicom, its association thread borrows
the socket (:class:`dicom_node.reactor.SocketLease`) and reads the next requests itself: it
splits each PDU into its PDVs (PS3.8 9.3.5.1, E.2), decodes the command set (Implicit VR Little
Endian, PS3.7 6.3.1), joins the data set fragments, stores the instance through the same
function as the C-STORE handler and writes the C-STORE-RSP (PS3.7 9.3.1.2).

Anything else goes to pynetdicom untouched, together with the socket: the first PDU of any
other message (a C-ECHO, a C-FIND, a command set split over several PDUs, an unknown context),
an A-RELEASE-RQ, an A-ABORT. The socket also goes back when the peer has been silent for
``HOLD_IDLE`` seconds, when something is queued for the DUL (an abort from another thread) and
when the association ends. An association with a handler bound to PDU or DIMSE message events
(pynetdicom's debug logging) never takes this path.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dicom_node.pdata import c_store_response, command_elements, pdata_pdus

log = logging.getLogger(__name__)

#: The socket goes back to pynetdicom after this many seconds without a PDU (seconds).
HOLD_IDLE = 0.5
#: How long one wait for the next PDU lasts before the loop looks at its association again.
POLL = 0.05

#: Events whose handlers see every PDU or message: with any bound, pynetdicom keeps the socket.
_WATCHING_EVENTS = (
    evt.EVT_PDU_RECV,
    evt.EVT_PDU_SENT,
    evt.EVT_DATA_RECV,
    evt.EVT_DATA_SENT,
    evt.EVT_DIMSE_RECV,
    evt.EVT_DIMSE_SENT,
    evt.EVT_FSM_TRANSITION,
)


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """The fields of a C-STORE-RQ command set (PS3.7 Table 9.3-1) the SCP acts on."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


StoreFunction = Callable[[Association, PresentationContext, StoreRequest, bytes], tuple[int, str]]
"""``(association, context, request, data set) -> (status, error comment or "")``."""

# PS3.7 Table 9.3-1: the elements a C-STORE-RQ may carry.
_REQUEST_TAGS = frozenset(
    (
        0x00000000,  # Command Group Length
        0x00000002,  # Affected SOP Class UID
        0x00000100,  # Command Field
        0x00000110,  # Message ID
        0x00000700,  # Priority
        0x00000800,  # Command Data Set Type
        0x00001000,  # Affected SOP Instance UID
        0x00001030,  # Move Originator Application Entity Title
        0x00001031,  # Move Originator Message ID
    )
)


def parse_store_request(command: bytes | memoryview) -> StoreRequest | None:
    """A C-STORE-RQ command set with a data set following, decoded; None for any other
    command set, or one this reader does not take apart (pynetdicom then does)."""
    values = command_elements(command, _REQUEST_TAGS)
    if values is None:
        return None
    try:
        command_field, message_id, _priority, data_set_type = (
            struct.unpack("<H", values[tag])[0]
            for tag in (0x00000100, 0x00000110, 0x00000700, 0x00000800)
        )
        sop_class_uid = values[0x00000002].rstrip(b"\0 ").decode("ascii")
        sop_instance_uid = values[0x00001000].rstrip(b"\0 ").decode("ascii")
    except (KeyError, struct.error, UnicodeDecodeError):
        return None
    # Command Field 0x0001: C-STORE-RQ; Command Data Set Type 0x0101: no data set follows.
    if command_field != 0x0001 or data_set_type == 0x0101:
        return None
    if not sop_class_uid or not sop_instance_uid:
        return None
    return StoreRequest(message_id, sop_class_uid, sop_instance_uid)


def store_response(request: StoreRequest, status: int, error_comment: str = "") -> bytes:
    """The C-STORE-RSP command set for ``request`` (PS3.7 Table 9.3-2)."""
    return c_store_response(
        request.sop_class_uid,
        request.sop_instance_uid,
        message_id=request.message_id,
        status=status,
        error_comment=error_comment,
    )


def pdvs(pdu: bytes) -> list[tuple[int, int, memoryview]] | None:
    """The (context ID, message control header, fragment) of each PDV of a P-DATA-TF PDU
    (PS3.8 9.3.5, 9.3.5.1); None when ``pdu`` is not one, or is malformed."""
    if len(pdu) < 12 or pdu[0] != 0x04 or int.from_bytes(pdu[2:6], "big") != len(pdu) - 6:
        return None
    view = memoryview(pdu)
    items = []
    offset, end = 6, len(pdu)
    while offset < end:
        if offset + 6 > end:
            return None
        item_length = int.from_bytes(pdu[offset : offset + 4], "big")
        if item_length < 2 or offset + 4 + item_length > end:
            return None
        fragment = view[offset + 6 : offset + 4 + item_length]
        items.append((pdu[offset + 4], pdu[offset + 5], fragment))
        offset += 4 + item_length
    return items


def _store_function(assoc: Association) -> StoreFunction | None:
    """The fast store function of the C-STORE handler bound to ``assoc``, when nothing else
    watches the association's PDUs and messages."""
    handler = assoc.get_handlers(evt.EVT_C_STORE)
    if not isinstance(handler, tuple) or handler[1]:
        return None
    owner = getattr(handler[0], "__self__", None)
    function: StoreFunction | None = getattr(owner, "store_received", None)
    if function is None:
        return None
    if any(assoc.get_handlers(event) for event in _WATCHING_EVENTS):
        return None
    return function


class _Message:
    """One C-STORE-RQ being received: its request, context and data set fragments."""

    __slots__ = ("complete", "context", "context_id", "fragments", "request")

    def __init__(self, context: PresentationContext, request: StoreRequest) -> None:
        self.context = context
        self.context_id = int(context.context_id or 0)
        self.request = request
        self.fragments: list[memoryview] = []
        self.complete = False

    def add(self, items: list[tuple[int, int, memoryview]]) -> bool:
        """Take data set fragments; False for anything a data set cannot contain here."""
        for context_id, header, fragment in items:
            # A command fragment, another context or data after the last fragment: not a
            # message of this association's peer that waits for its response (PS3.8 E.2).
            if self.complete or context_id != self.context_id or header & 0x01:
                return False
            self.fragments.append(fragment)
            self.complete = bool(header & 0x02)
        return True


def _start(
    assoc: Association, pdu: bytes, storage: dict[int, PresentationContext | None]
) -> _Message | None:
    """The C-STORE-RQ a PDU begins, or None when the PDU is for pynetdicom."""
    items = pdvs(pdu)
    if not items:
        return None
    context_id, header, command = items[0]
    if header & 0x03 != 0x03:  # a whole command set in this PDU
        return None
    request = parse_store_request(command)
    if request is None:
        return None
    if context_id not in storage:
        storage[context_id] = _storage_context(assoc, context_id)
    context = storage[context_id]
    if context is None or context.abstract_syntax != request.sop_class_uid:
        return None
    message = _Message(context, request)
    if not message.add(items[1:]):
        return None
    return message


def _storage_context(assoc: Association, context_id: int) -> PresentationContext | None:
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    context = assoc._accepted_cx.get(context_id)
    if context is None or context.abstract_syntax is None:
        return None
    if uid_to_service_class(context.abstract_syntax) is not StorageServiceClass:
        return None
    return context


def serve_stores(assoc: Association) -> None:
    """Receive and store the association's C-STORE requests on its own thread for as long as
    they come (see the module docstring); returns with the socket back with the DUL."""
    store = _store_function(assoc)
    if store is None or not assoc.is_established:
        return
    dul: Any = assoc.dul
    lease = getattr(dul, "_pb_lease", None)  # the socket lease of dicom_node.patches.install()
    if lease is None or not lease.acquire():
        return
    try:
        _receive(assoc, dul, lease, store)
    finally:
        lease.release()


def _receive(assoc: Association, dul: Any, lease: Any, store: StoreFunction) -> None:
    storage: dict[int, PresentationContext | None] = {}
    idle_since = time.monotonic()
    while lease.held_here and assoc.is_established and not assoc._kill:
        if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
            return  # the DUL has work of its own (an abort, say): it needs its socket
        dimse = assoc.dimse
        if dimse.message is not None or not dimse.msg_queue.empty():
            # The DUL read (part of) the next request before it lent the socket: the peer
            # waits for its answer, which comes through pynetdicom.
            return
        pdu = lease.read_pdu(POLL)
        if pdu is None:
            if time.monotonic() - idle_since >= HOLD_IDLE:
                return
            continue
        message = _start(assoc, pdu, storage)
        if message is None:
            lease.release(unhandled_pdu=pdu)
            return
        if not message.complete and not _rest_of(assoc, lease, message):
            return
        status, comment = store(assoc, message.context, message.request, _joined(message))
        command = store_response(message.request, status, comment)
        # The peer's maximum PDU length, as pynetdicom fragments its own messages.
        response = pdata_pdus(message.context_id, command, None, assoc.dimse.maximum_pdu_size)
        try:
            lease.send(response)
        except OSError:
            lease.release(connection_lost=True)
            return
        idle_since = time.monotonic()


def _joined(message: _Message) -> bytes:
    fragments = message.fragments
    return bytes(fragments[0]) if len(fragments) == 1 else b"".join(fragments)


def _rest_of(assoc: Association, lease: Any, message: _Message) -> bool:
    """Read the data set fragments up to the last one; False when the message cannot be
    completed here (the socket has then gone back, or the association was aborted)."""
    timeout = assoc.network_timeout
    waiting_since = time.monotonic()
    while not message.complete:
        pdu = lease.read_pdu(POLL)
        if pdu is None:
            if not lease.held_here or assoc._kill:
                return False  # the connection is gone: the DUL has been told
            if timeout is not None and time.monotonic() - waiting_since > timeout:
                _abort(assoc, lease, message, "data set incomplete after the network timeout")
                return False
            continue
        waiting_since = time.monotonic()
        if pdu[0] != 0x04:
            # An A-ABORT or A-RELEASE-RQ in the middle of a data set: pynetdicom's to handle;
            # the partial data set is dropped, as pynetdicom would drop it.
            lease.release(unhandled_pdu=pdu)
            return False
        items = pdvs(pdu)
        if items is None or not message.add(items):
            _abort(assoc, lease, message, "data set fragments out of order (PS3.8 9.3.5.1)")
            return False
    return True


def _abort(assoc: Association, lease: Any, message: _Message, reason: str) -> None:
    log.warning(
        f"C-STORE {reason}: aborting the association",
        extra={"sop": message.request.sop_instance_uid},
    )
    lease.release()
    assoc.abort()
