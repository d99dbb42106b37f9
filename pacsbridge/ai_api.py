"""HTTP view of AI: the models, the runs (status, model and weights, series used, instances
produced, per-stage timings), and manual runs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from ai.runs import RunStore, plan_study
from archive import Archive
from archive.models import Study
from config import Settings
from pacsbridge.ai_jobs import enqueue_runs, model_registry
from pacsbridge.audit_http import NOTE

router = APIRouter(prefix="/api/ai", tags=["ai"])

_UID = r"^[0-9]+(\.[0-9]+)*$"


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


class RunRequest(BaseModel):
    model_config = {"extra": "forbid"}

    study_instance_uid: str = Field(max_length=64, pattern=_UID)
    model: str | None = Field(default=None, max_length=64)
    """One model; default: every enabled model whose selector matches a series."""


@router.get("/models")
def list_models(request: Request) -> list[dict[str, Any]]:
    """Every model: source, weights and their SHA-256, what it selects, whether it is on."""
    return [spec.to_json() for spec in model_registry(_settings(request)).specs.values()]


@router.get("/runs")
def list_runs(
    request: Request,
    study: Annotated[str | None, Query(max_length=64, description="Study Instance UID")] = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[Literal["queued", "running", "done", "failed"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
) -> list[dict[str, Any]]:
    """Runs, newest first."""
    runs = RunStore(_archive(request)).list(
        study=study, model=model, status=status, limit=limit, offset=offset
    )
    return [run.to_json() for run in runs]


@router.get("/runs/{run_id}", responses={404: {"description": "no such run"}})
def get_run(request: Request, run_id: int) -> dict[str, Any]:
    run = RunStore(_archive(request)).get(run_id)
    if run is None:
        raise HTTPException(status_code=404, detail=f"no AI run {run_id}")
    return run.to_json()


@router.post(
    "/runs",
    status_code=202,
    responses={
        404: {"description": "no such study"},
        422: {"description": "unknown or disabled model, or no series it selects"},
    },
)
def create_runs(request: Request, body: RunRequest) -> JSONResponse:
    """Run the models on a study now (even on series they have already seen); the runs are
    queued for the job workers and listed in the answer."""
    archive = _archive(request)
    models = model_registry(_settings(request))
    if body.model is not None:
        spec = models.get(body.model)
        if spec is None:
            raise HTTPException(status_code=422, detail=f"no model {body.model!r}")
        if not spec.settings.enabled:
            raise HTTPException(status_code=422, detail=f"model {body.model!r} is switched off")
    with archive.db.session() as s:
        known = s.scalar(
            select(Study.id).where(Study.study_instance_uid == body.study_instance_uid)
        )
    if known is None:
        raise HTTPException(status_code=404, detail=f"no study {body.study_instance_uid}")
    # The request's audit event names the study (and through it the patient) it ran models on.
    note = request.scope.get(NOTE)
    if isinstance(note, dict):
        note["study_uid"] = body.study_instance_uid
    planned = plan_study(
        archive, models, body.study_instance_uid, model=body.model, trigger="manual"
    )
    if not planned:
        which = f"model {body.model!r}" if body.model else "any enabled model"
        raise HTTPException(
            status_code=422, detail=f"no series of the study is selected by {which}"
        )
    enqueue_runs(archive, planned, body.study_instance_uid)
    store = RunStore(archive)
    runs = [store.get(p.run_id) for p in planned]
    return JSONResponse([run.to_json() for run in runs if run], status_code=202)
