"""An incremental multipart/related reader (RFC 2046 5.1, RFC 2387) for request bodies.

Fed the body chunk by chunk, it returns each part as soon as its closing delimiter arrives.
A part's bytes are kept in memory up to ``spool_limit`` and in a temporary file beyond, so a body
of any size is read with memory bounded by the parts being handled, never the whole body.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import BinaryIO

#: Largest header block of one part.
MAX_HEADER_BYTES = 64 * 1024
#: Longest boundary (RFC 2046 5.1.1).
MAX_BOUNDARY_LENGTH = 70
#: Characters of a boundary (RFC 2046 5.1.1 ``bchars``); the last may not be a space.
_BOUNDARY_CHARS = frozenset(
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'()+_,-./:=? "
)


class MultipartError(ValueError):
    """The body is not multipart as announced. ``parts`` holds the parts completed by the
    chunk in which the error was found (they are whole: only what follows them is wrong);
    ``part_index`` is the number of the part whose framing is wrong (the one being read),
    which is dropped with everything after it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.parts: list[Part] = []
        self.part_index = 0


def boundary_error(boundary: bytes) -> str | None:
    """Why ``boundary`` is not a boundary RFC 2046 5.1.1 allows (1 to 70 of its ``bchars``,
    not ending in a space), or None."""
    if not boundary:
        return "the multipart boundary is empty"
    if len(boundary) > MAX_BOUNDARY_LENGTH:
        return (
            f"the multipart boundary has {len(boundary)} characters; RFC 2046 5.1.1 allows "
            f"at most {MAX_BOUNDARY_LENGTH}"
        )
    bad = sorted(set(boundary) - _BOUNDARY_CHARS)
    if bad:
        shown = ascii(bytes(bad[:5]).decode("latin-1"))
        return f"the multipart boundary holds characters RFC 2046 5.1.1 does not allow: {shown}"
    if boundary.endswith(b" "):
        return "the multipart boundary ends in a space, which RFC 2046 5.1.1 does not allow"
    return None


class PartBuffer:
    """The bytes of one part: chunks in memory, spilled to a temporary file past a limit."""

    def __init__(self, spool_limit: int) -> None:
        self.spool_limit = spool_limit
        self.size = 0
        self._chunks: list[bytes] = []
        self._file: BinaryIO | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        if self.size > self.spool_limit:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
            for chunk in self._chunks:
                self._file.write(chunk)
            self._chunks = []

    def getvalue(self) -> bytes:
        if self._file is None:
            return b"".join(self._chunks)
        self._file.seek(0)
        return self._file.read()

    def head(self, size: int) -> bytes:
        """The first ``size`` bytes (fewer when the part is shorter), without reading the rest."""
        if self._file is not None:
            self._file.seek(0)
            return self._file.read(size)
        out = bytearray()
        for chunk in self._chunks:
            out += chunk[: size - len(out)]
            if len(out) >= size:
                break
        return bytes(out)

    def close(self) -> None:
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class Part:
    headers: dict[str, str]
    body: PartBuffer
    index: int
    complete: bool = True

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")


