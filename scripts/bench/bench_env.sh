# Sourced by scripts/bench/bench.sh and scripts/bench/bench_seq_len.sh (from the repository root): the shared
# build cache, PyTorch + transformers in a cached virtual environment (installed from the package
# index on first use), and a release build of `llama`. Sets $venv.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}"
venv="${LLAMA2_TORCH_VENV:-$HOME/.cache/llama2-rs/torch-venv}"
if ! "$venv/bin/python" -c "import torch, transformers" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check torch transformers
fi
cargo build --release --bin llama
