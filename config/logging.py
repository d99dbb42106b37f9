"""Logging setup: human-readable text by default, one JSON object per line on request.

Every line written while an HTTP request or a DICOM association is served carries its id
(``request_id``): :func:`bind_request_id` sets it for the current context (a ``contextvars``
variable, so concurrent requests on one event loop keep theirs apart). Secrets never reach a
log line: the values of fields named like a credential (``authorization``, ``password``,
``token``, ``secret``, ``client_assertion``, ``cookie``), at any depth of a nested field, bearer
tokens, anything shaped like a JWT and the password of a URL in a message or a value are
replaced by ``[redacted]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "color_message",  # uvicorn's message with terminal colours: the plain one is there
}

request_id: ContextVar[str | None] = ContextVar("pacsbridge_request_id", default=None)
"""The id of the HTTP request or DICOM association being served in this context."""

REDACTED = "[redacted]"
_SECRET_FIELD = re.compile(
    r"authorization|password|passwd|secret|token|client_assertion|cookie|api[_-]?key", re.I
)
# RFC 6750 2.1 bearer credentials, and compact JWS/JWE (RFC 7515 7.1: base64url header "eyJ…").
_SECRET_TEXT = re.compile(
    r"((?i:bearer|basic))\s+[A-Za-z0-9\-._~+/]+=*"
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}"
)
# The password of a URL's userinfo (RFC 3986 3.2.1: ``scheme://user:password@host``). RFC 3986
# wants "@" and "/" in a password percent-encoded; written raw they still belong to it, so the
# password runs to the last "@" before the next space or quote (a URL without userinfo but with
# an "@" further on loses its port and path in the log instead: the safe side). Both parts are
# bounded, so that no line makes the match slow.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s/:@\"']{0,256}):[^\s\"']{0,256}@")
#: How deep nested fields (dicts, lists) are cleaned; deeper values are replaced whole.
_MAX_DEPTH = 8


@contextlib.contextmanager
def bind_request_id(value: str | None) -> Iterator[None]:
    """Log lines written in this context (and in tasks it starts) carry ``value``."""
    token = request_id.set(value)
    try:
        yield
    finally:
        request_id.reset(token)


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` writes the stack of every thread of this process to stderr (the
    log): what a process that does not stop or answer is doing. Nothing where SIGUSR1 does not
    exist."""
    import faulthandler
    import signal

    usr1 = getattr(signal, "SIGUSR1", None)
    if usr1 is not None:
        with contextlib.suppress(ValueError, RuntimeError, OSError):
            faulthandler.register(usr1, all_threads=True)


def redact(text: str) -> str:
    """``text`` with bearer tokens, JWTs and the passwords of URLs replaced by
    ``[redacted]``."""
    text = _SECRET_TEXT.sub(lambda m: f"{m.group(1)} {REDACTED}" if m.group(1) else REDACTED, text)
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)


def _clean(key: str, value: Any, depth: int = 0) -> Any:
    """A field's value as logged: redacted when its name is a credential's, and so on into
    nested dicts, lists and tuples (an ``extra={"request": {"headers": {...}}}``)."""
    if _SECRET_FIELD.search(str(key)):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict | list | tuple) and depth >= _MAX_DEPTH:
        return REDACTED
    if isinstance(value, dict):
        return {k: _clean(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean("", v, depth + 1) for v in value]
    return value


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: _clean(key, value)
        for key, value in record.__dict__.items()
        if key not in _RESERVED and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "request_id": request_id.get(),
        }
        payload.update(_extras(record))
        if record.exc_info:
            payload["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = redact(super().format(record))
        extras = _extras(record)
        current = request_id.get()
        if current is not None:
            extras = {"request_id": current, **extras}
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return base


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at DEBUG/INFO; keep it to warnings unless asked for debug.
    if level.upper() != "DEBUG":
        for noisy in ("pynetdicom", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
