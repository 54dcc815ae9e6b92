"""Write a corpus of checkpoints with the real frameworks' own saving code (the `corpus` extra).

Each writer trains or builds a tiny random-init model with a fixed seed (nothing is downloaded), saves it the
way the framework does, and saves the model's clean ``state_dict()`` next to it as the reference. Run it alone
with ``python -m tests.corpus.generate OUT_DIR`` to look at the files.

torchvision for torch 2.13.0 exists on the index only as a CUDA build whose native ops do not load with the CPU
torch; timm and transformers import it. Declaring the two op schemas its Python code registers fakes for
(``torchvision::nms``, ``torchvision::qnms``) before importing it is enough: no checkpoint depends on them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CorpusFile", "WRITERS", "generate", "prepare_torchvision"]


@dataclass(frozen=True)
class CorpusFile:
    """One file a framework wrote.

    ``reference`` is the clean state_dict file of the model the file holds, or None when the file holds no model
    weights; then ``looks_like`` is what the service's 422 must say it is.
    """

    name: str
    path: Path
    reference: Path | None
    looks_like: str | None = None


_TORCHVISION_LIB: Any = None


def prepare_torchvision() -> None:
    """Declare the op schemas the CUDA torchvision build cannot register on CPU torch (once per process)."""
    global _TORCHVISION_LIB
    if _TORCHVISION_LIB is not None or "torchvision" in sys.modules:
        return
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB = lib


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The frameworks warn about CPU-only training, few dataloader workers, and so on: noise here, and pytest
    # turns warnings into errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def _reference(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def _batches(n: int, shape: tuple[int, ...], classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn((2, *shape), generator=g), torch.randint(0, classes, (2,), generator=g)) for _ in range(n)]


def write_timm(out: Path) -> list[CorpusFile]:
    """timm's train.py way: CheckpointSaver with args (argparse.Namespace), optimizer and an EMA model."""
    prepare_torchvision()
    import timm
    from timm.utils import CheckpointSaver, ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    ema = ModelEmaV3(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for x, y in _batches(2, (3, 32, 32), 4):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
    args = argparse.Namespace(model="test_resnet", lr=0.01, epochs=1, output=str(out), amp=False)
    folder = out / "timm"
    folder.mkdir(parents=True)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder), max_history=1)
    saver.save_checkpoint(epoch=0, metric=0.5)
    reference = _reference(model, out / "timm-reference.pth")
    torch.save(model, folder / "whole-model.pth")  # torch.save(model): timm's own classes, pickled whole
    return [
        CorpusFile("timm-last", folder / "last.pth.tar", reference),
        CorpusFile("timm-best", folder / "model_best.pth.tar", reference),
        CorpusFile("timm-whole-module", folder / "whole-model.pth", reference),
    ]


def write_torchvision_reference(out: Path) -> list[CorpusFile]:
    """torchvision's references/classification/train.py way: model, optimizer, lr_scheduler, epoch, args, EMA."""
    prepare_torchvision()
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    model_ema = torch.optim.swa_utils.AveragedModel(model)
    for x, y in _batches(2, (3, 32, 32), 4):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        model_ema.update_parameters(model)
    scheduler.step()
    args = argparse.Namespace(model="mobilenet_v3_small", lr=0.01, epochs=1, output_dir=str(out / "tv"))
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "lr_scheduler": scheduler.state_dict(), "epoch": 0, "args": args,
                  "model_ema": model_ema.state_dict()}
    folder = out / "torchvision"
    folder.mkdir(parents=True)
    torch.save(checkpoint, folder / "checkpoint.pth")
    torch.save(checkpoint, folder / "model_0.pth")
    return [
        CorpusFile("torchvision-checkpoint", folder / "checkpoint.pth", _reference(model, out / "tv-reference.pth")),
    ]


