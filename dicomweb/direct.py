"""DICOMweb GET requests straight to their endpoints, past FastAPI's per-request machinery.

Viewers make many small DICOMweb requests (a QIDO search, the metadata of a series, one frame).
For those, FastAPI's middleware chain, route resolution and dependency solving cost more than
the archive's own work: a one-result QIDO-RS search spent most of its time there. The GET
routes of the DICOMweb router take only the request and their path parameters, so
:class:`DirectApp` matches them itself (one regular expression per route, compiled once) and
runs the endpoint in a thread of its own pool, with the same middleware the application
declares (CORS) and the same error responses (``{"detail": ...}`` for an ``HTTPException``).
Every other request, and a path that matches no route, goes through FastAPI as before; the
routes stay in the OpenAPI document as they are. The FHIR edge's GET routes, which answer their
own errors, are served the same way under their own prefix.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.exception_handlers import http_exception_handler
from fastapi.routing import APIRoute, APIRouter, iter_route_contexts
from starlette.convertors import Convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Threads that run the direct endpoints (the archive's work is blocking I/O and SQL), as many
#: as the thread pool FastAPI runs its other endpoints in.
THREADS = 40


@dataclass(frozen=True, slots=True)
class DirectRoute:
    """A GET endpoint that takes the request and its path parameters only."""

    name: str
    path: str
    regex: re.Pattern[str]
    convertors: dict[str, Convertor[Any]]
    endpoint: Callable[..., Response]

    def match(self, path: str) -> dict[str, Any] | None:
        found = self.regex.match(path)
        if found is None:
            return None
        return {
            name: self.convertors[name].convert(value) for name, value in found.groupdict().items()
        }


def _direct(route: Any) -> DirectRoute | None:
    """The direct form of a GET endpoint (an :class:`APIRoute` or FastAPI's ``RouteContext`` of
    one as the application holds it, with its full path and every dependency merged in) that
    takes the request and its path parameters only; None for any other route."""
    dependant = route.dependant
    if route.methods != {"GET"} or dependant is None or dependant.dependencies:
        return None
    if dependant.query_params or dependant.header_params:
        return None
    if dependant.cookie_params or dependant.body_params:
        return None
    parameters = list(inspect.signature(route.endpoint).parameters)
    path_names = {param.name for param in dependant.path_params}
    if not parameters or parameters[0] != "request" or set(parameters[1:]) != path_names:
        return None
    if inspect.iscoroutinefunction(route.endpoint):
        return None
    regex, path, convertors = compile_path(route.path)
    return DirectRoute(route.name, path, regex, convertors, route.endpoint)


class DirectApp(FastAPI):
    """A FastAPI application that serves the plain GET routes given to
    :meth:`serve_directly` directly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct_prefixes: tuple[str, ...] = ()
        self._direct_routes: list[DirectRoute] = []
        self._direct_stack: ASGIApp | None = None
        self._executor: ThreadPoolExecutor | None = None

    def serve_directly(self, prefix: str, routers: Iterable[APIRouter]) -> None:
        """Serve the plain GET routes of ``routers``, already included in this app under
        ``prefix``, directly (in addition to those of earlier calls, under their prefixes).

        The routes are taken as the application holds them — with the dependencies of the
        application and of ``include_router`` merged in — so that a route with any dependency
        goes through FastAPI, which runs it; a dependency is never skipped."""
        endpoints = {
            route.endpoint
            for router in routers
            for route in router.routes
            if isinstance(route, APIRoute)
        }
        self._direct_prefixes = (*self._direct_prefixes, prefix)
        self._direct_routes += [
            direct
            for route in iter_route_contexts(self.router.routes)
            if isinstance(route.original_route, APIRoute)
            and route.endpoint in endpoints
            and (route.path or "").startswith(prefix)
            and (direct := _direct(route)) is not None
        ]
        self._direct_stack = None

    def _build_direct_stack(self) -> ASGIApp:
        app: ASGIApp = self._dispatch
        for middleware in reversed(self.user_middleware):  # as Starlette builds its own stack
            app = middleware.cls(app, *middleware.args, **middleware.kwargs)
        return app

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The endpoint in a worker thread, its response, and an ``HTTPException`` from either
        as FastAPI answers it (``{"detail": ...}``)."""
        route, path_params = scope["pacsbridge.direct_route"]
        request = Request(scope, receive, send)
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        if self._executor is None:
            self._executor = ThreadPoolExecutor(THREADS, thread_name_prefix="dicomweb")
        call = functools.partial(
            contextvars.copy_context().run, route.endpoint, request, **path_params
        )
        try:
            response = await asyncio.get_running_loop().run_in_executor(self._executor, call)
            await response(scope, receive, sender)
        except HTTPException as exc:
            if started:
                raise
            # The application's handler of HTTPException where it declares one, as FastAPI
            # would run it.
            handler: Any = self.exception_handlers.get(HTTPException, http_exception_handler)
            error = await handler(request, exc)
            await error(scope, receive, sender)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            # HEAD wherever GET works (RFC 9110 9.3.2): the GET, its status and headers (its
            # Content-Length too), without the content.
            scope = {**scope, "method": "GET"}
            send = _without_body(send)
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and self._direct_routes
            and scope["path"].startswith(self._direct_prefixes)
        ):
            path = scope["path"]
            for route in self._direct_routes:
                path_params = route.match(path)
                if path_params is not None:
                    if self._direct_stack is None:
                        self._direct_stack = self._build_direct_stack()
                    scope = {
                        **scope,
                        "app": self,
                        "path_params": path_params,
                        "endpoint": route.endpoint,
                        "pacsbridge.direct_route": (route, path_params),
                    }
                    await self._direct_stack(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


def _without_body(send: Send) -> Send:
    async def headers_only(message: Message) -> None:
        if message["type"] == "http.response.body":
            if not message.get("more_body", False):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await send(message)

    return headers_only
