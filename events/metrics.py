"""Prometheus metrics of event delivery (see ``archive/metrics.py`` for how the processes'
values are gathered)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Histogram

EVENTS_DELIVERED = Counter(
    "pacsbridge_events_delivered",
    "Events delivered to a subscription, by channel: amqp, webhook, rest-hook.",
    ["channel"],
)
EVENTS_FAILED = Counter(
    "pacsbridge_events_failed",
    "Event delivery attempts that failed (retried, or dead after the most attempts).",
    ["channel"],
)
EVENT_LATENCY = Histogram(
    "pacsbridge_event_delivery_latency_seconds",
    "From an event's commit time (its outbox row) to its delivery, by channel.",
    ["channel"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0),
)


_children: dict[tuple[str, str], Any] = {}


def _child(metric: Any, name: str, channel: str) -> Any:
    """The labelled metric, looked up once per channel (this runs once per event)."""
    child = _children.get((name, channel))
    if child is None:
        child = _children[(name, channel)] = metric.labels(channel)
    return child


def delivered(channel: str, created_at: datetime) -> None:
    _child(EVENTS_DELIVERED, "delivered", channel).inc()
    seconds = (datetime.now(UTC) - created_at).total_seconds()
    _child(EVENT_LATENCY, "latency", channel).observe(max(0.0, seconds))


def failed(channel: str) -> None:
    _child(EVENTS_FAILED, "failed", channel).inc()
