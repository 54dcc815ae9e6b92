"""A per-process thread pool that computes sha256 while the caller writes the same bytes.

hashlib releases the GIL for large updates, and sha256 runs at about the speed of a page-cache write, so on two
cores hashing a chunk in a helper thread while the caller writes it halves the time of write-then-hash.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

# Below this size handing a chunk to another thread costs more than it saves.
PARALLEL_MIN_BYTES = 256 << 10

_POOL: tuple[int, ThreadPoolExecutor] | None = None


def hashing_pool() -> ThreadPoolExecutor:
    """The process's hashing threads (recreated after a fork: a child inherits the pool but not its threads)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=4, thread_name_prefix="ckpt-sha256"))
    return _POOL[1]
