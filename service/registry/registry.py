"""The architecture registry: names -> model factories or code-free specs.

Architectures come from four sources, in this order of precedence when two of them use one name:

1. ``builtin``: :data:`service.registry.builtins.BUILTINS`;
2. ``config``: ``[architectures.NAME]`` tables of the operator's TOML file (``factory = "module:callable"``,
   optional ``kwargs`` table and ``description``);
3. ``entrypoint``: the ``ckpt_service.architectures`` entry-point group of installed distributions;
4. ``spec``: code-free specs (key -> shape, dtype) registered at run time and persisted in the store's metadata
   index (a `SpecStore`, shared by every replica of the service), or as one JSON file per name in a directory.

Security: sources 1-3 import and call Python code. That code comes from the server's own installation and
configuration, which the operator controls and trusts; nothing here ever imports a name taken from request
input. Requests can only register code-free specs (source 4), which are plain data.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import json
import os
import re
import sys
import threading
import tomllib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from service.core.verify import ArchitectureSpec, build_meta_module, spec_from_module, valid_dtype_names
from service.errors import (
    ArchitectureConflict,
    ArchitectureNotFound,
    CheckpointServiceError,
    InvalidArchitecture,
    quote_keys,
)
from service.registry.builtins import BUILTINS

ArchitectureSource = Literal["builtin", "config", "entrypoint", "spec"]
DEFAULT_ENTRY_POINT_GROUP = "ckpt_service.architectures"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SPEC_SUFFIX = ".json"
_SPEC_FORMAT = 1
_CONFIG_FIELDS = frozenset({"factory", "kwargs", "description"})
_MAX_ERROR_CHARS = 300
_MAX_DESCRIPTION_CHARS = 1000


@dataclass(frozen=True)
class Architecture:
    """One registered architecture.

    Attributes:
        name: The registry name.
        source: Where it came from: ``builtin``, ``config``, ``entrypoint`` or ``spec``.
        factory: Builds the model (no arguments), or ``None`` for a code-free spec.
        spec: Expected keys with shapes and dtypes. For factories it is computed once on the ``meta``
            device, so no weights are allocated.
        description: Free text, or ``None``.
    """

    name: str
    source: ArchitectureSource
    factory: Callable[[], nn.Module] | None
    spec: ArchitectureSpec
    description: str | None = None

    def verify_target(self) -> Callable[[], nn.Module] | ArchitectureSpec:
        """Return what ``verify_state_dict`` takes: the factory if there is one, else the spec."""
        return self.factory if self.factory is not None else self.spec

    def to_dict(self, *, with_keys: bool = False) -> dict[str, Any]:
        """Return a JSON-serialisable summary.

        Args:
            with_keys: Also list every expected key with its shape and dtype.

        Returns:
            ``name``, ``source``, ``key_count``, ``schema_fingerprint``, ``description`` and, with
            ``with_keys``, ``keys``: ``{key: {"shape": [...], "dtype": "float32"}}``.
        """
        out: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "key_count": len(self.spec.keys),
            "schema_fingerprint": self.spec.schema_fingerprint,
            "description": self.description,
        }
        if with_keys:
            out["keys"] = _keys_to_json(self.spec)
        return out


@dataclass(frozen=True)
class RegistryIssue:
    """An architecture that could not be loaded; the others keep working."""

    name: str
    source: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "source": self.source, "error": self.error}


class SpecStore(Protocol):
    """Where registered specs persist (the store's `MetadataIndex` is one): documents by name, with a revision
    that changes on every write so that a reader re-parses a spec only when it changed."""

    def spec_revisions(self) -> dict[str, str]: ...

    def spec_revision(self, name: str) -> str | None: ...

    def read_spec(self, name: str) -> tuple[str, dict[str, Any]] | None: ...

    def insert_spec(self, name: str, document: Mapping[str, Any]) -> bool: ...

    def delete_spec(self, name: str) -> bool: ...


@dataclass(frozen=True)
class _SpecEntry:
    architecture: Architecture
    # (inode, mtime_ns, size) of the file, or the SpecStore's revision; None when kept in memory
    stamp: tuple[int, int, int] | str | None


class ArchitectureRegistry:
    """Architectures by name, from built-ins, a TOML config, entry points and persisted specs.

    Safe to share between threads. Several processes may share ``specs_dir``: a name another process
    registered or deleted is noticed on the next ``get`` (one ``stat``) or ``list`` (a directory scan).

    Factories from the config file and entry points are imported and called here. Importing them executes
    code from the server's own configuration and installed packages, which are trusted and operator
    controlled; names from request input are never imported.
    """

    def __init__(
        self,
        *,
        specs_dir: Path | None = None,
        config_path: Path | None = None,
        entry_point_group: str = DEFAULT_ENTRY_POINT_GROUP,
        include_builtins: bool = True,
        spec_store: SpecStore | None = None,
    ) -> None:
        """Create an empty registry; :meth:`load` (or the first lookup) fills it.

        Args:
            specs_dir: Directory of persisted code-free specs (created if missing). ``None`` keeps
                registered specs in memory only.
            config_path: TOML file with ``[architectures.NAME]`` tables, or ``None``.
            entry_point_group: The entry-point group to scan.
            include_builtins: Register :data:`~service.registry.builtins.BUILTINS`.
            spec_store: Persist specs here instead (the service passes its store's index); wins over
                ``specs_dir``.
        """
        self._spec_store = spec_store
        self._specs_dir = specs_dir if spec_store is None else None
        self._config_path = config_path
        self._entry_point_group = entry_point_group
        self._include_builtins = include_builtins
        self._lock = threading.RLock()
        self._loaded = False
        self._static: dict[str, Architecture] = {}  # builtin, config and entry-point architectures
        self._static_issues: list[RegistryIssue] = []
        self._specs: dict[str, _SpecEntry] = {}
        # Broken or shadowed spec files, by file name, with the stat stamp they were reported for, so that
        # a re-scan re-reads a file only when it changed.
        self._spec_issues: dict[str, tuple[tuple[int, int, int] | str, RegistryIssue]] = {}

    def load(self) -> list[RegistryIssue]:
        """(Re)load every source.

        A factory that cannot be imported or built, or does not return an ``nn.Module``, a missing or
        invalid config file, a bad spec file and a name used by two sources are each reported as one
        :class:`RegistryIssue`; everything else keeps working. The first source wins a name conflict, in the
        order builtin, config, entrypoint, spec.

        Returns:
            The issues found (also available as :attr:`issues`).
        """
        with self._lock:
            self._static = {}
            self._static_issues = []
            self._specs = {}
            self._spec_issues = {}
            if self._include_builtins:
                self._load_builtins()
            if self._config_path is not None:
                self._load_config(self._config_path)
            self._load_entry_points()
            if self._specs_dir is not None:
                self._specs_dir.mkdir(parents=True, exist_ok=True)
            self._scan_specs()
            self._loaded = True
            return self.issues

    @property
    def issues(self) -> list[RegistryIssue]:
        """Problems found by the last load or spec scan, sorted by source and name."""
        with self._lock:
            found = [*self._static_issues, *(issue for _, issue in self._spec_issues.values())]
        return sorted(found, key=lambda i: (i.source, i.name, i.error))

    def get(self, name: str) -> Architecture:
        """Look up an architecture by name.

        Args:
            name: The registry name.

        Returns:
            The architecture.

        Raises:
            ArchitectureNotFound: No source defines ``name``.
        """
        with self._lock:
            self._ensure_loaded()
            found = self._static.get(name)
            if found is not None:
                return found
            if _NAME_RE.fullmatch(name):
                self._refresh_spec(name)
                entry = self._specs.get(name)
                if entry is not None:
                    return entry.architecture
            raise self._not_found(name)

    def list(self) -> list[Architecture]:
        """Return every architecture, sorted by name (re-scanning the shared specs directory)."""
        with self._lock:
            self._ensure_loaded()
            self._scan_specs()
            merged = {**{n: e.architecture for n, e in self._specs.items()}, **self._static}
        return [merged[n] for n in sorted(merged)]

    def register_spec(
        self, name: str, spec: ArchitectureSpec, *, description: str | None = None
    ) -> Architecture:
        """Register a code-free architecture and persist it atomically.

        The file is written to a temporary name, fsynced, then hard-linked to ``<name>.json``: the link fails
        if the name exists, so two processes registering one name cannot overwrite each other.

        Args:
            name: ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``.
            spec: Expected keys with shapes and dtypes; at least one key.
            description: Optional free text.

        Returns:
            The registered architecture.

        Raises:
            InvalidArchitecture: Bad name, empty spec, or a shape or dtype that torch cannot have.
            ArchitectureConflict: The name is already taken, by any source or process.
        """
        _check_name(name)
        _check_spec(spec)
        if description is not None and len(description) > _MAX_DESCRIPTION_CHARS:
            raise InvalidArchitecture(f"Description longer than {_MAX_DESCRIPTION_CHARS} characters")
        architecture = Architecture(
            name=name, source="spec", factory=None, spec=spec, description=description
        )
        with self._lock:
            self._ensure_loaded()
            if name in self._static:
                raise _conflict(name, f"Architecture {name!r} already exists ({self._static[name].source})")
            payload = {
                "format": _SPEC_FORMAT,
                "name": name,
                "description": description,
                "keys": _keys_to_json(spec),
            }
            if self._spec_store is not None:
                if not self._spec_store.insert_spec(name, payload):
                    self._refresh_spec(name)
                    raise _conflict(name, f"Architecture {name!r} already exists (spec)")
                self._specs[name] = _SpecEntry(architecture, self._spec_store.spec_revision(name))
                self._spec_issues.pop(f"{name}{_SPEC_SUFFIX}", None)
                return architecture
            if self._specs_dir is None:
                if name in self._specs:
                    raise _conflict(name, f"Architecture {name!r} already exists (spec)")
                self._specs[name] = _SpecEntry(architecture, None)
                return architecture
            self._specs_dir.mkdir(parents=True, exist_ok=True)
            path = self._spec_path(name)
            if not _publish_exclusive(path, json.dumps(payload, indent=1).encode()):
                self._refresh_spec(name)
                raise _conflict(name, f"Architecture {name!r} already exists (spec)")
            self._specs[name] = _SpecEntry(architecture, _stamp(path.stat()))
            self._spec_issues.pop(path.name, None)
            return architecture

    def delete(self, name: str) -> None:
        """Delete a spec-registered architecture (and its file).

        Args:
            name: The registry name.

        Raises:
            ArchitectureConflict: ``name`` comes from a built-in, the config file or an entry point.
            ArchitectureNotFound: No such architecture.
        """
        with self._lock:
            self._ensure_loaded()
            found = self._static.get(name)
            if found is not None:
                raise _conflict(
                    name, f"Architecture {name!r} is a {found.source} architecture; only specs can be deleted"
                )
            if not _NAME_RE.fullmatch(name):
                raise self._not_found(name)
            if self._spec_store is not None:
                self._specs.pop(name, None)
                self._spec_issues.pop(f"{name}{_SPEC_SUFFIX}", None)
                if not self._spec_store.delete_spec(name):
                    raise self._not_found(name)
                return
            if self._specs_dir is None:
                if self._specs.pop(name, None) is None:
                    raise self._not_found(name)
                return
            path = self._spec_path(name)
            self._specs.pop(name, None)
            self._spec_issues.pop(path.name, None)
            try:
                path.unlink()
            except FileNotFoundError:
                raise self._not_found(name) from None
            _fsync_dir(path.parent)

    # --- loading -------------------------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()

    def _add_static(self, name: str, source: ArchitectureSource, factory: Callable[[], nn.Module],
                    description: str | None) -> None:
        if not _NAME_RE.fullmatch(name):
            self._issue(name, source, "invalid name: use letters, digits, '.', '_' and '-' (at most 128)")
            return
        existing = self._static.get(name)
        if existing is not None:
            self._issue(name, source, f"name already defined by {existing.source}; ignored")
            return
        try:
            spec = _spec_of_factory(factory)
        except Exception as exc:  # any failure of model code is reported, not raised
            self._issue(name, source, _describe(exc))
            return
        self._static[name] = Architecture(name=name, source=source, factory=factory, spec=spec,
                                          description=description)

    def _issue(self, name: str, source: str, error: str) -> None:
        self._static_issues.append(RegistryIssue(name=name, source=source, error=error[:_MAX_ERROR_CHARS]))

    def _load_builtins(self) -> None:
        for name, (fn, kwargs) in BUILTINS.items():
            description = (fn.__doc__ or "").strip() or None
            self._add_static(name, "builtin", functools.partial(fn, **kwargs), description)

    def _load_config(self, path: Path) -> None:
        try:
            with path.open("rb") as fh:
                document = tomllib.load(fh)
        except FileNotFoundError:
            self._issue(str(path), "config", "config file not found")
            return
        except (OSError, tomllib.TOMLDecodeError) as exc:
            self._issue(str(path), "config", f"cannot read config file: {_describe(exc)}")
            return
        try:
            _extend_python_path(path, document.get("python_path", []))
        except InvalidArchitecture as exc:
            self._issue(str(path), "config", exc.detail)
            return
        tables = document.get("architectures", {})
        if not isinstance(tables, dict):
            self._issue(str(path), "config", "'architectures' must be a table of tables")
            return
        for name, table in tables.items():
            try:
                factory, description = _config_factory(table)
            except Exception as exc:  # importing runs operator code: report anything
                self._issue(name, "config", _describe(exc))
                continue
            self._add_static(name, "config", factory, description)

    def _load_entry_points(self) -> None:
        try:
            entry_points = importlib.metadata.entry_points(group=self._entry_point_group)
        except Exception as exc:  # a broken distribution must not stop the server
            self._issue(self._entry_point_group, "entrypoint", f"cannot list entry points: {_describe(exc)}")
            return
        for ep in sorted(entry_points, key=lambda e: (e.name, e.value)):
            try:
                loaded = ep.load()
                if not callable(loaded):
                    raise InvalidArchitecture(f"{ep.value!r} is not callable")
            except Exception as exc:  # importing runs installed code: report anything
                self._issue(ep.name, "entrypoint", _describe(exc))
                continue
            description = (getattr(loaded, "__doc__", None) or "").strip().split("\n\n")[0] or None
            self._add_static(ep.name, "entrypoint", loaded, description)

    # --- specs directory -----------------------------------------------------------------------------

    def _spec_path(self, name: str) -> Path:
        assert self._specs_dir is not None
        return self._specs_dir / f"{name}{_SPEC_SUFFIX}"

    def _scan_specs(self) -> None:
        if self._spec_store is not None:
            revisions = self._spec_store.spec_revisions()
            for name in sorted(revisions):
                self._refresh_stored_spec(name, revisions[name])
            for name in set(self._specs) - set(revisions):
                del self._specs[name]
            for file_name in set(self._spec_issues) - {f"{n}{_SPEC_SUFFIX}" for n in revisions}:
                del self._spec_issues[file_name]
            return
        if self._specs_dir is None:
            return
        try:
            files = sorted(p for p in self._specs_dir.iterdir() if p.name.endswith(_SPEC_SUFFIX))
        except FileNotFoundError:
            files = []
        seen = set()
        for path in files:
            name = path.name[: -len(_SPEC_SUFFIX)]
            if not _NAME_RE.fullmatch(name):
                continue  # temp files start with "." and never match
            seen.add(name)
            self._refresh_spec(name)
        for name in set(self._specs) - seen:
            del self._specs[name]
        for file_name in set(self._spec_issues) - {p.name for p in files}:
            del self._spec_issues[file_name]

    def _refresh_stored_spec(self, name: str, revision: str | None) -> None:
        # The SpecStore twin of _refresh_spec: the revision plays the file's stat stamp.
        assert self._spec_store is not None
        key = f"{name}{_SPEC_SUFFIX}"
        cached = self._specs.get(name)
        reported = self._spec_issues.get(key)
        if revision is not None and (
            (cached is not None and cached.stamp == revision) or (cached is None and reported is not None
                                                                  and reported[0] == revision)
        ):
            return
        self._specs.pop(name, None)
        self._spec_issues.pop(key, None)
        found = self._spec_store.read_spec(name) if revision is not None else None
        if found is None:
            return
        revision, document = found
        if name in self._static:
            error = f"name already defined by {self._static[name].source}; ignored"
            self._spec_issues[key] = (revision, RegistryIssue(name, "spec", error))
            return
        try:
            architecture = _spec_from_document(document, name, key)
        except Exception as exc:  # a bad stored spec is reported, not raised
            self._spec_issues[key] = (revision, RegistryIssue(name, "spec", _describe(exc)))
            return
        self._specs[name] = _SpecEntry(architecture, revision)

    def _refresh_spec(self, name: str) -> None:
        if self._spec_store is not None:
            self._refresh_stored_spec(name, self._spec_store.spec_revision(name))
            return
        if self._specs_dir is None:
            return
        path = self._spec_path(name)
        try:
            stamp = _stamp(path.stat())
        except FileNotFoundError:
            self._specs.pop(name, None)
            self._spec_issues.pop(path.name, None)
            return
        cached = self._specs.get(name)
        if cached is not None and cached.stamp == stamp:
            return
        reported = self._spec_issues.get(path.name)
        if cached is None and reported is not None and reported[0] == stamp:
            return
        self._specs.pop(name, None)
        self._spec_issues.pop(path.name, None)
        if name in self._static:
            error = f"name already defined by {self._static[name].source}; ignored"
            self._spec_issues[path.name] = (stamp, RegistryIssue(name, "spec", error))
            return
        try:
            architecture = _read_spec_file(path, name)
        except Exception as exc:  # a corrupt file in the shared directory is reported, not raised
            self._spec_issues[path.name] = (stamp, RegistryIssue(name, "spec", _describe(exc)))
            return
        self._specs[name] = _SpecEntry(architecture, stamp)

    def _not_found(self, name: str) -> ArchitectureNotFound:
        known = sorted({*self._static, *self._specs})
        listed = quote_keys(known, limit=10) if known else "none"
        return ArchitectureNotFound(f"Unknown architecture {name!r}; known: {listed}", architecture=name)


# --- helpers -------------------------------------------------------------------------------------------


def _conflict(name: str, detail: str) -> ArchitectureConflict:
    return ArchitectureConflict(detail, architecture=name)


def _describe(exc: BaseException) -> str:
    # Our own errors already say what went wrong; anything else gets its type for context.
    text = exc.detail if isinstance(exc, CheckpointServiceError) else f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidArchitecture(
            f"Invalid architecture name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _check_spec(spec: ArchitectureSpec) -> None:
    if not spec.keys:
        raise InvalidArchitecture("An architecture spec needs at least one key")
    bad_shape = [k for k, t in spec.keys.items() if any(not isinstance(d, int) or d < 0 for d in t.shape)]
    if bad_shape:
        raise InvalidArchitecture(f"Invalid shape for {quote_keys(bad_shape)}", keys=sorted(bad_shape))
    bad_dtype = [k for k, t in spec.keys.items() if not _is_dtype_name(t.dtype)]
    if bad_dtype:
        given = sorted({spec.keys[k].dtype for k in bad_dtype})
        raise InvalidArchitecture(
            f"Unknown dtype {', '.join(map(repr, given))} for {quote_keys(bad_dtype)}; valid dtypes: "
            + ", ".join(valid_dtype_names()),
            keys=sorted(bad_dtype),
        )
    empty = [k for k in spec.keys if not k]
    if empty:
        raise InvalidArchitecture("Empty key in architecture spec")


def _is_dtype_name(name: object) -> bool:
    return isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype)


def _keys_to_json(spec: ArchitectureSpec) -> dict[str, dict[str, Any]]:
    # In the spec's own order: that is the state_dict order of the architecture.
    return {k: {"shape": list(t.shape), "dtype": t.dtype} for k, t in spec.keys.items()}


def _spec_from_json(keys: Any) -> ArchitectureSpec:
    if not isinstance(keys, dict):
        raise InvalidArchitecture("'keys' must be an object")
    spec = ArchitectureSpec.from_dict({"keys": keys})
    _check_spec(spec)
    return spec


def _read_spec_file(path: Path, name: str) -> Architecture:
    return _spec_from_document(json.loads(path.read_bytes()), name, path.name)


def _spec_from_document(data: Any, name: str, where: str) -> Architecture:
    if not isinstance(data, dict) or data.get("format") != _SPEC_FORMAT:
        raise InvalidArchitecture(f"unsupported spec file format in {where!r}")
    if data.get("name") != name:
        raise InvalidArchitecture(f"{where!r} holds the spec of {data.get('name')!r}")
    description = data.get("description")
    return Architecture(
        name=name,
        source="spec",
        factory=None,
        spec=_spec_from_json(data.get("keys")),
        description=description if isinstance(description, str) else None,
    )


def _spec_of_factory(factory: Callable[[], nn.Module]) -> ArchitectureSpec:
    # Built on the meta device: a 10 GB model costs no memory and no init time.
    module = build_meta_module(factory)
    if not isinstance(module, nn.Module):
        raise InvalidArchitecture(f"factory returned {type(module).__name__}, not an nn.Module")
    spec = spec_from_module(module)
    if not spec.keys:
        raise InvalidArchitecture("factory built a module with an empty state_dict")
    return spec


def import_factory(reference: str) -> Callable[..., Any]:
    """Import ``"package.module:callable"`` (the attribute part may be dotted).

    Importing executes the module's code: call this only with references from the server's own,
    operator-controlled configuration, never with request input.

    Args:
        reference: ``"module:attribute"``.

    Returns:
        The callable.

    Raises:
        InvalidArchitecture: Malformed reference, or the target is not callable.
        ImportError: The module cannot be imported (or raises while importing).
        AttributeError: The module has no such attribute.
    """
    module_name, sep, attr_path = reference.partition(":")
    if not sep or not module_name or not attr_path:
        raise InvalidArchitecture(f"factory {reference!r} must look like 'package.module:callable'")
    target: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise InvalidArchitecture(f"factory {reference!r} is not callable")
    return target  # type: ignore[no-any-return]


def _extend_python_path(config: Path, entries: object) -> None:
    # `python_path = ["src", "../models"]`: where the config's own factory modules live, relative to the file,
    # so that `factory = "my_models:build"` imports without PYTHONPATH.
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise InvalidArchitecture("'python_path' must be a list of directories (relative to the config file)")
    for entry in reversed(entries):
        directory = str((config.parent / entry).resolve())
        if not os.path.isdir(directory):
            raise InvalidArchitecture(f"python_path entry {entry!r} is not a directory ({directory})")
        if directory not in sys.path:
            sys.path.insert(0, directory)
    if entries:
        importlib.invalidate_caches()


def _config_factory(table: object) -> tuple[Callable[[], nn.Module], str | None]:
    if not isinstance(table, dict):
        raise InvalidArchitecture("must be a table with a 'factory' string")
    unknown = set(table) - _CONFIG_FIELDS
    if unknown:
        raise InvalidArchitecture(f"unknown field(s) {quote_keys(unknown)}")
    reference = table.get("factory")
    if not isinstance(reference, str):
        raise InvalidArchitecture("'factory' must be a string like 'package.module:callable'")
    kwargs = table.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise InvalidArchitecture("'kwargs' must be a table")
    description = table.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidArchitecture("'description' must be a string")
    fn = import_factory(reference)
    return functools.partial(fn, **kwargs), description


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _fsync_dir(directory: Path) -> None:
    # Makes the new or removed directory entry durable; not possible on every platform/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish_exclusive(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically unless ``path`` exists. Return False if it did."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link(2) never replaces an existing name, unlike rename: the first process to publish wins.
            os.link(tmp, path)
        except FileExistsError:
            return False
        _fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
