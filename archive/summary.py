"""What a study holds, for rules that select studies (routing)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from archive.db import Database
from archive.models import Instance, Series, Study


@dataclass
class StudyFacts:
    study_instance_uid: str
    study_description: str | None = None
    calling_ae_titles: set[str] = field(default_factory=set)
    modalities: set[str] = field(default_factory=set)
    sop_class_uids: set[str] = field(default_factory=set)
    body_parts: set[str] = field(default_factory=set)
    instances: int = 0


def study_facts(db: Database, study_instance_uid: str) -> StudyFacts | None:
    """The distinct values of a study's instances that routing rules match on."""
    with db.engine.connect() as conn:
        description = conn.execute(
            select(Study.id, Study.study_description).where(
                Study.study_instance_uid == study_instance_uid
            )
        ).first()
        if description is None:
            return None
        facts = StudyFacts(study_instance_uid, description.study_description)
        rows = conn.execute(
            select(
                Instance.calling_ae_title,
                Instance.sop_class_uid,
                Series.modality,
                Series.body_part_examined,
            )
            .join(Series, Instance.series_fk == Series.id)
            .where(Series.study_fk == description.id)
            .distinct()
        )
        for calling, sop_class, modality, body_part in rows:
            if calling:
                facts.calling_ae_titles.add(calling)
            facts.sop_class_uids.add(sop_class)
            if modality:
                facts.modalities.add(modality)
            if body_part:
                facts.body_parts.add(body_part)
        facts.instances = int(
            conn.execute(
                select(func.count(Instance.id))
                .join(Series, Instance.series_fk == Series.id)
                .where(Series.study_fk == description.id)
            ).scalar_one()
        )
    return facts
