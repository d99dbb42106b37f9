"""Event-driven reactors for pynetdicom's associations.

Every pynetdicom association runs two threads that poll: the DUL reactor (socket and queues,
``sleep(_run_loop_delay)`` when idle) and the association reactor (``sleep(0.001)`` on every
loop, then a look at the DIMSE queue). A message therefore waits up to a millisecond at each
hand-over, and polling faster to hide that burns CPU and GIL time on every open association:
with four senders storing at once that polling, not the storing, used most of the CPU.

Here both threads sleep until there is something to do instead:

- the DUL thread blocks in ``poll`` on its socket and on a wake-up socket pair; a primitive
  queued for it by another thread (``send_pdu``, a socket event, a kill) writes one byte there;
- the association thread blocks on a :class:`threading.Event` that is set when the DUL hands it
  a DIMSE message or an A-RELEASE/A-ABORT primitive, or when the association is killed.

Both still wake every ``IDLE_WAIT`` seconds for the timers (ARTIM, network idle timeout).
The loops are otherwise pynetdicom 3.0's ``run_reactor`` and ``_run_reactor``, step for step,
except that the DUL both sends and reads in one pass (see ``_dul_run_reactor``).

A :class:`SocketLease` lets the thread that performs C-STORE sub-operations (a C-GET's or a
C-MOVE's) write and read the socket itself while the DUL thread stands aside: see there.

Sockets are waited on with ``poll``, here and in ``AssociationSocket.ready``
(:func:`_socket_ready`): ``select`` refuses descriptors from 1024 on, and pynetdicom took such
a connection for closed. A process that also serves HTTP holds that many easily.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

from dicom_node import store_receive
from dicom_node.upper_layer import (
    header_problem,
    invalid_pdu,
    pdu_length_limits,
    stalled,
    take_pdu,
    tls_readable,
)

LOGGER = logging.getLogger("pynetdicom.dul")
ASSOC_LOGGER = logging.getLogger("pynetdicom.assoc")

# How long an idle reactor sleeps before it looks at its timers again (seconds).
IDLE_WAIT = 0.05


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls ``wake`` after every put."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class SocketLease:
    """The DUL's socket, lent to one thread for a run of request/response exchanges.

    Each C-STORE sub-operation is one request out and one response back. Through the DUL that
    is two queue hand-overs, two state-machine passes and a full DIMSE decode per message, in
    two threads: more CPU than the peer spends receiving the instance. While leased, the DUL
    thread waits and the holder writes finished PDUs to the socket and reads the responses
    itself; the association stays in Sta6 (data transfer), where sending and receiving P-DATA
    change no state, so the state machine needs to see neither.

    The lease is given back (and the DUL carries on exactly where it stopped):

    - when the holder queues anything for the DUL (``send_pdu``, an abort, a release): the
      DUL must act on it;
    - when the holder reads a PDU it does not handle (a C-CANCEL, an A-ABORT, ...): that PDU
      is handed to the DUL as if the DUL had read it;
    - at the latest when the association thread finishes serving a request, and on kill.

    The DUL answers a request for the lease once nothing is queued for it (it first sends what
    is), and grants it only in Sta6; otherwise the request is refused (or withdrawn after
    ``GRANT_TIMEOUT``) and the holder uses the ordinary path. TLS sockets are never leased.

    Each PDU header read is held to the same limits as the DUL's reads (PS3.8 9.3.1, D.1:
    a known type, no longer than we told the peer we receive): one that is not goes back to
    the DUL at once as an invalid PDU (Evt19, an A-ABORT during the association), before any
    more of it is read.
    """

    GRANT_TIMEOUT = 1.0
    #: Bytes asked of the socket per read.
    CHUNK = 256 * 1024

    def __init__(self, dul: DULServiceProvider) -> None:
        self.dul = dul
        self.holder: threading.Thread | None = None
        self._requested = False
        self._answered = threading.Event()
        self._granted = False
        self._returned = threading.Event()
        self.socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._buffer = bytearray()  # read from the socket, not yet taken as a PDU
        self._chunk: memoryview | None = None  # allocated with the first read
        self._poller: Any = None  # select.poll() on the socket while it is held
        self._limits: list[int] = []  # longest PDU body by type (upper_layer.pdu_length_limits)

    @property
    def held_here(self) -> bool:
        return self.holder is threading.current_thread()

    # --- the holder's side -----------------------------------------------------------------
    def acquire(self) -> bool:
        """Ask the DUL thread for the socket; True when this thread now holds it."""
        if self.held_here:
            return True
        if self.holder is not None or not self.dul.is_alive():
            return False
        assoc_socket = self.dul.socket
        raw = getattr(assoc_socket, "socket", None)
        if raw is None or raw.__class__ is not socket.socket:
            return False  # not connected, or TLS (its buffered records are the DUL's)
        with self._lock:
            self._answered.clear()
            self._granted = False
            self._returned.clear()
            self._requested = True
        self.dul._pb_wakeup.wake()  # type: ignore[attr-defined]
        answered = self._answered.wait(self.GRANT_TIMEOUT)
        with self._lock:
            if not answered and not self._answered.is_set():
                self._requested = False  # withdrawn: the DUL will not grant it any more
                return False
        if not self._granted:
            return False
        self._hold(raw)
        return True

    def _hold(self, raw: socket.socket) -> None:
        """This thread holds the socket from now on."""
        self._limits = pdu_length_limits(self.dul)
        self._poller = select.poll()
        self._poller.register(raw, select.POLLIN)
        self.socket = raw
        self.holder = threading.current_thread()

    def _wait(self, timeout: float) -> bool:
        """Whether the socket has something to read within ``timeout`` seconds."""
        return bool(self._poller.poll(timeout * 1000))

    def send(self, data: bytes) -> None:
        assert self.socket is not None
        self.socket.sendall(data)

    def read_pdu(self, timeout: float | None) -> bytes | None:
        """One whole PDU, or None when the peer is silent for ``timeout`` seconds or the
        connection is gone (the lease is then released, the connection error passed on).

        The socket is read in large chunks: a small instance's command and data set PDUs
        usually arrive in one. What is read beyond the PDUs the holder takes is handed to the
        DUL with the socket (:meth:`release`); so is a PDU header that breaks the limits
        (:class:`InvalidPDU`), and None returned."""
        sock = self.socket
        assert sock is not None
        try:
            while True:
                pdu = self._take_pdu()
                if pdu is not None:
                    return pdu
                if timeout is not None and not self._wait(timeout):
                    return None
                self._receive(sock)
        except InvalidPDU as exc:
            self.release(invalid=exc)
            return None
        except (OSError, EOFError, ValueError):
            self.release(connection_lost=True)
            return None

    def _receive(self, sock: socket.socket) -> None:
        if self._chunk is None:
            self._chunk = memoryview(bytearray(self.CHUNK))
        received = sock.recv_into(self._chunk)
        if not received:
            raise EOFError("the peer closed the connection")
        self._buffer += self._chunk[:received]

    def _take_pdu(self) -> bytes | None:
        """The first whole PDU of the buffer, taken off it (PS3.8 9.3.1: type, reserved,
        32-bit length of the rest); raises :class:`InvalidPDU` for a header of an unknown
        type, or longer than its type may be, without waiting for the length it gives."""
        buffer = self._buffer
        if len(buffer) < 6:
            return None
        length = int.from_bytes(buffer[2:6], "big")
        if length > self._limits[buffer[0]]:  # unknown types: -1
            problem, reason = header_problem(self.dul, buffer[0], length) or ("", 0)
            buffer.clear()  # what follows has no PDU boundaries: the DUL drops the rest
            raise InvalidPDU(problem, reason)
        size = 6 + length
        if len(buffer) < size:
            return None
        pdu = bytes(buffer[:size])
        del buffer[:size]
        return pdu

    def _drain(self, timeout: float, pdus: list[bytes]) -> None:
        """Append the whole PDUs read into the buffer and not taken to ``pdus``, the last one
        completed from the socket when it arrived only in part."""
        sock = self.socket
        assert sock is not None
        while self._buffer:
            pdu = self._take_pdu()
            if pdu is None:
                if not self._wait(timeout):
                    raise TimeoutError("the peer stopped in the middle of a PDU")
                self._receive(sock)
                continue
            pdus.append(pdu)

    def release(
        self,
        unhandled_pdu: bytes | None = None,
        *,
        connection_lost: bool = False,
        invalid: InvalidPDU | None = None,
    ) -> None:
        """Give the socket back to the DUL thread, with a PDU read but not handled and any
        read after it; ``invalid``: the header at the front of what was read (nothing
        before it is pending) breaks the limits."""
        if not self.held_here:
            return
        dul = self.dul
        pending = [] if unhandled_pdu is None else [unhandled_pdu]
        cut = False
        if not connection_lost and invalid is None:
            try:
                self._drain(dul.assoc.network_timeout or 60.0, pending)
            except TimeoutError:
                cut = True  # the peer stopped in the middle of a PDU
            except InvalidPDU as exc:
                invalid = exc  # after the whole PDUs before it
            except (OSError, EOFError, ValueError):
                connection_lost = True
        self._buffer.clear()
        self.holder = None
        self.socket = None
        self._poller = None
        for pdu in pending:
            # As the DUL would have taken it; after an invalid one the rest is dropped.
            if not take_pdu(dul, bytearray(pdu)):
                break
        else:
            if invalid is not None:
                invalid_pdu(dul, invalid.problem, invalid.reason)
            elif cut:
                stalled(dul, dul.state_machine.current_state, "PDU")
        if connection_lost:
            dul.event_queue.put("Evt17")
        # The socket was in use until now: the network timeout counts from here (before the
        # association thread looks at it again; the DUL restarts it too).
        dul._idle_timer.restart()
        self._returned.set()

    # --- the DUL thread's side -------------------------------------------------------------
    def serve_request(self) -> None:
        """Called by the DUL thread at the top of its loop when a lease is requested."""
        dul = self.dul
        with self._lock:
            if not self._requested:
                return  # withdrawn
            self._requested = False
            grant = (
                dul.state_machine.current_state == "Sta6"
                and dul.event_queue.empty()
                and dul.to_provider_queue.empty()
                and not dul._kill_thread
            )
            self._granted = grant
            self._answered.set()
        if not grant:
            return
        while not self._returned.wait(IDLE_WAIT):
            if dul._kill_thread:
                return
        dul._idle_timer.restart()


class InvalidPDU(Exception):
    """A PDU header that no PDU of its type may have (see ``upper_layer.header_problem``)."""

    def __init__(self, problem: str, reason: int) -> None:
        super().__init__(problem)
        self.problem = problem
        self.reason = reason


class _DulWakeup:
    """A socket pair the DUL thread selects on together with its peer socket."""

    def __init__(self, dul: DULServiceProvider) -> None:
        self.dul = dul
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def wake(self) -> None:
        lease: SocketLease = self.dul._pb_lease  # type: ignore[attr-defined]
        if lease.held_here:
            lease.release()  # the DUL has work: it needs its socket back
        if threading.current_thread() is self.dul:
            return  # the DUL thread looks at its queues again before it sleeps
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self.writer.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while self.reader.recv(4096):
                pass

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def _socket_ready(self: AssociationSocket) -> bool:
    """pynetdicom's ``AssociationSocket.ready`` (whether the socket has something to read;
    Evt17 when it is gone), asking ``poll`` instead of ``select``."""
    sock = self.socket
    if sock is None or self._is_connected is False:
        return False
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        ready = bool(poller.poll(0))
        if isinstance(sock, ssl.SSLSocket):
            # Decrypted bytes the descriptor does not show; a record that holds none.
            return tls_readable(sock, ready)
    except (OSError, TimeoutError, ValueError):
        self.event_queue.put("Evt17")  # Evt17: transport connection closed
        return False
    return ready


def _wait_for_work(dul: DULServiceProvider, wakeup: _DulWakeup) -> None:
    poller = select.poll()
    poller.register(wakeup.reader, select.POLLIN)
    assoc_socket = dul.socket
    raw = getattr(assoc_socket, "socket", None) if assoc_socket is not None else None
    try:
        if raw is not None and getattr(assoc_socket, "_is_connected", False):
            poller.register(raw, select.POLLIN)
        poller.poll(IDLE_WAIT * 1000)
    except (OSError, ValueError):
        time.sleep(0.001)  # the socket was closed under us: the next loop sees Evt17
    wakeup.drain()


def _dul_run_reactor(self: DULServiceProvider) -> None:
    """pynetdicom's ``DULServiceProvider.run_reactor``, waiting instead of sleeping."""
    wakeup: _DulWakeup = self._pb_wakeup  # type: ignore[attr-defined]
    lease: SocketLease = self._pb_lease  # type: ignore[attr-defined]
    self._idle_timer.start()
    try:
        queued = self.event_queue.queue
        if self.state_machine.current_state == "Sta1" and queued and queued[0] == "Evt5":
            # An acceptor's connection is indicated (Evt5) before this thread starts: act on it
            # before anything is read, so that the ARTIM timer runs while the A-ASSOCIATE-RQ
            # comes in (PS3.8 9.2: AE-5). pynetdicom's loop may read the request in Sta1.
            self.state_machine.do_action(self.event_queue.get())
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                break
            if lease._requested and self.event_queue.empty() and self.to_provider_queue.empty():
                # Granted once what is queued has been acted on (a response just queued by the
                # thread that asks, say).
                lease.serve_request()
                continue
            # The ARTIM timer first, so that its event is queued ahead of any other.
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            busy = False
            try:
                # Encode and send one primitive, and receive and decode one PDU. (pynetdicom
                # does one or the other: while a stream of responses keeps its send queue
                # full, it never reads what the peer sends, a C-CANCEL say.) Their events are
                # queued in that order and the state machine takes them one by one, below.
                if self._process_recv_primitive():
                    busy = True
                if self._is_transport_event():
                    self._idle_timer.restart()
                    busy = True
            except Exception as exc:
                _abort_on_error(self, exc)
                return
            # Every queued event is acted on before the next pass: _process_recv_primitive
            # only peeks at the primitive it queues Evt9 for (DT-1 takes it off the queue), so
            # a pass that peeked again before then would queue a second Evt9 for the same
            # primitive (pynetdicom's loop, which queues at most one event per pass, never
            # does). A second DT-1 would then find the queue empty, or send a later primitive
            # out of its order.
            # Once an event has ended the connection (back in Sta1) the association kills
            # this thread: what is still queued (a second Evt17 say) is left for the kill
            # check at the top, as pynetdicom's loop does, rather than acted on in a state
            # that has no transition for it.
            acted = False
            while not self._kill_thread:
                if acted and self.state_machine.current_state == "Sta1":
                    break
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    break
                if event == "Evt17" and self.state_machine.current_state == "Sta1":
                    continue  # closed twice (a failed read and a failed select, say): no-op
                try:
                    # What the action was triggered by (upper_layer.aa_8 gives its reason).
                    self._pb_event = event  # type: ignore[attr-defined]
                    self.state_machine.do_action(event)
                except Exception as exc:
                    # pynetdicom's loop ends the thread here and leaves the connection open
                    # with nobody reading it.
                    _abort_on_error(self, exc)
                    return
                acted = True
            if not busy and not acted:
                _wait_for_work(self, wakeup)
    finally:
        wakeup.close()
        _wake_association(self.assoc)  # an acceptor waiting for its A-ASSOCIATE-RQ, say


