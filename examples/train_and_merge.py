"""The frozen-backbone recipe end to end, as a cluster job runs it, the service doing the post-processing.

1. A "pretrained" TinyConvNet is saved to original.pth (BatchNorm running stats included).
2. Training side (service.training): load it, freeze the backbone's parameters by state_dict, put the frozen
   BatchNorm layers in the recipe's `stats` mode (momentum=0, track_running_stats=False: their running stats
   leave the state_dict), wrap in nn.DataParallel, train the head for a few steps, save trained.pth. Its keys
   carry the `module.` prefix and lack the BN stats, so it does not load strictly into the plain model.
3. Service side (service.client): push the original under a name, merge the trained file against the
   registered architecture "tiny-convnet" (prefixes stripped, BN stats filled from the original, verified with
   load_state_dict(strict=True) on the service), pull the final file (sha256-verified).
4. Check: the final file loads with strict=True into a fresh model and into the trained model after
   unfreeze_batchnorm (recipe step 5.1); the head is the trained one, the backbone and BN stats the original.

Usage:
    python examples/train_and_merge.py --url http://127.0.0.1:8000 [--workdir DIR]
Exit code 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from service.client import CheckpointClient, ClientError, VerificationError
from service.registry.builtins import TinyConvNet
from service.training import (
    freeze_batchnorm,
    freeze_from_state_dict,
    trainable_parameters,
    unfreeze_batchnorm,
)

ARCHITECTURE = "tiny-convnet"
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def make_pretrained(path: Path, *, seed: int) -> dict[str, torch.Tensor]:
    """Stand-in for a downloaded pretrained model: a few forward passes give BN non-trivial running stats."""
    torch.manual_seed(seed)
    model = TinyConvNet()
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    torch.save(model.state_dict(), path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def train(original: Path, trained: Path, *, steps: int, seed: int) -> nn.DataParallel[TinyConvNet]:
    """Recipe steps 1-4: freeze the backbone, BN in `stats` mode, DataParallel, train, save."""
    pretrained = torch.load(original, map_location="cpu", weights_only=True)
    model = TinyConvNet(num_classes=10)
    model.load_state_dict(pretrained, strict=False)  # the recipe's step 1 (strict=False)
    backbone = {k: v for k, v in pretrained.items() if k.startswith("features.")}
    report = freeze_from_state_dict(model, backbone)
    print(f"freeze: {report.summary()}")
    bn = freeze_batchnorm(model, mode="stats")
    print(f"BatchNorm in stats mode: {', '.join(bn)}")
    wrapped = nn.DataParallel(model)
    optimizer = torch.optim.SGD(trainable_parameters(wrapped), lr=0.1, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(seed)
    wrapped.train()
    for step in range(steps):
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
        loss = nn.functional.cross_entropy(wrapped(x), y)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if step in (0, steps - 1):
            print(f"step {step}: loss {loss.item():.4f}")
    torch.save(wrapped.state_dict(), trained)
    return wrapped


def check(final: dict[str, torch.Tensor], pretrained: dict[str, torch.Tensor],
          wrapped: nn.DataParallel[TinyConvNet]) -> list[str]:
    """Return the failed checks (empty when all pass)."""
    failures: list[str] = []
    fresh = TinyConvNet()
    fresh.load_state_dict(final, strict=True)  # raises on a missing or unexpected key
    model = wrapped.module
    unfreeze_batchnorm(model)  # recipe step 5.1: the BN keys are back, to be filled by the merge
    trained_head = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    model.load_state_dict(final, strict=True)
    for key, value in pretrained.items():
        if key.startswith("features.") and not torch.equal(final[key], value):
            failures.append(f"{key} differs from the pretrained value (frozen part or BN stats)")
    for key, value in trained_head.items():
        if not torch.equal(final[key], value):
            failures.append(f"{key} is not the trained value")
    if not any(key.endswith(BN_STATS) for key in final):
        failures.append("no BatchNorm running stats in the final file")
    fresh.eval()
    with torch.no_grad():
        if not torch.isfinite(fresh(torch.randn(2, 3, 8, 8))).all():
            failures.append("the final model produces non-finite outputs")
    return failures


def run(url: str, token: str | None, workdir: Path, *, steps: int, seed: int, prefix: str) -> int:
    original, trained, final_path = workdir / "original.pth", workdir / "trained.pth", workdir / "final.pth"
    pretrained = make_pretrained(original, seed=seed)
    wrapped = train(original, trained, steps=steps, seed=seed + 1)
    trained_keys = torch.load(trained, map_location="cpu", weights_only=True).keys()
    print(f"trained.pth: {len(trained_keys)} keys (original.pth: {len(pretrained)}), "
          f"e.g. {sorted(trained_keys)[0]!r}")

    with CheckpointClient(url, token=token) as ckpt:
        pushed = ckpt.push(original, name=f"{prefix}-pretrained", labels={"stage": "pretrained"})
        how = "uploaded" if pushed.uploaded else "deduplicated"
        print(f"pushed original: {pushed.artifact.id[:16]} ({how})")
        try:
            result = ckpt.merge(f"{prefix}-pretrained", trained, architecture=ARCHITECTURE,
                                name=f"{prefix}-final", labels={"stage": "final"})
        except VerificationError as exc:
            print(f"merge failed verification: missing {exc.missing_keys}, unexpected {exc.unexpected_keys}",
                  file=sys.stderr)
            return 1
        pulled = ckpt.pull(result.id, final_path)

    report = result.report
    final = torch.load(pulled.path, map_location="cpu", weights_only=True)
    failures = check(final, pretrained, wrapped)
    print()
    print(f"architecture      {report['architecture']}")
    print(f"final artifact    {result.id}  (name {prefix}-final)")
    print(f"prefixes stripped {report['prefixes']['trained'].get('applied') or {}}")
    print(f"filled from orig. {len(report['filled'])} keys in {', '.join(report['filled_modules'])}")
    print(f"verification      {'ok (strict, on the service)' if report['verification']['ok'] else 'FAILED'}")
    print(f"final file        {pulled.path} ({pulled.size} bytes, sha256 verified)")
    print(f"local strict load {'ok' if not failures else 'FAILED'}")
    for failure in failures:
        print(f"  - {failure}", file=sys.stderr)
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("CKPT_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("CKPT_TOKEN"))
    parser.add_argument("--workdir", type=Path, help="where the .pth files go (default: a temp directory)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name-prefix", default="tiny-convnet",
                        help="names: PREFIX-pretrained, PREFIX-final")
    args = parser.parse_args(argv)
    try:
        with contextlib.ExitStack() as stack:
            workdir: Path = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            workdir.mkdir(parents=True, exist_ok=True)
            return run(args.url, args.token, workdir, steps=args.steps, seed=args.seed,
                       prefix=args.name_prefix)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
