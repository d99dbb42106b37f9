"""Job handler wiring: which job kinds exist, what runs when a study becomes stable.

A part of pacsbridge that does background work registers a job kind here::

    from pacsbridge.jobs import registry

    def build(archive: Archive, settings: Settings) -> JobHandler:
        def handle(job: JobRecord) -> None: ...
        return handle

    registry.register("forward", build, on_stable_study=True)

``build`` is called once per worker process with that process's archive and settings, and
returns the handler. ``on_stable_study=True`` makes the stable-study scanner enqueue one job of
this kind each time a study becomes stable (payload ``{"study_instance_uid", "updated_at"}``).

Handlers run **at least once** (see ``archive.jobs``): they must be idempotent.

Kinds from outside the package (plugins, the test suite) come from the ``extra_handlers``
setting (``PACSBRIDGE_EXTRA_HANDLERS='["package.module:function"]'``): each ``function`` is
imported at start and called with the registry. Every process that runs workers or the scanner
must have the same ``extra_handlers``.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from archive import Archive
from archive.jobs import JobHandler, JobStatus, Worker, worker_name
from archive.stable import StableStudyScanner
from config import Settings
from pacsbridge.event_delivery import build_dispatcher

log = logging.getLogger(__name__)

HandlerFactory = Callable[[Archive, Settings], JobHandler]


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    kind: str
    build: HandlerFactory
    on_stable_study: bool = False


class HandlerRegistry:
    def __init__(self) -> None:
        self._specs: dict[str, HandlerSpec] = {}
        self._loaded: set[str] = set()
        self._lock = threading.Lock()

    def register(self, kind: str, build: HandlerFactory, *, on_stable_study: bool = False) -> None:
        if not kind or len(kind) > 64:
            raise ValueError(f"a job kind is 1 to 64 characters, not {kind!r}")
        with self._lock:
            if kind in self._specs:
                raise ValueError(f"job kind {kind!r} is already registered")
            self._specs[kind] = HandlerSpec(kind, build, on_stable_study)

    @property
    def specs(self) -> list[HandlerSpec]:
        with self._lock:
            return sorted(self._specs.values(), key=lambda spec: spec.kind)

    @property
    def stable_study_kinds(self) -> list[str]:
        return [spec.kind for spec in self.specs if spec.on_stable_study]

    def load_extra(self, entries: list[str]) -> None:
        """Import ``module:function`` entries and call each with this registry (once)."""
        for entry in entries:
            module_name, sep, function_name = entry.partition(":")
            if not sep or not module_name or not function_name:
                raise ValueError(f"extra handler {entry!r} is not of the form module:function")
            if entry in self._loaded:
                continue
            function = getattr(importlib.import_module(module_name), function_name)
            function(self)
            self._loaded.add(entry)


registry = HandlerRegistry()
"""The process-wide registry that pacsbridge's own job kinds register into."""


def build_registry(settings: Settings) -> HandlerRegistry:
    """The registry with built-in kinds and the ``extra_handlers`` setting loaded."""
    from pacsbridge import ai_jobs, billing_jobs, routing_jobs

    routing_jobs.register(registry, settings)
    ai_jobs.register(registry, settings)
    billing_jobs.register(registry, settings)
    registry.load_extra(settings.extra_handlers)
    return registry


def job_retention(settings: Settings) -> dict[JobStatus, float]:
    """Seconds after which finished jobs are pruned, per status (settings in days)."""
    return {
        JobStatus.DONE: settings.job_retention_days * 86400.0,
        JobStatus.DEAD: settings.dead_job_retention_days * 86400.0,
    }


class JobRuntime:
    """Job workers (``worker_threads``) and the stable-study scanner, as background threads of
    one process. A handler is built once per process and shared by its worker threads."""

    def __init__(
        self,
        archive: Archive,
        settings: Settings,
        handlers: HandlerRegistry,
        *,
        name: str | None = None,
        events: bool = True,
    ) -> None:
        """``events`` off: this process's events are delivered elsewhere (``serve`` delivers
        from a child process, ``pacsbridge/event_process.py``)."""
        base = name or worker_name()
        self.workers = [
            Worker(
                archive.jobs,
                name=base if settings.worker_threads == 1 else f"{base}:{i}",
                poll_interval=settings.worker_poll_interval,
            )
            for i in range(settings.worker_threads)
        ]
        for spec in handlers.specs:
            handler = spec.build(archive, settings)
            for worker in self.workers:
                worker.register(spec.kind, handler)
        self.scanner = StableStudyScanner(
            archive.db,
            archive.jobs,
            stable_age=settings.stable_age,
            kinds=handlers.stable_study_kinds,
            retention=job_retention(settings),
        )
        self.scan_interval = settings.stable_scan_interval
        self.audit = archive.audit
        # Event delivery (events.enabled) runs where the job workers run.
        self.events = build_dispatcher(archive, settings, base) if events else None

    @property
    def name(self) -> str:
        return self.workers[0].name

    def start(self) -> None:
        self.scanner.start(self.scan_interval)
        self.audit.keep_pruned()  # audit events past audit.retention_days, hourly
        for worker in self.workers:
            worker.start()
        if self.events is not None:
            self.events.start()
        log.info(
            "job workers and stable-study scanner started",
            extra={
                "workers": ",".join(w.name for w in self.workers),
                "kinds": ",".join(self.workers[0].kinds) or "-",
                "on_stable_study": ",".join(self.scanner.kinds) or "-",
            },
        )

    def request_stop(self) -> None:
        """Let the workers take no new job (the running ones finish), without waiting."""
        for worker in self.workers:
            worker.request_stop()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop scanning, let the current job finish; True if both stopped within timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        for worker in self.workers:
            worker.request_stop()
        stopped = self.scanner.stop(left())
        if self.events is not None:
            stopped = self.events.stop(left()) and stopped
        for worker in self.workers:
            stopped = worker.stop(left()) and stopped
        return stopped
