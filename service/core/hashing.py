"""A per-process thread pool that computes sha256 while the caller writes the same bytes.

hashlib releases the GIL for large updates, and sha256 runs at about the speed of a page-cache write, so on two
cores hashing a chunk in a helper thread while the caller writes it halves the time of write-then-hash.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

# Below this size handing a chunk to another thread costs more than it saves.
PARALLEL_MIN_BYTES = 256 << 10

_POOLS: dict[str, tuple[int, ThreadPoolExecutor]] = {}


def process_pool(name: str, workers: int = 4) -> ThreadPoolExecutor:
    """A named thread pool of this process (recreated after a fork: a child inherits the pool but not its threads)."""
    pid = os.getpid()
    pool = _POOLS.get(name)
    if pool is None or pool[0] != pid:
        pool = _POOLS[name] = (pid, ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"ckpt-{name}"))
    return pool[1]


def hashing_pool() -> ThreadPoolExecutor:
    """The process's hashing threads."""
    return process_pool("sha256")
