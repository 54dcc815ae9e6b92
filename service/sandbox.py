"""Parse untrusted uploads in a pool of worker processes, never in the API process.

The first parse of an upload (torch's weights-only unpickler, the zip reader, the safetensors header) runs in a
long-lived worker process with a per-job address-space limit and a wall-clock limit. A decompression or pickle
bomb, a hang, or a crash in native code costs one worker, which is replaced; the caller gets an
`InvalidCheckpoint` (422) that says what happened, or `Overloaded` (503) when every worker is busy.

Design notes:

- Workers come from the ``forkserver`` context: the API process has threads and is never forked. The fork
  server preloads this module (so torch) once, and a new worker starts in milliseconds instead of importing
  torch again. Numpy's OpenBLAS starts one idle thread in the fork server; OpenBLAS registers a
  ``pthread_atfork`` handler that stops its threads before each fork, so the fork itself is single-threaded.
- Results come back as JSON bytes (``Inspection.to_dict()``) over a pipe, read with ``recv_bytes``: the API
  process never unpickles anything a worker sends, so a worker that was taken over cannot attack it that way.
- The memory limit is ``RLIMIT_AS``, set per job to the worker's current size + the file size + a headroom,
  and lifted again after the job. torch maps zip checkpoints ``MAP_PRIVATE`` with ``PROT_WRITE`` and
  safetensors maps files the same way, so the file counts against the address space (and would count against
  ``RLIMIT_DATA`` just the same); a flat limit would refuse big legitimate files.
- The limits are a seatbelt against bombs, not a boundary against code execution: weights-only unpickling is
  what stops pickled code, and a worker that did run code could lift its own soft limit.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import resource
import signal
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

import torch

from service.core.budget import Job, budget_exceeded, current_job
from service.core.types import ArchiveLimits
from service.errors import (
    ArchiveLimitExceeded,
    CheckpointServiceError,
    ContainerKeyError,
    CorruptCheckpoint,
    ExpansionLimitExceeded,
    InvalidCheckpoint,
    InvalidRequest,
    Overloaded,
    UnsafeCheckpoint,
    UnsupportedFormat,
)
from service.runtime import tune_gc
from service.store.inspection import inspect_checkpoint
from service.store.types import Inspection

__all__ = ["ParserSandbox"]

log = logging.getLogger("ckpt.sandbox")

_GIB = 1 << 30
_MAX_REPLY_BYTES = 512 << 20  # a manifest of 200k tensors is ~50 MB of JSON
_STARTUP_SECONDS = 120.0  # a worker imports torch itself when the fork server did not preload it
_MAX_JOBS_PER_WORKER = 1000  # then it is replaced, so slow leaks in native code cannot pile up
# Errors a worker may report; anything else it sends is treated as a parser failure.
_REPORTABLE: dict[str, type[CheckpointServiceError]] = {
    cls.__name__: cls
    for cls in (
        InvalidCheckpoint, UnsafeCheckpoint, CorruptCheckpoint, UnsupportedFormat, ArchiveLimitExceeded,
        ExpansionLimitExceeded, ContainerKeyError, InvalidRequest,
    )
}
# torch reports a failed allocation (also a failed mmap under RLIMIT_AS) as a RuntimeError with these words.
_ALLOCATION_FAILURES = ("can't allocate memory", "Cannot allocate memory", "std::bad_alloc")


class ParserSandbox:
    """A bounded pool of parser processes; `inspect` is the store's `Inspector`.

    Workers start lazily, one at a time as jobs need them, up to `workers` for writes and `read_workers` for reads
    (see `inspect`); they are stopped by `close`, when
    the sandbox is garbage-collected, or when the API process exits (a worker exits when its pipe closes).
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        read_workers: int = 1,
        memory_headroom: int = _GIB,
        time_limit: float = 120.0,
        seconds_per_gb: float = 30.0,
        wait_seconds: float = 30.0,
        retry_after: int = 2,
        safe_globals: Sequence[str] = (),
        limits: ArchiveLimits | None = None,
    ) -> None:
        """Configure the pool; no process starts until the first `inspect`.

        Args:
            workers: Most parses at once for writes (uploads, merges).
            read_workers: Most parses at once for reads (`current_job().kind == "read"`, e.g. POST /diff), in
                processes of their own: a flood of reads never takes a worker, warm or not, a write needs.
            memory_headroom: Address space a job may use beyond the worker's size before the job and the
                file size, in bytes.
            time_limit: Wall-clock seconds a job may take, plus `seconds_per_gb` per GiB of file.
            seconds_per_gb: Extra seconds per GiB of file.
            wait_seconds: How long `inspect` waits for a free worker before raising `Overloaded`.
            retry_after: The `Retry-After` seconds put into `Overloaded`.
            safe_globals: Extra "module.qualname" globals the unpickler may accept.
            limits: Zip pre-check limits.

        Raises:
            ValueError: A count or limit is out of range.
        """
        if min(workers, read_workers) < 1 or min(memory_headroom, seconds_per_gb, wait_seconds) < 0 or time_limit <= 0:
            raise ValueError("workers must be >= 1 and the limits must not be negative")
        self.workers = workers
        self.read_workers = read_workers
        self.memory_headroom = memory_headroom
        self.time_limit = time_limit
        self.seconds_per_gb = seconds_per_gb
        self.wait_seconds = wait_seconds
        self.retry_after = retry_after
        self._job_options: dict[str, Any] = {
            "safe_globals": list(safe_globals),
            "limits": asdict(limits or ArchiveLimits()),
            "headroom": memory_headroom,
        }
        self._cond = threading.Condition()
        self._idle: dict[str, list[_Worker]] = {"read": [], "write": []}
        self._alive: set[_Worker] = set()  # idle and busy
        self._starting: dict[str, int] = {"read": 0, "write": 0}
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop_all, self._alive)

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers (for operators and tests)."""
        with self._cond:
            return sorted(w.pid for w in self._alive)

    def inspect(self, path: Path, *, container_key: str | None = None) -> Inspection:
        """Parse a checkpoint file in a worker and return its inspection.

        Args:
            path: The checkpoint file; the worker opens it by path.
            container_key: The state_dict to use inside the file; None applies the default rule.

        The parse runs as the calling thread's job (`service.core.budget.current_job`): a read takes one of
        the read workers, and the job's time budget cuts the parse short (the worker is killed and replaced).

        Returns:
            What `service.store.inspect_checkpoint` returns, rebuilt from the worker's JSON.

        Raises:
            InvalidCheckpoint: The file is not an acceptable checkpoint (any subclass, as the parser raised
                it), or the parser crashed, ran out of memory or timed out on it (`parser_failure` says which).
            InvalidRequest: A configured safe global cannot be used.
            Overloaded: Every worker stayed busy for `wait_seconds`.
            TimeBudgetExceeded: The job's time budget ran out before or during the parse.
            OSError: The file cannot be read.
        """
        size = os.stat(path).st_size
        deadline = self.time_limit + self.seconds_per_gb * size / _GIB
        current = current_job()
        kind = current.kind
        left = current.remaining()
        if left is not None and left <= 0:
            raise budget_exceeded(current)
        job = json.dumps({"path": os.fspath(path), "container_key": container_key, **self._job_options}).encode()
        while True:
            worker = self._acquire(kind)
            try:
                worker.conn.send_bytes(job)
            except OSError:
                # The worker died while idle; the file has not been looked at yet, so try another one.
                self._discard(worker)
                continue
            break
        try:
            reply = self._await_reply(worker, deadline, current)
        except BaseException:
            self._discard(worker)
            raise
        if reply.get("retire") is True:
            self._discard(worker)
        else:
            self._release(worker)
        return self._result(reply, path)

    __call__ = inspect

    def stop_workers(self) -> None:
        """Stop the current workers (busy ones are killed); a later `inspect` starts new ones.

        The app calls this when its lifespan ends: an app may be started again (tests do), so the pool stays
        usable, unlike after `close`.
        """
        with self._cond:
            workers = set(self._alive)
            self._alive.clear()
            for idle in self._idle.values():
                idle.clear()
            self._cond.notify_all()
        _stop_all(workers)

    def close(self) -> None:
        """Stop every worker (busy ones are killed). Later `inspect` calls raise `Overloaded`."""
        with self._cond:
            self._closed = True
            for idle in self._idle.values():
                idle.clear()
            self._cond.notify_all()
        self._finalizer()

    # ---- pool -----------------------------------------------------------------------------------------------

    def _acquire(self, kind: str) -> _Worker:
        end = time.monotonic() + self.wait_seconds
        cap = self.read_workers if kind == "read" else self.workers
        with self._cond:
            while True:
                if self._closed:
                    raise Overloaded("the parser sandbox is shut down", retry_after=self.retry_after)
                # Each kind has workers of its own: a read never takes a write's warm worker, nor its place.
                idle = self._idle[kind]
                while idle:
                    worker = idle.pop()
                    if worker.process.is_alive():
                        return worker
                    self._forget(worker)
                owned = self._starting[kind] + sum(1 for w in self._alive if w.kind == kind)
                if owned < cap:
                    self._starting[kind] += 1
                    break
                left = end - time.monotonic()
                if left <= 0:
                    raise Overloaded(
                        f"all {cap} checkpoint parser workers for {kind}s are busy; retry in {self.retry_after} s",
                        retry_after=self.retry_after,
                    )
                self._cond.wait(left)
        try:
            worker = _Worker.start(kind)
        except BaseException:
            with self._cond:
                self._starting[kind] -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._starting[kind] -= 1
            self._alive.add(worker)
        return worker

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            if self._closed:
                self._forget(worker)
            else:
                self._idle[worker.kind].append(worker)
            self._cond.notify_all()  # waiters of both kinds share the condition
        if self._closed:
            worker.stop()

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._cond:
            self._forget(worker)
            self._cond.notify_all()

    def _forget(self, worker: _Worker) -> None:
        self._alive.discard(worker)

    # ---- jobs -----------------------------------------------------------------------------------------------

    def _await_reply(self, worker: _Worker, deadline: float, job: Job) -> dict[str, Any]:
        left = job.remaining()
        if left is not None and left < deadline:
            # The request's budget ends first: past it the worker is killed (the caller discards it).
            if not worker.conn.poll(max(left, 0.0)):
                log.warning("parser worker %d ran past the request's time budget; killing it", worker.pid)
                raise budget_exceeded(job)
        elif not worker.conn.poll(deadline):
            log.warning("parser worker %d timed out after %.0f s; killing it", worker.pid, deadline)
            raise InvalidCheckpoint(
                f"the checkpoint parser timed out on this file after {deadline:.0f} s",
                parser_failure="timed_out",
            )
        try:
            raw = worker.conn.recv_bytes(_MAX_REPLY_BYTES)
        except (EOFError, OSError):
            raise self._crashed(worker) from None
        try:
            reply = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            reply = None
        if not isinstance(reply, dict):
            log.error("parser worker %d sent a malformed reply; killing it", worker.pid)
            raise InvalidCheckpoint("the checkpoint parser failed on this file", parser_failure="error")
        return reply

    def _crashed(self, worker: _Worker) -> InvalidCheckpoint:
        worker.process.join(5)
        code = worker.process.exitcode
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit status {code}"
        log.warning("parser worker %d crashed (%s)", worker.pid, how)
        return InvalidCheckpoint(
            f"the checkpoint parser crashed on this file ({how})", parser_failure="crashed", crash=how
        )

    def _result(self, reply: Mapping[str, Any], path: Path) -> Inspection:
        if "inspection" in reply:
            try:
                return Inspection.from_dict(reply["inspection"])
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                log.error("parser worker sent an unusable inspection: %s", exc)
                raise InvalidCheckpoint(
                    "the checkpoint parser failed on this file", parser_failure="error"
                ) from None
        failure = reply.get("failure")
        if failure == "out_of_memory":
            mib = self.memory_headroom >> 20
            raise InvalidCheckpoint(
                f"the checkpoint parser ran out of memory on this file (it may use {mib} MiB beyond the "
                "file's size)",
                parser_failure="out_of_memory",
            )
        if failure == "os_error":
            raise OSError(str(reply.get("message", "the parser could not read the file"))[:300])
        error = reply.get("error")
        if isinstance(error, dict):
            _raise_reported(error)
        # An exception the parser does not map to a domain error: on untrusted bytes it is the file's doing
        # as far as the client is concerned, but it may be our bug, so the log keeps the worker's traceback.
        log.error("parser worker failed on %s: %s", path.name, str(reply.get("traceback", reply))[:4000])
        summary = str(reply.get("exception", "unknown error"))[:200]
        raise InvalidCheckpoint(
            f"the checkpoint parser failed on this file ({summary})", parser_failure="error"
        )


def _raise_reported(error: Mapping[str, Any]) -> NoReturn:
    cls = _REPORTABLE.get(str(error.get("type")), InvalidCheckpoint)
    detail = str(error.get("detail", "invalid checkpoint"))[:1000]
    raw = error.get("extensions")
    extensions = {str(k): v for k, v in raw.items()} if isinstance(raw, dict) else {}
    if cls is UnsafeCheckpoint:
        names = extensions.get("unsafe_globals")
        names = [str(n) for n in names] if isinstance(names, list) else []
        raise UnsafeCheckpoint(detail, unsafe_globals=names)
    raise cls(detail, **extensions)


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, process: Any, conn: Connection, kind: str = "write") -> None:
        self.process = process
        self.conn = conn
        self.pid: int = process.pid
        self.kind = kind  # the kind of job it serves: "read" or "write"

    @classmethod
    def start(cls, kind: str = "write") -> _Worker:
        ctx = _context()
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        process = ctx.Process(target=_serve, args=(child_conn,), name="ckpt-parser", daemon=True)
        process.start()
        child_conn.close()  # only the worker holds its end: its death is an EOF here
        worker = cls(process, parent_conn, kind)
        try:
            if not parent_conn.poll(_STARTUP_SECONDS):
                raise OSError("no ready message")
            ready = json.loads(parent_conn.recv_bytes(1024))
            if not isinstance(ready, dict) or ready.get("ready") is not True:
                raise OSError("unexpected first message")
        except (OSError, EOFError, ValueError) as exc:
            worker.kill()
            log.error("a checkpoint parser worker did not start: %s", exc)
            raise Overloaded("the checkpoint parser could not start a worker", retry_after=5) from exc
        return worker

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()

    def stop(self) -> None:
        self.conn.close()  # the worker reads EOF and exits
        self.process.join(2)
        if self.process.is_alive():
            self.kill()


def _stop_all(workers: set[_Worker]) -> None:
    for worker in list(workers):
        worker.conn.close()
    for worker in list(workers):
        worker.process.join(2)
        if worker.process.is_alive():
            worker.kill()
    workers.clear()


_CONTEXT_LOCK = threading.Lock()
_CONTEXT: Any = None


def _context() -> Any:
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            ctx = multiprocessing.get_context("forkserver")
            # Ignored when the fork server already runs (it is per process): workers then import us at start.
            ctx.set_forkserver_preload([__name__])
            _CONTEXT = ctx
        return _CONTEXT


# ---- the worker side ----------------------------------------------------------------------------------------


def _vm_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _serve(conn: Connection) -> None:
    # A terminal's Ctrl-C reaches the whole process group; the API process decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)  # parallelism is across workers; fewer threads, less address space per job
    tune_gc(freeze=True)  # torch and the parser are imported: nothing alive now needs collecting
    if not _send(conn, {"ready": True, "pid": os.getpid()}):
        return
    start_vm = _vm_bytes()
    jobs = 0
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        job = json.loads(raw)
        reply = _run_job(job)
        jobs += 1
        # Replace a worker that grew a lot (fragmentation, native leaks) or whose state may be damaged.
        headroom = int(job.get("headroom", _GIB))
        if reply.get("retire") or jobs >= _MAX_JOBS_PER_WORKER or _vm_bytes() - start_vm > headroom:
            reply["retire"] = True
        if not _send(conn, reply) or reply.get("retire"):
            return


def _send(conn: Connection, message: Mapping[str, Any]) -> bool:
    # The API process may be gone (killed); then this worker just exits, without a traceback.
    try:
        conn.send_bytes(json.dumps(message).encode())
    except OSError:
        return False
    return True


def _run_job(job: Mapping[str, Any]) -> dict[str, Any]:
    path = Path(job["path"])
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        return {"failure": "os_error", "message": f"{type(exc).__name__}: {exc.strerror}"}
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_bytes() + size + int(job.get("headroom", _GIB))
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        inspection = inspect_checkpoint(
            path, safe_globals=tuple(job["safe_globals"]), limits=ArchiveLimits(**job["limits"]),
            container_key=job.get("container_key"),
        )
        result = inspection.to_dict()
    except MemoryError:
        return {"failure": "out_of_memory", "retire": True}
    except CheckpointServiceError as exc:
        if _allocation_failed(exc):
            return {"failure": "out_of_memory", "retire": True}
        return {"error": {"type": type(exc).__name__, "detail": exc.detail, "extensions": exc.extensions}}
    except OSError as exc:
        if _allocation_failed(exc):
            return {"failure": "out_of_memory", "retire": True}
        return {"failure": "os_error", "message": f"{type(exc).__name__}: {exc.strerror}"}
    except Exception as exc:  # a parser bug or an exotic failure: reported, and this worker is replaced
        import traceback

        return {
            "failure": "error",
            "exception": f"{type(exc).__name__}: {str(exc)[:150]}",
            "traceback": traceback.format_exc()[-4000:],
            "retire": True,
        }
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return {"inspection": result}


def _allocation_failed(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or any(m in str(current) for m in _ALLOCATION_FAILURES):
            return True
        current = current.__cause__ or current.__context__
    return False
