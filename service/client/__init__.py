"""HTTP client and `ckpt` CLI of the checkpoint service. Imports no torch.

The names below load on first use (PEP 562), so `ckpt --help` does not pay for httpx and pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.client.client import (
        DEFAULT_URL,
        CheckpointClient,
        DeleteResult,
        ImportResult,
        Progress,
        PullResult,
        PushResult,
        RetryPolicy,
        ShardsResult,
        Source,
        checkpoint_files,
        sha256_file,
    )
    from service.client.errors import (
        AuthError,
        BadRequestError,
        ClientError,
        ConflictError,
        IntegrityError,
        NotFoundError,
        OverloadedError,
        PayloadTooLargeError,
        ServiceError,
        StorageFullError,
        TransportError,
        UnprocessableError,
        UnsafeCheckpointError,
        VerificationError,
    )

__all__ = [
    "DEFAULT_URL",
    "AuthError",
    "BadRequestError",
    "CheckpointClient",
    "ClientError",
    "ConflictError",
    "DeleteResult",
    "ImportResult",
    "IntegrityError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "Progress",
    "PullResult",
    "PushResult",
    "RetryPolicy",
    "ServiceError",
    "ShardsResult",
    "Source",
    "StorageFullError",
    "TransportError",
    "UnprocessableError",
    "UnsafeCheckpointError",
    "VerificationError",
    "checkpoint_files",
    "sha256_file",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = "service.client.errors" if name.endswith("Error") else "service.client.client"
    return getattr(importlib.import_module(module), name)
