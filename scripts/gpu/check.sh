#!/usr/bin/env bash
# The GPU check: everything the CUDA and 7B issues measure, from binaries built elsewhere by
# scripts/gpu/build.sh (carried as *.xz; unpacked here). Phases, each with its own time limit, so
# that one that hangs costs only its limit, run in the order PHASES lists them:
#   1. the GPU tests on cuda: block recomputation and our attention's gradients against the plain
#      pass / Burn's composed attention (LLAMA2_TEST_GPU=cuda);
#   2. `llama bench` on configs/gpu-125m.toml (16 x 512) on cuda in bf16, PyTorch on the same GPU
#      (scripts/bench/bench_torch.py, bf16 autocast, eager), then ours in f32;
#   3. per-kernel timings of one bf16 bench under nsys, when nsys is installed;
#   4. 30 pre-training steps of gpu-125m on cuda in bf16 (the loss must fall);
#   5. Llama 2 7B (configs/7b-gpu-check.toml: 1 x 4096, 8 micro-batches a step, block
#      recomputation, host optimizer) for STEPS_7B logged steps on cuda, device memory sampled by
#      nvidia-smi, host peak RSS; on vulkan (f16) when cuda failed;
#   6. the host optimizer step at 2 B parameters (`llama bench-optimizer --trainer`, then the bare
#      pass), on this machine's CPUs and memory: the development machine cannot hold 2 B;
#   7. phase 2's bench again (ours bf16, PyTorch eager: the second round of the alternation), ours
#      with Burn's attention instead of ours (A/B), PyTorch with torch.compile, ours on vulkan f16.
# Raw JSON, metrics and logs land in OUT (default runs/gpu-check; copy them to docs/gpu/).
# Environment: BIN (folders of the binaries or their .xz, default gpu-bin), OUT, PHASES (default
# "1 2 3 4 5 6 7"), STEPS_7B (3), LIMIT_7B (seconds from the 7B launch, 300), LIMIT_FIRST (seconds
# for each test, bench and the 30 steps, 420: the first one compiles the kernels), CACHE_IN.
# A device call carries at most 64 MiB with the working tree (7.8 MB), and device time is scarce
# (15 minutes a session, start-up included), so a session runs it in two calls, the most
# telling phases first (scripts/gpu/build.sh packs the folders so: gpu-bin/ 42.9 MB, gpu-tests/
# 39.1 MB, too much together):
#   carry ["gpu-bin"]:   PHASES="2 4 5 7 3 6" scripts/gpu/check.sh
#   carry ["gpu-tests"]: BIN=gpu-tests PHASES=1 scripts/gpu/check.sh
# The second call should reach the machine while it is still warm (it is given back after ~30 s
# idle): the kernels the first call compiled (target/environment) then serve the second.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN="${BIN:-gpu-bin}"
OUT="${OUT:-runs/gpu-check}"
PHASES="${PHASES:-1 2 3 4 5 6 7}"
STEPS_7B="${STEPS_7B:-3}"
LIMIT_7B="${LIMIT_7B:-300}"
LIMIT_FIRST="${LIMIT_FIRST:-420}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
stamp() { echo "=== $(date -u +%H:%M:%S) $*"; }

