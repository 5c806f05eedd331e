#!/usr/bin/env bash
# The GPU check, as one run of a few minutes on a machine with an NVIDIA GPU:
#   1. `llama info`: the memory estimate of configs/gpu-125m.toml (~134M parameters);
#   2. pretrain on it for STEPS steps in f32, then in bf16 (f16 with loss scaling when the
#      device cannot compute in bf16, as Vulkan drivers often cannot), GPU memory sampled by nvidia-smi;
#   3. `llama bench` on configs/bench-medium.toml in both dtypes, and PyTorch eager on the same
#      model (f32 and bf16 autocast) when the machine's python3 has torch with CUDA.
# It builds nothing: build the binaries first (on any machine of the same architecture), e.g.
#   cargo build --release -p llama-pretrain -p llama-cli --features llama-pretrain/vulkan,llama-cli/vulkan
#   BIN=$CARGO_TARGET_DIR/release scripts/gpu_check.sh
# Environment: BIN (the binaries' folder), OUT (results: the log, metrics-*.jsonl, gpu-memory.csv),
# DEVICE (vulkan | wgpu | cuda), STEPS (300), RUN_LIMIT (seconds per pretrain run, 170).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-target/release}"
OUT="${OUT:-runs/gpu-check}"
DEVICE="${DEVICE:-vulkan}"
STEPS="${STEPS:-300}"
RUN_LIMIT="${RUN_LIMIT:-170}"
CONFIG=configs/gpu-125m.toml
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1

stamp() { echo "=== $(date -u +%H:%M:%S) $*"; echo "# $(date -u +%Y/%m/%d\ %H:%M:%S) phase $*" >>"$OUT/gpu-memory.csv"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi not found"
"$BIN/llama" info --config "$CONFIG" --micro-batch 16 --seq-len 512 --device-memory-gib 79
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -lms 500 >>"$OUT/gpu-memory.csv" 2>/dev/null &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT

pretrain() { # dtype
    stamp "pretrain $1"
    rm -rf "runs/gpu-$1"
    timeout "$RUN_LIMIT" "$BIN/pretrain" --config "$CONFIG" --device "$DEVICE" --dtype "$1" --out "runs/gpu-$1" --max-steps "$STEPS"
    local rc=$?
    [ -f "runs/gpu-$1/metrics.jsonl" ] && cp "runs/gpu-$1/metrics.jsonl" "$OUT/metrics-$1.jsonl"
    echo "pretrain $1 exit code $rc (124 = stopped at RUN_LIMIT ${RUN_LIMIT}s; the metrics so far are kept)"
    return $rc
}

pretrain f32
half=bf16
if ! pretrain bf16 && grep -q "cannot compute in bf16" "$OUT/gpu-check.log"; then
    half=f16
    pretrain f16
fi

for dtype in f32 "$half"; do
    stamp "bench $dtype"
    timeout 75 "$BIN/llama" bench --config configs/bench-medium.toml --batch 16 --seq-len 512 --steps 5 --gen-tokens 64 \
        --device "$DEVICE" --dtype "$dtype" --json "$OUT/bench-ours-$dtype.json"
done
if python3 -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null; then
    for dtype in f32 bf16; do
        stamp "torch bench $dtype"
        HF_HUB_OFFLINE=1 timeout 75 python3 scripts/bench_torch.py --config configs/bench-medium.toml --batch 16 --seq-len 512 \
            --steps 5 --gen-tokens 64 --device cuda --dtype "$dtype" --threads 8 --json "$OUT/bench-torch-$dtype.json"
    done
fi
stamp done
