"""Name the globals a pickle references by parsing its opcodes (``pickletools.genops``); nothing is executed."""

from __future__ import annotations

import pickletools
import struct
import zipfile
from pathlib import Path
from typing import IO, cast

__all__ = ["globals_in_file", "scan_pickle_globals"]

# A pickle scan only needs the opcodes; a few MiB covers data.pkl of models with ~100k tensors.
_SCAN_BYTES = 64 << 20


def globals_in_file(path: Path, *, legacy: bool) -> list[str]:
    """Every global a torch file's pickle(s) name, by an opcode scan that executes nothing; empty when unreadable.

    Args:
        path: A torch zip archive (its ``data.pkl`` is scanned) or, with ``legacy``, a legacy file.
        legacy: The file is torch's legacy format: pickles in a row.

    Returns:
        The dotted names, in the order first seen, each once.
    """
    try:
        if not legacy:
            with zipfile.ZipFile(path) as zf:
                data_pkl = next(n for n in zf.namelist() if n.split("/")[1:] == ["data.pkl"])
                with zf.open(data_pkl) as stream:
                    return scan_pickle_globals(stream, pickles=1)
        # Legacy files are pickles in a row: magic number, protocol, sys info, then the object.
        with open(path, "rb") as stream:
            return scan_pickle_globals(stream, pickles=4)
    except (OSError, zipfile.BadZipFile, StopIteration, ValueError):
        return []


class _ScanLimit(Exception):
    pass


class _CappedReader:
    def __init__(self, stream: IO[bytes], cap: int) -> None:
        self._stream = stream
        self._left = cap

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            raise _ScanLimit
        data = self._stream.read(n)
        self._left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._stream.readline(self._left + 1)
        self._left -= len(line)
        if self._left < 0:
            raise _ScanLimit
        return line


def scan_pickle_globals(stream: IO[bytes], *, pickles: int, start: int | None = None) -> list[str]:
    """Every GLOBAL / STACK_GLOBAL name in the next ``pickles`` pickles, parsed and never executed."""
    if start is not None:
        stream.seek(start)
    reader = _CappedReader(stream, _SCAN_BYTES)
    found: list[str] = []
    for _ in range(pickles):
        recent: list[object] = []  # what the last opcodes pushed (strings, else None)
        memo: dict[int, object] = {}
        try:
            for op, arg, _pos in pickletools.genops(cast(IO[bytes], reader)):
                name = op.name
                if name == "GLOBAL" and isinstance(arg, str):
                    module, _, qualname = arg.partition(" ")
                    found.append(_modern_name(module, qualname))
                    recent.append(None)
                elif name == "STACK_GLOBAL":
                    if len(recent) >= 2 and isinstance(recent[-2], str) and isinstance(recent[-1], str):
                        found.append(_modern_name(recent[-2], recent[-1]))
                    recent.append(None)
                elif name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT") and isinstance(arg, int):
                    memo[arg] = recent[-1] if recent else None
                elif name in ("GET", "BINGET", "LONG_BINGET") and isinstance(arg, int):
                    recent.append(memo.get(arg))
                elif isinstance(arg, str) and ("UNICODE" in name or "STRING" in name):
                    recent.append(arg)
                elif op.stack_after:
                    recent.append(None)
                del recent[:-2]
        except (_ScanLimit, ValueError, EOFError, struct.error, UnicodeDecodeError):
            break
    return list(dict.fromkeys(found))


def _modern_name(module: str, qualname: str) -> str:
    # Protocol-2 pickles spell Python 3 names the Python 2 way (`__builtin__`); map them back as
    # pickle and torch's weights-only unpickler do.
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    if (module, qualname) in NAME_MAPPING:
        module, qualname = NAME_MAPPING[(module, qualname)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{qualname}"

