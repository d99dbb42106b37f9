"""AI runs: planning (which model on which series of a study), executing one run stage by
stage, and the run records (table ``ai_run``).

A run loads the series once (``load``), runs the model (``preprocess``, ``infer``,
``postprocess``), builds the SEG and SR (``encode``) and stores them through archive ingest
(``store``), the same path as a modality's images; each stage's seconds go into the run's
result. The UIDs of what a run stores derive from the run's own UID, so a run repeated after a
crash stores the same instances again (duplicates are kept once), never a second copy. If the
SR cannot be stored after the SEG was, the SEG is deleted again: the archive gets both or
neither.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import traceback
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update

from ai.registry import ModelError, ModelRegistry, ModelSpec
from ai.selector import SeriesInfo, matches, study_series
from ai.stages import ClassificationOutput, SegmentationOutput, Timings
from ai.volume import VolumeError, input_fingerprint, load_images, load_volume, series_instances
from archive import Archive
from archive.announce import study_reference
from archive.audit import AuditEvent
from archive.ingest import IngestError
from archive.models import AIRun, Patient, Study
from archive.outbox import emit

log = logging.getLogger(__name__)

#: Series Numbers of result series: high, so that viewers list them after the source series.
SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002
MAX_ERROR_LENGTH = 4000


class RunError(Exception):
    """A run failed; the message is its recorded reason."""


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: int
    uid: str
    model: str
    weights_sha256: str | None
    study_instance_uid: str
    series_instance_uid: str
    input_fingerprint: str | None
    trigger: str
    status: str
    error: str | None
    result: dict[str, Any]
    superseded_by: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: AIRun) -> RunRecord:
        return cls(
            id=row.id,
            uid=row.uid,
            model=row.model,
            weights_sha256=row.weights_sha256,
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            input_fingerprint=row.input_fingerprint,
            trigger=row.trigger,
            status=row.status,
            error=row.error,
            result=dict(row.result or {}),
            superseded_by=row.superseded_by,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )

    def to_json(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "id": self.id,
            "uid": self.uid,
            "model": self.model,
            "weights_sha256": self.weights_sha256,
            "study": self.study_instance_uid,
            "series": self.series_instance_uid,
            "trigger": self.trigger,
            "status": self.status,
            "error": self.error,
            "produced": self.result.get("produced", []),
            "timings": self.result.get("timings", {}),
            "findings": self.result.get("findings", []),
            "input": self.result.get("input", {}),
            "superseded_by": self.superseded_by,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }


class RunStore:
    """The ``ai_run`` table."""

    def __init__(self, archive: Archive) -> None:
        self.db = archive.db

    def create(
        self,
        spec: ModelSpec,
        series: SeriesInfo,
        fingerprint: str,
        trigger: str,
    ) -> int:
        with self.db.write_session() as s:
            row = AIRun(
                uid=f"2.25.{uuid.uuid4().int}",  # PS3.5 B.2
                model=spec.name,
                weights_sha256=spec.weights_sha256,
                study_instance_uid=series.study_instance_uid,
                series_instance_uid=series.series_instance_uid,
                input_fingerprint=fingerprint,
                trigger=trigger,
                status="queued",
                result={},
            )
            s.add(row)
            s.flush()
            return int(row.id)

    def get(self, run_id: int) -> RunRecord | None:
        if not 0 < run_id < 2**63:
            return None
        with self.db.session() as s:
            row = s.get(AIRun, run_id)
            return RunRecord.from_row(row) if row else None

    def list(
        self,
        *,
        study: str | None = None,
        model: str | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[RunRecord]:
        query = select(AIRun).order_by(AIRun.id.desc()).limit(limit).offset(offset)
        if study:
            query = query.where(AIRun.study_instance_uid == study)
        if model:
            query = query.where(AIRun.model == model)
        if status:
            query = query.where(AIRun.status == status)
        with self.db.session() as s:
            return [RunRecord.from_row(row) for row in s.scalars(query)]

    def latest(self, model: str, series_instance_uid: str) -> RunRecord | None:
        """The newest run of a model on a series that is queued, running or done."""
        with self.db.session() as s:
            row = s.scalars(
                select(AIRun)
                .where(
                    AIRun.model == model,
                    AIRun.series_instance_uid == series_instance_uid,
                    AIRun.status.in_(("queued", "running", "done")),
                )
                .order_by(AIRun.id.desc())
                .limit(1)
            ).first()
            return RunRecord.from_row(row) if row else None

    def started(self, run_id: int) -> None:
        with self.db.write_session() as s:
            s.execute(
                update(AIRun)
                .where(AIRun.id == run_id)
                .values(status="running", started_at=_now(), error=None)
            )

    def finished(self, run: RunRecord, result: dict[str, Any]) -> None:
        """Done; earlier done runs of the model on the series are superseded by it."""
        with self.db.write_session() as s:
            s.execute(
                update(AIRun)
                .where(AIRun.id == run.id)
                .values(status="done", result=result, finished_at=_now(), error=None)
            )
            s.execute(
                update(AIRun)
                .where(
                    AIRun.model == run.model,
                    AIRun.series_instance_uid == run.series_instance_uid,
                    AIRun.status == "done",
                    AIRun.id < run.id,
                    AIRun.superseded_by.is_(None),
                )
                .values(superseded_by=run.id)
            )
            # The ``ai.result`` event (archive.outbox), in the transaction that records the run
            # done: identifiers and a summary of the findings, never pixel data.
            emit(
                s,
                "ai.result",
                study_uid=run.study_instance_uid,
                patient_id=s.scalar(
                    select(Patient.patient_id)
                    .join(Study, Study.patient_fk == Patient.id)
                    .where(Study.study_instance_uid == run.study_instance_uid)
                ),
                resource=study_reference(run.study_instance_uid),
                data=result_event_data(run, result),
            )

    def failed(self, run_id: int, error: str, result: dict[str, Any]) -> None:
        with self.db.write_session() as s:
            s.execute(
                update(AIRun)
                .where(AIRun.id == run_id)
                .values(
                    status="failed",
                    error=error[:MAX_ERROR_LENGTH],
                    result=result,
                    finished_at=_now(),
                )
            )

    def count(self) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(AIRun)) or 0)


def result_event_data(run: RunRecord, result: dict[str, Any]) -> dict[str, Any]:
    """The data of a run's ``ai.result`` event: the model, the run, the series it read, the
    instances it produced and a summary of its findings (per label: the volume segmented, or
    how many images were classified as showing it and the highest probability)."""
    summary: dict[str, dict[str, Any]] = {}
    for finding in result.get("findings", []):
        label = str(finding.get("label"))
        entry = summary.setdefault(label, {"label": label})
        if "volume_ml" in finding:
            entry["volume_ml"] = round(entry.get("volume_ml", 0.0) + finding["volume_ml"], 3)
        if "probability" in finding:
            entry["images_present"] = entry.get("images_present", 0) + bool(finding.get("present"))
            entry["max_probability"] = max(
                entry.get("max_probability", 0.0), float(finding["probability"])
            )
    return {
        "model": run.model,
        "model_version": result.get("model_version"),
        "run_id": run.id,
        "run_uid": run.uid,
        "trigger": run.trigger,
        "series_instance_uid": run.series_instance_uid,
        "produced": [
            {
                key: item[key]
                for key in ("modality", "sop_class_uid", "sop_instance_uid", "series_instance_uid")
                if key in item
            }
            for item in result.get("produced", [])
        ],
        "findings": list(summary.values()),
    }


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class PlannedRun:
    run_id: int
    model: str
    series_instance_uid: str


def plan_study(
    archive: Archive,
    registry: ModelRegistry,
    study_instance_uid: str,
    *,
    model: str | None = None,
    trigger: str = "stable",
) -> list[PlannedRun]:
    """Create a queued run for every enabled model (or the one named) on every series of the
    study its selector matches. A stable-study trigger skips a series whose newest run of the
    model saw the same instances (``input_fingerprint``); a manual one always runs."""
    runs = RunStore(archive)
    specs = registry.enabled if model is None else [s for s in [registry.get(model)] if s]
    planned = []
    series_list = study_series(archive, study_instance_uid)
    for spec in specs:
        for series in series_list:
            if not matches(spec.selector, series):
                continue
            sops = [
                sop for sop, _cls, _key in series_instances(archive, series.series_instance_uid)
            ]
            fingerprint = input_fingerprint(sops)
            if trigger == "stable":
                latest = runs.latest(spec.name, series.series_instance_uid)
                if (
                    latest is not None
                    and latest.input_fingerprint == fingerprint
                    and latest.weights_sha256 == spec.weights_sha256
                ):
                    if latest.status == "queued":
                        # Planned before, maybe never enqueued (a crash in between): again.
                        planned.append(PlannedRun(latest.id, spec.name, series.series_instance_uid))
                    continue
            run_id = runs.create(spec, series, fingerprint, trigger)
            planned.append(PlannedRun(run_id, spec.name, series.series_instance_uid))
    return planned


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def execute_run(archive: Archive, registry: ModelRegistry, run_id: int) -> RunRecord:
    """Run one planned run to its end: ``done`` with what it produced, or ``failed`` with the
    reason (a model or input error fails the run, never the archive or other runs)."""
    runs = RunStore(archive)
    run = runs.get(run_id)
    if run is None:
        raise RunError(f"no AI run {run_id}")
    if run.status == "done":
        return run
    runs.started(run.id)
    timings = Timings()
    result: dict[str, Any] = {"timings": {}}
    try:
        result = _execute(archive, registry, run, timings)
    except (ModelError, VolumeError, RunError) as exc:
        result["timings"] = timings.to_json()
        runs.failed(run.id, str(exc), result)
        log.warning(
            "AI run failed",
            extra={
                "run": run.id,
                "model": run.model,
                "series": run.series_instance_uid,
                "err": str(exc),
            },
        )
    except Exception as exc:
        result["timings"] = timings.to_json()
        reason = f"{type(exc).__name__}: {exc}"
        runs.failed(run.id, reason, result)
        log.error(
            "AI run failed unexpectedly",
            extra={
                "run": run.id,
                "model": run.model,
                "err": reason,
                "trace": traceback.format_exc(limit=8),
            },
        )
    else:
        updated = runs.get(run.id)
        assert updated is not None
        runs.finished(updated, result)
        log.info(
            "AI run done",
            extra={
                "run": run.id,
                "model": run.model,
                "series": run.series_instance_uid,
                "produced": len(result.get("produced", [])),
            },
        )
    final = runs.get(run.id)
    assert final is not None
    return final


def _execute(
    archive: Archive, registry: ModelRegistry, run: RunRecord, timings: Timings
) -> dict[str, Any]:
    spec = registry.get(run.model)
    if spec is None:
        raise ModelError(f"model {run.model!r} is no longer configured")
    if not spec.settings.enabled:
        raise ModelError(f"model {run.model!r} is switched off")
    from ai.writers import (
        ResultUIDs,
        classification_report,
        encode,
        exclusive,
        segment_findings,
        segmentation,
        segmentation_report,
    )

    with timings.stage("weights"):  # loaded on a process's first run, then kept
        runner = registry.runner(spec)
    ai_settings = registry.settings
    with timings.stage("load"):
        if runner.needs_geometry:
            volume = load_volume(
                archive,
                run.series_instance_uid,
                spacing_tolerance=ai_settings.spacing_tolerance,
                max_voxels=ai_settings.max_voxels,
            )
        else:
            volume = load_images(
                archive, run.series_instance_uid, max_voxels=ai_settings.max_voxels
            )
    output = runner.run(volume, timings)
    uids = ResultUIDs.for_run(run.uid, spec.name)
    result: dict[str, Any] = {
        "input": {
            "slices": len(volume.slices),
            "shape": list(volume.array.shape),
            "spacing_mm": list(volume.geometry.spacing) if volume.geometry else None,
            "duplicates_dropped": volume.duplicates_dropped,
            "device": str(runner.device),
        },
        "model_version": spec.version,
    }
    with timings.stage("encode"):
        objects: list[tuple[str, Any]] = []
        if isinstance(output, SegmentationOutput):
            labelmap = spec.settings.segmentation_type == "LABELMAP"
            if labelmap:
                output.masks = exclusive(output.masks)
            findings = segment_findings(volume, output.masks)
            seg = segmentation(
                volume,
                spec,
                output.masks,
                findings,
                uids,
                series_number=SEG_SERIES_NUMBER,
                labelmap=labelmap,
            )
            sr = segmentation_report(
                volume, spec, output.masks, findings, seg, uids, series_number=SR_SERIES_NUMBER
            )
            if seg is not None:
                objects.append(("SEG", seg))
            result["findings"] = [
                {
                    "label": spec.labels[f.index].name,
                    "code": spec.labels[f.index].type.model_dump(),
                    "voxels": f.voxels,
                    "volume_ml": round(f.volume_ml, 3),
                }
                for f in findings
            ]
        else:
            assert isinstance(output, ClassificationOutput)
            sr = classification_report(
                volume, spec, output.probabilities, uids, series_number=SR_SERIES_NUMBER
            )
            result["findings"] = [
                {
                    "image": ref.sop_instance_uid,
                    "label": label.name,
                    "code": label.type.model_dump(),
                    "probability": round(float(output.probabilities[k, c]), 4),
                    "present": bool(output.probabilities[k, c] >= spec.settings.threshold),
                }
                for k, ref in enumerate(volume.slices)
                for c, label in enumerate(spec.labels)
            ]
        objects.append(("SR", sr))
        encoded = [(modality, ds, encode(ds)) for modality, ds in objects]
    del volume
    with timings.stage("store"):
        produced = _store(archive, encoded, _results_event(run))
    result["produced"] = produced
    result["timings"] = timings.to_json()
    result["timings"]["total"] = round(sum(timings.seconds.values()), 4)
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return result


def _results_event(run: RunRecord) -> AuditEvent:
    """The audit event of the results a run stores: DICOM Instances Transferred (PS3.15
    A.5.3.4, 110104), action C, the model as the requestor, one per run (its results are one
    study's instances, stored by one requestor)."""
    return AuditEvent(
        action="C",
        type_code="110104",
        agent=f"ai:{run.model}",
        source="jobs",
        study_uid=run.study_instance_uid,
        entity=f"/api/ai/runs/{run.id}",
    )


def _store(
    archive: Archive, encoded: list[tuple[str, Any, bytes]], audit: AuditEvent
) -> list[dict[str, str]]:
    """Ingest the results in order; if one is refused, delete those stored before it. The
    audit event is committed in the index transaction of the first result that changes the
    archive (a result held from an earlier attempt of the run changes nothing); results taken
    back out after it record their deletion (PS3.15 A.5.3.3, 110103 D) in its transaction."""
    stored: list[dict[str, str]] = []
    recorded = False
    for modality, ds, data in encoded:
        try:
            outcome = archive.ingest(data, calling_ae_title="", audit=None if recorded else audit)
        except BaseException as exc:
            taken_back = (
                dataclasses.replace(audit, action="D", type_code="110103", recorded=_now())
                if recorded
                else None
            )
            for earlier in stored:
                archive.delete_instance(earlier["sop_instance_uid"], audit=taken_back)
                taken_back = None
            if isinstance(exc, IngestError):
                raise RunError(f"the {modality} was refused by the archive: {exc.reason}") from exc
            raise
        recorded = recorded or outcome.audited
        stored.append(
            {
                "modality": modality,
                "sop_class_uid": str(ds.SOPClassUID),
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
                "outcome": outcome.outcome.value,
            }
        )
    return stored
