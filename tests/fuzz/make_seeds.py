"""Write the seed corpora of the fuzz harnesses (``tests/fuzz/corpus/``) from synthetic data.

    .venv/bin/python -m tests.fuzz.make_seeds

Each seed is a small instance or body that reaches one branch of the readers: every transfer
syntax family, sequences of undefined length, encapsulated, float and 1-bit pixel data, and
the malformed bodies STOW-RS has to refuse. No third-party image data.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from tests.dicom_factory import ct_slice
from tests.fuzz.multipart_input import encode

CORPUS = Path(__file__).resolve().parent / "corpus"
STUDY, SERIES = "1.2.826.0.1.3680043.10.1506.99", "1.2.826.0.1.3680043.10.1506.99.1"


def _bytes(ds: Dataset, syntax: str | None = None) -> bytes:
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _ct(**changes: object) -> Dataset:
    ds = ct_slice(study_uid=STUDY, series_uid=SERIES, index=0, size=4, sop_uid=STUDY + ".1.1")
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def _un_sequence(data: bytes, *, explicit_item: bool = False) -> bytes:
    """``data`` with a private element of VR UN and undefined length (a sequence in Implicit VR
    Little Endian, PS3.5 6.2.2; its item in Explicit VR, as an SQ relabelled UN leaves it, with
    ``explicit_item``) before its pixel data."""
    at = data.index(b"\xe0\x7f\x10\x00")
    creator = b"\x09\x00\x10\x00LO\x04\x00PRIV"
    item = (
        b"\x08\x00\x00\x01SH\x04\x00T123"
        if explicit_item
        else b"\x08\x00\x00\x01\x04\x00\x00\x00T123"
    )
    un = (
        b"\x09\x00\x01\x10UN\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
        + item
        + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )
    return data[:at] + creator + un + data[at:]


def header_seeds() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    seeds["ct_explicit_le"] = _bytes(_ct())
    seeds["ct_implicit_le"] = _bytes(_ct(), ImplicitVRLittleEndian)
    seeds["ct_explicit_be"] = _bytes(_ct(), ExplicitVRBigEndian)
    seeds["ct_deflated"] = _bytes(_ct(), DeflatedExplicitVRLittleEndian)

    with_sequence = _ct()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D1100", "SRT", "Head"
    with_sequence.AnatomicRegionSequence = [code, code]
    seeds["ct_sequence"] = _bytes(with_sequence)
    seeds["ct_sequence_implicit"] = _bytes(with_sequence, ImplicitVRLittleEndian)
    seeds["ct_un_sequence"] = _un_sequence(seeds["ct_explicit_le"])
    seeds["ct_un_sequence_explicit_item"] = _un_sequence(
        seeds["ct_explicit_le"], explicit_item=True
    )
    deflated = seeds["ct_deflated"]
    seeds["ct_deflated_no_group_length"] = deflated[:132] + deflated[144:]

    jpeg = _ct(SamplesPerPixel=1, BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0)
    jpeg.PixelData = encapsulate([b"\xff\xd8\xff\xdb" + bytes(16) + b"\xff\xd9"] * 2)
    jpeg["PixelData"].VR = "OB"
    jpeg.NumberOfFrames = 2
    seeds["encapsulated_jpeg"] = _bytes(jpeg, JPEGBaseline8Bit)

    float_image = _ct(SOPClassUID="1.2.840.10008.5.1.4.1.1.30", BitsAllocated=32)
    del float_image.PixelData
    float_image.FloatPixelData = np.zeros(16, dtype="<f4").tobytes()
    seeds["float_pixel_data"] = _bytes(float_image)

    one_bit = _ct(BitsAllocated=1, BitsStored=1, HighBit=0, PixelRepresentation=0, Rows=3)
    one_bit.Columns = 5
    one_bit.PixelData = b"\xff\x7f"  # 15 bits, packed, padded to an even length
    seeds["one_bit"] = _bytes(one_bit)

    ybr = _ct(SamplesPerPixel=3, PhotometricInterpretation="YBR_FULL_422", BitsAllocated=8)
    ybr.BitsStored, ybr.HighBit, ybr.PixelRepresentation, ybr.PlanarConfiguration = 8, 7, 0, 0
    ybr.PixelData = bytes(4 * 4 * 2)
    seeds["ybr_full_422"] = _bytes(ybr)

    data = seeds["ct_explicit_le"]
    seeds["no_preamble"] = data[128:]
    seeds["cut_in_header"] = data[:300]
    seeds["cut_in_pixels"] = data[:-6]
    wrong_length = bytearray(data)
    wrong_length[140:144] = struct.pack("<L", struct.unpack("<L", data[140:144])[0] + 2)
    seeds["wrong_group_length"] = bytes(wrong_length)
    seeds["unknown_syntax"] = data.replace(
        b"1.2.840.10008.1.2.1\x00", b"9.9.9.999.99.HOSTIL\x00", 1
    )
    longer = _ct()
    longer.PixelData = bytes(4 * 4 * 2 + 4)  # stored with a warning
    seeds["pixel_data_longer"] = _bytes(longer)
    return seeds


def multipart_seeds(dicom: bytes) -> dict[str, bytes]:
    part = dicom[:300]
    return {
        "framed_one": encode(framed=True, boundary=b"abc123", body_or_parts=[(1, part)]),
        "framed_three": encode(
            framed=True,
            boundary=b"DICOM-boundary_01",
            body_or_parts=[(1, part), (4, b""), (3, b"not dicom\r\n--x")],
            mode_bits=6,
        ),
        "framed_small_chunks": encode(
            framed=True,
            boundary=b"b",
            body_or_parts=[(2, b"\r\n-\r\n--"), (0, part)],
            spool_selector=0,
            chunk_seed=7,
        ),
        "raw_no_close": encode(
            framed=False,
            boundary=b"xyz",
            body_or_parts=b"--xyz\r\nContent-Type: application/dicom\r\n\r\n" + part,
        ),
        "raw_no_crlf_after_boundary": encode(
            framed=False, boundary=b"xyz", body_or_parts=b"--xyzContent-Type: a/b\r\n\r\nx"
        ),
        "raw_headers_unended": encode(
            framed=False,
            boundary=b"xyz",
            body_or_parts=b"--xyz\r\nContent-Type: application/dicom\r\n--xyz--",
        ),
        "raw_long_boundary": encode(
            framed=False, boundary=b"B" * 200, body_or_parts=b"--" + b"B" * 200 + b"--"
        ),
        "raw_bad_boundary_chars": encode(
            framed=False, boundary=b"a\x00b;", body_or_parts=b"--a\x00b;\r\n\r\nx\r\n--a\x00b;--"
        ),
        "raw_good_part_then_bad_delimiter": encode(
            framed=False,
            boundary=b"xyz",
            body_or_parts=b"--xyz\r\n\r\n" + part + b"\r\n--xyzGARBAGE\r\n\r\nx\r\n--xyz--",
        ),
        "raw_many_tiny_parts": encode(
            framed=False, boundary=b"q", body_or_parts=b"--q\r\n\r\n\r\n" * 50 + b"--q--"
        ),
    }


def main() -> None:
    headers = header_seeds()
    for name, seeds in (
        ("header", headers),
        ("multipart", multipart_seeds(headers["ct_explicit_le"])),
    ):
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for seed_name, data in seeds.items():
            (folder / seed_name).write_bytes(data)
        print(f"{folder}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


if __name__ == "__main__":
    main()
