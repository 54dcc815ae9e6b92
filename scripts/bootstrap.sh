#!/usr/bin/env bash
# Create .venv if missing and install the package, CPU torch pinned by constraints.txt.
#   scripts/bootstrap.sh            the package with its dev tools (tests, linters): `.[dev]`
#   scripts/bootstrap.sh --runtime  only what the service needs to run: `.` (what scripts/serve.sh uses)
# Re-runs are fast: it reinstalls only when pyproject.toml or constraints.txt changed, or when the dev tools are
# wanted and only the runtime is installed (a dev install serves the runtime too).
# CKPT_BOOTSTRAP_PRINT=1 prints the install it would run, and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=dev
if [ "${1:-}" = "--runtime" ]; then
  mode=runtime
elif [ "$#" -gt 0 ]; then
  echo "usage: scripts/bootstrap.sh [--runtime]" >&2
  exit 2
fi
target='.[dev]'
[ "$mode" = runtime ] && target='.'
if [ -n "${CKPT_BOOTSTRAP_PRINT:-}" ]; then
  echo "bootstrap ($mode): python -m pip install -q -c constraints.txt -e $target"
  exit 0
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ckpt-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
# A stamp is "HASH" (dev, as older versions wrote it), "HASH dev" or "HASH runtime".
case "$have" in
  "$want" | "$want dev") installed=dev ;;
  "$want runtime") installed=runtime ;;
  *) installed=none ;;
esac
if [ "$installed" = none ] || { [ "$mode" = dev ] && [ "$installed" = runtime ]; }; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e "$target"
  echo "$want $mode" > "$stamp"
fi
