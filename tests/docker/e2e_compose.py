"""End-to-end check of the docker-compose stack, run from the host by `.ci/docker-e2e.sh`.

Not a pytest module (the name does not match `test_*.py`): it needs a running stack. It talks to the
container over HTTP only, with httpx, and checks the results with torch on the host:

    python tests/docker/e2e_compose.py recipe --base-url http://127.0.0.1:18765 --state STATE.json
    docker-compose restart
    python tests/docker/e2e_compose.py check --base-url http://127.0.0.1:18765 --state STATE.json

`recipe` follows the seed-freeze recipe: upload the original, name it, merge a trained file that has
`module.` prefixes and no BatchNorm running stats, against the built-in "tiny-convnet" and against an
architecture that the mounted plugin provides; download each result and load it with
`load_state_dict(strict=True)`. `check` runs after a restart and proves that the artifacts and names survived.
Any failure exits non-zero with a message that says which step failed.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "plugin")]

from service.registry.builtins import TinyConvNet  # noqa: E402
from tests.factories import make_original, make_trained, set_bn_stats_mode  # noqa: E402

# The plugin is imported by name, as the server does: it is not installed, only on sys.path.
_PLUGIN_MODELS = importlib.import_module("ckpt_example_plugin.models")

ORIGINAL_NAME = "e2e-tiny-original"
MERGED_NAME = "e2e-tiny-merged"
PLUGIN_MERGED_NAME = "e2e-plugin-merged"
PLUGIN_ARCHITECTURE = "bn-convnet"  # from deploy/ckpt.toml, served from the mounted plugin


class E2EFailure(Exception):
    """A step of the end-to-end run did not give the expected result."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise E2EFailure(message)


def _step(message: str) -> None:
    print(f"e2e: ok: {message}", flush=True)


def _expect(response: httpx.Response, *statuses: int) -> Any:
    if response.status_code not in statuses:
        raise E2EFailure(f"{response.request.method} {response.request.url.path} answered "
                         f"{response.status_code}, expected {statuses}: {response.text[:500]}")
    ctype = response.headers.get("content-type", "")
    return response.json() if "json" in ctype else response.content


def _pth_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


def _load_strict(blob: bytes, build: Callable[[], nn.Module]) -> nn.Module:
    state_dict = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    model = build()
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> list[str]:
    return sorted(k for k in keys if not torch.equal(a[k], b[k]))


def _build_plugin_model() -> nn.Module:
    model: nn.Module = _PLUGIN_MODELS.BNConvNet()
    return model


def _plugin_original(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = _build_plugin_model()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8))  # non-trivial running stats
    return model.eval()


def _plugin_trained(original: nn.Module, seed: int) -> nn.DataParallel[nn.Module]:
    # The recipe on another architecture: frozen backbone, BN in stats mode, DataParallel, train the head.
    torch.manual_seed(seed)
    model = copy.deepcopy(original)
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith("backbone.")
    set_bn_stats_mode(model)
    wrapped = nn.DataParallel(model)
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    wrapped.train()
    for _ in range(3):
        opt.zero_grad()
        wrapped(torch.randn(4, 3, 8, 8)).pow(2).mean().backward()
        opt.step()
    return wrapped


