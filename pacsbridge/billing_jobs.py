"""Billing as a job: charge capture on every stable study (when ``billing.enabled``).

``charge-capture`` (enqueued by the stable-study scanner for every stable study): captures the
study's technical charges, then the professional charges of its signed reports
(``billing.capture``). A report signed over FHIR or DICOM is stored as an SR in the study, which
makes the study stable again: this job runs again and the professional charge appears. Capture
is idempotent, so a study that becomes stable again is never charged twice.
"""

from __future__ import annotations

import logging

from archive import Archive
from archive.audit import AuditEvent
from archive.jobs import JobHandler, JobRecord, PermanentJobError
from billing.capture import capture_professional, capture_technical
from config import Settings
from pacsbridge.jobs import HandlerRegistry

log = logging.getLogger(__name__)

CHARGE_CAPTURE = "charge-capture"


def register(registry: HandlerRegistry, settings: Settings) -> None:
    if CHARGE_CAPTURE not in {spec.kind for spec in registry.specs}:
        registry.register(CHARGE_CAPTURE, _build_capture, on_stable_study=settings.billing.enabled)


def _build_capture(archive: Archive, settings: Settings) -> JobHandler:
    def handle(job: JobRecord) -> None:
        study = job.payload.get("study_instance_uid") or job.study_instance_uid
        if not study:
            raise PermanentJobError("payload has no study_instance_uid")
        # Each charge captured is a change of the patient's record (PS3.15 A.5.3.9, action
        # C), recorded in the capture's transaction; the agent is the job's system identity.
        event = AuditEvent(
            action="C",
            type_code="110110",
            agent=f"job:{CHARGE_CAPTURE}",
            source="jobs",
            study_uid=study,
        )
        technical = capture_technical(archive, settings, study, actor="stable-study", audit=event)
        professional = capture_professional(
            archive, settings, study, actor="stable-study", audit=event
        )
        log.info(
            "charges captured for stable study",
            extra={
                "study": study,
                "technical": ",".join(map(str, technical)) or "-",
                "professional": ",".join(map(str, professional)) or "-",
            },
        )

    return handle
