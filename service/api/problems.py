"""The one error -> HTTP table, and RFC 9457 problem+json rendering for every error the API returns."""

from __future__ import annotations

import json
import logging
import math
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors as e

PROBLEM_MEDIA_TYPE = "application/problem+json"
log = logging.getLogger("ckpt.service")

# Most specific class first: the first isinstance match wins.
ERROR_STATUS: tuple[tuple[type[e.CheckpointServiceError], int], ...] = (
    (e.RequestTimeout, 408),
    (e.DigestMismatch, 400),
    (e.InvalidReference, 400),
    (e.InvalidRequest, 400),
    (e.Unauthorized, 401),
    (e.Forbidden, 403),
    (e.SourceNotAllowed, 403),
    (e.ArtifactNotFound, 404),
    (e.NameNotFound, 404),
    (e.ArchitectureNotFound, 404),
    (e.SourceNotFound, 404),
    (e.ArtifactInUse, 409),
    (e.AmbiguousReference, 409),
    (e.ArchitectureConflict, 409),
    (e.PayloadTooLarge, 413),
    (e.InvalidCheckpoint, 422),  # unsafe, corrupt, unsupported, limits, container key
    (e.PrefixCollision, 422),
    (e.IncompleteTrained, 422),  # require_complete: the merge would fill parameters from the original
    (e.InputsSwapped, 422),  # both swap signs, without allow_swapped
    (e.VerificationFailed, 422),
    (e.InvalidArchitecture, 422),
    (e.SourceUnavailable, 502),  # the object store, the service's upstream, failed
    (e.Overloaded, 503),
    (e.TimeBudgetExceeded, 422),  # the input made the work too long: retrying the same request will not help
    (e.StorageFull, 507),
)


def status_for(exc: e.CheckpointServiceError) -> int:
    for cls, status in ERROR_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def _slug(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


class ProblemJSONResponse(JSONResponse):
    """JSON that cannot fail to render: an error about a hostile input must never become a 500 of its own."""

    media_type = PROBLEM_MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except (UnicodeEncodeError, ValueError, TypeError):
            # Lone surrogates (keys of a crafted pickle) cannot be encoded; NaN is not JSON.
            return json.dumps(json_safe(content), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_safe(value: Any) -> Any:
    """A copy of `value` that JSON can always encode: lone surrogates escaped, NaN and infinities as null."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int):
        return value
    return json_safe(str(value))


def problem_response(
    request: Request | None,
    *,
    status: int,
    title: str,
    detail: str | None,
    type_: str = "about:blank",
    extensions: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Render one problem document."""
    body: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    if request is not None:
        body["instance"] = request.url.path
    try:
        body.update(jsonable_encoder(extensions or {}))
    except (TypeError, ValueError):
        body.update(json_safe(extensions or {}))
    return ProblemJSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def error_response(request: Request | None, exc: e.CheckpointServiceError) -> JSONResponse:
    status = status_for(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, e.Overloaded):
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, e.Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="ckpt"'
    return problem_response(
        request,
        status=status,
        title=exc.title,
        detail=exc.detail,
        type_=f"urn:ckpt:problem:{_slug(type(exc).__name__)}",
        extensions=exc.extensions,
        headers=headers or None,
    )


async def _domain_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.CheckpointServiceError)
    return error_response(request, exc)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errs = [
        {
            "loc": [str(p) for p in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        for err in exc.errors()
    ]
    fields = ", ".join(repr(".".join(err["loc"])) for err in errs[:5])
    return problem_response(
        request,
        status=422,
        title="Request validation failed",
        detail=f"invalid request fields: {fields}" if fields else "invalid request",
        type_="urn:ckpt:problem:request-validation",
        extensions={"errors": errs},
    )


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    try:
        title = HTTPStatus(exc.status_code).phrase
    except ValueError:
        title = "Error"
    detail = exc.detail if isinstance(exc.detail, str) else title
    return problem_response(
        request,
        status=exc.status_code,
        title=title,
        detail=detail,
        headers=dict(exc.headers) if exc.headers else None,
    )


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    # Never leak a traceback to a user; the server log keeps it.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        request,
        status=500,
        title="Internal Server Error",
        detail=f"unexpected {type(exc).__name__}; see the server log",
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Map domain errors, validation errors and HTTP errors to problem+json, in one place."""
    app.add_exception_handler(e.CheckpointServiceError, _domain_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unhandled)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for the given error statuses, all problem+json."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    return out
