"""Prometheus metrics of the archive: ingest (whatever the edge: C-STORE, STOW-RS, AI results,
``pacsbridge import``), queries (C-FIND and QIDO-RS run the same matcher; the edge names
itself), and the job queue, read from its table when scraped.

The metric objects are prometheus-client's. In a process that set ``PROMETHEUS_MULTIPROC_DIR``
before importing prometheus-client (``pacsbridge serve``, its DICOM acceptor processes,
``pacsbridge worker``: see ``pacsbridge/metrics.py``) their values live in memory-mapped files
that ``/metrics`` sums over every process; elsewhere (tests, one-off commands) in memory.

Cost on the store path: one labelled child is looked up in a dict (no lock once it exists) and
three values are incremented in memory; no system call.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, cast

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Table, func, select

from archive.db import Database
from archive.models import Job

INSTANCES_STORED = Counter(
    "pacsbridge_instances_stored",
    "Instances stored (new or overwritten; a duplicate kept as held is not counted), by the "
    "calling AE title of the association that sent them (empty: not sent over DIMSE) and SOP "
    "Class UID.",
    ["calling_ae", "sop_class"],
)
INGEST_BYTES = Counter(
    "pacsbridge_ingest_bytes",
    "Bytes of the instances stored (as Part-10 files).",
)
INGEST_SECONDS = Histogram(
    "pacsbridge_ingest_duration_seconds",
    "Time to store one instance (header parse, blob write, index transaction), stored or "
    "answered as a duplicate.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
QUERY_SECONDS = Histogram(
    "pacsbridge_query_duration_seconds",
    "Time to answer a query, to its last result: C-FIND (every response sent) and QIDO-RS "
    "(the response built), by service and query level.",
    ["service", "level"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

#: Distinct calling AE titles given their own label value per process; later ones are
#: counted under ``other`` (a stranger cycling through AE titles cannot grow the metrics).
MAX_CALLING_AE_LABELS = 256
OTHER = "other"

_stored: dict[tuple[str, str], Any] = {}


def observe_ingest(
    calling_ae: str, sop_class: str, size: int, stored: bool, seconds: float
) -> None:
    """Account for one instance the ingest answered (stored, or a duplicate when not
    ``stored``)."""
    INGEST_SECONDS.observe(seconds)
    if not stored:
        return
    key = (calling_ae, sop_class)
    child = _stored.get(key)
    if child is None:
        ae_values = {ae for ae, _ in _stored}
        if calling_ae not in ae_values and len(ae_values) >= MAX_CALLING_AE_LABELS:
            key = (OTHER, sop_class)
        child = _stored.get(key)
        if child is None:
            child = _stored.setdefault(key, INSTANCES_STORED.labels(*key))
    child.inc()
    INGEST_BYTES.inc(size)


def observe_query(service: str, level: str, seconds: float) -> None:
    """Account for one query answered by ``service`` (C-FIND, QIDO-RS) at ``level``."""
    QUERY_SECONDS.labels(service, level).observe(seconds)


_JOB = cast(Table, Job.__table__)


class JobQueueCollector(Collector):
    """The job queue as it is when scraped: jobs and the age of the oldest, by kind and
    status, from one query on the jobs table (every process's jobs: the table is shared)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def describe(self) -> Iterable[Any]:
        return []  # collected only when scraped: no query at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily(
            "pacsbridge_jobs",
            "Jobs in the queue table, by kind and status.",
            labels=["kind", "status"],
        )
        oldest = GaugeMetricFamily(
            "pacsbridge_jobs_oldest_age_seconds",
            "Age of the oldest job of each kind and status (since it was enqueued).",
            labels=["kind", "status"],
        )
        query = select(
            _JOB.c.kind, _JOB.c.status, func.count(), func.min(_JOB.c.created_at)
        ).group_by(_JOB.c.kind, _JOB.c.status)
        with self.db.engine.connect() as conn:
            rows = conn.execute(query).all()
        now = datetime.now(UTC)
        for kind, status, count, first in rows:
            jobs.add_metric([kind, status], float(count))
            if first is not None:
                first = first if first.tzinfo is not None else first.replace(tzinfo=UTC)
                oldest.add_metric([kind, status], max(0.0, (now - first).total_seconds()))
        yield jobs
        yield oldest
