#!/usr/bin/env bash
# The GPU code path checked on a machine without a GPU: Burn's cubecl backend through wgpu on
# Mesa's software Vulkan driver (lavapipe), against flex. It shows that a GPU build (kernel fusion
# and autotuning included) computes what the CPU build computes; it measures no GPU speed.
#   apt-get install -y mesa-vulkan-drivers libvulkan1          # lavapipe
#   cargo build --release -p llama-pretrain -p llama-cli --features llama-pretrain/wgpu,llama-cli/wgpu
#   BIN=$CARGO_TARGET_DIR/release MODEL=runs/pipeline/sft-skills scripts/gpu/path_on_cpu.sh
# Checks: (1) greedy `llama generate` (KV cache, a tool call) gives the same text on wgpu as on
# flex; (2) 10 steps of configs/tiny.toml pre-training, plain and with block recomputation on
# wgpu, give every step's loss and gradient norm to a relative 1e-4. `--device vulkan` (cubecl's
# SPIR-V compiler) cannot be checked this way: Mesa 22.3's lavapipe segfaults compiling its first
# kernel; wgpu's WGSL path runs.
# Environment: BIN (the binaries' folder), MODEL (a chat checkpoint; default the pipeline's
# sft-skills), OUT (runs/gpu-path-on-cpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${BIN:-target/release}"
MODEL="${MODEL:-runs/pipeline/sft-skills}"
OUT="${OUT:-runs/gpu-path-on-cpu}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"   # the Vulkan loader asks for it
mkdir -p "$OUT"
vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverName" || echo "vulkaninfo not found (apt-get install vulkan-tools)"

for device in flex wgpu; do
    "$BIN/llama" generate --checkpoint "$MODEL" --tokenizer data/tokenizer.json --device "$device" \
        --prompt "[INST] Jack buys 5 boxes of 9 pencils. How many pencils is that? [/INST]" \
        --prompt "[INST] My name is Tina. What is my name? [/INST]" --prompt "Once upon a time" \
        --max-new-tokens 60 --temperature 0 --tools >"$OUT/generate-$device.txt"
done
if cmp -s "$OUT/generate-flex.txt" "$OUT/generate-wgpu.txt"; then
    echo "generate: wgpu = flex (greedy, 3 prompts)"
else
    echo "generate: wgpu and flex differ"; diff "$OUT/generate-flex.txt" "$OUT/generate-wgpu.txt" || true; exit 1
fi

# The model starts from the same weights on both (built on the host: `--optimizer host`; a model
# built on the device draws from that device's generator); then every step must agree.
sed 's/^log_every = .*/log_every = 1/' configs/tiny.toml >"$OUT/tiny-every-step.toml"
run() { # name, device, extra flags...
    local name=$1 device=$2
    shift 2
    rm -rf "$OUT/pretrain-$name"
    "$BIN/pretrain" --config "$OUT/tiny-every-step.toml" --device "$device" --optimizer host --max-steps 10 \
        --out "$OUT/pretrain-$name" "$@" >"$OUT/pretrain-$name.log" 2>&1
}
run flex flex
run wgpu wgpu
run wgpu-recompute wgpu --recompute block
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def steps(name):
    rows = [json.loads(l) for l in open(f"{out}/pretrain-{name}/metrics.jsonl")]
    return [(r["train/loss"], r["train/grad_norm"]) for r in rows if "train/loss" in r]
want = steps("flex")
ok = True
for name in ["wgpu", "wgpu-recompute"]:
    got = steps(name)
    worst = max(abs(a - b) / abs(b) for g, w in zip(got, want) for a, b in zip(g, w))
    same = len(got) == len(want) == 10 and worst < 1e-4
    ok &= same
    print(f"pretrain, 10 steps, {name} vs flex: largest relative difference in loss or gradient norm {worst:.1e}", "ok" if same else "DIFFERS")
print("losses (flex):", [round(l, 5) for l, _ in want])
sys.exit(0 if ok else 1)
PY
