"""Decoding what is stored compressed, only when a client asks for it.

Retrievals stream blobs unchanged whenever the client accepts the stored transfer syntax; this
module is the exception path: a whole instance re-encoded as Explicit VR Little Endian
(decompressed if needed), or one frame decoded to native pixel bytes. Decoders come from
pydicom's plugins (pylibjpeg with openjpeg / libjpeg, GDCM, pydicom's own RLE).
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder, pack_bits, pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from archive.wado import PixelLayout, native_frame

__all__ = [
    "TranscodeError",
    "can_decode",
    "decoded_frame",
    "to_explicit_vr_little_endian",
]

_NATIVE = frozenset(
    {
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    }
)


class TranscodeError(Exception):
    """The stored data cannot be converted as asked (no decoder, corrupt stream)."""


def can_decode(transfer_syntax_uid: str) -> bool:
    """Whether instances stored in this transfer syntax can be turned into native pixel data."""
    if transfer_syntax_uid in _NATIVE:
        return True
    try:
        return bool(get_decoder(UID(transfer_syntax_uid)).is_available)
    except (NotImplementedError, ValueError, KeyError):
        return False


def to_explicit_vr_little_endian(fh: BinaryIO) -> bytes:
    """The whole stored instance as a Part-10 stream in Explicit VR Little Endian, pixel data
    decompressed when it was stored compressed (colour data decoded to RGB as PS3.5 8.2 asks
    for native YBR_FULL_422 and JPEG YBR)."""
    fh.seek(0)
    try:
        ds = pydicom.dcmread(fh)
        transfer_syntax = UID(str(ds.file_meta.TransferSyntaxUID))
        if transfer_syntax.is_compressed and transfer_syntax != DeflatedExplicitVRLittleEndian:
            ds.decompress(generate_instance_uid=False)
        elif transfer_syntax == ExplicitVRBigEndian and "PixelData" in ds:
            # Words of native pixel data are swapped; other OW values are rare and kept.
            array = ds.pixel_array
            ds.PixelData = array.astype(array.dtype.newbyteorder("<")).tobytes()
            ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
            for _elem in ds.iterall():
                pass  # decode every raw element while the big endian encoding is known
            ds.set_original_encoding(False, True, ds.original_character_set)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out = io.BytesIO()
        ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
    except Exception as exc:
        raise TranscodeError(
            f"cannot convert the instance to Explicit VR Little Endian: {exc}"
        ) from exc
    return out.getvalue()


def decoded_frame(fh: BinaryIO, layout: PixelLayout, number: int) -> bytes:
    """Frame ``number`` (1-based) as native little-endian pixel bytes (PS3.5 8.1.1): decoded
    when stored compressed, byte-swapped when stored big endian, bit-packed for 1-bit data."""
    if not layout.encapsulated:
        whole_words = layout.bits_allocated % 8 == 0 and (
            layout.little_endian or layout.bits_allocated > 8 or layout.vr == "OB"
        )
        if whole_words:
            data = native_frame(fh, layout, number)
            if layout.little_endian or layout.bits_allocated == 8:
                return data
            dtype = np.dtype(f">u{layout.bits_allocated // 8}")
            return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("<")).tobytes()
        # Bit-packed data, or 8-bit samples in big endian OW words: let pydicom unpack them.
        fh.seek(0)
        try:
            array = pixel_array(fh, index=number - 1)
        except Exception as exc:
            raise TranscodeError(f"cannot decode frame {number}: {exc}") from exc
        if layout.bits_allocated == 1:
            return bytes(pack_bits(array))
        if layout.samples_per_pixel > 1 and layout.planar_configuration == 1:
            array = array.transpose(2, 0, 1)
        return _little_endian_bytes(array)
    frame = native_frame(fh, layout, number)
    try:
        decoder = get_decoder(UID(layout.transfer_syntax_uid))
        # The decoder reads encapsulated pixel data: one item, no offset table.
        array, _meta = decoder.as_array(
            encapsulate([frame], has_bot=False), **layout.decode_options()
        )
    except Exception as exc:
        raise TranscodeError(
            f"cannot decode frame {number} ({UID(layout.transfer_syntax_uid).name}): {exc}"
        ) from exc
    return _little_endian_bytes(array)


def _little_endian_bytes(array: np.ndarray) -> bytes:
    dtype = array.dtype
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and not np.little_endian):
        array = array.astype(dtype.newbyteorder("<"))
    return bytes(np.ascontiguousarray(array).tobytes())
