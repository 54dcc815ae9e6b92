"""Read a torch file with torch's own readers: the placeholder unpickler by default, or the weights-only loader.

torch's readers do the archive, storage, byte-order, mmap and legacy-view work either way; only the unpickler
differs. Errors become ours: a damaged file is `CorruptCheckpoint`, a refused global `UnsafeCheckpoint` listing
every global of the file (an opcode scan finds them all; torch stops at the first).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch

from service.core import unpickle
from service.core.loading._allowlist import GATE, outside_allowlist, safe_globals_hint
from service.core.loading._scan import globals_in_file
from service.core.unpickle import DeniedGlobal, is_denied
from service.errors import CorruptCheckpoint, UnsafeCheckpoint, quote_keys

__all__ = ["read_torch_file", "short_error"]

# torch's messages: "Unsupported global: GLOBAL a.b was not ..." / "unsupported GLOBAL posix.system whose ..."
_TORCH_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL (\S+)")
_WEIGHTS_ONLY_REJECTIONS = ("GLOBAL", "allowlisted", "add_safe_globals", "unrecognized function",
                            "Unsupported operand", "persistent_load", "Can only")


def read_torch_file(path: Path, *, name: str, legacy: bool, mmap: bool, placeholders: bool,
                    allowed: Sequence[Any] = (), map_location: str = "cpu") -> object:
    """Unpickle a torch zip archive or legacy file safely and return what it holds.

    Args:
        path: The file, already vetted by its format (archive pre-checks, key count).
        name: The format's name, for error messages.
        legacy: The file is torch's legacy format (pickles in a row), else a zip archive.
        mmap: Memory-map the archive's storages (zip only).
        placeholders: Use the placeholder unpickler; False uses torch's weights-only loader with ``allowed``.
        allowed: Resolved allowlist globals for the weights-only loader.
        map_location: Where storages go (``"meta"`` reads no data).

    Returns:
        The unpickled object: dicts, lists, tensors and (with ``placeholders``) `Placeholder` records.

    Raises:
        UnsafeCheckpoint: Globals that only serve to run code, or (weights-only) globals outside the allowlist.
        CorruptCheckpoint: The file cannot be read, or bytes follow the end of a legacy file.
    """
    if placeholders:
        return _placeholder_load(path, name, legacy=legacy, mmap=mmap, map_location=map_location)
    return _torch_load(path, name, legacy=legacy, mmap=mmap, allowed=list(allowed), map_location=map_location)


def short_error(exc: BaseException) -> str:
    """The first line of an exception's message, without torch's advice around it, at most 200 characters."""
    text = str(exc)
    # torch wraps unpickler errors in long advice; the useful part follows "WeightsUnpickler error: ".
    _, sep, tail = text.partition("WeightsUnpickler error: ")
    text = tail if sep else text
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def _torch_load(path: Path, name: str, *, legacy: bool, mmap: bool, allowed: list[Any], map_location: str) -> object:
    trailing = 0
    try:
        with GATE.hold(allowed):
            if legacy:
                obj, trailing = _load_legacy(path)
            elif not str(path).endswith(".safetensors"):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            else:
                # torch.load hands any *path* ending in .safetensors to safetensors; the content said otherwise,
                # so pass an open file (which cannot be memory-mapped; the zip format reports mmapped=False).
                with open(path, "rb") as f:
                    return torch.load(f, map_location=map_location, weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(path, name, exc, allowed, legacy=legacy) from exc
    except MemoryError:
        raise
    except Exception as exc:  # torch raises RuntimeError, EOFError, struct.error, ... on damaged files
        raise CorruptCheckpoint(f"cannot read the {name} checkpoint: {short_error(exc)}") from exc
    _refuse_trailing(trailing)
    return obj


def _load_legacy(path: Path) -> tuple[object, int]:
    # An open file, so that its position after the load says where the checkpoint's bytes end.
    with open(path, "rb") as f:
        obj = torch.load(f, map_location="cpu", weights_only=True, mmap=False)
        return obj, os.fstat(f.fileno()).st_size - f.tell()


def _refuse_trailing(trailing: int) -> None:
    if trailing:
        # A legacy file ends with its last storage. Bytes after it make a polyglot (a zip appended there is
        # what zip readers would see instead), so the file means different things to different readers.
        raise CorruptCheckpoint(f"{trailing} bytes follow the end of the legacy checkpoint (a zip appended?)")


class _Unnamed:
    """A file object without ``fileno``: torch's legacy reader then skips its tar-format attempt, which would
    extract entries into a temporary directory, and reads the pickles in a row."""

    def __init__(self, f: IO[bytes]) -> None:
        self.read, self.readline, self.seek, self.tell = f.read, f.readline, f.seek, f.tell
        self.readinto = getattr(f, "readinto", None)


def _placeholder_load(path: Path, name: str, *, legacy: bool, mmap: bool, map_location: str) -> object:
    trailing = 0
    try:
        with open(path, "rb") as f:
            if legacy:
                obj = torch.serialization._legacy_load(  # type: ignore[no-untyped-call]
                    _Unnamed(f), map_location, unpickle, encoding="utf-8")
                trailing = os.fstat(f.fileno()).st_size - f.tell()
            else:
                with torch.serialization._open_zipfile_reader(f) as reader:
                    overall = None
                    if mmap:
                        size = os.fstat(f.fileno()).st_size
                        overall = torch.UntypedStorage.from_file(os.fspath(path), False, size)
                    obj = torch.serialization._load(  # type: ignore[no-untyped-call]
                        reader, map_location, unpickle, overall_storage=overall, encoding="utf-8")
    except DeniedGlobal as exc:
        names = {n for n in globals_in_file(path, legacy=legacy) if is_denied(n)} | {exc.name}
        raise UnsafeCheckpoint(
            f"the checkpoint references globals that only serve to run code: {quote_keys(names)}; they can never be "
            "allowed (no setting changes this, and no training framework writes them)",
            unsafe_globals=sorted(names),
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # damaged files: UnpicklingError, RuntimeError, EOFError, struct.error, ...
        raise CorruptCheckpoint(f"cannot read the {name} checkpoint: {short_error(exc)}") from exc
    _refuse_trailing(trailing)
    return obj


def _unpickling_error(path: Path, name: str, exc: Exception, allowed: list[Any], *, legacy: bool) -> Exception:
    message = str(exc)
    # torch stops at the first rejected global; the opcode scan lists all of them.
    names = set(outside_allowlist(globals_in_file(path, legacy=legacy), allowed))
    for found in _TORCH_GLOBAL_IN_MESSAGE.findall(message):
        found = found.rstrip(".,;:")
        names.add(found if "." in found else f"builtins.{found}")
    if names:
        return UnsafeCheckpoint(
            f"the checkpoint references globals outside the weights-only allowlist: {quote_keys(names)}; "
            + safe_globals_hint(sorted(names)),
            unsafe_globals=sorted(names),
        )
    if any(marker in message for marker in _WEIGHTS_ONLY_REJECTIONS):
        return UnsafeCheckpoint(
            f"the checkpoint's pickle uses constructs the weights-only loader refuses: {short_error(exc)}",
            unsafe_globals=[],
        )
    return CorruptCheckpoint(f"cannot read the {name} checkpoint: {short_error(exc)}")
