"""DIMSE service class provider: Verification (C-ECHO) and Storage (C-STORE).

PS3.4 Annex A (Verification) and Annex B (Storage). Every storage SOP class pynetdicom knows is
offered with every transfer syntax pydicom knows, and each instance is stored as received.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any, cast

import pynetdicom.association
import pynetdicom.transport
from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from archive import Archive, IngestError, IngestErrorKind
from archive.ingest import resolve_sop_classes
from config import Settings
from dicom_node import pdata, reactor, store_receive, uids
from dicom_node.part10 import file_meta
from dicom_node.services import DimseService, default_services
from dicom_node.sop_classes import storage_sop_classes

log = logging.getLogger(__name__)

# PS3.4 B.2.3 / PS3.7 C: C-STORE status codes.
STATUS_SUCCESS = 0x0000
STATUS_REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110

_STATUS_FOR_ERROR = {
    IngestErrorKind.CANNOT_UNDERSTAND: STATUS_CANNOT_UNDERSTAND,
    IngestErrorKind.DATASET_MISMATCH: STATUS_DATASET_MISMATCH,
    IngestErrorKind.REFUSED: STATUS_REFUSED_SOP_CLASS_NOT_SUPPORTED,
    IngestErrorKind.OUT_OF_RESOURCES: STATUS_OUT_OF_RESOURCES,
}


class _NoDelayAssociationServer(ThreadedAssociationServer):
    """Sets TCP_NODELAY on every accepted socket, so that our small DIMSE responses go out at
    once instead of waiting on Nagle's algorithm for the sender's delayed ACK."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        with contextlib.suppress(OSError):  # the peer may already be gone
            client.setblocking(True)  # whatever the listening socket is
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address


# pynetdicom's reactors poll their queues (the association reactor sleeps 1 ms on every loop,
# the DUL when idle); ours wait for work instead (dicom_node/reactor.py). A few of
# pynetdicom's hand-overs (pausing the reactor, stopping the DUL) still spin on time.sleep:
# keep those spins short.
REACTOR_POLL = 0.0001


class _ReactorClock:
    """Stands in for the ``time`` module inside ``pynetdicom.association``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, REACTOR_POLL))


pynetdicom.association.time = _ReactorClock()  # type: ignore[assignment]


def _copy_for_association(value: Any) -> Any:
    """pynetdicom deep-copies the server's presentation contexts for every new association:
    with every storage SOP class and transfer syntax that is most of the cost of accepting one
    (tens of milliseconds). Negotiation builds new contexts for its results and never changes
    the supported ones, so each association gets its own list of the same contexts; our one
    handler that changes a context (C-GET transfer syntax order) replaces it with a copy."""
    if isinstance(value, list) and all(isinstance(cx, PresentationContext) for cx in value):
        return list(value)
    return copy.deepcopy(value)


pynetdicom.transport.deepcopy = _copy_for_association  # type: ignore[assignment]


def _accepted_contexts(self: Association) -> list[PresentationContext]:
    """pynetdicom sorts the accepted contexts on every call, and every C-STORE it sends looks
    its context up there: sort once per negotiation (the dict is replaced, never changed)."""
    source = self._accepted_cx
    cached = getattr(self, "_pb_accepted_contexts", None)
    if cached is None or cached[0] is not source or cached[1] != len(source):
        ordered = sorted(source.values(), key=lambda cx: cast(int, cx.context_id))
        cached = (source, len(source), ordered)
        self._pb_accepted_contexts = cached  # type: ignore[attr-defined]
    return list(cached[2])


Association.accepted_contexts = property(_accepted_contexts)  # type: ignore[method-assign,assignment]
reactor.install()  # event-driven DUL and association reactors
uids.install()  # UIDs validated once per distinct value
pdata.install()  # C-STORE requests and responses, pending C-FIND responses as prebuilt PDUs
# pynetdicom formats every C-FIND/C-GET/C-MOVE identifier for its debug log, logged or not:
# most of the cost of a C-FIND response. Our own logs say what a request was.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False


class _DispatchingAssociationServer(_NoDelayAssociationServer):
    """Offers every accepted connection to ``dispatch`` first, which may hand it over to
    another acceptor process (``PACSBRIDGE_DIMSE_PROCESSES``) and return True."""

    dispatch: Callable[[socket.socket], bool] | None = None

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.dispatch is not None and self.dispatch(request):
            request.close()  # the other process has its own descriptor of the connection
            return
        super().process_request(request, client_address)


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

    def serve_connection(self, connection: socket.socket) -> bool:
        """False when the peer is already gone (nothing to serve)."""
        try:
            connection.setblocking(True)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            address = connection.getpeername()
        except OSError:
            connection.close()
            return False
        self.process_request(connection, address)
        return True


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
        on_connection_closed: Callable[[], None] | None = None,
    ) -> None:
        self.handed_over = handed_over
        self.on_connection_closed = on_connection_closed
        self.archive = archive
        self.settings = settings
        self.services = (
            list(services) if services is not None else default_services(archive, settings)
        )
        self.server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        s = self.settings
        # pynetdicom's standard handlers log every PDU and message, formatting each one even
        # when the log level drops it: keep them for debugging only.
        _config.LOG_HANDLER_LEVEL = "standard" if s.log_level.upper() == "DEBUG" else "none"
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
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
        ]
        if self.on_connection_closed is not None:
            handlers.append((evt.EVT_CONN_CLOSE, self._connection_closed))
        for service in self.services:
            handlers.extend(service.handlers())
        return handlers

    def start(self) -> tuple[str, int]:
        """Start accepting associations in background threads; returns the bound address."""
        s = self.settings
        server = self.ae.make_server(
            (s.dimse_host, s.dimse_port),
            evt_handlers=self.handlers,
            server_class=(
                _HandedOverAssociationServer if self.handed_over else _DispatchingAssociationServer
            ),
        )
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
        return str(host), int(port)

    def dispatch_with(self, dispatch: Callable[[socket.socket], bool]) -> None:
        """Offer every new connection to ``dispatch``, which may hand it to another process."""
        if not isinstance(self.server, _DispatchingAssociationServer):
            raise RuntimeError("the DIMSE server is not started, or serves handed-over sockets")
        self.server.dispatch = dispatch

    def serve_connection(self, connection: socket.socket) -> None:
        """Serve a connection another process accepted."""
        if not isinstance(self.server, _HandedOverAssociationServer):
            raise RuntimeError("the DIMSE server is not started for handed-over sockets")
        if not self.server.serve_connection(connection) and self.on_connection_closed:
            self.on_connection_closed()  # it counted as one of ours: it has ended already

    def stop(self) -> None:
        self.ae.shutdown()  # stops our server, aborts what is still associated
        self.server = None

    # --- handlers ----------------------------------------------------------------------
    def _connection_closed(self, event: Event) -> None:
        if self.on_connection_closed is not None:
            self.on_connection_closed()

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
        )

    def _store(
        self, calling: str, sop_class: str, sop_instance: str, transfer_syntax: str, stream: bytes
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
            return status, exc.reason[:64]
        except Exception as exc:
            log.exception("C-STORE failed", extra={"sop": sop_instance})
            return STATUS_PROCESSING_FAILURE, f"processing failure: {type(exc).__name__}"[:64]
        log.debug(
            "C-STORE",
            extra={
                "calling_ae": calling,
                "sop": result.sop_instance_uid,
                "outcome": result.outcome,
            },
        )
        return STATUS_SUCCESS, ""
