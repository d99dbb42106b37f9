"""Bulk import of Part-10 files and DICOMDIR trees (PS3.10 Media Storage)."""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from archive.audit import StudyEvents
from archive.ingest import IngestError, IngestOutcome, IngestService

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # PS3.10 DICOMDIR SOP Class

#: (file, outcome, reason it was rejected or warning it was stored with, size).
_Outcome = tuple[Path, str, str, int, str]
"""(path, outcome, reason, size, Study Instance UID of a stored file)."""


@dataclass
class ImportReport:
    stored: int = 0
    duplicate: int = 0
    overwritten: int = 0
    skipped: int = 0
    """Files that are not DICOM (found while walking a directory) or DICOMDIR indexes."""
    rejected: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    """Files stored (counted in ``stored`` or ``overwritten``) with a warning: (path, why)."""
    bytes: int = 0
    studies: set[str] = field(default_factory=set)
    """The studies of the files stored (or held already)."""

    @property
    def reasons(self) -> Counter[str]:
        return Counter(reason for _, reason in self.rejected)


def _is_part10(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dicomdir_files(path: Path) -> Iterator[Path]:
    """Files a DICOMDIR references (its ReferencedFileID records, PS3.3 F.3)."""
    try:
        ds = pydicom.dcmread(path, force=False)
    except (InvalidDicomError, OSError, ValueError) as exc:
        log.warning("unreadable DICOMDIR", extra={"path": str(path), "err": str(exc)})
        return
    root = path.parent
    for record in ds.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        parts = [file_id] if isinstance(file_id, str) else list(file_id)
        candidate = root.joinpath(*parts)
        if not candidate.exists():
            # Media written on case-insensitive filesystems: match case-insensitively.
            candidate = _case_insensitive(root, parts) or candidate
        yield candidate


def _case_insensitive(root: Path, parts: list[str]) -> Path | None:
    current = root
    for part in parts:
        try:
            match = next((p for p in current.iterdir() if p.name.lower() == part.lower()), None)
        except OSError:
            return None
        if match is None:
            return None
        current = match
    return current


def _is_dicomdir(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return True
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY


def iter_files(paths: Iterable[Path], report: ImportReport) -> Iterator[tuple[Path, bool]]:
    """Every file to import once, with whether it was named explicitly (not found by a walk)."""
    seen: set[Path] = set()

    def once(p: Path) -> bool:
        key = p.resolve()
        if key in seen:
            return False
        seen.add(key)
        return True

    for path in paths:
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    file = Path(dirpath, name)
                    if not once(file):
                        continue
                    if _is_part10(file) and _is_dicomdir(file):
                        report.skipped += 1
                        for ref in _dicomdir_files(file):
                            if once(ref):
                                yield ref, True
                        continue
                    yield file, False
        elif path.exists() and _is_part10(path) and _is_dicomdir(path):
            once(path)
            report.skipped += 1
            for ref in _dicomdir_files(path):
                if once(ref):
                    yield ref, True
        elif once(path):
            yield path, True


def import_paths(
    ingest: IngestService,
    paths: Iterable[Path],
    *,
    jobs: int = 4,
    progress: Callable[[Path, int], None] | None = None,
    audit: StudyEvents | None = None,
) -> ImportReport:
    """Import files and trees; ``progress(path, size)`` is called after each file.

    ``audit``: the import's events, one per study (PS3.15 A.5.3.7 Import), each committed in
    the index transaction of the study's first file (``IngestService.ingest``'s ``audit``);
    a study none of whose transactions recorded it is named by ``audit.unrecorded``."""
    report = ImportReport()

    def one(item: tuple[Path, bool]) -> _Outcome:
        path, explicit = item
        try:
            data = path.read_bytes()
        except OSError as exc:
            return path, "rejected", f"unreadable: {exc.strerror or exc}", 0, ""
        if len(data) < 132 or data[128:132] != b"DICM":
            if explicit:
                return path, "rejected", "not a DICOM Part-10 file (no DICM prefix)", len(data), ""
            return path, "skipped", "", len(data), ""
        event, done = audit.for_ingest() if audit is not None else (None, None)
        audited = False
        try:
            result = ingest.ingest(data, audit=event)
            audited = result.audited
        except IngestError as exc:
            return path, "rejected", exc.reason, len(data), ""
        finally:
            if done is not None:
                done(audited)
        # A stored file's "reason" is its warning, if any.
        return path, str(result.outcome), result.warning or "", len(data), result.study_instance_uid

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        walk = _bounded_map(pool, one, iter_files(paths, report), jobs)
        for path, outcome, reason, size, study in walk:
            if study:
                report.studies.add(study)
            if reason and outcome in (IngestOutcome.STORED, IngestOutcome.OVERWRITTEN):
                report.warnings.append((str(path), reason))
            if outcome == IngestOutcome.STORED:
                report.stored += 1
                report.bytes += size
            elif outcome == IngestOutcome.DUPLICATE:
                report.duplicate += 1
            elif outcome == IngestOutcome.OVERWRITTEN:
                report.overwritten += 1
                report.bytes += size
            elif outcome == "skipped":
                report.skipped += 1
            else:
                report.rejected.append((str(path), reason))
            if progress:
                progress(path, size)
    return report


def _bounded_map(
    pool: ThreadPoolExecutor,
    fn: Callable[[tuple[Path, bool]], _Outcome],
    items: Iterable[tuple[Path, bool]],
    jobs: int,
) -> Iterator[_Outcome]:
    """``pool.map`` that keeps at most a few items per worker in flight (huge trees)."""
    window: deque[Future[_Outcome]] = deque()
    limit = max(1, jobs) * 4
    for item in items:
        window.append(pool.submit(fn, item))
        if len(window) >= limit:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()