# Unpack the carried binaries outside OUT (what is left in OUT travels back).
bin=$(mktemp -d)
export RUST_BACKTRACE=1
for f in $(for dir in $BIN; do ls -d "$dir"/*; done); do
    name=$(basename "$f" .xz)
    if [[ "$f" == *.xz ]]; then xz -dc "$f" >"$bin/$name"; else cp "$f" "$bin/$name"; fi
    chmod +x "$bin/$name"
done
ls -l "$bin"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi not found"
nproc; free -g | head -2
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>/dev/null || echo "no torch"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
# cudarc opens libcuda and NVRTC by name (the loader's path), and cubecl-cuda gives NVRTC the
# headers under CUDA_PATH/include (default /usr/local/cuda).
if [ -z "${CUDA_PATH:-}" ] && [ ! -d /usr/local/cuda ] && command -v nvcc >/dev/null; then
    CUDA_PATH=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_PATH
fi
cuda_root="${CUDA_PATH:-/usr/local/cuda}"
for dir in "$cuda_root/lib64" "$cuda_root/targets/x86_64-linux/lib"; do
    [ -d "$dir" ] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
echo "CUDA at $cuda_root: $(ls "$cuda_root"/include/cuda_bf16.h "$cuda_root"/lib64/libnvrtc.so* 2>&1 | tr '\n' ' ')"
# The first CUDA process compiles every kernel with NVRTC, minutes with the GPU idle (2026-12-04:
# the first step of gpu-125m had not ended after 170 s). The binaries keep what they compile in
# CubeCL's cache, target/environment (the kernel-cache feature), which later phases and later calls
# on the same machine reuse; CACHE_IN (a kernel-cache.tar.xz an earlier check wrote to its OUT)
# brings one from another machine of the same GPU. CubeCL logs each compilation to OUT.
if [ -n "${CACHE_IN:-}" ] && [ -f "$CACHE_IN" ]; then
    mkdir -p target && tar -xJf "$CACHE_IN" -C target && echo "kernel cache from $CACHE_IN: $(du -sh target/environment | cut -f1)"
fi
if [ ! -e cubecl.toml ]; then
    trap 'rm -f cubecl.toml' EXIT
    printf '[compilation.logger]\nlevel = "basic"\nfile = "%s"\n\n[autotune.logger]\nlevel = "minimal"\nfile = "%s"\n' \
        "$(realpath "$OUT")/cubecl-compilation.log" "$(realpath "$OUT")/cubecl-autotune.log" >cubecl.toml
fi

status() { # pid, seconds
    echo "  [$2 s: cpu $(awk '{print ($14 + $15) / 100}' "/proc/$1/stat" 2>/dev/null) s, kernel cache $(du -sm target/environment 2>/dev/null | cut -f1) MB, $(cat "$OUT/cubecl-compilation.log" 2>/dev/null | wc -l) compilation log lines, gpu $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)]"
}
# Runs a command (output to LOG) for at most LIMIT seconds, printing every 15 s its CPU time, the
# kernel cache's size, the kernels compiled so far and the GPU's use: compiling and computing look
# alike from outside otherwise. With DONE_WHEN set (a function's name), it also stops the command
# once that function succeeds; either stop prints the command's peak and current memory first.
limited() { # limit, log, command...
    local limit=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 &
    local pid=$! start=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        local t=$((SECONDS - start))
        if [ "$t" -ge "$limit" ] || { [ -n "${DONE_WHEN:-}" ] && "$DONE_WHEN"; }; then
            grep -E "VmHWM|VmRSS" "/proc/$pid/status"
            kill -9 "$pid"
            echo "  stopped after $t s (limit $limit s)"
            break
        fi
        [ $((t % 15)) -eq 0 ] && status "$pid" "$t"
    done
    wait "$pid" 2>/dev/null
    local rc=$?
    tail -n 8 "$log"
    echo "  exit $rc after $((SECONDS - start)) s"
}

phase1() {
    stamp "1. GPU tests on cuda"
    LLAMA2_TEST_GPU=cuda limited "$LIMIT_FIRST" "$OUT/test-attention.log" "$bin/model-unit" recomputed_gradients_on_gpu --nocapture
    LLAMA2_TEST_GPU=cuda limited "$LIMIT_FIRST" "$OUT/test-recomputation.log" "$bin/model-model" block_recomputation_on_gpu --nocapture
}

bench_ours() { # device, dtype, tag, extra flags
    local device=$1 dtype=$2 tag=$3
    shift 3
    limited "$LIMIT_FIRST" "$OUT/bench-ours-$device-$dtype-$tag.log" "$bin/llama" bench --config configs/gpu-125m.toml --batch 16 --seq-len 512 \
        --steps 10 --gen-tokens 64 --device "$device" --dtype "$dtype" --json "$OUT/bench-ours-$device-$dtype-$tag.json" "$@"
}
bench_torch() { # tag, extra flags
    local tag=$1
    shift
    HF_HUB_OFFLINE=1 timeout 150 python3 scripts/bench/bench_torch.py --config configs/gpu-125m.toml --batch 16 --seq-len 512 \
        --steps 10 --gen-tokens 64 --device cuda --dtype bf16 --threads 8 --json "$OUT/bench-torch-$tag.json" "$@" 2>&1 | tee "$OUT/bench-torch-$tag.log" | tail -8
}
have_torch() { python3 -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null; }
phase2() {
    stamp "2. bench round 1: ours cuda bf16"; bench_ours cuda bf16 r1
    have_torch && { stamp "2. torch eager bf16"; bench_torch eager-bf16-r1; }
    stamp "2. ours cuda f32"; bench_ours cuda f32 r1
}
phase7() {
    stamp "7. bench round 2: ours cuda bf16"; bench_ours cuda bf16 r2
    have_torch && { stamp "7. torch eager bf16"; bench_torch eager-bf16-r2; }
    stamp "7. ours cuda bf16, Burn's attention (A/B of ours)"; bench_ours cuda bf16 burn-attention-r1 --burn-attention
    have_torch && { stamp "7. torch.compile bf16"; bench_torch compile-bf16-r1 --compile; }
    stamp "7. ours vulkan f16"; bench_ours vulkan f16 r1
}

phase3() {
    command -v nsys >/dev/null || { echo "3. no nsys here"; return; }
    stamp "3. nsys: per-kernel time of one bf16 bench on cuda"
    timeout 150 nsys profile -o "$OUT/bench-cuda-bf16" --force-overwrite true -t cuda \
        "$bin/llama" bench --config configs/gpu-125m.toml --batch 16 --seq-len 512 --steps 3 --gen-tokens 0 --device cuda --dtype bf16 >/dev/null 2>&1
    nsys stats -r cuda_gpu_kern_sum -f csv -o "$OUT/kernels" "$OUT/bench-cuda-bf16.nsys-rep" >/dev/null 2>&1
    head -25 "$OUT"/kernels*.csv 2>/dev/null | cut -c1-220
    rm -f "$OUT"/*.nsys-rep "$OUT"/*.sqlite
}

phase4() {
    stamp "4. pretrain gpu-125m, 30 steps, cuda bf16"
    rm -rf runs/gpu-125m-cuda
    sed 's/^log_every = .*/log_every = 5/' configs/gpu-125m.toml >"$OUT/gpu-125m.toml"
    limited "$LIMIT_FIRST" "$OUT/pretrain-125m-cuda-bf16.log" "$bin/pretrain" --config "$OUT/gpu-125m.toml" --device cuda --dtype bf16 --max-steps 30 --out runs/gpu-125m-cuda
    cp runs/gpu-125m-cuda/metrics.jsonl "$OUT/metrics-125m-cuda-bf16.jsonl" 2>/dev/null
    python3 - "$OUT/metrics-125m-cuda-bf16.jsonl" <<'PY' || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train/loss"' in l]
loss = [r["train/loss"] for r in rows]
print("losses:", [round(l, 3) for l in loss], "tokens/s:", [round(r["train/tokens_per_s"]) for r in rows])
print("loss falls" if len(loss) >= 5 and loss[-1] < loss[0] - 0.5 else "LOSS DOES NOT FALL")
PY
}

