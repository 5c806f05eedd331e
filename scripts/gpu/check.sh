#!/usr/bin/env bash
# The GPU check: everything the CUDA and 7B issues measure, in one run of under 8 minutes on a
# machine with an NVIDIA GPU, from binaries built elsewhere by scripts/gpu/build.sh (carried as
# gpu-bin/*.xz and gpu-tests/*.xz; unpacked here). Phases, each with its own time limit, so that one that hangs
# costs only its limit:
#   1. the GPU tests on cuda: block recomputation and our attention's gradients against the plain
#      pass / Burn's composed attention (LLAMA2_TEST_GPU=cuda);
#   2. `llama bench` on configs/gpu-125m.toml (16 x 512) in bf16 and f32 on cuda, alternating
#      with PyTorch on the same GPU (scripts/bench/bench_torch.py, bf16 autocast, eager and
#      torch.compile), two rounds, and once with Burn's attention instead of ours; then the same
#      bench in f16 on vulkan (same binary);
#   3. per-kernel timings of one bf16 bench under nsys, when nsys is installed;
#   4. 30 pre-training steps of gpu-125m on cuda in bf16 (the loss must fall);
#   5. Llama 2 7B (configs/7b-gpu-check.toml: 1 x 4096, 8 micro-batches a step, block
#      recomputation, host optimizer) for STEPS_7B steps on cuda, device memory sampled by
#      nvidia-smi, host peak RSS; on vulkan (f16) when cuda failed;
#   6. the host optimizer step at 2 B parameters (`llama bench-optimizer --trainer`, then the bare
#      pass), on this machine's CPUs and memory: the development machine cannot hold 2 B.
# Raw JSON, metrics and logs land in OUT (default runs/gpu-check; copy them to docs/gpu/).
# Environment: BIN (folder of the binaries or their .xz, default gpu-bin), OUT, SKIP (phase
# numbers to skip, e.g. "3 5"), STEPS_7B (3), LIMIT_7B (seconds, 200).
# A device call carries at most 64 MiB with the working tree, so the binaries travel in two calls
# (scripts/gpu/build.sh packs them so): carry ["gpu-bin"] and run `SKIP=1 OUT=$OUT
# scripts/gpu/check.sh` (phases 2-6), then carry ["gpu-tests"] and run `BIN=gpu-tests
# SKIP="2 3 4 5 6" OUT=$OUT scripts/gpu/check.sh` (phase 1).
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN="${BIN:-gpu-bin}"
OUT="${OUT:-runs/gpu-check}"
SKIP="${SKIP:-}"
STEPS_7B="${STEPS_7B:-3}"
LIMIT_7B="${LIMIT_7B:-200}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
stamp() { echo "=== $(date -u +%H:%M:%S) $*"; }
skip() { [[ " $SKIP " == *" $1 "* ]]; }

# Unpack the carried binaries next to this run's output.
bin="$OUT/bin"
mkdir -p "$bin"
for f in "$BIN"/*; do
    name=$(basename "$f" .xz)
    if [[ "$f" == *.xz ]]; then xz -dc "$f" >"$bin/$name"; else cp "$f" "$bin/$name"; fi
    chmod +x "$bin/$name"
done
ls -l "$bin"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi not found"
nproc; free -g | head -2
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>/dev/null || echo "no torch"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

if ! skip 1; then
    stamp "1. GPU tests on cuda"
    LLAMA2_TEST_GPU=cuda timeout 120 "$bin/model-unit" recomputed_gradients_on_gpu --nocapture; echo "attention test exit $?"
    LLAMA2_TEST_GPU=cuda timeout 120 "$bin/model-model" block_recomputation_on_gpu --nocapture; echo "recomputation test exit $?"
fi

bench_ours() { # device, dtype, tag, extra flags
    local device=$1 dtype=$2 tag=$3
    shift 3
    timeout 120 "$bin/llama" bench --config configs/gpu-125m.toml --batch 16 --seq-len 512 --steps 10 --gen-tokens 64 \
        --device "$device" --dtype "$dtype" --json "$OUT/bench-ours-$device-$dtype-$tag.json" "$@" 2>&1 | tail -6
}
bench_torch() { # tag, extra flags
    local tag=$1
    shift
    HF_HUB_OFFLINE=1 timeout 150 python3 scripts/bench/bench_torch.py --config configs/gpu-125m.toml --batch 16 --seq-len 512 \
        --steps 10 --gen-tokens 64 --device cuda --dtype bf16 --threads 8 --json "$OUT/bench-torch-$tag.json" "$@" 2>&1 | tail -6
}
if ! skip 2; then
    have_torch=$(python3 -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null && echo 1)
    for round in 1 2; do
        stamp "2. bench round $round: ours cuda bf16"; bench_ours cuda bf16 "r$round"
        [ -n "$have_torch" ] && { stamp "2. torch eager bf16"; bench_torch "eager-bf16-r$round"; }
        stamp "2. ours cuda f32"; bench_ours cuda f32 "r$round"
        [ "$round" = 1 ] && { stamp "2. ours cuda bf16, Burn's attention (A/B of ours)"; bench_ours cuda bf16 "burn-attention-r1" --burn-attention; }
        [ -n "$have_torch" ] && [ "$round" = 1 ] && { stamp "2. torch.compile bf16"; bench_torch "compile-bf16-r$round" --compile; }
    done
    stamp "2. ours vulkan f16"; bench_ours vulkan f16 r1
fi

if ! skip 3 && command -v nsys >/dev/null; then
    stamp "3. nsys: per-kernel time of one bf16 bench on cuda"
    timeout 150 nsys profile -o "$OUT/bench-cuda-bf16" --force-overwrite true -t cuda \
        "$bin/llama" bench --config configs/gpu-125m.toml --batch 16 --seq-len 512 --steps 3 --gen-tokens 0 --device cuda --dtype bf16 >/dev/null 2>&1
    nsys stats -r cuda_gpu_kern_sum -f csv -o "$OUT/kernels" "$OUT/bench-cuda-bf16.nsys-rep" >/dev/null 2>&1
    head -25 "$OUT"/kernels*.csv 2>/dev/null | cut -c1-220
    rm -f "$OUT"/*.nsys-rep "$OUT"/*.sqlite
fi

if ! skip 4; then
    stamp "4. pretrain gpu-125m, 30 steps, cuda bf16"
    rm -rf runs/gpu-125m-cuda
    sed 's/^log_every = .*/log_every = 5/' configs/gpu-125m.toml >"$OUT/gpu-125m.toml"
    timeout 150 "$bin/pretrain" --config "$OUT/gpu-125m.toml" --device cuda --dtype bf16 --max-steps 30 --out runs/gpu-125m-cuda 2>&1 | tail -8
    cp runs/gpu-125m-cuda/metrics.jsonl "$OUT/metrics-125m-cuda-bf16.jsonl" 2>/dev/null
    python3 - "$OUT/metrics-125m-cuda-bf16.jsonl" <<'PY' || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train/loss"' in l]
