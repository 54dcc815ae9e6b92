"""torch's zip format (``torch.save`` since 1.6): an archive of ``data.pkl`` and one entry per storage.

Read with torch's own archive reader and the placeholder unpickler, memory-mapped; vetted from its central
directory first and, after a mapped load, checked storage by storage against its records. Written by our own
archive writer (`service.core.pthzip`), which copies mapped storages file-to-file.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, cast

import torch

from service.core import pthzip
from service.core.formats.base import Format, LoadOptions, Probe, RawLoad
from service.core.hashing import PARALLEL_MIN_BYTES, hashing_pool
from service.core.keycount import check_key_count
from service.core.loading._archive import check_archive, check_storage_records
from service.core.loading._pickle import read_torch_file
from service.core.pthzip import StorageRecords

__all__ = ["FORMAT", "PthZip"]


class PthZip(Format):
    name = "pth-zip"
    output = "pth"
    writable = True
    suffix = ".pth"
    holds_module_metadata = True

    def detect(self, probe: Probe) -> bool:
        # A zip whose directory cannot be read is taken for one, so that check_archive names the damage.
        if not probe.is_zip:
            return False
        names = probe.zip_names
        return names is None or any(name.split("/")[1:] == ["data.pkl"] for name in names)

    def load(self, probe: Probe, options: LoadOptions) -> RawLoad:
        path = probe.path
        check_archive(path, limits=options.limits)
        check_key_count(path, legacy=False, limit=options.limits.max_keys)  # before any per-key unpickling
        # torch.load hands a path ending in .safetensors to safetensors, so the weights-only loader gets an open
        # file there, which cannot be mapped; the placeholder reader always opens the file itself.
        mmapped = options.mmap and (options.placeholders or not path.name.endswith(".safetensors"))
        obj = read_torch_file(path, name=self.name, legacy=False, mmap=mmapped, placeholders=options.placeholders,
                              allowed=options.allowed)
        records = None
        if mmapped:
            records = check_storage_records(path, obj, name=self.name, placeholders=options.placeholders,
                                            allowed=options.allowed)
        return RawLoad(obj, mmapped=mmapped, records=records)

    def write(self, tensors: OrderedDict[str, torch.Tensor], path: Path, *, metadata: Mapping[str, str] | None,
              sources: Sequence[StorageRecords]) -> tuple[str, int]:
        # A file object, not a path: torch names the archive's top folder after a path's file name, which
        # for a random temp name would make identical inputs give different bytes. With a buffer it is
        # always "archive".
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            if pthzip.available():
                result = pthzip.write_pth(tensors, fd, sources)
            else:  # a torch without the private _save this relies on: its own writer, hashed as it goes
                writer = _HashingWriter(fd)
                torch.save(tensors, cast(IO[bytes], writer))  # it only calls write() and flush()
                result = writer.digest.hexdigest(), writer.size
            os.fsync(fd)
        finally:
            os.close(fd)
        return result


class _HashingWriter:
    """The file object torch.save writes to: every byte goes to `fd` in full and into the sha256."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        hashing = hashing_pool().submit(self.digest.update, view) if n >= PARALLEL_MIN_BYTES else None
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        finally:
            # torch's buffer is only valid during this call: the hash must be done before returning.
            if hashing is not None:
                hashing.result()
        if hashing is None:
            self.digest.update(data)
        self.size += n
        return n

    def flush(self) -> None:
        pass


FORMAT = PthZip()