def _abort_on_error(self: DULServiceProvider, exc: Exception) -> None:
    """What pynetdicom's loop does when it fails: send an A-ABORT (service-provider) past the
    state machine, stop the association and this thread."""
    LOGGER.error("Exception in DUL.run(), aborting association")
    LOGGER.exception(exc)
    abort_pdu = A_ABORT_RQ()
    abort_pdu.source = 0x02
    abort_pdu.reason_diagnostic = 0x00
    with contextlib.suppress(Exception):
        cast(Any, self.socket).send(abort_pdu.encode())
    self.assoc.is_aborted = True
    self.assoc.is_established = False
    self.assoc._kill = True
    _wake_association(self.assoc)
    self._kill_thread = True


def _dul_kill(self: DULServiceProvider) -> None:
    self._kill_thread = True
    self._pb_wakeup.wake()  # type: ignore[attr-defined]


def _dul_stop(self: DULServiceProvider) -> bool:
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        self._pb_wakeup.wake()  # type: ignore[attr-defined]
        while self.is_alive():
            self.join(0.01)
        return True
    return False


def _wake_association(assoc: Association) -> None:
    wake: threading.Event | None = getattr(assoc, "_pb_wake", None)
    if wake is not None:
        wake.set()


def _assoc_run_reactor(self: Association) -> None:
    """pynetdicom's acceptor reactor loop (``Association._run_reactor``), waiting on an event
    set by the DUL instead of polling every millisecond. Each request is first offered to the
    association's ``_pb_gate`` (set by dicom_node.acceptor: access control), which may answer
    it instead."""
    wake: threading.Event = self._pb_wake  # type: ignore[attr-defined]
    self._is_paused = False
    while not self._kill:
        # Requestor-style send_*() calls pause the reactor so that it does not take their
        # responses off the DIMSE queue: wait here while paused.
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        if not self._reactor_checkpoint.is_set():
            # A send_*() cleared the checkpoint and saw this thread "paused" just before it
            # passed: the response that send_*() waits for is not this thread's to take. (It
            # now either sees the flag unset and waits, or cleared the checkpoint first.)
            continue
        wake.clear()

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            gate = getattr(self, "_pb_gate", None)
            if gate is not None and gate(self, msg, cast(int, context_id)):
                continue  # refused, and answered (dicom_node/access.py)
            self._serve_request(msg, cast(int, context_id))
            self.dul._pb_lease.release()  # type: ignore[attr-defined]  # if a handler kept it
            if type(msg) is C_STORE:
                # More are likely to follow: receive them on this thread while they come.
                store_receive.serve_stores(self)
            continue  # more requests may be waiting: release and abort are checked when idle

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            ASSOC_LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            ASSOC_LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)  # so that EVT_ASCE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired() and not getattr(self.dul, "_pb_reading", False):
            # (While the DUL reads a PDU, its read has a deadline of its own, the network
            # timeout since the last byte, and reports a stall itself.)
            ASSOC_LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return

        # Nothing to do: sleep until the DUL hands over a message or primitive. While
        # asleep the reactor touches no queue, so a send_*() need not wait for it.
        self._is_paused = True
        wake.wait(IDLE_WAIT)