@dataclass
class MultipartReader:
    boundary: bytes
    spool_limit: int = 32 * 2**20
    parts_seen: int = 0
    finished: bool = False
    _buffer: bytearray = field(default_factory=bytearray)
    _state: str = "preamble"  # preamble | after-boundary | headers | body | epilogue | failed
    _current: Part | None = None
    _search_from: int = 0
    _at_start: bool = True

    def __post_init__(self) -> None:
        error = boundary_error(self.boundary)
        if error:
            raise MultipartError(error)
        self._dash = b"--" + self.boundary
        self._delimiter = b"\r\n--" + self.boundary

    def feed(self, data: bytes) -> list[Part]:
        """Consume ``data``; return the parts it completed."""
        if self.finished:
            return []
        self._buffer += data
        done: list[Part] = []
        try:
            self._parse(done)
        except MultipartError as exc:
            # Nothing after the error is read: no part is cut short by it.
            self._state = "failed"
            self.finished = True
            self._buffer.clear()
            self._current = None
            exc.parts = done
            exc.part_index = self.parts_seen + 1  # no part's headers were read yet
            raise
        return done

    def _parse(self, done: list[Part]) -> None:
        while True:
            if self._state == "preamble":
                if not self._preamble():
                    break
            elif self._state == "after-boundary":
                if len(self._buffer) < 2:
                    break
                if self._buffer[:2] == b"--":
                    self._state = "epilogue"
                    self.finished = True
                    self._buffer.clear()
                    break
                # Only transport padding (spaces, tabs) may come before the CRLF (RFC 2046
                # 5.1.1).
                end = self._buffer.find(b"\r\n", 0, 1026)
                if (end < 0 and len(self._buffer) > 1024) or self._buffer[:end].strip(b" \t"):
                    raise MultipartError(
                        "a boundary delimiter is not followed by CRLF (RFC 2046 5.1.1)"
                    )
                if end < 0:
                    break
                del self._buffer[: end + 2]
                self._state = "headers"
            elif self._state == "headers":
                if not self._headers():
                    break
            elif self._state == "body":
                part = self._body()
                if part is None:
                    break
                done.append(part)
            else:
                break

    def close(self) -> Part | None:
        """The body ended: return the part it cut short, if any (``complete=False``): one cut
        inside its body, or inside its headers (then with no headers and no bytes)."""
        part = self._current
        if part is not None and self._state == "body":
            part.body.write(bytes(self._buffer))
            part.complete = False
        elif self._state == "headers":
            self.parts_seen += 1
            part = Part({}, PartBuffer(self.spool_limit), self.parts_seen, complete=False)
        self._buffer.clear()
        self._current = None
        self._state = "epilogue"
        return part

    def _preamble(self) -> bool:
        # The first delimiter starts the body or follows a CRLF (RFC 2046 5.1.1). Once the
        # preamble's start is dropped, a match in the first two bytes was already looked at.
        index = self._buffer.find(self._dash, 0 if self._at_start else 2)
        while index > 0 and self._buffer[index - 2 : index] != b"\r\n":
            index = self._buffer.find(self._dash, index + 1)
        if index < 0:
            # Keep enough to find a boundary that straddles chunks.
            if len(self._buffer) > len(self._dash) + 2:
                del self._buffer[: len(self._buffer) - len(self._dash) - 2]
                self._at_start = False
            return False
        del self._buffer[: index + len(self._dash)]
        self._state = "after-boundary"
        return True

    def _headers(self) -> bool:
        if self._buffer[:2] == b"\r\n":
            raw = b""
            del self._buffer[:2]
        else:
            end = self._buffer.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
            if end < 0:
                if len(self._buffer) > MAX_HEADER_BYTES:
                    raise MultipartError(
                        f"the headers of part {self.parts_seen + 1} are longer than 64 KiB"
                    )
                return False
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 4]
        headers: dict[str, str] = {}
        for line in raw.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        self.parts_seen += 1
        self._current = Part(headers, PartBuffer(self.spool_limit), self.parts_seen)
        self._state = "body"
        self._search_from = 0
        return True

    def _body(self) -> Part | None:
        assert self._current is not None
        index = self._buffer.find(self._delimiter, self._search_from)
        if index < 0:
            keep = len(self._delimiter) - 1
            if len(self._buffer) > keep:
                cut = len(self._buffer) - keep
                self._current.body.write(bytes(self._buffer[:cut]))
                del self._buffer[:cut]
            self._search_from = 0
            return None
        self._current.body.write(bytes(self._buffer[:index]))
        del self._buffer[: index + len(self._delimiter)]
        part, self._current = self._current, None
        self._state = "after-boundary"
        return part
