"""File access to stored instances, kept apart from decoding (:mod:`archive.frames`).

Open a stored file seekably, inflate a deflated one (spooled, never beyond a limit), read its
header, and locate its pixel data, its frames and its other elements: the bytes as stored, never
decoded. Every retrieval that needs more than the stored bytes (frames, rendered images,
conversion to another transfer syntax, bulk data) starts here.
"""

from __future__ import annotations

import contextlib
import io
import re
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
from pydicom.uid import ExplicitVRLittleEndian

from archive.blobstore import BlobNotFound, BlobStore
from archive.dicom import HALF_CHROMA, PIXEL_TAGS, FileMeta, read_file_meta
from archive.dicom_json import little_endian_words
from config import Settings

__all__ = [
    "MAX_FRAME_NUMBER",
    "SPOOL_IN_MEMORY",
    "FrameOutOfRange",
    "InflateLimitExceeded",
    "NoPixelData",
    "NoSuchElement",
    "PixelLayout",
    "StoredFileError",
    "StoredInstance",
    "UnreadableInstance",
    "check_frames",
    "check_native_extent",
    "element_value",
    "inflate_limit",
    "inflated",
    "is_deflated",
    "native_frame",
    "open_instance",
    "open_stored",
    "pixel_layout",
    "read_header",
    "uncompressed_range",
]

#: How much of a spooled copy (an instance fetched from an object store, an inflated data set)
#: is held in memory before it spills to a temporary file.
SPOOL_IN_MEMORY = 64 * 2**20
#: Bytes read from a deflated file, and the most bytes inflated from them, at a time.
_INFLATE_CHUNK = 1 << 20
#: The largest value of Number of Frames (IS, PS3.5 6.2: at most 2^31 - 1).
MAX_FRAME_NUMBER = 2**31 - 1


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """One stored instance as the index knows it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size: int
    number_of_frames: int | None


# --- errors ------------------------------------------------------------------------------------


class StoredFileError(Exception):
    """A stored file cannot give what is asked of it; ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnreadableInstance(StoredFileError):
    """The stored file cannot be read as a DICOM data set (a broken header or deflate stream,
    pixel data shorter than its frames)."""


class InflateLimitExceeded(StoredFileError):
    """A deflated data set (PS3.5 A.5) inflates to more than the configured limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the instance is stored deflated and inflates to more than {limit // 2**20} MiB, "
            "the limit (max_inflated_size_mb): it is available as stored only"
        )
        self.limit = limit


class NoPixelData(StoredFileError):
    """The instance has no pixel data (or none this service can locate)."""


class FrameOutOfRange(StoredFileError):
    """A frame number beyond the instance's frames."""

    def __init__(self, number: int, count: int) -> None:
        super().__init__(f"frame {number} does not exist: the instance has {count} frame(s)")
        self.number = number
        self.count = count


class NoSuchElement(StoredFileError):
    """No element with a byte value at a BulkDataURI path."""

    def __init__(self, path: str) -> None:
        super().__init__(f"no bulk data element at {path}")


# --- opening -----------------------------------------------------------------------------------


def inflate_limit(settings: Settings) -> int:
    """The most bytes a deflated data set may inflate to (``max_inflated_size_mb``)."""
    return int(settings.max_inflated_size_mb) * 2**20


@contextlib.contextmanager
def open_instance(blobs: BlobStore, key: str, *, max_inflated: int) -> Iterator[BinaryIO]:
    """The stored file, seekable, with its data set readable in place: the file itself on a
    filesystem store, else a spooled copy (in memory up to :data:`SPOOL_IN_MEMORY`, then on
    disk). A file in Deflated Explicit VR Little Endian comes as a spooled copy inflated
    (:func:`inflated`), so that offsets in it are those of the data set's elements.

    Raises :class:`BlobNotFound`, :class:`InflateLimitExceeded` (beyond ``max_inflated``
    bytes), :class:`UnreadableInstance` (a deflate stream that cannot be inflated).
    """
    with open_stored(blobs, key) as fh:
        if is_deflated(fh):
            with inflated(fh, max_inflated) as copy:
                yield copy
        else:
            fh.seek(0)
            yield fh


@contextlib.contextmanager
def open_stored(blobs: BlobStore, key: str) -> Iterator[BinaryIO]:
    """The stored bytes as they are, seekable (see :func:`open_instance`)."""
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


