"""More DICOM acceptor processes behind the DICOM port (``PACSBRIDGE_DIMSE_PROCESSES``).

Concurrent senders compete for one interpreter's GIL inside a process. ``serve`` therefore starts
``dimse_processes - 1`` more processes. ``serve`` still accepts every connection on the port,
then gives it to whichever process (itself included) has the fewest open associations: the
connection's descriptor goes over a Unix socket (SCM_RIGHTS), followed by the peer address, and
the child serves it from there. Each child reports back when one of its connections ends (with
its address: ``serve`` counts open connections per address, ``max_associations_per_address``).
Every process ingests through the same index and blob store, exactly as separate
``pacsbridge serve`` machines would.
A child stops when asked (SIGTERM) or when its parent goes away. A connection handed over
without its descriptor (the child out of descriptors, say) is reported ended, and the child
goes on with the next. A child that ends while ``serve`` runs (killed, crashed) is logged as
an error and replaced; until its successor is ready no connection goes to it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

from config import Settings, configure_logging, dump_stacks_on_sigusr1
from pacsbridge.metrics import mark_process_dead

log = logging.getLogger(__name__)

#: What a child writes to its parent: ready to serve; a connection (from the address that
#: follows) has ended; it stops serving.
_READY = b"r"
_CLOSED = b"c"
_STOPPING = b"s"
#: A child that ran for less than this (seconds) is replaced only after a pause, doubled
#: with each such end in a row up to ``_MAX_RESTART_PAUSE``.
_SHORT_LIFE = 60.0
_MAX_RESTART_PAUSE = 30.0
#: The load of a child that cannot take connections (not started yet, or gone).
_UNAVAILABLE = 1 << 30


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def receive_connections(
    parent: Connection,
    serve: Callable[[socket.socket, str], None],
    ended: Callable[[str], None],
) -> None:
    """Serve each connection the parent hands over (its descriptor, then its peer address)
    until the parent goes away (EOFError or OSError from the pipe).

    A message whose descriptor did not come (the kernel drops it when this process has no
    descriptor free) is reported ``ended`` with its address, so that the parent's counts stay
    true; so is a descriptor that makes no socket. A descriptor whose address never comes is
    closed."""
    while True:
        fd: int | None
        try:
            fd = recv_handle(parent)
        except RuntimeError as exc:  # the message came, its descriptor did not
            log.error(
                "DICOM connection handed over without its descriptor", extra={"err": str(exc)}
            )
            fd = None
        try:
            address = parent.recv_bytes().decode()
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is None:
            ended(address)
            continue
        try:
            connection = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            log.error(
                "DICOM connection handed over is no socket",
                extra={"peer": address, "err": str(exc)},
            )
            ended(address)
            continue
        serve(connection, address)


def _child(settings_data: dict[str, Any], parent: Connection) -> None:
    dump_stacks_on_sigusr1()  # first: before it, SIGUSR1 would end the process
    from pacsbridge.metrics import prepare_multiprocess

    settings = Settings(**settings_data)
    prepare_multiprocess(settings)  # before any metric is made (archive, dicom_node)
    from archive import Archive
    from dicom_node import DimseServer, patches

    patches.install(settings.log_level)
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    serving = threading.Event()

    def on_sigterm(*_: Any) -> None:
        if not serving.is_set():
            raise SystemExit(0)  # still starting (the index, say): no association to finish
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    from pacsbridge.routing_jobs import install_arrival_routes

    archive = Archive(settings, migrate=False)
    install_arrival_routes(archive, settings)
    send_lock = threading.Lock()

    def closed(address: str) -> None:
        with send_lock, contextlib.suppress(OSError, ValueError):
            parent.send_bytes(_CLOSED + address.encode())

    server = DimseServer(archive, settings, handed_over=True, on_connection_closed=closed)
    serving.set()  # from here a SIGTERM lets the open associations finish
    server.start()

    def receive() -> None:
        try:
            receive_connections(parent, server.serve_connection, closed)
        except (EOFError, OSError):
            pass  # the parent is gone
        except Exception:
            log.exception("DIMSE acceptor process can take no more connections: it stops")
            with send_lock, contextlib.suppress(OSError, ValueError):
                parent.send_bytes(_STOPPING)
        stop.set()

    threading.Thread(target=receive, name="dimse-handover", daemon=True).start()
    gc.collect()
    gc.freeze()  # as in `serve`: start-up objects stay out of every collection
    with send_lock:
        parent.send_bytes(_READY)
    log.info("DIMSE acceptor process started", extra={"pid": os.getpid()})
    stop.wait()
    # Open associations finish (within shutdown_timeout), as in `serve`.
    server.drain(settings.shutdown_timeout)
    archive.close()


class DimseProcessPool:
    """The child acceptor processes, and which of them (or the parent) takes a connection."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self._local = 0  # associations this process took
        self._processes: list[tuple[BaseProcess, Connection] | None] = []
        self._loads: list[int] = []
        self._handed: list[Counter[str]] = []  # open connections of each child, by address
        self._lock = threading.Lock()
        self._stopping = False
        self._supervisors: list[threading.Thread] = []
        #: Called with the peer address when a connection handed to a child has ended (or
        #: the child is gone with it).
        self.connection_ended: Callable[[str], None] = lambda address: None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        data = self.settings.model_dump()
        for index in range(self.count):
            self._processes.append(None)
            self._loads.append(_UNAVAILABLE)
            self._handed.append(Counter())
            started = self._start_child(ctx, data, index)
            thread = threading.Thread(
                target=self._supervise,
                args=(ctx, data, index, started),
                name="dimse-child-watch",
                daemon=True,
            )
            thread.start()
            self._supervisors.append(thread)

    def _start_child(
        self, ctx: Any, data: dict[str, Any], index: int
    ) -> tuple[BaseProcess, Connection] | None:
        """Start the child of slot ``index``; None when the pool stops."""
        ours, theirs = ctx.Pipe(duplex=True)
        process = ctx.Process(
            target=_child, args=(data, theirs), name="pacsbridge-dimse", daemon=True
        )
        process.start()
        theirs.close()
        with self._lock:
            if not self._stopping:
                self._processes[index] = (process, ours)
                return process, ours
        process.kill()  # stop() began meanwhile and no longer sees it
        process.join(5)
        ours.close()
        return None

    def _supervise(
        self,
        ctx: Any,
        data: dict[str, Any],
        index: int,
        child: tuple[BaseProcess, Connection] | None,
    ) -> None:
        """Watch the child of slot ``index``; replace it when it ends while the pool runs."""
        quick_ends = 0
        while not self._is_stopping():
            if child is not None:
                process, conn = child
                started = time.monotonic()
                self._watch(index, conn)
                process.join(5)
                if not process.is_alive() and process.pid:
                    mark_process_dead(process.pid)  # its open associations are gone
                if self._is_stopping():
                    return
                lived = time.monotonic() - started
                quick_ends = quick_ends + 1 if lived < _SHORT_LIFE else 0
                log.error(
                    "DIMSE acceptor process ended; starting another",
                    extra={"pid": process.pid, "exitcode": process.exitcode, "lived_s": lived},
                )
                conn.close()
            else:  # it could not be started
                quick_ends += 1
            pause = min(_MAX_RESTART_PAUSE, 2.0 ** (quick_ends - 1)) if quick_ends else 0.0
            deadline = time.monotonic() + pause
            while time.monotonic() < deadline:
                if self._is_stopping():
                    return
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            try:
                child = self._start_child(ctx, data, index)
            except Exception:
                log.exception("cannot start a DIMSE acceptor process")
                child = None

    def _is_stopping(self) -> bool:
        with self._lock:
            return self._stopping

    def _watch(self, index: int, conn: Connection) -> None:
        """Makes a child available once it is ready and counts down its open connections as
        it reports them ended; once it stops (or is gone) it is unavailable and its
        connections have ended."""
        with contextlib.suppress(EOFError, OSError):
            while True:
                message = conn.recv_bytes()
                if message == _READY:
                    with self._lock:
                        self._loads[index] = 0
                elif message == _STOPPING:
                    with self._lock:
                        self._loads[index] = _UNAVAILABLE
                elif message[:1] == _CLOSED:
                    address = message[1:].decode()
                    with self._lock:
                        if self._loads[index] < _UNAVAILABLE:
                            self._loads[index] = max(0, self._loads[index] - 1)
                        handed = self._handed[index]
                        if handed[address] <= 0:
                            continue  # not one it was given
                        handed[address] -= 1
                        if not handed[address]:
                            del handed[address]
                    self.connection_ended(address)
        with self._lock:
            self._loads[index] = _UNAVAILABLE  # gone: never chosen again
            left = list(self._handed[index].elements())
            self._handed[index].clear()
        for address in left:  # its connections went with it
            self.connection_ended(address)

    def dispatch(self, connection: socket.socket, address: str) -> bool:
        """Hand the connection (from ``address``) to the least busy child, unless this process
        is less busy still; True when a child took it."""
        with self._lock:
            if not self._loads or self._stopping:
                return False
            index = min(range(len(self._loads)), key=self._loads.__getitem__)
            child = self._processes[index]
            if (
                child is None
                or self._loads[index] >= _UNAVAILABLE
                or self._local < self._loads[index]
            ):
                self._local += 1
                return False
            process, conn = child
            try:
                send_handle(conn, connection.fileno(), process.pid or 0)
            except OSError:
                self._local += 1
                return False
            with contextlib.suppress(OSError):  # if the child is gone, so is the count (_watch)
                conn.send_bytes(address.encode())
            self._handed[index][address] += 1
            self._loads[index] += 1
            return True

    def local_closed(self, address: str) -> None:
        """One of this process's own connections (from ``address``) has ended."""
        with self._lock:
            self._local = max(0, self._local - 1)

    def begin_stop(self) -> None:
        """Hand over no more connections and ask every child to stop (SIGTERM): it accepts
        nothing more and lets its open associations finish (``shutdown_timeout``)."""
        with self._lock:
            self._stopping = True
            children = [child for child in self._processes if child is not None]
        for process, _conn in children:
            if process.is_alive() and process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> None:
        """:meth:`begin_stop`, then wait up to ``timeout`` seconds for each child to end
        (killed beyond)."""
        self.begin_stop()
        with self._lock:
            children = [child for child in self._processes if child is not None]
        for process, conn in children:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(5)
            if process.pid:
                mark_process_dead(process.pid)
            conn.close()
        for thread in self._supervisors:
            thread.join(5)
        with self._lock:
            self._processes = [None] * len(self._processes)

    def status(self) -> dict[str, int]:
        """Acceptor processes configured and ready, this one included."""
        with self._lock:
            ready = sum(1 for load in self._loads if load < _UNAVAILABLE)
        return {"configured": self.count + 1, "ready": ready + 1}

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [c[0].pid for c in self._processes if c is not None and c[0].pid]
