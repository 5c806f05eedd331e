#!/usr/bin/env bash
# A short GPU smoke check (a few minutes): bench-medium training and decoding in f32 and f16 mixed
# precision, and 200 steps of the tiny pre-training, on DEVICE (vulkan by default). It builds
# nothing: build on any x86-64 machine, carry the binaries, e.g.
#   cargo build --release -p llama-pretrain -p llama-cli --features llama-pretrain/vulkan,llama-cli/vulkan
#   BIN=$CARGO_TARGET_DIR/release OUT=runs/gpu-smoke scripts/gpu_smoke.sh
# The binaries may travel compressed (xz) and be unpacked on the GPU machine. The GPU features
# build Burn's kernel fusion and autotuning in; BIN_BARE, when set, names a `llama` built without
# them (`cargo build --release -p llama-cli --features llama-model/vulkan`, copied aside), whose
# bench runs alternate with the fused one's (A/B, same run). Each dtype also runs the fused build
# with `--burn-attention` (Burn's composed attention instead of ours: flash forward, probabilities
# recomputed in backward), the A/B of our attention op.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-target/release}"
OUT="${OUT:-runs/gpu-smoke}"
DEVICE="${DEVICE:-vulkan}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi not found"
bench() { # binary, dtype, json, extra flags...
    local bin=$1 dt=$2 json=$3
    shift 3
    timeout 110 "$bin" bench --config configs/bench-medium.toml --batch 16 --seq-len 512 --steps 5 --gen-tokens 64 \
        --device "$DEVICE" --dtype "$dt" --json "$json" "$@" 2>&1 | tail -5
}
for dt in f32 f16; do
    echo "--- bench $dt (fused)"
    bench "$BIN/llama" "$dt" "$OUT/bench-$DEVICE-$dt.json"
    echo "--- bench $dt (fused, Burn's attention)"
    bench "$BIN/llama" "$dt" "$OUT/bench-$DEVICE-$dt-burn-attention.json" --burn-attention
    if [ -n "${BIN_BARE:-}" ]; then
        echo "--- bench $dt (bare: no fusion, no autotune)"
        bench "$BIN_BARE/llama" "$dt" "$OUT/bench-$DEVICE-$dt-bare.json"
    fi
done
rm -rf "$OUT/tiny"
timeout 100 "$BIN/pretrain" --config configs/tiny.toml --device "$DEVICE" --out "$OUT/tiny" --max-steps 200 >"$OUT/pretrain-tiny-$DEVICE.log" 2>&1
echo "pretrain exit code $? (124: stopped at its 100 s limit)"
grep -E "step (10|50|100|150|200)/|val loss|rror" "$OUT/pretrain-tiny-$DEVICE.log" | tail -12
