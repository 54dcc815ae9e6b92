#!/usr/bin/env bash
# Set up (first run: .venv, the corpus frameworks, chromium) and run the whole test suite. Extra arguments go to pytest; without any, the run also
# measures coverage of service/ and fails under the floor below.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# The browser tests (tests/ui) drive Debian's chromium; installed once, a no-op afterwards.
scripts/setup-browser.sh
if [ "$#" -eq 0 ]; then
  set -- --cov=service --cov-report=term:skip-covered --cov-fail-under=85
fi
exec .venv/bin/python -m pytest "$@"
