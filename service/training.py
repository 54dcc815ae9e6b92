"""Training-side helpers for the frozen-backbone recipe (steps 1-4), and the undo for post-processing.

1. :func:`freeze_from_state_dict` freezes exactly the parameters a pretrained state_dict names, after
   normalising DataParallel / ``torch.compile`` prefixes on both sides.
2. :func:`trainable_parameters` is what the optimizer gets, so momentum and weight decay never touch the
   frozen part.
3. :func:`freeze_batchnorm` stops the frozen BatchNorm layers from updating their running statistics while
   the rest of the model trains, in one of two modes:

   * ``"eval"``: the layers stay in eval mode (they normalise with, and keep, the pretrained running
     statistics). The state_dict keeps every key.
   * ``"stats"``: the recipe's layer, ``momentum=0.0, track_running_stats=False``. The layers normalise with
     batch statistics, and ``running_mean``, ``running_var`` and ``num_batches_tracked`` leave the
     state_dict: the trained checkpoint must be merged with the original one afterwards.

4. :func:`unfreeze_batchnorm` undoes step 3 before post-processing, so that ``model.state_dict()`` has the
   full key set again and ``load_state_dict(merged, strict=True)`` works.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from service.core.prefixes import strip_key, strip_prefixes
from service.errors import InvalidRequest, quote_keys

__all__ = [
    "BatchNormMode",
    "FreezeReport",
    "freeze_batchnorm",
    "freeze_from_state_dict",
    "frozen_batchnorm_modules",
    "trainable_parameters",
    "unfreeze_batchnorm",
]

BatchNormMode = Literal["eval", "stats"]

# Attributes set on a BatchNorm layer by freeze_batchnorm. Plain instance attributes, so they survive
# copy.deepcopy and pickling of the whole model, and unfreeze_batchnorm finds them on any copy.
_SAVED_MOMENTUM = "_ckpt_frozen_momentum"
_FROZEN_MODE = "_ckpt_frozen_mode"
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_DEFAULT_MOMENTUM = 0.1  # torch's default, for layers put in stats mode by someone else


@dataclass(frozen=True)
class FreezeReport:
    """What :func:`freeze_from_state_dict` did.

    Attributes:
        frozen: Parameters that do not require grad afterwards (as the model names them), sorted.
        trainable: Parameters that still require grad, sorted.
        unmatched: State_dict keys (prefixes stripped) that name no parameter or buffer of the model, sorted.
        total: Number of parameters (``len(frozen) + len(trainable)``).
    """

    frozen: tuple[str, ...]
    trainable: tuple[str, ...]
    unmatched: tuple[str, ...]
    total: int

    def summary(self) -> str:
        """Return the recipe's printout: ``"Total N params, miss M"`` (M = parameters left trainable)."""
        text = f"Total {self.total} params, miss {len(self.trainable)}"
        if self.unmatched:
            text += f" ({len(self.unmatched)} state_dict keys matched nothing)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "frozen": list(self.frozen),
            "trainable": list(self.trainable),
            "unmatched": list(self.unmatched),
            "total": self.total,
        }


def _state_names(model: nn.Module) -> set[str]:
    # Every name a state_dict of this model can hold, including BN buffers currently set to None (stats
    # mode): a pretrained state_dict names them, and that is a match, not a stray key.
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for buffer_name in module._buffers:
            if buffer_name not in module._non_persistent_buffers_set:
                names.add(f"{prefix}.{buffer_name}" if prefix else buffer_name)
    return names


