"""C-STORE requests and responses and pending C-FIND responses sent as prebuilt P-DATA-TF PDUs
(PS3.8 9.3.5, PS3.7 9.3.1.1).

pynetdicom turns every fragment of a message into its own P-DATA primitive, queues it for the
DUL thread, runs the state machine and encodes a PDU for it: at a peer's 16 KB maximum PDU
length a 512 KB CT slice is 32 trips through that machinery in Python. Sending the stored
files of a C-GET, C-MOVE or a forward job is dominated by it.

Here a C-STORE request (command set and data set) is encoded once into the finished byte
stream of all its PDUs and handed to the DUL as a single queued item, which the DUL writes with
one socket send. It still goes through the DUL queue and state machine, so ordering with other
messages (a C-GET's pending responses) and the association state are exactly as before. Every
other message, and data sets too large to build in memory, take pynetdicom's own path.
"""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import pynetdicom.fsm
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

#: Data sets larger than this go through pynetdicom's streaming path instead.
MAX_PREBUILT = 64 * 1024 * 1024
#: PDV size when the peer sets no maximum PDU length (0 = unlimited, PS3.8 D.1).
UNLIMITED_FRAGMENT = 4 * 1024 * 1024


class PrebuiltPData(P_DATA):
    """A P-DATA request whose PDUs are already encoded."""

    def __init__(self, encoded: bytes) -> None:
        super().__init__()
        self.encoded = encoded


def _p_data_tf(primitive: P_DATA | None = None) -> P_DATA_TF:
    """What pynetdicom's state machine builds for a P-DATA request: for a prebuilt one, a
    P-DATA-TF PDU that encodes to the prebuilt bytes (its type stays P_DATA_TF, which
    pynetdicom's own event handlers dispatch on)."""
    if isinstance(primitive, PrebuiltPData):
        pdu = P_DATA_TF()
        encoded = primitive.encoded
        pdu.encode = lambda: encoded  # type: ignore[method-assign]
        return pdu
    return P_DATA_TF(primitive)


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _element(tag: int, value: bytes) -> bytes:
    # Implicit VR Little Endian (PS3.7 6.3.1: command sets always are).
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def c_store_command(primitive: C_STORE) -> bytes:
    """The C-STORE-RQ command set (PS3.7 Table 9.3-1) of a primitive, encoded."""
    return c_store_request_command(
        str(primitive.AffectedSOPClassUID),
        str(primitive.AffectedSOPInstanceUID),
        message_id=int(primitive.MessageID or 1),
        priority=int(primitive.Priority or 0),
        originator_ae_title=primitive.MoveOriginatorApplicationEntityTitle,
        originator_message_id=primitive.MoveOriginatorMessageID,
    )


def c_store_request_command(
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    message_id: int,
    priority: int,
    originator_ae_title: str | bytes | None = None,
    originator_message_id: int | None = None,
) -> bytes:
    """The C-STORE-RQ command set (PS3.7 Table 9.3-1), encoded."""
    elements = [
        _element(0x00000002, _ui(sop_class_uid)),
        _element(0x00000100, struct.pack("<H", 0x0001)),  # Command Field: C-STORE-RQ
        _element(0x00000110, struct.pack("<H", message_id)),
        _element(0x00000700, struct.pack("<H", priority)),
        _element(0x00000800, struct.pack("<H", 0x0000)),  # a data set follows
        _element(0x00001000, _ui(sop_instance_uid)),
    ]
    if originator_ae_title:
        title = (
            originator_ae_title.decode()
            if isinstance(originator_ae_title, bytes)
            else str(originator_ae_title)
        ).strip()
        raw = title.encode("ascii") + (b" " if len(title) % 2 else b"")
        elements.append(_element(0x00001030, raw))
    if originator_message_id is not None:
        elements.append(_element(0x00001031, struct.pack("<H", int(originator_message_id))))
    body = b"".join(elements)
    return _element(0x00000000, struct.pack("<L", len(body))) + body


#: The elements a C-STORE-RSP without optional status fields carries (PS3.7 Table 9.3-2).
_PLAIN_STORE_RESPONSE_TAGS = frozenset(
    (0x00000000, 0x00000002, 0x00000100, 0x00000120, 0x00000800, 0x00000900, 0x00001000)
)


def command_elements(
    command: bytes | memoryview, allowed: frozenset[int]
) -> dict[int, bytes] | None:
    """The values of a command set's elements by tag (Implicit VR Little Endian, PS3.7 6.3.1);
    None when it holds a tag outside ``allowed``, a tag twice, or is cut short."""
    values: dict[int, bytes] = {}
    offset, end = 0, len(command)
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = struct.unpack_from("<HHL", command, offset)
        tag = group << 16 | element
        offset += 8
        if tag not in allowed or tag in values or offset + length > end:
            return None
        values[tag] = bytes(command[offset : offset + length])
        offset += length
    return values


