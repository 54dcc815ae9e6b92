"""Pure checkpoint operations: torch + stdlib only, no HTTP, no knowledge of the artifact directory.

Everything takes state_dicts (str -> Tensor mappings), manifests or paths and returns frozen dataclasses.
"""

from service.core.changes import (
    ChangeSummary,
    KeyChange,
    ModuleChange,
    changes_from_stats,
    measure_changes,
    rollup_modules,
    summarize_changes,
)
from service.core.diff import CATEGORIES, ManifestDiff, ValueStats, diff_manifests, diff_values, module_of
from service.core.formats import FORMATS, LEGACY_MAGIC_NUMBER, Format, check_archive, detect_format
from service.core.frozen import FrozenReport, check_frozen, check_frozen_manifests, with_value_changes
from service.core.load import CONTAINER_KEYS, load_checkpoint, resolve_globals
from service.core.manifest import build_manifest, compute_schema_fingerprint, dtype_name, fingerprint_tensor
from service.core.merge import BN_STAT_NAMES, KeyProvenance, MergeReport, MergeResult, merge_state_dicts
from service.core.prefixes import (
    KNOWN_WRAPPERS,
    PrefixMatch,
    StripResult,
    match_prefixes,
    strip_key,
    strip_prefixes,
)
from service.core.save import save_checkpoint
from service.core.types import (
    DEFAULT_LIMITS,
    ArchiveLimits,
    LoadedCheckpoint,
    Manifest,
    StateDict,
    TensorEntry,
)
from service.core.verify import (
    ArchitectureSpec,
    TensorSpec,
    VerifyReport,
    build_meta_module,
    spec_from_manifest,
    spec_from_module,
    verify_state_dict,
)

__all__ = [
    "BN_STAT_NAMES",
    "CATEGORIES",
    "CONTAINER_KEYS",
    "DEFAULT_LIMITS",
    "FORMATS",
    "KNOWN_WRAPPERS",
    "LEGACY_MAGIC_NUMBER",
    "ArchitectureSpec",
    "ArchiveLimits",
    "ChangeSummary",
    "Format",
    "FrozenReport",
    "KeyChange",
    "KeyProvenance",
    "LoadedCheckpoint",
    "Manifest",
    "ManifestDiff",
    "MergeReport",
    "MergeResult",
    "ModuleChange",
    "PrefixMatch",
    "StateDict",
    "StripResult",
    "TensorEntry",
    "TensorSpec",
    "ValueStats",
    "VerifyReport",
    "build_manifest",
    "build_meta_module",
    "check_archive",
    "check_frozen",
    "changes_from_stats",
    "check_frozen_manifests",
    "compute_schema_fingerprint",
    "detect_format",
    "diff_manifests",
    "diff_values",
    "dtype_name",
    "fingerprint_tensor",
    "load_checkpoint",
    "match_prefixes",
    "measure_changes",
    "merge_state_dicts",
    "module_of",
    "resolve_globals",
    "rollup_modules",
    "save_checkpoint",
    "spec_from_manifest",
    "spec_from_module",
    "strip_key",
    "strip_prefixes",
    "summarize_changes",
    "verify_state_dict",
    "with_value_changes",
]
