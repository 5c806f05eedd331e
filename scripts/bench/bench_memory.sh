#!/usr/bin/env bash
# Peak memory and speed of a training step with and without block recomputation (and with it,
# logits in chunks of 1024 positions), each in a fresh process so that peak RSS is its own.
#   scripts/bench/bench_memory.sh [configs/bench-medium.toml:4:512 configs/bench-long.toml:1:2048 ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}"
cargo build --release --bin llama
out="${BENCH_OUT:-runs/bench-memory}"; mkdir -p "$out"
runs=("$@"); [ ${#runs[@]} -eq 0 ] && runs=(configs/bench-medium.toml:4:512 configs/bench-long.toml:1:2048)
for spec in "${runs[@]}"; do
    IFS=: read -r cfg batch seq <<<"$spec"
    name="$(basename "$cfg" .toml)-b$batch-s$seq"
    for recompute in none block; do
        "$CARGO_TARGET_DIR/release/llama" bench --config "$cfg" --batch "$batch" --seq-len "$seq" --steps 2 --gen-tokens 0 \
            --recompute "$recompute" --json "$out/$name-$recompute.json"
    done
    python3 - "$out" "$name" <<'PY'
import json, sys
out, name = sys.argv[1], sys.argv[2]
r = {k: json.load(open(f"{out}/{name}-{k}.json")) for k in ("none", "block")}
for k in ("none", "block"):
    j = r[k]
    step = j["forward_s"] + j["backward_s"] + j["optimizer_s"]
    print(f"{name:28} recompute {k:5}  {j['train_tokens_per_s']:8.1f} tok/s  step {step:6.2f} s (fwd {j['forward_s']:.2f} bwd {j['backward_s']:.2f} adamw {j['optimizer_s']:.2f})  peak RSS {j['peak_rss_gib']:.2f} GiB")
n, b = r["none"], r["block"]
print(f"{name:28} block/none: tokens/s {b['train_tokens_per_s'] / n['train_tokens_per_s']:.2f}x, peak RSS {b['peak_rss_gib'] / n['peak_rss_gib']:.2f}x")
PY
done
