"""The archive core: index, blob store, ingest, delete. Knows no network protocol."""

from archive.blobstore import BlobNotFound, BlobStore, BlobStoreError, OutOfSpace
from archive.core import Archive, ArchiveStats, ReconcileReport
from archive.dicom import InvalidInstance, ParsedInstance, parse_header
from archive.ingest import IngestError, IngestErrorKind, IngestOutcome, IngestResult

__all__ = [
    "Archive",
    "ArchiveStats",
    "BlobNotFound",
    "BlobStore",
    "BlobStoreError",
    "IngestError",
    "IngestErrorKind",
    "IngestOutcome",
    "IngestResult",
    "InvalidInstance",
    "OutOfSpace",
    "ParsedInstance",
    "ReconcileReport",
    "parse_header",
]
