"""Fuzz the STOW-RS multipart/related reader (``dicomweb.multipart.MultipartReader``) with
atheris, feeding each body in random chunks (the input format is in ``multipart_input.py``).

Any exception but ``MultipartError`` is a crash, and so is a broken invariant: a body framed as
RFC 2046 says must come back as exactly the parts framed (headers and bytes), whatever the
chunking; any body gives parts numbered 1, 2, 3... whose sizes match their bytes; a framing
error names the part right after the last one returned (STOW-RS lists it as failed).

    .venv/bin/python tests/fuzz/fuzz_multipart.py WORK_DIR tests/fuzz/corpus/multipart \\
        -max_total_time=600
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

with atheris.instrument_imports(include=["dicomweb.multipart", "tests.fuzz.multipart_input"]):
    from dicomweb.multipart import MultipartError, MultipartReader, Part
    from tests.fuzz.multipart_input import FuzzInput, decode


def _read(
    case: FuzzInput,
) -> tuple[MultipartReader, list[Part], Part | None, MultipartError | None]:
    reader = MultipartReader(case.boundary, spool_limit=case.spool_limit)
    parts: list[Part] = []
    error = None
    try:
        for chunk in case.chunks():
            parts.extend(reader.feed(chunk))
            if reader.finished:
                break
    except MultipartError as exc:
        parts.extend(exc.parts)  # the parts completed before the error are whole
        error = exc
    return reader, parts, reader.close(), error


def _check_numbering(parts: list[Part], cut: Part | None) -> None:
    every = parts + ([cut] if cut is not None else [])
    for number, part in enumerate(every, 1):
        if part.index != number:
            raise AssertionError(f"part {number} is numbered {part.index}")
        if len(part.body.getvalue()) != part.body.size:
            raise AssertionError(f"part {number} holds other bytes than it counted")
    if any(not part.complete for part in parts):
        raise AssertionError("feed() returned a part cut short")
    if cut is not None and cut.complete:
        raise AssertionError("close() returned a complete part")


def test_one_input(data: bytes) -> None:
    case = decode(data)
    if case is None:
        return
    body = case.body()
    delimiter = b"\r\n--" + case.boundary
    if case.framed and any(delimiter in payload for _, payload in case.parts):
        return  # RFC 2046 5.1.1: the sender chooses a boundary its parts do not contain
    try:
        reader, parts, cut, error = _read(case)
    except MultipartError:  # the boundary itself is refused
        if case.framed:
            raise AssertionError(f"refused the boundary {case.boundary!r}") from None
        return
    if error is not None and case.framed:
        raise AssertionError(f"refused a well-framed body {body!r}: {error}")
    if error is not None and cut is not None:
        raise AssertionError("a part cut short after the body was refused")
    if error is not None and error.part_index != len(parts) + 1:
        raise AssertionError(f"the error names part {error.part_index} after {len(parts)} parts")
    try:
        _check_numbering(parts, cut)
        if not case.framed:
            return
        if not reader.finished or cut is not None:
            raise AssertionError("a well-framed body did not end at its close delimiter")
        if len(parts) != len(case.parts):
            raise AssertionError(f"{len(parts)} parts read, {len(case.parts)} framed")
        for part, (headers, payload) in zip(parts, case.parts, strict=True):
            expected = {name.lower(): value.strip() for name, value in headers}
            if part.headers != expected:
                raise AssertionError(f"headers {part.headers!r}, framed {expected!r}")
            if part.body.getvalue() != payload:
                raise AssertionError(f"part {part.index}: bytes differ from the framed ones")
    finally:
        for part in parts + ([cut] if cut is not None else []):
            part.body.close()


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
