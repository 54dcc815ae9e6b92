#!/usr/bin/env bash
# ruff and mypy (strict on service/), as CI runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/ruff check service tests bench examples
.venv/bin/mypy
