"""Request ids: every HTTP request gets one, echoed in the ``X-Request-ID`` response header and
carried by every log line written while it is served (``request_id``, config/logging.py).

The id a client (or a proxy in front) sends in ``X-Request-ID`` is kept when it is sane: 1 to
128 characters of letters, digits and ``-._:@/+=``; anything else (empty, longer, control
characters, spaces: it would end up in log lines and a response header) is replaced by a
fresh one, 32 hexadecimal digits (a random UUID, RFC 9562 5.4).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config.logging import bind_request_id

HEADER = b"x-request-id"
_SANE = re.compile(rb"[A-Za-z0-9\-._:@/+=]{1,128}")


def request_id_of(scope: Scope) -> str:
    """The request's own id, if sane, else a new one."""
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            if _SANE.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """ASGI middleware, outermost: the id is set before anything else runs (authentication's
    refusals carry it too) and added to the response's headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        encoded = request_id.encode("ascii")

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[Any] = [
                    (name, value) for name, value in message.get("headers", ()) if name != HEADER
                ]
                headers.append((HEADER, encoded))
                message = {**message, "headers": headers}
            await send(message)

        with bind_request_id(request_id):
            await self.app(scope, receive, sending)
