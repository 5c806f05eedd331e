#!/usr/bin/env bash
# A short GPU smoke check (a few minutes): bench-medium training and decoding in f32 and f16 mixed
# precision, and 200 steps of the tiny pre-training, on DEVICE (vulkan by default). It builds
# nothing: build on any x86-64 machine, carry the binaries, e.g.
#   cargo build --release -p llama-pretrain -p llama-cli --features llama-pretrain/vulkan,llama-cli/vulkan
#   BIN=$CARGO_TARGET_DIR/release OUT=runs/gpu-smoke scripts/gpu_smoke.sh
# The binaries may travel compressed (xz) and be unpacked on the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-target/release}"
OUT="${OUT:-runs/gpu-smoke}"
DEVICE="${DEVICE:-vulkan}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi not found"
for dt in f32 f16; do
    timeout 110 "$BIN/llama" bench --config configs/bench-medium.toml --batch 16 --seq-len 512 --steps 5 --gen-tokens 64 \
        --device "$DEVICE" --dtype "$dt" --json "$OUT/bench-$DEVICE-$dt.json" 2>&1 | tail -5
done
rm -rf "$OUT/tiny"
timeout 100 "$BIN/pretrain" --config configs/tiny.toml --device "$DEVICE" --out "$OUT/tiny" --max-steps 200 >"$OUT/pretrain-tiny-$DEVICE.log" 2>&1
echo "pretrain exit code $? (124: stopped at its 100 s limit)"
grep -E "step (10|50|100|150|200)/|val loss|rror" "$OUT/pretrain-tiny-$DEVICE.log" | tail -12
