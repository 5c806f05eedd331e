#!/usr/bin/env bash
# Runs our benchmark and PyTorch's on the same configs, alternating, and prints the ratio per phase.
# PyTorch (+ transformers) is installed from the package index into a cached virtual environment.
#   scripts/bench/bench.sh [configs/bench-small.toml:8:256 configs/bench-medium.toml:4:512 ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/bench_env.sh
out="${BENCH_OUT:-runs/bench}"; mkdir -p "$out"
runs=("$@"); [ ${#runs[@]} -eq 0 ] && runs=(configs/bench-small.toml:8:256 configs/bench-medium.toml:4:512)
for spec in "${runs[@]}"; do
    IFS=: read -r cfg batch seq <<<"$spec"
    name="$(basename "$cfg" .toml)-b$batch-s$seq"
    for round in 1 2; do
        "$CARGO_TARGET_DIR/release/llama" bench --config "$cfg" --batch "$batch" --seq-len "$seq" --steps 3 --gen-tokens 32 --json "$out/$name-ours-$round.json"
        OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/bench/bench_torch.py --config "$cfg" --batch "$batch" --seq-len "$seq" --steps 3 --gen-tokens 32 --threads 2 --json "$out/$name-torch-$round.json"
    done
    python3 - "$out" "$name" <<'PY'
import json, sys
out, name = sys.argv[1], sys.argv[2]
best = lambda who, k, f: f(json.load(open(f"{out}/{name}-{who}-{r}.json")).get(k, float("nan")) for r in (1, 2))
for key, f, better in [("train_tokens_per_s", max, "higher"), ("decode_tokens_per_s", max, "higher"), ("forward_s", min, "lower"), ("backward_s", min, "lower"), ("optimizer_s", min, "lower"), ("peak_rss_gib", min, "lower")]:
    o, t = best("ours", key, f), best("torch", key, f)
    print(f"{name:32} {key:20} ours {o:10.3f}  torch {t:10.3f}  ours/torch {o / t:6.2f} ({better} is better)")
PY
done
