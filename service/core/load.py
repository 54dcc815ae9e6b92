"""Load untrusted checkpoints safely: placeholder or weights-only unpickling, zip pre-checks, one domain error each."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import pickletools
import re
import struct
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any, TypeGuard, cast

import safetensors.torch
import torch

from service.core import unpickle
from service.core.formats import (
    DEFAULT_LIMITS,
    SAFETENSORS_MAX_HEADER,
    check_archive,
    detect_format,
    is_pickle_start,
    safetensors_header_claim,
)
from service.core.keycount import check_key_count
from service.core.pthzip import Record, StorageRecords
from service.core.types import ArchiveLimits, CheckpointFormat, LoadedCheckpoint, StateDict
from service.core.unpickle import DeniedGlobal, Placeholder, is_denied, iter_placeholders
from service.errors import (
    ArchiveLimitExceeded,
    ContainerKeyError,
    CorruptCheckpoint,
    InvalidRequest,
    UnsafeCheckpoint,
    UnsupportedFormat,
    quote_keys,
)

__all__ = ["CONTAINER_KEYS", "is_module_record", "list_candidates", "load_checkpoint", "module_state_dict",
           "resolve_globals"]

# Where training scripts commonly put the state_dict inside a bigger checkpoint dict, in search order.
CONTAINER_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state", "model_state_dict", "state_dict_ema",
                                   "model_ema", "module", "net", "network", "weights", "params")

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
# torch's messages: "Unsupported global: GLOBAL a.b was not ..." / "unsupported GLOBAL posix.system whose ..."
_TORCH_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL (\S+)")
_WEIGHTS_ONLY_REJECTIONS = ("GLOBAL", "allowlisted", "add_safe_globals", "unrecognized function",
                            "Unsupported operand", "persistent_load", "Can only")
# A pickle scan only needs the opcodes; a few MiB covers data.pkl of models with ~100k tensors.
_SCAN_BYTES = 64 << 20
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def load_checkpoint(path: Path, *, mmap: bool = True, container_key: str | None = None,
                    safe_globals: Sequence[str] = (), placeholders: bool = True,
                    limits: ArchiveLimits = DEFAULT_LIMITS) -> LoadedCheckpoint:
    """Load a checkpoint file of any accepted format and find the state_dict inside it.

    The format is detected from the content. torch files are read by the placeholder unpickler
    (`service.core.unpickle`: tensors built as torch builds them, every other object an inert record, nothing
    imported or called), or with ``placeholders=False`` by torch's ``weights_only=True`` loader and the
    ``safe_globals`` allowlist (for callers that need real objects). Zip archives pass `check_archive` first and
    are memory-mapped when ``mmap``; safetensors headers are validated before safetensors reads the file.
    The state_dict is the top level when that is a dict of tensors, else the first of `CONTAINER_KEYS` (also
    one level deep, e.g. ``"model.state_dict"``) holding one; a whole pickled ``nn.Module`` gives the
    state_dict its ``state_dict()`` would return. Everything next to it, and non-tensor values inside it, are
    reported in ``extras`` (placeholders by their global's dotted name) rather than dropped silently.

    Args:
        path: The checkpoint file.
        mmap: Memory-map zip archives so tensors are paged in lazily (legacy files cannot be mapped).
        container_key: Dotted path of the state_dict inside the checkpoint; ``None`` searches for it.
        safe_globals: Extra ``"module.qualname"`` globals the allowlist loader may accept, for this load only.
        placeholders: Read pickles with the placeholder unpickler (the default); False uses torch's
            weights-only loader with the ``safe_globals`` allowlist.
        limits: Pre-check limits (keys, zip entries and sizes).

    Returns:
        The state_dict (an ``OrderedDict`` of str -> Tensor, keeping ``_metadata`` when present) and what
        was found around it.

    Raises:
        UnsafeCheckpoint: The pickle references globals that only serve to run code (or, with
            ``placeholders=False``, globals outside the allowlist), listed in ``unsafe_globals``.
        UnsupportedFormat: A TorchScript archive, or a safetensors dtype torch cannot hold.
        CorruptCheckpoint: Empty, truncated, garbage, or otherwise unreadable content.
        ArchiveLimitExceeded: The zip archive fails a pre-check.
        ContainerKeyError: ``container_key`` is absent, or no state_dict was found (the message says what
            the file looks like: an optimizer state, an RNG state, training arguments...).
        InvalidRequest: A ``safe_globals`` name cannot be resolved or is not allowed.
        OSError: The file cannot be opened.
    """
    path = Path(path)
    allowed = resolve_globals(safe_globals)
    fmt = detect_format(path)
    metadata: dict[str, str] = {}
    mmapped = False
    records: StorageRecords | None = None
    if fmt is CheckpointFormat.TORCHSCRIPT:
        raise UnsupportedFormat(
            "the file is a TorchScript archive; export a state_dict with torch.save(model.state_dict())"
        )
    if fmt is CheckpointFormat.UNKNOWN:
        raise _unknown_content_error(path, allowed)
    if fmt is CheckpointFormat.SAFETENSORS:
        obj: object
        obj, metadata = _load_safetensors(path, limits)
    else:
        if fmt is CheckpointFormat.PTH_ZIP:
            try:
                check_archive(path, limits=limits)
            except CorruptCheckpoint as exc:
                # Bytes before the archive the end record describes: junk, or other archives before it.
                raise (_archives_in_a_row(path) if "precedes" in exc.detail else None) or exc from None
        check_key_count(path, fmt, limit=limits.max_keys)  # before any per-key unpickling
        if placeholders:
            mmapped = mmap and fmt is CheckpointFormat.PTH_ZIP
            obj = _placeholder_load(path, fmt, mmap=mmapped)
        else:
            mmapped = mmap and fmt is CheckpointFormat.PTH_ZIP and not path.name.endswith(".safetensors")
            obj = _torch_load(path, fmt, mmap=mmapped, allowed=allowed)
        if mmapped:
            records = _check_storage_records(path, obj, allowed, placeholders=placeholders)
    _refuse_deepspeed_shards(obj)
    state_dict, key, extras, has_metadata = _unwrap(obj, container_key)
    return LoadedCheckpoint(state_dict=state_dict, format=fmt, container_key=key, extras=extras,
                            has_metadata=has_metadata, metadata=metadata, mmapped=mmapped, records=records,
                            candidates=list_candidates(obj), default_container_key=_default_key(obj, key,
                                                                                                 container_key))


# Candidates are looked for this deep, and this many are listed (a container of containers of state_dicts).
_CANDIDATE_DEPTH = 3
_MAX_CANDIDATES = 100


def list_candidates(obj: object) -> dict[str, int]:
    """Every state_dict a checkpoint holds, by container key, with its key count.

    ``""`` is the top level. Dicts are searched a few levels deep (``"model.ema"``); a whole pickled module
    counts as the state_dict it stands for. Values of a state_dict are not searched.

    Args:
        obj: What the unpickler returned.

    Returns:
        Dotted container key -> number of tensors, in the order found (at most 100).
    """
    out: dict[str, int] = {}
    stack: list[tuple[str, object, int]] = [("", obj, 0)]
    while stack and len(out) < _MAX_CANDIDATES:
        path, value, depth = stack.pop()
        if isinstance(value, dict) and _is_rng_state(value):
            continue
        try:
            found = _as_state_dict(value, path)
        except CorruptCheckpoint:
            found = None
        if found is not None:
            out[path] = sum(isinstance(v, torch.Tensor) for v in dict.values(found[0]))
            continue
        if isinstance(value, dict) and depth < _CANDIDATE_DEPTH:
            children = [(f"{path}.{k}" if path else k, v, depth + 1)
                        for k, v in dict.items(value) if isinstance(k, str) and isinstance(v, (dict, Placeholder))]
            stack.extend(reversed(children))
    return out


def _default_key(obj: object, chosen: str | None, requested: str | None) -> str | None:
    # Which key the default rule picks; the same as the chosen one unless the caller asked for another.
    if requested is None:
        return chosen
    try:
        return None if _as_state_dict(obj, "") is not None else _search(obj)[2]
    except (ContainerKeyError, CorruptCheckpoint):
        return None


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


_GATE = _AllowlistGate()


def _torch_load(path: Path, fmt: CheckpointFormat, *, mmap: bool, allowed: list[Any]) -> object:
    trailing = 0
    try:
        with _GATE.hold(allowed):
            if fmt is CheckpointFormat.PTH_LEGACY:
                obj, trailing = _load_legacy(path)
            elif not str(path).endswith(".safetensors"):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            else:
                # torch.load hands any *path* ending in .safetensors to safetensors; the content said otherwise,
                # so pass an open file (which cannot be memory-mapped; load_checkpoint reports mmapped=False).
                with open(path, "rb") as f:
                    return torch.load(f, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(path, fmt, exc, allowed) from exc
    except MemoryError:
        raise
    except Exception as exc:  # torch raises RuntimeError, EOFError, struct.error, ... on damaged files
        raise CorruptCheckpoint(f"cannot read the {fmt.value} checkpoint: {_short(exc)}") from exc
    if trailing:
        # A legacy file ends with its last storage. Bytes after it make a polyglot (a zip appended there is
        # what zip readers would see instead), so the file means different things to different readers.
        raise CorruptCheckpoint(f"{trailing} bytes follow the end of the legacy checkpoint (a zip appended?)")
    return obj


def _load_legacy(path: Path) -> tuple[object, int]:
    # An open file, so that its position after the load says where the checkpoint's bytes end.
    with open(path, "rb") as f:
        obj = torch.load(f, map_location="cpu", weights_only=True, mmap=False)
        return obj, os.fstat(f.fileno()).st_size - f.tell()


class _Unnamed:
    """A file object without ``fileno``: torch's legacy reader then skips its tar-format attempt, which would
    extract entries into a temporary directory, and reads the pickles in a row."""

    def __init__(self, f: IO[bytes]) -> None:
        self.read, self.readline, self.seek, self.tell = f.read, f.readline, f.seek, f.tell
        self.readinto = getattr(f, "readinto", None)


def _placeholder_load(path: Path, fmt: CheckpointFormat, *, mmap: bool, map_location: str = "cpu") -> object:
    """torch's own readers (storages, byte order, mmap, legacy views) with the placeholder unpickler."""
    trailing = 0
    try:
        with open(path, "rb") as f:
            if fmt is CheckpointFormat.PTH_LEGACY:
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
        names = set(_denied_globals_in_file(path, fmt)) | {exc.name}
        raise UnsafeCheckpoint(
            f"the checkpoint references globals that only serve to run code: {quote_keys(names)}; they can never be "
            "allowed (no setting changes this, and no training framework writes them)",
            unsafe_globals=sorted(names),
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # damaged files: UnpicklingError, RuntimeError, EOFError, struct.error, ...
        raise CorruptCheckpoint(f"cannot read the {fmt.value} checkpoint: {_short(exc)}") from exc
    if trailing:
        raise CorruptCheckpoint(f"{trailing} bytes follow the end of the legacy checkpoint (a zip appended?)")
    return obj


def _denied_globals_in_file(path: Path, fmt: CheckpointFormat) -> list[str]:
    return sorted({name for name in _globals_in_file(path, fmt) if is_denied(name)})


def _check_storage_records(path: Path, obj: object, allowed: list[Any], *,
                           placeholders: bool = False) -> StorageRecords | None:
    """Refuse storages that do not cover exactly one storage record of the archive; say which record each is.

    A memory-mapped load slices each storage out of the mapped file at its record's offset, with the byte size
    the pickle declares, and never compares that with the record's size (a plain load does): a storage longer
    than its record reads the bytes of the next entries. The storages of the mapped load are slices of one
    mapping, so their addresses, sorted, must line up with the records' offsets and sizes. Anything else
    (orphan records, exotic tensors whose storages are out of reach) is settled by a load on the meta device,
    which reads no data and tags each storage with its record offset.

    Returns:
        Where each storage's record is in the file (by the storage's address), when the mapped storages line up
        with the records one to one; otherwise None (a save then writes them from memory).
    """
    records = _storage_records(path)
    extents = sorted({(s.data_ptr(), s.nbytes()) for s in _reachable_storages(obj) if s.nbytes()})
    layout = sorted((offset, size, crc) for offset, (_, size, crc) in records.items() if size)
    if len(extents) == len(layout) and all(
        ptr - extents[0][0] == offset - layout[0][0] and nbytes == size
        for (ptr, nbytes), (offset, size, _) in zip(extents, layout, strict=True)
    ):
        return StorageRecords(path, {ptr: Record(offset, size, crc)
                                     for (ptr, _), (offset, size, crc) in zip(extents, layout, strict=True)})
    try:
        if placeholders:
            meta = _placeholder_load(path, CheckpointFormat.PTH_ZIP, mmap=False, map_location="meta")
        else:
            with _GATE.hold(allowed):
                meta = torch.load(path, map_location="meta", weights_only=True)
    except Exception:  # the real load succeeded; a failure of the meta-only load proves nothing
        return None
    for storage in _reachable_storages(meta):
        offset, nbytes = getattr(storage, "_checkpoint_offset", None), storage.nbytes()
        if not nbytes or not isinstance(offset, int):
            continue
        name, size, _ = records.get(offset, ("", -1, 0))
        if not name:
            raise CorruptCheckpoint(f"a storage of {nbytes} bytes starts at no storage record of the archive")
        if size != nbytes:
            raise CorruptCheckpoint(f"storage record {name!r} holds {size} bytes but the pickle declares {nbytes}")
    return None


def _storage_records(path: Path) -> dict[int, tuple[str, int, int]]:
    # data offset -> (name, size, CRC-32) of each "<top>/data/<key>" entry. check_archive has already refused junk
    # before the archive, so zipfile's offsets are file offsets.
    out: dict[int, tuple[str, int, int]] = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if len(parts) != 3 or parts[1] != "data":
                continue
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) < 30:
                raise CorruptCheckpoint(f"archive entry {info.filename!r} is truncated")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            out[info.header_offset + 30 + name_len + extra_len] = (info.filename, info.file_size, info.CRC)
    return out


def _reachable_storages(obj: object) -> list[torch.UntypedStorage]:
    # Iterative, and each object once: a 200k-deep or shared-reference ("billion laughs") structure costs
    # its number of distinct objects, not its depth or its expanded size.
    out: list[torch.UntypedStorage] = []
    stack: list[object] = [obj]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            if item.layout == torch.strided:
                try:
                    out.append(item.untyped_storage())
                except (RuntimeError, NotImplementedError):
                    continue
        elif isinstance(item, torch.TypedStorage):
            out.append(item._untyped_storage)
        elif isinstance(item, torch.UntypedStorage):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(dict.values(item))
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, Placeholder):
            stack.extend((item.args, item.state, item.listitems))
            stack.extend(value for pair in item.dictitems for value in pair)
    return out


