"""Decoding frames of stored instances, the one place that does it.

The bytes come from :mod:`archive.instance_io` (a located frame, never the whole instance);
this module turns one frame into samples: a NumPy array for rendering, or native
little-endian pixel bytes (PS3.5 8.1.1) for the frames resource. Decoders come from pydicom's
plugins (pylibjpeg with openjpeg / libjpeg, GDCM, pydicom's own RLE and native decoders).
Converting a whole instance between transfer syntaxes is :mod:`archive.transcode`.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import numpy as np
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder, pack_bits
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from archive.instance_io import (
    PixelLayout,
    StoredFileError,
    check_frames,
    check_native_extent,
    native_frame,
)

__all__ = [
    "JPEG_LOSSY_TRANSFER_SYNTAXES",
    "MAX_DECODED_FRAME_BYTES",
    "NATIVE_TRANSFER_SYNTAXES",
    "DecodeError",
    "can_decode",
    "decode_frame",
    "frame_bytes",
]

#: Transfer syntaxes whose pixel data is native (uncompressed, PS3.5 8.1.1).
NATIVE_TRANSFER_SYNTAXES = frozenset(
    {
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    }
)
#: JPEG lossy processes: their YBR_FULL_422 colour is RGB once decompressed (PS3.5 8.2.1). The
#: colour of every other syntax (RLE, JPEG-LS, lossless JPEG with YBR_FULL) is kept as stored.
JPEG_LOSSY_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
#: The largest frame decoded, in bytes of decoded samples (16-bit 16384 x 16384): a header
#: that declares a bigger frame is refused before anything is allocated for it.
MAX_DECODED_FRAME_BYTES = 512 * 2**20


class DecodeError(StoredFileError):
    """A frame cannot be decoded: no decoder is installed for its transfer syntax, or its
    stored bit stream or layout is broken."""


def can_decode(transfer_syntax_uid: str) -> bool:
    """Whether pixel data stored in this transfer syntax can be turned into native samples."""
    if transfer_syntax_uid in NATIVE_TRANSFER_SYNTAXES:
        return True
    try:
        return bool(get_decoder(UID(transfer_syntax_uid)).is_available)
    except (NotImplementedError, ValueError, KeyError):
        return False


def _syntax_name(transfer_syntax_uid: str) -> str:
    name = UID(transfer_syntax_uid).name
    return name if name != transfer_syntax_uid else f"transfer syntax {transfer_syntax_uid}"


def _check_decodable(layout: PixelLayout, number: int) -> None:
    check_frames(layout, [number])
    if not can_decode(layout.transfer_syntax_uid):
        raise DecodeError(
            f"no decoder is installed for {_syntax_name(layout.transfer_syntax_uid)}: the pixel "
            "data is available as stored only"
        )
    if layout.rows < 1 or layout.columns < 1 or layout.samples_per_pixel < 1:
        raise DecodeError(
            f"the pixel data cannot be decoded: Rows {layout.rows}, Columns {layout.columns}, "
            f"Samples per Pixel {layout.samples_per_pixel}"
        )
    if layout.bits_allocated not in (1, 8, 16, 32, 64):
        raise DecodeError(
            f"the pixel data cannot be decoded: Bits Allocated {layout.bits_allocated}"
        )
    if layout.frame_length > MAX_DECODED_FRAME_BYTES:
        raise DecodeError(
            f"a frame of {layout.rows}x{layout.columns}x{layout.samples_per_pixel} samples of "
            f"{layout.bits_allocated} bits is larger than the {MAX_DECODED_FRAME_BYTES // 2**20}"
            " MiB decoded here: the pixel data is available as stored only"
        )
    if not layout.encapsulated:
        check_native_extent(layout, number)


def _options(layout: PixelLayout, number_of_frames: int, as_rgb: bool) -> dict[str, Any]:
    options: dict[str, Any] = {
        "as_rgb": as_rgb,
        "rows": layout.rows,
        "columns": layout.columns,
        "samples_per_pixel": layout.samples_per_pixel,
        "bits_allocated": layout.bits_allocated,
        "bits_stored": layout.bits_stored,
        "pixel_representation": layout.pixel_representation,
        "photometric_interpretation": layout.photometric_interpretation,
        "number_of_frames": number_of_frames,
        "pixel_keyword": layout.pixel_keyword,
        "pixel_vr": layout.vr,
    }
    if layout.samples_per_pixel > 1:
        options["planar_configuration"] = layout.planar_configuration
    return options


def decode_frame(
    fh: BinaryIO, layout: PixelLayout, number: int, *, as_rgb: bool = True
) -> np.ndarray:
    """Frame ``number`` (1-based) as decoded samples: (rows, columns) or (rows, columns,
    samples), in the machine's byte order. With ``as_rgb``, YBR colour is converted to RGB
    (PS3.5 8.2: what a JPEG YBR_FULL_422 frame is once decompressed).

    ``fh`` is a file opened with :func:`archive.instance_io.open_instance`. Raises
    :class:`~archive.instance_io.FrameOutOfRange` and :class:`DecodeError`."""
    _check_decodable(layout, number)
    if not layout.encapsulated and layout.bits_allocated == 1:
        return _bit_packed_frame(fh, layout, number)
    syntax = UID(layout.transfer_syntax_uid)
    try:
        decoder = get_decoder(syntax)
        if layout.encapsulated:
            frame = native_frame(fh, layout, number)
            # The decoder reads encapsulated pixel data: one item, no offset table.
            array, _meta = decoder.as_array(
                encapsulate([frame], has_bot=False), **_options(layout, 1, as_rgb)
            )
        else:
            # A file positioned at the value: pydicom reads only the frame asked for.
            fh.seek(layout.value_offset)
            array, _meta = decoder.as_array(
                fh,
                index=number - 1,
                **_options(layout, layout.number_of_frames, as_rgb),
            )
    except StoredFileError:
        raise
    except Exception as exc:
        raise DecodeError(
            f"frame {number} cannot be decoded ({_syntax_name(layout.transfer_syntax_uid)}): {exc}"
        ) from exc
    return np.asarray(array)


def _bit_packed_frame(fh: BinaryIO, layout: PixelLayout, number: int) -> np.ndarray:
    """Frame ``number`` of native 1-bit pixel data. Frames follow each other bit by bit
    (PS3.5 8.1.1: the first pixel in the least significant bit of the first byte), so a frame
    whose Rows x Columns is not a multiple of 8 starts inside a byte."""
    bits = layout.rows * layout.columns * layout.samples_per_pixel
    start = (number - 1) * bits
    fh.seek(layout.value_offset + start // 8)
    data = fh.read((start % 8 + bits + 7) // 8)
    unpacked = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if len(unpacked) < start % 8 + bits:
        raise DecodeError(f"frame {number} is cut short in the stored pixel data")
    frame = unpacked[start % 8 : start % 8 + bits]
    shape: tuple[int, ...] = (layout.rows, layout.columns)
    if layout.samples_per_pixel > 1:
        shape = (*shape, layout.samples_per_pixel)
    return frame.reshape(shape)


def frame_bytes(fh: BinaryIO, layout: PixelLayout, number: int) -> bytes:
    """Frame ``number`` (1-based) as native little-endian pixel bytes (PS3.5 8.1.1): the
    stored bytes when they are that already, byte-swapped when stored big endian, decoded when
    stored compressed (the YBR colour of lossy JPEG as RGB, PS3.5 8.2.1; other colour as it
    is), bit-packed for 1-bit data."""
    if not layout.encapsulated and layout.bits_allocated % 8 == 0:
        if layout.little_endian or (layout.bits_allocated == 8 and layout.vr == "OB"):
            return native_frame(fh, layout, number)
        if layout.bits_allocated > 8:
            _check_decodable(layout, number)
            data = native_frame(fh, layout, number)
            dtype = np.dtype(f">u{layout.bits_allocated // 8}")
            return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("<")).tobytes()
    # Encapsulated, bit-packed, or 8-bit samples in big endian OW words: decode. Native
    # samples are returned as stored (no colour conversion), in their planar configuration.
    as_rgb = layout.transfer_syntax_uid in JPEG_LOSSY_TRANSFER_SYNTAXES
    array = decode_frame(fh, layout, number, as_rgb=as_rgb)
    if layout.bits_allocated == 1:
        return bytes(pack_bits(array))
    if (
        not layout.encapsulated
        and layout.samples_per_pixel > 1
        and layout.planar_configuration == 1
    ):
        array = array.transpose(2, 0, 1)
    return _little_endian_bytes(array)


def _little_endian_bytes(array: np.ndarray) -> bytes:
    dtype = array.dtype
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and not np.little_endian):
        array = array.astype(dtype.newbyteorder("<"))
    return bytes(np.ascontiguousarray(array).tobytes())