#: Bytes read first to find the File Meta Information (it is rarely over 1 KiB), and the most
#: read for it in all.
_META_HEAD = 4096
_META_MAX = 16 * 2**20


def _file_meta(fh: BinaryIO) -> FileMeta | None:
    """The stored file's File Meta Information, read as ingest read it
    (:func:`archive.dicom.read_file_meta`: with or without its Group Length); None when the
    file holds no whole one."""
    size = _META_HEAD
    while True:
        fh.seek(0)
        head = fh.read(size)
        meta = read_file_meta(head)
        if len(head) < size or size >= _META_MAX:
            return meta  # the whole file was read, or the group is absurdly long
        if meta is not None and meta.data_set_offset + 8 <= len(head):
            return meta  # the group ended inside what was read
        size *= 8


def is_deflated(fh: BinaryIO) -> bool:
    """Whether the file's data set is deflated (PS3.5 A.5): its File Meta Information names
    a deflated transfer syntax."""
    meta = _file_meta(fh)
    return meta is not None and meta.deflated


@contextlib.contextmanager
def inflated(fh: BinaryIO, max_inflated: int) -> Iterator[BinaryIO]:
    """A deflated Part-10 file as a spooled copy in Explicit VR Little Endian: its file meta
    information saying so, then the data set inflated (raw deflate, PS3.5 A.5).

    At most :data:`_INFLATE_CHUNK` bytes are inflated at a time and no more than
    ``max_inflated`` in all (:class:`InflateLimitExceeded`), so that a small file that would
    inflate to gigabytes costs neither the memory nor the time."""
    found = _file_meta(fh)
    if found is None:
        raise UnreadableInstance("the file meta information cannot be read")
    fh.seek(0)
    head = fh.read(found.data_set_offset)
    try:
        meta = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True).file_meta
    except Exception as exc:
        raise UnreadableInstance(f"the file meta information cannot be read: {exc}") from exc
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        spool.write(head[:132])
        write_file_meta_info(DicomFileLike(spool), meta, enforce_standard=True)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        try:
            while not inflater.eof:
                data = inflater.unconsumed_tail or fh.read(_INFLATE_CHUNK)
                if not data:
                    break
                piece = inflater.decompress(data, _INFLATE_CHUNK)
                total += len(piece)
                if total > max_inflated:
                    raise InflateLimitExceeded(max_inflated)
                spool.write(piece)
            rest = inflater.flush(_INFLATE_CHUNK) if not inflater.eof else b""
        except zlib.error as exc:
            raise UnreadableInstance(f"the deflated data set cannot be inflated: {exc}") from exc
        if total + len(rest) > max_inflated:
            raise InflateLimitExceeded(max_inflated)
        spool.write(rest)
        spool.seek(0)
        yield spool  # type: ignore[misc]


# --- the header --------------------------------------------------------------------------------


def _dataset(fh: BinaryIO, **kwargs: Any) -> Dataset:
    """pydicom's reading of a file opened with :func:`open_instance` (never a deflated one:
    pydicom would inflate it whole, without a limit)."""
    if is_deflated(fh):
        raise UnreadableInstance("a deflated file is read through open_instance, inflated")
    fh.seek(0)
    try:
        return pydicom.dcmread(fh, **kwargs)
    except Exception as exc:
        raise UnreadableInstance(f"the stored file cannot be read: {exc}") from exc


def read_header(fh: BinaryIO) -> Dataset:
    """Every attribute but the pixel data (and what follows it)."""
    return _dataset(fh, stop_before_pixels=True)


# --- pixel data and frames ---------------------------------------------------------------------


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
    def stored_samples(self) -> int:
        """Samples per pixel as native pixel data holds them: two for YBR_FULL_422 and
        YBR_PARTIAL_422, whose two pixels share one Cb and one Cr (PS3.3 C.7.6.3.1.2), else
        Samples per Pixel."""
        if (
            not self.encapsulated
            and self.samples_per_pixel == 3
            and self.photometric_interpretation in HALF_CHROMA
        ):
            return 2
        return self.samples_per_pixel

    @property
    def frame_bits(self) -> int:
        """Bits of one uncompressed frame (as native pixel data holds it)."""
        return self.rows * self.columns * self.stored_samples * self.bits_allocated

    @property
    def frame_length(self) -> int:
        """Bytes of one uncompressed frame (bit-packed for 1-bit data, as stored)."""
        return (self.frame_bits + 7) // 8

    @property
    def pixel_keyword(self) -> str:
        return {0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}.get(
            self.tag, "PixelData"
        )


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def pixel_layout(fh: BinaryIO) -> tuple[Dataset, PixelLayout]:
    """Read the header of a stored file (never its pixels) and locate its pixel data.

    Raises :class:`NoPixelData` when there is none, :class:`UnreadableInstance` when the
    header cannot be read."""
    ds = read_header(fh)
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "")).strip("\x00 ")
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
        number_of_frames=min(MAX_FRAME_NUMBER, max(1, _int(ds, "NumberOfFrames", 1))),
        extended_offsets=extended,
        little_endian=little,
    )
    return ds, layout


