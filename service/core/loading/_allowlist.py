"""The allowlist of torch's weights-only loader: resolve ``safe_globals``, refuse dangerous modules, scope it."""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from service.errors import InvalidRequest, quote_keys

__all__ = ["GATE", "outside_allowlist", "resolve_globals", "safe_globals_hint"]

# Modules whose members are never allowlisted: an allowlisted callable is *called* by the weights-only
# unpickler (REDUCE), so e.g. `builtins.eval` or `subprocess.Popen` would turn a pickle back into code.
# torch itself blocks os, sys, posix and nt.
# This is a seatbelt for operator configuration, not a sandbox: only allowlist classes you have read.
_DENIED_MODULES = (
    "builtins", "os", "sys", "posix", "nt", "subprocess", "shutil", "importlib", "runpy", "ctypes", "pickle",
    "marshal", "socket", "multiprocessing", "pty", "code", "codeop", "webbrowser", "signal", "tempfile", "io",
    "pathlib", "asyncio", "threading", "_thread", "types", "functools", "operator", "inspect", "gc", "pdb",
    "pip", "setuptools", "distutils",
    # torch.load / torch.jit.load / torch.hub.load / torch.package would load (and run) more code.
    "torch.serialization", "torch.hub", "torch.jit", "torch.package", "torch.utils.cpp_extension",
    "torch._dynamo", "torch.ops", "torch._ops",
)
_GLOBAL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def resolve_globals(names: Sequence[str]) -> list[Any]:
    """Turn ``"module.qualname"`` strings into the objects torch's weights-only allowlist expects.

    Args:
        names: Dotted names such as ``"argparse.Namespace"``.

    Returns:
        The classes or functions, in the order given.

    Raises:
        InvalidRequest: A name is malformed, cannot be imported, is not a class or function, or lives in a
            module that is never allowed (``builtins``, ``os``, ``subprocess``, ...).
    """
    resolved: list[Any] = []
    for name in names:
        if not isinstance(name, str) or not _GLOBAL_NAME.fullmatch(name):
            raise InvalidRequest(f"safe global {name!r} is not a dotted 'module.name'")
        _refuse_denied(name, name)
        obj = _import_dotted(name)
        if obj is None or not callable(obj):
            raise InvalidRequest(f"safe global {name!r} does not name an importable class or function")
        _refuse_denied(name, getattr(obj, "__module__", None) or "")
        resolved.append(obj)
    return resolved


def safe_globals_hint(names: Sequence[str]) -> str:
    """Say whether, and how, an operator could allow the globals a refused checkpoint references.

    Args:
        names: The refused globals, as "module.qualname".

    Returns:
        A sentence to append to the error: the setting that allows them, or why some can never be allowed.
    """
    def denied(name: str) -> bool:
        return any(name == d or name.startswith(d + ".") for d in _DENIED_MODULES)

    never = sorted(n for n in names if denied(n))
    allowable = sorted(n for n in names if not denied(n))
    parts = []
    if allowable:
        listed = ", ".join(f'"{n}"' for n in allowable)
        parts.append(f"an operator who trusts them can allow them with the setting CKPT_SAFE_GLOBALS='[{listed}]'")
    if never:
        parts.append(f"{quote_keys(never)} can never be allowed (they can run code)")
    return "; ".join(parts)


def _refuse_denied(name: str, module: str) -> None:
    if any(module == denied or module.startswith(denied + ".") for denied in _DENIED_MODULES):
        raise InvalidRequest(f"safe global {name!r} is from a module that is never allowed")


def _import_dotted(name: str) -> object | None:
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


class _AllowlistGate:
    """Scope torch's safe_globals allowlist to the loads that asked for it, across threads.

    ``torch.serialization.safe_globals`` edits one process-wide set, so a load in another thread would see
    (and on exit, remove) an allowlist that was not meant for it. Loads with the same allowlist may run
    together; a load with a different one waits until they are done. New arrivals also wait while a
    different allowlist is queued, so a steady stream of one kind cannot starve the other.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: frozenset[Any] = frozenset()
        self._users = 0
        self._waiting: dict[frozenset[Any], int] = {}
        self._context = ExitStack()

    @contextmanager
    def hold(self, allowed: Sequence[Any]) -> Iterator[None]:
        key = frozenset(allowed)
        with self._cond:
            self._waiting[key] = self._waiting.get(key, 0) + 1
            while self._users and (self._active != key or self._others_waiting(key)):
                self._cond.wait()
            self._waiting[key] -= 1
            if not self._users:
                self._active = key
                if key:
                    self._context.enter_context(torch.serialization.safe_globals(list(key)))
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if not self._users:
                    self._context.close()
                    self._active = frozenset()
                    self._cond.notify_all()

    def _others_waiting(self, key: frozenset[Any]) -> bool:
        return any(count for other, count in self._waiting.items() if other != key)


GATE = _AllowlistGate()


def outside_allowlist(found: Sequence[str], allowed: Sequence[Any]) -> list[str]:
    """The globals of ``found`` that neither torch's weights-only allowlist nor ``allowed`` accepts, sorted."""
    # torch's built-in allowlist (tensor rebuild functions, dtypes, OrderedDict, ...) is private; without it
    # every ordinary checkpoint would be reported as unsafe, so read it defensively.
    try:
        from torch import _weights_only_unpickler as wou

        safe: set[str] = set(wou._get_allowed_globals().keys())
        safe.update(wou._get_user_allowed_globals().keys())  # type: ignore[no-untyped-call]
    except (ImportError, AttributeError):
        safe = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"}
    safe.update(f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}" for g in allowed)
    return sorted({name for name in found if name not in safe})