def _unpickling_error(path: Path, fmt: CheckpointFormat, exc: Exception, allowed: list[Any]) -> Exception:
    message = str(exc)
    # torch stops at the first rejected global; the opcode scan lists all of them.
    names = set(_unsafe_globals_in_file(path, fmt, allowed))
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
            f"the checkpoint's pickle uses constructs the weights-only loader refuses: {_short(exc)}",
            unsafe_globals=[],
        )
    return CorruptCheckpoint(f"cannot read the {fmt.value} checkpoint: {_short(exc)}")


def _short(exc: BaseException) -> str:
    text = str(exc)
    # torch wraps unpickler errors in long advice; the useful part follows "WeightsUnpickler error: ".
    _, sep, tail = text.partition("WeightsUnpickler error: ")
    text = tail if sep else text
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def _unknown_content_error(path: Path, allowed: list[Any]) -> Exception:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(64)
        if is_pickle_start(head):
            # Never unpickled: only parsed, to say which globals it would have imported.
            found = _scan_pickle_globals(f, pickles=1, start=0)
            if any(name.startswith("torch.distributed.checkpoint.") for name in found):
                return UnsupportedFormat(f"the file is the .metadata of a torch.distributed checkpoint; {_DCP_WAY_OUT}")
            unsafe = _unsafe_globals(found, allowed)
            if unsafe:
                return UnsafeCheckpoint(
                    "the file is a plain pickle (not a torch.save checkpoint) referencing globals: "
                    f"{quote_keys(unsafe)}; " + safe_globals_hint(unsafe),
                    unsafe_globals=unsafe,
                )
            return CorruptCheckpoint("the file is a plain pickle, not a torch.save checkpoint")
    if size == 0:
        return CorruptCheckpoint("the file is empty")
    claimed = safetensors_header_claim(head)
    if claimed is not None:
        return CorruptCheckpoint(
            f"the safetensors header claims {claimed} bytes but the file has {size}"
            if claimed + 8 > size else f"the safetensors header of {claimed} bytes is too large"
        )
    if zipfile.is_zipfile(path):
        if head.startswith(b"PK\x03\x04"):
            return CorruptCheckpoint("the zip archive is not a torch.save checkpoint (no data.pkl)")
        return CorruptCheckpoint("data precedes the zip archive")
    text = _as_text(head)
    if text and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return CorruptCheckpoint(f"the file is text, not a checkpoint (starts with {text[:24]!r})")
    return CorruptCheckpoint(f"unrecognised content, not a checkpoint (starts with {head[:8].hex()})")


