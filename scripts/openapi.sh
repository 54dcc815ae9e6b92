#!/usr/bin/env bash
# Regenerate the committed OpenAPI contract from the app (tests fail when it drifts).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/python -m service.api.openapi > openapi/openapi.json
echo "wrote openapi/openapi.json"