def freeze_from_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> FreezeReport:
    """Freeze (``requires_grad=False``) exactly the parameters that a pretrained state_dict names.

    The state_dict's keys go through :func:`service.core.prefixes.strip_prefixes` and the model's names
    through the same transform (known wrappers: ``module.`` of DataParallel/DDP, ``_orig_mod.`` of
    ``torch.compile``, ...), so a checkpoint saved from a wrapped model freezes an unwrapped one and vice
    versa. Parameters the state_dict does not name are left
    as they are (the recipe's ``else: pass``). Values are not loaded: call
    ``model.load_state_dict(state_dict, strict=False)`` first, as the recipe does.

    Args:
        model: The model to freeze in place (may be wrapped in ``nn.DataParallel``).
        state_dict: The pretrained state_dict; only its keys are used.

    Returns:
        A :class:`FreezeReport`.

    Raises:
        PrefixCollision: Two state_dict keys normalise to the same name.
    """
    wanted = set(strip_prefixes(state_dict).state_dict)
    known = {strip_key(name) for name in _state_names(model)}
    for name, param in model.named_parameters():
        if strip_key(name) in wanted:
            param.requires_grad_(False)
    frozen = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    return FreezeReport(
        frozen=tuple(frozen),
        trainable=tuple(trainable),
        unmatched=tuple(sorted(wanted - known)),
        total=len(frozen) + len(trainable),
    )


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Yield the parameters that require grad: what the optimizer should get.

    Frozen parameters must not be in the optimizer at all: SGD skips parameters without a gradient, but
    other optimizers (and gradient clipping by global norm) do not all agree, and the model is cleaner to
    reason about when the optimizer never holds them.

    Args:
        model: The model.

    Returns:
        An iterator over the trainable parameters, each once.
    """
    return (p for p in model.parameters() if p.requires_grad)


def _batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def frozen_batchnorm_modules(model: nn.Module) -> list[str]:
    """Name the BatchNorm layers that belong to the frozen part of the model.

    An affine layer is frozen when none of its parameters requires grad. A layer without parameters
    (``affine=False``) has nothing of its own to decide with, so it follows its surroundings: it is frozen
    when the nearest enclosing module that has parameters has all of them frozen (a BN in a frozen backbone
    block is frozen; one next to a trainable head is not). Layers without any parameter anywhere above them
    are not frozen.

    Args:
        model: The model, after :func:`freeze_from_state_dict`.

    Returns:
        Module names (as ``model.named_modules()`` gives them), in module order.
    """
    modules = dict(model.named_modules())
    out = []
    for name, layer in _batchnorm_layers(model).items():
        params = list(layer.parameters())
        if params:
            if not any(p.requires_grad for p in params):
                out.append(name)
            continue
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            ancestor = modules[".".join(parts[:depth])]
            around = list(ancestor.parameters())
            if around:
                if not any(p.requires_grad for p in around):
                    out.append(name)
                break
    return out


def _pin_eval(module: nn.Module, args: Any) -> None:
    # Runs before every forward: model.train() flips .training back on, this flips it off again in time.
    module.training = False


def _remove_eval_pin(module: nn.Module) -> None:
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook is _pin_eval:
            del module._forward_pre_hooks[hook_id]


def freeze_batchnorm(
    model: nn.Module, *, mode: BatchNormMode = "eval", modules: Iterable[str] | None = None
) -> list[str]:
    """Stop frozen BatchNorm layers from changing while the rest of the model trains (recipe step 3).

    ``requires_grad=False`` does not freeze a BatchNorm layer: in training mode it keeps updating its running
    statistics. Two fixes:

    * ``mode="eval"``: each layer gets a forward pre-hook that sets ``training = False`` before every forward,
      so it normalises with its pretrained statistics and never updates them, whatever ``model.train()``
      does. A hook rather than a class swap: it survives ``deepcopy``, pickling and ``torch.compile``
      without a dynamically created class. The flag reads ``True`` between ``model.train()`` and the next
      forward; every forward runs in eval mode. The state_dict is unchanged.
    * ``mode="stats"``: the recipe's ``momentum=0.0, track_running_stats=False``. The layers normalise with
      batch statistics, in training and in eval. Side effect (as with the recipe's layer): the buffers
      ``running_mean``, ``running_var`` and ``num_batches_tracked`` are set to ``None`` and leave the
      state_dict, three keys per layer; restore them with :func:`unfreeze_batchnorm` and the original
      checkpoint (the service's merge).

    Args:
        model: The model, changed in place.
        mode: ``"eval"`` or ``"stats"``.
        modules: BatchNorm module names; default :func:`frozen_batchnorm_modules`.

    Returns:
        The names of the layers changed, in module order.

    Raises:
        InvalidRequest: Unknown mode, or ``modules`` names something that is not a BatchNorm layer.
    """
    if mode not in ("eval", "stats"):
        raise InvalidRequest(f"Unknown BatchNorm mode {mode!r}; use 'eval' or 'stats'")
    layers = _batchnorm_layers(model)
    names = frozen_batchnorm_modules(model) if modules is None else list(dict.fromkeys(modules))
    not_bn = [n for n in names if n not in layers]
    if not_bn:
        raise InvalidRequest(f"Not BatchNorm layers of the model: {quote_keys(not_bn)}")
    for name in names:
        layer = layers[name]
        if not hasattr(layer, _SAVED_MOMENTUM):
            setattr(layer, _SAVED_MOMENTUM, layer.momentum)
        setattr(layer, _FROZEN_MODE, mode)
        if mode == "eval":
            _remove_eval_pin(layer)  # idempotent: one hook per layer
            layer.register_forward_pre_hook(_pin_eval)
            layer.eval()
        else:
            _remove_eval_pin(layer)
            layer.momentum = 0.0
            layer.track_running_stats = False
            for buffer_name in _BN_BUFFERS:
                setattr(layer, buffer_name, None)
    return names


def _restore_buffers(layer: _BatchNorm) -> None:
    reference = layer.weight
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    # "Empty, to be filled": the merge with the original state_dict supplies the real values.
    if layer.running_mean is None:
        layer.running_mean = torch.zeros(layer.num_features, device=device, dtype=dtype)
    if layer.running_var is None:
        layer.running_var = torch.ones(layer.num_features, device=device, dtype=dtype)
    if layer.num_batches_tracked is None:
        layer.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)


def unfreeze_batchnorm(model: nn.Module, *, modules: Iterable[str] | None = None) -> list[str]:
    """Undo :func:`freeze_batchnorm` for post-processing (recipe step 5.1).

    Removes the eval pinning, restores the saved momentum and ``track_running_stats=True``, and re-creates
    missing running-statistics buffers as placeholders (zeros, ones, 0) for the merge to fill. Afterwards
    ``model.state_dict()`` has the full key set again, so ``load_state_dict(merged, strict=True)`` works.

    Args:
        model: The model, changed in place.
        modules: BatchNorm module names to restore. Default: the layers :func:`freeze_batchnorm` changed.
            Naming a layer it did not change (e.g. one built with ``track_running_stats=False`` by the
            training script) turns running statistics on with torch's default momentum 0.1.

    Returns:
        The names of the layers restored, in module order.

    Raises:
        InvalidRequest: ``modules`` names something that is not a BatchNorm layer.
    """
    layers = _batchnorm_layers(model)
    if modules is None:
        names = [n for n, layer in layers.items() if hasattr(layer, _FROZEN_MODE)]
    else:
        names = list(dict.fromkeys(modules))
        not_bn = [n for n in names if n not in layers]
        if not_bn:
            raise InvalidRequest(f"Not BatchNorm layers of the model: {quote_keys(not_bn)}")
    for name in names:
        layer = layers[name]
        _remove_eval_pin(layer)
        layer.momentum = getattr(layer, _SAVED_MOMENTUM, _DEFAULT_MOMENTUM)
        layer.track_running_stats = True
        _restore_buffers(layer)
        for attr in (_SAVED_MOMENTUM, _FROZEN_MODE):
            if hasattr(layer, attr):
                delattr(layer, attr)
        layer.train(model.training)
    return names
