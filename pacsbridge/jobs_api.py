"""HTTP view of the job queue: what is queued, running, failed and why; requeue."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request

from archive import Archive
from archive.jobs import MAX_JOB_ID, JobStateError, JobStatus

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


@router.get("")
def list_jobs(
    request: Request,
    status: Annotated[
        JobStatus | None, Query(description="queued, running, done, failed, dead")
    ] = None,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    study: Annotated[str | None, Query(max_length=64, description="Study Instance UID")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_JOB_ID)] = 0,
) -> list[dict[str, Any]]:
    """Jobs, newest first. ``failed`` jobs will be retried at ``next_run_at``; ``dead`` ones
    gave up (``last_error`` says why) and run again only when requeued."""
    jobs = _archive(request).jobs.list(
        status=status, kind=kind, study_instance_uid=study, limit=limit, offset=offset
    )
    return [job.to_json() for job in jobs]


@router.get("/{job_id}", responses={404: {"description": "no such job"}})
def get_job(request: Request, job_id: int) -> dict[str, Any]:
    """A job by id; 404 for an id no job has (any integer: ids beyond the index's are
    answered without asking it)."""
    job = _archive(request).jobs.get(job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id}")
    return job.to_json()


@router.post(
    "/{job_id}/requeue",
    responses={404: {"description": "no such job"}, 409: {"description": "the job is running"}},
)
def requeue_job(request: Request, job_id: int) -> dict[str, Any]:
    """Run a job again from its first attempt, now (not while it is running)."""
    try:
        job = _archive(request).jobs.requeue(job_id)
    except JobStateError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id}")
    return job.to_json()
