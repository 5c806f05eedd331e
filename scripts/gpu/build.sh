#!/usr/bin/env bash
# Builds what the GPU check (scripts/gpu/check.sh) runs, on any x86-64 machine that reaches the
# package registries (no GPU, no CUDA toolkit: cudarc loads libcuda and NVRTC at run time), and
# packs it for the trip, xz-compressed, in two git-ignored folders:
#   OUT (gpu-bin/): `llama` and `pretrain` with both GPU backends (cuda and vulkan, each with
#     Burn's fusion, autotune and the kernel cache; `llama` with its symbols): 48 MB, for phases
#     2-7;
#   TESTS_OUT (gpu-tests/): the model crate's two test binaries with the GPU tests, same
#     features: 39.1 MB, for phase 1.
# A device call carries at most 64 MiB with the working tree (7.8 MB): the two folders together
# do not fit, so each goes in its own call (see check.sh). Cold on 2 cores (2026-12-04, empty
# cargo registry and target): 36 min for the two binaries, 2 more for the tests; after a change to
# our crates, ~18 min for the binaries.
#   scripts/gpu/build.sh && ls -l gpu-bin gpu-tests
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}"
OUT="${OUT:-gpu-bin}"
TESTS_OUT="${TESTS_OUT:-gpu-tests}"
features="llama-cli/cuda,llama-cli/vulkan,llama-pretrain/cuda,llama-pretrain/vulkan"
cargo build --release -p llama-cli -p llama-pretrain --features "$features"
# `llama` keeps its symbol table (not stripped; +5 MB packed), so that a stack sampled on the GPU
# machine (scripts/gpu/stacks.py) names our functions and CubeCL's: only its own crate relinks.
cargo rustc --release -p llama-cli --bin llama --features llama-cli/cuda,llama-cli/vulkan -- -C strip=none
# The test binaries: `cargo test --no-run` prints where it wrote each one.
tests=$(cargo test --release -p llama-model --features cuda,vulkan,fusion,autotune,kernel-cache --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] in (["lib"], ["test"]):
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])')
rm -rf "$OUT" "$TESTS_OUT" && mkdir -p "$OUT" "$TESTS_OUT"
for bin in llama pretrain; do
    xz -T0 -6 -c "$CARGO_TARGET_DIR/release/$bin" >"$OUT/$bin.xz"
done
while read -r kind name path; do
    # model-unit (the lib's tests: attention) and model-model (tests/model.rs: recomputation);
    # the other test binaries hold no GPU test.
    if [ "$kind" = lib ] || [ "$name" = model ]; then
        xz -T0 -6 -c "$path" >"$TESTS_OUT/model-$([ "$kind" = lib ] && echo unit || echo "$name").xz"
    fi
done <<<"$tests"
ls -l "$OUT" "$TESTS_OUT"
du -ch "$OUT"/* | tail -1
du -ch "$TESTS_OUT"/* | tail -1
