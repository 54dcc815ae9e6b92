"""Built-ins, TOML factories, entry points, conflicts between sources, meta-device specs."""

from __future__ import annotations

import resource
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

from service.core.verify import spec_from_module, verify_state_dict
from service.errors import ArchitectureConflict, ArchitectureNotFound
from service.registry import Architecture, ArchitectureRegistry, RegistryIssue, import_factory
from service.registry.builtins import BUILTINS
from tests.factories import MLPBN, TinyConvNet
from tests.registry.helpers import write_config, write_distribution, write_module

NO_PLUGINS = "ckpt_service_tests.no_such_group"  # isolates tests from whatever the venv has installed
PLUGIN_DIR = Path(__file__).resolve().parents[2] / "examples" / "plugin"

GOOD_AND_BROKEN = """
    import torch
    from torch import nn

    def build_mlp(*, dim=8, depth=2):
        return nn.Sequential(*[nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim)) for _ in range(depth)])

    def build_raising():
        raise RuntimeError("boom while building")

    def build_not_a_module():
        return {"weight": torch.zeros(2)}

    NOT_CALLABLE = 3
"""


def issue_for(issues: list[RegistryIssue], name: str) -> RegistryIssue:
    found = [i for i in issues if i.name == name]
    assert len(found) == 1, issues
    return found[0]


# --- built-ins --------------------------------------------------------------------------------------------


def test_builtins_are_listed_with_key_counts_and_schema_fingerprints() -> None:
    registry = ArchitectureRegistry(entry_point_group=NO_PLUGINS)
    assert registry.load() == []

    listed = registry.list()
    assert [a.name for a in listed] == sorted(BUILTINS)
    real = {"tiny-convnet": TinyConvNet(), "mlp-bn": MLPBN()}
    for arch in listed:
        module = real[arch.name]
        state = module.state_dict()
        assert arch.source == "builtin" and arch.factory is not None
        summary = arch.to_dict()
        assert summary == {
            "name": arch.name,
            "source": "builtin",
            "key_count": len(state),
            "schema_fingerprint": spec_from_module(module).schema_fingerprint,
            "description": arch.description,
        }
        assert arch.description
        assert arch.to_dict(with_keys=True)["keys"] == {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in state.items()
        }
        # The factory builds a real module, and a real state_dict verifies against the target.
        assert arch.verify_target() is arch.factory
        assert verify_state_dict(state, arch.verify_target()).ok
        arch.factory().load_state_dict(state, strict=True)


def test_builtins_can_be_left_out() -> None:
    registry = ArchitectureRegistry(entry_point_group=NO_PLUGINS, include_builtins=False)
    assert registry.list() == []


def test_get_unknown_raises_not_found_listing_known_names() -> None:
    registry = ArchitectureRegistry(entry_point_group=NO_PLUGINS)
    with pytest.raises(ArchitectureNotFound) as info:
        registry.get("resnet-9000")
    assert "'resnet-9000'" in info.value.detail
    assert "'mlp-bn', 'tiny-convnet'" in info.value.detail
    assert info.value.extensions["architecture"] == "resnet-9000"
    with pytest.raises(ArchitectureNotFound):
        registry.get("../tiny-convnet")


def test_lookup_loads_lazily() -> None:
    registry = ArchitectureRegistry(entry_point_group=NO_PLUGINS)
    assert registry.get("tiny-convnet").name == "tiny-convnet"


# --- TOML config ------------------------------------------------------------------------------------------


def test_toml_factories_with_kwargs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = write_module(tmp_path / "mods", monkeypatch, GOOD_AND_BROKEN)
    config = write_config(tmp_path / "ckpt.toml", f"""
        [architectures.mlp-wide]
        factory = "{module}:build_mlp"
        kwargs = {{ dim = 16, depth = 3 }}
        description = "three wide blocks"

        [architectures.mlp-default]
        factory = "{module}:build_mlp"
    """)
    registry = ArchitectureRegistry(config_path=config, entry_point_group=NO_PLUGINS)
    assert registry.load() == []

    wide = registry.get("mlp-wide")
    assert wide.source == "config" and wide.description == "three wide blocks"
    assert wide.factory is not None
    built = wide.factory()
    assert isinstance(built, nn.Sequential) and len(built) == 3
    assert built[0][0].weight.shape == (16, 16)
    assert wide.spec == spec_from_module(built)
    assert wide.to_dict()["key_count"] == 3 * (2 + 5)  # Linear: 2; BatchNorm1d: 2 params + 3 buffers
    default = registry.get("mlp-default")
    assert default.to_dict()["key_count"] == 2 * 7 and default.description is None
    assert [a.name for a in registry.list()] == ["mlp-bn", "mlp-default", "mlp-wide", "tiny-convnet"]


