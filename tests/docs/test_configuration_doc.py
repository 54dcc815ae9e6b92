"""docs/configuration.md documents every setting of service/config.py, and nothing that is not one."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from service.config import Settings

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
# The CLI's and docker compose's variables, which the page mentions but which are not service settings.
NOT_SETTINGS = frozenset({"CKPT_URL", "CKPT_TOKEN", "CKPT_ENV_FILE"})


def undocumented(settings: type[BaseModel], text: str) -> list[str]:
    """The `CKPT_*` variables of `settings` that `text` does not name (as `CKPT_NAME`, in backquotes)."""
    return sorted(f"CKPT_{name.upper()}" for name in settings.model_fields if f"`CKPT_{name.upper()}`" not in text)


def unknown(settings: type[BaseModel], text: str) -> list[str]:
    """The `CKPT_*` variables `text` names that are not fields of `settings`."""
    known = {f"CKPT_{name.upper()}" for name in settings.model_fields}
    return sorted(set(re.findall(r"`(CKPT_[A-Z0-9_]+)`", text)) - known - NOT_SETTINGS)


def test_every_setting_is_documented() -> None:
    missing = undocumented(Settings, PAGE.read_text(encoding="utf-8"))
    assert not missing, f"docs/configuration.md does not document {', '.join(repr(m) for m in missing)}"


def test_no_documented_setting_is_unknown() -> None:
    extra = unknown(Settings, PAGE.read_text(encoding="utf-8"))
    assert not extra, f"docs/configuration.md documents unknown settings {', '.join(repr(u) for u in extra)}"


def test_a_new_setting_without_documentation_is_caught() -> None:
    class Grown(Settings):
        shiny_new_limit: int = 3

    text = PAGE.read_text(encoding="utf-8")
    assert set(undocumented(Grown, text)) - set(undocumented(Settings, text)) == {"CKPT_SHINY_NEW_LIMIT"}
    stale = text + "\n| `CKPT_REMOVED_LONG_AGO` | 1 | gone |\n"
    assert set(unknown(Grown, stale)) - set(unknown(Grown, text)) == {"CKPT_REMOVED_LONG_AGO"}
