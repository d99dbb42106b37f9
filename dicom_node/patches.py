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
  A-ASSOCIATE-RQs refused (``upper_layer.py``), acceptors that stop waiting once their
  connection is gone (``acceptor.py``).

:data:`PINS` holds a hash of the source of every pynetdicom function or method replaced,
wrapped or copied here (and of the few whose behaviour the copies rely on), as released in the
pynetdicom version the patches were written against; ``tests/test_pynetdicom_patches.py``
fails when an installed pynetdicom differs, naming what to re-check.
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
    """A pynetdicom function or method (``module:Qualified.name``), the SHA-256 of its source
    (first 16 hex digits) and what to re-check in ours when it changes."""

    target: str
    sha256: str
    recheck: str


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
        "dicom_node/server.py _NoDelayAssociationServer.get_request extends it",
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
        "to it: check the thread still only starts the association",
    ),
)


def upstream_source(target: str) -> str:
    """The source of ``module:Qualified.name`` as the installed pynetdicom ships it, read from
    its file (whatever has been patched in memory since)."""
    module_name, _, qualname = target.partition(":")
    source = inspect.getsource(importlib.import_module(module_name))
    body: list[ast.stmt] = ast.parse(source).body
    node: ast.AST | None = None
    for name in qualname.split("."):
        node = next(
            (
                n
                for n in body
                if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and n.name == name
            ),
            None,
        )
        if node is None:
            raise LookupError(f"{target}: no {name} in {module_name}")
        body = cast(Any, node).body
    assert node is not None
    decorated = cast(Any, node)
    start = min([d.lineno for d in decorated.decorator_list] + [decorated.lineno])
    lines = source.splitlines(keepends=True)[start - 1 : decorated.end_lineno]
    return "".join(lines)


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


_lock = threading.Lock()
_installed = False


def installed() -> bool:
    return _installed


def install() -> None:
    """Apply every patch (once per process; later calls do nothing)."""
    global _installed
    with _lock:
        if _installed:
            return
        reactor.install()  # event-driven DUL and association reactors, the socket lease
        uids.install()  # UIDs validated once per distinct value
        pdata.install()  # C-STORE requests and responses, C-FIND responses as prebuilt PDUs
        pynetdicom.association.time = _ReactorClock()  # type: ignore[assignment]
        Association.accepted_contexts = property(_accepted_contexts)  # type: ignore[method-assign,assignment]
        Association.run_reactor = acceptor.run_reactor  # type: ignore[method-assign]
        DULServiceProvider._read_pdu_data = upper_layer.read_pdu_data  # type: ignore[method-assign]
        description, _action, states = pynetdicom.fsm.ACTIONS["AE-6"]
        pynetdicom.fsm.ACTIONS["AE-6"] = (description, upper_layer.ae_6, states)
        pynetdicom.fsm.AE_6 = upper_layer.ae_6
        for name in upper_layer.DECODING_LOGGERS:
            logging.getLogger(name).addFilter(upper_layer.QUIET_WHILE_DECODING)
        # pynetdicom formats every C-FIND/C-GET/C-MOVE identifier for its debug log, logged
        # or not: most of the cost of a C-FIND response. Our own logs say what a request was.
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _installed = True
