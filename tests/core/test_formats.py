"""The format table: one module and one line make a new format, and the table agrees with the output names."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch

from service.core.formats import FORMATS, UNKNOWN, Format, LoadOptions, Probe, RawLoad, detect_format, writer_for
from service.core.load import load_checkpoint
from service.core.pthzip import StorageRecords
from service.core.save import save_checkpoint
from service.errors import CorruptCheckpoint, InvalidRequest, UnsupportedFormat
from service.format_names import OUTPUT_FORMATS
from tests.core import hostile
from tests.factories import make_original, save_pth

_MAGIC = b"TOYCKPT1\n"


class _Toy(Format):
    """A format of this test only: a magic line, then JSON {key: [shape, values]} of float32 tensors."""

    name = "toy"
    output = "toy"  # type: ignore[assignment]  # not an OutputFormat of the service: this table is a test's copy
    writable = True
    suffix = ".toy"

    def detect(self, probe: Probe) -> bool:
        return probe.head.startswith(_MAGIC)

    def load(self, probe: Probe, options: LoadOptions) -> RawLoad:
        body = json.loads(probe.path.read_bytes()[len(_MAGIC):])
        return RawLoad({k: torch.tensor(values, dtype=torch.float32).reshape(shape)
                        for k, (shape, values) in body.items()})

    def write(self, tensors: OrderedDict[str, torch.Tensor], path: Path, *, metadata: Mapping[str, str] | None,
              sources: Sequence[StorageRecords]) -> None:
        body = {k: [list(t.shape), t.flatten().tolist()] for k, t in tensors.items()}
        path.write_bytes(_MAGIC + json.dumps(body).encode())


TOY = _Toy()
WITH_TOY = (*FORMATS, TOY)  # the one line a new format adds to the table


def _float_state_dict() -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, v) for k, v in make_original().state_dict().items() if v.dtype == torch.float32)


def test_a_new_format_is_one_class_and_one_line_in_the_table(tmp_path: Path) -> None:
    sd = _float_state_dict()
    path = tmp_path / "model.bin"

    save_checkpoint(sd, path, format="toy", formats=WITH_TOY)  # type: ignore[arg-type]
    loaded = load_checkpoint(path, formats=WITH_TOY)

    assert path.read_bytes().startswith(_MAGIC)
    assert detect_format(path, formats=WITH_TOY) is TOY
    assert loaded.format == "toy"
    assert list(loaded.state_dict) == list(sd)
    for key, tensor in sd.items():
        assert torch.equal(loaded.state_dict[key], tensor), key


def test_without_its_line_the_new_format_is_unknown_content(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    save_checkpoint(_float_state_dict(), path, format="toy", formats=WITH_TOY)  # type: ignore[arg-type]

    assert detect_format(path) is UNKNOWN
    with pytest.raises(CorruptCheckpoint, match="the file is text"):
        load_checkpoint(path)
    with pytest.raises(InvalidRequest, match="unknown checkpoint format 'toy'"):
        save_checkpoint(_float_state_dict(), tmp_path / "other.bin", format="toy")  # type: ignore[arg-type]


def test_the_writable_formats_are_the_output_names() -> None:
    assert {f.output for f in FORMATS if f.writable} == set(OUTPUT_FORMATS)
    assert {f.output for f in FORMATS if f.output is not None} <= set(OUTPUT_FORMATS)
    assert len({f.name for f in FORMATS}) == len(FORMATS)
    assert writer_for("pth").name == "pth-zip"
    assert writer_for("safetensors").name == "safetensors"
    with pytest.raises(InvalidRequest, match="use 'pth' or 'safetensors'"):
        writer_for("npz")


def test_refused_formats_name_their_way_out() -> None:
    refused = {f.name: f.refused() for f in FORMATS if f.refusal}

    assert set(refused) == {"torchscript", "dcp-shard", "dcp-metadata", "deepspeed-zero"}
    assert all(isinstance(error, UnsupportedFormat) for error in refused.values())
    assert "torch.save(model.state_dict())" in refused["torchscript"].detail
    assert "dcp_to_torch_save" in refused["dcp-shard"].detail
    assert "dcp_to_torch_save" in refused["dcp-metadata"].detail
    assert "zero_to_fp32.py" in refused["deepspeed-zero"].detail


def test_the_table_order_puts_torchscript_before_the_torch_archive(tmp_path: Path) -> None:
    # A TorchScript archive has a data.pkl too: the more specific zip must be detected first.
    scripted = hostile.make_torchscript(tmp_path / "scripted.pt")
    plain = save_pth(_float_state_dict(), tmp_path / "plain.pth")

    assert detect_format(scripted).name == "torchscript"
    assert detect_format(plain).name == "pth-zip"
    assert detect_format(scripted, formats=[f for f in FORMATS if f.name != "torchscript"]).name == "pth-zip"
