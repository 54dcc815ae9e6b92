"""docs/configuration.md documents every setting of service/config.py, and nothing that is not one."""

from __future__ import annotations

import re
from pathlib import Path

from service.config import Settings

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_setting_is_documented() -> None:
    text = PAGE.read_text(encoding="utf-8")
    missing = sorted(f"CKPT_{name.upper()}" for name in Settings.model_fields
                     if f"`CKPT_{name.upper()}`" not in text)
    assert not missing, f"docs/configuration.md does not document {', '.join(repr(m) for m in missing)}"


def test_no_documented_setting_is_unknown() -> None:
    known = {f"CKPT_{name.upper()}" for name in Settings.model_fields}
    client_side = {"CKPT_URL", "CKPT_TOKEN", "CKPT_ENV_FILE"}  # the CLI's and docker-compose's, not Settings
    documented = set(re.findall(r"`(CKPT_[A-Z0-9_]+)`", PAGE.read_text(encoding="utf-8")))
    unknown = sorted(documented - known - client_side)
    assert not unknown, f"docs/configuration.md documents unknown settings {', '.join(repr(u) for u in unknown)}"
