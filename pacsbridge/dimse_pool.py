"""More DICOM acceptor processes behind the DICOM port (``PACSBRIDGE_DIMSE_PROCESSES``).

Concurrent senders compete for one interpreter's GIL inside a process. ``serve`` therefore starts
``dimse_processes - 1`` more processes. ``serve`` still accepts every connection on the port,
then gives it to whichever process (itself included) has the fewest open associations: the
connection's descriptor goes over a Unix socket (SCM_RIGHTS), followed by the peer address, and
the child serves it from there. Each child reports back when one of its connections ends (with
its address: ``serve`` counts open connections per address, ``max_associations_per_address``).
Every process ingests through the same index and blob store, exactly as separate
``pacsbridge serve`` machines would.
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
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

from config import Settings, configure_logging

log = logging.getLogger(__name__)

#: What a child writes to its parent: ready to serve; a connection (from the address that
#: follows) has ended.
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
    from dicom_node import DimseServer, patches

    patches.install()
    settings = Settings(**settings_data)
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    from pacsbridge.routing_jobs import install_arrival_routes

    archive = Archive(settings, migrate=False)
    install_arrival_routes(archive, settings)
    send_lock = threading.Lock()

    def closed(address: str) -> None:
        with send_lock, contextlib.suppress(OSError, ValueError):
            parent.send_bytes(_CLOSED + address.encode())

    server = DimseServer(archive, settings, handed_over=True, on_connection_closed=closed)
    server.start()

    def receive() -> None:
        try:
            while not stop.is_set():
                fd = recv_handle(parent)
                address = parent.recv_bytes().decode()
                server.serve_connection(socket.socket(fileno=fd), address)
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
        self._handed: list[Counter[str]] = []  # open connections of each child, by address
        self._lock = threading.Lock()
        #: Called with the peer address when a connection handed to a child has ended (or
        #: the child is gone with it).
        self.connection_ended: Callable[[str], None] = lambda address: None

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
            self._handed.append(Counter())
            threading.Thread(
                target=self._watch, args=(index, ours), name="dimse-child-watch", daemon=True
            ).start()

    def _watch(self, index: int, conn: Connection) -> None:
        """Makes a child available once it is ready and counts down its open connections as
        it reports them ended."""
        with contextlib.suppress(EOFError, OSError):
            while True:
                message = conn.recv_bytes()
                if message == _READY:
                    with self._lock:
                        self._loads[index] = 0
                elif message[:1] == _CLOSED:
                    address = message[1:].decode()
                    with self._lock:
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
            with contextlib.suppress(OSError):  # if the child is gone, so is the count (_watch)
                conn.send_bytes(address.encode())
            self._handed[index][address] += 1
            self._loads[index] += 1
            return True

    def local_closed(self, address: str) -> None:
        """One of this process's own connections (from ``address``) has ended."""
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
