"""POST /merge, POST /strip and GET/POST /diff through the real app in-process."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from tests.factories import TinyConvNet


def _upload(client: TestClient, path: Path, name: str | None = None) -> str:
    data = {"name": name} if name else {}
    with path.open("rb") as fh:
        r = client.post("/checkpoints", files={"file": (path.name, fh)}, data=data)
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


def _merge(client: TestClient, files: dict[str, Path], **fields: str):  # type: ignore[no-untyped-def]
    with files["trained"].open("rb") as fh:
        return client.post(
            "/merge",
            data={"architecture": "tiny-convnet", **fields},
            files={"trained_file": ("trained.pth", fh)},
        )


def test_merge_recipe_by_name_and_upload(
    client: TestClient, recipe_files: dict[str, Path], tmp_path: Path
) -> None:
    _upload(client, recipe_files["original"], name="tiny-orig")
    r = _merge(client, recipe_files, original="tiny-orig", frozen_prefixes="features.")
    assert r.status_code == 201, r.text
    body = r.json()
    report = body["report"]
    assert report["prefixes"]["trained"]["applied"] == {"module.": 8}
    assert report["verification"]["ok"] is True
    assert "features.1.running_mean" in report["filled"]
    assert report["provenance_counts"]["original"] == len(report["filled"])
    assert report["frozen"]["changed"] == [] and report["frozen"]["checked"] == 6

    blob = client.get(body["download_url"])
    out = tmp_path / "final.pth"
    out.write_bytes(blob.content)
    final = torch.load(out)  # plain torch.load: the file is a directly usable model file
    model = TinyConvNet()
    model.load_state_dict(final, strict=True)
    original = torch.load(recipe_files["original"], weights_only=True)
    trained = torch.load(recipe_files["trained"], weights_only=True)
    assert torch.equal(final["features.0.weight"], original["features.0.weight"])
    assert torch.equal(final["features.1.running_var"], original["features.1.running_var"])
    assert torch.equal(final["head.weight"], trained["module.head.weight"])
    assert not torch.equal(final["head.weight"], original["head.weight"])

    meta = client.get(f"/checkpoints/{body['id']}").json()
    lineage = meta["lineage"]
    assert lineage["operation"] == "merge"
    assert lineage["inputs"]["original"] == client.get("/checkpoints/tiny-orig").json()["id"]
    assert lineage["report"]["provenance"]["head.weight"]["source"] == "trained"
    assert lineage["report"]["provenance"]["features.1.running_mean"]["source"] == "original"
    # The uploaded trained file became an artifact too, so the lineage points at something real.
    assert client.head(f"/checkpoints/{lineage['inputs']['trained']}").status_code == 200


def test_merge_is_deterministic(client: TestClient, recipe_files: dict[str, Path]) -> None:
    orig = _upload(client, recipe_files["original"])
    first = _merge(client, recipe_files, original=orig)
    second = _merge(client, recipe_files, original=orig)
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    # No frozen_prefixes, no frozen check: the trained head is what a fine-tune changes, not a warning.
    assert first.json()["report"]["frozen"] is None
    assert not any("frozen" in w for w in first.json()["report"]["warnings"])
    st = _merge(client, recipe_files, original=orig, output_format="safetensors", name="final-st")
    assert st.status_code == 201 and st.json()["id"] != first.json()["id"]
    assert st.json()["artifact"]["format"] == "safetensors"
    assert st.json()["artifact"]["names"] == ["final-st"]


def test_merge_verification_failure_is_422_with_keys_and_stores_nothing(
    client: TestClient, recipe_files: dict[str, Path]
) -> None:
    orig = _upload(client, recipe_files["original"])
    before = client.get("/checkpoints").json()["total"]
    bad = {k: v for k, v in torch.load(recipe_files["trained"], weights_only=True).items()}
    bad["module.head.weight"] = torch.zeros(3, 16)  # wrong shape
    bad["module.extra.weight"] = torch.zeros(1)
    buf = io.BytesIO()
    torch.save(bad, buf)
    r = client.post(
        "/merge",
        data={"architecture": "tiny-convnet", "original": orig},
        files={"trained_file": ("bad.pth", buf.getvalue())},
    )
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["title"] == "Verification failed"
    assert problem["unexpected_keys"] == ["extra.weight"]
    assert "head.weight" in problem["report"]["verification"]["shape_mismatches"]
    assert "'head.weight'" in problem["detail"]
    assert client.get("/checkpoints").json()["total"] == before
    # drop_unexpected removes the extra key, the shape mismatch still fails
    r2 = client.post(
        "/merge",
        data={"architecture": "tiny-convnet", "original": orig, "drop_unexpected": "true"},
        files={"trained_file": ("bad.pth", buf.getvalue())},
    )
    assert r2.status_code == 422 and r2.json()["unexpected_keys"] == []


def test_merge_input_errors(client: TestClient, recipe_files: dict[str, Path]) -> None:
    orig = _upload(client, recipe_files["original"])
    r = client.post("/merge", data={"architecture": "nope", "original": orig, "trained": orig})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    r = client.post("/merge", data={"architecture": "tiny-convnet", "trained": orig})
    assert r.status_code == 400 and "original" in r.json()["detail"]
    r = client.post(
        "/merge", data={"architecture": "tiny-convnet", "original": orig, "trained": orig, "trianed": "typo"}
    )
    assert r.status_code == 400 and "trianed" in r.json()["detail"]


def test_strip_endpoint(client: TestClient, recipe_files: dict[str, Path]) -> None:
    tid = _upload(client, recipe_files["trained"])
    r = client.post("/strip", json={"checkpoint": tid, "name": "stripped"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["report"]["applied"] == {"module.": 8}
    manifest = client.get(f"/checkpoints/{body['id']}/manifest").json()
    assert all(not k.startswith("module.") for k in manifest["entries"])
    assert body["artifact"]["lineage"]["inputs"] == {"checkpoint": tid}


def test_diff_get_with_frozen_and_values(client: TestClient, recipe_files: dict[str, Path]) -> None:
    a = _upload(client, recipe_files["original"])
    b = _upload(client, recipe_files["trained"])
    raw = client.get("/diff", params={"a": a, "b": b}).json()
    assert raw["summary"]["only_in_b"] == 8 and raw["summary"]["unchanged"] == 0
    r = client.get(
        "/diff", params={"a": a, "b": b, "normalize_prefixes": True, "frozen": "features.", "values": True}
    )
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["summary"]["changed"] == 2  # the head
    assert set(d["keys"]["changed"]["keys"]) == {"head.weight", "head.bias"}
    assert d["summary"]["only_in_a"] == 6  # two BatchNorms' running stats
    assert d["frozen"]["changed"] == [] and d["frozen"]["checked"] == 6
    everything = client.get(
        "/diff", params={"a": a, "b": b, "normalize_prefixes": True, "frozen": "true"}
    ).json()
    assert set(everything["frozen"]["changed"]) == {"head.weight", "head.bias"}
    assert d["values"]["head.weight"]["max_abs"] > 0
    small = client.get(
        "/diff", params={"a": a, "b": b, "normalize_prefixes": True, "category": "only_in_a", "limit": 2}
    ).json()
    assert list(small["keys"]) == ["only_in_a"]
    assert small["keys"]["only_in_a"]["truncated"] is True and len(small["keys"]["only_in_a"]["keys"]) == 2


def test_diff_post_two_files(client: TestClient, recipe_files: dict[str, Path]) -> None:
    with recipe_files["original"].open("rb") as fa, recipe_files["trained"].open("rb") as fb:
        r = client.post(
            "/diff", params={"normalize_prefixes": True}, files={"a": ("a.pth", fa), "b": ("b.pth", fb)}
        )
    assert r.status_code == 200, r.text
    assert r.json()["summary"]["changed"] == 2
    assert client.get("/checkpoints").json()["total"] == 0  # nothing stored


def test_diff_post_file_against_stored_ref(client: TestClient, recipe_files: dict[str, Path]) -> None:
    a = _upload(client, recipe_files["original"])
    with recipe_files["trained"].open("rb") as fb:
        r = client.post(
            "/diff", params={"normalize_prefixes": True}, data={"a": a}, files={"b": ("b.pth", fb)}
        )
    assert r.status_code == 200, r.text
    assert r.json()["a"] == a and r.json()["summary"]["changed"] == 2
    assert client.get("/checkpoints").json()["total"] == 1
    missing = client.post("/diff", data={"a": a}, files={"x": ("b.pth", b"123")})
    assert missing.status_code == 400


def test_a_repeated_diff_is_served_from_its_rendering_and_follows_deletes(
    client: TestClient, recipe_files: dict[str, Path]
) -> None:
    a = _upload(client, recipe_files["original"])
    b = _upload(client, recipe_files["trained"])
    services = client.app.state.services  # type: ignore[attr-defined]
    url = f"/diff?a={a}&b={b}&normalize_prefixes=true"
    first = client.get(url)
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    assert first.json()["summary"]["changed"] > 0
    key = (a, b, True, (), None, 1000)
    assert services.rendered_diffs.get(key) == first.content
    assert client.get(url).content == first.content
    # other options are other renderings
    limited = client.get(f"{url}&limit=1&category=changed").json()
    assert list(limited["keys"]) == ["changed"] and len(limited["keys"]["changed"]["keys"]) == 1
    # values are never cached (they read the blobs)
    with_values = client.get(f"{url}&values=true")
    assert with_values.status_code == 200 and with_values.json()["values"] is not None
    # a deleted artifact is a 404, whatever was rendered before
    assert client.delete(f"/checkpoints/{b}").status_code in (200, 204)
    assert client.get(url).status_code == 404


def test_the_rendered_cache_is_bounded_by_bytes() -> None:
    from service.api.deps import RenderedCache

    cache = RenderedCache(max_bytes=100)
    cache.put("too big", b"x" * 26)  # over a quarter of the budget: never kept
    assert cache.get("too big") is None
    for i in range(5):
        cache.put(i, bytes([i]) * 25)
    assert cache.get(0) is None and cache.get(1) == b"\x01" * 25  # the oldest went first
    cache.put(5, b"y" * 25)  # 1 was used last, so 2 goes now
    assert cache.get(1) is not None and cache.get(2) is None
