"""Only a validated id or name ever becomes part of a path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.errors import InvalidReference
from service.store import ArtifactStore, validate_id, validate_name
from tests.store.conftest import tree

GOOD_ID = "0" * 64
BAD_IDS = ["../x", "ab", "A" * 64, "a" * 65, "a/b", "", "../" + "a" * 61, "a" * 63 + "\n", "a" * 63 + "G",
           "/" + "a" * 63, "a" * 64 + "/.."]
BAD_NAMES = ["../x", "a/b", "", ".hidden", "-x", "_x", "x" * 129, "a" * 64, "A" * 64, "a\n", "a b", "a\x00b",
             "..", "."]

ID_CALLS: dict[str, Callable[[ArtifactStore, str], Any]] = {
    "exists": lambda s, r: s.exists(r),
    "metadata": lambda s, r: s.metadata(r),
    "manifest": lambda s, r: s.manifest(r),
    "blob_path": lambda s, r: s.blob_path(r),
    "open_blob": lambda s, r: s.open_blob(r),
    "load": lambda s, r: s.load(r),
    "delete": lambda s, r: s.delete(r),
    "delete_force": lambda s, r: s.delete(r, force=True),
    "verify": lambda s, r: s.verify(r),
    "set_name": lambda s, r: s.set_name("ok-name", r),
}
NAME_CALLS: dict[str, Callable[[ArtifactStore, str], Any]] = {
    "set_name": lambda s, r: s.set_name(r, GOOD_ID),
    "get_name": lambda s, r: s.get_name(r),
    "delete_name": lambda s, r: s.delete_name(r),
    "list": lambda s, r: s.list(name=r),
}


@pytest.mark.parametrize("bad", BAD_IDS)
def test_validate_id_refuses(bad: str) -> None:
    with pytest.raises(InvalidReference):
        validate_id(bad)


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_validate_name_refuses(bad: str) -> None:
    with pytest.raises(InvalidReference):
        validate_name(bad)


@pytest.mark.parametrize("good", ["a", "ab", "v1.2_final-3", "a" * 65, "A" * 63, "x" * 128])
def test_validate_name_accepts(good: str) -> None:
    assert validate_name(good) == good


def test_validate_id_accepts() -> None:
    assert validate_id("0123456789abcdef" * 4) == "0123456789abcdef" * 4


@pytest.mark.parametrize("method", sorted(ID_CALLS))
@pytest.mark.parametrize("bad", BAD_IDS)
def test_every_id_method_refuses_before_touching_files(store: ArtifactStore, tmp_path: Path, method: str,
                                                       bad: str) -> None:
    before = tree(tmp_path)
    with pytest.raises(InvalidReference):
        ID_CALLS[method](store, bad)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("method", sorted(NAME_CALLS))
@pytest.mark.parametrize("bad", BAD_NAMES)
def test_every_name_method_refuses_before_touching_files(store: ArtifactStore, tmp_path: Path, method: str,
                                                         bad: str) -> None:
    before = tree(tmp_path)
    with pytest.raises(InvalidReference):
        NAME_CALLS[method](store, bad)
    assert tree(tmp_path) == before


NEITHER = ["../x", "a/b", "", "A" * 64, "a" * 63 + "\n", "/" + "a" * 63, "a" * 64 + "/.."]


@pytest.mark.parametrize("bad", NEITHER)
def test_resolve_refuses_what_is_neither_id_nor_name(store: ArtifactStore, bad: str) -> None:
    with pytest.raises(InvalidReference):
        store.resolve(bad)


def test_names_never_escape_the_names_directory(store: ArtifactStore, tmp_path: Path) -> None:
    # A file outside names/ that a traversal would reach must not be read as a name.
    (store.root / "secret").write_text(GOOD_ID)
    with pytest.raises(InvalidReference):
        store.get_name("../secret")
    assert store.names() == {}
