"""A minimal C-FIND SCU on a plain socket, for timing servers rather than the client.

pynetdicom's SCU spends about a millisecond of Python on each C-FIND response it receives
(reactor hand-overs, PDU and message decoding, a Dataset per identifier): on a 1,000-match query
that is more than either server under test needs, so the benchmark would mostly time the
client. This one speaks just enough of the upper layer (PS3.8 9.3: A-ASSOCIATE, P-DATA-TF,
A-RELEASE) and of DIMSE (PS3.7 9.1.2: C-FIND-RQ/RSP) to send a request and read every
response: it checks each response's status and counts the identifiers without decoding them.
"""

from __future__ import annotations

import socket
import struct

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1506.1.99"
MAX_PDU_LENGTH = 1 << 20
PENDING = (0xFF00, 0xFF01)


class DimseClientError(Exception):
    pass


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _ae(title: str) -> bytes:
    return title.encode("ascii")[:16].ljust(16, b" ")


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _command_value(command: bytes, wanted: int) -> int | None:
    """A US value of an Implicit VR Little Endian command set (PS3.7 6.3.1)."""
    offset = 0
    while offset + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHL", command, offset)
        offset += 8
        if (group << 16) | elem == wanted and length == 2:
            return int(struct.unpack_from("<H", command, offset)[0])
        offset += length
    return None


class FindSCU:
    """One association with one presentation context (Explicit VR Little Endian)."""

    def __init__(self, host: str, port: int, called: str, calling: str, sop_class: str) -> None:
        self.sop_class = sop_class
        self.message_id = 0
        self.sock = socket.create_connection((host, port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()
        context = _item(
            0x20,
            bytes([1, 0, 0, 0])
            + _item(0x30, sop_class.encode("ascii"))
            + _item(0x40, EXPLICIT_VR_LITTLE_ENDIAN.encode("ascii")),
        )
        user = _item(
            0x50,
            _item(0x51, struct.pack(">L", MAX_PDU_LENGTH))
            + _item(0x52, IMPLEMENTATION_CLASS_UID.encode("ascii")),
        )
        body = (
            struct.pack(">HH", 1, 0)
            + _ae(called)
            + _ae(calling)
            + bytes(32)
            + _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
            + context
            + user
        )
        self.sock.sendall(struct.pack(">BBL", 0x01, 0, len(body)) + body)
        kind, pdu = self._read_pdu()
        if kind != 0x02:
            raise DimseClientError(f"association not accepted (PDU type 0x{kind:02X})")
        self.peer_max_pdu = 0
        offset = 68  # after the fixed fields (PS3.8 Table 9-17)
        accepted = False
        while offset + 4 <= len(pdu):
            item_type, _, length = struct.unpack_from(">BBH", pdu, offset)
            payload = pdu[offset + 4 : offset + 4 + length]
            if item_type == 0x21 and payload[0] == 1:
                accepted = payload[2] == 0
            elif item_type == 0x50:
                sub = 0
                while sub + 4 <= len(payload):
                    sub_type, _, sub_length = struct.unpack_from(">BBH", payload, sub)
                    if sub_type == 0x51:
                        (self.peer_max_pdu,) = struct.unpack_from(">L", payload, sub + 4)
                    sub += 4 + sub_length
            offset += 4 + length
        if not accepted:
            self.sock.close()
            raise DimseClientError("the C-FIND presentation context was rejected")

    def _read_exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = self.sock.recv(max(65536, size - len(self._buffer)))
            if not chunk:
                raise DimseClientError("the server closed the connection")
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _read_pdu(self) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBL", self._read_exact(6))
        return kind, self._read_exact(length)

    def _send_message(self, command: bytes, data: bytes) -> None:
        room = (self.peer_max_pdu or MAX_PDU_LENGTH) - 6
        pdus = []
        for payload, control in ((command, 0x01), (data, 0x00)):
            for start in range(0, len(payload), room):
                fragment = payload[start : start + room]
                last = 0x02 if start + room >= len(payload) else 0x00
                pdv = struct.pack(">LBB", len(fragment) + 2, 1, control | last) + fragment
                pdus.append(struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv)
        self.sock.sendall(b"".join(pdus))

    @staticmethod
    def encode(identifier: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_dataset(fp, identifier)
        return bytes(fp.getvalue())

    def find(self, identifier: bytes) -> tuple[int, int]:
        """Send a C-FIND-RQ with an encoded identifier; (final status, identifiers received)."""
        self.message_id = self.message_id % 0xFFFF + 1
        body = b"".join(
            (
                _element(0x00000002, _ui(self.sop_class)),
                _element(0x00000100, struct.pack("<H", 0x0020)),  # C-FIND-RQ
                _element(0x00000110, struct.pack("<H", self.message_id)),
                _element(0x00000700, struct.pack("<H", 0)),  # MEDIUM priority
                _element(0x00000800, struct.pack("<H", 0)),  # an identifier follows
            )
        )
        command = _element(0x00000000, struct.pack("<L", len(body))) + body
        self._send_message(command, identifier)
        matches = 0
        command_parts: list[bytes] = []
        status: int | None = None
        expect_data = False
        while True:
            kind, pdu = self._read_pdu()
            if kind != 0x04:
                raise DimseClientError(f"unexpected PDU type 0x{kind:02X} during C-FIND")
            offset = 0
            while offset < len(pdu):
                (length,) = struct.unpack_from(">L", pdu, offset)
                control = pdu[offset + 5]
                fragment = pdu[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & 0x01:  # command
                    command_parts.append(fragment)
                    if control & 0x02:
                        received = b"".join(command_parts)
                        command_parts = []
                        status = _command_value(received, 0x00000900)
                        data_type = _command_value(received, 0x00000800)
                        expect_data = data_type is not None and data_type != 0x0101
                        if status is None:
                            raise DimseClientError("a C-FIND response without a status")
                        if not expect_data and status not in PENDING:
                            return status, matches
                elif control & 0x02:  # last fragment of an identifier
                    if not expect_data:
                        raise DimseClientError("an identifier no command announced")
                    expect_data = False
                    if status in PENDING:
                        matches += 1
                    else:
                        return int(status or 0), matches

    def release(self) -> None:
        try:
            self.sock.sendall(struct.pack(">BBL", 0x05, 0, 4) + bytes(4))
            self._read_pdu()
        except (OSError, DimseClientError, struct.error):
            pass
        finally:
            self.sock.close()
