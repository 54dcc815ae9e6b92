"""The layering of the store split: the API and the operations talk to the store's facade, never to its files.

service/api/** and service/operations.py may not import a filesystem helper of the store (`service.store._fs`)
or a backend's module (`service.store.blobs.local`, `.s3`, the index's SQL), nor reach for a store's directory
(`.root`) or a blob's path (`blob_path`, `.blobs`); bytes come through `local_path()` / `open_blob()` and
readiness through `ready()`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"
# The backends' modules and the filesystem helpers. The packages' own API stays allowed: `service.store.blobs`
# (the BlobStore protocol and `open_blob_store`, which app.py's build_services uses to compose the store).
FORBIDDEN_MODULES = (
    "service.store._fs",
    "service.store.blobs.local",
    "service.store.blobs.s3",
    "service.store.blobs.cache",
    "service.store.index.sql",
    "service.store.index.legacy",
)
FORBIDDEN_ATTRIBUTES = frozenset({"root", "blob_path", "blobs", "_blobs", "_tmp", "conversions"})


def violations(source: str) -> list[str]:
    """Every forbidden import or attribute use in a module's source, as 'line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            modules = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        else:
            modules = []
        bad = [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_MODULES)]
        if bad:
            found.append(f"{node.lineno}: imports {bad[0]}")
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
            found.append(f"{node.lineno}: uses .{node.attr}")
    return found


def _layer_files() -> list[Path]:
    return sorted((SERVICE / "api").rglob("*.py")) + [SERVICE / "operations.py"]


@pytest.mark.index("sqlite")  # a property of the source, not of a backend
def test_api_and_operations_use_no_filesystem_helper_of_the_store() -> None:
    bad = {str(p.relative_to(SERVICE.parent)): v for p in _layer_files() if (v := violations(p.read_text()))}
    assert bad == {}


@pytest.mark.index("sqlite")
def test_the_check_finds_what_it_forbids() -> None:
    assert violations("from service.store._fs import publish_bytes") == ["1: imports service.store._fs"]
    assert violations("import service.store.blobs.local") == ["1: imports service.store.blobs.local"]
    assert violations("from service.store.blobs import local") == ["1: imports service.store.blobs.local"]
    assert violations("from service.store.blobs import open_blob_store") == []
    assert violations("x = store.root / 'tmp'") == ["1: uses .root"]
    assert violations("p = services.store.blob_path(i)") == ["1: uses .blob_path"]
    assert violations("from service.store import ArtifactStore\nstore.local_path(i)") == []