_DCP_WAY_OUT = ("convert the checkpoint folder with torch.distributed.checkpoint.format_utils.dcp_to_torch_save"
                "(folder, 'model.pth') and send that file")
_ZERO_WAY_OUT = ("run the zero_to_fp32.py script DeepSpeed wrote into the checkpoint folder (python zero_to_fp32.py . "
                 "pytorch_model.bin) and send its output")


def _archives_in_a_row(path: Path) -> Exception | None:
    # A torch.distributed checkpoint shard (.distcp) is torch.save archives written one after another: the file
    # opens with a torch.save archive's first entry, and the directory at its end belongs to the last archive.
    with open(path, "rb") as f:
        header = f.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            return None
        name = f.read(struct.unpack("<H", header[26:28])[0])
    if not name.endswith(b"/data.pkl"):
        return None
    return UnsupportedFormat(
        "the file holds several torch.save archives in a row (data precedes the last one), as a torch.distributed "
        f"checkpoint shard (.distcp) does; {_DCP_WAY_OUT}"
    )


def _refuse_deepspeed_shards(obj: object) -> None:
    # DeepSpeed ZeRO partitions the weights: *_optim_states.pt hold flat fp32 partitions, and with ZeRO-3 the
    # "module" of mp_rank_*_model_states.pt holds empty placeholders. Only zero_to_fp32.py can put them together.
    if not isinstance(obj, dict) or not dict.__contains__(obj, "ds_version"):
        return
    module = dict.get(obj, "module")
    tensors = [v for v in dict.values(module) if isinstance(v, torch.Tensor)] if isinstance(module, dict) else []
    if not tensors or all(t.numel() == 0 for t in tensors):
        raise UnsupportedFormat(
            f"the file is a DeepSpeed ZeRO checkpoint shard, not a model's weights; {_ZERO_WAY_OUT}")


