"""More DICOM acceptor processes on the same port (``PACSBRIDGE_DIMSE_PROCESSES``).

Concurrent senders compete for one interpreter's GIL inside a process. ``serve`` therefore binds
its DICOM port with SO_REUSEPORT and starts ``dimse_processes - 1`` more processes that bind the
same port; the kernel spreads new associations over all of them. Every process ingests through
the same index and blob store, exactly as separate ``pacsbridge serve`` machines would.
A child stops when asked (SIGTERM) or when its parent goes away.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from config import Settings, configure_logging

log = logging.getLogger(__name__)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _child(settings_data: dict[str, Any], port: int, parent: Connection) -> None:
    from archive import Archive
    from dicom_node import DimseServer

    settings = Settings(**{**settings_data, "dimse_port": port})
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop

    def watch_parent() -> None:
        with contextlib.suppress(EOFError, OSError):
            parent.recv()  # nothing is ever sent: returns or raises when the parent is gone
        stop.set()

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    from pacsbridge.routing_jobs import install_arrival_routes

    archive = Archive(settings, migrate=False)
    install_arrival_routes(archive, settings)
    server = DimseServer(archive, settings, share_port=True)
    server.start()
    log.info("DIMSE acceptor process started", extra={"pid": os.getpid(), "port": port})
    stop.wait()
    server.stop()
    archive.close()


class DimseProcessPool:
    def __init__(self, settings: Settings, port: int, count: int) -> None:
        self.settings = settings
        self.port = port
        self.count = count
        self._processes: list[tuple[BaseProcess, Connection]] = []

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        data = self.settings.model_dump()
        for _ in range(self.count):
            ours, theirs = ctx.Pipe()
            process = ctx.Process(
                target=_child, args=(data, self.port, theirs), name="pacsbridge-dimse", daemon=True
            )
            process.start()
            theirs.close()
            self._processes.append((process, ours))

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

    @property
    def pids(self) -> list[int]:
        return [p.pid for p, _ in self._processes if p.pid]
