#!/usr/bin/env bash
# Data parallel over MPI from a fresh clone: installs OpenMPI and libclang when missing (Debian),
# builds `pretrain` with the `mpi` feature, runs a small pre-training (configs/tiny.toml's model,
# STEPS steps of 6 sequences) in one plain process and as MPI jobs of 2 and 3 ranks, and prints
# whether their losses and gradient norms agree (to 1e-5, relative).
#   scripts/mpi/check.sh            # STEPS=10, OUT=runs/mpi-check
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS="${STEPS:-10}"
OUT="${OUT:-runs/mpi-check}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}"

if ! command -v mpirun >/dev/null || ! { command -v mpicc >/dev/null && ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; }; then
    echo "installing OpenMPI and libclang (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev >/dev/null
fi
cargo build --release -q -p llama-pretrain --features llama-pretrain/mpi
BIN="$CARGO_TARGET_DIR/release/pretrain"

mkdir -p "$OUT"
CONFIG="$OUT/config.toml"
sed -e 's/^max_steps = .*/max_steps = '"$STEPS"'/' -e 's/^batch_size = .*/batch_size = 6/' -e 's/^micro_batch_size = .*/micro_batch_size = 1/' \
    -e 's/^log_every = .*/log_every = 1/' -e 's/^eval_every = .*/eval_every = 1000/' -e 's/^checkpoint_every = .*/checkpoint_every = 1000/' configs/tiny.toml >"$CONFIG"
grep -q '^max_steps' "$CONFIG" || sed -i 's/^\[train\]$/[train]\nmax_steps = '"$STEPS"'/' "$CONFIG"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
run() { # ranks
    rm -rf "$OUT/world$1"
    if [ "$1" = 1 ]; then
        "$BIN" --config "$CONFIG" --out "$OUT/world$1" >"$OUT/world$1.log" 2>&1
    else
        mpirun --oversubscribe -np "$1" -x RAYON_NUM_THREADS=1 "$BIN" --config "$CONFIG" --out "$OUT/world$1" >"$OUT/world$1.log" 2>&1
    fi
    echo "world $1: exit code $?, $(grep -c '"train/loss"' "$OUT/world$1/metrics.jsonl") steps logged"
}
for n in 1 2 3; do run "$n"; done

python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
def curve(n):
    rows = [json.loads(l) for l in open(f"{out}/world{n}/metrics.jsonl")]
    return [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in rows if "train/loss" in r]
one = curve(1)
print(f"{'step':>4} {'loss world 1':>13} {'world 2':>13} {'world 3':>13}")
worst = 0.0
for n in (2, 3):
    for (s, l, g), (s1, l1, g1) in zip(curve(n), one):
        assert s == s1
        worst = max(worst, abs(l - l1) / max(abs(l1), 1), abs(g - g1) / max(abs(g1), 1))
for row in zip(one, curve(2), curve(3)):
    print(f"{row[0][0]:>4} " + " ".join(f"{r[1]:>13.8f}" for r in row))
print(f"largest relative difference of loss or gradient norm: {worst:.2e} -> {'AGREE' if worst <= 1e-5 else 'DIFFER'}")
sys.exit(0 if worst <= 1e-5 else 1)
EOF
