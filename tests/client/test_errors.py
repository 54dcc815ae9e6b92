"""Problem documents become typed exceptions."""

from __future__ import annotations

import pytest

from service.client.errors import (
    AuthError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ServiceError,
    StorageFullError,
    UnprocessableError,
    UnsafeCheckpointError,
    VerificationError,
    error_from_problem,
)


@pytest.mark.parametrize(("status", "cls"), [
    (400, BadRequestError), (401, AuthError), (403, AuthError), (404, NotFoundError), (409, ConflictError),
    (413, PayloadTooLargeError), (422, UnprocessableError), (503, OverloadedError), (507, StorageFullError),
    (418, ServiceError), (500, ServiceError),
])
def test_status_picks_the_class(status: int, cls: type[ServiceError]) -> None:
    err = error_from_problem(status, {"title": "T", "status": status, "detail": "d"})
    assert type(err) is cls
    assert (err.status, err.title, err.detail) == (status, "T", "d")
    assert str(err) == f"{status} T: d"


def test_verification_by_type_and_by_fields() -> None:
    problem = {"type": "urn:ckpt:problem:verification-failed", "title": "Verification failed", "status": 422,
               "detail": "x", "missing_keys": ["b", "a"], "unexpected_keys": ["z"], "report": {"ok": False}}
    err = error_from_problem(422, problem)
    assert isinstance(err, VerificationError)
    assert err.missing_keys == ["b", "a"] and err.unexpected_keys == ["z"] and err.report == {"ok": False}
    assert err.extensions["missing_keys"] == ["b", "a"]
    untyped = error_from_problem(422, {"title": "t", "missing_keys": ["k"]})
    assert isinstance(untyped, VerificationError) and untyped.unexpected_keys == []


def test_unsafe_checkpoint() -> None:
    err = error_from_problem(422, {"type": "urn:ckpt:problem:unsafe-checkpoint", "title": "Unsafe checkpoint",
                                   "unsafe_globals": ["os.system"]})
    assert isinstance(err, UnsafeCheckpointError) and err.unsafe_globals == ["os.system"]


def test_overloaded_header_wins_over_body() -> None:
    err = error_from_problem(503, {"title": "busy", "retry_after": 9}, retry_after=2)
    assert isinstance(err, OverloadedError) and err.retry_after == 2.0
    from_body = error_from_problem(503, {"title": "busy", "retry_after": 9})
    assert isinstance(from_body, OverloadedError) and from_body.retry_after == 9.0


def test_missing_title_uses_the_status_phrase() -> None:
    err = error_from_problem(404, {})
    assert err.title == "Not Found" and err.detail == "" and str(err) == "404 Not Found"
