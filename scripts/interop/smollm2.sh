#!/usr/bin/env bash
# The recipe on a real pretrained model: SmolLM2-135M-Instruct from its GGUF file
# (scripts/interop/get_smollm2.sh, checked against llama.cpp), supervised fine-tuning on the shipped
# chats with the dated and tool-use ones (configs/sft-smollm2.toml, its own ChatML template), the
# fine-tuned model exported to GGUF and checked against llama.cpp again, the held-out tool-use set
# before and after (scripts/interop/smollm2_tools.py), the helpfulness and safety reward models from
# the fine-tuned model (configs/reward-*-smollm2.toml), rejection sampling and PPO against them
# (configs/rlhf-smollm2.toml), and the evaluation of the round against the SFT model
# (configs/eval-smollm2.toml). Each step's wall time and peak RSS go to runs/smollm2/times.txt.
# About 75 min on 2 cores, plus the llama.cpp build the first time (~45 min). Writes runs/smollm2/.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}"
cargo build --release --quiet --bin llama --bin sft --bin reward --bin rlhf --bin eval
bin="$CARGO_TARGET_DIR/release"
venv="${LLAMA2_LLAMA_CPP_VENV:-$HOME/.cache/llama2-rs/llama-cpp-venv}"
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }
mkdir -p runs/smollm2
: > runs/smollm2/times.txt
# timed NAME COMMAND...: runs COMMAND, and appends its wall time and peak RSS to times.txt.
timed() {
  local name=$1; shift
  /usr/bin/time -a -o runs/smollm2/times.txt -f "$name: %e s, peak RSS %M KiB" "$@"
}
stage "SmolLM2-135M-Instruct from its GGUF file, against llama.cpp"
timed import env CHECK=1 scripts/interop/get_smollm2.sh runs/smollm2/model
stage "sft"
rm -rf runs/smollm2/sft
timed sft "$bin/sft" --config configs/sft-smollm2.toml
ckpt=$(ls -d runs/smollm2/sft/checkpoints/step-* | tail -1)
stage "the fine-tuned model as f16 GGUF, against llama.cpp"
"$bin/llama" convert --from "$ckpt" --to runs/smollm2/sft-f16.gguf --gguf-type f16 --overwrite
"$venv/bin/python" scripts/interop/check_gguf_parity.py --llama "$bin/llama" --gguf runs/smollm2/sft-f16.gguf --checkpoint "$ckpt"
stage "the held-out tool-use set, before and after"
mkdir -p runs/smollm2/tools
timed tools-base python3 scripts/interop/smollm2_tools.py "$bin/llama" runs/smollm2/model runs/smollm2/tools/base.json
timed tools-sft python3 scripts/interop/smollm2_tools.py "$bin/llama" "$ckpt" runs/smollm2/tools/sft.json
stage "the helpfulness and safety reward models"
rm -rf runs/smollm2/reward-helpfulness runs/smollm2/reward-safety
timed reward-helpfulness "$bin/reward" --config configs/reward-helpfulness-smollm2.toml
timed reward-safety "$bin/reward" --config configs/reward-safety-smollm2.toml
stage "rejection sampling and PPO"
rm -rf runs/smollm2/rlhf
timed rlhf "$bin/rlhf" --config configs/rlhf-smollm2.toml
stage "the rejection-sampling round against the SFT model, held out"
rm -rf runs/smollm2/eval
timed eval "$bin/eval" compare --config configs/eval-smollm2.toml
stage "done"
cat runs/smollm2/times.txt
