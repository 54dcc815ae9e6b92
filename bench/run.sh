#!/usr/bin/env bash
# The benchmark in one command: bench/run.sh [--small] [--workdir DIR] [--output FILE] [--rounds N]
# Full: about 15 minutes on 2 cores, needs ~8 GB of disk under $TMPDIR; writes bench/RESULTS.md.
# --small: the CI configuration (about a minute); writes $TMPDIR/ckpt-bench-RESULTS-small.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then scripts/bootstrap.sh; fi
exec .venv/bin/python -m bench.run "$@"
