"""The DICOM File Format (PS3.10 7.1) around a data set received over the network."""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

_PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    # Explicit VR Little Endian (PS3.5 7.1.2); OB has a 4-byte length after 2 reserved bytes.
    tag = struct.pack("<HH", group_elem >> 16, group_elem & 0xFFFF)
    if vr == b"OB":
        return tag + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw  # UI pads with NUL (PS3.5 6.2)


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw  # SH, AE pad with a space


_IMPLEMENTATION = _element(0x00020012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)) + _element(
    0x00020013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION)
)


def _source_ae(title: str) -> bytes:
    title = title.strip()[:16]
    return _element(0x00020016, b"AE", _text(title)) if title else b""


def file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str
) -> bytes:
    """Preamble, prefix and File Meta Information group for one received instance."""
    body = b"".join(
        (
            _element(0x00020001, b"OB", b"\x00\x01"),
            _element(0x00020002, b"UI", _ui(sop_class_uid)),
            _element(0x00020003, b"UI", _ui(sop_instance_uid)),
            _element(0x00020010, b"UI", _ui(transfer_syntax_uid)),
            _IMPLEMENTATION,
            _source_ae(source_ae_title),
        )
    )
    return _PREAMBLE + _element(0x00020000, b"UL", struct.pack("<L", len(body))) + body
