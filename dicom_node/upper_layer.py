"""The DICOM Upper Layer protocol (PS3.8 9) where a peer can break it: reading PDUs off the
connection, and accepting or refusing an A-ASSOCIATE-RQ.

pynetdicom reads a PDU by blocking on the socket until as many bytes as its header announces
have come (``DULServiceProvider._read_pdu_data``): a peer that announces 4 GiB, or stops inside
a PDU, holds the DUL thread (and the connection) for good, out of reach of the ARTIM timer.
It then turns an A-ASSOCIATE-RQ into a primitive (PS3.8 9.2, action AE-6) without checking
what PS3.8 9.3.2 requires of it; an even presentation context ID raises inside the state
machine, a presentation context without a transfer syntax inside negotiation, and either left
the connection open with no answer. Here:

- :func:`read_pdu_data` reads each PDU against a deadline: the ARTIM timer (PS3.8 9.1.5) while
  one is running (Sta2, Sta13), the network timeout otherwise; refuses lengths no PDU of its
  type may have before reading them; and reports a PDU it cannot frame or decode as an invalid
  PDU (Evt19), after which the rest of the byte stream is dropped unread (it has no PDU
  boundaries any more) until the connection closes. A PDU the current state has no place for
  is logged too (the state machine aborts: AA-1, AA-8).
- :func:`ae_6` is AE-6 with the checks of PS3.8 9.3.2: a request the DUL can decode but must
  refuse gets an A-ASSOCIATE-RJ (PS3.8 9.3.4), as the state machine provides for.
- :func:`aa_8` is AA-8 with the reason PS3.8 9.3.8 gives for what was received (an
  unrecognised PDU, an unexpected one, an invalid parameter value) instead of none.
- Each such peer is logged on one line, at most once a minute per address (:data:`PEER_LOG`).

Sockets are waited on with ``poll`` (:func:`wait_readable`), which takes descriptors of any
number; ``select`` refuses those from 1024 on.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_items import (
    AbstractSyntaxSubItem,
    ApplicationContextItem,
    PresentationContextItemRQ,
    TransferSyntaxSubItem,
    UserIdentitySubItemRQ,
    UserInformationItem,
)
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_P_ABORT

log = logging.getLogger(__name__)

#: The one application context name of DICOM (PS3.7 A.2.1).
DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: The largest A-ASSOCIATE-RQ/AC read. Its items have 16-bit lengths and there are at most
#: 128 presentation contexts: 128 contexts of 30 transfer syntaxes each, their role selections
#: and a 64 KiB user identity come to less than 200 KiB.
MAX_ASSOCIATION_PDU_LENGTH = 1024 * 1024
#: A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT have a fixed length (PS3.8 9.3.4, 9.3.6-9.3.8);
#: anything much longer is not one.
MAX_SHORT_PDU_LENGTH = 1024
#: Bytes asked of the socket per read.
CHUNK = 256 * 1024
#: How often a read that waits looks whether its DUL was killed (seconds).
WAKE_INTERVAL = 0.25

PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
#: States in which the ARTIM timer runs (PS3.8 9.1.5, 9.2).
_ARTIM_STATES = ("Sta2", "Sta13")

# The reason/diag. of an A-ABORT from the service provider (PS3.8 9.3.8, Table 9-26).
ABORT_REASON_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER_VALUE = 0x06


class PeerLog:
    """One warning line per peer address and ``interval``; the lines left out are counted in
    the next one (``suppressed``)."""

    def __init__(self, interval: float = 60.0, max_addresses: int = 4096) -> None:
        self.interval = interval
        self.max_addresses = max_addresses
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # address -> (last logged, left out)

    def warning(self, address: str, message: str, **extra: Any) -> bool:
        """Log ``message`` for ``address`` unless it was logged less than ``interval`` ago;
        True when logged."""
        now = time.monotonic()
        with self._lock:
            last, left_out = self._last.get(address, (-self.interval, 0))
            if now - last < self.interval:
                self._last[address] = (last, left_out + 1)
                return False
            if len(self._last) >= self.max_addresses:
                self._last = {a: v for a, v in self._last.items() if now - v[0] < self.interval}
                if len(self._last) >= self.max_addresses:
                    self._last.clear()
            self._last[address] = (now, 0)
        if left_out:
            extra["suppressed"] = left_out
        for key, value in extra.items():
            if isinstance(value, str):  # one line, whatever a peer put in it
                extra[key] = " ".join(value.split())
        log.warning(message, extra={"peer": address, **extra})
        return True

    def reset(self) -> None:
        with self._lock:
            self._last.clear()


#: Malformed input from DICOM peers, logged once a minute per address.
PEER_LOG = PeerLog()


def peer_address(dul: DULServiceProvider) -> str:
    assoc = dul.assoc
    remote = assoc.acceptor if assoc.is_requestor else assoc.requestor
    info = remote.address_info
    return info.address if info is not None else "unknown"


def _warn(dul: DULServiceProvider, message: str, **extra: Any) -> None:
    PEER_LOG.warning(peer_address(dul), message, **extra)


# --- reading PDUs (PS3.8 9.3.1) --------------------------------------------------------------
class _Closed(Exception):
    """The peer closed the connection (or it broke); ``received`` bytes of the read came."""

    def __init__(self, received: int) -> None:
        super().__init__(received)
        self.received = received


class _Stalled(Exception):
    """No byte came before the read's deadline."""


