"""The one converter between transfer syntaxes: a stored instance as a Part-10 stream in an
uncompressed transfer syntax, used wherever an edge cannot send the stored bytes (WADO-RS in
Explicit VR Little Endian, C-GET / C-MOVE and forwarding to a peer that accepted only Explicit or
Implicit VR Little Endian).

Retrievals send the stored bytes unchanged whenever the receiver accepts their transfer syntax;
this is the exception path. What it does to the data set:

- compressed pixel data is decoded (pydicom's plugins: pylibjpeg with openjpeg / libjpeg, GDCM,
  RLE), the SOP Instance UID kept (PS3.5 8.2, 10: the pixels are those the compressed stream
  holds), the YBR colour of lossy JPEG converted to RGB with Photometric Interpretation RGB as
  PS3.5 8.2.1 says of a decompressed YBR_FULL_422 image (the colour of other syntaxes kept as it
  is), Lossy Image Compression kept "01" after a lossy syntax, Planar Configuration and Number of
  Frames set to match the decoded pixels;
- big endian values of OW, OF, OL, OD and OV (pixel data, palette lookup tables (0028,1201-1203),
  LUT data, overlay data, waveform data, …) are word-swapped into little endian (PS3.5 7.3,
  Annex D); OB and UN values are byte strings and stay as they are; every other value is
  re-encoded by pydicom from its decoded value;
- a deflated data set (PS3.5 A.5) is inflated, never beyond the configured limit.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from archive.dicom_json import WORD_SIZES
from archive.frames import JPEG_LOSSY_TRANSFER_SYNTAXES, NATIVE_TRANSFER_SYNTAXES, can_decode
from archive.instance_io import StoredFileError, inflated, is_deflated

__all__ = [
    "UNCOMPRESSED_TARGETS",
    "TranscodeError",
    "as_little_endian",
    "can_convert",
    "swap_words_to_little_endian",
    "to_uncompressed",
]

#: What the converter writes.
UNCOMPRESSED_TARGETS = (UID(ExplicitVRLittleEndian), UID(ImplicitVRLittleEndian))
_IMPLEMENTATION_VERSION = f"PYDICOM {pydicom.__version__}"[:16]


class TranscodeError(StoredFileError):
    """The stored instance cannot be converted (no decoder, a broken data set or stream)."""


def can_convert(transfer_syntax_uid: str) -> bool:
    """Whether instances stored in this transfer syntax can be converted to uncompressed."""
    return can_decode(transfer_syntax_uid)


def to_uncompressed(
    fh: BinaryIO,
    target: str = ExplicitVRLittleEndian,
    *,
    max_inflated: int,
    source_ae_title: str | None = None,
) -> bytes:
    """The stored Part-10 file ``fh`` as a Part-10 stream in ``target`` (Explicit or Implicit
    VR Little Endian) holding the same data set (see the module's rules).

    Its File Meta Information is new: this transfer syntax, pydicom as the implementation
    that wrote it and ``source_ae_title``, when given, as Source Application Entity Title
    (PS3.10 7.1). A deflated file inflates to at most ``max_inflated`` bytes
    (:class:`~archive.instance_io.InflateLimitExceeded`). Raises :class:`TranscodeError`."""
    target_uid = UID(target)
    if target_uid not in UNCOMPRESSED_TARGETS:
        raise ValueError(f"the converter writes {UNCOMPRESSED_TARGETS}, not {target}")
    if is_deflated(fh):
        with inflated(fh, max_inflated) as copy:
            return _convert(copy, target_uid, source_ae_title)
    return _convert(fh, target_uid, source_ae_title)


def _convert(fh: BinaryIO, target: UID, source_ae_title: str | None) -> bytes:
    fh.seek(0)
    try:
        ds = pydicom.dcmread(fh)
    except Exception as exc:
        raise TranscodeError(f"the stored file cannot be read: {exc}") from exc
    stored = UID(str(ds.file_meta.get("TransferSyntaxUID", "")).strip("\x00 "))
    try:
        if stored not in NATIVE_TRANSFER_SYNTAXES:
            if not can_decode(stored):
                raise TranscodeError(
                    f"no decoder is installed for {stored.name}: the instance is available as "
                    "stored only"
                )
            if "PixelData" in ds:
                ds.decompress(
                    generate_instance_uid=False,
                    as_rgb=stored in JPEG_LOSSY_TRANSFER_SYNTAXES,
                )
                _keep_lossy_marks(ds, stored)
        elif not stored.is_little_endian:
            swap_words_to_little_endian(ds)
        meta = DicomBytesIO()
        write_file_meta_info(meta, _file_meta(ds, target, source_ae_title), enforce_standard=True)
        body = DicomBytesIO()
        body.is_little_endian = True
        body.is_implicit_VR = target == ImplicitVRLittleEndian
        write_dataset(body, ds)
    except TranscodeError:
        raise
    except Exception as exc:
        raise TranscodeError(
            f"the instance cannot be converted from {stored.name} to {target.name}: {exc}"
        ) from exc
    return b"\x00" * 128 + b"DICM" + meta.getvalue() + body.getvalue()


#: Transfer syntaxes whose compression always loses information, and the method each names
#: in Lossy Image Compression Method (0028,2114), PS3.3 C.7.6.1.1.5.1.
_LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS Near-Lossless
}


def _keep_lossy_marks(ds: Dataset, stored: UID) -> None:
    """Decompressed pixels of a lossy syntax stay lossy: Lossy Image Compression is "01" once
    lossy compression has been applied, with its method (PS3.3 C.7.6.1.1.5), which a data set
    sent compressed may leave to its transfer syntax."""
    method = _LOSSY_METHODS.get(str(stored))
    if method is None:
        return
    ds.LossyImageCompression = "01"
    if "LossyImageCompressionMethod" not in ds:
        ds.LossyImageCompressionMethod = method


def _file_meta(ds: Dataset, target: UID, source_ae_title: str | None) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = target
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    title = (source_ae_title or "").strip()[:16]
    if title:
        meta.SourceApplicationEntityTitle = title
    return meta


def swap_words_to_little_endian(ds: Dataset) -> None:
    """Turn a data set read from Explicit VR Big Endian into one that writes as little endian.

    pydicom re-encodes every value it decodes (US, SS, UL, FL, AT, …) in the byte order it
    writes, but keeps the bytes of OB, OW, OF, OL, OD and OV values as they were read: the
    words of OW/OF/OL/OD/OV values, in every item of every sequence, are swapped here (PS3.5
    7.3). Native Pixel Data of 32 or 64 bits allocated is swapped in units of its samples, as
    pydicom reads big endian pixel data (and as its pair of test files ``rtdose_1frame`` and
    ``rtdose_expb_1frame`` holds it), where DCMTK swaps each 16-bit word of the OW value: the
    standard's Explicit VR Big Endian is retired and says no more. Every element is decoded
    first, while the data set still knows it was read big endian."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or ():
                swap_words_to_little_endian(item)
            continue
        size = WORD_SIZES.get(str(elem.VR))
        if size == 2 and elem.tag == 0x7FE00010:
            bits = ds.get("BitsAllocated")
            if bits in (32, 64):
                size = int(bits) // 8
        if size and isinstance(elem.value, bytes) and len(elem.value) % size == 0:
            words = np.frombuffer(elem.value, dtype=f">u{size}")
            elem.value = words.astype(f"<u{size}").tobytes()


def as_little_endian(ds: Dataset) -> Dataset:
    """A data set read from Explicit VR Big Endian, changed in place into one that says and is
    Explicit VR Little Endian (:func:`swap_words_to_little_endian`): for code that reads OW
    lookup tables in the machine's byte order, as pydicom's ``apply_color_lut`` does."""
    swap_words_to_little_endian(ds)
    ds.set_original_encoding(False, True, ds.original_character_set)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds
