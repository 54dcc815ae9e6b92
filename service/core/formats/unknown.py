"""What a file no format recognises is: its load raises the error that says so (a plain pickle, text, ...)."""

from __future__ import annotations

import zipfile

from service.core.formats.base import Format, LoadOptions, Probe, RawLoad, is_pickle_start
from service.core.formats.safetensors import header_claim
from service.core.loading._allowlist import outside_allowlist, safe_globals_hint
from service.errors import CorruptCheckpoint, InvalidCheckpoint, UnsafeCheckpoint, quote_keys

__all__ = ["UNKNOWN", "Unknown"]


class Unknown(Format):
    """Not in the table: `service.core.formats.detect_format` returns it when no format detects the file."""

    name = "unknown"

    def detect(self, probe: Probe) -> bool:
        return True

    def load(self, probe: Probe, options: LoadOptions) -> RawLoad:
        raise _diagnosis(probe, options)


def _diagnosis(probe: Probe, options: LoadOptions) -> InvalidCheckpoint:
    head, size = probe.head, probe.size
    if is_pickle_start(head):
        # Never unpickled (not handing arbitrary pickles to an unpickler at all is the safer default, and torch
        # would refuse them anyway): only parsed, to say which globals it would have imported.
        unsafe = outside_allowlist(probe.pickle_globals, options.allowed)
        if unsafe:
            return UnsafeCheckpoint(
                "the file is a plain pickle (not a torch.save checkpoint) referencing globals: "
                f"{quote_keys(unsafe)}; " + safe_globals_hint(unsafe),
                unsafe_globals=unsafe,
            )
        return CorruptCheckpoint("the file is a plain pickle, not a torch.save checkpoint")
    if size == 0:
        return CorruptCheckpoint("the file is empty")
    claimed = header_claim(head)
    if claimed is not None:
        return CorruptCheckpoint(
            f"the safetensors header claims {claimed} bytes but the file has {size}"
            if claimed + 8 > size else f"the safetensors header of {claimed} bytes is too large"
        )
    if zipfile.is_zipfile(probe.path):
        if probe.is_zip:
            return CorruptCheckpoint("the zip archive is not a torch.save checkpoint (no data.pkl)")
        return CorruptCheckpoint("data precedes the zip archive")
    text = _as_text(head)
    if text and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return CorruptCheckpoint(f"the file is text, not a checkpoint (starts with {text[:24]!r})")
    return CorruptCheckpoint(f"unrecognised content, not a checkpoint (starts with {head[:8].hex()})")


def _as_text(head: bytes) -> str:
    # The 64-byte sniff may cut a multi-byte character in half; allow up to 3 trailing bytes of it.
    for cut in range(4):
        try:
            return head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""


UNKNOWN = Unknown()
