#!/usr/bin/env bash
# The whole tiny recipe, end to end, on the shipped data: prepare (inside pretrain), pretrain,
# SFT, both reward models, rejection sampling, PPO, and the evaluation comparing SFT, RS and PPO;
# beside them, SFT with the dated and tool-use chats too (sft-skills, from the same pre-training
# run 8x longer, which tool use needs), which the evaluation compares with SFT on the temporal and
# tool sets, tools running and off.
# One TensorBoard directory holds every stage:
#   tensorboard --logdir runs/pipeline
# OUT=dir changes where it writes (default runs/pipeline; it is replaced).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama2-rs/target}"
OUT="${OUT:-runs/pipeline}"
cargo build --release --bin pretrain --bin sft --bin reward --bin rlhf --bin eval
bin="$CARGO_TARGET_DIR/release"
rm -rf "$OUT"
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }

stage "pretrain"
"$bin/pretrain" --config configs/tiny.toml --out "$OUT/pretrain"
stage "sft"
"$bin/sft" --config configs/sft-tiny.toml --init "$OUT/pretrain" --out "$OUT/sft"
stage "pretrain-2400: the same pre-training for 2,400 steps, the base of sft-skills"
"$bin/pretrain" --config configs/tiny.toml --max-steps 2400 --out "$OUT/pretrain-2400"
stage "sft-skills: SFT with the dated and tool-use chats"
"$bin/sft" --config configs/sft-skills-tiny.toml --init "$OUT/pretrain-2400" --out "$OUT/sft-skills"
stage "reward: helpfulness"
"$bin/reward" --config configs/reward-helpfulness-tiny.toml --init "$OUT/sft" --out "$OUT/reward-helpfulness"
stage "reward: safety"
"$bin/reward" --config configs/reward-safety-tiny.toml --init "$OUT/sft" --out "$OUT/reward-safety"
stage "rlhf: rejection sampling, then PPO"
"$bin/rlhf" --config configs/rlhf-tiny.toml --policy "$OUT/sft" \
    --helpfulness-model "$OUT/reward-helpfulness" --safety-model "$OUT/reward-safety" --out "$OUT/rlhf"
stage "eval: SFT vs rejection sampling vs PPO (and SFT with the skills)"
"$bin/eval" compare --config configs/eval-tiny.toml --out "$OUT/eval" \
    --helpfulness-model "$OUT/reward-helpfulness" --safety-model "$OUT/reward-safety" --judge-model "$OUT/sft" \
    --model sft="$OUT/sft" --model rs="$OUT/rlhf/rejection-sampling/round-2" --model ppo="$OUT/rlhf/ppo/best" \
    --model sft-skills="$OUT/sft-skills"
echo "report: $OUT/eval/report.json, chart: $OUT/eval/chart.svg"
stage "done"
echo "TensorBoard: tensorboard --logdir $OUT"