_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


def _idle_timeout(dul: DULServiceProvider, state: str) -> float | None:
    """Seconds a read may wait for its next byte."""
    artim = dul.artim_timer
    if state in _ARTIM_STATES and artim.timeout is not None:
        return max(0.0, artim.remaining) + 0.001  # so that the timer has expired by then
    timeout = dul.assoc.network_timeout
    return float(timeout) if timeout is not None else None


def _recv_now(sock: socket.socket, size: int) -> bytes | None:
    """What the socket holds now (at most ``size`` bytes, b"" at its end), None when it holds
    nothing yet."""
    if isinstance(sock, ssl.SSLSocket):
        return _tls_recv_now(sock, size)
    try:
        if _DONTWAIT:
            return sock.recv(size, _DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    return None


# --- TLS (DICOM PS3.15 B.1) ---------------------------------------------------------------------
# A TLS socket's descriptor is readable when the kernel holds a TLS record, which need not carry
# application data: TLS 1.3 servers send session tickets after the handshake (RFC 8446 4.6.1),
# and a key update carries none either. A blocking read there waits for data the peer sends only
# once we have sent ours (the A-ASSOCIATE-AC to our A-ASSOCIATE-RQ). So a TLS socket is read
# without blocking; what one such read took to learn whether there is data (tls_readable) is
# kept on the socket for the next read. Decrypted bytes the SSL object holds (pending()) are
# readable although the descriptor is not.
_TLS_EARLY = "_pb_tls_early"  # bytes read by tls_readable, not yet taken
_TLS_EOF = "_pb_tls_eof"  # tls_readable met the end of the connection


def _tls_read_nonblocking(sock: ssl.SSLSocket, size: int) -> bytes | None:
    """Up to ``size`` bytes of application data the socket has now, b"" at its end, None
    when the records at hand carry none."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return sock.recv(size)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
        return None
    finally:
        sock.settimeout(timeout)


def _tls_recv_now(sock: ssl.SSLSocket, size: int) -> bytes | None:
    early: bytearray | None = getattr(sock, _TLS_EARLY, None)
    if early:
        data = bytes(early[:size])
        del early[:size]
        return data
    if getattr(sock, _TLS_EOF, False):
        return b""
    return _tls_read_nonblocking(sock, size)


def tls_readable(sock: ssl.SSLSocket, descriptor_ready: bool) -> bool:
    """Whether a read of the TLS socket would find application data (or the connection's
    end) now; ``descriptor_ready``: ``poll`` found its descriptor readable."""
    if getattr(sock, _TLS_EARLY, None) or getattr(sock, _TLS_EOF, False) or sock.pending():
        return True
    if not descriptor_ready:
        return False
    data = _tls_read_nonblocking(sock, CHUNK)
    if data is None:
        return False  # only records without data (a session ticket, say): taken
    if not data:
        setattr(sock, _TLS_EOF, True)
    else:
        setattr(sock, _TLS_EARLY, bytearray(data))
    return True


def _receive(
    dul: DULServiceProvider, sock: socket.socket, size: int, state: str, into: bytearray
) -> None:
    """Append ``size`` bytes off the socket to ``into``, read as they come; raises
    :class:`_Stalled` when the peer sends nothing for the read's timeout (for the ARTIM timer:
    in all), :class:`_Closed` when the connection ends first."""
    received = 0
    timeout = _idle_timeout(dul, state)
    deadline = None if timeout is None else time.monotonic() + timeout
    while received < size:
        if dul._kill_thread:
            raise _Closed(received)
        want = min(size - received, CHUNK)
        try:
            data = _recv_now(sock, want)
            if data is None:
                wait = WAKE_INTERVAL
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _Stalled()
                    wait = min(wait, left)
                if not wait_readable(sock, wait) or isinstance(sock, ssl.SSLSocket):
                    continue  # a TLS record may carry no data: _recv_now reads without blocking
                data = sock.recv(want)
        except (BlockingIOError, InterruptedError):
            continue
        except (OSError, ValueError):
            raise _Closed(received) from None
        if not data:
            raise _Closed(received)
        into += data
        received += len(data)
        if timeout is not None and state not in _ARTIM_STATES:
            deadline = time.monotonic() + timeout  # the network timeout counts idle time


def wait_readable(sock: socket.socket, timeout: float | None) -> bool:
    """Whether ``sock`` has something to read (or has ended) within ``timeout`` seconds (None:
    however long it takes)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


