#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the embedded default. Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m automl_prune.cli pipeline "$@"
