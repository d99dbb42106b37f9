"""AI as jobs: what a stable study turns into.

- ``ai`` (enqueued by the stable-study scanner for every stable study when AI is on): plans a
  run for every enabled model on every series its selector matches, unless the model's newest
  run on the series saw the same instances, and enqueues one ``ai-run`` job per run;
- ``ai-run``: executes one run (``ai.runs.execute_run``). A model or input error fails the
  run with its reason and ends the job (retrying cannot help); the archive, other runs and
  other jobs go on.

One model registry per process: each model's weights are loaded once, by the first run that
needs them, and kept.
"""

from __future__ import annotations

import logging
import threading

from ai.registry import ModelRegistry
from ai.runs import PlannedRun, execute_run, plan_study
from archive import Archive
from archive.audit import SERIOUS_FAILURE, SUCCESS, AuditEvent
from archive.jobs import JobHandler, JobRecord, PermanentJobError
from config import Settings
from pacsbridge.jobs import HandlerRegistry

log = logging.getLogger(__name__)

AI = "ai"
AI_RUN = "ai-run"

#: Registries by settings object; the settings are kept with them, so an id is never reused.
_registries: dict[int, tuple[Settings, ModelRegistry]] = {}
_lock = threading.Lock()


def model_registry(settings: Settings) -> ModelRegistry:
    """The process's model registry for these settings (weights loaded once, on first use)."""
    with _lock:
        held = _registries.get(id(settings))
        if held is None or held[0] is not settings:
            held = _registries[id(settings)] = (settings, ModelRegistry(settings.ai))
        return held[1]


def register(registry: HandlerRegistry, settings: Settings) -> None:
    known = {spec.kind for spec in registry.specs}
    if AI not in known:
        on_stable = settings.ai.enabled and bool(model_registry(settings).enabled)
        registry.register(AI, _build_plan, on_stable_study=on_stable)
    if AI_RUN not in known:
        registry.register(AI_RUN, _build_run)


def enqueue_runs(archive: Archive, planned: list[PlannedRun], study_instance_uid: str) -> None:
    if planned:
        archive.jobs.enqueue_many(
            [(AI_RUN, {"run_id": p.run_id, "model": p.model}, study_instance_uid) for p in planned]
        )


def _build_plan(archive: Archive, settings: Settings) -> JobHandler:
    models = model_registry(settings)

    def handle(job: JobRecord) -> None:
        study = job.payload.get("study_instance_uid") or job.study_instance_uid
        if not study:
            raise PermanentJobError("payload has no study_instance_uid")
        planned = plan_study(archive, models, study, trigger="stable")
        enqueue_runs(archive, planned, study)
        log.info(
            "AI runs planned for stable study",
            extra={
                "study": study,
                "runs": ",".join(f"{p.model}:{p.run_id}" for p in planned) or "-",
            },
        )

    return handle


def _build_run(archive: Archive, settings: Settings) -> JobHandler:
    models = model_registry(settings)

    def handle(job: JobRecord) -> None:
        run_id = job.payload.get("run_id")
        if not isinstance(run_id, int) or isinstance(run_id, bool):
            raise PermanentJobError("payload has no run_id")
        run = execute_run(archive, models, run_id)
        # PS3.15 A.5.3.3: the model read the study's instances and wrote its results into it.
        archive.audit.submit(
            AuditEvent(
                action="C",
                type_code="110103",
                agent=f"ai:{job.payload.get('model') or 'model'}",
                source="jobs",
                outcome=SERIOUS_FAILURE if run.status == "failed" else SUCCESS,
                outcome_text=str(run.error)[:255] if run.status == "failed" else None,
                study_uid=job.study_instance_uid,
                entity=f"/api/ai/runs/{run_id}",
            )
        )
        if run.status == "failed":
            # The run holds the reason; the job ends here (retrying cannot help).
            raise PermanentJobError(f"AI run {run_id} failed: {run.error}")

    return handle
