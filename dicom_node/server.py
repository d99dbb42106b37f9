"""DIMSE service class provider: Verification (C-ECHO) and Storage (C-STORE).

PS3.4 Annex A (Verification) and Annex B (Storage). Every storage SOP class pynetdicom knows is
offered with every transfer syntax pydicom knows, and each instance is stored as received.

Connections are accepted as ``dicom_node/acceptor.py`` describes (the ARTIM timer, a limit of
open connections per peer address), on pynetdicom as ``dicom_node.patches.install()`` leaves it.
Every association, in whichever process serves it, is subject to ``dicom_node/access.py``:
which DIMSE services its Calling AE Title may use.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from archive import Archive, IngestError, IngestErrorKind
from archive.audit import MINOR_FAILURE, SERIOUS_FAILURE
from archive.ingest import resolve_sop_classes
from config import Settings
from dicom_node import patches, store_receive
from dicom_node.acceptor import AcceptorRequestHandler, AddressLimiter, ConnectionRefuser
from dicom_node.access import AccessControl
from dicom_node.audit import DimseAudit
from dicom_node.part10 import file_meta
from dicom_node.services import DimseService, default_services
from dicom_node.sop_classes import storage_sop_classes
from dicom_node.status import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_DUPLICATE_SOP_INSTANCE,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_REFUSED_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
    STATUS_WARNING_DATASET_MISMATCH,
)
from dicom_node.tls import server_context
from dicom_node.upper_layer import PEER_LOG

log = logging.getLogger(__name__)

_STATUS_FOR_ERROR = {
    IngestErrorKind.CANNOT_UNDERSTAND: STATUS_CANNOT_UNDERSTAND,
    IngestErrorKind.UNSUPPORTED_TRANSFER_SYNTAX: STATUS_CANNOT_UNDERSTAND,
    IngestErrorKind.DATASET_MISMATCH: STATUS_DATASET_MISMATCH,
    # PS3.7 Annex C general status "Duplicate SOP Instance": the UID is held as another instance.
    IngestErrorKind.CONFLICT: STATUS_DUPLICATE_SOP_INSTANCE,
    IngestErrorKind.REFUSED: STATUS_REFUSED_SOP_CLASS_NOT_SUPPORTED,
    IngestErrorKind.OUT_OF_RESOURCES: STATUS_OUT_OF_RESOURCES,
}


def _error_comment(text: str) -> str:
    """An Error Comment (0000,0902) for ``text``: LO, so at most 64 characters (PS3.7 C.4)
    and no backslash, which would make it multi-valued (PS3.5 6.2)."""
    return text.replace("\\", "/")[:64]


class _NoDelayAssociationServer(ThreadedAssociationServer):
    """Sets TCP_NODELAY on every accepted socket, so that our small DIMSE responses go out at
    once instead of waiting on Nagle's algorithm for the sender's delayed ACK.

    Its associations run the ARTIM timer for ``artim_timeout`` seconds and call
    ``connection_ended`` with the peer address once each connection is over
    (:class:`dicom_node.acceptor.AcceptorRequestHandler`)."""

    artim_timeout: float = 30.0
    connection_ended: Callable[[str], None] = staticmethod(lambda address: None)
    #: Called with (association, request, context ID) before each request is served; True
    #: when it answered the request itself (dicom_node.access.AccessControl.gate).
    request_gate: Callable[[Association, Any, int], bool] | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        with contextlib.suppress(OSError):  # the peer may already be gone
            client.setblocking(True)  # whatever the listening socket is
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback; the request handler has logged what failed.
        log.warning("DICOM connection not served", extra={"peer": str(client_address)})


class _DispatchingAssociationServer(_NoDelayAssociationServer):
    """Counts each accepted connection against its address's limit (refusing it above), then
    offers it to ``dispatch`` first, which may hand it over to another acceptor process
    (``PACSBRIDGE_DIMSE_PROCESSES``) and return True."""

    dispatch: Callable[[socket.socket, str], bool] | None = None
    limiter: AddressLimiter
    refuser: ConnectionRefuser

    def process_request(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        if not self.limiter.admit(address):
            PEER_LOG.warning(
                address,
                "DICOM connection refused: too many open from this address",
                limit=self.limiter.limit,
                answer="A-ASSOCIATE-RJ result 2 source 3 reason 2",
            )
            self.refuser.refuse(request)
            return
        try:
            if self.dispatch is not None and self.dispatch(request, address):
                request.close()  # the other process has its own descriptor of the connection
                return
            super().process_request(request, client_address)
        except Exception as exc:  # no thread to serve it, say
            PEER_LOG.warning(
                address, "DICOM connection not served", reason=f"{type(exc).__name__}: {exc}"
            )
            with contextlib.suppress(OSError):
                request.close()
            self.connection_ended(address)


class _HandedOverAssociationServer(_NoDelayAssociationServer):
    """Serves connections that another process accepted and handed over; listens on nothing
    (its socket is one end of a pair that never becomes readable)."""

    def server_bind(self) -> None:
        cast(socket.socket, self.socket).close()  # the one TCPServer made for us
        self.socket, self._quiet_peer = socket.socketpair()

    def server_activate(self) -> None:
        pass

    def server_close(self) -> None:
        super().server_close()
        self._quiet_peer.close()

    def serve_connection(self, connection: socket.socket, address: str) -> bool:
        """False when the peer is already gone (nothing to serve)."""
        try:
            connection.setblocking(True)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = connection.getpeername()
        except OSError:
            connection.close()
            return False
        # The address the accepting process counted the connection under.
        self.process_request(connection, (address, *peer[1:]))
        return True


class _TLSAssociationServer(_NoDelayAssociationServer):
    """The TLS port (DICOM PS3.15 B.1, B.9): the plain port's associations (handlers, access
    control, ARTIM timer, the limit of open connections per address, shared with the plain
    port) over TLS.

    Its connections are served here, in the process that accepts them, one thread each as on
    pynetdicom's own threaded server, and never handed over to the acceptor processes
    (``PACSBRIDGE_DIMSE_PROCESSES``): a TLS session's keys and buffered records live in this
    process's SSL object, and only the raw descriptor would travel. The event-driven reactor
    serves TLS connections (those it accepts here and those it opens to peers flagged
    ``tls``): it never leases a TLS socket (:class:`dicom_node.reactor.SocketLease`, so
    C-STOREs take pynetdicom's path); it counts the bytes already decrypted inside the SSL
    object (``SSLSocket.pending()``) as readable although ``poll`` does not see them; and it
    reads TLS sockets without blocking, since a readable descriptor may hold a record without
    data (``upper_layer.tls_readable``).

    The handshake runs on the connection's own thread, within the ARTIM timeout, not in the
    accepting thread as pynetdicom's ``get_request`` does it: there a client that connects and
    says nothing, or speaks plain DICOM, would keep the port from accepting anyone else."""

    limiter: AddressLimiter
    #: Seconds a TLS read or write may wait once the handshake is done (the network timeout):
    #: a peer that stops inside a TLS record cannot hold the connection's thread for ever.
    idle_timeout: float | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        with contextlib.suppress(OSError):  # the peer may already be gone
            client.setblocking(True)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = cast(ssl.SSLContext, self.ssl_context)
        wrapped = context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def process_request(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        if not self.limiter.admit(address):
            # Before the handshake no A-ASSOCIATE-RJ can be read by the peer: closed.
            PEER_LOG.warning(
                address,
                "DICOM TLS connection refused: too many open from this address",
                limit=self.limiter.limit,
                answer="connection closed",
            )
            with contextlib.suppress(OSError):
                request.close()
            return
        try:
            super().process_request(request, client_address)
        except Exception as exc:  # no thread to serve it, say
            PEER_LOG.warning(
                address, "DICOM connection not served", reason=f"{type(exc).__name__}: {exc}"
            )
            with contextlib.suppress(OSError):
                request.close()
            self.connection_ended(address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        connection = cast(ssl.SSLSocket, request)
        try:
            connection.settimeout(self.artim_timeout)
            connection.do_handshake()
            connection.settimeout(self.idle_timeout)
        except (OSError, ValueError) as exc:  # ssl.SSLError, a timeout, a reset connection
            reason = getattr(exc, "reason", None) or type(exc).__name__
            PEER_LOG.warning(address, "DICOM TLS handshake failed", reason=str(reason))
            with contextlib.suppress(OSError):
                connection.close()
            self.connection_ended(address)
            return
        log.debug(
            "DICOM TLS connection",
            extra={
                "peer": address,
                "tls": connection.version(),
                "client_certificate": str((connection.getpeercert() or {}).get("subject", "")),
            },
        )
        super().process_request_thread(request, client_address)


# When a requestor offers several transfer syntaxes in one presentation context, pynetdicom
# accepts the first of ours that it offers (PS3.8 9.3.3.2: the acceptor chooses one). Prefer
# what keeps every bit and the VRs: Explicit VR Little Endian, then lossless compression (kept
# as the modality encoded it), then the other uncompressed syntaxes, lossy ones last, so that a
# lossy encoding is stored only when the sender offers nothing else.
_LOSSLESS_COMPRESSED = (
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
)


def preferred_transfer_syntaxes() -> list[str]:
    first = [
        "1.2.840.10008.1.2.1",
        *_LOSSLESS_COMPRESSED,
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.2",
    ]
    return first + [str(ts) for ts in AllTransferSyntaxes if str(ts) not in first]


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        # ErrorComment is LO: at most 64 characters (PS3.7 C.4).
        ds.ErrorComment = comment[:64]
    return ds


class DimseServer:
    """The pynetdicom AE serving C-ECHO and C-STORE for the archive."""

    def __init__(
        self,
        archive: Archive,
        settings: Settings,
        services: Sequence[DimseService] | None = None,
        *,
        handed_over: bool = False,
        on_connection_closed: Callable[[str], None] | None = None,
    ) -> None:
        """``on_connection_closed`` is called with the peer address once for every connection
        this node served, when it has ended; ``handed_over``: serve connections another
        process accepted (:meth:`serve_connection`), not a port."""
        self.handed_over = handed_over
        self.on_connection_closed = on_connection_closed
        self.archive = archive
        self.settings = settings
        self.services = (
            list(services) if services is not None else default_services(archive, settings)
        )
        self.server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        #: The TLS port's server (``dimse_tls_port``), when this node has one.
        self.tls_server: _TLSAssociationServer | None = None
        # Open connections per peer address, counted where they are accepted (PS3.8 9.3.4:
        # those over the limit are rejected with local-limit-exceeded).
        self.limiter = AddressLimiter(settings.max_associations_per_address)
        self._refuser: ConnectionRefuser | None = None
        # Which DIMSE services each association's Calling AE Title may use.
        self.access = AccessControl(archive.peers, settings)
        self.audit = DimseAudit(archive)
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.maximum_pdu_size
        ae.require_called_aet = s.require_called_ae_title
        ae.require_calling_aet = list(s.allowed_calling_ae_titles)
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.acse_timeout = s.acse_timeout
        ae.add_supported_context(Verification)
        refused = resolve_sop_classes(s.refused_sop_classes)
        transfer_syntaxes = preferred_transfer_syntaxes()
        for uid in storage_sop_classes():
            if uid in refused:
                continue  # refused at negotiation: the context is rejected (PS3.8 9.3.3.2)
            # Accept SCP/SCU Role Selection (PS3.7 D.3.3.4): a C-GET requestor proposes to be
            # the Storage SCP on these contexts so that we can send it the instances.
            ae.add_supported_context(uid, transfer_syntaxes, scu_role=True, scp_role=True)
        for service in self.services:
            service.add_contexts(ae)
        return ae

    @property
    def handlers(self) -> list[Any]:
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self.access.on_requested),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
        ]
        for service in self.services:
            handlers.extend(service.handlers())
        return handlers

    def start(self) -> tuple[str, int]:
        """Start accepting associations in background threads; returns the bound address."""
        if not patches.installed():
            raise RuntimeError(
                "pynetdicom is not prepared for the DIMSE server: call "
                "dicom_node.patches.install() first"
            )
        s = self.settings
        # Made before anything listens: unusable TLS settings stop the start.
        tls_context = server_context(s) if s.dimse_tls_port and not self.handed_over else None
        base = _HandedOverAssociationServer if self.handed_over else _DispatchingAssociationServer
        # The listen backlog (socketserver's request_queue_size, read when the server binds
        # and listens on construction): its default of 5 overflows in a burst of connections,
        # and the peers whose SYN is dropped try again only after 1 s, then 3 s.
        server_class = type(base.__name__, (base,), {"request_queue_size": s.dimse_backlog})
        server = self.ae.make_server(
            (s.dimse_host, s.dimse_port),
            evt_handlers=self.handlers,
            server_class=server_class,
            request_handler=AcceptorRequestHandler,
        )
        assert isinstance(server, _NoDelayAssociationServer)
        server.artim_timeout = s.artim_timeout
        server.connection_ended = self._connection_ended
        server.request_gate = self.access.gate
        if isinstance(server, _DispatchingAssociationServer):
            server.limiter = self.limiter
            server.refuser = self._refuser = ConnectionRefuser(s.artim_timeout)
        self.server = server
        self.ae._servers.append(server)  # so that ae.shutdown() stops it (as start_server does)
        self._thread = threading.Thread(
            target=server.serve_forever, name="dimse-acceptor", daemon=True
        )
        self._thread.start()
        host, port = server.server_address[:2]
        log.info(
            "DIMSE listening",
            extra={"ae_title": s.ae_title, "host": host, "port": port},
        )
        if tls_context is not None:
            self._start_tls(tls_context)
        return str(host), int(port)

    def _start_tls(self, context: ssl.SSLContext) -> None:
        """Listen on ``dimse_tls_port`` too (see :class:`_TLSAssociationServer`)."""
        s = self.settings
        server_class = type(
            _TLSAssociationServer.__name__,
            (_TLSAssociationServer,),
            {"request_queue_size": s.dimse_backlog},
        )
        server = self.ae.make_server(
            (s.dimse_host, s.dimse_tls_port),
            ssl_context=context,
            evt_handlers=self.handlers,
            server_class=server_class,
            request_handler=AcceptorRequestHandler,
        )
        assert isinstance(server, _TLSAssociationServer)
        server.artim_timeout = s.artim_timeout
        server.idle_timeout = s.network_timeout or None
        # Only the address count: the acceptor processes' balance never sees these.
        server.connection_ended = self.limiter.release
        server.request_gate = self.access.gate
        server.limiter = self.limiter
        self.tls_server = server
        self.ae._servers.append(server)  # stopped by ae.shutdown(), as the plain port
        threading.Thread(
            target=server.serve_forever, name="dimse-tls-acceptor", daemon=True
        ).start()
        host, port = server.server_address[:2]
        log.info(
            "DIMSE listening over TLS",
            extra={
                "ae_title": s.ae_title,
                "host": host,
                "port": port,
                "client_certificates": "required"
                if context.verify_mode == ssl.CERT_REQUIRED
                else "not asked",
            },
        )

    def dispatch_with(self, dispatch: Callable[[socket.socket, str], bool]) -> None:
        """Offer every new connection (and its peer address) to ``dispatch``, which may hand
        it to another process; that process's end of it is then :meth:`handed_over_ended`."""
        if not isinstance(self.server, _DispatchingAssociationServer):
            raise RuntimeError("the DIMSE server is not started, or serves handed-over sockets")
        self.server.dispatch = dispatch

    def handed_over_ended(self, address: str) -> None:
        """A connection from ``address`` that ``dispatch`` handed to another process ended."""
        self.limiter.release(address)

    def serve_connection(self, connection: socket.socket, address: str) -> None:
        """Serve a connection another process accepted from ``address``."""
        if not isinstance(self.server, _HandedOverAssociationServer):
            raise RuntimeError("the DIMSE server is not started for handed-over sockets")
        try:
            served = self.server.serve_connection(connection, address)
        except Exception as exc:  # no thread to serve it, say
            PEER_LOG.warning(
                address, "DICOM connection not served", reason=f"{type(exc).__name__}: {exc}"
            )
            with contextlib.suppress(OSError):
                connection.close()
            served = False
        if not served and self.on_connection_closed is not None:
            self.on_connection_closed(address)  # it counted as one of ours: it has ended

    def stop_accepting(self) -> None:
        """Accept no more connections (the listening sockets close: a new connection is
        refused by the host); associations already open go on."""
        for server in self.ae._servers[:]:
            server.shutdown()  # pynetdicom's: stops serve_forever, closes the socket

    def drain(self, timeout: float) -> bool:
        """Stop accepting, wait up to ``timeout`` seconds for the open associations to end
        (released by their peers, or aborted by them or by a timeout), then :meth:`stop`
        (which aborts those still open: A-ABORT, PS3.8 7.3). True when none had to be."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = len(self.ae.active_associations)
        if left:
            log.warning(
                "DICOM associations still open at shutdown: aborted",
                extra={"associations": left, "waited_s": timeout},
            )
        self.stop()
        return not left

    def stop(self) -> None:
        self.ae.shutdown()  # stops our server, aborts what is still associated
        if self._refuser is not None:
            self._refuser.stop()
            self._refuser = None
        self.server = None
        self.tls_server = None

    def _connection_ended(self, address: str) -> None:
        """A connection this process served has ended (called once per connection)."""
        if not self.handed_over:
            self.limiter.release(address)
        if self.on_connection_closed is not None:
            self.on_connection_closed(address)

    # --- handlers ----------------------------------------------------------------------

    def handle_echo(self, event: Event) -> int:
        return STATUS_SUCCESS

    def handle_store(self, event: Event) -> Dataset | int:
        request = cast(C_STORE, event.request)
        try:
            # The data set exactly as received (pynetdicom keeps it in memory, PS3.10 7.1).
            stream = cast(BytesIO, request.DataSet).getvalue()
        except Exception as exc:
            log.warning("C-STORE without a usable data set", extra={"err": str(exc)})
            return _status(STATUS_CANNOT_UNDERSTAND, "no usable data set")
        status, comment = self._store(
            event.assoc.requestor.ae_title,
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            str(event.context.transfer_syntax),
            stream,
            assoc=event.assoc,
        )
        return _status(status, comment) if comment else status

    def store_received(
        self,
        assoc: Association,
        context: PresentationContext,
        request: store_receive.StoreRequest,
        data_set: bytes,
    ) -> tuple[int, str]:
        """The C-STORE of a request read off the association's socket by
        :mod:`dicom_node.store_receive`: (status, error comment or "")."""
        return self._store(
            assoc.requestor.ae_title,
            request.sop_class_uid,
            request.sop_instance_uid,
            str(context.transfer_syntax[0]),  # the accepted one (PS3.8 9.3.3.2)
            data_set,
            assoc=assoc,
        )

    def _store(
        self,
        calling: str,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        stream: bytes,
        *,
        assoc: Any = None,
    ) -> tuple[int, str]:
        """Store one received data set; (status, error comment or "") for the C-STORE-RSP."""
        try:
            # The data set in the DICOM File Format (PS3.10 7.1).
            data = file_meta(sop_class, sop_instance, transfer_syntax, calling) + stream
        except Exception as exc:  # the stream could not be framed as a Part-10 file
            log.warning("C-STORE without a usable data set", extra={"err": str(exc)})
            return STATUS_CANNOT_UNDERSTAND, "no usable data set"
        try:
            result = self.archive.ingest(
                data,
                calling_ae_title=calling,
                expected_sop_class_uid=sop_class,
                expected_sop_instance_uid=sop_instance,
                audit=self.audit.store_event(assoc),
            )
        except IngestError as exc:
            status = _STATUS_FOR_ERROR[exc.kind]
            log.warning(
                "C-STORE refused",
                extra={
                    "calling_ae": calling,
                    "sop": sop_instance,
                    "status": f"0x{status:04X}",
                    "reason": exc.reason,
                },
            )
            self.audit.stored(assoc, study_uid=None, failure=MINOR_FAILURE, reason=exc.reason)
            return status, _error_comment(exc.reason)
        except Exception as exc:
            log.exception("C-STORE failed", extra={"sop": sop_instance})
            self.audit.stored(assoc, study_uid=None, failure=SERIOUS_FAILURE, reason="failed")
            return STATUS_PROCESSING_FAILURE, _error_comment(
                f"processing failure: {type(exc).__name__}"
            )
        self.audit.stored(assoc, study_uid=result.study_instance_uid, recorded=result.audited)
        log.debug(
            "C-STORE",
            extra={
                "calling_ae": calling,
                "sop": result.sop_instance_uid,
                "outcome": result.outcome,
            },
        )
        if result.warning:
            log.warning(
                "C-STORE stored with a warning",
                extra={"calling_ae": calling, "sop": sop_instance, "reason": result.warning},
            )
            return STATUS_WARNING_DATASET_MISMATCH, _error_comment(result.warning)
        return STATUS_SUCCESS, ""