def plain_store_response_status(pdu: bytes, message_id: int) -> int | None:
    """The Status of a C-STORE-RSP to ``message_id`` that arrives as one P-DATA-TF PDU with
    one command PDV and carries no optional status elements (ErrorComment, OffendingElement);
    None for anything else, which then takes pynetdicom's full decoding."""
    # P-DATA-TF (PS3.8 9.3.5): type 0x04, reserved, length; one PDV item: length, context ID,
    # message control header 0x03 (command, last fragment).
    if len(pdu) < 12 or pdu[0] != 0x04:
        return None
    pdu_length = int.from_bytes(pdu[2:6], "big")
    item_length = int.from_bytes(pdu[6:10], "big")
    if pdu_length != len(pdu) - 6 or item_length != pdu_length - 4 or pdu[11] & 0x03 != 0x03:
        return None
    values = command_elements(memoryview(pdu)[12:], _PLAIN_STORE_RESPONSE_TAGS)
    if values is None:
        return None
    try:
        fields = {
            tag: struct.unpack("<H", values[tag])[0]
            for tag in (0x00000100, 0x00000120, 0x00000800, 0x00000900)
        }
    except (KeyError, struct.error):
        return None
    if (
        fields[0x00000100] != 0x8001  # C-STORE-RSP
        or fields[0x00000120] != message_id
        or fields[0x00000800] != 0x0101  # no data set
    ):
        return None
    return int(fields[0x00000900])


def pdata_pdus(
    context_id: int, command: bytes, data: bytes | memoryview | None, max_pdu_length: int
) -> bytes:
    """Command and data set fragments, one PDV per P-DATA-TF PDU (PS3.8 9.3.5, E.2); no data
    set fragments when ``data`` is None (a message without a data set)."""
    room = max_pdu_length - 6 if max_pdu_length else UNLIMITED_FRAGMENT
    parts: list[bytes] = []
    payloads = [(memoryview(command), True)]
    if data is not None:
        payloads.append((memoryview(data), False))
    for payload, is_command in payloads:
        total = len(payload)
        offset = 0
        while True:
            fragment = payload[offset : offset + room]
            offset += len(fragment)
            last = offset >= total
            header = (0x01 if is_command else 0x00) | (0x02 if last else 0x00)
            item_length = len(fragment) + 2
            parts.append(
                struct.pack(">BBLLBB", 0x04, 0x00, item_length + 4, item_length, context_id, header)
            )
            parts.append(fragment)  # type: ignore[arg-type]
            if last:
                break
    return b"".join(parts)


def _data_set(primitive: C_STORE) -> bytes | None:
    path_offset: Any = getattr(primitive, "_dataset_path", None)
    if path_offset is not None:
        path, offset = path_offset
        size = Path(path).stat().st_size - offset
        if size > MAX_PREBUILT:
            return None
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read()
    stream = primitive.DataSet
    if isinstance(stream, BytesIO):
        data = stream.getvalue()
        return data if len(data) <= MAX_PREBUILT else None
    return None


_original_send_msg = DIMSEServiceProvider.send_msg


#: Command Field of the responses of PS3.7 9.3.2-9.3.4.
_RESPONSE_COMMAND_FIELDS = {C_FIND: 0x8020, C_GET: 0x8010, C_MOVE: 0x8021}
#: Sub-operation counters of C-GET and C-MOVE responses (PS3.7 Tables 9.3-4, 9.3-6).
_COUNTERS = (
    (0x00001020, "NumberOfRemainingSuboperations"),
    (0x00001021, "NumberOfCompletedSuboperations"),
    (0x00001022, "NumberOfFailedSuboperations"),
    (0x00001023, "NumberOfWarningSuboperations"),
)


def query_response_command(primitive: C_FIND | C_GET | C_MOVE, *, identifier: bool) -> bytes:
    """A C-FIND, C-GET or C-MOVE response command set (PS3.7 Tables 9.3-3, 9.3-4, 9.3-6),
    with the elements pynetdicom would write for the same primitive, encoded."""
    parts = []
    if primitive.AffectedSOPClassUID is not None:
        parts.append(_element(0x00000002, _ui(str(primitive.AffectedSOPClassUID))))
    parts += [
        _element(0x00000100, struct.pack("<H", _RESPONSE_COMMAND_FIELDS[type(primitive)])),
        _element(0x00000120, struct.pack("<H", int(primitive.MessageIDBeingRespondedTo or 0))),
        # Command Data Set Type: 0x0000 an identifier follows, 0x0101 none does.
        _element(0x00000800, struct.pack("<H", 0x0000 if identifier else 0x0101)),
        _element(0x00000900, struct.pack("<H", int(primitive.Status or 0))),
    ]
    if not isinstance(primitive, C_FIND):
        for tag, name in _COUNTERS:
            value = getattr(primitive, name)
            if value is not None:
                parts.append(_element(tag, struct.pack("<H", int(value))))
    body = b"".join(parts)
    return _element(0x00000000, struct.pack("<L", len(body))) + body


