#!/usr/bin/env bash
# One prepared check for a GPU machine (no network needed; PyTorch, transformers and Triton
# installed; other wheels, if any are missing, carried in device_assets/wheels/):
#
#   1. a GPT-2-124M-shaped teacher (random weights) distilled into 6 layers at sequence 1024,
#      batch 8, bf16 autocast, 40 steps, in one plain process: tokens/s, MFU against the
#      H100/H200 bf16 peak, peak memory;
#   2. the same with train.compile=true;
#   3. the same as a 1-GPU DDP job through torchrun and the lmdistill CLI;
#   4. a report that checks every run (finished, finite and decreasing losses, MFU in range,
#      memory below the device's, compiled and DDP losses within 3% of the eager run's).
#
# Usage, from anywhere:  bash benchmarks/gpu_smoke.sh [OUT_DIR]     (default: ./gpu_smoke_out)
# Writes OUT_DIR/gpu_smoke.json and OUT_DIR/gpu_smoke.log; exit status 1 if a check failed.
# Run folders (about 2 GB) go to a temporary folder, removed at the end (KEEP_WORK=1 keeps it).
# SMOKE_DRY_RUN=1 runs the same steps on the CPU at toy size, to check the script without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-gpu_smoke_out}" && cd "${1:-gpu_smoke_out}" && pwd)
WORK=${WORK:-$(mktemp -d /tmp/lmdistill-smoke.XXXXXX)}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec > >(tee "$OUT/gpu_smoke.log") 2>&1

status=0
step() {  # name, command...: run with a time limit, note a failure and go on
    local name=$1; shift
    echo "[smoke] --- $name"
    local t0=$SECONDS
    timeout 420 "$@" || { echo "[smoke] FAIL: $name exited with $?"; status=1; }
    echo "[smoke] --- $name: $((SECONDS - t0)) s"
}

if compgen -G "device_assets/wheels/*.whl" >/dev/null; then
    $PY -m pip install --no-index --no-deps -q device_assets/wheels/*.whl || status=1
fi
$PY -c "import lmdistill.train.run" || { echo "[smoke] FAIL: lmdistill does not import (missing packages?)"; exit 1; }

step prepare $PY benchmarks/gpu_smoke.py prepare "$WORK" || true
mapfile -t RECIPE < <($PY benchmarks/gpu_smoke.py overrides "$WORK")
step "eager bf16" $PY benchmarks/gpu_smoke.py train "$WORK" eager
if [ "${SMOKE_DRY_RUN:-0}" != 1 ]; then  # a CPU dry run checks the script, not the compiler
    step "compiled bf16" $PY benchmarks/gpu_smoke.py train "$WORK" compiled train.compile=true
fi
step "torchrun 1-GPU DDP" $PY -m torch.distributed.run --standalone --nproc-per-node 1 \
    -m lmdistill distill --config distilgpt2 --out "$WORK/ddp" "${RECIPE[@]}"
$PY benchmarks/gpu_smoke.py report "$WORK" "$OUT/gpu_smoke.json" || status=1

[ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
echo "[smoke] exit status $status"
exit $status