def _as_text(head: bytes) -> str:
    # The 64-byte sniff may cut a multi-byte character in half; allow up to 3 trailing bytes of it.
    for cut in range(4):
        try:
            return head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""


def _unsafe_globals_in_file(path: Path, fmt: CheckpointFormat, allowed: list[Any]) -> list[str]:
    return _unsafe_globals(_globals_in_file(path, fmt), allowed)


def _globals_in_file(path: Path, fmt: CheckpointFormat) -> list[str]:
    """Every global the file's pickle(s) name, by an opcode scan that executes nothing; empty when unreadable."""
    try:
        if fmt is CheckpointFormat.PTH_ZIP:
            with zipfile.ZipFile(path) as zf:
                data_pkl = next(n for n in zf.namelist() if n.split("/")[1:] == ["data.pkl"])
                with zf.open(data_pkl) as stream:
                    return _scan_pickle_globals(stream, pickles=1)
        # Legacy files are pickles in a row: magic number, protocol, sys info, then the object.
        with open(path, "rb") as stream:
            return _scan_pickle_globals(stream, pickles=4)
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


def _scan_pickle_globals(stream: IO[bytes], *, pickles: int, start: int | None = None) -> list[str]:
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


def _unsafe_globals(found: Sequence[str], allowed: list[Any]) -> list[str]:
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