loss = [r["train/loss"] for r in rows]
print("losses:", [round(l, 3) for l in loss], "tokens/s:", [round(r["train/tokens_per_s"]) for r in rows])
print("loss falls" if len(loss) >= 5 and loss[-1] < loss[0] - 0.5 else "LOSS DOES NOT FALL")
PY
fi

if ! skip 5; then
    for device in cuda vulkan; do
        dtype=bf16; [ "$device" = vulkan ] && dtype=f16
        stamp "5. 7B on $device ($dtype), $STEPS_7B steps"
        "$bin/llama" info --config configs/7b-gpu-check.toml --micro-batch 1 --micro-batches 8 --seq-len 4096 --recompute block --optimizer host --device-memory-gib 139 | tail -14
        nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -lms 250 >"$OUT/gpu-memory-7b-$device.csv" 2>/dev/null &
        sampler=$!
        run=runs/7b-gpu-check-$device
        rm -rf "$run"
        start=$(date +%s)
        "$bin/pretrain" --config configs/7b-gpu-check.toml --device "$device" --dtype "$dtype" --out "$run" &
        pid=$!
        while kill -0 "$pid" 2>/dev/null; do
            logged=$(grep -c '"train/loss"' "$run/metrics.jsonl" 2>/dev/null)
            if [ "${logged:-0}" -ge "$STEPS_7B" ] || [ $(($(date +%s) - start)) -ge "$LIMIT_7B" ]; then
                grep -E "VmHWM|VmRSS" "/proc/$pid/status"
                kill -9 "$pid"
                echo "stopped after ${logged:-0} logged steps, $(($(date +%s) - start)) s"
                break
            fi
            sleep 0.5
        done
        wait "$pid" 2>/dev/null
        rc=$?
        kill $sampler 2>/dev/null
        cp "$run/metrics.jsonl" "$OUT/metrics-7b-$device.jsonl" 2>/dev/null && cat "$OUT/metrics-7b-$device.jsonl"
        awk -F', ' '$2 + 0 > peak { peak = $2 + 0 } END { printf "nvidia-smi peak memory.used: %d MiB = %.2f GiB\n", peak, peak / 1024 }' "$OUT/gpu-memory-7b-$device.csv"
        # Vulkan only when cuda did not get a step done.
        grep -q '"train/loss"' "$run/metrics.jsonl" 2>/dev/null && break
        echo "7B on $device logged no step (exit $rc)"
    done
fi
if ! skip 6; then
    stamp "6. host optimizer step, 2 B parameters"
    timeout 150 "$bin/llama" bench-optimizer --params 2 --steps 2 --trainer --json "$OUT/bench-optimizer-trainer-2b.json" 2>&1 | tail -5
    timeout 60 "$bin/llama" bench-optimizer --params 2 --steps 2 --json "$OUT/bench-optimizer-flat-2b.json" 2>&1 | tail -3
fi
rm -rf "$bin"
stamp done
