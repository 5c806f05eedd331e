#!/usr/bin/env bash
# Llama 2 7B on one GPU: STEPS optimizer steps of configs/7b-gpu-check.toml (7B, micro-batch
# 1 x 4096, recompute = block, logits in chunks of 1024, f32 master and AdamW on the host, f16 on
# the device), with the device memory sampled by nvidia-smi every 250 ms, against `llama info`'s
# estimate. The run is stopped once STEPS steps have logged (a 7B checkpoint is ~80 GB: none is
# written). It builds nothing: build on any x86-64 machine and carry the binaries, e.g.
#   cargo build --release -p llama-pretrain -p llama-cli --features llama-pretrain/vulkan,llama-cli/vulkan
#   BIN=$CARGO_TARGET_DIR/release scripts/gpu_7b.sh
# Environment: BIN (the binaries' folder), OUT (results: gpu-7b.log, metrics.jsonl, gpu-memory.csv),
# DEVICE (vulkan | wgpu | cuda), STEPS (2), LIMIT (seconds for the pretrain run, 420).
# TEST_BIN, when set, is run first: the model crate's test binary built with the GPU feature, whose
# `block_recomputation_on_vulkan` checks recomputed gradients against the plain pass on the device.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-target/release}"
OUT="${OUT:-runs/gpu-7b}"
DEVICE="${DEVICE:-vulkan}"
STEPS="${STEPS:-2}"
LIMIT="${LIMIT:-420}"
CONFIG=configs/7b-gpu-check.toml
RUN=runs/7b-gpu-check
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-7b.log") 2>&1
stamp() { echo "=== $(date -u +%H:%M:%S) $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi not found"
nproc; free -g | head -2
if [ -n "${TEST_BIN:-}" ]; then
    stamp "recomputation test on $DEVICE"
    timeout 120 "$TEST_BIN" block_recomputation_on_vulkan --nocapture
    echo "test exit code $?"
fi
"$BIN/llama" info --config "$CONFIG" --micro-batch 1 --seq-len 4096 --recompute block --optimizer host --device-memory-gib 80

nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -lms 250 >"$OUT/gpu-memory.csv" 2>/dev/null &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT
rm -rf "$RUN"
stamp "pretrain 7B, $STEPS steps"
start=$(date +%s)
"$BIN/pretrain" --config "$CONFIG" --device "$DEVICE" --dtype f16 --out "$RUN" &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
    logged=$(grep -c '"train/loss"' "$RUN/metrics.jsonl" 2>/dev/null)
    if [ "${logged:-0}" -ge "$STEPS" ] || [ $(($(date +%s) - start)) -ge "$LIMIT" ]; then
        grep -E "VmHWM|VmRSS" "/proc/$pid/status"
        kill -9 "$pid"
        echo "stopped after ${logged:-0} logged steps, $(($(date +%s) - start)) s"
        break
    fi
    sleep 0.5
done
wait "$pid" 2>/dev/null
kill $sampler 2>/dev/null
stamp done
cp "$RUN/metrics.jsonl" "$OUT/metrics.jsonl" 2>/dev/null && cat "$OUT/metrics.jsonl"
awk -F', ' '$2 + 0 > peak { peak = $2 + 0 } END { printf "nvidia-smi peak memory.used: %d MiB = %.2f GiB\n", peak, peak / 1024 }' "$OUT/gpu-memory.csv"
