"""Tiny real models and checkpoints for the tests. Nothing here downloads anything."""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from service.registry.builtins import MLPBN, TinyConvNet

__all__ = ["MLPBN", "TinyConvNet", "make_original", "make_trained", "save_pth", "set_bn_stats_mode"]


def make_original(seed: int = 0) -> TinyConvNet:
    """A 'pretrained' TinyConvNet with non-trivial BN running stats."""
    torch.manual_seed(seed)
    model = TinyConvNet()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8))
    model.eval()
    return model


def set_bn_stats_mode(model: nn.Module) -> None:
    """The recipe's step 3: momentum=0 and track_running_stats=False; the BN buffers leave the state_dict."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


def make_trained(original: TinyConvNet, *, steps: int = 3, seed: int = 1) -> nn.DataParallel[TinyConvNet]:
    """The recipe's training side: freeze the backbone by state_dict, BN in stats mode, DataParallel, train."""
    torch.manual_seed(seed)
    model = copy.deepcopy(original)
    pretrained = {k: v for k, v in original.state_dict().items() if k.startswith("features.")}
    for name, p in model.named_parameters():
        p.requires_grad = name not in pretrained
    set_bn_stats_mode(model)
    wrapped = nn.DataParallel(model)
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    wrapped.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = wrapped(torch.randn(4, 3, 8, 8)).pow(2).mean()
        loss.backward()
        opt.step()
    return wrapped


def save_pth(obj: object, path: Path, *, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def state_dict_of(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    return model.state_dict()  # type: ignore[return-value]


class CompiledLike(nn.Module):
    """Holds a model as `_orig_mod`, as torch.compile's OptimizedModule does; calling torch.compile itself in
    tests imports torch.jit machinery that warns (and pytest turns warnings into errors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._orig_mod = model

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self._orig_mod(x)


class LightningLike(nn.Module):
    """A LightningModule by convention keeps the network as `self.model` (keys "model.*")."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.model(x)
