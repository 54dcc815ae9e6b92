"""Code-free specs: registration, persistence in a shared directory, deletion, validation, races."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from service.core.verify import ArchitectureSpec, TensorSpec, spec_from_module, verify_state_dict
from service.errors import ArchitectureConflict, ArchitectureNotFound, InvalidArchitecture
from service.registry import ArchitectureRegistry
from tests.factories import MLPBN, TinyConvNet

NO_PLUGINS = "ckpt_service_tests.no_such_group"


def make_registry(specs_dir: Path, *, builtins: bool = True) -> ArchitectureRegistry:
    registry = ArchitectureRegistry(
        specs_dir=specs_dir, entry_point_group=NO_PLUGINS, include_builtins=builtins
    )
    registry.load()
    return registry


def test_register_persist_and_reload(tmp_path: Path) -> None:
    specs = tmp_path / "architectures"
    first = make_registry(specs)
    spec = spec_from_module(TinyConvNet())

    arch = first.register_spec("my-net", spec, description="a spec")

    assert arch.source == "spec" and arch.factory is None and arch.spec == spec
    assert arch.verify_target() is arch.spec
    assert arch.to_dict() == {"name": "my-net", "source": "spec", "key_count": len(spec.keys),
                              "schema_fingerprint": spec.schema_fingerprint, "description": "a spec"}
    assert [p.name for p in specs.iterdir()] == ["my-net.json"]  # no temp file left behind
    assert json.loads((specs / "my-net.json").read_text())["keys"] == arch.to_dict(with_keys=True)["keys"]

    reloaded = make_registry(specs).get("my-net")
    assert reloaded == arch
    assert list(reloaded.spec.keys) == list(spec.keys)  # state_dict order survives the round trip
    assert verify_state_dict(TinyConvNet().state_dict(), reloaded.verify_target()).ok
    assert not verify_state_dict(MLPBN().state_dict(), reloaded.verify_target()).ok


def test_a_name_registered_by_another_process_is_found(tmp_path: Path) -> None:
    specs = tmp_path / "architectures"
    here, there = make_registry(specs), make_registry(specs)
    assert [a.name for a in here.list()] == ["mlp-bn", "tiny-convnet"]

    there.register_spec("from-there", spec_from_module(MLPBN()))

    assert here.get("from-there").spec == there.get("from-there").spec  # re-scan on miss
    assert [a.name for a in here.list()] == ["from-there", "mlp-bn", "tiny-convnet"]
    with pytest.raises(ArchitectureConflict):
        here.register_spec("from-there", spec_from_module(TinyConvNet()))


def test_delete_is_seen_by_other_processes_and_a_new_spec_replaces_the_cached_one(tmp_path: Path) -> None:
    specs = tmp_path / "architectures"
    here, there = make_registry(specs), make_registry(specs)
    there.register_spec("net", spec_from_module(MLPBN()))
    assert here.get("net").spec == spec_from_module(MLPBN())

    there.delete("net")

    with pytest.raises(ArchitectureNotFound):
        here.get("net")
    assert "net" not in [a.name for a in here.list()]
    with pytest.raises(ArchitectureNotFound):
        there.delete("net")
    assert list(specs.iterdir()) == []

    there.register_spec("net", spec_from_module(TinyConvNet()), description="v2")
    assert here.get("net").spec == spec_from_module(TinyConvNet())
    assert here.get("net").description == "v2"
    here.delete("net")
    with pytest.raises(ArchitectureNotFound):
        there.get("net")


def test_same_name_registered_concurrently_has_one_winner(tmp_path: Path) -> None:
    specs = tmp_path / "architectures"
    a, b = make_registry(specs), make_registry(specs)
    candidates = {"a": spec_from_module(TinyConvNet()), "b": spec_from_module(MLPBN())}
    for round_ in range(5):
        name = f"raced-{round_}"
        barrier = threading.Barrier(2)
        outcome: dict[str, str] = {}

        def register(label: str, registry: ArchitectureRegistry, name: str = name,
                     barrier: threading.Barrier = barrier, outcome: dict[str, str] = outcome) -> None:
            barrier.wait()
            try:
                registry.register_spec(name, candidates[label])
                outcome[label] = "won"
            except ArchitectureConflict:
                outcome[label] = "conflict"

        threads = [threading.Thread(target=register, args=pair) for pair in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert sorted(outcome.values()) == ["conflict", "won"]
        winner = "a" if outcome["a"] == "won" else "b"
        assert a.get(name).spec == b.get(name).spec == candidates[winner]
    assert sorted(p.name for p in specs.iterdir()) == [f"raced-{i}.json" for i in range(5)]


@pytest.mark.parametrize(
    "name", ["", "-leading", ".hidden", "../escape", "a/b", "sp ace", "x" * 129, "é", "trailing\n"]
)
def test_invalid_names_are_rejected(tmp_path: Path, name: str) -> None:
    registry = make_registry(tmp_path / "architectures")
    with pytest.raises(InvalidArchitecture):
        registry.register_spec(name, spec_from_module(MLPBN()))
    assert not any((tmp_path / "architectures").iterdir())


def test_longest_valid_name_is_accepted(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "architectures")
    name = "A" + "b.-_" * 31 + "xyz"
    assert len(name) == 128
    assert registry.register_spec(name, spec_from_module(MLPBN())).name == name


@pytest.mark.parametrize("keys", [
    {},
    {"w": TensorSpec((2, -1), "float32")},
    {"w": TensorSpec((2,), "float99")},
    {"w": TensorSpec((2,), "Tensor")},  # an attribute of torch, but not a dtype
])
def test_invalid_specs_are_rejected(tmp_path: Path, keys: dict[str, TensorSpec]) -> None:
    registry = make_registry(tmp_path / "architectures")
    with pytest.raises(InvalidArchitecture):
        registry.register_spec("bad", ArchitectureSpec(keys=keys))
    with pytest.raises(ArchitectureNotFound):
        registry.get("bad")


def test_a_corrupt_spec_file_is_an_issue_and_the_rest_work(tmp_path: Path) -> None:
    specs = tmp_path / "architectures"
    make_registry(specs).register_spec("good", spec_from_module(MLPBN()))
    (specs / "broken.json").write_text("{ not json")
    wrong = {"format": 1, "name": "wrong", "keys": {"w": {"shape": [2], "dtype": "nope"}}}
    (specs / "wrong.json").write_text(json.dumps(wrong))

    registry = make_registry(specs)

    assert sorted((i.name, i.source) for i in registry.issues) == [("broken", "spec"), ("wrong", "spec")]
    assert [a.name for a in registry.list()] == ["good", "mlp-bn", "tiny-convnet"]
    assert len(registry.issues) == 2  # re-scans report a broken file once
    with pytest.raises(ArchitectureNotFound):
        registry.get("broken")
    (specs / "broken.json").unlink()
    registry.list()
    assert [i.name for i in registry.issues] == ["wrong"]


def test_a_spec_file_shadowed_by_a_builtin_is_an_issue(tmp_path: Path) -> None:
    specs = tmp_path / "architectures"
    make_registry(specs, builtins=False).register_spec("tiny-convnet", spec_from_module(MLPBN()))

    registry = make_registry(specs)

    assert [(i.name, i.source) for i in registry.issues] == [("tiny-convnet", "spec")]
    assert registry.get("tiny-convnet").source == "builtin"
    assert [a.name for a in registry.list()].count("tiny-convnet") == 1


def test_specs_without_a_directory_live_in_memory() -> None:
    registry = ArchitectureRegistry(entry_point_group=NO_PLUGINS)
    registry.register_spec("mem", spec_from_module(MLPBN()))
    assert registry.get("mem").source == "spec"
    with pytest.raises(ArchitectureConflict):
        registry.register_spec("mem", spec_from_module(MLPBN()))
    registry.delete("mem")
    with pytest.raises(ArchitectureNotFound):
        registry.delete("mem")


def test_long_descriptions_are_rejected(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "architectures")
    with pytest.raises(InvalidArchitecture):
        registry.register_spec("described", spec_from_module(MLPBN()), description="x" * 1001)
