#!/usr/bin/env bash
# Install the `corpus` extra (timm, Lightning, MMEngine, transformers: their own saving code writes the files) and
# run tests/corpus. Without the extra those tests skip, saying so. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,corpus]'
.venv/bin/python -m pytest -q tests/corpus "$@"
