#!/usr/bin/env bash
# The test command: the whole workspace's tests, plus the Python checker they call (TensorBoard's
# own event reader) installed from the package index into a cached virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."

# Builds outside the clone so that reruns (and CI) start warm.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}"
venv="${LLAMA2_VENV:-$HOME/.cache/llama2-rs/venv}"
if ! "$venv/bin/python" -c "import tensorboard" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "tensorboard>=2.16,<3"
fi
export LLAMA2_PYTHON="$venv/bin/python"

cargo test --workspace "$@"
