#!/usr/bin/env bash
# The benchmark in one command: bench/run.sh [--small] [--workdir DIR] [--output FILE] [--rounds N]
# Full: about 15 minutes on 2 cores, needs ~8 GB of disk under $TMPDIR; writes bench/RESULTS.md.
# --small: the CI configuration (about a minute); writes $TMPDIR/ckpt-bench-RESULTS-small.md.
# With --small it also runs the index benchmark at 2,000 artifacts per backend (bench/index.py; the full one,
# 100,000 per backend, runs on its own: .venv/bin/python -m bench.index).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then scripts/bootstrap.sh; fi
.venv/bin/python -m bench.run "$@"
for arg in "$@"; do
  if [ "$arg" = --small ]; then
    exec .venv/bin/python -m bench.index --small --rounds 20 --output "${TMPDIR:-/tmp}/ckpt-bench-index-small.md"
  fi
done
