"""Print the OpenAPI document of the app: `python -m service.api.openapi > openapi/openapi.json`."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def render_openapi() -> str:
    """The app's OpenAPI document as stable, sorted JSON text."""
    from service.api.app import create_app
    from service.config import Settings

    with tempfile.TemporaryDirectory() as tmp:
        schema: dict[str, Any] = create_app(Settings(data_dir=Path(tmp), config=None)).openapi()
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_openapi())
