"""Every change this node makes to pynetdicom, applied by :func:`install` and nowhere else.

Importing a ``dicom_node`` module changes nothing in pynetdicom. The composition root
(``pacsbridge``) calls :func:`install` once in each process that runs associations: ``serve``
and its DIMSE acceptor processes, the job workers that forward studies, ``pacsbridge send``.
:class:`~dicom_node.server.DimseServer` refuses to start without it.

What it changes, for every association of the process (requestor and acceptor):

- speed: event-driven DUL and association reactors and the socket lease
  (``dicom_node/reactor.py``), prebuilt P-DATA PDUs (``pdata.py``), UIDs validated once per
  distinct value (``uids.py``), accepted contexts sorted once, pynetdicom's sleeping spins
  shortened, and no debug formatting of C-FIND/C-GET/C-MOVE identifiers;
- robustness (PS3.8 9): PDUs read against the ARTIM timer and the network timeout, malformed
  A-ASSOCIATE-RQs refused, A-ABORTs that give their reason (``upper_layer.py``), acceptors that
  stop waiting once their connection is gone (``acceptor.py``), sockets waited on with
  ``poll`` (``select`` refuses descriptors from 1024 on).

It also sets pynetdicom's own settings (``pynetdicom._config``) for the process:
:data:`SETTINGS` names each one.

:data:`PINS` holds a hash of the source of every pynetdicom function, method or class
replaced, wrapped or copied here, and of those whose behaviour the copies and replacements
rely on, as released in the pynetdicom version the patches were written against.
``tests/test_pynetdicom_patches.py`` fails when an installed pynetdicom differs, naming what to
re-check; and it compares every pynetdicom module and class before and after ``install()``:
each attribute that changes must be pinned (or be named in :data:`SETTINGS` or
:data:`GLOBALS`), and nothing may change before ``install()``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

import pynetdicom
import pynetdicom.association
import pynetdicom.fsm
from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext

from dicom_node import acceptor, pdata, reactor, uids, upper_layer

#: The pynetdicom release the patches were written against.
PYNETDICOM_VERSION = "3.0.4"


@dataclass(frozen=True)
class Pin:
    """A pynetdicom function, method, property or class (``module:Qualified.name``), the
    SHA-256 of its source (first 16 hex digits) and what to re-check in ours when it changes."""

    target: str
    sha256: str
    recheck: str


_SHORTENED_SPIN = (
    "it sleeps through pynetdicom.association's time module, which is patches._ReactorClock "
    "(sleeps of at most REACTOR_POLL): check a shorter sleep is still only a shorter wait"
)

PINS: tuple[Pin, ...] = (
    Pin(
        "pynetdicom.dul:DULServiceProvider.run_reactor",
        "e3a10eb3a0931e48",
        "dicom_node/reactor.py _dul_run_reactor is a copy of this loop (event-driven, sends and "
        "reads in one pass): port the change",
    ),
    Pin(
        "pynetdicom.dul:DULServiceProvider.__init__",
        "c82dafa9438ddf70",
        "dicom_node/reactor.py _assoc_init replaces the DUL's event_queue, to_provider_queue and "
        "to_user_queue with waking queues: check they are still the queues it uses",
    ),
    Pin(
        "pynetdicom.dul:DULServiceProvider._is_transport_event",
        "8725ed03bb8fbdef",
        "dicom_node/reactor.py calls it from its loop and upper_layer.read_pdu_data relies on "
        "it reading only a ready socket and closing in Sta13 once nothing is left",
    ),
    Pin(
        "pynetdicom.dul:DULServiceProvider._read_pdu_data",
        "19f2d4e38c13c835",
        "dicom_node/upper_layer.py read_pdu_data replaces it and reactor.SocketLease.release "
        "copies its last steps (decode, queue the PDU and its event): port the change",
    ),
    Pin(
        "pynetdicom.dul:DULServiceProvider._decode_pdu",
        "fc71dd1bf853e1ce",
        "dicom_node/upper_layer.py take_pdu decodes every PDU read with it and reports what it "
        "raises as an invalid PDU (Evt19)",
    ),
    Pin(
        "pynetdicom.dul:DULServiceProvider.kill_dul",
        "5ceccf8dd01c2072",
        "dicom_node/reactor.py _dul_kill replaces it (and wakes the DUL thread)",
    ),
    Pin(
        "pynetdicom.dul:DULServiceProvider.stop_dul",
        "28a7e0be126e7b30",
        "dicom_node/reactor.py _dul_stop replaces it (and wakes the DUL thread)",
    ),
    Pin(
        "pynetdicom.association:Association.__init__",
        "eb07516b8009ad8f",
        "dicom_node/reactor.py _assoc_init wraps it: check the attributes it sets up "
        "(dul, dimse, _reactor_checkpoint, _is_paused, _kill)",
    ),
    Pin(
        "pynetdicom.association:Association.run_reactor",
        "ed8bbbe3b3d6ddae",
        "dicom_node/acceptor.py run_reactor is a copy of its acceptor branch: port the change",
    ),
    Pin(
        "pynetdicom.association:Association._run_reactor",
        "f28838c5559e462a",
        "dicom_node/reactor.py _assoc_run_reactor is a copy of this loop: port the change",
    ),
    Pin(
        "pynetdicom.association:Association.kill",
        "8f9713666a7f4cff",
        "dicom_node/reactor.py _assoc_kill wraps it, and its sleep is shortened "
        "(patches._ReactorClock)",
    ),
    Pin(
        "pynetdicom.association:Association._abort_blocking",
        "10b43ef8c63c6764",
        "its 0.1 s sleep is shortened (patches._ReactorClock): check the shortened wait still "
        "lets the abort go out",
    ),
    Pin(
        "pynetdicom.association:Association.release",
        "c7d713502b77d702",
        "its spin on _is_paused is shortened (patches._ReactorClock) and the event-driven "
        "association reactor must still pause for it",
    ),
    Pin(
        "pynetdicom.association:Association.accepted_contexts",
        "f35e6c825dba292c",
        "patches._accepted_contexts replaces this property (sorted once per negotiation)",
    ),
    Pin(
        "pynetdicom.association:Association.send_c_store",
        "fa5a8127f349f8e7",
        "dicom_node/retrieve.py SubOperationSender._send_leased does what it does with a file "
        "over the leased socket: port the change",
    ),
    Pin(
        "pynetdicom.fsm:AE_6",
        "385d595ed49432af",
        "dicom_node/upper_layer.py ae_6 replaces it in fsm.ACTIONS: port the change",
    ),
    Pin(
        "pynetdicom.fsm:DT_1",
        "82e5c5d4114534fa",
        "dicom_node/pdata.py replaces fsm.P_DATA_TF, which this action calls",
    ),
    Pin(
        "pynetdicom.fsm:AR_7",
        "9a8d68182bf5c9fd",
        "dicom_node/pdata.py replaces fsm.P_DATA_TF, which this action calls",
    ),
    Pin(
        "pynetdicom.dimse:DIMSEServiceProvider.send_msg",
        "a839cf2fb46976d9",
        "dicom_node/pdata.py _send_msg wraps it; the prebuilt messages must stay byte for byte "
        "what it sends (tests/test_pdata.py)",
    ),
    Pin(
        "pynetdicom.utils:set_uid",
        "f917a8035170f792",
        "dicom_node/uids.py set_uid remembers its successful results per value",
    ),
    Pin(
        "pynetdicom.presentation:PresentationContext.add_transfer_syntax",
        "83bb818ef65a6968",
        "dicom_node/uids.py add_transfer_syntax remembers the syntaxes it accepts cleanly",
    ),
    Pin(
        "pynetdicom.transport:RequestHandler.handle",
        "034823fb4df3a874",
        "dicom_node/acceptor.py AcceptorRequestHandler.handle is a copy: port the change",
    ),
    Pin(
        "pynetdicom.transport:RequestHandler._create_association",
        "05c8d12b79863cdb",
        "dicom_node/acceptor.py AcceptorRequestHandler._create_association is a copy (a list "
        "of the contexts instead of a deep copy, the ARTIM timeout): port the change",
    ),
    Pin(
        "pynetdicom.transport:AssociationServer.get_request",
        "925a4f3a3042f6e4",
        "dicom_node/server.py _NoDelayAssociationServer.get_request extends it and "
        "_TLSAssociationServer.get_request replaces it (the TLS handshake deferred to the "
        "connection's thread): port the change",
    ),
    Pin(
        "pynetdicom.transport:AssociationServer.server_bind",
        "cf69278a05a5c777",
        "dicom_node/server.py _HandedOverAssociationServer.server_bind replaces it",
    ),
    Pin(
        "pynetdicom.transport:AssociationServer.server_close",
        "3fa1b358badbe682",
        "dicom_node/server.py _HandedOverAssociationServer.server_close extends it",
    ),
    Pin(
        "pynetdicom.transport:ThreadedAssociationServer.process_request_thread",
        "9e76e9b9c8a3d8b1",
        "dicom_node/server.py _DispatchingAssociationServer.process_request hands connections "
        "to it, and _TLSAssociationServer.process_request_thread calls it after the TLS "
        "handshake: check the thread still only starts the association",
    ),
    Pin(
        "pynetdicom.transport:AssociationServer.__init__",
        "edacb98bdfb7b974",
        "dicom_node/server.py sets request_queue_size (the listen backlog) on its server "
        "classes: check it is still the TCPServer that binds and listens, on construction",
    ),
    # --- what the copies and replacements rely on ------------------------------------------
    Pin(
        "pynetdicom.dul:DULServiceProvider._process_recv_primitive",
        "4c0ebbb3e646e35e",
        "dicom_node/reactor.py _dul_run_reactor relies on it only peeking at the primitive it "
        "queues an event for (DT-1 takes it off the queue) and queueing at most one event",
    ),
    Pin(
        "pynetdicom.dul:DULServiceProvider.receive_pdu",
        "fa67339834ca998c",
        "dicom_node/acceptor.py _associate_indication and reactor._assoc_run_reactor take "
        "primitives with it so that EVT_ACSE_RECV fires: check it still takes one without "
        "waiting when asked not to",
    ),
    Pin(
        "pynetdicom.dul:DULServiceProvider._send",
        "a850a7919e68484e",
        "dicom_node/upper_layer.py ae_6 and aa_8 send their A-ASSOCIATE-RJ and A-ABORT with it",
    ),
    Pin(
        "pynetdicom.fsm:StateMachine.do_action",
        "9a883f44c7f31641",
        "dicom_node/upper_layer.py aa_8 is called through fsm.ACTIONS with the DUL only, and "
        "learns the event from reactor._dul_run_reactor, which records it before calling this",
    ),
    Pin(
        "pynetdicom.fsm:AA_8",
        "06c83317f08831fd",
        "dicom_node/upper_layer.py aa_8 replaces it in fsm.ACTIONS (with the reasons of "
        "PS3.8 9.3.8): port the change",
    ),
    Pin(
        "pynetdicom.pdu:P_DATA_TF",
        "6fdbc751c92b9874",
        "dicom_node/pdata.py _p_data_tf stands in for this class in pynetdicom.fsm and gives "
        "prebuilt PDUs an encode() of their own: check encode() is still all that is used",
    ),
    Pin(
        "pynetdicom.transport:AssociationSocket.__init__",
        "1f0325fdef2cc353",
        "dicom_node/reactor.py _wait_for_work and the socket lease read AssociationSocket's "
        "socket and _is_connected directly: check what they mean",
    ),
    Pin(
        "pynetdicom.transport:AssociationSocket.close",
        "c726c8db53813d55",
        "dicom_node/reactor.py relies on a closed AssociationSocket having _is_connected False "
        "(and acceptor._failed closes it to end a DUL that is stuck)",
    ),
    Pin(
        "pynetdicom.transport:AssociationSocket.connect",
        "aeeeae413bd339dc",
        "dicom_node/reactor.py relies on _is_connected being True once connected",
    ),
    Pin(
        "pynetdicom.transport:AssociationSocket._create_socket",
        "bf8b92b106c8aa07",
        "dicom_node/reactor.py relies on _is_connected being False before connect()",
    ),
    Pin(
        "pynetdicom.transport:AssociationSocket.ready",
        "3eb58e3d39dc076d",
        "dicom_node/reactor.py _socket_ready replaces it (poll instead of select): port the "
        "change; upper_layer.read_pdu_data runs only when it says so (_is_transport_event)",
    ),
    Pin(
        "pynetdicom.association:Association.acse_timeout",
        "5633674fbb21bae5",
        "its setter sets the ARTIM timer's timeout too: dicom_node/acceptor.py sets the ARTIM "
        "timeout after the association is made, and nothing may set acse_timeout after that",
    ),
    Pin(
        "pynetdicom.association:Association._serve_request",
        "2f24c1759cdf6c8c",
        "dicom_node/reactor.py _assoc_run_reactor serves each request with it on its own "
        "thread, then takes the socket back from a handler that kept it and receives the "
        "C-STOREs that follow (store_receive.serve_stores)",
    ),
    Pin(
        "pynetdicom.acse:ACSE.negotiate_association",
        "a6f771214fa494c1",
        "dicom_node/acceptor.py answers a request itself only when this raises before it has "
        "answered (is_established, is_rejected, is_aborted all False)",
    ),
    Pin(
        "pynetdicom.acse:ACSE.send_reject",
        "700998293bbcb6c9",
        "dicom_node/acceptor.py rejects with it (result 1, source 2, reason 1) where "
        "negotiation fails, and waits for the DUL to send the A-ASSOCIATE-RJ",
    ),
    Pin(
        "pynetdicom.service_class:StorageServiceClass.SCP",
        "63afca7fc6c6e7ee",
        "dicom_node/store_receive.py serves C-STORE requests past it (status, response, "
        "EVT_C_STORE handler): port the change",
    ),
    Pin(
        "pynetdicom.dimse:DIMSEServiceProvider.receive_primitive",
        "5f99c86b14a15cef",
        "dicom_node/store_receive.py reassembles messages from P-DATA itself (pdvs, _Message): "
        "port the change",
    ),
    Pin(
        "pynetdicom.dimse_messages:DIMSEMessage.decode_msg",
        "f51c777e841a76be",
        "dicom_node/store_receive.py reassembles command and data set fragments itself "
        "(PS3.8 E.2): port the change",
    ),
    Pin(
        "pynetdicom.service_class:ServiceClass._c_find_scp",
        "da242b908ef4848c",
        "dicom_node/find.py _PendingBatch sends pending responses from the handler's thread "
        "between the responses this yields: check they are still sent in order, from that "
        "thread, with the final response after the generator ends",
    ),
    # --- pynetdicom.association's time module is patches._ReactorClock: every function there
    # that sleeps, its sleeps shortened to REACTOR_POLL ---------------------------------------
    Pin(
        "pynetdicom.association:Association.send_c_echo",
        "664d0e9b0ab20c53",
        _SHORTENED_SPIN,
    ),
    Pin(
        "pynetdicom.association:Association.send_c_find",
        "5879d593298e14b6",
        _SHORTENED_SPIN,
    ),
    Pin(
        "pynetdicom.association:Association.send_c_get",
        "df1f082c59355edc",
        _SHORTENED_SPIN,
    ),
    Pin(
        "pynetdicom.association:Association.send_c_move",
        "eb51b3130c213cf6",
        _SHORTENED_SPIN,
    ),
    Pin(
        "pynetdicom.association:Association.send_n_action",
        "fd0ab80035a52546",
        _SHORTENED_SPIN,
    ),
    Pin(
        "pynetdicom.association:Association.send_n_create",
        "07a5d5de9fc39324",
        _SHORTENED_SPIN,
    ),
    Pin(
        "pynetdicom.association:Association.send_n_delete",
        "30aa803ca48d1cff",
        _SHORTENED_SPIN,
    ),
    Pin(
        "pynetdicom.association:Association.send_n_event_report",
        "e3d427e77369680c",
        _SHORTENED_SPIN,
    ),
    Pin(
        "pynetdicom.association:Association.send_n_get",
        "815d125be00dbb13",
        _SHORTENED_SPIN,
    ),
    Pin(
        "pynetdicom.association:Association.send_n_set",
        "7cfcb3cabf754673",
        _SHORTENED_SPIN,
    ),
)


def upstream_source(target: str) -> str:
    """The source of ``module:Qualified.name`` as the installed pynetdicom ships it, read from
    its file (whatever has been patched in memory since). A name defined more than once in
    its class (a property's getter and setter) has all its definitions, in order."""
    module_name, _, qualname = target.partition(":")
    source = inspect.getsource(importlib.import_module(module_name))
    body: list[ast.stmt] = ast.parse(source).body
    nodes: list[Any] = []
    for name in qualname.split("."):
        nodes = [
            n
            for n in body
            if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.name == name
        ]
        if not nodes:
            raise LookupError(f"{target}: no {name} in {module_name}")
        body = nodes[0].body
    lines = source.splitlines(keepends=True)
    parts = []
    for node in nodes:
        start = min([d.lineno for d in node.decorator_list] + [node.lineno])
        parts.append("".join(lines[start - 1 : node.end_lineno]))
    return "".join(parts)


def source_hash(target: str) -> str:
    return hashlib.sha256(upstream_source(target).encode()).hexdigest()[:16]


def changed_upstream() -> list[str]:
    """A line for each pinned pynetdicom function whose source differs from the pin."""
    changed = []
    for pin in PINS:
        try:
            digest = source_hash(pin.target)
        except LookupError as exc:
            changed.append(f"{exc} (pynetdicom {pynetdicom.__version__}); {pin.recheck}")
            continue
        if digest != pin.sha256:
            changed.append(
                f"{pin.target} changed in pynetdicom {pynetdicom.__version__} (pinned against "
                f"{PYNETDICOM_VERSION}, sha256 {pin.sha256}, now {digest}): {pin.recheck}; then "
                "update its pin in dicom_node/patches.py"
            )
    return changed


# --- the patches that have no module of their own -------------------------------------------
# pynetdicom's reactors poll their queues (the association reactor sleeps 1 ms on every loop,
# the DUL when idle); ours wait for work instead (dicom_node/reactor.py). A few of
# pynetdicom's hand-overs (killing the association, aborting it) still spin on time.sleep:
# keep those spins short.
REACTOR_POLL = 0.0001


class _ReactorClock:
    """Stands in for the ``time`` module inside ``pynetdicom.association``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, REACTOR_POLL))


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


#: pynetdicom's settings (``pynetdicom._config``) that :func:`install` sets, and why.
SETTINGS: dict[str, str] = {
    "LOG_REQUEST_IDENTIFIERS": (
        "False: pynetdicom formats every C-FIND/C-GET/C-MOVE identifier for its debug log, "
        "logged or not (most of the cost of a C-FIND response); our own logs say what a "
        "request was"
    ),
    "LOG_RESPONSE_IDENTIFIERS": "False, as LOG_REQUEST_IDENTIFIERS",
    "LOG_HANDLER_LEVEL": (
        '"none" unless the log level is DEBUG ("standard"): pynetdicom\'s standard handlers '
        "log every PDU and message, formatting each one even when the log level drops it, and "
        "an association with them bound takes no fast path"
    ),
    "STORE_SEND_CHUNKED_DATASET": (
        "True: send_c_store(path) streams a stored file's data set as stored instead of "
        "decoding and re-encoding it (C-GET, C-MOVE, forwarding; pynetdicom then requires an "
        "exact transfer syntax match, which dicom_node/retrieve.py checks first)"
    ),
}

#: Module globals of pynetdicom that :func:`install` replaces with something that is no
#: pynetdicom code, and why; every function of that module that uses the global is pinned.
GLOBALS: dict[str, str] = {
    "pynetdicom.association:time": (
        "patches._ReactorClock: the hand-overs pynetdicom still spins on (killing and aborting "
        "an association) sleep at most REACTOR_POLL"
    ),
}

_lock = threading.Lock()
_installed = False


def installed() -> bool:
    return _installed


def install(log_level: str = "INFO") -> None:
    """Apply every patch (once per process; later calls only set :data:`SETTINGS` again),
    with pynetdicom's own logging for ``log_level`` (the ``PACSBRIDGE_LOG_LEVEL`` of the
    process)."""
    global _installed
    with _lock:
        if not _installed:
            _patch()
            _installed = True
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.LOG_HANDLER_LEVEL = "standard" if log_level.upper() == "DEBUG" else "none"
        _config.STORE_SEND_CHUNKED_DATASET = True


def _patch() -> None:
    reactor.install()  # event-driven DUL and association reactors, the socket lease
    uids.install()  # UIDs validated once per distinct value
    pdata.install()  # C-STORE requests and responses, C-FIND responses as prebuilt PDUs
    pynetdicom.association.time = _ReactorClock()  # type: ignore[assignment]
    Association.accepted_contexts = property(_accepted_contexts)  # type: ignore[method-assign,assignment]
    Association.run_reactor = acceptor.run_reactor  # type: ignore[method-assign]
    DULServiceProvider._read_pdu_data = upper_layer.read_pdu_data  # type: ignore[method-assign]
    for name, action in (("AE-6", upper_layer.ae_6), ("AA-8", upper_layer.aa_8)):
        description, _action, states = pynetdicom.fsm.ACTIONS[name]
        pynetdicom.fsm.ACTIONS[name] = (description, action, states)
    pynetdicom.fsm.AE_6 = upper_layer.ae_6
    pynetdicom.fsm.AA_8 = upper_layer.aa_8
    for name in upper_layer.DECODING_LOGGERS:
        logging.getLogger(name).addFilter(upper_layer.QUIET_WHILE_DECODING)