_original_assoc_init = Association.__init__
_original_assoc_kill = Association.kill


def _assoc_init(self: Association, *args: Any, **kwargs: Any) -> None:
    _original_assoc_init(self, *args, **kwargs)
    wake = threading.Event()
    self._pb_wake = wake  # type: ignore[attr-defined]
    dul = self.dul
    dul._pb_lease = SocketLease(dul)  # type: ignore[attr-defined]
    wakeup = _DulWakeup(dul)
    dul._pb_wakeup = wakeup  # type: ignore[attr-defined]
    # Queues the DUL thread reads: wake it when another thread fills them.
    dul.event_queue = _WakingQueue(wakeup.wake)
    dul.to_provider_queue = _WakingQueue(wakeup.wake)
    # Queues the association thread reads: wake it when the DUL fills them.
    dul.to_user_queue = _WakingQueue(wake.set)
    self.dimse.msg_queue = _WakingQueue(wake.set)


def _assoc_kill(self: Association) -> None:
    lease: SocketLease | None = getattr(self.dul, "_pb_lease", None)
    if lease is None:  # made before the patches were installed: pynetdicom's own kill
        _original_assoc_kill(self)
        return
    lease.release()
    _wake_association(self)
    dul = self.dul
    if dul.is_alive() and threading.current_thread() is not dul:
        # pynetdicom polls until the DUL is back in Sta1 (it then stops): wait for its thread
        # instead, which returns as soon as it stops. After a rejection or an abort that can
        # take until the ARTIM timer expires, if the peer keeps sending.
        self._reactor_checkpoint.set()
        self._kill = True
        while dul.is_alive() and dul.state_machine.current_state != "Sta1":
            dul.join(IDLE_WAIT)
    _original_assoc_kill(self)


_installed = False


def install() -> None:
    """Make every association created in this process from now on event-driven (part of
    ``dicom_node.patches.install()``)."""
    global _installed
    if _installed:
        return
    _installed = True
    Association.__init__ = _assoc_init  # type: ignore[method-assign]
    Association.kill = _assoc_kill  # type: ignore[method-assign]
    Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
    DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
    DULServiceProvider.kill_dul = _dul_kill  # type: ignore[method-assign]
    DULServiceProvider.stop_dul = _dul_stop  # type: ignore[method-assign]
    AssociationSocket.ready = property(_socket_ready)  # type: ignore[method-assign,assignment]
