"""Which series of a study a model runs on: declarative rules over the index, in the spirit of
MONAI Deploy's series selector (modality, body part, image type, orientation, slice count, SOP
class, series description)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select

from archive import Archive
from archive.models import Instance, Series, Study
from config.settings import SeriesSelectorSettings

#: Modalities of derived objects and documents: never a model's input (our own SEG and SR
#: results among them).
NOT_IMAGES = frozenset(
    {"SEG", "SR", "KO", "PR", "DOC", "REG", "RTSTRUCT", "RTPLAN", "RTRECORD", "AU", "ECG"}
)


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    """What the selector looks at, for one series."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    sop_class_uids: frozenset[str]
    image_type: tuple[str, ...]
    """Image Type (0008,0008) of the series' first instance."""
    orientation: str | None
    """``axial``, ``sagittal`` or ``coronal`` from the first instance's orientation."""
    slices: int
    """Frames in the series (one per single-frame instance)."""


def _tag(dicom_json: dict, tag: str) -> list:
    element = dicom_json.get(tag) or {}
    return list(element.get("Value") or [])


def _orientation_of(dicom_json: dict) -> list:
    iop = _tag(dicom_json, "00200037")
    if iop:
        return iop
    # Enhanced multi-frame: Shared Functional Groups > Plane Orientation (PS3.3 C.7.6.16).
    for shared in _tag(dicom_json, "52009229"):
        for plane in _tag(shared, "00209116"):
            iop = _tag(plane, "00200037")
            if iop:
                return iop
    return []


def plane_of(iop: list) -> str | None:
    """The anatomical plane closest to an Image Orientation (Patient)."""
    try:
        values = np.array([float(v) for v in iop], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if values.shape != (6,) or not np.all(np.isfinite(values)):
        return None
    normal = np.abs(np.cross(values[:3], values[3:]))
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def study_series(archive: Archive, study_instance_uid: str) -> list[SeriesInfo]:
    """Every series of a study, as the selector sees it."""
    with archive.db.session() as s:
        rows = s.execute(
            select(
                Series.id,
                Series.series_instance_uid,
                Series.modality,
                Series.body_part_examined,
                Series.series_description,
            )
            .join(Study, Series.study_fk == Study.id)
            .where(Study.study_instance_uid == study_instance_uid)
            .order_by(Series.series_number, Series.series_instance_uid)
        ).all()
        infos = []
        for row in rows:
            classes = frozenset(
                s.scalars(
                    select(Instance.sop_class_uid).where(Instance.series_fk == row.id).distinct()
                )
            )
            frames = s.scalar(
                select(
                    func.coalesce(func.sum(func.coalesce(Instance.number_of_frames, 1)), 0)
                ).where(Instance.series_fk == row.id)
            )
            first = s.scalar(
                select(Instance.dicom_json)
                .where(Instance.series_fk == row.id)
                .order_by(Instance.instance_number, Instance.id)
                .limit(1)
            )
            first = first or {}
            infos.append(
                SeriesInfo(
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=row.series_instance_uid,
                    modality=(row.modality or "").upper(),
                    body_part_examined=row.body_part_examined or "",
                    series_description=row.series_description or "",
                    sop_class_uids=classes,
                    image_type=tuple(str(v).upper() for v in _tag(first, "00080008")),
                    orientation=plane_of(_orientation_of(first)),
                    slices=int(frames or 0),
                )
            )
    return infos


def _like(value: str, patterns: list[str]) -> bool:
    value = value.upper()
    return any(fnmatch.fnmatchcase(value, pattern.upper()) for pattern in patterns)


def matches(selector: SeriesSelectorSettings, series: SeriesInfo) -> bool:
    """Whether ``series`` satisfies every criterion of ``selector``."""
    if series.modality in NOT_IMAGES:
        return False
    if selector.modality and not _like(series.modality, selector.modality):
        return False
    if (
        selector.body_part
        and series.body_part_examined
        and not _like(series.body_part_examined, selector.body_part)
    ):
        return False
    if selector.image_type and not all(
        value.upper() in series.image_type for value in selector.image_type
    ):
        return False
    if selector.orientation and series.orientation != selector.orientation:
        return False
    if series.slices < selector.min_slices:
        return False
    if selector.sop_class_uid and not (series.sop_class_uids & set(selector.sop_class_uid)):
        return False
    return not (
        selector.series_description
        and not re.search(selector.series_description, series.series_description, re.IGNORECASE)
    )
