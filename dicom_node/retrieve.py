"""C-MOVE and C-GET SCP: Patient Root and Study Root Query/Retrieve (PS3.4 C.4.2, C.4.3).

pynetdicom's Query/Retrieve service class runs the protocol: it asks the handlers here for the
destination (C-MOVE), the number of sub-operations and one ``(status, data set)`` per
sub-operation, and it sends the Pending responses with their counters, the final Success /
Warning ``0xB000`` / Failure ``0xA702`` with the Failed SOP Instance UID List, ``0xFE00`` after
a C-CANCEL and ``0xA801`` for an unknown Move Destination. For a C-MOVE it opens one association
to the destination and sends every sub-operation over it.

What the handlers yield per sub-operation is a :class:`StoreSubOperation`: a placeholder that
names the instance. The association that carries the sub-operations (the requestor's own for a
C-GET, the one to the destination for a C-MOVE) gets a :class:`SubOperationSender` as its
``send_c_store``, which sends the stored file:

- as stored, byte for byte, when the peer accepted its transfer syntax for its SOP class
  (nothing is decoded). The sender borrows the association's socket from the DUL thread for
  the run of sub-operations (dicom_node.reactor.SocketLease): it writes each request as
  finished PDUs and reads the plain C-STORE responses itself; anything else it reads goes to
  pynetdicom, which then carries on;
- otherwise converted to Explicit, else Implicit VR Little Endian by the archive's one converter
  (:func:`archive.transcode.to_uncompressed`, the one WADO-RS uses too) when the peer accepted
  one of those;
- otherwise not at all: the sub-operation fails and its SOP Instance UID is listed.
  Nothing is ever sent on a presentation context the peer did not accept.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from archive import Archive
from archive.blobstore import BlobStore
from archive.dicom import part10_data_set_offset
from archive.instance_io import inflate_limit, open_instance
from archive.retrieve import (
    InvalidRetrieveIdentifier,
    RetrieveItem,
    RetrieveKeys,
    RetrieveModel,
    find_instances,
)
from archive.transcode import UNCOMPRESSED_TARGETS, to_uncompressed
from config import Settings
from dicom_node.audit import DimseAudit
from dicom_node.pdata import (
    MAX_PREBUILT,
    c_store_request_command,
    pdata_pdus,
    plain_store_response_status,
)
from dicom_node.reactor import SocketLease
from dicom_node.services import Handler
from dicom_node.status import (  # PS3.4 C.4.2.1.5 (C-MOVE), C.4.3.1.3 (C-GET)
    STATUS_CANCEL,
    STATUS_IDENTIFIER_MISMATCH,
    STATUS_OUT_OF_RESOURCES_MATCHES,
    STATUS_OUT_OF_RESOURCES_SUBOPERATIONS,
    STATUS_PENDING,
    STATUS_UNABLE_TO_PROCESS,
)
from dicom_node.tls import PeerTLS, TLSConfigurationError

log = logging.getLogger(__name__)

#: The Number of … Sub-operations are US (PS3.7 C.4.2.1): a retrieve has at most this many.
MAX_SUBOPERATIONS = 65535
#: PS3.8 9.3.2.2: a presentation context ID is an odd number from 1 to 255.
MAX_PROPOSED_CONTEXTS = 128

MOVE_MODELS = {
    str(PatientRootQueryRetrieveInformationModelMove): RetrieveModel.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelMove): RetrieveModel.STUDY_ROOT,
}
GET_MODELS = {
    str(PatientRootQueryRetrieveInformationModelGet): RetrieveModel.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelGet): RetrieveModel.STUDY_ROOT,
}
#: Explicit, else Implicit VR Little Endian: what an instance is converted to for a peer that
#: did not accept its stored transfer syntax.
_UNCOMPRESSED_FALLBACKS = UNCOMPRESSED_TARGETS

StatusYield = tuple[int | Dataset, Dataset | None]


class SubOperationFailed(Exception):
    """One C-STORE sub-operation cannot be performed (counted as failed, never sent)."""


class StoreSubOperation(Dataset):
    """What a handler yields for one sub-operation: the instance's SOP Class and Instance UIDs
    (pynetdicom lists the latter when the sub-operation fails) and the archive item.

    It has no File Meta Information on purpose: should it ever reach pynetdicom's own
    ``send_c_store`` instead of :class:`SubOperationSender`, pynetdicom refuses it (the
    sub-operation fails) rather than sending a two-element data set.
    """

    def __init__(self, item: RetrieveItem) -> None:
        super().__init__()
        self.SOPClassUID = UID(item.sop_class_uid)
        self.SOPInstanceUID = UID(item.sop_instance_uid)
        self.retrieve_item = item


@dataclass(frozen=True, slots=True)
class Originator:
    """The C-MOVE request a sub-operation serves (PS3.7 9.3.1.1 Move Originator fields)."""

    ae_title: str
    message_id: int


class SubOperationSender:
    """Performs the C-STORE sub-operations of one retrieve on one association."""

    def __init__(
        self,
        assoc: Association,
        blobs: BlobStore,
        *,
        ae_title: str,
        max_inflated: int,
        originator: Originator | None = None,
    ) -> None:
        self.assoc = assoc
        self.blobs = blobs
        self.ae_title = ae_title
        self.max_inflated = max_inflated
        self.originator = originator
        self._send = partial(Association.send_c_store, assoc)
        # SOP class -> accepted transfer syntaxes; the contexts do not change once negotiated
        self._accepted: dict[str, list[UID]] = {}
        self._context_ids: dict[tuple[str, str], int | None] = {}
        # Off for the rest of the retrieve once the peer sends anything but a plain response.
        self._leasing = True

    @classmethod
    def install(
        cls,
        assoc: Association,
        blobs: BlobStore,
        *,
        ae_title: str,
        max_inflated: int,
        originator: Originator | None = None,
    ) -> SubOperationSender:
        """Route the association's ``send_c_store`` of :class:`StoreSubOperation` through a new
        sender; any other data set still goes to pynetdicom's own ``send_c_store``."""
        sender = cls(
            assoc, blobs, ae_title=ae_title, max_inflated=max_inflated, originator=originator
        )
        setattr(assoc, "send_c_store", sender.send_c_store)  # noqa: B010 (mypy: method)
        return sender

    def send_c_store(
        self,
        dataset: Any,
        msg_id: int = 1,
        priority: int = 2,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> Dataset:
        if not isinstance(dataset, StoreSubOperation):
            return self._send(dataset, msg_id, priority, originator_aet, originator_id)
        if self.originator is not None:
            # pynetdicom would name us; PS3.7 9.3.1.1 wants the AE that requested the C-MOVE.
            originator_aet = self.originator.ae_title
            originator_id = self.originator.message_id
        item = dataset.retrieve_item
        try:
            with self._file_to_send(item) as path:
                status = self._send_leased(
                    path, item, msg_id, priority, originator_aet, originator_id
                )
                if status is not None:
                    return status
                return self._send(path, msg_id, priority, originator_aet, originator_id)
        except SubOperationFailed as exc:
            log.warning(
                "C-STORE sub-operation not performed",
                extra={
                    "sop": item.sop_instance_uid,
                    "peer": self.assoc.acceptor.ae_title
                    if self.assoc.is_requestor
                    else self.assoc.requestor.ae_title,
                    "reason": str(exc),
                },
            )
            raise

    # --- the sub-operation over the leased socket -----------------------------------------
    def _send_leased(
        self,
        path: Path,
        item: RetrieveItem,
        msg_id: int,
        priority: int,
        originator_aet: str | None,
        originator_id: int | None,
    ) -> Dataset | None:
        """What pynetdicom's ``send_c_store(path)`` does, over the leased socket; None when
        this instance or association cannot take this path (pynetdicom's is used then)."""
        if not self._leasing:
            return None
        context_id = self._context_id(item)
        if context_id is None:
            return None
        try:
            if path.stat().st_size > MAX_PREBUILT:
                return None  # pynetdicom streams it from disk in PDU-sized reads
            data = path.read_bytes()
        except OSError as exc:
            raise SubOperationFailed(f"cannot read the stored file: {exc}") from exc
        offset = part10_data_set_offset(data)
        if offset is None:
            return None  # pynetdicom parses the File Meta Information itself
        assoc = self.assoc
        lease: SocketLease | None = getattr(assoc.dul, "_pb_lease", None)  # patches.install()
        if lease is None or not lease.acquire():
            self._leasing = False
            return None
        encoded = pdata_pdus(
            context_id,
            c_store_request_command(
                item.sop_class_uid,
                item.sop_instance_uid,
                message_id=msg_id,
                priority=priority,
                originator_ae_title=originator_aet,
                originator_message_id=originator_id,
            ),
            memoryview(data)[offset:],
            assoc.dimse.maximum_pdu_size,
        )
        del data
        # As pynetdicom's send_c_store: keep the association reactor off the DIMSE queue.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            return self._exchange(lease, encoded, msg_id)
        finally:
            assoc._reactor_checkpoint.set()

    def _exchange(self, lease: SocketLease, encoded: bytes, msg_id: int) -> Dataset:
        """Send one C-STORE-RQ and return the status of its response (an empty data set, a
        failed sub-operation, when the connection is lost or the peer does not answer)."""
        assoc = self.assoc
        try:
            lease.send(encoded)
        except OSError:
            self._leasing = False
            lease.release(connection_lost=True)
            return Dataset()
        pdu = lease.read_pdu(assoc.dimse_timeout)
        if pdu is None:
            self._leasing = False
            if lease.held_here:  # no response within the DIMSE timeout: abort, as pynetdicom
                lease.release()
                assoc._handle_no_response()
            return Dataset()
        status = plain_store_response_status(pdu, msg_id)
        if status is not None:
            result = Dataset()
            result.Status = status
            return result
        # A response with optional status fields, a C-CANCEL, an abort...: pynetdicom takes
        # it from here, and the rest of the retrieve.
        self._leasing = False
        lease.release(unhandled_pdu=pdu)
        _, rsp = assoc.dimse.get_msg(block=True)
        if rsp is None:
            assoc._handle_no_response()
            return Dataset()
        return assoc._check_received_status(rsp)

    def _context_id(self, item: RetrieveItem) -> int | None:
        """The accepted context, with us as Storage SCU, for the instance as stored."""
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        if key not in self._context_ids:
            self._context_ids[key] = next(
                (
                    int(cx.context_id)
                    for cx in self.assoc.accepted_contexts
                    if cx.abstract_syntax == item.sop_class_uid
                    and cx.as_scu
                    and cx.transfer_syntax
                    and cx.transfer_syntax[0] == item.transfer_syntax_uid
                    and cx.context_id is not None
                ),
                None,
            )
        return self._context_ids[key]

    # --- choosing what to send -----------------------------------------------------------
    def accepted_transfer_syntaxes(self, sop_class_uid: str) -> list[UID]:
        """Transfer syntaxes the peer accepted for ``sop_class_uid`` with us as Storage SCU."""
        accepted = self._accepted.get(sop_class_uid)
        if accepted is None:
            accepted = self._accepted[sop_class_uid] = [
                cx.transfer_syntax[0]
                for cx in self.assoc.accepted_contexts
                if cx.abstract_syntax == sop_class_uid and cx.as_scu and cx.transfer_syntax
            ]
        return accepted

    @contextlib.contextmanager
    def _file_to_send(self, item: RetrieveItem) -> Iterator[Path]:
        accepted = self.accepted_transfer_syntaxes(item.sop_class_uid)
        if item.transfer_syntax_uid in accepted:
            try:
                local = self.blobs.local_path(item.blob_key)
            except Exception as exc:
                raise SubOperationFailed(f"the stored file is missing: {exc}") from exc
            if local is not None:
                yield local
                return
            with self._temporary_file() as (path, fh):
                try:
                    for chunk in self.blobs.open(item.blob_key):
                        fh.write(chunk)
                except Exception as exc:
                    raise SubOperationFailed(f"cannot read the stored file: {exc}") from exc
                fh.close()
                yield path
            return
        target = next((ts for ts in _UNCOMPRESSED_FALLBACKS if ts in accepted), None)
        if target is None:
            sop_class = UID(item.sop_class_uid).name
            raise SubOperationFailed(
                f"the peer accepted {sop_class} only in "
                f"{', '.join(UID(ts).name for ts in accepted)}, not in the stored "
                f"{UID(item.transfer_syntax_uid).name} nor uncompressed"
                if accepted
                else f"the peer accepted no presentation context for {sop_class}"
            )
        try:
            with open_instance(self.blobs, item.blob_key, max_inflated=self.max_inflated) as stored:
                converted = to_uncompressed(
                    stored,
                    target,
                    max_inflated=self.max_inflated,
                    source_ae_title=self.ae_title,
                )
        except Exception as exc:
            raise SubOperationFailed(
                f"cannot convert {UID(item.transfer_syntax_uid).name} to {target.name}: {exc}"
            ) from exc
        with self._temporary_file() as (path, fh):
            fh.write(converted)
            fh.close()
            yield path

    @staticmethod
    @contextlib.contextmanager
    def _temporary_file() -> Iterator[tuple[Path, Any]]:
        fd, name = tempfile.mkstemp(prefix="pacsbridge-retrieve-", suffix=".dcm")
        path = Path(name)
        fh = os.fdopen(fd, "wb")
        try:
            yield path, fh
        finally:
            fh.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def proposed_contexts(items: list[RetrieveItem]) -> list[PresentationContext]:
    """What to propose to a C-MOVE destination: per SOP class, one context per stored transfer
    syntax (so that accepting one means exactly that syntax), and one offering Explicit and
    Implicit VR Little Endian for conversion. Verification comes first: a peer that refuses
    every storage context still accepts the association (pynetdicom gives up on an association
    without any accepted context), so that the sub-operations fail one by one with their SOP
    Instance UIDs listed instead of the whole move failing as if the peer were unknown."""
    by_class: dict[str, list[str]] = {}
    for item in items:
        syntaxes = by_class.setdefault(item.sop_class_uid, [])
        if item.transfer_syntax_uid not in syntaxes:
            syntaxes.append(item.transfer_syntax_uid)
    contexts: list[PresentationContext] = [build_context(Verification)]
    for sop_class, syntaxes in by_class.items():
        contexts += [build_context(sop_class, ts) for ts in syntaxes]
        fallback: list[str | UID] = [ts for ts in _UNCOMPRESSED_FALLBACKS if ts not in syntaxes]
        if fallback:
            contexts.append(build_context(sop_class, fallback))
    if len(contexts) > MAX_PROPOSED_CONTEXTS:
        # Too many for one association: one context per SOP class listing every syntax (the
        # peer then picks one; converting covers the rest).
        merged = [
            build_context(sop_class, list(dict.fromkeys([*syntaxes, *_UNCOMPRESSED_FALLBACKS])))
            for sop_class, syntaxes in by_class.items()
        ]
        contexts = [build_context(Verification), *merged[: MAX_PROPOSED_CONTEXTS - 1]]
    return contexts


def _failure(status: int, comment: str, keyword: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO (PS3.7 C.4)
    if keyword:
        tag = pydicom.datadict.tag_for_keyword(keyword)
        if tag is not None:
            ds.OffendingElement = [tag]
    return ds


def _tune_outgoing_connection(event: Event) -> None:
    """The same socket settings the node uses for incoming associations."""
    assoc_socket = event.assoc.dul.socket
    sock = assoc_socket.socket if assoc_socket is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class RetrieveService:
    """C-MOVE and C-GET for the Patient Root and Study Root information models."""

    def __init__(self, archive: Archive, settings: Settings) -> None:
        self.archive = archive
        self.settings = settings
        # A C-MOVE destination flagged ``tls`` is sent to over TLS (PS3.15 B.1).
        self.peer_tls = PeerTLS(settings)
        self.audit = DimseAudit(archive)
        # send_c_store(path) streams a file's data set as stored (pynetdicom's
        # STORE_SEND_CHUNKED_DATASET, set by dicom_node.patches.install()); pynetdicom then
        # requires an exact transfer syntax match, which the sender checks first.

    def add_contexts(self, ae: AE) -> None:
        for uid in (*MOVE_MODELS, *GET_MODELS):
            ae.add_supported_context(uid)

    def handlers(self) -> list[Handler]:
        return [
            (evt.EVT_REQUESTED, self.prefer_uncompressed_for_get),
            (evt.EVT_C_MOVE, self.handle_move),
            (evt.EVT_C_GET, self.handle_get),
        ]

    @staticmethod
    def prefer_uncompressed_for_get(event: Event) -> None:
        """Before negotiation: on the storage contexts a C-GET requestor proposes with the SCP
        role, accept Explicit, else Implicit VR Little Endian ahead of anything else it offers.

        pynetdicom accepts the first of *our* transfer syntaxes that a proposed context lists,
        and a context carries one transfer syntax. Uncompressed is the one choice every stored
        instance of the SOP class can be sent in (compressed ones are decoded); accepting, say,
        JPEG 2000 would leave every uncompressed instance of that class unsendable. A requestor
        that proposes a context per transfer syntax still gets each accepted, and then each
        instance as stored.
        """
        primitive = event.assoc.requestor.primitive
        if primitive is None:
            return
        get_storage = {
            str(item.sop_class_uid)
            for item in primitive.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.scp_role
        }
        if not get_storage:
            return
        # The contexts are shared by every association of the server (dicom_node/server.py
        # does not deep-copy them per association): reorder copies.
        contexts = list(event.assoc.acceptor.supported_contexts)
        for index, cx in enumerate(contexts):
            if cx.abstract_syntax in get_storage:
                syntaxes = list(cx.transfer_syntax)
                first = [
                    ts for wanted in _UNCOMPRESSED_FALLBACKS for ts in syntaxes if ts == wanted
                ]
                reordered = [*first, *(ts for ts in syntaxes if ts not in first)]
                if reordered != syntaxes:
                    mine = copy.copy(cx)
                    mine._transfer_syntax = reordered  # already validated UIDs
                    contexts[index] = mine
        event.assoc.acceptor.supported_contexts = contexts

    # --- shared --------------------------------------------------------------------------
    def _audit(
        self,
        event: Event,
        service: str,
        failure: Dataset | str | None,
        destination: str | None = None,
    ) -> None:
        """One "DICOM Instances Transferred" per study the identifier names (PS3.15 A.5.3.4)."""
        studies: tuple[str, ...] = ()
        patient = None
        try:
            identifier = event.identifier
            value = identifier.get("StudyInstanceUID")
            if value:
                values = [value] if isinstance(value, str) else list(value)
                studies = tuple(str(v).strip() for v in values if str(v).strip())
            patient = str(identifier.get("PatientID") or "").strip() or None
        except Exception:  # an identifier that cannot be decoded: the event names no study
            studies = ()
        failed = None
        if isinstance(failure, str):
            failed = failure
        elif failure is not None:
            failed = str(failure.get("ErrorComment") or f"0x{int(failure.Status):04X}")
        self.audit.retrieved(
            event.assoc, service, studies, patient, destination=destination, failed=failed
        )

    def _resolve(
        self, event: Event, model: RetrieveModel
    ) -> tuple[list[RetrieveItem], Dataset | None]:
        """The instances to send, or a failure status for the final response."""
        try:
            identifier = event.identifier
            keys = RetrieveKeys.from_identifier(identifier, model)
        except InvalidRetrieveIdentifier as exc:
            return [], _failure(STATUS_IDENTIFIER_MISMATCH, exc.reason, exc.keyword)
        except Exception as exc:
            log.warning("retrieve identifier cannot be decoded", extra={"err": str(exc)})
            return [], _failure(STATUS_UNABLE_TO_PROCESS, f"identifier cannot be decoded: {exc}")
        try:
            items = find_instances(self.archive.db, keys)
        except InvalidRetrieveIdentifier as exc:
            return [], _failure(STATUS_IDENTIFIER_MISMATCH, exc.reason, exc.keyword)
        except Exception as exc:
            log.exception("retrieve: the index cannot be read")
            return [], _failure(
                STATUS_OUT_OF_RESOURCES_MATCHES, f"index unavailable: {type(exc).__name__}"
            )
        if len(items) > MAX_SUBOPERATIONS:
            return [], _failure(
                STATUS_OUT_OF_RESOURCES_SUBOPERATIONS,
                f"{len(items)} instances match; at most {MAX_SUBOPERATIONS} per retrieve",
            )
        log.info(
            "retrieve",
            extra={
                "calling_ae": event.assoc.requestor.ae_title,
                "level": keys.level,
                "instances": len(items),
            },
        )
        return items, None

    @staticmethod
    def _suboperations(
        event: Event, items: list[RetrieveItem], failure: Dataset | None
    ) -> Iterator[int | StatusYield]:
        """The number of sub-operations, then one pending yield per instance."""
        if failure is not None:
            # pynetdicom sends a final response only for a retrieve with sub-operations; the
            # failure then reports that one announced sub-operation as failed.
            yield 1
            yield failure, None
            return
        yield len(items)
        for item in items:
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            yield STATUS_PENDING, StoreSubOperation(item)

    # --- C-GET ---------------------------------------------------------------------------
    def handle_get(self, event: Event) -> Iterator[int | StatusYield]:
        model = GET_MODELS[str(event.request.AffectedSOPClassUID)]
        items, failure = self._resolve(event, model)
        self._audit(event, "C-GET", failure)
        if failure is None:
            # The sub-operations go back over the requestor's association, on the storage
            # contexts it proposed with the SCP role (PS3.7 D.3.3.4).
            SubOperationSender.install(
                event.assoc,
                self.archive.blobs,
                ae_title=self.settings.ae_title,
                max_inflated=inflate_limit(self.settings),
            )
        yield from self._suboperations(event, items, failure)

    # --- C-MOVE --------------------------------------------------------------------------
    def handle_move(self, event: Event) -> Iterator[Any]:
        model = MOVE_MODELS[str(event.request.AffectedSOPClassUID)]
        destination = (event.move_destination or "").strip()
        peer = self.archive.peers.by_ae_title(destination) if destination else None
        if peer is None:
            log.warning(
                "C-MOVE to an unknown destination",
                extra={"calling_ae": event.assoc.requestor.ae_title, "destination": destination},
            )
            self._audit(event, "C-MOVE", "unknown move destination", destination)
            yield None, None  # pynetdicom answers 0xA801
            return
        try:
            tls_args = self.peer_tls.tls_args(peer.tls, peer.host)
        except TLSConfigurationError as exc:
            log.error(
                "C-MOVE destination needs TLS, which the settings cannot provide",
                extra={"destination": destination, "err": str(exc)},
            )
            yield None, None  # as for a destination that cannot be reached: 0xA801
            return
        items, failure = self._resolve(event, model)
        self._audit(event, "C-MOVE", failure, destination)
        originator = Originator(event.assoc.requestor.ae_title, int(event.request.MessageID or 0))
        blobs, ae_title = self.archive.blobs, self.settings.ae_title
        max_inflated = inflate_limit(self.settings)

        def install_sender(established: Event) -> None:
            SubOperationSender.install(
                established.assoc,
                blobs,
                ae_title=ae_title,
                max_inflated=max_inflated,
                originator=originator,
            )

        yield (
            peer.host,
            peer.port,
            {
                "contexts": proposed_contexts(items),
                "max_pdu": self.settings.maximum_pdu_size,
                "tls_args": tls_args,
                "evt_handlers": [
                    (evt.EVT_CONN_OPEN, _tune_outgoing_connection),
                    (evt.EVT_ESTABLISHED, install_sender),
                ],
            },
        )
        yield from self._suboperations(event, items, failure)
