"""Event delivery in a process of its own under ``serve``.

``serve`` is also one of the DICOM acceptors (``pacsbridge/dimse_pool.py``): a dispatcher
thread there would share that interpreter's GIL with the associations it serves, and slow
those associations rather than the machine as a whole. ``serve`` therefore delivers events
from a child process (``events.enabled`` with ``worker_in_serve``); a ``pacsbridge worker``
delivers from a thread beside its job workers, since nothing there waits on a socket.

``serve`` stores the settings file's subscriptions before it accepts anything (a subscription
starts at the newest event when it is created: none of the first studies is missed while the
child starts). The child stops when asked (SIGTERM: the delivery in progress ends, the leases
are given back) or when ``serve`` goes away; one that ends while ``serve`` runs is logged and
replaced after a pause. Its process name (``/proc/<pid>/comm``) is ``pb-events``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from config import Settings, configure_logging, dump_stacks_on_sigusr1
from pacsbridge.metrics import mark_process_dead

log = logging.getLogger(__name__)

#: The child's name in ``ps`` and ``/proc/<pid>/comm`` (at most 15 characters).
PROCESS_NAME = "pb-events"
#: A child that ran for less than this (seconds) is replaced only after a pause, doubled with
#: each such end in a row up to ``_MAX_RESTART_PAUSE``.
_SHORT_LIFE = 60.0
_MAX_RESTART_PAUSE = 30.0


def _name_process(name: str) -> None:
    """Linux: the process's name (``prctl(PR_SET_NAME)``), so that ``ps`` tells it apart from
    the DICOM acceptors; nothing elsewhere."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _child(settings_data: dict[str, Any], parent: Connection, name: str) -> None:
    from pacsbridge.metrics import prepare_multiprocess

    _name_process(PROCESS_NAME)
    dump_stacks_on_sigusr1()  # first: before it, SIGUSR1 would end the process
    settings = Settings(**settings_data)
    prepare_multiprocess(settings)  # before any metric is made
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    delivering = threading.Event()

    def on_sigterm(*_: Any) -> None:
        if not delivering.is_set():
            raise SystemExit(0)  # still starting (the index, say): nothing to finish
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    from archive import Archive
    from pacsbridge.event_delivery import build_dispatcher

    archive: Archive | None = None
    try:
        archive = Archive(settings, migrate=False)
        dispatcher = build_dispatcher(archive, settings, name, sync=False)
        if dispatcher is None:
            return

        def watch_parent() -> None:
            with contextlib.suppress(EOFError, OSError):
                parent.recv_bytes()  # nothing is ever sent: this returns when serve is gone
            stop.set()

        threading.Thread(target=watch_parent, name="events-parent", daemon=True).start()
        delivering.set()  # from here a SIGTERM lets the delivery in progress end
        dispatcher.start()
        stop.wait()
        if not dispatcher.stop(settings.shutdown_timeout):
            log.warning("event delivery still running at exit; its lease lapses on its own")
    finally:
        if archive is not None:
            archive.close()


class EventDeliveryProcess:
    """The child process that delivers events for ``serve``, replaced when it ends early."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self._child: tuple[BaseProcess, Connection] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        data = self.settings.model_dump()
        self._start_child(ctx, data)
        self._supervisor = threading.Thread(
            target=self._supervise, args=(ctx, data), name="events-child-watch", daemon=True
        )
        self._supervisor.start()

    def _start_child(self, ctx: Any, data: dict[str, Any]) -> None:
        ours, theirs = ctx.Pipe(duplex=True)
        process = ctx.Process(
            target=_child, args=(data, theirs, self.name), name=PROCESS_NAME, daemon=True
        )
        try:
            process.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        with self._lock:
            if not self._stopping.is_set():
                self._child = (process, ours)
                return
        process.terminate()  # stop() began meanwhile and no longer sees it
        process.join(5)
        ours.close()

    def _supervise(self, ctx: Any, data: dict[str, Any]) -> None:
        quick_ends = 0
        while not self._stopping.is_set():
            with self._lock:
                child = self._child
            if child is not None:
                process, conn = child
                started = time.monotonic()
                while process.is_alive() and not self._stopping.is_set():
                    process.join(0.5)
                if self._stopping.is_set():
                    return
                if process.pid:
                    mark_process_dead(process.pid)
                lived = time.monotonic() - started
                quick_ends = quick_ends + 1 if lived < _SHORT_LIFE else 0
                log.error(
                    "event delivery process ended; starting another",
                    extra={"pid": process.pid, "exitcode": process.exitcode, "lived_s": lived},
                )
                conn.close()
            else:
                quick_ends += 1
            pause = min(_MAX_RESTART_PAUSE, 2.0 ** (quick_ends - 1)) if quick_ends else 0.0
            if self._stopping.wait(pause):
                return
            try:
                self._start_child(ctx, data)
            except Exception:
                log.exception("cannot start the event delivery process")
                with self._lock:
                    self._child = None

    def begin_stop(self) -> None:
        """Ask the child to stop (SIGTERM) without waiting: its delivery in progress ends."""
        self._stopping.set()
        with self._lock:
            child = self._child
        if child is not None and child[0].is_alive() and child[0].pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child[0].pid, signal.SIGTERM)

    def stop(self, timeout: float) -> bool:
        """:meth:`begin_stop`, then wait up to ``timeout`` seconds (killed beyond); True when
        it ended by itself."""
        self.begin_stop()
        with self._lock:
            child, self._child = self._child, None
        if self._supervisor is not None:
            self._supervisor.join(5)
        if child is None:
            return True
        process, conn = child
        process.join(timeout)
        ended = not process.is_alive()
        if not ended:
            process.kill()
            process.join(5)
        if process.pid:
            mark_process_dead(process.pid)
        conn.close()
        return ended

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._child[0].pid if self._child is not None else None
