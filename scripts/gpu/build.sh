#!/usr/bin/env bash
# Builds what the GPU check (scripts/gpu/check.sh) runs, on any x86-64 machine that reaches the
# package registries (no GPU, no CUDA toolkit: cudarc loads libcuda and NVRTC at run time), and
# packs it for the trip, xz-compressed, in the git-ignored OUT (gpu-bin/): `llama` and `pretrain`
# with both GPU backends (cuda and vulkan, each with Burn's fusion, autotune and the kernel
# cache; `llama` with its symbols, and `llama device-check` runs the GPU tests' checks): 48 MB.
# A device call carries at most 64 MiB with the working tree (7.9 MB), so one call carries it
# (see check.sh). Cold on 2 cores (2026-12-04, empty cargo registry and target): 36 min; after a
# change to our crates, 2-5 min.
#   scripts/gpu/build.sh && ls -l gpu-bin
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}"
OUT="${OUT:-gpu-bin}"
features="llama-cli/cuda,llama-cli/vulkan,llama-pretrain/cuda,llama-pretrain/vulkan"
cargo build --release -p llama-cli -p llama-pretrain --features "$features"
# `llama` keeps its symbol table (not stripped; +5 MB packed), so that a stack sampled on the GPU
# machine (scripts/gpu/stacks.py) names our functions and CubeCL's: only its own crate relinks.
cargo rustc --release -p llama-cli --bin llama --features llama-cli/cuda,llama-cli/vulkan -- -C strip=none
rm -rf "$OUT" && mkdir -p "$OUT"
for bin in llama pretrain; do
    xz -T0 -6 -c "$CARGO_TARGET_DIR/release/$bin" >"$OUT/$bin.xz"
done
ls -l "$OUT"
du -ch "$OUT"/* | tail -1
