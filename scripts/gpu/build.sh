#!/usr/bin/env bash
# Builds what the GPU check (scripts/gpu/check.sh) runs, on any x86-64 machine that reaches the
# package registries (no GPU, no CUDA toolkit: cudarc loads libcuda and NVRTC at run time), and
# packs it for the trip: `llama` and `pretrain` with both GPU backends (cuda and vulkan, each with
# Burn's fusion and autotune), and the model crate's two test binaries with the same features (the
# GPU tests), xz-compressed into OUT (default gpu-bin/, git-ignored). Cold on 2 cores: 62 min for
# the two binaries (33 MB packed); the test binaries rebuild the dependencies with the model
# crate's dev-dependencies (not measured whole: budget as much again).
#   scripts/gpu/build.sh && ls -l gpu-bin
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}"
OUT="${OUT:-gpu-bin}"
features="llama-cli/cuda,llama-cli/vulkan,llama-pretrain/cuda,llama-pretrain/vulkan"
cargo build --release -p llama-cli -p llama-pretrain --features "$features"
# The test binaries: `cargo test --no-run` prints where it wrote each one.
tests=$(cargo test --release -p llama-model --features cuda,vulkan,fusion,autotune --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] in (["lib"], ["test"]):
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])')
rm -rf "$OUT" && mkdir -p "$OUT"
for bin in llama pretrain; do
    xz -T0 -6 -c "$CARGO_TARGET_DIR/release/$bin" >"$OUT/$bin.xz"
done
while read -r kind name path; do
    # model-unit (the lib's tests: attention) and model-model (tests/model.rs: recomputation).
    xz -T0 -6 -c "$path" >"$OUT/model-$([ "$kind" = lib ] && echo unit || echo "$name").xz"
done <<<"$tests"
ls -l "$OUT"
du -ch "$OUT"/* | tail -1
