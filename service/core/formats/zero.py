"""DeepSpeed ZeRO shards: torch.save files whose weights are partitioned. Refused, naming ``zero_to_fp32.py``.

Their bytes are an ordinary torch file, so they are recognised by what they hold: ``*_optim_states.pt`` hold flat
fp32 partitions, and with ZeRO-3 the ``module`` of ``mp_rank_*_model_states.pt`` holds empty placeholders. A
ZeRO-1/2 ``mp_rank_00_model_states.pt`` holds the full weights under ``module`` and is read as it is.
"""

from __future__ import annotations

import torch

from service.core.formats.base import Format

__all__ = ["FORMAT", "WAY_OUT", "DeepSpeedZero"]

WAY_OUT = ("run the zero_to_fp32.py script DeepSpeed wrote into the checkpoint folder (python zero_to_fp32.py . "
           "pytorch_model.bin) and send its output")


class DeepSpeedZero(Format):
    name = "deepspeed-zero"
    refusal = f"the file is a DeepSpeed ZeRO checkpoint shard, not a model's weights; {WAY_OUT}"

    def detect_content(self, obj: object) -> bool:
        if not isinstance(obj, dict) or not dict.__contains__(obj, "ds_version"):
            return False
        module = dict.get(obj, "module")
        tensors = [v for v in dict.values(module) if isinstance(v, torch.Tensor)] if isinstance(module, dict) else []
        return not tensors or all(t.numel() == 0 for t in tensors)


FORMAT = DeepSpeedZero()