def c_find_pending_command(primitive: C_FIND) -> bytes:
    """A pending C-FIND-RSP command set (PS3.7 Table 9.3-3), encoded."""
    return query_response_command(primitive, identifier=True)


def _plain_query_response(primitive: Any) -> bool:
    """A C-FIND, C-GET or C-MOVE response without an identifier, ErrorComment or
    OffendingElement (those take pynetdicom's path)."""
    return (
        type(primitive) in _RESPONSE_COMMAND_FIELDS
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status is not None
        and primitive.Identifier is None
        and primitive.ErrorComment is None
        and primitive.OffendingElement is None
    )


def c_store_response_command(primitive: C_STORE) -> bytes:
    """A C-STORE-RSP command set without a data set (PS3.7 Table 9.3-2), encoded."""
    return c_store_response(
        str(primitive.AffectedSOPClassUID),
        str(primitive.AffectedSOPInstanceUID),
        message_id=int(primitive.MessageIDBeingRespondedTo or 0),
        status=int(primitive.Status or 0),
    )


def c_store_response(
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    message_id: int,
    status: int,
    error_comment: str = "",
) -> bytes:
    """The C-STORE-RSP command set (PS3.7 Table 9.3-2), encoded in the order and form
    pynetdicom gives it."""
    elements = [
        _element(0x00000002, _ui(sop_class_uid)),
        _element(0x00000100, struct.pack("<H", 0x8001)),  # Command Field: C-STORE-RSP
        _element(0x00000120, struct.pack("<H", message_id)),
        _element(0x00000800, struct.pack("<H", 0x0101)),  # no data set follows
        _element(0x00000900, struct.pack("<H", status)),
    ]
    if error_comment:
        # Error Comment (0000,0902), LO: at most 64 characters, padded with a space.
        raw = error_comment[:64].encode("ascii", "replace")
        elements.append(_element(0x00000902, raw + b" " if len(raw) % 2 else raw))
    elements.append(_element(0x00001000, _ui(sop_instance_uid)))
    body = b"".join(elements)
    return _element(0x00000000, struct.pack("<L", len(body))) + body


def _plain_store_response(primitive: Any) -> bool:
    """A C-STORE-RSP carrying only the fields every response has (no ErrorComment or
    OffendingElement: those take pynetdicom's path)."""
    return (
        isinstance(primitive, C_STORE)
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status is not None
        and primitive.AffectedSOPClassUID is not None
        and primitive.AffectedSOPInstanceUID is not None
        and primitive.ErrorComment is None
        and primitive.OffendingElement is None
    )


def _send_prebuilt(dimse: DIMSEServiceProvider, encoded: bytes, *, response: bool) -> None:
    """Queue finished PDUs for the DUL, or, when this thread holds the DUL's socket (see
    dicom_node.reactor.SocketLease) and the message is a response (nothing comes back for
    it), write them to the socket. A request gives the socket back first: pynetdicom's
    caller waits for its response from the DUL."""
    lease = getattr(dimse.dul, "_pb_lease", None)
    if lease is not None and lease.held_here and response:
        try:
            lease.send(encoded)
        except OSError:
            lease.release(connection_lost=True)
        return
    dimse.dul.send_pdu(PrebuiltPData(encoded))


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    if (
        isinstance(primitive, C_FIND)
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status in (0xFF00, 0xFF01)
        and isinstance(primitive.Identifier, BytesIO)
    ):
        # Pending responses carry one identifier each: the bulk of a large C-FIND.
        command = c_find_pending_command(primitive)
        identifier = primitive.Identifier.getvalue()
        _send_prebuilt(
            self,
            pdata_pdus(context_id, command, identifier, self.maximum_pdu_size),
            response=True,
        )
        return
    if _plain_query_response(primitive):
        # Final C-FIND responses; pending and final C-GET/C-MOVE responses (one per
        # sub-operation).
        command = query_response_command(primitive, identifier=False)
        _send_prebuilt(
            self, pdata_pdus(context_id, command, None, self.maximum_pdu_size), response=True
        )
        return
    if _plain_store_response(primitive):
        # One per stored instance: what a modality waits for before it sends the next.
        command = c_store_response_command(primitive)
        _send_prebuilt(
            self, pdata_pdus(context_id, command, None, self.maximum_pdu_size), response=True
        )
        return
    if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is None:
        data = _data_set(primitive)
        if data is not None:
            command = c_store_command(primitive)
            _send_prebuilt(
                self, pdata_pdus(context_id, command, data, self.maximum_pdu_size), response=False
            )
            return
    _original_send_msg(self, primitive, context_id)


def install() -> None:
    """Route C-STORE requests of every association in this process through the fast path
    (part of ``dicom_node.patches.install()``)."""
    pynetdicom.fsm.P_DATA_TF = _p_data_tf  # type: ignore[misc,assignment]
    DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
