"""DICOMweb GET requests straight to their endpoints, past FastAPI's per-request machinery.

Viewers make many small DICOMweb requests (a QIDO search, the metadata of a series, one frame).
For those, FastAPI's middleware chain, route resolution and dependency solving cost more than
the archive's own work: a one-result QIDO-RS search spent most of its time there. The GET
routes of the DICOMweb router take only the request and their path parameters, so
:class:`DirectApp` matches them itself and calls the endpoint with the same middleware the
application declares (CORS), the same error responses (``{"detail": ...}`` for an
``HTTPException``) and the same thread pool. Every other request, and a path that matches no
route, goes through FastAPI as before; the routes stay in the OpenAPI document as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.exception_handlers import http_exception_handler
from fastapi.routing import APIRoute, APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send


def _direct(prefix: str, route: APIRoute) -> Route | None:
    """A plain Starlette route for a GET endpoint that takes the request and its path
    parameters only; None for any other route."""
    if route.methods != {"GET"} or route.dependant.dependencies:
        return None
    if route.dependant.query_params or route.dependant.header_params:
        return None
    if route.dependant.cookie_params or route.dependant.body_params:
        return None
    parameters = list(inspect.signature(route.endpoint).parameters)
    path_names = {param.name for param in route.dependant.path_params}
    if not parameters or parameters[0] != "request" or set(parameters[1:]) != path_names:
        return None
    if inspect.iscoroutinefunction(route.endpoint):
        return None
    function: Callable[..., Response] = route.endpoint

    async def endpoint(request: Request) -> Response:
        return await run_in_threadpool(function, request, **request.path_params)

    return Route(prefix + route.path, endpoint, methods=["GET"], name=route.name)


class DirectApp(FastAPI):
    """A FastAPI application that serves the plain GET routes of ``direct_router`` directly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct_routes: list[Route] = []
        self._direct_stack: ASGIApp | None = None

    def serve_directly(self, prefix: str, routers: Iterable[APIRouter]) -> None:
        """Serve the plain GET routes of ``routers``, included in this app under ``prefix``,
        directly."""
        self._direct_routes = [
            direct
            for router in routers
            for route in router.routes
            if isinstance(route, APIRoute) and (direct := _direct(prefix, route)) is not None
        ]
        self._direct_stack = None

    def _build_direct_stack(self) -> ASGIApp:
        handlers: dict[Any, Any] = {HTTPException: http_exception_handler}
        app: ASGIApp = ExceptionMiddleware(self._dispatch, handlers=handlers)
        for middleware in reversed(self.user_middleware):  # as Starlette builds its own stack
            app = middleware.cls(app, *middleware.args, **middleware.kwargs)
        return app

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        await scope["pacsbridge.direct_route"].handle(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and self._direct_routes:
            for route in self._direct_routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    if self._direct_stack is None:
                        self._direct_stack = self._build_direct_stack()
                    scope = {**scope, **child, "app": self, "pacsbridge.direct_route": route}
                    await self._direct_stack(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)
