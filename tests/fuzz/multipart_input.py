"""The input format of the STOW-RS multipart fuzz harness, shared with its seed generator.

An input is ``mode, boundary length, boundary, spool selector, 4-byte chunking seed, rest``:

- mode even ("framed"): ``rest`` is split on ``PART_SEPARATOR`` into parts (first byte: which
  headers, the others: the payload); the harness frames them as RFC 2046 says, with the
  boundary mapped onto the characters RFC 2046 allows, and the reader must give back exactly
  those parts;
- mode odd ("raw"): ``rest`` is the body as it is, under the boundary as it is; the reader may
  refuse it, but only with ``MultipartError``.

Either way the body is fed to the reader in chunks whose sizes come from the seed.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

PART_SEPARATOR = b"\x00\xff"
BOUNDARY_ALPHABET = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'()+_,-./:=? "
HEADER_CHOICES: list[list[tuple[str, str]]] = [
    [],
    [("Content-Type", "application/dicom")],
    [("Content-Type", "application/dicom"), ("Content-Length", "12")],
    [("content-type", "application/octet-stream")],
    [("Content-Type", 'application/dicom; transfer-syntax="1.2.840.10008.1.2.1"')],
    [("Content-Type", "multipart/related; boundary=inner"), ("Content-ID", "<x@y>")],
    [("X-Odd", "value: with colon"), ("Content-Type", "application/dicom")],
]


@dataclass
class FuzzInput:
    framed: bool
    boundary: bytes
    spool_limit: int
    chunk_seed: int
    parts: list[tuple[list[tuple[str, str]], bytes]]
    raw_body: bytes
    preamble: bytes
    epilogue: bytes

    def body(self) -> bytes:
        if not self.framed:
            return self.raw_body
        out = [self.preamble + b"\r\n" if self.preamble else b""]
        for headers, payload in self.parts:
            out.append(b"--" + self.boundary + b"\r\n")
            out.append(b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in headers))
            out.append(b"\r\n" + payload + b"\r\n")
        out.append(b"--" + self.boundary + b"--")
        if self.epilogue:
            out.append(b"\r\n" + self.epilogue)
        return b"".join(out)

    def chunks(self) -> Iterator[bytes]:
        body = self.body()
        rng = random.Random(self.chunk_seed)
        position = 0
        while position < len(body):
            size = rng.randint(1, 1 << rng.randint(0, 12))
            yield body[position : position + size]
            position += size


def decode(data: bytes) -> FuzzInput | None:
    """The input ``data`` describes, or None when it is too short to describe one."""
    if len(data) < 7:
        return None
    mode, length = data[0], data[1]
    framed = mode % 2 == 0
    if framed:
        length = 1 + length % 70
    raw_boundary = data[2 : 2 + length]
    if len(raw_boundary) < length:
        return None
    rest = data[2 + length :]
    if len(rest) < 5:
        return None
    spool_limit = 1 << (rest[0] % 16)
    (chunk_seed,) = struct.unpack("<L", rest[1:5])
    rest = rest[5:]
    if not framed:
        return FuzzInput(False, raw_boundary, spool_limit, chunk_seed, [], rest, b"", b"")
    boundary = bytes(BOUNDARY_ALPHABET[b % len(BOUNDARY_ALPHABET)] for b in raw_boundary)
    if boundary.endswith(b" "):
        boundary = boundary[:-1] + b"x"
    parts = []
    for spec in rest.split(PART_SEPARATOR):
        choice = spec[0] if spec else 0
        parts.append((HEADER_CHOICES[choice % len(HEADER_CHOICES)], spec[1:]))
    preamble = b"a preamble to ignore" if mode & 2 else b""
    epilogue = b"an epilogue to ignore" if mode & 4 else b""
    return FuzzInput(True, boundary, spool_limit, chunk_seed, parts, b"", preamble, epilogue)


def encode(
    *,
    framed: bool,
    boundary: bytes,
    body_or_parts: bytes | list[tuple[int, bytes]],
    spool_selector: int = 4,
    chunk_seed: int = 1,
    mode_bits: int = 0,
) -> bytes:
    """An input for :func:`decode` (used to write the seed corpus). Framed boundaries are
    given as characters of :data:`BOUNDARY_ALPHABET`."""
    if framed:
        assert isinstance(body_or_parts, list)
        raw = bytes(BOUNDARY_ALPHABET.index(c) for c in boundary)
        rest = PART_SEPARATOR.join(bytes([choice]) + payload for choice, payload in body_or_parts)
        header = bytes([mode_bits & ~1, len(raw) - 1]) + raw
    else:
        assert isinstance(body_or_parts, bytes)
        rest = body_or_parts
        header = bytes([1, len(boundary)]) + boundary
    return header + bytes([spool_selector]) + struct.pack("<L", chunk_seed) + rest
