"""Errors the client raises. They hang under the package's one root, so `except CheckpointServiceError`
catches a failure whether it happened in-process or behind HTTP.

    CheckpointServiceError (service.errors)
    └── ClientError                    anything the client raises on purpose
        ├── TransportError             the service could not be reached (after the retries)
        ├── IntegrityError             downloaded bytes do not hash to the artifact id (`expected`, `actual`)
        └── ServiceError               the service answered with an error status (`status`, `problem`,
            │                          `title`, `detail`)
            ├── BadRequestError        400: invalid reference, option or digest mismatch
            ├── AuthError              401 (no or unknown token) and 403 (a read token used for a write, an
            │                          import outside the service's allowed prefixes)
            ├── NotFoundError          404: no such artifact, name or architecture
            ├── ConflictError          409: names still point to the artifact, architecture exists
            ├── PayloadTooLargeError   413 (`limit`)
            ├── UnprocessableError     422: a checkpoint or request the service cannot use
            │   ├── VerificationError      strict verification failed (`missing_keys`, `unexpected_keys`,
            │   │                          `report`), or a merge check refused the inputs (`filled_keys`, `keys`)
            │   └── UnsafeCheckpointError  the pickle references globals outside the allowlist
            │                              (`unsafe_globals`)
            ├── OverloadedError        503 (`retry_after`, seconds)
            └── StorageFullError       507
            (a 502, the service's object store failing an import, is a plain ServiceError)

`ServiceError.problem` is the RFC 9457 problem document exactly as the service sent it.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from service.errors import CheckpointServiceError


class ClientError(CheckpointServiceError):
    """Base of every error the client raises on purpose."""

    title = "Client error"


class TransportError(ClientError):
    """The service could not be reached, or the connection broke, on every attempt."""

    title = "Service unreachable"


class IntegrityError(ClientError):
    """A download does not hash to the artifact id the service announced; nothing was written."""

    title = "Download integrity error"

    def __init__(self, detail: str, *, expected: str, actual: str) -> None:
        super().__init__(detail, expected=expected, actual=actual)
        self.expected = expected
        self.actual = actual


class ServiceError(ClientError):
    """The service answered with an error status; `problem` holds its problem document."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        title = str(problem.get("title") or _phrase(status))
        detail = problem.get("detail")
        message = f"{status} {title}: {detail}" if detail else f"{status} {title}"
        extensions = {k: v for k, v in problem.items()
                      if k not in ("type", "title", "status", "detail", "instance")}
        super().__init__(message, **extensions)
        self.status = status
        self.problem = problem
        self.title = title  # the instance's title shadows the class attribute on purpose
        self.detail = str(detail) if detail is not None else ""
        self.type = str(problem.get("type", "about:blank"))


class BadRequestError(ServiceError):
    """400: an invalid reference or option, or the uploaded bytes do not match the declared sha256."""


class AuthError(ServiceError):
    """401 or 403: no token, an unknown token, a read token used for a write, or an import the service refuses."""


class NotFoundError(ServiceError):
    """404: no such artifact, name or architecture."""


class ConflictError(ServiceError):
    """409: names still point to the artifact, or the architecture exists or cannot be removed."""


class PayloadTooLargeError(ServiceError):
    """413: the upload is over the service's limit (`limit`, bytes)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(status, problem)
        self.limit: int | None = problem.get("limit")


class UnprocessableError(ServiceError):
    """422: the checkpoint or the request cannot be used (corrupt, unsupported, invalid fields, ...)."""


class VerificationError(UnprocessableError):
    """422: the merged state_dict does not load strictly into the architecture; nothing was stored."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(status, problem)
        self.missing_keys: list[str] = list(problem.get("missing_keys") or [])
        self.unexpected_keys: list[str] = list(problem.get("unexpected_keys") or [])
        self.report: dict[str, Any] = dict(problem.get("report") or {})


class UnsafeCheckpointError(UnprocessableError):
    """422: the pickle references globals outside the allowlist (`unsafe_globals`)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(status, problem)
        self.unsafe_globals: list[str] = list(problem.get("unsafe_globals") or [])


class OverloadedError(ServiceError):
    """503: the service's work pool is full; try again after `retry_after` seconds."""

    def __init__(self, status: int, problem: dict[str, Any], *, retry_after: float | None = None) -> None:
        super().__init__(status, problem)
        value = retry_after if retry_after is not None else problem.get("retry_after")
        self.retry_after: float | None = float(value) if value is not None else None


class StorageFullError(ServiceError):
    """507: the service's disk is full."""


_BY_STATUS: dict[int, type[ServiceError]] = {
    400: BadRequestError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableError,
    503: OverloadedError,
    507: StorageFullError,
}

# Problem `type` URNs (service.api.problems slugs the domain exception's class name) with a richer class.
_BY_TYPE: dict[str, type[ServiceError]] = {
    "urn:ckpt:problem:verification-failed": VerificationError,
    "urn:ckpt:problem:frozen-part-changed": VerificationError,
    "urn:ckpt:problem:incomplete-trained": VerificationError,
    "urn:ckpt:problem:inputs-swapped": VerificationError,
    "urn:ckpt:problem:unsafe-checkpoint": UnsafeCheckpointError,
}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_from_problem(
    status: int, problem: dict[str, Any], *, retry_after: float | None = None
) -> ServiceError:
    """Build the typed exception for an error response.

    Args:
        status: The HTTP status code.
        problem: The problem document (or a stand-in built from a non-JSON body).
        retry_after: The parsed Retry-After header, if any.

    Returns:
        The most specific `ServiceError` subclass for the status and the problem type.
    """
    cls = _BY_TYPE.get(str(problem.get("type", "")))
    if cls is None and status == 422:
        # Older or proxied services may not send our type URNs; the typed fields still say what happened.
        if any(k in problem for k in ("missing_keys", "unexpected_keys", "changed_keys", "filled_keys")):
            cls = VerificationError
        elif "unsafe_globals" in problem:
            cls = UnsafeCheckpointError
    if cls is None:
        cls = _BY_STATUS.get(status, ServiceError)
    if cls is OverloadedError:
        return OverloadedError(status, problem, retry_after=retry_after)
    return cls(status, problem)
