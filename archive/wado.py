"""Reading stored instances back: which blobs a study / series / instance names, their DICOM JSON,
and the parts of a file a retrieval needs (pixel data, frames, other bulk data).

Protocol-free: WADO-RS (and later rendered / thumbnail) build their responses on these services.
Every lookup is one indexed SQL query; metadata streams the DICOM JSON stored at ingest as text,
never re-parsing a file; file access reads only the header and the bytes asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from sqlalchemy import Text, cast, func, select

from archive.blobstore import BlobNotFound, BlobStore
from archive.db import Database
from archive.dicom import PIXEL_TAGS
from archive.models import Instance, Series, Study

__all__ = [
    "NotFound",
    "PixelLayout",
    "StoredInstance",
    "element_value",
    "find_stored",
    "iter_metadata",
    "metadata_version",
    "native_frame",
    "open_instance",
    "pixel_layout",
    "uncompressed_range",
]

#: How much of an instance fetched from an object store is held in memory before it spills to a
#: temporary file.
SPOOL_IN_MEMORY = 64 * 2**20


class NotFound(LookupError):
    """Nothing stored under the UIDs given; the message names the first one that is unknown."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class StoredInstance:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size: int
    number_of_frames: int | None


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


# --- reading a stored file ---------------------------------------------------------------------


@contextlib.contextmanager
def open_instance(blobs: BlobStore, key: str, *, inflate: bool = False) -> Iterator[BinaryIO]:
    """The stored file, seekable: the file itself on a filesystem store, else a spooled copy
    (in memory up to :data:`SPOOL_IN_MEMORY`, then on disk). Raises :class:`BlobNotFound`.

    With ``inflate``, a file in Deflated Explicit VR Little Endian comes as a spooled copy
    with its data set inflated and its file meta saying Explicit VR Little Endian (PS3.5
    A.5), so that offsets in it are those of the data set's elements."""
    with _open_stored(blobs, key) as fh:
        if inflate and _deflated(fh):
            with _inflated(fh) as copy:
                yield copy
        else:
            yield fh


