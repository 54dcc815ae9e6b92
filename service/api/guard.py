"""Authentication and JSON body limits, decided before any body byte is read: a pure ASGI middleware.

FastAPI reads and parses a route's JSON body before it runs the route's dependencies, so an auth dependency
alone lets a client without a token make the process read, buffer and parse any body it likes (two 100 MiB
`[[],[],...]` bodies took the API from 284 MB to 3.2 GB, and the 401 came after 3.3 s). This middleware finds
the route a request will reach, decides auth from the headers alone and answers 401/403 at once; for routes
with a JSON body it then reads at most `max_json_bytes` (413 before reading when Content-Length says more,
while reading otherwise), with the same idle timeout (408) as uploads, and hands the buffered body on.

Upload, merge and POST /diff stream their own bodies (`service.api.uploads`) with their own limits; they pass
through here after the auth check.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import error_response
from service.api.uploads import check_declared_length
from service.errors import (
    CheckpointServiceError,
    Forbidden,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
)

# What each scope may do includes what every weaker one may do.
SCOPE_RANK = {"read": 0, "write": 1, "admin": 2}


def scope_of(tokens: Mapping[str, str], authorization: str | None) -> str:
    """The scope of a request's `Authorization` header.

    Args:
        tokens: Token -> scope; empty when the service is open.
        authorization: The header's value, or None.

    Returns:
        The token's scope; "admin" when the service is open.

    Raises:
        Unauthorized: No Bearer token, or an unknown one.
    """
    if not tokens:
        return "admin"  # no tokens configured: the service is open
    scheme, _, credentials = (authorization or "").partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        raise Unauthorized("this service needs a Bearer token")
    given = credentials.encode()
    scope: str | None = None
    for token, token_scope in tokens.items():
        # Compare against every token, without an early exit, in constant time per comparison.
        if hmac.compare_digest(given, token.encode()):
            scope = token_scope
    if scope is None:
        raise Unauthorized("unknown token")
    return scope


def authorize(tokens: Mapping[str, str], authorization: str | None, needed: str) -> None:
    """Raise unless the header's token has at least the `needed` scope.

    Raises:
        Unauthorized: No Bearer token, or an unknown one.
        Forbidden: The token's scope is weaker than `needed`.
    """
    if SCOPE_RANK[scope_of(tokens, authorization)] < SCOPE_RANK[needed]:
        raise Forbidden(f"this operation needs a {needed} token")


@dataclass(frozen=True)
class RouteRule:
    """What the guard checks for one route: the scope it needs (None: public) and whether it takes JSON."""

    scope: str | None
    json_body: bool


class RequestGuard:
    """Pure ASGI middleware: per-route auth from the headers, then a bounded, timed JSON body.

    Args:
        app: The wrapped application.
        routes: The app's routes (as declared, before FastAPI wraps included routers), to find the one a request
            will reach.
        scopes: Auth dependency -> the scope it stands for (a route declares `dependencies=[WriteAuth]`).
        tokens: Token -> scope; empty when the service is open.
        max_json_bytes: The largest JSON body.
        idle_timeout: Seconds a body may send nothing before 408.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Sequence[BaseRoute],
        scopes: Mapping[Callable[..., Any], str],
        tokens: Mapping[str, str],
        max_json_bytes: int,
        idle_timeout: float,
    ) -> None:
        self.app = app
        self.routes = tuple(routes)
        self.scopes = scopes
        self.tokens = tokens
        self.max_json_bytes = max_json_bytes
        self.idle_timeout = idle_timeout
        self._rules: dict[int, RouteRule] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route_for(scope)
        if route is None:
            await self.app(scope, receive, send)  # 404 or 405: the router answers without reading a body
            return
        scope["route"] = route  # the router sets it too; the metrics of a refusal here need it already
        rule = self._rule(route)
        try:
            if rule.scope is not None:
                authorize(self.tokens, _header(scope, b"authorization"), rule.scope)
            if rule.json_body:
                body = await self._read_json_body(scope, receive)
                if body is None:
                    return  # the client went away
                receive = _replay(body, receive)
        except CheckpointServiceError as exc:
            await _refuse(scope, receive, send, exc)
            return
        await self.app(scope, receive, send)

    def _route_for(self, scope: Scope) -> BaseRoute | None:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route
        return None

    def _rule(self, route: BaseRoute) -> RouteRule:
        rule = self._rules.get(id(route))
        if rule is None:
            rule = self._rules[id(route)] = rule_for(route, self.scopes)
        return rule

    async def _read_json_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.max_json_bytes
        check_declared_length(_header(scope, b"content-length"), limit, what="JSON body")
        body = bytearray()
        while True:
            try:
                with anyio.fail_after(self.idle_timeout):
                    message = await receive()
            except TimeoutError as exc:
                raise RequestTimeout(f"no request body bytes arrived for {self.idle_timeout:g} s") from exc
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                raise PayloadTooLarge(f"JSON body exceeds the limit of {limit} bytes", limit=limit)
            if not message.get("more_body", False):
                return bytes(body)


def rule_for(route: BaseRoute, scopes: Mapping[Callable[..., Any], str]) -> RouteRule:
    """The scope a route's auth dependencies ask for, and whether FastAPI will parse a JSON body for it."""
    if not isinstance(route, APIRoute):
        return RouteRule(scope=None, json_body=False)
    needed = [scopes[d.call] for d in route.dependant.dependencies if d.call is not None and d.call in scopes]
    return RouteRule(
        scope=max(needed, key=SCOPE_RANK.__getitem__) if needed else None,
        json_body=route.body_field is not None,
    )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would

    return replay


async def _refuse(scope: Scope, receive: Receive, send: Send, exc: CheckpointServiceError) -> None:
    response = error_response(Request(scope), exc)
    if _header(scope, b"transfer-encoding") is not None or (_header(scope, b"content-length") or "0") != "0":
        # The body was not read and will not be: close rather than drain whatever the client still sends.
        response.headers["Connection"] = "close"
    await response(scope, receive, send)
