#!/usr/bin/env bash
# Set up (first run) and start the service on its embedded default: a local artifact directory ./data (of the
# repository). The service runs in the caller's directory, so relative paths (--config arch.toml, --data-dir)
# mean what they say where the command was typed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/bootstrap.sh" --runtime  # serving needs no pytest, mypy or schemathesis
export CKPT_DATA_DIR="${CKPT_DATA_DIR:-$root/data}"
exec "$root/.venv/bin/ckpt" serve "$@"
