"""Prometheus metrics of billing: charges created (captured from studies and reports, or
entered by hand), counted once their transaction commits. See ``archive/metrics.py`` for how
the processes' values are gathered."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter
from sqlalchemy import event
from sqlalchemy.orm import Session

CHARGES_CREATED = Counter(
    "pacsbridge_charges_created",
    "Charges (ChargeItems) created, by kind: technical, professional, manual.",
    ["kind"],
)


def count_charge_on_commit(session: Session, kind: str) -> None:
    """Count a charge of ``kind`` inserted in ``session`` when (and only if) it commits."""

    def committed(_session: Any) -> None:
        CHARGES_CREATED.labels(kind).inc()

    event.listen(session, "after_commit", committed, once=True)
