"""More DICOM acceptor processes behind the DICOM port (``PACSBRIDGE_DIMSE_PROCESSES``).

Concurrent senders compete for one interpreter's GIL inside a process. ``serve`` therefore starts
``dimse_processes - 1`` more processes. ``serve`` still accepts every connection on the port,
then gives it to whichever process (itself included) has the fewest open associations: the
connection's descriptor goes over a Unix socket (SCM_RIGHTS) and the child serves it from
there. Each child reports back when one of its associations ends. Every process ingests through
the same index and blob store, exactly as separate ``pacsbridge serve`` machines would.
A child stops when asked (SIGTERM) or when its parent goes away.
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
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

from config import Settings, configure_logging

log = logging.getLogger(__name__)

#: What a child writes to its parent: ready to serve; one of its associations has ended.
_READY = b"r"
_CLOSED = b"c"
#: The load of a child that cannot take connections (not started yet, or gone).
_UNAVAILABLE = 1 << 30


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _child(settings_data: dict[str, Any], parent: Connection) -> None:
    from archive import Archive
    from dicom_node import DimseServer

    settings = Settings(**settings_data)
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    from pacsbridge.routing_jobs import install_arrival_routes

    archive = Archive(settings, migrate=False)
    install_arrival_routes(archive, settings)
    send_lock = threading.Lock()

    def closed() -> None:
        with send_lock, contextlib.suppress(OSError, ValueError):
            parent.send_bytes(_CLOSED)

    server = DimseServer(archive, settings, handed_over=True, on_connection_closed=closed)
    server.start()

    def receive() -> None:
        try:
            while not stop.is_set():
                fd = recv_handle(parent)
                server.serve_connection(socket.socket(fileno=fd))
        except (EOFError, OSError, RuntimeError):
            pass  # the parent is gone (or stops us)
        stop.set()

    threading.Thread(target=receive, name="dimse-handover", daemon=True).start()
    gc.collect()
    gc.freeze()  # as in `serve`: start-up objects stay out of every collection
    with send_lock:
        parent.send_bytes(_READY)
    log.info("DIMSE acceptor process started", extra={"pid": os.getpid()})
    stop.wait()
    server.stop()
    archive.close()


class DimseProcessPool:
    """The child acceptor processes, and which of them (or the parent) takes a connection."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self._local = 0  # associations this process took
        self._processes: list[tuple[BaseProcess, Connection]] = []
        self._loads: list[int] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        data = self.settings.model_dump()
        for index in range(self.count):
            ours, theirs = ctx.Pipe(duplex=True)
            process = ctx.Process(
                target=_child, args=(data, theirs), name="pacsbridge-dimse", daemon=True
            )
            process.start()
            theirs.close()
            self._processes.append((process, ours))
            self._loads.append(_UNAVAILABLE)
            threading.Thread(
                target=self._watch, args=(index, ours), name="dimse-child-watch", daemon=True
            ).start()

    def _watch(self, index: int, conn: Connection) -> None:
        """Makes a child available once it is ready and counts down its open associations as
        it reports them ended."""
        with contextlib.suppress(EOFError, OSError):
            while True:
                message = conn.recv_bytes()
                with self._lock:
                    if message == _READY:
                        self._loads[index] = 0
                    elif message == _CLOSED:
                        self._loads[index] = max(0, self._loads[index] - 1)
        with self._lock:
            self._loads[index] = _UNAVAILABLE  # gone: never chosen again

    def dispatch(self, connection: socket.socket) -> bool:
        """Hand the connection to the least busy child, unless this process is less busy
        still; True when a child took it."""
        with self._lock:
            if not self._loads:
                return False
            index = min(range(len(self._loads)), key=self._loads.__getitem__)
            if self._loads[index] >= _UNAVAILABLE or self._local < self._loads[index]:
                self._local += 1
                return False
            process, conn = self._processes[index]
            try:
                send_handle(conn, connection.fileno(), process.pid or 0)
            except OSError:
                self._local += 1
                return False
            self._loads[index] += 1
            return True

    def local_closed(self) -> None:
        """One of this process's own associations has ended."""
        with self._lock:
            self._local = max(0, self._local - 1)

    def stop(self, timeout: float = 20.0) -> None:
        for process, _conn in self._processes:
            if process.is_alive() and process.pid:
                os.kill(process.pid, signal.SIGTERM)
        for process, conn in self._processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(5)
            conn.close()
        self._processes.clear()

    def status(self) -> dict[str, int]:
        """Acceptor processes configured and ready, this one included."""
        with self._lock:
            ready = sum(1 for load in self._loads if load < _UNAVAILABLE)
        return {"configured": self.count + 1, "ready": ready + 1}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p, _ in self._processes if p.pid]
