#!/usr/bin/env bash
# The test command: the whole workspace's tests, built with the `mpi` feature so that the MPI jobs
# (`mpirun -np 2/3`) are tested too, then clippy (-D warnings) and `cargo check` of the CUDA build, plus the Python readers they call (TensorBoard's own event
# reader, llama.cpp's `gguf` package) installed from the package index into a cached virtual
# environment. OpenMPI and libclang
# (which the `mpi` crate's build needs) are installed with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Builds outside the clone so that reruns (and CI) start warm.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}"
venv="${LLAMA2_VENV:-$HOME/.cache/llama2-rs/venv}"
if ! "$venv/bin/python" -c "import tensorboard, gguf" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "tensorboard>=2.16,<3" gguf
fi
export LLAMA2_PYTHON="$venv/bin/python"
have_mpi() { command -v mpirun >/dev/null && command -v mpicc >/dev/null && ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; }
mpi_features="--features llama-pretrain/mpi,llama-sft/mpi,llama-reward/mpi,llama-rlhf/mpi"
if ! have_mpi; then
    echo "installing OpenMPI and libclang for the mpi feature (apt-get)"
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev >/dev/null; } || true
    if ! have_mpi; then
        echo "WARNING: OpenMPI/libclang could not be installed: testing without the mpi feature (the MPI tests do not run)"
        mpi_features=""
    fi
fi

# Formatting first: it takes a second (rustfmt.toml has the house style).
cargo fmt --all --check || { echo "cargo fmt --check: run 'cargo fmt --all'"; exit 1; }

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set -o pipefail
# shellcheck disable=SC2086
cargo test --workspace $mpi_features "$@" 2>&1 | tee "$log"
# Clippy with warnings as errors (the allowed lints, and why, are in the workspace Cargo.toml).
# shellcheck disable=SC2086
cargo clippy --quiet --workspace --all-targets $mpi_features -- -D warnings 2>&1 | tee -a "$log"
# The CUDA build must keep compiling: every binary with `--features cuda` and the model crate's GPU
# tests (it builds offline through crates/cubecl-llvm-offline; no GPU here to run it: that is
# scripts/gpu/check.sh's job).
start=$SECONDS
cuda="llama-cli/cuda,llama-pretrain/cuda,llama-sft/cuda,llama-reward/cuda,llama-rlhf/cuda,llama-model/cuda"
cargo check --quiet -p llama-cli -p llama-pretrain -p llama-sft -p llama-reward -p llama-rlhf -p llama-model --tests --features "$cuda" 2>&1 | tee -a "$log"
echo "cargo check --features cuda: $((SECONDS - start)) s"
# cargo prints one summary per test binary (the last is often an empty doc-test run): add them up.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
