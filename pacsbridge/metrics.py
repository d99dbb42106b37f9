"""Prometheus ``/metrics``: one scrape shows the counts of every process of a data dir.

``pacsbridge serve`` runs several processes (the HTTP server and DICOM acceptor in one, more
DICOM acceptor processes behind it, ``PACSBRIDGE_DIMSE_PROCESSES``) and ``pacsbridge worker``
processes run jobs beside it. Their metrics are gathered with prometheus-client's
**multiprocess mode**: every one of these processes sets ``PROMETHEUS_MULTIPROC_DIR`` to the
``metrics_dir`` setting (``<data_dir>/metrics``) before the first metric is made
(:func:`prepare_multiprocess`), so that its values live in memory-mapped files there, one set
per process id; ``/metrics`` sums the files of every process
(``prometheus_client.multiprocess.MultiProcessCollector``). Counters and histograms of a
process that has ended keep counting in the sums (a counter never goes down while ``serve``
runs); the gauge of open associations counts only live processes (``livesum``), and the files
of an acceptor process that ended are dropped when ``serve`` notices (:func:`mark_process_dead`).
``serve`` deletes, when it starts, the files of processes that are no longer running (a
``worker`` that is still running keeps its own). A ``worker`` on another machine has its own
data dir: its job metrics are in that machine's files, not in this scrape.

``/metrics`` itself, and the HTTP metrics, are in ``pacsbridge/metrics_api.py``. The job
queue's depth and age are read from the jobs table when scraped
(:class:`archive.metrics.JobQueueCollector`: one query), so they are right whichever process
enqueued or ran the jobs.

Values are updated in memory (an mmap) by the process that counts; the process id that names
its files is read once (and again after a fork), not at every update, so that counting costs
no system call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path

from config import Settings

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
_FILE = re.compile(r"^[a-z_]+_(\d+)\.db$")
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def _process_identifier() -> int:
    return _pid


def metrics_dir(settings: Settings) -> Path:
    return (settings.metrics_dir or settings.data_dir / "metrics").resolve()


def prepare_multiprocess(settings: Settings, *, clean: bool = False) -> Path:
    """Make this process keep its metrics in the data dir's metrics folder (multiprocess
    mode); ``clean``: first delete the files of processes that are no longer running (``serve``
    at start). Must run before any metric is made: before ``archive`` (or any package that
    defines metrics) is imported. Processes started from this one inherit the folder."""
    folder = metrics_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    if clean:
        for path in folder.iterdir():
            found = _FILE.match(path.name)
            if found is not None and not _running(int(found.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    if "prometheus_client.values" in sys.modules:
        from prometheus_client import values

        if values.ValueClass is values.MutexValue:
            # Metrics were made before (a command run inside another program): they stay
            # this process's own.
            log.warning(
                "metrics are this process's only: prometheus_client was imported before the "
                "metrics folder was set"
            )
            return folder
    os.environ[ENV] = str(folder)
    from prometheus_client import values

    # The default reads os.getpid() at every update: a system call per counted instance.
    values.ValueClass = values.MultiProcessValue(process_identifier=_process_identifier)
    return folder


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(ENV))


def mark_process_dead(pid: int) -> None:
    """A process that counted into the metrics folder has ended: its live gauges go. Said
    twice at once (a child's watcher and ``stop``), the second finds them gone: no error."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        with contextlib.suppress(FileNotFoundError):
            multiprocess.mark_process_dead(pid)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process with that id
    return True
