#!/usr/bin/env bash
# Training tokens/s against sequence length, ours and PyTorch eager, for both benchmark configs;
# writes runs/bench-seq/*.json and docs/bench-seq-len.svg. Two timed steps per point
# after a warm-up step (the first step after warm-up still grows the heap), alternating ours /
# PyTorch; 2 threads each.
#   scripts/bench/bench_seq_len.sh [CONFIG:BATCH:SEQ,SEQ,... ...]    (both configs: about 20 minutes)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/bench_env.sh
out="${BENCH_OUT:-runs/bench-seq}"; mkdir -p "$out"
sweep() {  # config batch seq...
    local cfg=$1 batch=$2; shift 2
    for seq in "$@"; do
        name="$(basename "$cfg" .toml)-b$batch-s$seq"
        "$CARGO_TARGET_DIR/release/llama" bench --config "$cfg" --batch "$batch" --seq-len "$seq" --steps 2 --gen-tokens 0 --json "$out/$name-ours.json" | grep '^train'
        OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/bench/bench_torch.py --config "$cfg" --batch "$batch" --seq-len "$seq" --steps 2 --gen-tokens 0 --threads 2 --json "$out/$name-torch.json" | grep -i '^train'
    done
}
specs=("$@"); [ ${#specs[@]} -eq 0 ] && specs=(configs/bench-small.toml:8:64,128,256,512,1024 configs/bench-medium.toml:4:128,256,512)
for spec in "${specs[@]}"; do
    IFS=: read -r cfg batch seqs <<<"$spec"
    sweep "$cfg" "$batch" ${seqs//,/ }
done
python3 scripts/bench/plot_seq_len.py "$out" "${BENCH_SVG:-docs/bench-seq-len.svg}"
