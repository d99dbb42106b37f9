"""Access control by Calling AE Title: which DIMSE services an association may use.

Orthanc's defaults are the model (``DicomAlwaysAllowEcho``/``Store`` on, ``…Find``/``Move``/
``Get`` off, ``DicomCheckModalityHost`` per modality here):

- C-ECHO and C-STORE are served for any calling AE title;
- C-FIND (every information model, worklist included), C-MOVE and C-GET, which read PHI out,
  only for a **declared peer** (``[peers.<name>]`` or ``/api/peers``) whose AE title is the
  association's Calling AE Title and whose ``permissions`` hold the service, unless
  ``dimse_query_from_any_ae`` is set (and ``auth`` is not ``required``);
- a declared peer's ``permissions`` hold for every service: one without ``store`` is refused
  C-STORE, one without ``echo`` C-ECHO;
- reporting performed procedure steps (MPPS N-CREATE / N-SET, ``dicom_node/mpps.py``) changes
  orders as storing changes the archive: it takes the ``store`` permission;
- a peer with ``check_host``: its associations must come from an address its ``host`` resolves
  to; from elsewhere its AE title counts as undeclared (someone else using it);
- ``auth = "required"``: an association whose Calling AE Title is no declared peer is rejected
  at once, A-ASSOCIATE-RJ rejected-permanent, DICOM UL service-user, calling-AE-title-not-
  recognized (PS3.8 9.3.4, Table 9-21), decided once per association.

A refused request is answered with the general status 0124H "Refused: Not Authorized"
(PS3.7 Annex C.5, failure status class) and an Error Comment saying why; the association stays
established for its next request. The refusal happens before any service class runs
(:meth:`AccessControl.gate`, called by the association's reactor for every request), so a
refused C-MOVE never opens an association to its destination.

What an association may do is decided once, when its A-ASSOCIATE-RQ arrives
(:meth:`AccessControl.on_requested`), from the registry as it is then: API peers change at run
time, so a decision is reused for other associations of the same calling AE title and address
for at most ``CACHE_SECONDS``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import (
    C_ECHO,
    C_FIND,
    C_GET,
    C_MOVE,
    C_STORE,
    N_CREATE,
    N_GET,
    N_SET,
)
from pynetdicom.events import Event

from archive.peers import PeerRecord, PeerRegistry
from config import Settings
from dicom_node.status import STATUS_REFUSED_NOT_AUTHORIZED
from dicom_node.upper_layer import PEER_LOG

log = logging.getLogger(__name__)

#: How long a decision (and a peer host's addresses) is reused, in seconds.
CACHE_SECONDS = 1.0
#: The most decisions kept: beyond that the cache starts over.
MAX_CACHED = 4096

#: The permission each DIMSE request needs; requests of other kinds are not ours to refuse.
SERVICES: dict[type, str] = {
    C_ECHO: "echo",
    C_STORE: "store",
    C_FIND: "find",
    C_MOVE: "move",
    C_GET: "get",
    # Modality Performed Procedure Step (dicom_node/mpps.py): a modality reporting what it
    # performed changes orders, as storing changes the archive.
    N_CREATE: "store",
    N_SET: "store",
    # Reading a step back (its Retrieve SOP Class) discloses the patient, as a query does.
    N_GET: "find",
}
#: The services any calling AE title may use (unless it is a peer's, without the permission).
OPEN_SERVICES = frozenset(("echo", "store"))

_HINT = (
    "declare it ([peers.<name>] with ae_title, host, port and permissions, or "
    "PUT /api/peers/<name>) or set PACSBRIDGE_DIMSE_QUERY_FROM_ANY_AE=true"
)


@dataclass(frozen=True, slots=True)
class Access:
    """What one association may do."""

    calling_ae: str
    address: str
    peer: PeerRecord | None
    """The declared peer the association is from (None: undeclared, or from the wrong host)."""
    allowed: frozenset[str]
    why_not: str
    """Why a service outside ``allowed`` is refused (an Error Comment, at most 64 characters)."""
    detail: str
    """The same for the log, with what to do about it."""

    def refusal(self, service: str) -> tuple[str, str] | None:
        """(Error Comment, log detail) when ``service`` is refused, else None."""
        if service in self.allowed:
            return None
        if self.peer is not None:
            comment = f"calling AE {self.calling_ae!r} has no {service!r} permission"
            return comment, (
                f"peer {self.peer.name!r} lacks the {service!r} permission "
                f"(permissions: {', '.join(self.peer.permissions) or 'none'})"
            )
        return self.why_not, self.detail


class AccessControl:
    """Decides, per association, which DIMSE services its Calling AE Title may use."""

    def __init__(self, peers: PeerRegistry, settings: Settings) -> None:
        self.peers = peers
        self.required = settings.auth == "required"
        self.query_from_any_ae = settings.dimse_query_from_any_ae and not self.required
        self._lock = threading.Lock()
        self._decisions: dict[tuple[str, str], tuple[float, Access]] = {}
        self._addresses: dict[str, tuple[float, frozenset[str]]] = {}

    # --- deciding ------------------------------------------------------------------------
    def decide(self, calling_ae: str, address: str) -> Access:
        """What an association from ``calling_ae`` at ``address`` may do (cached briefly)."""
        calling_ae = calling_ae.strip()
        key = (calling_ae, address)
        now = time.monotonic()
        cached = self._decisions.get(key)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        access = self._decide(calling_ae, address)
        with self._lock:
            if len(self._decisions) >= MAX_CACHED:
                self._decisions.clear()
            self._decisions[key] = (now, access)
        return access

    def _decide(self, calling_ae: str, address: str) -> Access:
        anyone = set(OPEN_SERVICES)
        if self.query_from_any_ae:
            anyone |= {"find", "move", "get"}
        try:
            peer = self.peers.by_ae_title(calling_ae) if calling_ae else None
        except Exception as exc:  # the index is unreachable: no peer is known to be declared
            log.warning(
                "DICOM access: the peer registry cannot be read",
                extra={"calling_ae": calling_ae, "err": f"{type(exc).__name__}: {exc}"},
            )
            return Access(
                calling_ae,
                address,
                None,
                frozenset(anyone),
                "peer registry unavailable",
                "the peer registry cannot be read",
            )
        if peer is not None and peer.check_host and not self._from_host(address, peer.host):
            return Access(
                calling_ae,
                address,
                None,
                frozenset(anyone),
                f"calling AE {calling_ae!r} is a peer's, not from its host",
                f"calling AE {calling_ae!r} is peer {peer.name!r}, whose associations must come "
                f"from {peer.host!r} (check_host), not from {address}",
            )
        if peer is not None:
            return Access(calling_ae, address, peer, frozenset(peer.permissions), "", "")
        return Access(
            calling_ae,
            address,
            None,
            frozenset(anyone),
            f"calling AE {calling_ae!r} is not a declared peer",
            f"calling AE {calling_ae!r} is not a declared peer: {_HINT}",
        )

    def _from_host(self, address: str, host: str) -> bool:
        """Whether ``address`` is one of the addresses ``host`` resolves to."""
        try:
            remote = _normal(address)
        except ValueError:
            return False
        now = time.monotonic()
        cached = self._addresses.get(host)
        if cached is None or now - cached[0] >= CACHE_SECONDS:
            addresses: set[str] = set()
            try:
                for info in socket.getaddrinfo(host.strip("[]"), None, proto=socket.IPPROTO_TCP):
                    with contextlib.suppress(ValueError):
                        addresses.add(_normal(str(info[4][0])))
            except OSError as exc:
                log.warning(
                    "DICOM access: a peer's host cannot be resolved",
                    extra={"host": host, "err": str(exc)},
                )
            with self._lock:
                if len(self._addresses) >= MAX_CACHED:
                    self._addresses.clear()
                self._addresses[host] = cached = (now, frozenset(addresses))
        return remote in cached[1]

    # --- association ---------------------------------------------------------------------
    def on_requested(self, event: Event) -> None:
        """EVT_REQUESTED: decide what the association may do; with ``auth = "required"``
        reject it when its Calling AE Title is no declared peer (PS3.8 9.3.4)."""
        assoc = event.assoc
        access = self.association_access(assoc)
        if not self.required or access.peer is not None:
            return
        PEER_LOG.warning(
            access.address,
            "DICOM association rejected: calling AE title not recognized",
            calling_ae=access.calling_ae,
            reason=access.detail.replace(
                "or set PACSBRIDGE_DIMSE_QUERY_FROM_ANY_AE=true", "(PACSBRIDGE_AUTH=required)"
            ),
            answer="A-ASSOCIATE-RJ result 1 source 1 reason 3",
        )
        # Rejected-permanent (1); DICOM UL service-user (1); calling-AE-title-not-recognized (3).
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def association_access(self, assoc: Association) -> Access:
        """The association's decision, made on its first use."""
        access: Access | None = getattr(assoc, "_pb_access", None)
        if access is None:
            primitive = assoc.requestor.primitive
            calling = primitive.calling_ae_title if primitive is not None else ""
            info = assoc.requestor.address_info
            address = info.address if info is not None else "unknown"
            access = self.decide(str(calling or ""), address)
            assoc._pb_access = access  # type: ignore[attr-defined]
        return access

    # --- requests ------------------------------------------------------------------------
    def gate(self, assoc: Association, msg: Any, context_id: int) -> bool:
        """Called for every DIMSE request before pynetdicom serves it: True when the request
        was refused (its response sent here), False to serve it."""
        service = SERVICES.get(type(msg))
        if service is None or not msg.is_valid_request:
            return False
        if context_id not in assoc._accepted_cx or assoc._sent_release:
            return False  # pynetdicom's to handle (it aborts, or ignores)
        access = self.association_access(assoc)
        refused = access.refusal(service)
        if refused is None:
            return False
        comment, detail = refused
        PEER_LOG.warning(
            access.address,
            "DIMSE request refused: not authorized",
            calling_ae=access.calling_ae,
            service=type(msg).__name__.replace("_", "-"),
            status=f"0x{STATUS_REFUSED_NOT_AUTHORIZED:04X}",
            reason=detail,
        )
        rsp = type(msg)()
        rsp.MessageIDBeingRespondedTo = msg.MessageID
        if isinstance(msg, (N_SET, N_GET)):
            rsp.AffectedSOPClassUID = msg.RequestedSOPClassUID
            rsp.AffectedSOPInstanceUID = msg.RequestedSOPInstanceUID
        else:
            rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
        if isinstance(msg, (C_STORE, N_CREATE)):
            rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
        rsp.Status = STATUS_REFUSED_NOT_AUTHORIZED
        # Error Comment is LO: at most 64 characters, no backslash (PS3.7 C.4, PS3.5 6.2).
        rsp.ErrorComment = comment.replace("\\", "/")[:64]
        assoc.dimse.send_msg(rsp, context_id)
        return True


def _normal(address: str) -> str:
    """An IP address in one spelling (IPv4-mapped IPv6 as IPv4, no zone)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0].strip("[]"))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)
