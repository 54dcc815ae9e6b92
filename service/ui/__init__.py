"""The web pages' templates and static files (package data); `service.api.routes.ui` serves them."""

from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