def test_broken_factories_are_reported_by_name_while_the_rest_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = write_module(tmp_path / "mods", monkeypatch, GOOD_AND_BROKEN)
    config = write_config(tmp_path / "ckpt.toml", f"""
        [architectures.good]
        factory = "{module}:build_mlp"

        [architectures.missing-module]
        factory = "no_such_package_for_ckpt_tests.models:build"

        [architectures.missing-attribute]
        factory = "{module}:build_nothing"

        [architectures.raising]
        factory = "{module}:build_raising"

        [architectures.not-a-module]
        factory = "{module}:build_not_a_module"

        [architectures.not-callable]
        factory = "{module}:NOT_CALLABLE"

        [architectures.bad-kwargs]
        factory = "{module}:build_mlp"
        kwargs = {{ width = 3 }}

        [architectures.no-colon]
        factory = "{module}.build_mlp"

        [architectures.typo-field]
        factory = "{module}:build_mlp"
        kwarg = {{ dim = 4 }}

        [architectures."bad/name"]
        factory = "{module}:build_mlp"
    """)
    registry = ArchitectureRegistry(config_path=config, entry_point_group=NO_PLUGINS)
    issues = registry.load()

    broken = ["missing-module", "missing-attribute", "raising", "not-a-module", "not-callable", "bad-kwargs",
              "no-colon", "typo-field", "bad/name"]
    assert sorted(i.name for i in issues) == sorted(broken)
    assert all(i.source == "config" for i in issues)
    assert "no_such_package_for_ckpt_tests" in issue_for(issues, "missing-module").error
    assert "build_nothing" in issue_for(issues, "missing-attribute").error
    assert "boom while building" in issue_for(issues, "raising").error
    assert "dict" in issue_for(issues, "not-a-module").error
    assert "width" in issue_for(issues, "bad-kwargs").error
    assert "'kwarg'" in issue_for(issues, "typo-field").error
    assert registry.issues == sorted(issues, key=lambda i: (i.source, i.name, i.error))
    assert issue_for(issues, "raising").to_dict() == {
        "name": "raising", "source": "config", "error": issue_for(issues, "raising").error,
    }
    # Everything else works.
    assert [a.name for a in registry.list()] == ["good", "mlp-bn", "tiny-convnet"]
    for name in broken:
        with pytest.raises(ArchitectureNotFound):
            registry.get(name)


@pytest.mark.parametrize("content", [None, "this is = = not toml", "architectures = 3"])
def test_missing_or_invalid_config_is_one_issue(tmp_path: Path, content: str | None) -> None:
    config = tmp_path / "ckpt.toml"
    if content is not None:
        config.write_text(content)
    registry = ArchitectureRegistry(config_path=config, entry_point_group=NO_PLUGINS)
    issues = registry.load()
    assert len(issues) == 1
    assert issues[0].source == "config" and issues[0].name == str(config)
    assert [a.name for a in registry.list()] == ["mlp-bn", "tiny-convnet"]


def test_example_config_from_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    registry = ArchitectureRegistry(config_path=PLUGIN_DIR / "ckpt.toml", entry_point_group=NO_PLUGINS)
    assert registry.load() == []

    from ckpt_example_plugin.models import build_bn_convnet, build_bn_mlp

    wide = registry.get("example-bn-mlp-wide")
    assert wide.source == "config"
    assert wide.spec == spec_from_module(build_bn_mlp(dim=64, depth=4, num_classes=100))
    assert wide.spec.keys["classifier.weight"].shape == (100, 64)
    conv = registry.get("example-bn-convnet-w16")
    assert conv.spec == spec_from_module(build_bn_convnet(width=16))
    assert verify_state_dict(build_bn_convnet(width=16).state_dict(), conv.verify_target()).ok
    assert not verify_state_dict(build_bn_convnet(width=8).state_dict(), conv.verify_target()).ok


def test_import_factory_resolves_dotted_attributes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = write_module(tmp_path / "mods", monkeypatch, """
        class Holder:
            @staticmethod
            def build():
                return 1
    """)
    assert import_factory(f"{module}:Holder.build")() == 1


# --- entry points -----------------------------------------------------------------------------------------


def test_example_plugin_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The example's pyproject declares the entry points; a fake dist-info carries them, as pip would write it.
    declared = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())["project"]["entry-points"]
    entry_points = declared["ckpt_service.architectures"]
    assert set(entry_points) == {"example-bn-convnet", "example-bn-mlp"}
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    write_distribution(tmp_path / "site", monkeypatch, "ckpt_example_plugin", entry_points)

    registry = ArchitectureRegistry()
    assert registry.load() == []

    from ckpt_example_plugin.models import build_bn_convnet, build_bn_mlp

    names = [a.name for a in registry.list()]
    assert names == ["example-bn-convnet", "example-bn-mlp", "mlp-bn", "tiny-convnet"]
    conv = registry.get("example-bn-convnet")
    assert conv.source == "entrypoint"
    assert conv.spec == spec_from_module(build_bn_convnet())
    assert conv.description == (build_bn_convnet.__doc__ or "").strip()
    assert registry.get("example-bn-mlp").spec == spec_from_module(build_bn_mlp())


