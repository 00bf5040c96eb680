#!/usr/bin/env bash
# Install automl-prune and everything it needs into the active Python environment.
# Idempotent: a second run with nothing changed only checks a stamp and returns.
#
#   AUTOML_PRUNE_CONSTRAINTS  pip constraints file (default: constraints/cpu.txt, which pins
#                             the CPU build of torch); set it to /dev/null to keep your own torch.
#   PYTHON                    interpreter to install into (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${AUTOML_PRUNE_CONSTRAINTS:-constraints/cpu.txt}

# Fashion-MNIST from the Debian package (real data, offline); skipped where apt-get is unavailable.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${AUTOML_PRUNE_FASHION_MNIST:-}" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing dataset-fashion-mnist (apt-get)"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST not found; run 'sudo apt-get install -y dataset-fashion-mnist'" \
         "or set AUTOML_PRUNE_FASHION_MNIST to a directory with the four IDX files" >&2
  fi
fi

stamp_dir=.automl-prune
stamp="$stamp_dir/setup.stamp"
want=$(cat pyproject.toml "$CONSTRAINTS" 2>/dev/null | sha256sum | cut -c1-16)-$("$PYTHON" -c 'import sys; print(sys.executable)')
# Skip only when the stamp matches and the installed automl_prune (imported from outside the
# checkout, so the current directory does not count) is this checkout's.
here=$(pwd -P)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && (cd / && "$PYTHON" -c "
import os, sys
import automl_prune, torch, torch_pruning, ray, optuna, stable_baselines3
sys.exit(0 if os.path.realpath(automl_prune.__file__).startswith('$here' + os.sep) else 1)" 2>/dev/null); then
  exit 0
fi
echo "setup: pip install -e .[dev] (constraints: $CONSTRAINTS)"
"$PYTHON" -m pip install --quiet --root-user-action=ignore --constraint "$CONSTRAINTS" -e ".[dev]"
mkdir -p "$stamp_dir"
echo "$want" > "$stamp"
