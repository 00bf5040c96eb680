#!/usr/bin/env bash
# The CUDA checks and GPU timings of BENCHMARKS.md ("On a CUDA GPU"): the suite's CUDA tests (skipped on a
# CPU-only machine); the smoke run and the main job (refinement off, bfloat16 autocast and float32) on the GPU;
# one epoch of ResNet-20; ResNet-20's latency at batch 64 on the GPU in eager torch and TorchScript (from the zoo
# model and from an exported .ts file); `skipnet` on the GPU; and a latency budget measured on the GPU (resnet20,
# 1.5x in TorchScript at batch 256), which an H200 refuses in one line with exit 2 (launch-bound there).
# Needs a CUDA build of torch, a GPU and Fashion-MNIST.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]      (from the repository root; default OUTDIR gpu_check)
#
# OUTDIR receives summary.txt (each step's exit status and wall time), machine.txt and one log per step
# (pytest.log, smoke_cuda.log, ...); the runs themselves go to OUTDIR/runs and the cache to OUTDIR/cache (a cold
# start: baselines are trained on the GPU).
set -uo pipefail
out=${1:-gpu_check}
mkdir -p "$out/runs" "$out/cache"
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONUNBUFFERED=1
export AUTOML_PRUNE_CACHE="$out/cache"
py=${PYTHON:-python3}

{
  date -u
  nvidia-smi -L 2>&1
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"
  "$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"
} > "$out/machine.txt" 2>&1

step() {  # step NAME COMMAND...: run it, record its exit status and wall time
  local name=$1 start=$EPOCHREALTIME rc
  shift
  "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc seconds=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')" \
    | tee -a "$out/summary.txt"
}

step pytest "$py" -m pytest -p no:cacheprovider -rs tests/test_device.py tests/test_latency.py
step smoke_cuda "$py" -m automl_prune.cli search --config smoke --device cuda --out "$out/runs/smoke"
step main_cuda_bf16 "$py" -m automl_prune.cli search --device cuda --search.refine_top 0 --out "$out/runs/main_bf16"
step main_cuda_fp32 "$py" -m automl_prune.cli search --device cuda --amp false --search.refine_top 0 \
  --out "$out/runs/main_fp32"
step resnet20_epoch_cuda "$py" -m automl_prune.cli train --model.name resnet20 --train.epochs 1 --device cuda \
  --out "$out/runs/resnet20"
for rt in torch torchscript; do
  step "latency_${rt}_cuda" "$py" -m automl_prune.cli latency --model resnet20 --in-channels 1 --input-size 28 \
    --runtime "$rt" --device cuda --batch-size 64
done
step export_cpu "$py" -m automl_prune.cli export --checkpoint "$out/runs/resnet20/model.pt" --out "$out/runs/export"
step latency_ts_artifact_cuda "$py" -m automl_prune.cli latency --artifact "$out/runs/export/model.ts" --device cuda \
  --batch-size 64
step skipnet_cuda "$py" -m automl_prune.cli skipnet --config skipnet --device cuda --out "$out/runs/skipnet"
step latency_budget_cuda "$py" -m automl_prune.cli search --model.name resnet20 --budget.flops null \
  --budget.speedup 1.5 --budget.runtime torchscript --budget.device cuda --budget.batch_size 256 \
  --search.refine_top 0 --out "$out/runs/latency_cuda"
