#!/usr/bin/env bash
# Decoding throughput by batch size, ours against Hugging Face `generate`, alternating: bench-small,
# prompts of 16 random tokens, 64 new tokens each, greedy, KV cache, f32, 2 threads; best of
# three rounds per batch size and side.
#   scripts/bench/bench_decode.sh [8 32 64]       (LLAMA_BIN=path/to/llama skips the release build)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -n "${LLAMA_BIN:-}" ]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}"
    venv="${LLAMA2_TORCH_VENV:-$HOME/.cache/llama2-rs/torch-venv}"
else
    source scripts/bench/bench_env.sh
    LLAMA_BIN="$CARGO_TARGET_DIR/release/llama"
fi
out="${BENCH_OUT:-runs/bench-decode}"; mkdir -p "$out"
batches=("$@"); [ ${#batches[@]} -eq 0 ] && batches=(8 32 64)
cfg=configs/bench-small.toml
for round in 1 2 3; do
    for b in "${batches[@]}"; do
        "$LLAMA_BIN" bench --config "$cfg" --batch "$b" --seq-len 64 --steps 1 --gen-tokens 64 --json "$out/b$b-ours-$round.json" >/dev/null
        OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/bench/bench_torch.py --config "$cfg" --batch "$b" --seq-len 64 --steps 1 --gen-tokens 64 --threads 2 --json "$out/b$b-torch-$round.json" >/dev/null
    done
done
python3 - "$out" "${batches[@]}" <<'PY'
import json, sys
out, batches = sys.argv[1], sys.argv[2:]
print("batch | ours tokens/s | HF generate tokens/s | ours / HF")
for b in batches:
    best = lambda who: max(json.load(open(f"{out}/b{b}-{who}-{r}.json"))["decode_tokens_per_s"] for r in (1, 2, 3))
    o, t = best("ours"), best("torch")
    print(f"{b} | {o:,.0f} | {t:,.0f} | {o / t:.2f}")
PY