def _wait_ready(client: httpx.Client, *, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            health = client.get("/healthz")
            ready = client.get("/readyz")
            if health.status_code == 200 and ready.status_code == 200:
                _step("/healthz and /readyz answer 200")
                return
            last = f"/healthz {health.status_code}, /readyz {ready.status_code}: {ready.text[:200]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(1)
    raise E2EFailure(f"the service did not become ready within {timeout:.0f} s ({last})")


def _download(client: httpx.Client, url: str) -> bytes:
    blob = _expect(client.get(url), 200)
    _check(isinstance(blob, bytes) and len(blob) > 0, f"empty download from {url}")
    return bytes(blob)


def _check_recipe_result(merged: nn.Module, original: nn.Module, trained: nn.Module, *,
                         frozen_prefix: str, label: str) -> None:
    got = merged.state_dict()
    orig = original.state_dict()
    tuned = {k.removeprefix("module."): v for k, v in trained.state_dict().items()}
    bn_stats = [k for k in orig if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    _check(bool(bn_stats) and not any(k in tuned for k in bn_stats),
           f"{label}: the trained file should lack the BN stats")
    wrong = _same_tensors(got, orig, bn_stats)
    _check(not wrong, f"{label}: BN stats not taken from the original: {wrong}")
    wrong = _same_tensors(got, tuned, list(tuned))
    _check(not wrong, f"{label}: trained tensors changed by the merge: {wrong}")
    frozen = [k for k in tuned if k.startswith(frozen_prefix)]
    _check(bool(frozen) and not _same_tensors(got, orig, frozen), f"{label}: frozen backbone moved")
    head = [k for k in tuned if not k.startswith(frozen_prefix)]
    _check(bool(_same_tensors(got, orig, head)), f"{label}: the head did not train")
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        _check(bool(torch.isfinite(merged(x)).all()), f"{label}: non-finite output")


def run_recipe(client: httpx.Client, state_path: Path, *, token: str | None) -> None:
    """Run the recipe through the service and write what `check` needs.

    Args:
        client: An httpx client on the service's base URL, with the token header if there is one.
        state_path: Where to write the ids, names and digests of the stored artifacts (JSON).
        token: The write token the service was given, or None when it runs open.

    Raises:
        E2EFailure: A step answered differently than the recipe requires.
    """
    _wait_ready(client)
    if token:
        anonymous = httpx.Client(base_url=client.base_url, timeout=client.timeout)
        with anonymous:
            _expect(anonymous.get("/names"), 401)
            _expect(anonymous.post("/checkpoints", files={"file": ("x.pth", b"x")}), 401)
        _step("the token from the env file is enforced (401 without it)")

    architectures = _expect(client.get("/architectures"), 200)
    names = {a["name"] for a in architectures["items"]}
    wanted = {"tiny-convnet", PLUGIN_ARCHITECTURE, "bn-mlp-wide"}
    _check(wanted <= names, f"architectures missing: {sorted(wanted - names)} (have {sorted(names)})")
    _step("built-in and plugin architectures are registered (config file and plugin mount work)")

    # 1. The original, uploaded with its digest, then named.
    original = make_original(seed=0)
    original_blob = _pth_bytes(original.state_dict())
    digest = hashlib.sha256(original_blob).hexdigest()
    uploaded = _expect(client.post("/checkpoints", files={"file": ("original.pth", original_blob)},
                                   data={"sha256": digest}), 200, 201)
    original_id = uploaded["id"]
    named = _expect(client.put(f"/names/{ORIGINAL_NAME}", json={"id": original_id}), 200, 201)
    _check(named["id"] == original_id, f"name points to {named['id']}, not {original_id}")
    _step(f"original uploaded ({original_id[:12]}) and named {ORIGINAL_NAME!r}")

    # 2. The trained file: DataParallel `module.` prefixes, BN buffers gone (track_running_stats=False).
    trained = make_trained(original)
    trained_sd = trained.state_dict()
    _check(all(k.startswith("module.") for k in trained_sd), "the trained keys should have 'module.'")
    merged_out = _expect(client.post(
        "/merge", data={"original": ORIGINAL_NAME, "architecture": "tiny-convnet", "name": MERGED_NAME},
        files={"trained_file": ("trained.pth", _pth_bytes(trained_sd))}), 201, 200)
    merged_blob = _download(client, merged_out["download_url"])
    merged = _load_strict(merged_blob, TinyConvNet)
    _check_recipe_result(merged, original, trained, frozen_prefix="features.", label="tiny-convnet")
    _step(f"merged against 'tiny-convnet' ({merged_out['id'][:12]}); strict load on the host passes")

    # 3. A wrong architecture is refused with 422 and stores nothing.
    refused = client.post("/merge", data={"original": ORIGINAL_NAME, "architecture": PLUGIN_ARCHITECTURE},
                          files={"trained_file": ("trained.pth", _pth_bytes(trained_sd))})
    _expect(refused, 422)
    _step(f"merging a tiny-convnet into {PLUGIN_ARCHITECTURE!r} is refused with 422")

    # 4. The plugin architecture, both files uploaded in the merge request itself.
    plugin_original = _plugin_original(seed=2)
    plugin_trained = _plugin_trained(plugin_original, seed=3)
    plugin_out = _expect(client.post(
        "/merge", data={"architecture": PLUGIN_ARCHITECTURE, "name": PLUGIN_MERGED_NAME},
        files={"original_file": ("plugin-original.pth", _pth_bytes(plugin_original.state_dict())),
               "trained_file": ("plugin-trained.pth", _pth_bytes(plugin_trained.state_dict()))}), 201, 200)
    plugin_blob = _download(client, plugin_out["download_url"])
    plugin_merged = _load_strict(plugin_blob, _build_plugin_model)
    _check_recipe_result(plugin_merged, plugin_original, plugin_trained, frozen_prefix="backbone.",
                         label=PLUGIN_ARCHITECTURE)
    _step(f"merged against plugin architecture {PLUGIN_ARCHITECTURE!r}; strict load on the host passes")

    state = {
        "artifacts": {
            ORIGINAL_NAME: {"id": original_id, "sha256": hashlib.sha256(
                _download(client, f"/checkpoints/{original_id}/file")).hexdigest(), "architecture": None},
            MERGED_NAME: {"id": merged_out["id"], "sha256": hashlib.sha256(merged_blob).hexdigest(),
                          "architecture": "tiny-convnet"},
            PLUGIN_MERGED_NAME: {"id": plugin_out["id"], "sha256": hashlib.sha256(plugin_blob).hexdigest(),
                                 "architecture": PLUGIN_ARCHITECTURE},
        },
    }
    state_path.write_text(json.dumps(state, indent=2))
    _step(f"state written to {state_path}")


def run_check(client: httpx.Client, state_path: Path) -> None:
    """Check, after a restart, that every artifact is there by id and by name, with the same bytes.

    Args:
        client: An httpx client on the service's base URL, with the token header if there is one.
        state_path: The JSON file that `run_recipe` wrote.

    Raises:
        E2EFailure: An artifact or a name is missing, or its bytes changed.
    """
    _wait_ready(client)
    state = json.loads(state_path.read_text())
    builders: dict[str, Callable[[], nn.Module]] = {"tiny-convnet": TinyConvNet,
                                                    PLUGIN_ARCHITECTURE: _build_plugin_model}
    for name, expected in state["artifacts"].items():
        by_id = _expect(client.get(f"/checkpoints/{expected['id']}"), 200)
        by_name = _expect(client.get(f"/checkpoints/{name}"), 200)
        _check(by_id["id"] == by_name["id"] == expected["id"],
               f"{name!r}: id {by_id['id']} / name {by_name['id']}, expected {expected['id']}")
        blob = _download(client, f"/checkpoints/{name}/file")
        _check(hashlib.sha256(blob).hexdigest() == expected["sha256"], f"{name!r}: bytes changed")
        if expected["architecture"] is not None:
            _load_strict(blob, builders[expected["architecture"]])
        _step(f"{name!r} survived: same id by id and by name, same bytes")


def main(argv: list[str] | None = None) -> int:
    """Run one phase from the command line.

    Args:
        argv: The arguments; None reads `sys.argv`.

    Returns:
        0 when every check passed, 1 otherwise (the message is on stderr).
    """
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["recipe", "check"])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--state", type=Path, required=True,
                        help="JSON file: written by recipe, read by check")
    parser.add_argument("--token", default=os.environ.get("CKPT_E2E_TOKEN"), help="a write token, if any")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        with httpx.Client(base_url=args.base_url, headers=headers, timeout=120.0) as client:
            if args.phase == "recipe":
                run_recipe(client, args.state, token=args.token)
            else:
                run_check(client, args.state)
    except (E2EFailure, httpx.HTTPError, RuntimeError, OSError, KeyError, ValueError) as exc:
        print(f"e2e: FAILED ({args.phase}): {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"e2e: {args.phase}: all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