def invalid_pdu(dul: DULServiceProvider, problem: str, reason: int) -> None:
    """An unrecognised or invalid PDU (PS3.8 9.2, Evt19): the rest of the stream is dropped.
    ``reason``: that of the A-ABORT, should the state machine answer with one (AA-8)."""
    dul._pb_unframed = True  # type: ignore[attr-defined]
    dul._pb_abort_reason = reason  # type: ignore[attr-defined]
    state = dul.state_machine.current_state
    _warn(dul, "invalid PDU from a DICOM peer", reason=problem, state=state)
    dul.event_queue.put("Evt19")


def _discard(dul: DULServiceProvider, sock: socket.socket) -> None:
    """Drop what the peer sends after an invalid PDU, until it closes the connection."""
    try:
        if isinstance(sock, ssl.SSLSocket):
            tls_data = _tls_recv_now(sock, CHUNK)
            if tls_data is None:
                return
            data = tls_data
        else:
            data = sock.recv(CHUNK)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if not data:
        dul.event_queue.put("Evt17")


def _max_length(dul: DULServiceProvider, pdu_type: int) -> int:
    """The longest body (after the 6-byte header) a PDU of a known type may have from the
    peer."""
    if pdu_type in (0x01, 0x02):
        return MAX_ASSOCIATION_PDU_LENGTH
    if pdu_type == 0x04:
        assoc = dul.assoc
        # What we told the peer we receive as the acceptor (0: no limit; PS3.8 D.1).
        limit = assoc.acceptor.maximum_length if assoc.is_acceptor else 0
        return limit or 0xFFFFFFFF
    return MAX_SHORT_PDU_LENGTH


def pdu_length_limits(dul: DULServiceProvider) -> list[int]:
    """The longest PDU body the peer may send, indexed by the PDU type byte; -1 for types no
    PDU has. For readers that check each PDU header with one comparison."""
    limits = [-1] * 256
    for pdu_type in PDU_NAMES:
        limits[pdu_type] = _max_length(dul, pdu_type)
    return limits


def _length_problem(dul: DULServiceProvider, pdu_type: int, length: int) -> str | None:
    name = PDU_NAMES[pdu_type]
    limit = _max_length(dul, pdu_type)
    if length <= limit:
        return None
    if pdu_type in (0x01, 0x02):
        return f"{name} of {length} bytes (at most {MAX_ASSOCIATION_PDU_LENGTH} are read)"
    if pdu_type == 0x04:
        return f"{name} of {length} bytes, longer than the negotiated {limit} (PS3.8 D.1)"
    return f"{name} of {length} bytes (PS3.8 9.3: 4)"