@contextlib.contextmanager
def _open_stored(blobs: BlobStore, key: str) -> Iterator[BinaryIO]:
    path = blobs.local_path(key)
    if path is not None:
        try:
            fh = path.open("rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc
        with fh:
            yield fh
        return
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        for chunk in blobs.open(key):
            spool.write(chunk)
        spool.seek(0)
        yield spool  # type: ignore[misc]


#: Preamble, "DICM" and the File Meta Information Group Length element (PS3.10 7.1).
_META_START = 128 + 4 + 12
_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN"})
_LONG_VRS |= {b"UR", b"UT", b"UV"}


def _meta_end(fh: BinaryIO) -> int | None:
    """Where the file meta information of a Part-10 file ends; None when it does not start
    with its group length."""
    fh.seek(0)
    head = fh.read(_META_START)
    if len(head) < _META_START or head[128:140] != b"DICM" + _GROUP_LENGTH:
        return None
    (length,) = struct.unpack("<L", head[140:144])
    return _META_START + length


def _deflated(fh: BinaryIO) -> bool:
    """Whether the file meta information names Deflated Explicit VR Little Endian: its
    elements are read one by one (Explicit VR Little Endian, PS3.10 7.1)."""
    end = _meta_end(fh)
    if end is None:
        return False
    fh.seek(0)
    meta = fh.read(end)
    offset = _META_START
    while offset + 12 <= len(meta):  # a header, and the 4 bytes a long one takes
        group, element = struct.unpack("<HH", meta[offset : offset + 4])
        vr = meta[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack("<L", meta[offset + 8 : offset + 12])
            value = offset + 12
        else:
            (length,) = struct.unpack("<H", meta[offset + 6 : offset + 8])
            value = offset + 8
        if (group, element) == (0x0002, 0x0010):
            uid = meta[value : value + length].rstrip(b"\x00 ").decode("ascii", "replace")
            return uid == pydicom.uid.DeflatedExplicitVRLittleEndian
        offset = value + length
    return False


@contextlib.contextmanager
def _inflated(fh: BinaryIO) -> Iterator[BinaryIO]:
    end = _meta_end(fh)
    assert end is not None
    fh.seek(0)
    head = fh.read(end)
    try:
        meta = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True).file_meta
    except Exception as exc:
        raise NoPixelData(f"the file meta information cannot be read: {exc}") from exc
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        spool.write(head[:132])
        write_file_meta_info(DicomFileLike(spool), meta, enforce_standard=True)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate (PS3.5 A.5)
        try:
            while chunk := fh.read(1 << 20):
                spool.write(inflater.decompress(chunk))
            spool.write(inflater.flush())
        except zlib.error as exc:
            raise NoPixelData(f"the deflated data set cannot be inflated: {exc}") from exc
        spool.seek(0)
        yield spool  # type: ignore[misc]


@dataclass(frozen=True, slots=True)
class PixelLayout:
    """Where the pixel data of a stored file is and how it is encoded."""

    transfer_syntax_uid: str
    tag: int
    vr: str
    value_offset: int
    """File offset of the element's value (the Basic Offset Table item when encapsulated)."""
    length: int | None
    """Value length; ``None`` for encapsulated (undefined length) pixel data."""
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    planar_configuration: int
    number_of_frames: int
    extended_offsets: tuple[bytes, bytes] | None = None
    little_endian: bool = True

    @property
    def encapsulated(self) -> bool:
        return self.length is None

    @property
    def frame_length(self) -> int:
        """Bytes of one uncompressed frame (bit-packed for 1-bit data, as stored)."""
        bits = self.rows * self.columns * self.samples_per_pixel * self.bits_allocated
        return (bits + 7) // 8

    def decode_options(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "columns": self.columns,
            "samples_per_pixel": self.samples_per_pixel,
            "bits_allocated": self.bits_allocated,
            "bits_stored": self.bits_stored,
            "pixel_representation": self.pixel_representation,
            "photometric_interpretation": self.photometric_interpretation,
            "planar_configuration": self.planar_configuration,
            "number_of_frames": 1,
        }


class NoPixelData(LookupError):
    """The instance has no pixel data (or none this service can locate)."""


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def pixel_layout(fh: BinaryIO) -> tuple[Dataset, PixelLayout]:
    """Read the header of a stored file (never its pixels) and locate its pixel data.

    Raises :class:`NoPixelData` when there is none, or when the file is deflated (its offsets
    are not those of the stored bytes: open it with ``open_instance(..., inflate=True)``).
    """
    fh.seek(0)
    ds = pydicom.dcmread(fh, stop_before_pixels=True)
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "")).strip("\x00 ")
    if transfer_syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        raise NoPixelData("the file is deflated")
    offset = fh.tell()
    header = fh.read(12)
    if len(header) < 8:
        raise NoPixelData("no pixel data element")
    implicit, little = ds.original_encoding
    little = little is not False
    endian = "<" if little else ">"
    group, elem = struct.unpack(endian + "HH", header[:4])
    tag = (group << 16) | elem
    if tag not in PIXEL_TAGS:
        raise NoPixelData("no pixel data element")
    vr = PIXEL_TAGS[tag]
    if not implicit and header[4:6].isalpha():
        vr = header[4:6].decode("ascii")
        (length,) = struct.unpack(endian + "L", header[8:12])
        value_offset = offset + 12
    else:
        (length,) = struct.unpack(endian + "L", header[4:8])
        value_offset = offset + 8
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    layout = PixelLayout(
        transfer_syntax_uid=transfer_syntax,
        tag=tag,
        vr=vr,
        value_offset=value_offset,
        length=None if length == 0xFFFFFFFF else length,
        rows=_int(ds, "Rows", 0),
        columns=_int(ds, "Columns", 0),
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1),
        bits_allocated=_int(ds, "BitsAllocated", 8),
        bits_stored=_int(ds, "BitsStored", _int(ds, "BitsAllocated", 8)),
        pixel_representation=_int(ds, "PixelRepresentation", 0),
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        planar_configuration=_int(ds, "PlanarConfiguration", 0),
        number_of_frames=max(1, _int(ds, "NumberOfFrames", 1)),
        extended_offsets=extended,
        little_endian=little,
    )
    return ds, layout


