"""torch's legacy format (``torch.save(..., _use_new_zipfile_serialization=False)``): pickles in a row.

Read with torch's legacy reader and the placeholder unpickler; it cannot be memory-mapped. Never written: a
``"pth"`` output is the zip format, and a stored legacy file is served as uploaded.
"""

from __future__ import annotations

import io
import pickletools
import struct

from service.core.formats.base import Format, LoadOptions, Probe, RawLoad, is_pickle_start
from service.core.keycount import check_key_count
from service.core.loading._pickle import read_torch_file

__all__ = ["FORMAT", "LEGACY_MAGIC_NUMBER", "PthLegacy"]

# torch.serialization.MAGIC_NUMBER: the first pickle of every legacy (non-zip) torch.save file.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C


class PthLegacy(Format):
    name = "pth-legacy"
    output = "pth"
    suffix = ".pth"
    holds_module_metadata = True

    def detect(self, probe: Probe) -> bool:
        return is_pickle_start(probe.head) and _is_legacy_torch(probe.head)

    def load(self, probe: Probe, options: LoadOptions) -> RawLoad:
        check_key_count(probe.path, legacy=True, limit=options.limits.max_keys)  # before any per-key unpickling
        obj = read_torch_file(probe.path, name=self.name, legacy=True, mmap=False, placeholders=options.placeholders,
                              allowed=options.allowed)
        return RawLoad(obj)


def _is_legacy_torch(head: bytes) -> bool:
    # The first pickle of a legacy file is just the magic number: PROTO, (FRAME,) LONG1 magic, STOP.
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(head)):
            if op.name in ("PROTO", "FRAME"):
                continue
            return op.name == "LONG1" and arg == LEGACY_MAGIC_NUMBER
    except (ValueError, EOFError, struct.error):
        return False
    return False


FORMAT = PthLegacy()
