#!/usr/bin/env bash
# Set up (idempotent), then run the main job, `automl-prune search`, in the current directory.
# Extra arguments go to it, e.g. `bash scripts/run.sh --config configs/smoke.yaml`.
set -euo pipefail
root=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
bash "$root/scripts/setup.sh"
exec "${PYTHON:-python3}" -m automl_prune.cli search "$@"
