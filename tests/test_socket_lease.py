"""SocketLease reads whole PDUs out of large socket reads, and gives the DUL every byte it read
and did not use, in order, when the socket goes back; a PDU header that breaks the limits
(unknown type, longer than announced) goes back to the DUL as an invalid PDU at once."""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from types import SimpleNamespace
from typing import Any

from pynetdicom.timer import Timer

from dicom_node.reactor import SocketLease
from dicom_node.upper_layer import PEER_LOG


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


class _FakeDul:
    """What SocketLease uses of a DUL: the decoder, the received-PDU and event queues, the
    state, the network idle timer and the association's maximum PDU length (ours, as the
    acceptor) and peer address."""

    def __init__(self, maximum_length: int = 0) -> None:
        self._recv_pdu: queue.Queue[Any] = queue.Queue()
        self.event_queue: queue.Queue[str] = queue.Queue()
        self.assoc = SimpleNamespace(
            network_timeout=5,
            is_acceptor=True,
            is_requestor=False,
            acceptor=SimpleNamespace(maximum_length=maximum_length),
            requestor=SimpleNamespace(address_info=SimpleNamespace(address="192.0.2.7")),
        )
        self.state_machine = SimpleNamespace(current_state="Sta6")
        self._idle_timer = Timer(5)

    def _decode_pdu(self, data: bytearray) -> tuple[bytes, str]:
        return bytes(data), f"Evt-{data[0]}"


def _leased(sock: socket.socket, maximum_length: int = 0) -> tuple[SocketLease, _FakeDul]:
    dul = _FakeDul(maximum_length)
    lease = SocketLease(dul)  # type: ignore[arg-type]
    lease._hold(sock)  # as acquire() does once the DUL grants it
    return lease, dul


def test_pdus_out_of_one_read_and_the_rest_handed_back_in_order():
    ours, peer = socket.socketpair()
    try:
        first = _pdu(4, b"\x00\x00\x00\x03\x01\x03cmd")
        second = _pdu(4, b"x" * 300_000)  # larger than one read
        echo = _pdu(4, b"\x00\x00\x00\x03\x03\x03echo")
        release = _pdu(5, b"\x00" * 4)
        # The last PDU only in part; from a thread, as it is more than the socket buffers.
        sender = threading.Thread(target=peer.sendall, args=(first + second + echo + release[:3],))
        sender.start()
        lease, dul = _leased(ours)
        assert lease.read_pdu(1.0) == first
        assert lease.read_pdu(1.0) == second
        sender.join()  # the rest is waiting in the socket: the next read takes all of it
        assert lease.read_pdu(1.0) == echo  # not for the holder: it hands it back
        threading.Timer(0.2, peer.sendall, args=(release[3:],)).start()
        lease.release(unhandled_pdu=echo)
        handed = [dul._recv_pdu.get_nowait() for _ in range(dul._recv_pdu.qsize())]
        assert handed == [echo, release]
        events = [dul.event_queue.get_nowait() for _ in range(dul.event_queue.qsize())]
        assert events == ["Evt-4", "Evt-5"]
        assert lease.holder is None and lease.socket is None
    finally:
        ours.close()
        peer.close()


def test_silence_then_a_closed_connection():
    ours, peer = socket.socketpair()
    try:
        lease, dul = _leased(ours)
        started = time.monotonic()
        assert lease.read_pdu(0.1) is None  # silent: the lease is kept
        assert time.monotonic() - started >= 0.1
        assert lease.holder is threading.current_thread()
        peer.sendall(_pdu(4, b"abc")[:5])
        peer.close()
        assert lease.read_pdu(1.0) is None  # closed in the middle of a PDU
        assert lease.holder is None
        assert dul.event_queue.get_nowait() == "Evt17"
    finally:
        ours.close()


def _drained(q: queue.Queue[Any]) -> list[Any]:
    return [q.get_nowait() for _ in range(q.qsize())]


def test_a_pdu_longer_than_announced_goes_back_at_its_header(caplog):
    """PS3.8 D.1: we told the peer we receive P-DATA-TF PDUs of at most 16,384 bytes. One that
    says it is longer is not waited for: the socket goes back with an invalid PDU (Evt19, an
    A-ABORT with reason 6, invalid PDU parameter value), and nothing of it is decoded."""
    PEER_LOG.reset()  # one line a minute per address
    ours, peer = socket.socketpair()
    try:
        lease, dul = _leased(ours, maximum_length=16384)
        fits = _pdu(4, b"\x00\x00\x00\x03\x01\x03cmd")
        peer.sendall(fits + struct.pack(">BBL", 4, 0, 16385) + b"x" * 100)
        assert lease.read_pdu(1.0) == fits
        started = time.monotonic()
        assert lease.read_pdu(5.0) is None
        assert time.monotonic() - started < 4.0  # at once, not after a network timeout
        assert lease.holder is None and lease.socket is None
        assert _drained(dul.event_queue) == ["Evt19"]
        assert _drained(dul._recv_pdu) == []
        assert dul._pb_unframed is True  # type: ignore[attr-defined]
        assert dul._pb_abort_reason == 0x06  # type: ignore[attr-defined]
        (record,) = [r for r in caplog.records if r.getMessage() == "invalid PDU from a DICOM peer"]
        assert record.peer == "192.0.2.7"
        assert (
            record.reason
            == "P-DATA-TF of 16385 bytes, longer than the negotiated 16384 (PS3.8 D.1)"
        )
    finally:
        ours.close()
        peer.close()


def test_an_unknown_pdu_type_goes_back_as_unrecognised():
    ours, peer = socket.socketpair()
    try:
        lease, dul = _leased(ours)
        peer.sendall(b"\xff" * 20)
        assert lease.read_pdu(1.0) is None
        assert lease.holder is None
        assert _drained(dul.event_queue) == ["Evt19"]
        assert dul._pb_abort_reason == 0x01  # type: ignore[attr-defined]
    finally:
        ours.close()
        peer.close()


def test_a_short_pdu_type_cannot_claim_a_long_body():
    """An A-RELEASE-RQ is 10 bytes (PS3.8 9.3.6): one that says 100,000 is not read."""
    ours, peer = socket.socketpair()
    try:
        lease, dul = _leased(ours)
        peer.sendall(struct.pack(">BBL", 5, 0, 100_000) + bytes(4))
        assert lease.read_pdu(1.0) is None
        assert _drained(dul.event_queue) == ["Evt19"]
        assert dul._pb_abort_reason == 0x06  # type: ignore[attr-defined]
    finally:
        ours.close()
        peer.close()


def test_pdus_before_an_invalid_one_reach_the_dul_first():
    """Whole PDUs read ahead of a header that breaks the limits are handed over in order, then
    the invalid PDU; when the socket goes back for another reason (release)."""
    ours, peer = socket.socketpair()
    try:
        lease, dul = _leased(ours, maximum_length=16384)
        echo = _pdu(4, b"\x00\x00\x00\x03\x03\x03echo")
        peer.sendall(echo + struct.pack(">BBL", 4, 0, 1 << 20) + bytes(10))
        assert lease.read_pdu(1.0) == echo
        lease.release(unhandled_pdu=echo)
        assert _drained(dul._recv_pdu) == [echo]
        assert _drained(dul.event_queue) == ["Evt-4", "Evt19"]
    finally:
        ours.close()
        peer.close()