def header_problem(dul: DULServiceProvider, pdu_type: int, length: int) -> tuple[str, int] | None:
    """What is wrong with a PDU header of ``pdu_type`` and ``length`` (PS3.8 9.3.1), and the
    A-ABORT reason for it; None when nothing is."""
    if pdu_type not in PDU_NAMES:
        return f"unrecognised PDU type 0x{pdu_type:02X} (PS3.8 9.3.1)", ABORT_UNRECOGNIZED_PDU
    problem = _length_problem(dul, pdu_type, length)
    return None if problem is None else (problem, ABORT_INVALID_PARAMETER_VALUE)


def read_pdu_data(self: DULServiceProvider) -> None:
    """pynetdicom's ``DULServiceProvider._read_pdu_data`` (one PDU off the socket, decoded,
    and its event queued for the state machine), reading against a deadline (see the module
    docstring) and reporting what it cannot frame or decode on one line, without traceback."""
    assoc_socket = self.socket
    sock = assoc_socket.socket if assoc_socket is not None else None
    if sock is None:
        self.event_queue.put("Evt17")
        return
    if getattr(self, "_pb_unframed", False):
        _discard(self, sock)
        return
    self._pb_reading = True  # type: ignore[attr-defined]
    try:
        _read_pdu(self, sock)
    finally:
        self._pb_reading = False  # type: ignore[attr-defined]


def _read_pdu(self: DULServiceProvider, sock: socket.socket) -> None:
    state = self.state_machine.current_state
    data = bytearray()
    try:
        _receive(self, sock, 6, state, data)
    except _Closed as exc:
        if exc.received:
            _warn(self, "DICOM peer closed the connection inside a PDU header", state=state)
        self.event_queue.put("Evt17")
        return
    except _Stalled:
        stalled(self, state, "PDU header")
        return
    pdu_type, _, length = struct.unpack_from(">BBL", data)
    if pdu_type == 0x04 and state in _ARTIM_STATES:
        # Data before an association is established (AA-1) or after it has ended (AA-6):
        # of no use, and not read, whatever its length.
        self._pb_unframed = True  # type: ignore[attr-defined]
        if state == "Sta2":
            _warn(self, "P-DATA-TF before an association from a DICOM peer", state=state)
            self.event_queue.put("Evt10")
        return
    wrong = header_problem(self, pdu_type, length)
    if wrong is not None:
        invalid_pdu(self, *wrong)
        return
    name = PDU_NAMES[pdu_type]
    try:
        _receive(self, sock, length, state, data)
    except _Closed:
        _warn(
            self,
            "DICOM peer closed the connection inside a PDU",
            pdu=name,
            length=length,
            state=state,
        )
        self.event_queue.put("Evt17")
        return
    except _Stalled:
        stalled(self, state, name)
        return
    take_pdu(self, data)


def take_pdu(dul: DULServiceProvider, data: bytearray) -> bool:
    """What pynetdicom's ``_read_pdu_data`` does with a whole PDU read off the connection:
    decode it, queue it and its event for the state machine. One of an unknown type, or that
    does not decode, is an invalid PDU (Evt19; the rest of the stream is dropped): False."""
    name = PDU_NAMES.get(data[0])
    if name is None:
        invalid_pdu(
            dul, f"unrecognised PDU type 0x{data[0]:02X} (PS3.8 9.3.1)", ABORT_UNRECOGNIZED_PDU
        )
        return False
    try:
        with _quiet_decoding():
            pdu, event = dul._decode_pdu(data)
    except Exception as exc:
        invalid_pdu(
            dul,
            f"{name} cannot be decoded: {type(exc).__name__}: {exc}"[:300],
            ABORT_INVALID_PARAMETER_VALUE,
        )
        return False
    state = dul.state_machine.current_state
    if TRANSITION_TABLE.get((event, state)) in ("AA-1", "AA-8"):
        # A PDU this state has no place for (PS3.8 9.2): the state machine aborts.
        _warn(dul, f"{name} unexpected from a DICOM peer", state=state)
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)
    return True