def write_lightning(out: Path) -> list[CorpusFile]:
    """A Lightning Trainer's ModelCheckpoint, with save_hyperparameters() of an OmegaConf (Hydra) config."""
    import lightning as L
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, TensorDataset

    class Classifier(L.LightningModule):
        def __init__(self, cfg: Any, hidden: int = 8) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 3))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=1e-3)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    L.seed_everything(0, verbose=False)
    cfg = OmegaConf.create({"model": {"hidden": 8}, "optim": {"lr": 1e-3}, "data": {"path": "${oc.env:HOME,/x}"}})
    model = Classifier(cfg)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    folder = out / "lightning"
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(folder),
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(folder), save_last=True)])
    trainer.fit(model, DataLoader(data, batch_size=4))
    # The network itself (`self.net`), as a plain script would save it: the service treats the LightningModule's
    # one attribute as a wrapper in a Lightning file, as it does DataParallel's `module.`.
    reference = _reference(model.net, out / "lightning-reference.pth")
    saved = sorted(p for p in folder.glob("*.ckpt") if p.name != "last.ckpt")
    return [
        CorpusFile("lightning-epoch", saved[0], reference),
        CorpusFile("lightning-last", folder / "last.ckpt", reference),
    ]


def write_mmengine(out: Path) -> list[CorpusFile]:
    """An MMEngine Runner's CheckpointHook (meta, message_hub with HistoryBuffers and numpy, optimizer, EMA)."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from torch.utils.data import DataLoader, TensorDataset

    class Net(BaseModel):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
            self.head = nn.Linear(4, 3)

        def forward(self, inputs: torch.Tensor, labels: torch.Tensor, mode: str = "tensor") -> Any:
            logits = self.head(self.backbone(inputs).flatten(1))
            if mode == "loss":
                return {"loss": nn.functional.cross_entropy(logits, labels)}
            return logits

    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))

    def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"inputs": torch.stack([b[0] for b in batch]), "labels": torch.stack([b[1] for b in batch])}

    folder = out / "mmengine"
    runner = Runner(
        model=model, work_dir=str(folder), experiment_name="corpus",
        train_dataloader=DataLoader(data, batch_size=4, collate_fn=collate),
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9}},
        train_cfg={"by_epoch": True, "max_epochs": 1},
        default_hooks={"checkpoint": {"type": "CheckpointHook", "interval": 1}, "logger": None},
        custom_hooks=[{"type": "EMAHook"}],
        randomness={"seed": 0}, default_scope="mmengine",
    )
    runner.train()
    reference = _reference(model, out / "mmengine-reference.pth")
    return [CorpusFile("mmengine-epoch", folder / "epoch_1.pth", reference)]


def write_transformers(out: Path) -> list[CorpusFile]:
    """transformers' save_pretrained, and a Trainer checkpoint (model, optimizer, scheduler, RNG, training args)."""
    prepare_torchvision()
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config)
    pretrained = out / "hf-pretrained"
    model.save_pretrained(str(pretrained))
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(0, 99, (8,), generator=g), "labels": torch.tensor(i % 3)} for i in range(8)]
    folder = out / "hf-trainer"
    args = TrainingArguments(output_dir=str(folder), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, seed=0, logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    step = folder / "checkpoint-2"
    reference = _reference(model, out / "hf-reference.pth")
    pretrained_reference = out / "hf-pretrained-reference.pth"
    torch.manual_seed(0)
    torch.save(BertForSequenceClassification(config).state_dict(), pretrained_reference)
    return [
        CorpusFile("hf-save-pretrained", pretrained / "model.safetensors", pretrained_reference),
        CorpusFile("hf-trainer-model", step / "model.safetensors", reference),
        CorpusFile("hf-trainer-optimizer", step / "optimizer.pt", None, "an optimizer state, not a model"),
        CorpusFile("hf-trainer-scheduler", step / "scheduler.pt", None, "scheduler state, not a model"),
        CorpusFile("hf-trainer-rng", step / "rng_state.pth", None, "an RNG state, not a model"),
        CorpusFile("hf-trainer-args", step / "training_args.bin", None, "training arguments"),
    ]


WRITERS: dict[str, Callable[[Path], list[CorpusFile]]] = {
    "timm": write_timm,
    "torchvision": write_torchvision_reference,
    "lightning": write_lightning,
    "mmengine": write_mmengine,
    "transformers": write_transformers,
}


def generate(out: Path) -> list[CorpusFile]:
    """Write every framework's files under ``out``; returns them with their references."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[CorpusFile] = []
    cwd = os.getcwd()
    with _quiet():
        try:
            os.chdir(out)  # some frameworks write next to the working directory
            for writer in WRITERS.values():
                files.extend(writer(out))
        finally:
            os.chdir(cwd)
    return files


if __name__ == "__main__":
    for f in generate(Path(sys.argv[1])):
        print(f"{f.name:28} {f.path}  reference={f.reference}  {f.looks_like or ''}")