def _load_safetensors(path: Path, limits: ArchiveLimits) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header, metadata = _read_safetensors_header(path, limits)
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except MemoryError:
        raise
    except Exception as exc:
        raise CorruptCheckpoint(f"cannot read the safetensors file: {_short(exc)}") from exc
    # Keep the header's order (the writer's), not whatever order the reader returns.
    ordered = {name: tensors[name] for name in header if name in tensors}
    ordered.update((name, t) for name, t in tensors.items() if name not in ordered)
    return ordered, metadata


def _read_safetensors_header(path: Path, limits: ArchiveLimits) -> tuple[list[str], dict[str, str]]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = int.from_bytes(f.read(8), "little")
        if length >= SAFETENSORS_MAX_HEADER or length + 8 > size:
            raise CorruptCheckpoint(f"the safetensors header claims {length} bytes but the file has {size}")
        raw = f.read(length)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpoint(f"the safetensors header is not valid JSON: {_short(exc)}") from exc
    except RecursionError as exc:  # json's decoder recurses per nesting level
        raise CorruptCheckpoint("the safetensors header is nested too deeply") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpoint("the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptCheckpoint("the safetensors __metadata__ is not a map of strings to strings")
    if len(header) > limits.max_keys:
        raise ArchiveLimitExceeded(
            f"the safetensors file has {len(header)} tensors, more than the limit of {limits.max_keys}",
            limit=limits.max_keys,
        )
    data_len = size - 8 - length
    extents: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        extents.append(_check_safetensors_entry(name, entry, data_len))
    extents.sort()
    for (_, end, before), (begin, _, name) in zip(extents, extents[1:], strict=False):
        if begin < end:
            raise CorruptCheckpoint(f"safetensors tensors {before!r} and {name!r} overlap")
    return list(header), metadata


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Readers disagree on which duplicate wins, so a header with duplicates is refused outright.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys in the header")
    return out


def _check_safetensors_entry(name: str, entry: object, data_len: int) -> tuple[int, int, str]:
    if not isinstance(entry, dict):
        raise CorruptCheckpoint(f"safetensors entry {name!r} is not an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype_name, str):
        raise CorruptCheckpoint(f"safetensors entry {name!r} has no dtype")
    dtype = _SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
        raise UnsupportedFormat(f"safetensors entry {name!r} has unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CorruptCheckpoint(f"safetensors entry {name!r} has an invalid shape")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise CorruptCheckpoint(f"safetensors entry {name!r} has invalid data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CorruptCheckpoint(
            f"safetensors entry {name!r} has data_offsets [{begin}, {end}] outside the {data_len} data bytes"
        )
    numel = 1
    for d in shape:
        numel *= d
    if numel * dtype.itemsize != end - begin:
        raise CorruptCheckpoint(f"safetensors entry {name!r}: shape and data_offsets disagree")
    return begin, end, name


def _unwrap(obj: object, container_key: str | None) -> tuple[StateDict, str | None, dict[str, str], bool]:
    if container_key is not None:
        found, parents = _follow(obj, container_key)
        candidate = _as_state_dict(found, container_key)
        if candidate is None:
            raise ContainerKeyError(
                f"{container_key!r} holds {_looks_like(found)}, not a state_dict", container_key=container_key,
            )
        key: str | None = container_key
    else:
        candidate = _as_state_dict(obj, "")
        if candidate is not None:
            parents, key = [], None
        else:
            candidate, parents, key = _search(obj)
    found_dict, extras = candidate
    for prefix, parent, chosen in parents:
        for name, value in dict.items(parent):
            if name != chosen:
                _add_extra(extras, prefix + str(name), value)
    state_dict: OrderedDict[str, torch.Tensor] = OrderedDict()
    inner = f"{key}." if key else ""
    for name, value in dict.items(found_dict):
        if isinstance(name, str) and isinstance(value, torch.Tensor):
            # nn.Parameter -> plain Tensor sharing the same storage (no copy).
            _check_view_extent(name, value)
            state_dict[name] = value.detach() if isinstance(value, torch.nn.Parameter) else value
        else:
            _add_extra(extras, inner + str(name), value)
    metadata = _state_dict_metadata(found_dict)
    if metadata is not None:
        state_dict._metadata = metadata  # type: ignore[attr-defined]
    return state_dict, key, extras, metadata is not None


# A file can hold many placeholders (an MMEngine message hub holds hundreds); the extras list the first ones.
_MAX_EXTRAS = 1000


def _add_extra(extras: dict[str, str], path: str, value: object) -> None:
    if len(extras) >= _MAX_EXTRAS:
        return
    extras[path] = _kind(value)
    if isinstance(value, (dict, list, tuple)):
        for inner, placeholder in iter_placeholders(value, path):
            if len(extras) >= _MAX_EXTRAS:
                return
            extras[inner] = placeholder.name


def _kind(value: object) -> str:
    return value.name if isinstance(value, Placeholder) else type(value).__name__


def _state_dict_metadata(found: dict[Any, Any]) -> Any:
    # torch.load keeps a BUILD state as instance attributes of an OrderedDict; `items` or `values` there would
    # hide the real entries from any reader calling obj.items(). A state_dict carries only `_metadata` (a dict
    # of per-module dicts, as nn.Module.state_dict() writes it); anything else is refused.
    try:
        attrs: dict[str, Any] = object.__getattribute__(found, "__dict__")
    except AttributeError:
        return None
    others = sorted(str(k) for k in attrs if k != "_metadata")
    if others:
        raise CorruptCheckpoint(
            f"the state_dict carries instance attributes other than '_metadata': {quote_keys(others)}"
        )
    if "_metadata" not in attrs:
        return None
    metadata = attrs["_metadata"]
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and not _instance_attrs(v) for k, v in dict.items(metadata)
    ) or _instance_attrs(metadata):
        raise CorruptCheckpoint("the state_dict's '_metadata' is not a dict of per-module dicts")
    return metadata


def _instance_attrs(value: object) -> bool:
    try:
        return bool(object.__getattribute__(value, "__dict__"))
    except AttributeError:
        return False


def _check_view_extent(name: str, tensor: torch.Tensor) -> None:
    # A stride-0 (expanded) or overlapping view of a tiny storage can claim terabytes: hashing or saving it
    # would materialise them. torch already refuses views that reach past their storage.
    if tensor.layout != torch.strided or tensor.is_quantized:
        return
    needed = tensor.numel() * tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    if needed > held:
        raise CorruptCheckpoint(
            f"tensor {name!r} is a view of {needed} bytes over a storage of {held} bytes (expanded or overlapping)"
        )


def _as_state_dict(value: object, path: str) -> tuple[dict[Any, Any], dict[str, str]] | None:
    """The state_dict a value is or (a whole pickled nn.Module) stands for, and the extras that come with it."""
    if _is_tensor_dict(value) and not _is_rng_state(value):
        return value, {}
    if is_module_record(value):
        return module_state_dict(value, path)
    return None


def _is_tensor_dict(value: object) -> TypeGuard[dict[Any, Any]]:
    # A state_dict: str keys, at least one tensor, and no nested tensor dict (that would be a container).
    # dict.* on purpose: instance attributes of an OrderedDict (a BUILD state) must not change what is read.
    if not isinstance(value, dict) or not dict.__len__(value):
        return False
    if not all(isinstance(k, str) for k in dict.keys(value)):
        return False
    values = dict.values(value)
    tensors = sum(isinstance(v, torch.Tensor) for v in values)
    return tensors > 0 and not any(_holds_tensors(v) for v in values)


def _holds_tensors(value: object) -> bool:
    return isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in dict.values(value))


def is_module_record(value: object) -> TypeGuard[Placeholder]:
    """Whether a placeholder is a pickled ``nn.Module`` (its BUILD state has the module's own tables)."""
    if not isinstance(value, Placeholder) or not value.called or not isinstance(value.state, dict):
        return False
    return all(dict.__contains__(value.state, k) for k in ("_parameters", "_buffers", "_modules"))


# Bounds the module walk: a module tree shares sub-modules (visited again, as state_dict() does) or is cyclic.
_MAX_MODULE_VISITS = 1_000_000


def module_state_dict(root: Placeholder, path: str = "") -> tuple[OrderedDict[str, Any], dict[str, str]]:
    """What ``nn.Module.state_dict()`` returns for a pickled module tree, built from its records alone.

    Each module's own parameters, then its persistent buffers, then its children's, depth first, keys in
    the same order; ``None`` entries and ``_non_persistent_buffers_set`` members are left out. Classes outside
    ``torch.nn`` are listed in the extras (their ``_save_to_state_dict`` or hooks could differ, which cannot be
    known without running their code; strict verification catches a difference).

    Args:
        root: A placeholder for which `is_module_record` holds.
        path: Where the module is in the checkpoint (prefix of the extras' paths).

    Returns:
        The state_dict and the extras: module path -> class name for custom classes, and non-tensor entries.

    Raises:
        CorruptCheckpoint: The tree is cyclic or too large, or its tables are not dicts.
    """
    out: OrderedDict[str, Any] = OrderedDict()
    extras: dict[str, str] = {}
    stack: list[tuple[str, Placeholder]] = [("", root)]
    visits = 0
    while stack:
        prefix, module = stack.pop()
        visits += 1
        if visits > _MAX_MODULE_VISITS:
            raise CorruptCheckpoint("the pickled module tree is cyclic or has too many modules")
        where = ".".join(p for p in (path, prefix.rstrip(".")) if p)
        if not module.name.startswith("torch.nn.") and len(extras) < _MAX_EXTRAS:
            extras[where or "(module)"] = module.name
        state = module.state
        tables = [dict.get(state, name) for name in ("_parameters", "_buffers", "_modules")]
        if not all(isinstance(t, dict) for t in tables):
            raise CorruptCheckpoint(f"the pickled module {where or '(root)'!r} has malformed tables")
        params, buffers, children = cast(list[dict[Any, Any]], tables)
        non_persistent = dict.get(state, "_non_persistent_buffers_set")
        skip = non_persistent if isinstance(non_persistent, (set, frozenset)) else set()
        for table, persistent_only in ((params, False), (buffers, True)):
            for name, value in dict.items(table):
                if value is None or (persistent_only and name in skip):
                    continue
                if isinstance(value, torch.Tensor):
                    out[f"{prefix}{name}"] = value
                elif len(extras) < _MAX_EXTRAS:
                    extras[f"{where}.{name}" if where else str(name)] = _kind(value)
        for name, child in reversed(list(dict.items(children))):
            if is_module_record(child):
                stack.append((f"{prefix}{name}.", child))
            elif child is not None and len(extras) < _MAX_EXTRAS:
                extras[f"{where}.{name}" if where else str(name)] = _kind(child)
    return out, extras


ParentChain = list[tuple[str, dict[Any, Any], Any]]  # (extras prefix, mapping, key taken from it)


def _search(obj: object) -> tuple[tuple[dict[Any, Any], dict[str, str]], ParentChain, str]:
    if not isinstance(obj, dict):
        raise ContainerKeyError(f"no state_dict found: the checkpoint holds {_looks_like(obj)}")
    for key in CONTAINER_KEYS:
        value = dict.get(obj, key)
        found = _as_state_dict(value, key)
        if found is not None:
            return found, [("", obj, key)], key
        if isinstance(value, dict):
            for inner in CONTAINER_KEYS:
                nested = dict.get(value, inner)
                found = _as_state_dict(nested, f"{key}.{inner}")
                if found is not None:
                    return found, [("", obj, key), (f"{key}.", value, inner)], f"{key}.{inner}"
    keys = sorted(str(k) for k in dict.keys(obj))
    raise ContainerKeyError(
        f"no state_dict found: the checkpoint holds {_looks_like(obj)}; top-level keys: "
        f"{quote_keys(keys) or 'none'}",
        available_keys=keys,
    )


_RNG_KEYS = frozenset({"python", "numpy", "cpu", "cuda", "mps", "xpu", "npu", "torch", "random", "rng_state"})
_SCHEDULER_KEYS = frozenset({"base_lrs", "last_epoch", "_last_lr", "_step_count"})


def _is_rng_state(obj: dict[Any, Any]) -> bool:
    # transformers' rng_state.pth and similar: {"python": ..., "numpy": ..., "cpu": ByteTensor, "cuda": ...}
    keys = {str(k) for k in dict.keys(obj)}
    return bool(keys) and keys <= _RNG_KEYS and bool(keys & {"python", "numpy", "cpu", "rng_state"})


def _looks_like(obj: object) -> str:
    """A few words on what a value that holds no model state_dict looks like, for error messages."""
    if isinstance(obj, Placeholder):
        if obj.name.endswith(("TrainingArguments", "Namespace", "DictConfig", "ListConfig")):
            return f"training arguments ({obj.name}), not a model"
        return f"a {obj.name} object, not a model's weights"
    if isinstance(obj, torch.Tensor):
        return "a single tensor, not a state_dict"
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}, not a dict with a state_dict"
    keys = {str(k) for k in dict.keys(obj)}
    if {"state", "param_groups"} <= keys:
        return "an optimizer state, not a model"
    if len(keys & _SCHEDULER_KEYS) >= 2:
        return "a learning-rate scheduler state, not a model"
    if _is_rng_state(obj):
        return "an RNG state, not a model"
    if keys & {"optimizer", "optimizer_states", "optimizer_state_dict", "lr_schedulers", "scheduler"}:
        return "a training state without model weights"
    if not any(isinstance(v, (torch.Tensor, dict, Placeholder)) for v in dict.values(obj)):
        return "no tensors (training arguments or metadata?), not a model"
    return "a dict without a model state_dict"


