"""Checkpoint formats: one module per format, one line per format in `FORMATS`.

Each format is a `Format` (`service.core.formats.base`): how it is recognised from the file's bytes (never its
name), how it is read safely, and, for the formats a checkpoint can be written in, how it is written. The loader
(`service.core.load`), the writer (`service.core.save`), the store and the download route iterate this table
and hold no branch per format. A new format is a module with a `Format` subclass and a line below (and, when it
can be written, its name in `service.format_names.OutputFormat`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from service.core.formats import dcp, pth_legacy, pth_zip, safetensors, torchscript, zero
from service.core.formats.base import Format, LoadOptions, Probe, RawLoad
from service.core.formats.pth_legacy import LEGACY_MAGIC_NUMBER
from service.core.formats.unknown import UNKNOWN
from service.core.loading._archive import MAX_DATA_PKL_BYTES, check_archive
from service.core.types import DEFAULT_LIMITS
from service.errors import InvalidRequest
from service.format_names import OUTPUT_FORMATS

__all__ = ["DEFAULT_LIMITS", "FORMATS", "LEGACY_MAGIC_NUMBER", "MAX_DATA_PKL_BYTES", "UNKNOWN", "Format",
           "LoadOptions", "Probe", "RawLoad", "check_archive", "detect", "detect_format", "find_format", "writer_for"]

# Detection order: the first format whose `detect` says yes reads the file, so a more specific kind of zip comes
# before the torch archive. `detect_content` is asked of every format after a file is unpickled.
FORMATS: tuple[Format, ...] = (
    torchscript.FORMAT,  # a zip with code/: refused (it has a data.pkl too)
    dcp.SHARD,  # torch.save archives in a row (.distcp): refused
    pth_zip.FORMAT,
    pth_legacy.FORMAT,
    dcp.METADATA,  # a plain pickle naming torch.distributed.checkpoint classes: refused
    safetensors.FORMAT,
    zero.FORMAT,  # a torch file holding DeepSpeed ZeRO partitions: refused after unpickling
)


def detect_format(path: Path, *, formats: Sequence[Format] = FORMATS) -> Format:
    """Tell what a checkpoint file is from its content; the file name is never consulted.

    Args:
        path: The file to inspect.
        formats: The table to detect from (tests pass a copy with a format of their own).

    Returns:
        The first format of the table that detects the file, else `UNKNOWN` (whose load says what the file is).

    Raises:
        OSError: The file cannot be opened or read.
    """
    return detect(Probe.of(path), formats=formats)


def detect(probe: Probe, *, formats: Sequence[Format] = FORMATS) -> Format:
    """`detect_format` of a file already probed (a format's load reuses what its detection read)."""
    return next((fmt for fmt in formats if fmt.detect(probe)), UNKNOWN)


def find_format(name: str, *, formats: Sequence[Format] = FORMATS) -> Format | None:
    """The format of a name as stored in artifacts' metadata (``"pth-zip"``), or None."""
    return next((fmt for fmt in formats if fmt.name == name), None)


def writer_for(output: str, *, formats: Sequence[Format] = FORMATS) -> Format:
    """The format a checkpoint is written in when ``output`` (``"pth"``, ``"safetensors"``) is asked for.

    Raises:
        InvalidRequest: No writable format has that name.
    """
    found = next((fmt for fmt in formats if fmt.writable and fmt.output == output), None)
    if found is None:
        names = " or ".join(repr(n) for n in OUTPUT_FORMATS)
        raise InvalidRequest(f"unknown checkpoint format {output!r}; use {names}")
    return found