def stalled(dul: DULServiceProvider, state: str, what: str) -> None:
    """The peer stopped sending in the middle of a PDU (``what``) until the read's deadline:
    the rest of the stream is dropped; in data transfer it is an invalid PDU (Evt19)."""
    dul._pb_unframed = True  # type: ignore[attr-defined]
    if state in _ARTIM_STATES:
        # The ARTIM timer has expired: the reactor queues Evt18 and the connection is closed
        # (PS3.8 9.2: AA-2), with no PDU sent.
        _warn(dul, f"{what} incomplete when the ARTIM timer expired", state=state)
        return
    _warn(dul, f"{what} incomplete after the network timeout", state=state)
    dul._pb_abort_reason = ABORT_REASON_NOT_SPECIFIED  # type: ignore[attr-defined]
    dul.event_queue.put("Evt19")


# pynetdicom logs a UID it cannot accept as an error before it raises; while a received PDU is
# decoded, the one line read_pdu_data logs for a PDU that fails says it (with the message).
_decoding = threading.local()


class _QuietWhileDecoding(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or not getattr(_decoding, "active", False)


QUIET_WHILE_DECODING = _QuietWhileDecoding()
#: pynetdicom's loggers that report errors while a PDU is decoded.
DECODING_LOGGERS = ("pynetdicom.utils", "pynetdicom.pdu", "pynetdicom.pdu_items")


@contextlib.contextmanager
def _quiet_decoding() -> Any:
    _decoding.active = True
    try:
        yield
    finally:
        _decoding.active = False


# --- the A-ASSOCIATE-RQ (PS3.8 9.3.2) ---------------------------------------------------------
@dataclass(frozen=True)
class Refusal:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4, Table 9-21) and why."""

    result: int  # 1 rejected-permanent, 2 rejected-transient
    source: int  # 1 service-user, 2 service-provider (ACSE), 3 service-provider (presentation)
    reason: int
    why: str

    @property
    def answer(self) -> str:
        return f"A-ASSOCIATE-RJ result {self.result} source {self.source} reason {self.reason}"


def _malformed(why: str) -> Refusal:
    # Rejected-permanent; DICOM UL service-provider (ACSE related function); no-reason-given.
    return Refusal(0x01, 0x02, 0x01, why)


def associate_rq_refusal(pdu: A_ASSOCIATE_RQ) -> Refusal | None:
    """Why an A-ASSOCIATE-RQ that decoded must be refused (PS3.8 9.3.2), or None."""
    version = pdu.protocol_version
    if not isinstance(version, int) or not version & 0x0001:
        # Bit 0 marks version 1; a receiver tests only that bit (PS3.8 9.3.2, Table 9-11).
        return Refusal(0x01, 0x02, 0x02, f"protocol version 0x{version or 0:04X} not supported")
    items = pdu.variable_items
    contexts = [item for item in items if isinstance(item, ApplicationContextItem)]
    names = [str(item.application_context_name) for item in contexts]
    if names != [DICOM_APPLICATION_CONTEXT]:
        return Refusal(
            0x01,
            0x01,
            0x02,  # application-context-name-not-supported
            f"application context {', '.join(names) or 'missing'}, not DICOM's (PS3.7 A.2.1)",
        )
    presentation = [item for item in items if isinstance(item, PresentationContextItemRQ)]
    users = [item for item in items if isinstance(item, UserInformationItem)]
    if len(contexts) + len(presentation) + len(users) != len(items):
        return _malformed("an item of a type an A-ASSOCIATE-RQ does not hold (PS3.8 9.3.2)")
    if not presentation:
        return _malformed("no presentation context item (PS3.8 9.3.2)")
    if len(users) != 1:
        return _malformed(f"{len(users)} user information items, not one (PS3.8 9.3.2)")
    for sub_item in users[0].user_data:
        if isinstance(sub_item, UserIdentitySubItemRQ):
            # The sub-item's length holds the primary field's (PS3.7 D.3.3.7.1): pynetdicom
            # keeps the bytes that are there.
            declared = getattr(sub_item, "_primary_length", None)
            if declared is not None and declared != len(sub_item.primary_field or b""):
                return _malformed(
                    f"user identity primary field of {declared} bytes in a sub-item that holds "
                    f"{len(sub_item.primary_field or b'')} (PS3.7 D.3.3.7.1)"
                )
    seen: set[int] = set()
    for item in presentation:
        context_id = item.presentation_context_id
        if not isinstance(context_id, int) or not 1 <= context_id <= 255 or not context_id % 2:
            return _malformed(
                f"presentation context ID {context_id} is not an odd number from 1 to 255 "
                "(PS3.8 9.3.2.2)"
            )
        if context_id in seen:
            return _malformed(f"presentation context ID {context_id} twice (PS3.8 9.3.2.2)")
        seen.add(context_id)
        sub_items = item.abstract_transfer_syntax_sub_items
        abstract = [s for s in sub_items if isinstance(s, AbstractSyntaxSubItem)]
        transfer = [s for s in sub_items if isinstance(s, TransferSyntaxSubItem)]
        if (
            len(abstract) != 1
            or not transfer
            or len(abstract) + len(transfer) != len(sub_items)
            or not abstract[0].abstract_syntax_name
            or not all(s.transfer_syntax_name for s in transfer)
        ):
            return _malformed(
                f"presentation context {context_id} does not hold one abstract syntax and one "
                "or more transfer syntaxes (PS3.8 9.3.2.2)"
            )
    return None


def ae_6(dul: DULServiceProvider) -> str:
    """pynetdicom's ``fsm.AE_6`` (PS3.8 9.2, Sta2 + Evt6): stop the ARTIM timer; if the
    A-ASSOCIATE-RQ is acceptable to the service provider, issue the A-ASSOCIATE indication
    (Sta3), else send an A-ASSOCIATE-RJ PDU and start the ARTIM timer (Sta13). Acceptable here
    means it passes :func:`associate_rq_refusal` and pynetdicom can make a primitive of it."""
    dul.artim_timer.stop()
    recv_pdu = cast(A_ASSOCIATE_RQ, dul._recv_pdu.get(False))
    refusal = associate_rq_refusal(recv_pdu)
    primitive = None
    if refusal is None:
        try:
            with _quiet_decoding():
                primitive = recv_pdu.to_primitive()
        except Exception as exc:
            refusal = _malformed(f"{type(exc).__name__}: {exc}"[:300])
    if primitive is None:
        assert refusal is not None
        answer = A_ASSOCIATE()
        answer.result = refusal.result
        answer.result_source = refusal.source
        answer.diagnostic = refusal.reason
        dul._send(A_ASSOCIATE_RJ(answer))
        dul.artim_timer.start()
        _warn(
            dul,
            "association request refused",
            calling_ae=str(recv_pdu.calling_ae_title).strip(),
            reason=refusal.why,
            answer=refusal.answer,
        )
        return "Sta13"
    dul.to_user_queue.put(primitive)
    return "Sta3"


def aa_8(dul: DULServiceProvider) -> str:
    """pynetdicom's ``fsm.AA_8`` (PS3.8 9.2: send an A-ABORT PDU from the service provider,
    issue an A-P-ABORT indication, start the ARTIM timer; Sta13), with the reason PS3.8 9.3.8
    gives (Table 9-26): AA-8 follows an invalid PDU (Evt19), whose reader recorded why
    (:func:`invalid_pdu`: unrecognised PDU, invalid PDU parameter value; a PDU cut short by
    the network timeout has none to give), or a PDU this state has no place for
    (unexpected PDU). Evt19 with no record comes from pynetdicom's DIMSE layer, for P-DATA
    whose PDVs do not make a message: an invalid parameter value."""
    if getattr(dul, "_pb_event", None) == "Evt19":
        reason = dul.__dict__.pop("_pb_abort_reason", ABORT_INVALID_PARAMETER_VALUE)
    else:
        reason = ABORT_UNEXPECTED_PDU
    pdu = A_ABORT_RQ()
    pdu.source = 0x02  # DICOM UL service-provider
    pdu.reason_diagnostic = reason
    dul._send(pdu)
    primitive = A_P_ABORT()
    primitive.provider_reason = reason
    dul.to_user_queue.put(primitive)
    dul.artim_timer.start()
    return "Sta13"