def test_broken_entry_points_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = write_module(tmp_path / "mods", monkeypatch, GOOD_AND_BROKEN)
    group = "ckpt_service_tests.broken"
    write_distribution(tmp_path / "site", monkeypatch, "broken_plugin", {
        "ep-good": f"{module}:build_mlp",
        "ep-import-error": "no_such_package_for_ckpt_tests:build",
        "ep-raising": f"{module}:build_raising",
        "ep-not-module": f"{module}:build_not_a_module",
        "ep-not-callable": f"{module}:NOT_CALLABLE",
    }, group=group)

    registry = ArchitectureRegistry(entry_point_group=group, include_builtins=False)
    issues = registry.load()

    assert sorted(i.name for i in issues) == [
        "ep-import-error", "ep-not-callable", "ep-not-module", "ep-raising",
    ]
    assert all(i.source == "entrypoint" for i in issues)
    assert "boom while building" in issue_for(issues, "ep-raising").error
    assert [a.name for a in registry.list()] == ["ep-good"]
    assert registry.get("ep-good").source == "entrypoint"


# --- conflicts between sources ----------------------------------------------------------------------------


def test_first_source_wins_a_name_conflict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = write_module(tmp_path / "mods", monkeypatch, GOOD_AND_BROKEN)
    config = write_config(tmp_path / "ckpt.toml", f"""
        [architectures.tiny-convnet]
        factory = "{module}:build_mlp"

        [architectures.shared]
        factory = "{module}:build_mlp"
        kwargs = {{ depth = 1 }}
    """)
    group = "ckpt_service_tests.conflicts"
    write_distribution(tmp_path / "site", monkeypatch, "conflicting_plugin", {
        "shared": f"{module}:build_mlp",
        "mlp-bn": f"{module}:build_mlp",
    }, group=group)

    registry = ArchitectureRegistry(config_path=config, entry_point_group=group)
    issues = registry.load()

    assert sorted((i.name, i.source) for i in issues) == [
        ("mlp-bn", "entrypoint"), ("shared", "entrypoint"), ("tiny-convnet", "config"),
    ]
    assert "builtin" in issue_for(issues, "tiny-convnet").error
    assert registry.get("tiny-convnet").source == "builtin"
    assert registry.get("mlp-bn").source == "builtin"
    shared = registry.get("shared")
    assert shared.source == "config" and shared.to_dict()["key_count"] == 7  # depth=1 from the config
    assert [a.name for a in registry.list()] == ["mlp-bn", "shared", "tiny-convnet"]


def test_only_specs_can_be_deleted_or_shadowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = write_module(tmp_path / "mods", monkeypatch, GOOD_AND_BROKEN)
    config = write_config(tmp_path / "ckpt.toml", f'[architectures.cfg]\nfactory = "{module}:build_mlp"\n')
    registry = ArchitectureRegistry(
        specs_dir=tmp_path / "specs", config_path=config, entry_point_group=NO_PLUGINS
    )
    spec = spec_from_module(TinyConvNet())
    for name in ("tiny-convnet", "cfg"):
        with pytest.raises(ArchitectureConflict):
            registry.register_spec(name, spec)
        with pytest.raises(ArchitectureConflict, match="only specs can be deleted"):
            registry.delete(name)
        assert registry.get(name).source in ("builtin", "config")


# --- meta-device specs ------------------------------------------------------------------------------------


def test_spec_of_a_big_factory_allocates_no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = write_module(tmp_path / "mods", monkeypatch, """
        from torch import nn

        def build_big():
            return nn.Sequential(nn.Linear(50_000, 50_000), nn.BatchNorm1d(50_000))
    """)
    config = write_config(tmp_path / "ckpt.toml", f'[architectures.big]\nfactory = "{module}:build_big"\n')
    registry = ArchitectureRegistry(config_path=config, entry_point_group=NO_PLUGINS, include_builtins=False)
    peak_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    assert registry.load() == []
    big = registry.get("big")

    # 2.5e9 float32 weights would be 10 GB: the peak resident size must not have moved by anything close.
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kib
    assert grown_kib < 1 << 20
    assert big.spec.keys["0.weight"].shape == (50_000, 50_000)
    assert big.spec.keys["0.weight"].dtype == "float32"
    assert big.spec.keys["1.num_batches_tracked"].dtype == "int64"
    assert big.to_dict()["key_count"] == 7


def test_architecture_is_frozen_and_json_ready() -> None:
    arch = ArchitectureRegistry(entry_point_group=NO_PLUGINS).get("mlp-bn")
    assert isinstance(arch, Architecture)
    with pytest.raises(AttributeError):
        arch.name = "other"  # type: ignore[misc]
    import json

    assert json.loads(json.dumps(arch.to_dict(with_keys=True)))["keys"]["head.weight"] == {
        "shape": list(MLPBN().head.weight.shape),
        "dtype": str(torch.get_default_dtype()).removeprefix("torch."),
    }
