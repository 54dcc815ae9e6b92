"""The recipe as a user runs it today: plain torch, no service.

    python bench/recipe_script.py ORIGINAL TRAINED OUTPUT --dim 4096 --depth 16

torch.load both files, strip the DataParallel prefix, fill what the trained state_dict lacks (the BatchNorm
running stats dropped by `track_running_stats=False`) from the original, load the result into the real model
with strict=True, and torch.save it. It prints one JSON line with its own timings (after `import torch`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

T_START = time.perf_counter()

import torch  # noqa: E402
from torch import nn  # noqa: E402

T_IMPORTED = time.perf_counter()


class Net(nn.Module):
    """The user's model: blocks of Linear + BatchNorm1d + ReLU, and a head."""

    def __init__(self, dim: int, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU()) for _ in range(depth)]
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.blocks(x))
        return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("original")
    parser.add_argument("trained")
    parser.add_argument("output")
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--depth", type=int, required=True)
    args = parser.parse_args()

    t0 = time.perf_counter()
    # The recipe's step 4.2, as written in the recipe (weights_only=True is torch's default anyway).
    origin_state_dict = torch.load(args.original, map_location=torch.device("cpu"), weights_only=True)
    new_state_dict = torch.load(args.trained, map_location=torch.device("cpu"), weights_only=True)
    new_state_dict = {k.replace("module.", ""): v for k, v in new_state_dict.items()}
    t_loaded = time.perf_counter()
    final_dict = new_state_dict.copy()
    for key, val in origin_state_dict.items():
        if key not in final_dict:
            final_dict[key] = val
    model = Net(args.dim, args.depth)
    model.load_state_dict(final_dict, strict=True)
    t_verified = time.perf_counter()
    torch.save(model.state_dict(), args.output)
    t_saved = time.perf_counter()
    print(json.dumps({
        "import_s": T_IMPORTED - T_START,
        "load_s": t_loaded - t0,
        "merge_verify_s": t_verified - t_loaded,
        "save_s": t_saved - t_verified,
        "work_s": t_saved - t0,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
