"""`ckpt serve`'s protocol: uvicorn's h11 with a 1 MiB receive window, and the same behaviour otherwise."""

from __future__ import annotations

import uvicorn.protocols.http.h11_impl as h11_impl

from service.api import http11


def test_the_window_is_set_on_the_constant_uvicorn_reads() -> None:
    # uvicorn's h11 protocol compares its buffered body with this module global before pausing the socket.
    import inspect

    assert "HIGH_WATER_LIMIT" in inspect.getsource(h11_impl.H11Protocol.handle_events)
    assert h11_impl.HIGH_WATER_LIMIT == http11.RECEIVE_WINDOW_BYTES == 1 << 20
    assert http11.H11Protocol is h11_impl.H11Protocol
