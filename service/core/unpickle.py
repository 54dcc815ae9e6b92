"""The placeholder unpickler: tensors are built as torch builds them, every other object stays an inert record.

torch's weights-only unpickler (``torch/_weights_only_unpickler.py``) is the model: a pure-Python loop over the
opcodes that never calls ``find_class`` of the real pickle module. It refuses any global outside its allowlist.
This one does not refuse: a global it does not know becomes a `Placeholder` (the dotted name as a string), and
``REDUCE``/``NEWOBJ``/``BUILD``/``SETITEM``/``APPEND`` on a placeholder only record their arguments. No module is
imported and nothing from the file is called; the only callables ever invoked are the fixed table `_KNOWN`
(torch's tensor rebuild functions, dtypes, storage types, a few builtin containers), exactly what torch's own
weights-only load would call.

The module has the shape of a ``pickle_module`` (``Unpickler`` and ``load``), so torch's own readers
(``torch.serialization._load`` for zip archives, ``_legacy_load`` for legacy files) use it: storages come from
the archive through torch's ``persistent_load``, memory-mapped or not, and tensors are bit-identical to what
``torch.load`` returns.

Globals that exist only to run code (`DENIED_GLOBAL_MODULES`, `DENIED_BUILTINS`) raise `DeniedGlobal`: no
framework writes them, and the raw upload is served back to people who may load it with ``weights_only=False``.
"""

from __future__ import annotations

import codecs
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from pickle import UnpicklingError
from typing import IO, Any

import torch

__all__ = [
    "DENIED_BUILTINS", "DENIED_GLOBAL_MODULES", "DeniedGlobal", "Placeholder", "Unpickler", "is_denied",
    "iter_placeholders", "load",
]

# Modules whose globals only serve to run code, read files or load more pickles. Refused, never placeholders.
DENIED_GLOBAL_MODULES: tuple[str, ...] = (
    "os", "posix", "nt", "sys", "subprocess", "_posixsubprocess", "shutil", "importlib", "runpy", "ctypes",
    "pickle", "_pickle", "marshal", "socket", "multiprocessing", "pty", "code", "codeop", "webbrowser", "signal",
    "tempfile", "asyncio", "threading", "_thread", "gc", "pdb", "pip", "setuptools", "distutils", "inspect",
    "torch.serialization", "torch.hub", "torch.jit", "torch.package", "torch.utils.cpp_extension",
    "torch._dynamo", "torch.ops", "torch._ops", "dill", "cloudpickle", "joblib",
)
DENIED_BUILTINS: frozenset[str] = frozenset({
    "eval", "exec", "compile", "__import__", "open", "breakpoint", "input", "exit", "quit", "globals", "locals",
    "vars", "setattr", "delattr", "help", "memoryview", "__loader__", "__build_class__",
})
# Encodings that `_codecs.encode` / `bytearray` may name (torch writes latin1); others would import a codec.
_ENCODINGS = frozenset({"latin1", "latin-1", "utf-8", "utf8", "ascii"})
# Generic rebuilders whose first argument is the class: the record is named after the class.
_RECONSTRUCTORS = frozenset({"copyreg._reconstructor", "copyreg.__newobj__", "copyreg.__newobj_ex__",
                             "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"})


