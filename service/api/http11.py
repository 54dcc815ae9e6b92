"""The HTTP/1.1 protocol `ckpt serve` runs: uvicorn's h11 implementation, with a larger receive window.

uvicorn pauses reading a request body once 64 KiB are buffered and resumes when the app asks for more, so a
1 GB upload goes through ~16k pause/resume cycles (epoll updates, event-loop turns, small body pieces). A 1 MiB
window cut a 1 GB upload from 1.88 s to 1.55 s here (curl, 5 rounds each). The window bounds what one
connection buffers, so it stays small enough for many concurrent uploads.

uvicorn reads the limit from a module constant; there is no setting for it. The constant is set when uvicorn
imports this protocol (`http="service.api.http11:H11Protocol"`), which happens in every worker process. If a
uvicorn release drops the constant, `tests/api/test_http11.py` fails rather than the tuning silently vanishing.
"""

from __future__ import annotations

from uvicorn.protocols.http import h11_impl

RECEIVE_WINDOW_BYTES = 1 << 20

h11_impl.HIGH_WATER_LIMIT = RECEIVE_WINDOW_BYTES  # type: ignore[attr-defined]
H11Protocol = h11_impl.H11Protocol

__all__ = ["H11Protocol", "RECEIVE_WINDOW_BYTES"]
