"""Merges that protect the user: partial inputs reported (and refused with require_complete), shards warned about,
swapped inputs refused (allow_swapped overrides), and wrapper prefixes lined up without an architecture (Lightning's
module attribute, normalize_prefixes=align, POST /strip like=...). Real tiny models, real files, the app in-process.
"""

from __future__ import annotations

import copy
import io
from collections import OrderedDict
from typing import Any

import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient
from torch import nn

from tests.factories import LightningLike, TinyConvNet, make_original, make_trained, set_bn_stats_mode

BACKBONE = sorted(f"features.{i}.{n}" for i, n in (("0", "weight"), ("1", "weight"), ("1", "bias"),
                                                    ("3", "weight"), ("4", "weight"), ("4", "bias")))


def _pth(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _upload(client: TestClient, data: bytes, filename: str) -> str:
    r = client.post("/checkpoints", files={"file": (filename, data)})
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


def _merge(client: TestClient, original: tuple[str, bytes], trained: tuple[str, bytes], **fields: str) -> Any:
    """Both sides as uploads (so that a refused merge must leave the store empty)."""
    return client.post(
        "/merge",
        data={"architecture": "tiny-convnet", **fields},
        files={"original_file": original, "trained_file": trained},
    )


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    original = make_original()
    trained = make_trained(original)  # DataParallel, track_running_stats=False: "module.*", no BN stats
    return {"original": original.state_dict(), "trained": trained.state_dict()}


def _total(client: TestClient) -> int:
    return int(client.get("/checkpoints").json()["total"])


# -- partial inputs -------------------------------------------------------------------------------------------


def test_a_head_only_trained_file_is_merged_and_its_filled_backbone_reported(
    client: TestClient, models: dict[str, Any]
) -> None:
    head = OrderedDict((k, v) for k, v in models["trained"].items() if k.startswith("module.head."))
    r = _merge(client, ("original.pth", _pth(models["original"])), ("head.pth", _pth(head)))
    assert r.status_code == 201, r.text
    report = r.json()["report"]
    assert report["verification"]["ok"] is True
    assert report["filled_parameters"] == {"count": 6, "total": 8, "modules": {"features": 6}}
    warning = next(w for w in report["warnings"] if "parameters were taken from the original" in w)
    assert warning.startswith("6 of 8 parameters") and "'features' (6)" in warning and "require_complete" in warning
    assert report["shards"] == {"original": None, "trained": None}
    assert not any("shard" in w for w in report["warnings"])


def test_the_recipe_fills_no_parameter_and_passes_require_complete(
    client: TestClient, models: dict[str, Any]
) -> None:
    r = _merge(client, ("original.pth", _pth(models["original"])), ("trained.pth", _pth(models["trained"])),
               require_complete="true")
    assert r.status_code == 201, r.text
    report = r.json()["report"]
    assert report["filled_parameters"]["count"] == 0 and len(report["filled"]) == 6  # only BN running stats
    assert report["warnings"] == []
    lineage = r.json()["artifact"]["lineage"]
    assert lineage["params"]["require_complete"] is True and "allow_swapped" not in lineage["params"]


def test_require_complete_makes_a_filled_parameter_a_422_naming_the_keys_and_stores_nothing(
    client: TestClient, models: dict[str, Any]
) -> None:
    head = OrderedDict((k, v) for k, v in models["trained"].items() if k.startswith("module.head."))
    r = _merge(client, ("original.pth", _pth(models["original"])), ("head.pth", _pth(head)),
               require_complete="true")
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["type"] == "urn:ckpt:problem:incomplete-trained"
    assert problem["title"] == "Trained checkpoint incomplete"
    assert problem["filled_keys"] == BACKBONE
    assert ", ".join(repr(k) for k in BACKBONE) in problem["detail"]  # sorted and quoted
    assert problem["report"]["filled_parameters"]["count"] == 6
    assert _total(client) == 0
    bad = _merge(client, ("o.pth", _pth(models["original"])), ("h.pth", _pth(head)), require_complete="maybe")
    assert bad.status_code == 400 and "require_complete" in bad.json()["detail"]


def test_require_complete_truncates_a_long_key_list(client: TestClient) -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
    original = model.state_dict()
    r = client.post("/architectures", json={"name": "six-linear", "keys": {
        k: {"shape": list(v.shape), "dtype": "float32"} for k, v in original.items()}})
    assert r.status_code == 201, r.text
    last = OrderedDict((k, v) for k, v in original.items() if k.startswith("5."))
    r = client.post("/merge", data={"architecture": "six-linear", "require_complete": "true"},
                    files={"original_file": ("o.pth", _pth(original)), "trained_file": ("t.pth", _pth(last))})
    assert r.status_code == 422, r.text
    assert len(r.json()["filled_keys"]) == 10 and "(+2 more)" in r.json()["detail"]


@pytest.mark.parametrize(
    ("filename", "shard"),
    [("model-00001-of-00002.safetensors", "shard 1 of 2"), ("pytorch_model-00002-of-00003.bin", "shard 2 of 3")],
)
def test_a_file_named_like_a_shard_warns_and_require_complete_says_so(
    client: TestClient, models: dict[str, Any], filename: str, shard: str
) -> None:
    part = OrderedDict((k.removeprefix("module."), v) for k, v in models["trained"].items() if "head." in k)
    data = safetensors.torch.save(dict(part)) if filename.endswith(".safetensors") else _pth(part)
    r = _merge(client, ("original.pth", _pth(models["original"])), (filename, data))
    assert r.status_code == 201, r.text
    report = r.json()["report"]
    evidence = report["shards"]["trained"]
    assert (evidence["source"], evidence["filename"]) == ("filename", filename)
    warning = next(w for w in report["warnings"] if "looks like" in w)
    assert shard in warning and filename in warning
    refused = _merge(client, ("original.pth", _pth(models["original"])), (filename, data), require_complete="true")
    assert refused.status_code == 422 and f"(it looks like {shard})" in refused.json()["detail"]


# -- swapped inputs -------------------------------------------------------------------------------------------


def test_swapped_inputs_are_refused_and_the_right_order_is_not(client: TestClient, models: dict[str, Any]) -> None:
    original = ("original.pth", _pth(models["original"]))
    trained = ("trained.pth", _pth(models["trained"]))
    right = _merge(client, original, trained)
    assert right.status_code == 201, right.text
    assert right.json()["report"]["swap"] == {"swapped": False, "original_prefixes": [], "bn_stats": []}
    assert not any("swapped" in w for w in right.json()["report"]["warnings"])

    client.delete(f"/checkpoints/{right.json()['id']}")
    before = _total(client)
    wrong = _merge(client, trained, original)
    assert wrong.status_code == 422, wrong.text
    problem = wrong.json()
    assert problem["type"] == "urn:ckpt:problem:inputs-swapped"
    assert problem["title"] == "Original and trained look swapped"
    assert "'module.'" in problem["detail"] and "allow_swapped=true" in problem["detail"]
    assert problem["keys"] == sorted(f"features.{i}.{n}" for i in (1, 4)
                                     for n in ("num_batches_tracked", "running_mean", "running_var"))
    assert problem["report"]["swap"]["swapped"] is True
    assert _total(client) == before  # nothing stored, not even the uploads

    allowed = _merge(client, trained, original, allow_swapped="true")
    assert allowed.status_code == 201, allowed.text
    assert any(w.startswith("original and trained look swapped (allowed by allow_swapped)")
               for w in allowed.json()["report"]["warnings"])
    assert allowed.json()["artifact"]["lineage"]["params"]["allow_swapped"] is True


def test_swapped_by_stored_refs_too(client: TestClient, models: dict[str, Any]) -> None:
    orig = _upload(client, _pth(models["original"]), "original.pth")
    tr = _upload(client, _pth(models["trained"]), "trained.pth")
    r = client.post("/merge", data={"architecture": "tiny-convnet", "original": tr, "trained": orig})
    assert r.status_code == 422 and r.json()["type"] == "urn:ckpt:problem:inputs-swapped"


def test_one_swap_signal_is_only_a_warning(client: TestClient, models: dict[str, Any]) -> None:
    model = make_original()
    # the original was saved under DataParallel but keeps its stats: the wrapper sign alone
    wrapped = nn.DataParallel(model).state_dict()
    r = _merge(client, ("original.pth", _pth(wrapped)), ("trained.pth", _pth(model.state_dict())))
    assert r.status_code == 201, r.text
    warning = next(w for w in r.json()["report"]["warnings"] if "swapped" in w)
    assert warning.startswith("original and trained may be swapped: the original has wrapper prefixes ('module.')")
    assert "BatchNorm" not in warning

    # the original has no running stats (saved from a stats-mode model) and no wrapper: the BatchNorm sign alone
    no_stats = copy.deepcopy(model)
    set_bn_stats_mode(no_stats)
    r = _merge(client, ("original.pth", _pth(no_stats.state_dict())), ("trained.pth", _pth(model.state_dict())))
    assert r.status_code == 200, r.text  # the same merged bytes as above: the stored result is answered
    warning = next(w for w in r.json()["report"]["warnings"] if "swapped" in w)
    assert "may be swapped: BatchNorm running stats are missing from the original" in warning


# -- prefixes without an architecture -------------------------------------------------------------------------


def _lightning_file(model: nn.Module, attribute: str = "model") -> bytes:
    """A dict shaped like a Lightning Trainer checkpoint."""
    holder = nn.Module()
    holder.add_module(attribute, model)
    return _pth({"epoch": 3, "global_step": 12, "pytorch-lightning_version": "2.4.0",
                 "state_dict": holder.state_dict(), "hyper_parameters": {"lr": 0.01, "width": 8}})


def test_lightning_module_attribute_is_a_wrapper_for_strip_diff_and_merge(client: TestClient) -> None:
    model = make_original()
    plain = model.state_dict()
    lit = _upload(client, _lightning_file(model, "net"), "epoch=3-step=12.ckpt")
    assert "pytorch-lightning_version" in client.get(f"/checkpoints/{lit}").json()["extras"]
    clean = _upload(client, _pth(plain), "clean.pth")

    stripped = client.post("/strip", json={"checkpoint": lit})
    assert stripped.status_code == 201, stripped.text
    assert stripped.json()["report"]["applied"] == {"net.": len(plain)}
    assert list(client.get(f"/checkpoints/{stripped.json()['id']}/manifest").json()["entries"]) == list(plain)
    diff = client.get("/diff", params={"a": clean, "b": stripped.json()["id"]}).json()
    assert diff["summary"]["unchanged"] == len(plain) and diff["summary"]["only_in_a"] == 0

    normalized = client.get("/diff", params={"a": clean, "b": lit, "normalize_prefixes": "true"}).json()
    assert normalized["summary"]["unchanged"] == len(plain) and normalized["summary"]["only_in_b"] == 0
    assert "alignment" not in normalized

    known = client.post("/merge", data={"architecture": "tiny-convnet", "original": clean, "trained": lit,
                                        "strip_prefixes": "known"})
    assert known.status_code in (200, 201), known.text
    assert known.json()["report"]["prefixes"]["trained"]["applied"] == {"net.": len(plain)}


def test_the_same_keys_outside_a_lightning_file_are_left_alone(client: TestClient) -> None:
    model = make_original()
    held = _upload(client, _pth(LightningLike(model).state_dict()), "held.pth")  # "model.*", not Lightning's
    clean = _upload(client, _pth(model.state_dict()), "clean.pth")
    assert client.post("/strip", json={"checkpoint": held}).json()["report"]["applied"] == {}
    plain = client.get("/diff", params={"a": clean, "b": held, "normalize_prefixes": "true"}).json()
    assert plain["summary"]["unchanged"] == 0 and plain["summary"]["only_in_a"] == 14
    known = client.post("/merge", data={"architecture": "tiny-convnet", "original": clean, "trained": held,
                                        "strip_prefixes": "known"})
    assert known.status_code == 422  # "model.*" is unexpected for the architecture: nothing was stripped


def test_diff_align_finds_the_transform_of_each_side(client: TestClient, models: dict[str, Any]) -> None:
    model = make_original()
    clean = _upload(client, _pth(model.state_dict()), "clean.pth")
    held = _upload(client, _pth(LightningLike(model).state_dict()), "held.pth")
    trained = _upload(client, _pth(models["trained"]), "trained.pth")

    aligned = client.get("/diff", params={"a": held, "b": clean, "normalize_prefixes": "align"})
    assert aligned.status_code == 200, aligned.text
    body = aligned.json()
    assert body["normalized"] is True and body["summary"]["unchanged"] == 14
    assert body["alignment"]["a"]["strip_lead"] == "model." and body["alignment"]["b"]["strip_lead"] is None
    assert body["alignment"]["matched"] == 14

    wrapped = client.get("/diff", params={"a": trained, "b": held, "normalize_prefixes": "align",
                                          "values": "true", "frozen": "features."}).json()
    assert wrapped["alignment"]["a"]["strip_wrappers"] is True and wrapped["alignment"]["b"]["strip_lead"] == "model."
    assert wrapped["summary"]["only_in_b"] == 6 and wrapped["summary"]["changed"] == 2  # BN stats, the head
    assert set(wrapped["values"]) == {"head.weight", "head.bias"} and wrapped["frozen"]["ok"] is True

    posted = client.post("/diff", params={"normalize_prefixes": "align"},
                         files={"a": ("held.pth", _pth(LightningLike(model).state_dict())),
                                "b": ("clean.pth", _pth(model.state_dict()))})
    assert posted.status_code == 200 and posted.json()["summary"]["unchanged"] == 14
    assert client.get("/diff", params={"a": held, "b": clean, "normalize_prefixes": "sideways"}).status_code == 422


def test_strip_like_another_checkpoint_or_an_architecture(client: TestClient, models: dict[str, Any]) -> None:
    model = make_original()
    trained = _upload(client, _pth(models["trained"]), "trained.pth")  # "module.*"
    held = _upload(client, _pth(LightningLike(model).state_dict()), "held.pth")  # "model.*"

    like = client.post("/strip", json={"checkpoint": trained, "like": held})
    assert like.status_code == 201, like.text
    report = like.json()["report"]
    assert report["transform"] == {"strip_wrappers": True, "strip_lead": None, "strip": [], "add": "model."}
    assert report["matched"] == 8 and report["target_keys"] == 14  # the trained file has no BN stats
    entries = client.get(f"/checkpoints/{like.json()['id']}/manifest").json()["entries"]
    assert sorted(entries) == sorted("model." + k.removeprefix("module.") for k in models["trained"])
    assert like.json()["artifact"]["lineage"]["params"]["like"] == held

    arch = client.post("/strip", json={"checkpoint": held, "like_architecture": "tiny-convnet"})
    assert arch.status_code == 201, arch.text
    assert list(client.get(f"/checkpoints/{arch.json()['id']}/manifest").json()["entries"]) == list(
        TinyConvNet().state_dict())
    assert arch.json()["artifact"]["lineage"]["params"]["like_architecture"] == "tiny-convnet"

    assert client.post("/strip", json={"checkpoint": held, "like_architecture": "nope"}).status_code == 404
    assert client.post("/strip", json={"checkpoint": held, "like": "f" * 64}).status_code == 404
    both = client.post("/strip", json={"checkpoint": held, "like": trained, "like_architecture": "tiny-convnet"})
    assert both.status_code == 400
    mixed = client.post("/strip", json={"checkpoint": held, "like": trained, "prefixes": ["model."]})
    assert mixed.status_code == 400 and "not both" in mixed.json()["detail"]
