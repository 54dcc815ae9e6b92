"""What every checkpoint format is: `Format` and the values its verbs take and return."""

from __future__ import annotations

import functools
import os
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from service.core.loading._archive import ZIP_LOCAL_MAGIC, read_zip_directory
from service.core.loading._scan import scan_pickle_globals
from service.core.pthzip import StorageRecords
from service.core.types import DEFAULT_LIMITS, ArchiveLimits
from service.errors import InvalidRequest, UnsupportedFormat
from service.format_names import OutputFormat

__all__ = ["Format", "LoadOptions", "Probe", "RawLoad", "is_pickle_start"]

_HEAD_BYTES = 64


def is_pickle_start(head: bytes) -> bool:
    """Whether the bytes open with a PROTO opcode of protocol 2 to 5 (what torch.save and pickle write)."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


class Probe:
    """What detection looks at: a file's first bytes and size, and, read once when a format asks, more.

    Detection never unpickles anything: it reads magic numbers, the zip central directory, and for pickles
    that are not torch files the opcodes of the first pickle (`pickletools.genops` only parses).
    """

    def __init__(self, path: Path, head: bytes, size: int) -> None:
        self.path = path
        self.head = head
        self.size = size

    @classmethod
    def of(cls, path: Path) -> Probe:
        """Read a file's first bytes and size.

        Raises:
            OSError: The file cannot be opened or read.
        """
        with open(path, "rb") as f:
            return cls(Path(path), f.read(_HEAD_BYTES), os.fstat(f.fileno()).st_size)

    @property
    def is_zip(self) -> bool:
        """The file opens with a zip local header (``PK\\x03\\x04``)."""
        return self.head.startswith(ZIP_LOCAL_MAGIC)

    @functools.cached_property
    def zip_entries(self) -> list[zipfile.ZipInfo] | None:
        """The zip directory's entries; None when the file is no zip, or its directory is too large or damaged."""
        if not self.is_zip:
            return None
        with open(self.path, "rb") as f:
            return read_zip_directory(f, self.size)

    @functools.cached_property
    def zip_names(self) -> list[str] | None:
        """The names of `zip_entries`."""
        return None if self.zip_entries is None else [info.filename for info in self.zip_entries]

    @functools.cached_property
    def pickle_globals(self) -> list[str]:
        """The globals the file's first pickle names, when the file is a pickle (an opcode scan, nothing run)."""
        if not is_pickle_start(self.head):
            return []
        with open(self.path, "rb") as f:
            return scan_pickle_globals(f, pickles=1, start=0)


@dataclass(frozen=True)
class LoadOptions:
    """How a format reads a file (see `service.core.load.load_checkpoint`)."""

    mmap: bool = True
    placeholders: bool = True
    allowed: Sequence[Any] = ()  # resolved safe globals of the weights-only loader
    limits: ArchiveLimits = DEFAULT_LIMITS


@dataclass(frozen=True)
class RawLoad:
    """What a format's reader returns, before the state_dict is looked for inside it."""

    obj: object
    metadata: Mapping[str, str] = field(default_factory=dict)  # header metadata (safetensors)
    mmapped: bool = False
    records: StorageRecords | None = None


class Format:
    """One checkpoint format: how to recognise it by its bytes, read it, and write it when it can be written.

    A format is a subclass that sets the class attributes and overrides the verbs it supports, and one instance
    in the table of `service.core.formats`. A format recognised only to be refused with a way out (TorchScript,
    a torch.distributed checkpoint, a DeepSpeed ZeRO shard) sets ``refusal`` and overrides a detect verb only.
    """

    name: ClassVar[str]  # stored in the artifact's metadata: "pth-zip"
    # The `format=`/`output_format` name a file of this format is served as ("pth"); None: never served.
    output: ClassVar[OutputFormat | None] = None
    writable: ClassVar[bool] = False  # `write` is implemented: the format an `output` name is written in
    suffix: ClassVar[str] = ""
    media_type: ClassVar[str] = "application/octet-stream"
    holds_module_metadata: ClassVar[bool] = False  # a state_dict's `_metadata` survives a write and a read
    holds_header_metadata: ClassVar[bool] = False  # str -> str metadata (safetensors' `__metadata__`)
    # Every key's bytes are written on their own (views of one storage copied apart), so a write is bounded by
    # the expansion budget (`service.core.expansion`) of its inputs.
    expands_views: ClassVar[bool] = False
    refusal: ClassVar[str] = ""  # the 422's detail, naming the way out, for a format that is never read

    def detect(self, probe: Probe) -> bool:
        """Whether the file is in this format, from what the probe reads; never raises, never unpickles."""
        return False

    def detect_content(self, obj: object) -> bool:
        """Whether an unpickled object is in this format (a format its bytes cannot tell apart)."""
        return False

    def load(self, probe: Probe, options: LoadOptions) -> RawLoad:
        """Vet and read the file safely.

        Raises:
            InvalidCheckpoint: Any subclass; `UnsupportedFormat` naming the way out for a refused format.
        """
        raise self.refused()

    def check_output(self, tensors: Mapping[str, torch.Tensor], *, max_expanded_bytes: int | None) -> None:
        """Refuse, before anything is written or allocated, a state_dict this format cannot hold.

        Raises:
            UnconvertibleCheckpoint, ExpansionLimitExceeded, InvalidRequest: Per format.
        """

    def write(self, tensors: OrderedDict[str, torch.Tensor], path: Path, *, metadata: Mapping[str, str] | None,
              sources: Sequence[StorageRecords]) -> tuple[str, int] | None:
        """Write the (checked) tensors to ``path``, an empty file, and fsync it.

        Args:
            tensors: Key -> dense CPU tensor, maybe carrying ``_metadata`` (`service.core.statedict`).
            path: The destination (a temp file the caller renames).
            metadata: Header metadata (only when `holds_header_metadata`).
            sources: Records of memory-mapped loads the tensors come from, for copying them file-to-file.

        Returns:
            The sha256 and size of the bytes written, when computed while writing; else None.
        """
        raise InvalidRequest(f"checkpoints cannot be written in the {self.name} format")

    def refused(self) -> UnsupportedFormat:
        """The error for a file of this format, when it is never read."""
        return UnsupportedFormat(self.refusal or f"files in the {self.name} format cannot be read")