class DeniedGlobal(UnpicklingError):
    """The pickle names a global that only serves to run code (``posix.system``, ``builtins.eval``...)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"GLOBAL {name} is never allowed")
        self.name = name


class Placeholder:
    """An inert record of an object the file describes but that is never built.

    ``name`` is the dotted name of the global (``argparse.Namespace``). A bare global reference has
    ``called=False``; after ``REDUCE`` or ``NEWOBJ`` it is an instance record with the ``args`` it would have
    been called with, the ``state`` a ``BUILD`` would have set, and the items ``SETITEM``/``APPEND`` added.
    """

    __slots__ = ("args", "called", "dictitems", "listitems", "name", "state")

    def __init__(self, name: str, *, called: bool = False, args: tuple[Any, ...] = ()) -> None:
        self.name = name
        self.called = called
        self.args = args
        self.state: Any = None
        self.dictitems: list[tuple[Any, Any]] = []
        self.listitems: list[Any] = []

    def __repr__(self) -> str:
        return f"<placeholder {self.name}{'(...)' if self.called else ''}>"


def is_denied(name: str) -> bool:
    """Whether a dotted global name is refused outright rather than kept as a placeholder."""
    module, _, qualname = name.rpartition(".")
    if module == "builtins":
        return qualname in DENIED_BUILTINS or qualname.startswith("_")
    return any(module == denied or module.startswith(denied + ".") for denied in DENIED_GLOBAL_MODULES)


def iter_placeholders(obj: object, prefix: str = "") -> Iterator[tuple[str, Placeholder]]:
    """Yield ``(dotted path, placeholder)`` for the placeholders in a tree of dicts, lists and tuples.

    Iterative and each container once, so deep or shared structures cost their number of distinct objects.
    Placeholders are not descended into. Paths use the dict keys, and list positions as numbers.
    """
    stack: list[tuple[str, object]] = [(prefix, obj)]
    seen: set[int] = set()
    while stack:
        path, item = stack.pop()
        if isinstance(item, Placeholder):
            yield path, item
            continue
        if id(item) in seen:
            continue
        if isinstance(item, dict):
            seen.add(id(item))
            entries = [(f"{path}.{k}" if path else str(k), v) for k, v in dict.items(item)]
        elif isinstance(item, (list, tuple)):
            seen.add(id(item))
            entries = [(f"{path}.{i}" if path else str(i), v) for i, v in enumerate(item)]
        else:
            continue
        stack.extend(reversed(entries))


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> Any:
    # A Parameter is rebuilt as its data tensor: hooks and Python attributes would need objects we never make.
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # torch._tensor._rebuild_from_type_v2 without the subclass: the tensor itself, or a record when the
    # rebuild function is not one we know.
    if func not in _CALLABLE or not isinstance(args, tuple) or _holds_placeholder(args):
        record = Placeholder("torch._tensor._rebuild_from_type_v2", called=True, args=(func, new_type, args))
        record.state = state
        return record
    return func(*args)


def _encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    if not isinstance(obj, str) or encoding not in _ENCODINGS or errors != "strict":
        raise UnpicklingError("_codecs.encode only rebuilds bytes from latin1/utf-8 text")
    return bytes(codecs.encode(obj, encoding))


def _bytearray(*args: Any) -> bytearray:
    if len(args) == 2 and isinstance(args[0], str) and args[1] in _ENCODINGS:
        return bytearray(args[0], args[1])
    if len(args) == 1 and isinstance(args[0], (bytes, list)):
        return bytearray(args[0])
    if not args:
        return bytearray()
    raise UnpicklingError("bytearray is only rebuilt from bytes or latin1 text")


def _known_globals() -> dict[str, Any]:
    from torch._utils import (
        _rebuild_device_tensor_from_cpu_tensor,
        _rebuild_meta_tensor_no_storage,
        _rebuild_nested_tensor,
        _rebuild_qtensor,
        _rebuild_sparse_tensor,
        _rebuild_tensor,
        _rebuild_tensor_v2,
        _rebuild_tensor_v3,
        _rebuild_wrapper_subclass,
    )

    known: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "collections.Counter": Counter,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "_codecs.encode": _encode,
        "builtins.bytearray": _bytearray,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    }
    for fn in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_qtensor, _rebuild_sparse_tensor,
               _rebuild_meta_tensor_no_storage, _rebuild_nested_tensor, _rebuild_wrapper_subclass,
               _rebuild_device_tensor_from_cpu_tensor):
        known[f"torch._utils.{fn.__name__}"] = fn
    for dtype in torch.storage._dtype_to_storage_type_map():
        known[str(dtype)] = dtype
    for dtype in torch.storage._new_dtypes():
        known[str(dtype)] = dtype
    for bits in range(1, 8):
        known[f"torch.uint{bits}"] = getattr(torch, f"uint{bits}")
        known[f"torch.int{bits}"] = getattr(torch, f"int{bits}")
    for qscheme in (torch.per_tensor_affine, torch.per_tensor_symmetric, torch.per_channel_affine,
                    torch.per_channel_symmetric, torch.per_channel_affine_float_qparams):
        known[str(qscheme)] = qscheme
    for cls in torch._tensor_classes:
        known[f"{cls.__module__}.{cls.__name__}"] = cls
    for storage in torch._storage_classes:
        name = f"{storage.__module__}.{storage.__name__}"
        if storage in (torch.storage.TypedStorage, torch.storage.UntypedStorage):
            known[name] = storage
        else:
            known[name] = torch.serialization.StorageType(storage.__name__)  # type: ignore[no-untyped-call]
    known["torch.Tensor"] = torch.Tensor
    return known


_KNOWN: dict[str, Any] = _known_globals()
# What REDUCE may call and NEWOBJ may instantiate (by identity; dtypes and storage types are not called).
_CALLABLE: frozenset[Any] = frozenset(
    v for v in _KNOWN.values() if callable(v) and not isinstance(v, (torch.dtype, torch.serialization.StorageType))
)
_NEWOBJ_CLASSES: tuple[type, ...] = (OrderedDict, Counter, set, frozenset, complex, torch.Size)
_SETITEM_TARGETS: tuple[type, ...] = (dict, OrderedDict, Counter)
_BINARY_OPS: dict[int, str] = {}


def _holds_placeholder(args: Any, depth: int = 3) -> bool:
    if isinstance(args, Placeholder):
        return True
    if depth <= 0:
        return False
    if isinstance(args, (tuple, list)):
        return any(_holds_placeholder(a, depth - 1) for a in args)
    if isinstance(args, dict):
        return any(_holds_placeholder(v, depth - 1) or _holds_placeholder(k, 0) for k, v in dict.items(args))
    return False


def _modern_name(module: str, name: str) -> tuple[str, str]:
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return module, name


class Unpickler:
    """A pickle reader that builds tensors and leaves every other object an inert `Placeholder`.

    Same interface as ``pickle.Unpickler`` for torch's readers: construct with a binary file, set
    ``persistent_load``, call `load`. Subclasses may override `find_class` (torch's reader maps storage type
    names there); it is called with the module and name and must return a known object or a `Placeholder`.
    """

    def __init__(self, file: IO[bytes], *, encoding: str = "bytes", **_: Any) -> None:
        self.encoding = encoding
        self.read = file.read
        self.readline = file.readline
        self.memo: dict[int, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Return the known object for ``module.name``, or a `Placeholder`; never imports anything."""
        full = f"{module}.{name}"
        if full in _KNOWN:
            return _KNOWN[full]
        if is_denied(full):
            raise DeniedGlobal(full)
        return Placeholder(full)

    def persistent_load(self, pid: Any) -> Any:
        raise UnpicklingError("unsupported persistent id encountered")

    def load(self) -> Any:  # noqa: C901 - one flat opcode loop, as pickle's and torch's are
        """Read one pickle and return the object tree it describes."""
        read, readline = self.read, self.readline
        memo = self.memo
        metastack: list[list[Any]] = []
        stack: list[Any] = []
        unpack = struct.unpack
        while True:
            key = read(1)
            if not key:
                raise EOFError
            op = key[0]
            if op == 0x71:  # BINPUT
                memo[read(1)[0]] = stack[-1]
            elif op == 0x68:  # BINGET
                stack.append(memo[read(1)[0]])
            elif op == 0x58:  # BINUNICODE
                (n,) = unpack("<I", read(4))
                stack.append(_text(read(n), n))
            elif op == 0x8C:  # SHORT_BINUNICODE
                n = read(1)[0]
                stack.append(_text(read(n), n))
            elif op == 0x4B:  # BININT1
                stack.append(read(1)[0])
            elif op == 0x4D:  # BININT2
                stack.append(unpack("<H", read(2))[0])
            elif op == 0x4A:  # BININT
                stack.append(unpack("<i", read(4))[0])
            elif op == 0x28:  # MARK
                metastack.append(stack)
                stack = []
            elif op == 0x74:  # TUPLE
                items = stack
                stack = metastack.pop()
                stack.append(tuple(items))
            elif op == 0x85:  # TUPLE1
                stack[-1] = (stack[-1],)
            elif op == 0x86:  # TUPLE2
                stack[-2:] = [(stack[-2], stack[-1])]
            elif op == 0x87:  # TUPLE3
                stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
            elif op == 0x7D:  # EMPTY_DICT
                stack.append({})
            elif op == 0x5D:  # EMPTY_LIST
                stack.append([])
            elif op == 0x8F:  # EMPTY_SET
                stack.append(set())
            elif op == 0x4E:  # NONE
                stack.append(None)
            elif op == 0x88:  # NEWTRUE
                stack.append(True)
            elif op == 0x89:  # NEWFALSE
                stack.append(False)
            elif op == 0x47:  # BINFLOAT
                stack.append(unpack(">d", read(8))[0])
            elif op == 0x8A:  # LONG1
                n = read(1)[0]
                stack.append(int.from_bytes(read(n), "little", signed=True))
            elif op == 0x8B:  # LONG4
                (n,) = unpack("<i", read(4))
                if n < 0:
                    raise UnpicklingError("LONG pickle has negative byte count")
                stack.append(int.from_bytes(_exact(read, n), "little", signed=True))
            elif op == 0x72:  # LONG_BINPUT
                (i,) = unpack("<I", read(4))
                memo[i] = stack[-1]
            elif op == 0x6A:  # LONG_BINGET
                (i,) = unpack("<I", read(4))
                stack.append(memo[i])
            elif op == 0x94:  # MEMOIZE
                memo[len(memo)] = stack[-1]
            elif op == 0x63:  # GLOBAL
                module = readline()[:-1].decode("utf-8")
                name = readline()[:-1].decode("utf-8")
                stack.append(self.find_class(*_modern_name(module, name)))
            elif op == 0x93:  # STACK_GLOBAL
                name, module = stack.pop(), stack.pop()
                if not isinstance(module, str) or not isinstance(name, str):
                    raise UnpicklingError("STACK_GLOBAL requires str")
                stack.append(self.find_class(*_modern_name(module, name)))
            elif op == 0x52:  # REDUCE
                args = stack.pop()
                stack[-1] = _reduce(stack[-1], args)
            elif op == 0x81:  # NEWOBJ
                args = stack.pop()
                stack[-1] = _newobj(stack[-1], args)
            elif op == 0x92:  # NEWOBJ_EX
                kwargs, args = stack.pop(), stack.pop()
                cls = stack[-1]
                if isinstance(cls, Placeholder):
                    record = Placeholder(cls.name, called=True, args=(args, kwargs))
                    stack[-1] = record
                else:
                    raise UnpicklingError(f"NEWOBJ_EX is not supported for {_describe(cls)}")
            elif op == 0x62:  # BUILD
                state = stack.pop()
                _build(stack[-1], state)
            elif op == 0x73:  # SETITEM
                value, k = stack.pop(), stack.pop()
                _setitems(stack[-1], [k, value])
            elif op == 0x75:  # SETITEMS
                items = stack
                stack = metastack.pop()
                _setitems(stack[-1], items)
            elif op == 0x61:  # APPEND
                item = stack.pop()
                _appends(stack[-1], [item])
            elif op == 0x65:  # APPENDS
                items = stack
                stack = metastack.pop()
                _appends(stack[-1], items)
            elif op == 0x90:  # ADDITEMS
                items = stack
                stack = metastack.pop()
                target = stack[-1]
                if type(target) is not set:
                    raise UnpicklingError(f"ADDITEMS needs a set, got {_describe(target)}")
                target.update(items)
            elif op == 0x91:  # FROZENSET
                items = stack
                stack = metastack.pop()
                stack.append(frozenset(items))
            elif op == 0x51:  # BINPERSID
                pid = stack.pop()
                if type(pid) is not tuple and type(pid) is not int:
                    raise UnpicklingError(f"persistent_load id must be tuple or int, but got {type(pid)}")
                kind = torch.serialization._maybe_decode_ascii(pid[0]) if isinstance(pid, tuple) and pid else None
                if kind == "module" and isinstance(pid, tuple) and len(pid) == 4:
                    # Legacy files name each pickled module's class with its source (torch compares the
                    # sources and writes patch files): the class record is all that is needed.
                    stack.append(pid[1])
                    continue
                if type(pid) is tuple and kind != "storage":
                    raise UnpicklingError("Only persistent_load of storage is allowed")
                stack.append(self.persistent_load(pid))
            elif op == 0x55:  # SHORT_BINSTRING
                n = read(1)[0]
                stack.append(self._binstring(read(n)))
            elif op == 0x54:  # BINSTRING
                (n,) = unpack("<i", read(4))
                if n < 0:
                    raise UnpicklingError("BINSTRING pickle has negative byte count")
                stack.append(self._binstring(_exact(read, n)))
            elif op == 0x43:  # SHORT_BINBYTES
                n = read(1)[0]
                stack.append(_exact(read, n))
            elif op == 0x42:  # BINBYTES
                (n,) = unpack("<I", read(4))
                stack.append(_exact(read, n))
            elif op == 0x8E:  # BINBYTES8
                (n,) = unpack("<Q", read(8))
                stack.append(_exact(read, n))
            elif op == 0x8D:  # BINUNICODE8
                (n,) = unpack("<Q", read(8))
                stack.append(_text(_exact(read, n), n))
            elif op == 0x96:  # BYTEARRAY8
                (n,) = unpack("<Q", read(8))
                stack.append(bytearray(_exact(read, n)))
            elif op == 0x30:  # POP
                if stack:
                    stack.pop()
                else:
                    stack = metastack.pop()
            elif op == 0x31:  # POP_MARK
                stack = metastack.pop()
            elif op == 0x32:  # DUP
                stack.append(stack[-1])
            elif op == 0x80:  # PROTO
                if read(1)[0] > 5:
                    raise UnpicklingError("unsupported pickle protocol")
            elif op == 0x95:  # FRAME
                read(8)
            elif op == 0x2E:  # STOP
                return stack.pop()
            else:
                # INST, OBJ, PERSID, EXT*, buffers and the text opcodes of protocol 0: torch.save never writes them.
                raise UnpicklingError(f"unsupported pickle opcode {key!r}")

    def _binstring(self, data: bytes) -> str | bytes:
        if self.encoding == "bytes":
            return data
        return data.decode(self.encoding, "strict")


