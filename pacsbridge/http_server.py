"""The HTTP server: uvicorn, with the limits it lacks on reading a request's headers.

uvicorn times out idle keep-alive connections, but not a request whose line and headers never
finish: a client that sends half a request line holds its connection (and a file descriptor)
for ever, and with httptools the headers of one request may grow without bound. Each
connection here gets ``http_header_timeout`` seconds for a request's line and headers (from
the connection, or from the first byte after a finished exchange on it, be it only an empty
line), after which it is answered 408 and closed (RFC 9110 15.5.9); and at most
``http_max_header_bytes`` of them, beyond which it is answered 431 and closed (RFC 6585 5).
The other limits are uvicorn's own: idle keep-alive connections (``http_keep_alive_timeout``),
open connections (``http_max_connections``: requests beyond get 503) and the listen backlog
(``http_backlog``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from http import HTTPStatus
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from config import Settings

log = logging.getLogger(__name__)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size limit for request headers.
    :func:`protocol_class` makes a subclass with the limits of the settings.

    Each request only notes its deadline (no timer per request: keep-alive requests stay as
    cheap as they were); one timer per connection looks at it, and while the connection is
    busy or idle between requests, it looks again every ``header_timeout`` seconds."""

    header_timeout: float = 10.0
    max_header_bytes: int = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_deadline = 0.0
        self._awaiting_headers = True
        self._request_begun = False
        self._message_complete = False
        self._header_bytes = 0
        self._begun_mid_read = False

    # --- the header clock -------------------------------------------------------------------
    def _check_header_deadline(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        left = self.header_timeout
        if self._awaiting_headers:
            left = self._header_deadline - self.loop.time()
            if left <= 0 and self.cycle is not None and not self.cycle.response_complete:
                # The next request began while this one's response is still going out: the
                # response is not cut; the next request's time runs from its end.
                self._header_deadline = self.loop.time() + self.header_timeout
                left = self.header_timeout
            if left <= 0:
                if self._request_begun:
                    self._refuse(
                        HTTPStatus.REQUEST_TIMEOUT,
                        f"the request's headers did not arrive within {self.header_timeout:g} s",
                    )
                else:
                    self.transport.close()  # nothing was asked: nothing to answer
                return
        self._header_timer = self.loop.call_later(left, self._check_header_deadline)

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        """Answer ``status`` with a plain-text ``message`` and close the connection."""
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.warning("HTTP request refused", extra={"client": client, "reason": message})
        body = message.encode("ascii")
        head = [f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode("ascii")]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    # --- uvicorn's protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline = self.loop.time() + self.header_timeout
        self._header_timer = self.loop.call_later(self.header_timeout, self._check_header_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._awaiting_headers:
            if not self._between_requests():
                super().data_received(data)
                return
            # Bytes after a finished exchange: the next request, or empty lines before it,
            # which the parser skips without beginning a message (RFC 9112 2.2). Either way
            # the next request line and headers get ``header_timeout`` from the first of them:
            # a client that sends only CRLFs holds the connection no longer than that.
            self._awaiting_headers = True
            self._request_begun = False
            self._header_bytes = 0
            self._header_deadline = self.loop.time() + self.header_timeout
        self._header_bytes += len(data)
        super().data_received(data)
        if (
            self._awaiting_headers
            and self._header_bytes > self.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._refuse(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"the request line and headers exceed {self.max_header_bytes} bytes",
            )

    def _between_requests(self) -> bool:
        """The last request was read whole and answered whole."""
        cycle = self.cycle
        return self._message_complete and (cycle is None or cycle.response_complete)

    def on_message_begin(self) -> None:
        self._message_complete = False
        super().on_message_begin()
        if not self._awaiting_headers:
            # A further request on this connection: its headers get the whole time again.
            self._awaiting_headers = True
            self._header_bytes = 0
            self._header_deadline = self.loop.time() + self.header_timeout
            # It began inside a read whose bytes were counted for the one before.
            self._begun_mid_read = True
        self._request_begun = True

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        # Headers that arrived whole, in one read or a few, are held to the same limit as those
        # still arriving (RFC 6585 5). Bytes read so far bound their size from above, so a
        # request is measured only when those alone exceed the limit (or it began mid-read).
        if (self._header_bytes > self.max_header_bytes or self._begun_mid_read) and (
            self._header_block_size() > self.max_header_bytes
        ):
            # The request never reaches the application: its cycle runs the 431 answer,
            # which closes the connection once sent (and nothing pipelined after it runs).
            app, self.app = self.app, _headers_too_large(self.max_header_bytes, self.client)
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        self._begun_mid_read = False
        super().on_headers_complete()

    def _header_block_size(self) -> int:
        """The bytes of the request line and headers just parsed (RFC 9112 2.1: the request
        line, each field line with its ``: `` and CRLF, the empty line), at least what was
        sent: whitespace around the values the parser dropped is not counted."""
        line = len(self.parser.get_method()) + len(self.url) + len(" HTTP/1.1\r\n") + 1
        return line + sum(len(name) + len(value) + 4 for name, value in self.headers) + 2

    def on_message_complete(self) -> None:
        self._message_complete = True
        super().on_message_complete()


def _headers_too_large(limit: int, client: tuple[str, int] | None) -> ASGIApp:
    """An ASGI application answering 431 (RFC 6585 5) and closing the connection, for a
    request whose line and headers exceed ``limit`` bytes."""
    message = f"the request line and headers exceed {limit} bytes"
    body = message.encode("ascii")
    log.warning(
        "HTTP request refused",
        extra={"client": f"{client[0]}:{client[1]}" if client else "?", "reason": message},
    )

    async def too_large(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE.value,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode("ascii")),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return too_large


def protocol_class(settings: Settings) -> type[BoundedHttpToolsProtocol]:
    """:class:`BoundedHttpToolsProtocol` with the limits of ``settings``."""
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {
            "header_timeout": settings.http_header_timeout,
            "max_header_bytes": settings.http_max_header_bytes,
        },
    )


class _Server(uvicorn.Server):
    """uvicorn's server, telling ``on_exit`` (once) when a signal asks it to stop."""

    on_exit: Callable[[], None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        on_exit, self.on_exit = self.on_exit, None
        if on_exit is not None:
            on_exit()
        super().handle_exit(sig, frame)


def run(app: Any, settings: Settings, on_exit: Callable[[], None] | None = None) -> None:
    """Serve ``app`` on ``http_host``:``http_port`` until SIGTERM or SIGINT, with the HTTP
    limits of ``settings``; ``on_exit`` is called (in the signal handler: it must not block)
    when the first signal comes. Then the listening socket closes, idle connections close, and
    requests in progress get up to ``shutdown_timeout`` seconds to finish (then they are
    cancelled); a second SIGINT cancels them at once. Log records go to the logging set up by
    ``config.configure_logging`` (text or JSON), not to uvicorn's own handlers."""
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=False,
        http=protocol_class(settings),
        timeout_keep_alive=settings.http_keep_alive_timeout,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),
        limit_concurrency=settings.http_max_connections,
        backlog=settings.http_backlog,
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
    )
    server = _Server(config)
    server.on_exit = on_exit
    server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn logged why (the port is taken, say)