phase5() {
    for device in cuda vulkan; do
        dtype=bf16; [ "$device" = vulkan ] && dtype=f16
        stamp "5. 7B on $device ($dtype), $STEPS_7B steps"
        "$bin/llama" info --config configs/7b-gpu-check.toml --micro-batch 1 --micro-batches 8 --seq-len 4096 --recompute block --optimizer host --device-memory-gib 139 | tail -14
        nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -lms 250 >"$OUT/gpu-memory-7b-$device.csv" 2>/dev/null &
        sampler=$!
        run=runs/7b-gpu-check-$device
        rm -rf "$run"
        logged_enough() { [ "$(grep -c '"train/loss"' "$run/metrics.jsonl" 2>/dev/null)" -ge "$STEPS_7B" ] 2>/dev/null; }
        DONE_WHEN=logged_enough limited "$LIMIT_7B" "$OUT/pretrain-7b-$device.log" \
            "$bin/pretrain" --config configs/7b-gpu-check.toml --device "$device" --dtype "$dtype" --out "$run"
        kill $sampler 2>/dev/null
        cp "$run/metrics.jsonl" "$OUT/metrics-7b-$device.jsonl" 2>/dev/null && cat "$OUT/metrics-7b-$device.jsonl"
        awk -F', ' '$2 + 0 > peak { peak = $2 + 0 } END { printf "nvidia-smi peak memory.used: %d MiB = %.2f GiB\n", peak, peak / 1024 }' "$OUT/gpu-memory-7b-$device.csv"
        # Vulkan only when cuda did not get a step done.
        grep -q '"train/loss"' "$run/metrics.jsonl" 2>/dev/null && break
        echo "7B on $device logged no step"
    done
}
phase6() {
    stamp "6. host optimizer step, 2 B parameters"
    timeout 150 "$bin/llama" bench-optimizer --params 2 --steps 2 --trainer --json "$OUT/bench-optimizer-trainer-2b.json" 2>&1 | tail -5
    timeout 60 "$bin/llama" bench-optimizer --params 2 --steps 2 --json "$OUT/bench-optimizer-flat-2b.json" 2>&1 | tail -3
}
for phase in $PHASES; do
    "phase$phase"
done
# What was compiled, and the cache for CACHE_IN of a later check (when it is small enough to carry).
echo "compilation log: $(cat "$OUT/cubecl-compilation.log" 2>/dev/null | wc -l) lines; kernel cache: $(du -sh target/environment 2>/dev/null | cut -f1)"
if [ -d target/environment ] && [ "$(du -sm target/environment | cut -f1)" -le 200 ]; then
    tar -cJf "$OUT/kernel-cache.tar.xz" -C target environment && ls -l "$OUT/kernel-cache.tar.xz"
fi
xz -f "$OUT"/cubecl-*.log 2>/dev/null
rm -rf "$bin"
stamp done