def load(file: IO[bytes], *, encoding: str = "ASCII", **_: Any) -> Any:
    """Read one pickle from ``file`` with a fresh `Unpickler` (torch's legacy reader reads its headers so)."""
    return Unpickler(file, encoding=encoding).load()


def _text(data: bytes, n: int) -> str:
    if len(data) != n:
        raise EOFError
    return str(data, "utf-8", "surrogatepass")


def _exact(read: Callable[[int], bytes], n: int) -> bytes:
    data = read(n)
    if len(data) != n:
        raise EOFError
    return data


def _describe(obj: object) -> str:
    return obj.name if isinstance(obj, Placeholder) else type(obj).__name__


def _reduce(func: Any, args: Any) -> Any:
    if not isinstance(args, tuple):
        raise UnpicklingError("REDUCE arguments must be a tuple")
    if isinstance(func, Placeholder):
        if func.name in _RECONSTRUCTORS and args and isinstance(args[0], Placeholder) and not args[0].called:
            # copyreg rebuilds a class instance: record it under the class's name.
            return Placeholder(args[0].name, called=True, args=args[1:])
        return Placeholder(func.name if not func.called else f"{func.name}()", called=True, args=args)
    if not _is_known_callable(func):
        raise UnpicklingError(f"REDUCE on a {_describe(func)}, which cannot be called")
    if func is not _rebuild_from_type_v2 and _holds_placeholder(args):
        return Placeholder(_name_of(func), called=True, args=args)
    return func(*args)


