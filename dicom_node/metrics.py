"""Prometheus metrics of the DICOM node: associations by calling AE title and result, and the
associations open now (summed over the acceptor processes: ``multiprocess_mode="livesum"``
counts only processes that are alive). See ``archive/metrics.py`` for how the processes' values
are gathered."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ASSOCIATIONS = Counter(
    "pacsbridge_associations",
    "DICOM association requests answered, by calling AE title and result (accepted, rejected, "
    "aborted: answered with an A-ABORT instead of an A-ASSOCIATE-AC or -RJ).",
    ["calling_ae", "result"],
)
ASSOCIATIONS_OPEN = Gauge(
    "pacsbridge_associations_open",
    "DICOM associations established and not yet released or aborted.",
    multiprocess_mode="livesum",
)

#: Distinct calling AE titles given their own label value per process (beyond: ``other``).
MAX_CALLING_AE_LABELS = 256
_seen: set[str] = set()


def association_answered(calling_ae: str, result: str) -> None:
    """Count an association request answered with ``result``."""
    if calling_ae not in _seen:
        if len(_seen) >= MAX_CALLING_AE_LABELS:
            calling_ae = "other"
        else:
            _seen.add(calling_ae)
    ASSOCIATIONS.labels(calling_ae, result).inc()


def association_opened() -> None:
    ASSOCIATIONS_OPEN.inc()


def association_closed() -> None:
    ASSOCIATIONS_OPEN.dec()
