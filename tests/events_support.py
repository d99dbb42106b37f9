"""Shared by the event tests: a webhook receiver on 127.0.0.1 that checks signatures as a
subscriber would (HMAC-SHA256 of ``timestamp + "." + body``, computed here independently of
``events.envelope``), and helpers to write events and run a dispatcher."""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from archive import Archive
from archive.outbox import emit
from config.settings import EventsSettings
from events import Dispatcher, Envelope

PACSBRIDGE = Path(sys.executable).parent / "pacsbridge"
SECRET = "whsec-test-0123456789"
ENVELOPE = Envelope(source="https://pacs.test", fhir_base="https://pacs.test/fhir")


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    signed: bool

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Answers each POST with ``answer(envelope)`` (an HTTP status) after ``delay`` seconds."""

    server: ThreadingHTTPServer
    answer: Callable[[dict[str, Any]], int] = lambda _event: 200
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/pacs"

    def ids(self) -> list[str]:
        return [r.event["id"] for r in self.received]


def verify(headers: dict[str, str], body: bytes) -> bool:
    timestamp = headers.get("x-pacsbridge-timestamp", "")
    given = headers.get("x-pacsbridge-signature", "")
    if not timestamp.isdigit() or abs(int(timestamp) - time.time()) > 300:
        return False  # a stale timestamp: a replay
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(given, "sha256=" + expected.hexdigest())


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            hook = holder[0]
            hook.received.append(
                Received(self.command, self.path, headers, body, verify(headers, body))
            )
            if hook.delay:
                time.sleep(hook.delay)
            code = hook.answer(json.loads(body)) if body else 200
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        do_PUT = do_POST  # a FHIR rest-hook with a payload: an update

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook = Receiver(server)
    holder.append(hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hook
    server.shutdown()
    server.server_close()


def fast(**overrides: Any) -> EventsSettings:
    values: dict[str, Any] = {"poll_interval": 0.05, "backoff_base": 0.05, "backoff_max": 0.2}
    return EventsSettings(**(values | overrides))


def emit_one(arc: Archive, type_: str, study: str | None, **data: Any) -> str:
    with arc.db.write_connection() as conn:
        return emit(conn, type_, study_uid=study, resource=f"ImagingStudy/{study}", data=data)


def run_until(dispatcher: Dispatcher, done: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        dispatcher.run_once()
        time.sleep(0.02)
