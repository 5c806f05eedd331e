#!/usr/bin/env bash
# llama.cpp loads our GGUF exports and greedy-decodes what `llama generate` does: a trained
# checkpoint (default: the pipeline's SFT model) exported in f32, f16 and Q8_0, and the same model
# after a round trip through a Hugging Face directory (our import path) exported in f32.
# llama.cpp comes from the llama-cpp-python package of the package index, built from source into a
# cached virtual environment when missing (several minutes on 2 cores).
#   scripts/interop/check_llama_cpp.sh [CHECKPOINT_DIR] [TOKENIZER_JSON]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}"
ckpt="${1:-$(ls -d runs/pipeline/sft/checkpoints/step-* | tail -1)}"
tokenizer="${2:-data/tokenizer.json}"
venv="${LLAMA2_LLAMA_CPP_VENV:-$HOME/.cache/llama2-rs/llama-cpp-venv}"
if ! "$venv/bin/python" -c "import llama_cpp, tokenizers, numpy" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check cmake ninja
    PATH="$venv/bin:$PATH" CMAKE_ARGS="-DGGML_NATIVE=OFF" "$venv/bin/pip" install --quiet --disable-pip-version-check llama-cpp-python tokenizers numpy
fi
cargo build --release --bin llama
llama="$CARGO_TARGET_DIR/release/llama"
out="${OUT:-runs/llama-cpp-check}"; rm -rf "$out"; mkdir -p "$out"
for ty in f32 f16 q8_0; do
    "$llama" convert --from "$ckpt" --tokenizer "$tokenizer" --to "$out/model-$ty.gguf" --gguf-type "$ty"
done
"$llama" convert --from "$ckpt" --to "$out/hf" --to-format hf
cp "$tokenizer" "$out/hf/tokenizer.json"
"$llama" convert --from "$out/hf" --to "$out/hf-f32.gguf" --gguf-type f32
prompts=(--prompt "The jury" --prompt "[INST] What is the capital of France? [/INST]" --prompt "He said that")
echo "== $ckpt"
"$venv/bin/python" scripts/interop/check_llama_cpp.py --llama "$llama" --checkpoint "$ckpt" --tokenizer "$tokenizer" \
    --gguf f32="$out/model-f32.gguf" --gguf f16="$out/model-f16.gguf" --gguf q8_0="$out/model-q8_0.gguf" "${prompts[@]}"
echo "== $out/hf (the same model through a Hugging Face directory)"
"$venv/bin/python" scripts/interop/check_llama_cpp.py --llama "$llama" --checkpoint "$out/hf" --tokenizer "$tokenizer" \
    --gguf f32="$out/hf-f32.gguf" "${prompts[@]}"