class FrameOutOfRange(IndexError):
    def __init__(self, number: int, count: int) -> None:
        super().__init__(f"frame {number} does not exist: the instance has {count} frame(s)")
        self.message = str(self)


def check_frames(layout: PixelLayout, numbers: Sequence[int]) -> None:
    for number in numbers:
        if number < 1 or number > layout.number_of_frames:
            raise FrameOutOfRange(number, layout.number_of_frames)


def native_frame(fh: BinaryIO, layout: PixelLayout, number: int) -> bytes:
    """Frame ``number`` (1-based) as stored: the compressed bit stream of an encapsulated
    transfer syntax, or the frame's bytes of native pixel data."""
    check_frames(layout, [number])
    index = number - 1
    if layout.encapsulated:
        fh.seek(layout.value_offset)
        return bytes(
            get_frame(
                fh,
                index,
                number_of_frames=layout.number_of_frames,
                extended_offsets=layout.extended_offsets,
                endianness="<" if layout.little_endian else ">",
            )
        )
    if layout.bits_allocated % 8:
        raise NoPixelData("frames of bit-packed pixel data are decoded, not cut")
    size = layout.frame_length
    fh.seek(layout.value_offset + index * size)
    data = fh.read(size)
    if len(data) != size:
        raise NoPixelData("the stored pixel data is shorter than its frames")
    return data


def uncompressed_range(
    fh: BinaryIO, layout: PixelLayout, start: int, end: int, chunk: int = 1 << 20
) -> Iterator[bytes]:
    """Bytes ``start`` to ``end`` (exclusive) of native pixel data's value, in chunks."""
    assert layout.length is not None
    end = min(end, layout.length)
    fh.seek(layout.value_offset + start)
    remaining = end - start
    while remaining > 0:
        data = fh.read(min(chunk, remaining))
        if not data:
            return
        remaining -= len(data)
        yield data


class NoSuchElement(LookupError):
    def __init__(self, path: str) -> None:
        super().__init__(f"no bulk data element at {path}")
        self.message = str(self)


def element_value(fh: BinaryIO, path: Sequence[str]) -> tuple[bytes, str]:
    """The raw value and VR of the element a BulkDataURI path names: ``[tag]`` at the top level
    or ``[seq tag, item index, …, tag]`` inside sequences (the paths ingest writes)."""
    text = "/".join(path)
    if not path or len(path) % 2 == 0:
        raise NoSuchElement(text)
    try:
        tags = [int(p, 16) for p in path[0::2]]
        items = [int(p) for p in path[1::2]]
    except ValueError as exc:
        raise NoSuchElement(text) from exc
    fh.seek(0)
    beyond_pixels = tags[0] >= 0x7FE00008
    ds: Dataset = pydicom.dcmread(fh, stop_before_pixels=not beyond_pixels)
    current = ds
    for depth, tag in enumerate(tags):
        if tag not in current:
            raise NoSuchElement(text)
        elem = current[tag]
        if depth == len(tags) - 1:
            value = elem.value
            if isinstance(value, bytes):
                return value, str(elem.VR)
            raise NoSuchElement(text)
        if elem.VR != "SQ" or items[depth] >= len(elem.value or []):
            raise NoSuchElement(text)
        current = elem.value[items[depth]]
    raise NoSuchElement(text)


def is_encapsulated(transfer_syntax_uid: str) -> bool:
    try:
        return bool(UID(transfer_syntax_uid).is_encapsulated)
    except (ValueError, AttributeError):
        return False
