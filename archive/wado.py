"""Finding stored instances for retrieval: which blobs a study / series / instance names, and
their DICOM JSON.

Protocol-free: WADO-RS (instances, metadata, frames, bulk data, rendered, thumbnail) builds its
responses on these lookups. Every lookup is one indexed SQL query; metadata streams the DICOM
JSON stored at ingest as text, never re-parsing a file. Reading the files themselves is
:mod:`archive.instance_io`; decoding them, :mod:`archive.frames`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Text, cast, func, select

from archive.db import Database
from archive.instance_io import StoredInstance
from archive.models import Instance, Series, Study

__all__ = [
    "NotFound",
    "find_stored",
    "iter_metadata",
    "metadata_version",
    "not_found",
]


class NotFound(LookupError):
    """Nothing stored under the UIDs given; the message names the first one that is unknown."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _scope(
    stmt: Any, study: str, series: str | None, sop: str | None
) -> Any:  # a Select joined to Series and Study
    stmt = stmt.where(Study.study_instance_uid == study)
    if series is not None:
        stmt = stmt.where(Series.series_instance_uid == series)
    if sop is not None:
        stmt = stmt.where(Instance.sop_instance_uid == sop)
    return stmt


def _joined(*columns: Any) -> Any:
    return (
        select(*columns)
        .select_from(Instance)
        .join(Series, Instance.series_fk == Series.id)
        .join(Study, Series.study_fk == Study.id)
    )


#: Series by number then UID, instances by number then UID (numbers missing last, on every
#: database).
_ORDER = (
    Series.series_number.is_(None),
    Series.series_number,
    Series.series_instance_uid,
    Instance.instance_number.is_(None),
    Instance.instance_number,
    Instance.sop_instance_uid,
)


def not_found(db: Database, study: str, series: str | None, sop: str | None) -> NotFound:
    """The most precise "not found" for a scope that matched nothing."""
    with db.engine.connect() as conn:
        if conn.execute(select(Study.id).where(Study.study_instance_uid == study)).first() is None:
            return NotFound(f"no study {study}")
        if series is not None:
            found = conn.execute(_scope(_joined(Series.id), study, series, None).limit(1)).first()
            if found is None:
                return NotFound(f"no series {series} in study {study}")
    if sop is not None:
        return NotFound(f"no instance {sop} in series {series} of study {study}")
    return NotFound(f"nothing stored under study {study}")


def find_stored(
    db: Database, study: str, series: str | None = None, sop: str | None = None
) -> list[StoredInstance]:
    """The instances of a study, a series or one instance, in a stable order.

    Raises :class:`NotFound` when the scope holds no instance.
    """
    stmt = _scope(
        _joined(
            Study.study_instance_uid,
            Series.series_instance_uid,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax_uid,
            Instance.blob_key,
            Instance.size_bytes,
            Instance.number_of_frames,
        ),
        study,
        series,
        sop,
    ).order_by(*_ORDER)
    with db.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    if not rows:
        raise not_found(db, study, series, sop)
    return [StoredInstance(*row) for row in rows]


def metadata_version(
    db: Database, study: str, series: str | None = None, sop: str | None = None
) -> str:
    """A validator that changes whenever the scope's instances change (stored, overwritten,
    deleted): an entity tag for metadata responses. Raises :class:`NotFound`."""
    stmt = _scope(
        _joined(func.count(Instance.id), func.max(Instance.id), func.max(Instance.received_at)),
        study,
        series,
        sop,
    )
    with db.engine.connect() as conn:
        count, max_id, last = conn.execute(stmt).one()
    if not count:
        raise not_found(db, study, series, sop)
    return hashlib.blake2b(f"{count}:{max_id}:{last}".encode(), digest_size=12).hexdigest()


def iter_metadata(
    db: Database,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    *,
    batch: int = 500,
) -> Iterator[tuple[str, str, str, str]]:
    """(series UID, SOP Instance UID, transfer syntax UID, DICOM JSON text) of every instance
    in scope, in the order of :func:`find_stored`, from one SQL query streamed in batches. The
    JSON is the text stored at ingest (BulkDataURIs relative to the instance), never parsed."""
    stmt = _scope(
        _joined(
            Series.series_instance_uid,
            Instance.sop_instance_uid,
            Instance.transfer_syntax_uid,
            cast(Instance.dicom_json, Text),
        ),
        study,
        series,
        sop,
    ).order_by(*_ORDER)
    with db.engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=batch).execute(stmt)
        for row in result:
            yield row[0], row[1], row[2], row[3]
