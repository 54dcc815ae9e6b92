#!/usr/bin/env bash
# The benchmark in one command: bench/run.sh [--small] [--workdir DIR] [--output FILE] [--rounds N]
# Full: about 15 minutes on 2 cores, needs ~8 GB of disk under $TMPDIR; writes bench/RESULTS.md.
# --small: the CI configuration (about a minute, plus bench/s3.py --small and bench/index.py --small, the index at
# 2,000 artifacts per backend); writes $TMPDIR/ckpt-bench-RESULTS-small.md. The full index benchmark (100,000
# artifacts per backend) runs on its own: .venv/bin/python -m bench.index.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then scripts/bootstrap.sh; fi
if [[ " $* " == *" --small "* ]]; then
  # The S3 store and merges by reference against a real Ceph RGW, small (about 30 s with Ceph's start).
  .venv/bin/python -m bench.run "$@"
  .venv/bin/python -m bench.s3 --small --rounds 1
  # The metadata index's queries on SQLite and a real PostgreSQL, 2,000 artifacts each (about 90 s).
  exec .venv/bin/python -m bench.index --small --rounds 20 --output "${TMPDIR:-/tmp}/ckpt-bench-index-small.md"
fi
exec .venv/bin/python -m bench.run "$@"
