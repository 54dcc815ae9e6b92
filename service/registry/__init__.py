"""Model architectures: built-ins, TOML-configured factories, entry points and code-free specs."""

from service.registry.matching import ArchitectureMatch, rank_architectures
from service.registry.registry import (
    DEFAULT_ENTRY_POINT_GROUP,
    Architecture,
    ArchitectureRegistry,
    ArchitectureSource,
    RegistryIssue,
    SpecStore,
    import_factory,
)

__all__ = [
    "DEFAULT_ENTRY_POINT_GROUP",
    "Architecture",
    "ArchitectureMatch",
    "ArchitectureRegistry",
    "ArchitectureSource",
    "RegistryIssue",
    "SpecStore",
    "import_factory",
    "rank_architectures",
]
