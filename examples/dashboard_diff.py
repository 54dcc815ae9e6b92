"""What a dashboard does with two stored checkpoints: one `GET /diff` (prefixes normalized), and a summary
table; with --frozen, also the check that the part you froze did not move. Needs only the client (no torch).

Usage:
    python examples/dashboard_diff.py --url http://127.0.0.1:8000 tiny-convnet-pretrained tiny-convnet-final
    python examples/dashboard_diff.py A B --frozen features.     # check that the backbone did not move
"""

from __future__ import annotations

import argparse
import os
import sys

from service.api.schemas import CATEGORIES, DiffOut
from service.client import CheckpointClient, ClientError

SHORT = {"only_in_a": "only A", "only_in_b": "only B", "shape_mismatch": "shape", "dtype_mismatch": "dtype",
         "changed": "changed", "unchanged": "same"}


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    # Text left, numbers right, as a dashboard shows them.
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def render(diff: DiffOut) -> str:
    out = [f"A {diff.a}", f"B {diff.b}", f"prefixes normalized: {'yes' if diff.normalized else 'no'}", ""]
    out.append(table(["category", "keys"], [[SHORT[c], diff.summary.get(c, 0)] for c in CATEGORIES]))
    out.append("")
    rows: list[list[object]] = [[module, *[counts.get(c, 0) for c in CATEGORIES]]
                                for module, counts in sorted(diff.modules.items())]
    out.append(table(["module", *[SHORT[c] for c in CATEGORIES]], rows))
    for cat in ("only_in_a", "only_in_b", "shape_mismatch", "dtype_mismatch", "changed"):
        listed = diff.keys.get(cat)
        if listed is not None and listed.total:
            more = f" (+{listed.total - len(listed.keys)} more)" if listed.truncated else ""
            out.append(f"{SHORT[cat]}: {', '.join(listed.keys[:10])}{more}")
    if diff.frozen is not None:
        changed = list(diff.frozen.get("changed") or [])
        missing = list(diff.frozen.get("missing") or [])
        status = "ok" if not changed and not missing else "CHANGED"
        out.append("")
        out.append(f"frozen check: {status} ({diff.frozen.get('checked', 0)} tensors checked, "
                   f"{len(changed)} changed, {len(missing)} missing in B)")
        for key in changed[:10]:
            out.append(f"  changed: {key}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="the original (id or name)")
    parser.add_argument("b", help="the other checkpoint (id or name)")
    parser.add_argument("--url", default=os.environ.get("CKPT_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("CKPT_TOKEN"))
    parser.add_argument("--frozen", default="false",
                        help="comma-separated key prefixes of the part you froze, 'true' (all of A's parameters), "
                             "or 'false' (default: no frozen check)")
    args = parser.parse_args(argv)
    frozen: bool | list[str]
    if args.frozen.lower() in ("true", "false"):
        frozen = args.frozen.lower() == "true"
    else:
        frozen = [p.strip() for p in args.frozen.split(",") if p.strip()]
    try:
        with CheckpointClient(args.url, token=args.token) as ckpt:
            diff = ckpt.diff(args.a, args.b, normalize_prefixes=True, frozen=frozen)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render(diff))
    return 0


if __name__ == "__main__":
    sys.exit(main())
