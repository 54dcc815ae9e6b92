#!/usr/bin/env bash
# Set up (first run) and start the service on its embedded default: a local artifact directory ./data.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/ckpt serve "$@"
