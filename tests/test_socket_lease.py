"""SocketLease reads whole PDUs out of large socket reads, and gives the DUL every byte it read
and did not use, in order, when the socket goes back."""

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


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


class _FakeDul:
    """What SocketLease uses of a DUL: the decoder, the received-PDU and event queues, the
    state and the network idle timer."""

    def __init__(self) -> None:
        self._recv_pdu: queue.Queue[Any] = queue.Queue()
        self.event_queue: queue.Queue[str] = queue.Queue()
        self.assoc = SimpleNamespace(network_timeout=5)
        self.state_machine = SimpleNamespace(current_state="Sta6")
        self._idle_timer = Timer(5)

    def _decode_pdu(self, data: bytearray) -> tuple[bytes, str]:
        return bytes(data), f"Evt-{data[0]}"


def _leased(sock: socket.socket) -> tuple[SocketLease, _FakeDul]:
    dul = _FakeDul()
    lease = SocketLease(dul)  # type: ignore[arg-type]
    lease.socket = sock
    lease.holder = threading.current_thread()
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