def check_frames(layout: PixelLayout, numbers: Sequence[int]) -> None:
    """Raise :class:`FrameOutOfRange` for the first number outside 1..Number of Frames."""
    for number in numbers:
        if number < 1 or number > layout.number_of_frames:
            raise FrameOutOfRange(number, layout.number_of_frames)


def native_frame(fh: BinaryIO, layout: PixelLayout, number: int) -> bytes:
    """Frame ``number`` (1-based) as stored: the compressed bit stream of an encapsulated
    transfer syntax, or the frame's bytes of native pixel data (whole bytes per sample)."""
    check_frames(layout, [number])
    index = number - 1
    if layout.encapsulated:
        fh.seek(layout.value_offset)
        try:
            return bytes(
                get_frame(
                    fh,
                    index,
                    number_of_frames=layout.number_of_frames,
                    extended_offsets=layout.extended_offsets,
                    endianness="<" if layout.little_endian else ">",
                )
            )
        except Exception as exc:
            raise UnreadableInstance(f"frame {number} cannot be found: {exc}") from exc
    if layout.bits_allocated % 8:
        raise NoPixelData("frames of bit-packed pixel data are decoded, not cut")
    size = layout.frame_length
    check_native_extent(layout, number)
    fh.seek(layout.value_offset + index * size)
    data = fh.read(size)
    if len(data) != size:
        raise UnreadableInstance("the stored pixel data is shorter than its frames")
    return data


def check_native_extent(layout: PixelLayout, number: int) -> None:
    """Raise :class:`UnreadableInstance` when native pixel data is too short to hold frame
    ``number`` (before anything is read or allocated for it)."""
    assert layout.length is not None
    if (number * layout.frame_bits + 7) // 8 > layout.length:
        raise UnreadableInstance(
            f"the stored pixel data ({layout.length} bytes) is shorter than frame {number} "
            f"of {layout.rows}x{layout.columns}x{layout.stored_samples} samples of "
            f"{layout.bits_allocated} bits needs"
        )


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


# --- other elements ----------------------------------------------------------------------------

#: A tag in a BulkDataURI path: 8 hexadecimal digits; an item index: ASCII digits.
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_ITEM = re.compile(r"[0-9]{1,9}")


def element_value(fh: BinaryIO, path: Sequence[str]) -> tuple[bytes, str]:
    """The raw value and VR of the element a BulkDataURI path names: ``[tag]`` at the top level
    or ``[seq tag, item index, …, tag]`` inside sequences (the paths ingest writes)."""
    text = "/".join(path)
    if not path or len(path) % 2 == 0:
        raise NoSuchElement(text)
    if not all(_TAG.fullmatch(p) for p in path[0::2]) or not all(
        _ITEM.fullmatch(p) for p in path[1::2]
    ):
        raise NoSuchElement(text)
    tags = [int(p, 16) for p in path[0::2]]
    items = [int(p) for p in path[1::2]]
    beyond_pixels = tags[0] >= 0x7FE00008
    ds = _dataset(fh, stop_before_pixels=not beyond_pixels)
    current = ds
    for depth, tag in enumerate(tags):
        if tag not in current:
            raise NoSuchElement(text)
        elem = current[tag]
        if depth == len(tags) - 1:
            value = elem.value
            if isinstance(value, bytes):
                vr = str(elem.VR)
                if ds.original_encoding[1] is False:
                    # Bulk data is sent in little endian byte order (PS3.18 8.7.3).
                    value = little_endian_words(value, vr)
                return value, vr
            raise NoSuchElement(text)
        if elem.VR != "SQ" or items[depth] >= len(elem.value or []):
            raise NoSuchElement(text)
        current = elem.value[items[depth]]
    raise NoSuchElement(text)
