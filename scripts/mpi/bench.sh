#!/usr/bin/env bash
# Communication of data parallel over MPI against model size: `pretrain` as a job of RANKS ranks
# (2) on this machine, STEPS steps (4) of one 128-token sequence per rank, for models from 1.3 M
# to 134 M parameters (configs/tiny.toml's data). Prints, per model, the mean over steps 2.. of
# the seconds each step spent in collectives (dist/comm_seconds: reduce-scatter of the f32
# gradients, the norm's all-reduce, all-gather of the f32 weights), the bytes each rank sent per
# step, and the whole step's time.
#   BIN=$CARGO_TARGET_DIR/release/pretrain scripts/mpi/bench.sh    # a pretrain built with --features mpi
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}/release/pretrain}"
RANKS="${RANKS:-2}"
STEPS="${STEPS:-4}"
OUT="${OUT:-runs/bench-mpi}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$OUT"
# name: dim layers heads vocab
models=("tiny:128:4:4:2048" "small:512:8:8:2048" "medium:768:12:12:32000")
for m in "${models[@]}"; do
    IFS=: read -r name dim layers heads vocab <<<"$m"
    cfg="$OUT/$name.toml"
    cat >"$cfg" <<EOF
[model]
dim = $dim
n_layers = $layers
n_heads = $heads
vocab_size = $vocab
multiple_of = 32
max_seq_len = 256

[data]
shards = "runs/data/brown"
tokenizer = "data/tokenizer.json"
source = "data/corpus/brown.jsonl"
seq_len = 128

[train]
max_steps = $STEPS
batch_size = $RANKS
micro_batch_size = 1
log_every = 1
eval_every = 100000
checkpoint_every = 100000
EOF
    rm -rf "$OUT/$name"
    # The run's final checkpoint is not part of the measurement.
    mpirun --oversubscribe -np "$RANKS" -x RAYON_NUM_THREADS=1 "$BIN" --config "$cfg" --out "$OUT/$name" >"$OUT/$name.log" 2>&1 \
        || { echo "$name: failed, see $OUT/$name.log"; exit 1; }
    python3 - "$OUT/$name" "$name" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
rows = [r for r in rows if "dist/comm_seconds" in r][1:]
tokens = rows[0]["train/tokens"] / rows[0]["step"]
comm = sum(r["dist/comm_seconds"] for r in rows) / len(rows)
step = sum(tokens / r["train/tokens_per_s"] for r in rows) / len(rows)
sent = rows[0]["dist/comm_bytes_per_rank"]
print(f"{sys.argv[2]:<7} comm {comm:8.4f} s/step | sent {sent / 1e6:9.1f} MB/rank/step -> {sent / comm / 1e9 if comm else 0:6.2f} GB/s | step {step:7.3f} s | comm share {comm / step:6.1%}")
EOF
done