def _newobj(cls: Any, args: Any) -> Any:
    if not isinstance(args, tuple):
        raise UnpicklingError("NEWOBJ arguments must be a tuple")
    if isinstance(cls, Placeholder):
        return Placeholder(cls.name, called=True, args=args)
    if cls is torch.nn.Parameter:
        return args[0] if args else torch.empty(0)
    if _is_known_callable(cls) and isinstance(cls, type) and issubclass(cls, _NEWOBJ_CLASSES):
        if _holds_placeholder(args):
            return Placeholder(_name_of(cls), called=True, args=args)
        return cls.__new__(cls, *args)
    raise UnpicklingError(f"NEWOBJ on a {_describe(cls)}, which cannot be instantiated")


def _build(inst: Any, state: Any) -> None:
    if isinstance(inst, Placeholder):
        inst.state = state if inst.state is None else (inst.state, state)
    elif type(inst) is OrderedDict:
        # As torch does: the state becomes instance attributes. Readers use dict.items(obj), never obj.items(),
        # and a state_dict may carry only `_metadata` (service.core.load refuses the rest).
        if not isinstance(state, dict):
            raise UnpicklingError("BUILD of an OrderedDict needs a dict state")
        inst.__dict__.update(state)
    elif isinstance(inst, torch.Tensor):
        if type(inst) is torch.Tensor and isinstance(state, tuple) and state and not _holds_placeholder(state):
            inst.set_(*state)  # legacy tensors: (storage, offset, size, stride)
        # else: Python attributes of a tensor (hooks, names); the data is complete without them.
    else:
        raise UnpicklingError(f"BUILD of a {_describe(inst)} is not supported")


def _setitems(target: Any, items: list[Any]) -> None:
    if len(items) % 2:
        raise UnpicklingError("SETITEMS needs key/value pairs")
    if isinstance(target, Placeholder):
        target.dictitems.extend(zip(items[::2], items[1::2], strict=True))
        return
    if type(target) not in _SETITEM_TARGETS:
        raise UnpicklingError(f"SETITEM on a {_describe(target)}")
    for i in range(0, len(items), 2):
        target[items[i]] = items[i + 1]  # the type's own __setitem__ (an OrderedDict keeps its order there)


def _appends(target: Any, items: list[Any]) -> None:
    if isinstance(target, Placeholder):
        target.listitems.extend(items)
    elif type(target) is list:
        target.extend(items)
    else:
        raise UnpicklingError(f"APPEND on a {_describe(target)}")


def _is_known_callable(func: Any) -> bool:
    try:
        return func in _CALLABLE
    except TypeError:  # unhashable
        return False


def _name_of(func: Any) -> str:
    return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', type(func).__name__)}"
