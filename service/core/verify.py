"""Verify a state_dict against an architecture: what `load_state_dict(strict=True)` would say, and dtypes.

Against a module factory the model is built on the meta device, so verification allocates no weights; against
an `ArchitectureSpec` (a key -> shape/dtype table) the same report comes from comparing tables. Verification
returns a report and never raises for a failed check: the caller decides whether a failure is an error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from service.core.diff import module_of
from service.core.manifest import compute_schema_fingerprint, dtype_name
from service.core.statedict import metadata_of, with_metadata
from service.core.types import Manifest
from service.errors import InvalidArchitecture

__all__ = [
    "ArchitectureSpec",
    "TensorSpec",
    "VerifyReport",
    "build_meta_module",
    "spec_from_manifest",
    "spec_from_module",
    "verify_state_dict",
]


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # as in manifests: "float32", "int64"

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ArchitectureSpec:
    """The keys an architecture's state_dict has, in order, with shapes and dtypes."""

    keys: dict[str, TensorSpec]

    @functools.cached_property
    def schema_fingerprint(self) -> str:  # a spec is never changed after it is built; hashing 20k keys is not free
        return compute_schema_fingerprint((k, s.shape, s.dtype) for k, s in self.keys.items())

    def to_dict(self) -> dict[str, Any]:
        return {
            "keys": {k: s.to_dict() for k, s in self.keys.items()},
            "schema_fingerprint": self.schema_fingerprint,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchitectureSpec:
        """Build a spec from `to_dict()` output (a `schema_fingerprint` in it is ignored and recomputed).

        Args:
            data: {"keys": {key: {"shape": [...], "dtype": "float32"}}}.

        Returns:
            The spec.

        Raises:
            InvalidArchitecture: The data is not a spec.
        """
        try:
            keys = {
                str(k): TensorSpec(tuple(int(d) for d in s["shape"]), str(s["dtype"]))
                for k, s in data["keys"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidArchitecture(f"not an architecture spec: {exc!r}") from exc
        for key, spec in keys.items():
            if not isinstance(getattr(torch, spec.dtype, None), torch.dtype):
                raise InvalidArchitecture(
                    f"unknown dtype {spec.dtype!r} for {key!r}; valid dtypes: {', '.join(valid_dtype_names())}"
                )
            if any(d < 0 for d in spec.shape):
                raise InvalidArchitecture(f"negative dimension in the shape of {key!r}")
        return cls(keys=keys)


def valid_dtype_names() -> list[str]:
    """The dtype names a spec may use: how torch spells its dtypes (`str(torch.float32)` without `torch.`)."""
    return sorted({str(v).removeprefix("torch.") for v in vars(torch).values() if isinstance(v, torch.dtype)})


def _spec_of(state_dict: Mapping[str, Any]) -> ArchitectureSpec:
    return ArchitectureSpec(
        keys={
            k: TensorSpec(tuple(v.shape), dtype_name(v.dtype))
            for k, v in state_dict.items()
            if isinstance(v, torch.Tensor)
        }
    )


def spec_from_module(module: nn.Module) -> ArchitectureSpec:
    """Describe a module's state_dict (build it on the meta device to allocate nothing).

    Args:
        module: Any module, typically from `build_meta_module`.

    Returns:
        Its `ArchitectureSpec`; non-tensor entries (extra state) are left out.
    """
    return _spec_of(module.state_dict())


def spec_from_manifest(manifest: Manifest) -> ArchitectureSpec:
    """Describe a checkpoint's schema from its manifest; the spec's fingerprint equals the manifest's.

    Args:
        manifest: A manifest from `build_manifest`.

    Returns:
        The `ArchitectureSpec` with the manifest's keys, shapes and dtypes.
    """
    return ArchitectureSpec(
        keys={k: TensorSpec(tuple(e.shape), e.dtype) for k, e in manifest.entries.items()}
    )


def build_meta_module(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module on the meta device: shapes and dtypes without memory or initialisation cost.

    Args:
        factory: Returns a new module; called under `torch.device("meta")`.

    Returns:
        The module.

    Raises:
        InvalidArchitecture: The factory raised or did not return an `nn.Module`.
    """
    try:
        with torch.device("meta"):
            module = factory()
    except Exception as exc:
        raise InvalidArchitecture(f"the architecture factory failed: {exc!r}") from exc
    if not isinstance(module, nn.Module):
        raise InvalidArchitecture(
            f"the architecture factory returned a {type(module).__name__}, not a module"
        )
    return module


@dataclass(frozen=True)
class VerifyReport:
    """What a strict load would report, plus dtype mismatches (torch casts those silently)."""

    ok: bool
    missing: tuple[str, ...]  # sorted
    unexpected: tuple[str, ...]  # sorted
    shape_mismatches: dict[str, dict[str, list[int]]]  # key -> {"expected": shape, "got": shape}
    dtype_mismatches: dict[str, dict[str, str]]  # key -> {"expected": dtype, "got": dtype}
    by_module: dict[str, dict[str, list[str]]]  # module -> category -> keys
    error: str | None = None  # load_state_dict's own message when it failed for another reason
    # Keys the architecture expects that the state_dict lacks but load_state_dict accepted anyway: BatchNorm
    # fills num_batches_tracked when `_metadata` is absent (version None).
    filled_by_load: tuple[str, ...] = ()
    expected_keys: int = 0
    schema_fingerprint: str | None = None  # of the architecture

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "shape_mismatches": {k: dict(v) for k, v in self.shape_mismatches.items()},
            "dtype_mismatches": {k: dict(v) for k, v in self.dtype_mismatches.items()},
            "by_module": {
                m: {c: list(keys) for c, keys in cats.items()} for m, cats in self.by_module.items()
            },
            "error": self.error,
            "filled_by_load": list(self.filled_by_load),
            "expected_keys": self.expected_keys,
            "schema_fingerprint": self.schema_fingerprint,
        }


@dataclass
class _Findings:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shapes: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    dtypes: dict[str, dict[str, str]] = field(default_factory=dict)
    error: str | None = None
    filled_by_load: list[str] = field(default_factory=list)


def _compare_tensors(state_dict: Mapping[str, Any], spec: ArchitectureSpec, found: _Findings) -> None:
    for key, expected in spec.keys.items():
        value = state_dict.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        got_shape = tuple(value.shape)
        if got_shape != expected.shape:
            found.shapes[key] = {"expected": list(expected.shape), "got": list(got_shape)}
        elif dtype_name(value.dtype) != expected.dtype:
            found.dtypes[key] = {"expected": expected.dtype, "got": dtype_name(value.dtype)}


def _load_findings(
    state_dict: Mapping[str, Any],
    module: nn.Module,
    spec: ArchitectureSpec,
    found: _Findings,
) -> None:
    # Shape mismatches abort load_state_dict even with strict=False, and a wrong dtype can fail the Parameter
    # wrapping under assign=True: those keys were already reported, so stand in meta tensors of the expected
    # shape and dtype for them and let load_state_dict judge only the keys.
    entries: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key in found.shapes or key in found.dtypes:
            expected = spec.keys[key]
            value = torch.empty(expected.shape, dtype=getattr(torch, expected.dtype), device="meta")
        entries[key] = value
    # A copy: load_state_dict(assign=True) writes "assign_to_params_buffers" into each module's metadata dict.
    rest = with_metadata(entries, metadata_of(state_dict), copy=True)

    # Module hooks run inside load_state_dict and may raise anything; a report must come back regardless.
    try:
        module.load_state_dict(rest, strict=True, assign=True)
        return
    except Exception:
        pass
    # The strict load failed: take the key lists from the structured return value, not from the message text.
    # The same module serves: whatever the failed load assigned has the expected shapes and dtypes.
    try:
        result = module.load_state_dict(rest, strict=False, assign=True)
    except Exception as exc:
        found.error = str(exc) or repr(exc)
        present = set(rest)
        found.missing = [k for k in spec.keys if k not in present]
        found.unexpected = [k for k in rest if k not in spec.keys]
        return
    found.missing = list(result.missing_keys)
    found.unexpected = list(result.unexpected_keys)


def _report(found: _Findings, spec: ArchitectureSpec) -> VerifyReport:
    by_module: dict[str, dict[str, list[str]]] = {}
    categories = (
        ("missing", found.missing),
        ("unexpected", found.unexpected),
        ("shape_mismatch", list(found.shapes)),
        ("dtype_mismatch", list(found.dtypes)),
    )
    for category, keys in categories:
        for key in sorted(keys):
            by_module.setdefault(module_of(key), {}).setdefault(category, []).append(key)
    ok = not (found.missing or found.unexpected or found.shapes or found.dtypes or found.error)
    return VerifyReport(
        ok=ok,
        missing=tuple(sorted(found.missing)),
        unexpected=tuple(sorted(found.unexpected)),
        shape_mismatches={k: found.shapes[k] for k in sorted(found.shapes)},
        dtype_mismatches={k: found.dtypes[k] for k in sorted(found.dtypes)},
        by_module={m: by_module[m] for m in sorted(by_module)},
        error=found.error,
        filled_by_load=tuple(sorted(found.filled_by_load)),
        expected_keys=len(spec.keys),
        schema_fingerprint=spec.schema_fingerprint,
    )


def verify_state_dict(
    state_dict: Mapping[str, torch.Tensor], architecture: Callable[[], nn.Module] | ArchitectureSpec
) -> VerifyReport:
    """Check that a state_dict would load into an architecture with `strict=True`, with matching dtypes.

    Against a module factory, the module is built on the meta device and `load_state_dict(strict=True,
    assign=True)` runs on it (module hooks and BatchNorm's version handling included), with shape mismatches
    set aside first because they abort the load. No weights are allocated and no tensor data is read.
    Against an `ArchitectureSpec`, keys, shapes and dtypes are compared directly.

    Args:
        state_dict: The state_dict to check (prefixes already stripped), maybe with `_metadata`.
        architecture: A zero-argument module factory, or an `ArchitectureSpec`.

    Returns:
        A `VerifyReport`; `ok` is True only when nothing is missing, unexpected, or mismatched in shape or
        dtype, and the load raised nothing else.

    Raises:
        InvalidArchitecture: The factory failed or returned something that is not a module.
    """
    found = _Findings()
    if isinstance(architecture, ArchitectureSpec):
        spec = architecture
        _compare_tensors(state_dict, spec, found)
        found.missing = [k for k in spec.keys if k not in state_dict]
        found.unexpected = [k for k in state_dict if k not in spec.keys]
        return _report(found, spec)

    module = build_meta_module(architecture)
    spec = spec_from_module(module)
    _compare_tensors(state_dict, spec, found)
    _load_findings(state_dict, module, spec, found)
    missing = set(found.missing)
    found.filled_by_load = [k for k in spec.keys if k not in state_dict and k not in missing]
    return _report(found, spec)
