"""Prometheus metrics of the AI runs: the duration of each stage of a run (weights, load,
infer, encode, store…), observed as :class:`ai.stages.Timings` records it, in the process
that runs the job (``serve`` or ``pacsbridge worker``). See ``archive/metrics.py`` for how the
processes' values are gathered."""

from __future__ import annotations

from prometheus_client import Histogram

AI_STAGE_SECONDS = Histogram(
    "pacsbridge_ai_stage_duration_seconds",
    "Duration of one stage of one AI run, by stage.",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)
