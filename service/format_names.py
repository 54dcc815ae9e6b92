"""The names a checkpoint can be asked for in (`output_format`, `?format=`), shared by every layer.

The API schemas, the operations and the client use these one definitions. The module imports no torch (the
client must not), so the formats themselves (`service.core.formats`) cannot live here; a test checks that the
writable formats of that table and `OutputFormat` name the same things.
"""

from __future__ import annotations

from typing import Literal, TypeGuard, get_args

__all__ = ["OUTPUT_FORMATS", "OutputFormat", "is_output_format"]

OutputFormat = Literal["pth", "safetensors"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)


def is_output_format(value: object) -> TypeGuard[OutputFormat]:
    """Whether a value (a form field, a query parameter) is one of `OUTPUT_FORMATS`."""
    return value in OUTPUT_FORMATS
