"""The association acceptor: from a new connection to the end of its association.

- :class:`AcceptorRequestHandler` makes the pynetdicom association of each accepted connection
  with the ARTIM timeout of the settings (PS3.8 9.1.5) and a callback for when it ends.
- :func:`run_reactor` is pynetdicom's ``Association.run_reactor`` for acceptors, waiting for
  the A-ASSOCIATE-RQ only while the connection is there: pynetdicom waits ``acse_timeout``
  (30 s) for it even after the peer has closed the connection, or the ARTIM timer has closed
  it, holding a thread and an association slot. A request that negotiation cannot handle is
  answered (A-ASSOCIATE-RJ) instead of ending the thread with the connection left open. The
  end-of-connection callback runs exactly once, whatever happened.
- :class:`AddressLimiter` counts the open connections of each peer address where they are
  accepted; :class:`ConnectionRefuser` answers those over the limit.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AssociationSocket, RequestHandler
from pynetdicom.utils import set_timer_resolution

from config.logging import bind_request_id
from dicom_node.metrics import association_answered, association_closed, association_opened
from dicom_node.upper_layer import MAX_ASSOCIATION_PDU_LENGTH, PEER_LOG

log = logging.getLogger(__name__)

#: How long the acceptor's thread sleeps between looks at its DUL while it waits (seconds).
IDLE_WAIT = 0.05


# --- per connection -----------------------------------------------------------------------
class AcceptorRequestHandler(RequestHandler):
    """pynetdicom's request handler, with the server's ARTIM timeout and end-of-connection
    callback on each association (the server provides ``artim_timeout`` and
    ``connection_ended(address)``)."""

    def handle(self) -> None:
        """pynetdicom's ``RequestHandler.handle``: make the association, start its thread."""
        address = str(self.client_address[0])
        ended: Callable[[str], None] = self.server.connection_ended  # type: ignore[attr-defined]
        try:
            assoc = self._create_association()
            assoc._pb_on_end = lambda: ended(address)  # type: ignore[attr-defined]
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
        except Exception as exc:
            PEER_LOG.warning(
                address, "cannot serve a DICOM connection", reason=f"{type(exc).__name__}: {exc}"
            )
            with contextlib.suppress(OSError):
                cast(socket.socket, self.request).close()
            ended(address)

    def _create_association(self) -> Association:
        """pynetdicom's ``RequestHandler._create_association``, except that:

        - the ARTIM timer runs for the server's ``artim_timeout``, not ``acse_timeout``;
        - the association gets the server's ``request_gate``, which the reactor asks before
          it serves each request (access control, dicom_node/access.py);
        - the association gets a list of the server's presentation contexts, not a deep copy:
          with every storage SOP class and transfer syntax, copying them was most of the cost
          of accepting an association (tens of milliseconds). Negotiation builds new contexts
          for its results and never changes the supported ones; our one handler that changes
          a context (C-GET transfer syntax order) replaces it with a copy.
        """
        assoc = Association(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.dul.artim_timer.timeout = self.server.artim_timeout  # type: ignore[attr-defined]

        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"

        sock = AssociationSocket(assoc, client_socket=cast(socket.socket, self.request))
        assoc.set_socket(sock)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = list(self.server.contexts)

        assoc.requestor.address_info = self.remote
        # Asked before each request is served (dicom_node.reactor): who may use what.
        assoc._pb_gate = getattr(self.server, "request_gate", None)  # type: ignore[attr-defined]

        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    handler = cast(evt._HandlerBase, handler)
                    assoc.bind(event, handler[0], handler[1])

        return assoc


_original_run_reactor = Association.run_reactor


def run_reactor(self: Association) -> None:
    """pynetdicom's ``Association.run_reactor``; for an acceptor see the module docstring.

    Every log line written on the association's thread carries the association's id
    (``request_id``, config/logging.py)."""
    if not self.is_acceptor:
        _original_run_reactor(self)
        return
    association_id = uuid.uuid4().hex[:16]
    self._pb_id = association_id  # type: ignore[attr-defined]
    try:
        with bind_request_id(association_id):
            _run_acceptor(self)
    except Exception as exc:
        with bind_request_id(association_id):
            _failed(self, exc)
    finally:
        sock = self.dul.socket
        if self._server is not None and sock is not None and sock.socket is not None:
            self._server.shutdown_request(sock.socket)
        on_end: Callable[[], None] | None = getattr(self, "_pb_on_end", None)
        if on_end is not None:
            self._pb_on_end = None  # type: ignore[attr-defined]
            on_end()


def _run_acceptor(self: Association) -> None:
    if not self._started_dul:
        self.dul.start()
        self._started_dul = True
        self._dul_ready.wait()

    primitive = _associate_indication(self)
    if primitive is None:
        # The connection closed, the ARTIM timer expired, or the DUL answered the request
        # itself (A-ASSOCIATE-RJ or A-ABORT): nothing to negotiate.
        self.kill()
        return

    self.requestor.primitive = primitive
    evt.trigger(self, evt.EVT_REQUESTED, {})
    try:
        _negotiate(self)
    finally:
        calling = str(getattr(primitive, "calling_ae_title", "") or "").strip()
        result = (
            "accepted" if self.is_established else "rejected" if self.is_rejected else "aborted"
        )
        association_answered(calling, result)
    if self.is_established:
        association_opened()
        try:
            with set_timer_resolution(self._timer_resolution):
                self._run_reactor()
        finally:
            association_closed()


def _negotiate(self: Association) -> None:
    """Answer the A-ASSOCIATE-RQ (unless EVT_REQUESTED's handler did)."""
    if not self.is_aborted and not self.is_rejected:
        try:
            self.acse.negotiate_association()
        except Exception as exc:
            if self.is_established or self.is_rejected or self.is_aborted:
                raise
            # Rejected-permanent; service-provider (ACSE related); no-reason-given
            # (PS3.8 9.3.4): a request we cannot negotiate.
            _warn(
                self,
                "association request refused",
                exc,
                answer="A-ASSOCIATE-RJ result 1 source 2 reason 1",
            )
            self.acse.send_reject(0x01, 0x02, 0x01)
            self.kill()


def _associate_indication(self: Association) -> A_ASSOCIATE | None:
    """The A-ASSOCIATE indication, once the DUL has one; None when the DUL has stopped (the
    connection is gone) or none came within ``acse_timeout``."""
    wake: threading.Event = self._pb_wake  # type: ignore[attr-defined]
    dul = self.dul
    deadline = None if self.acse_timeout is None else time.monotonic() + self.acse_timeout
    while True:
        wake.clear()
        if not dul.to_user_queue.empty():
            primitive = dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
            return primitive if isinstance(primitive, A_ASSOCIATE) else None
        if not dul.is_alive() or self._kill:
            if not dul.to_user_queue.empty():
                continue
            return None
        if deadline is not None and time.monotonic() >= deadline:
            return None
        wake.wait(IDLE_WAIT)


def _failed(self: Association, exc: Exception) -> None:
    """The association thread met an error: answer the peer (A-ABORT once established,
    A-ASSOCIATE-RJ while the request waits for an answer), let the DUL send the answer and
    end the connection as the state machine does (the peer closes it, or the ARTIM timer
    expires: PS3.8 9.2, Sta13), then end the association. A DUL that has not ended the
    connection by then has its socket closed under it."""
    _warn(self, "DICOM association ended by an error", exc)
    with contextlib.suppress(Exception):
        if self.is_established:
            self.abort()
        elif not self.is_rejected and not self.is_aborted and self.requestor.primitive:
            # Rejected-permanent; service-provider (ACSE related); no-reason-given (9.3.4).
            self.acse.send_reject(0x01, 0x02, 0x01)
    with contextlib.suppress(Exception):
        dul = self.dul
        artim = dul.artim_timer.timeout
        deadline = time.monotonic() + (float(artim) if artim else 30.0) + 1.0
        while (
            dul.is_alive()
            and dul.state_machine.current_state != "Sta1"
            and time.monotonic() < deadline
        ):
            dul.join(IDLE_WAIT)
    with contextlib.suppress(Exception):
        sock = self.dul.socket
        if sock is not None:
            sock.close()  # a DUL still in another state sees the connection closed
    with contextlib.suppress(Exception):
        self.kill()


def _warn(self: Association, message: str, exc: Exception, **extra: Any) -> None:
    info = self.requestor.address_info
    address = info.address if info is not None else "unknown"
    PEER_LOG.warning(address, message, reason=f"{type(exc).__name__}: {exc}"[:300], **extra)


# --- per peer address ---------------------------------------------------------------------
class AddressLimiter:
    """Open connections per peer address, at most ``limit`` each (0: no limit; they are
    counted all the same)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address``; False (not counted) when it has ``limit``
        open already."""
        with self._lock:
            count = self._open.get(address, 0)
            if self.limit and count >= self.limit:
                return False
            self._open[address] = count + 1
            return True

    def release(self, address: str) -> None:
        """A connection counted by :meth:`admit` has ended."""
        with self._lock:
            count = self._open.get(address, 0) - 1
            if count > 0:
                self._open[address] = count
            else:
                self._open.pop(address, None)
        if count < 0:
            # Released twice, or never admitted: the count of this address was too low by
            # one from then on (it lets one connection more in), or will be.
            log.error(
                "DICOM connection count: a connection ended that was not counted",
                extra={"peer": address},
            )

    def open_connections(self, address: str) -> int:
        with self._lock:
            return self._open.get(address, 0)


# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-transient (2), DICOM UL service-provider
# (presentation related function) (3), local-limit-exceeded (2).
LOCAL_LIMIT_EXCEEDED = struct.pack(">BBLBBBB", 0x03, 0x00, 4, 0x00, 0x02, 0x03, 0x02)
# A-ABORT (PS3.8 9.3.8) as action AA-1 sends it in Sta2: DICOM UL service-user, reason not
# significant.
ABORT = struct.pack(">BBLBBBB", 0x07, 0x00, 4, 0x00, 0x00, 0x00, 0x00)


class _Refused:
    __slots__ = ("answered", "deadline", "header", "remaining")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.header = b""
        self.remaining = -1  # bytes of the A-ASSOCIATE-RQ still to come, once known
        self.answered = False


class ConnectionRefuser:
    """Answers connections refused for their address's limit, all on one thread.

    Each one is treated as an association requestor in Sta2 whose request the service
    provider cannot take (PS3.8 9.2): its A-ASSOCIATE-RQ is read (not decoded) and answered
    with an A-ASSOCIATE-RJ rejected-transient, local-limit-exceeded (PS3.8 9.3.4), so that a
    modality tells its user why and tries again later; any other PDU gets an A-ABORT (AA-1),
    an A-ABORT a close (AA-2). Then our side of the connection is shut down and the peer has
    until the ARTIM timer expires to close its side, as has a peer that sends nothing at all.
    At most ``max_pending`` connections wait here; beyond that, one is closed unread.

    An error with one connection closes that connection (and is logged); should the thread
    end all the same, the next refusal starts another. :meth:`stop` closes every connection
    still here, taken up by the thread or not."""

    def __init__(self, artim_timeout: float, max_pending: int = 512) -> None:
        self.artim_timeout = artim_timeout
        self.max_pending = max_pending
        self._incoming: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._count = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)

    def refuse(self, connection: socket.socket) -> None:
        with self._lock:
            if self._stopped or self._count >= self.max_pending:
                _close(connection)
                return
            self._count += 1
            self._incoming.put(connection)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="dimse-refuser", daemon=True)
                self._thread.start()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            thread = self._thread
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")
        if thread is not None:
            thread.join(5)
        self._close_incoming()  # refused while the thread was busy, or after it ended
        self._wake_reader.close()
        self._wake_writer.close()

    def _close_incoming(self) -> None:
        while True:
            try:
                connection = self._incoming.get_nowait()
            except queue.Empty:
                return
            self._done(connection)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_reader, selectors.EVENT_READ, None)
        waiting: dict[socket.socket, _Refused] = {}
        try:
            while not self._stopped:
                now = time.monotonic()
                timeout = min((r.deadline for r in waiting.values()), default=now + 1.0) - now
                for key, _ in selector.select(max(0.0, min(timeout, 1.0))):
                    if key.data is None:
                        self._take_incoming(selector, waiting)
                        continue
                    connection = cast(socket.socket, key.fileobj)
                    try:
                        self._readable(selector, waiting, connection)
                    except Exception:
                        log.exception("refused DICOM connection closed after an error")
                        self._forget(selector, waiting, connection)
                now = time.monotonic()
                for connection in [c for c, r in waiting.items() if r.deadline <= now]:
                    self._forget(selector, waiting, connection)  # ARTIM expired (AA-2)
        except Exception:
            log.exception("the thread answering refused DICOM connections failed")
        finally:
            for connection in list(waiting):
                self._forget(selector, waiting, connection)
            selector.close()
            if self._stopped:
                self._close_incoming()

    def _take_incoming(
        self, selector: selectors.BaseSelector, waiting: dict[socket.socket, _Refused]
    ) -> None:
        with contextlib.suppress(OSError):
            while self._wake_reader.recv(4096):
                pass
        while True:
            try:
                connection = self._incoming.get_nowait()
            except queue.Empty:
                return
            try:
                connection.setblocking(False)
                selector.register(connection, selectors.EVENT_READ, True)
            except (OSError, ValueError):
                self._done(connection)
                continue
            waiting[connection] = _Refused(time.monotonic() + self.artim_timeout)

    def _readable(
        self,
        selector: selectors.BaseSelector,
        waiting: dict[socket.socket, _Refused],
        connection: socket.socket,
    ) -> None:
        refused = waiting[connection]
        try:
            data = connection.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._forget(selector, waiting, connection)
            return
        if refused.answered:
            return  # dropped until the peer closes (Sta13)
        if refused.remaining < 0:
            need = 6 - len(refused.header)
            refused.header += data[:need]
            data = data[need:]
            if len(refused.header) < 6:
                return
            pdu_type, _, length = struct.unpack(">BBL", refused.header)
            if pdu_type == 0x07:  # A-ABORT: close (AA-2)
                self._forget(selector, waiting, connection)
                return
            if pdu_type != 0x01 or length > MAX_ASSOCIATION_PDU_LENGTH:
                self._answer(connection, refused, ABORT)
                return
            refused.remaining = length
        refused.remaining -= len(data)
        if refused.remaining <= 0:
            self._answer(connection, refused, LOCAL_LIMIT_EXCEEDED)

    def _answer(self, connection: socket.socket, refused: _Refused, pdu: bytes) -> None:
        with contextlib.suppress(OSError):
            connection.send(pdu)
            connection.shutdown(socket.SHUT_WR)
        refused.answered = True
        refused.deadline = time.monotonic() + self.artim_timeout

    def _forget(
        self,
        selector: selectors.BaseSelector,
        waiting: dict[socket.socket, _Refused],
        connection: socket.socket,
    ) -> None:
        waiting.pop(connection, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            selector.unregister(connection)
        self._done(connection)

    def _done(self, connection: socket.socket) -> None:
        _close(connection)
        with self._lock:
            self._count -= 1


def _close(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.close()