def _follow(obj: object, dotted: str) -> tuple[object, ParentChain]:
    parents: ParentChain = []
    current, rest, prefix = obj, dotted, ""
    while True:
        if not isinstance(current, dict):
            raise ContainerKeyError(
                f"cannot look up {dotted!r}: {prefix.rstrip('.') or 'the checkpoint'} is "
                f"{_looks_like(current)}",
                container_key=dotted,
            )
        # Prefer the longest key that matches, so keys that themselves contain dots still work.
        head = rest if dict.__contains__(current, rest) else None
        if head is None:
            cut = rest.rfind(".")
            while cut > 0 and not dict.__contains__(current, rest[:cut]):
                cut = rest.rfind(".", 0, cut)
            head = rest[:cut] if cut > 0 else None
        if head is None:
            available = sorted(str(k) for k in dict.keys(current))
            raise ContainerKeyError(
                f"container key {dotted!r} not found; available keys"
                f"{' in ' + repr(prefix.rstrip('.')) if prefix else ''}: {quote_keys(available) or 'none'}",
                container_key=dotted, available_keys=available,
            )
        parents.append((prefix, current, head))
        current = dict.__getitem__(current, head)
        if head == rest:
            return current, parents
        prefix, rest = f"{prefix}{head}.", rest[len(head) + 1:]
