#!/usr/bin/env bash
# The GPU check: everything the CUDA and 7B issues measure, from binaries built elsewhere by
# scripts/gpu/build.sh (carried as *.xz; unpacked here). Phases, each with its own time limit, so
# that one that hangs costs only its limit, run in the order PHASES lists them:
#   1. the GPU tests' checks on cuda (`llama device-check`, the functions the GPU tests assert):
#      our attention's gradients against Burn's composed attention on the CPU, block
#      recomputation against the plain pass;
#   2. `llama bench` on configs/gpu-125m.toml (16 x 512) on cuda in bf16, then PyTorch on the same
#      GPU (scripts/bench/bench_torch.py, bf16 autocast, eager);
#   3. per-kernel timings of 3 bf16 bench steps from CubeCL's own profiler (every launch timed,
#      CUBECL_DEBUG_OPTION=profile), summed by kernel: the top 25 in the log (nsys is not on the
#      H200 image's PATH, and CubeCL's names are the fused kernels' own);
#   4. 30 pre-training steps of gpu-125m on cuda in bf16 (the loss must fall);
#   5. Llama 2 7B (configs/7b-gpu-check.toml: 1 x 4096, 8 micro-batches a step, block
#      recomputation, host optimizer) for STEPS_7B logged steps on cuda, device memory sampled by
#      nvidia-smi, host peak RSS; on vulkan (f16) when cuda failed;
#   6. the host optimizer step at 2 B parameters (`llama bench-optimizer --trainer`, then the bare
#      pass), on this machine's CPUs and memory: the development machine cannot hold 2 B;
#   7. phase 2's bench again (ours bf16, PyTorch eager: the second round of the alternation), ours
#      with Burn's attention instead of ours (A/B), PyTorch with torch.compile, ours in f32 (its
#      kernels compile anew), ours on vulkan f16.
# What comes back from a device call is at most 8 files of 16 MiB, so OUT (default
# runs/gpu-check) holds four: gpu-check.log (this script's output, written as it goes),
# raw.tar.xz (every log, JSON, metrics file, nvidia-smi sample and CubeCL log, packed when the
# script ends, also on a TERM), kernel-cache.tar.xz (CubeCL's compiled kernels and autotune
# results, for CACHE_IN of a later check) and kernel-sources.log.xz (CubeCL's compilation log at
# level "full": every kernel's name, id and CUDA C++ source, in the order compiled, so that
# scripts/gpu/nvrtc_replay.py can time NVRTC on each of them on any CPU; KERNEL_SOURCES=0 logs
# the names only). Copy what matters to docs/gpu/.
# The whole run keeps within BUDGET_S seconds (default 500: give the device call ~40 s more):
# every limit below is cut to what is left of it less PACK_S (45) for packing, and a phase that
# would start with under a minute left is skipped and says so.
# Environment: BIN (folders of the binaries or their .xz, default gpu-bin), OUT, PHASES (default
# "1 2 3 4 5 6 7"), STEPS_7B (3), LIMIT_7B (seconds from the 7B launch, 300), LIMIT_FIRST (seconds
# for each bench and the 30 steps, 420: the first one compiles the kernels), LIMIT_CHECK (phase 1,
# 150), CACHE_IN (default docs/gpu/kernel-cache-h200.tar.xz when it exists), BUDGET_S, PACK_S,
# KERNEL_SOURCES (1). To try the script's machinery without a GPU (wgpu on lavapipe, see
# path_on_cpu.sh): DEVICE=wgpu HALF=f16 CONFIG_125M=configs/tiny.toml SHAPE="--batch 2
# --seq-len 64" PHASES="2 3 4" (wgpu has no bf16).
# A device call carries at most 64 MiB with the working tree (7.9 MB): gpu-bin/ (48 MB,
# scripts/gpu/build.sh) fits, so one call runs everything; device time is scarce (15 minutes a
# session, start-up included), so the most telling phases go first:
#   carry ["gpu-bin"], timeout_s 590:  BUDGET_S=540 PHASES="2 4 1 5 3 7 6" scripts/gpu/check.sh
# (phase 2 compiles the bf16 kernels that phases 4 and 3 reuse; phase 1, LIMIT_CHECK 150 s, the
# small checks' own; 5 compiles 7B's shapes). On a fresh machine compiling may take most of the
# call (2026-12-04: the first step of gpu-125m did not end in 170 s): the headline figure first.
# A second call on the same machine while it is warm (it is given back after ~30 s idle) finds
# the kernels the first compiled in target/environment.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
BIN="${BIN:-gpu-bin}"
OUT="${OUT:-runs/gpu-check}"
PHASES="${PHASES:-1 2 3 4 5 6 7}"
STEPS_7B="${STEPS_7B:-3}"
LIMIT_7B="${LIMIT_7B:-300}"
LIMIT_FIRST="${LIMIT_FIRST:-420}"
LIMIT_CHECK="${LIMIT_CHECK:-150}"
BUDGET_S="${BUDGET_S:-500}"
PACK_S="${PACK_S:-45}"
DEVICE="${DEVICE:-cuda}"
CONFIG_125M="${CONFIG_125M:-configs/gpu-125m.toml}"
SHAPE="${SHAPE:---batch 16 --seq-len 512}"
HALF="${HALF:-bf16}"
CACHE_IN="${CACHE_IN:-docs/gpu/kernel-cache-h200.tar.xz}"
KERNEL_SOURCES="${KERNEL_SOURCES:-1}"
started=$SECONDS
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
# Every raw file goes to RAW, outside OUT, and comes back packed (see the header).
RAW=$(mktemp -d)
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
stamp() { echo "=== $(date -u +%H:%M:%S) [$((SECONDS - started)) s] $*"; }
# Seconds left for work: the budget less what has run and less the packing at the end.
left() { echo $((BUDGET_S - PACK_S - (SECONDS - started))); }
# The smaller of a limit and what is left.
capped() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }
enough() { # what: true when a minute is left for it, else says it is skipped
    [ "$(left)" -ge 60 ] && return 0
    echo "  skipped, $(left) s of the budget left: $*"
    return 1
}

# Unpack the carried binaries outside OUT (what is left in OUT travels back).
bin=$(mktemp -d)
export RUST_BACKTRACE=1
for f in $(for dir in $BIN; do ls -d "$dir"/*; done); do
    name=$(basename "$f" .xz)
    if [[ "$f" == *.xz ]]; then xz -dc "$f" >"$bin/$name"; else cp "$f" "$bin/$name"; fi
    chmod +x "$bin/$name"
done
ls -l "$bin"
# At level "full" CubeCL pipes each kernel's C++ through clang-format before logging and
# compiling it (cubecl-cuda's load_transpiled), seconds for a run of large kernels; a stand-in
# that fails at once keeps the sources as generated (and the log equal to what NVRTC compiled).
mkdir -p "$bin/no-clang-format" && printf '#!/bin/sh\nexit 1\n' >"$bin/no-clang-format/clang-format" && chmod +x "$bin/no-clang-format/clang-format"
export PATH="$bin/no-clang-format:$PATH"
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
# the first step of gpu-125m had not ended after 170 s). On wgpu over lavapipe, the first process
# of a tiny bench spent 160 s in its first step, 55 s with CUBECL_AUTOTUNE_LEVEL=minimal and 24 s
# once the autotune results were on disk: autotuning compiles and times every candidate kernel.
# The binaries keep what they compile and tune in CubeCL's cache, target/environment (the
# kernel-cache feature), which later phases and later calls on the same machine reuse; CACHE_IN
# (a kernel-cache.tar.xz an earlier check brought back) brings one from another machine of the
# same GPU. CubeCL logs each compilation and each autotune decision to RAW; phase 3 turns on its
# profiler through CUBECL_DEBUG_OPTION.
if [ -f "$CACHE_IN" ]; then
    mkdir -p target && tar -xJf "$CACHE_IN" -C target && echo "kernel cache from $CACHE_IN: $(du -sh target/environment | cut -f1)"
fi
# Each compilation CubeCL logs, stamped as it appears: the gap after a line is about what
# compiling that kernel (and running up to the next one) took. CubeCL logs a kernel before it
# compiles it: "[Compiling kernel] NAME" at level "basic"; at "full" a block that starts
# "[START_KERNEL_COMPILATION]", "name: NAME", then its id and source (only the name is stamped).
kernels_compiled() { grep -cE '^(\[Compiling kernel\]|\[START_KERNEL_COMPILATION\])' "$RAW/cubecl-compilation.log" 2>/dev/null; }
touch "$RAW/cubecl-compilation.log"
tail -n +1 -F "$RAW/cubecl-compilation.log" 2>/dev/null | grep --line-buffered -E '^(\[Compiling kernel\]|name: )' | while IFS= read -r line; do
    printf '%s %s\n' "$(date +%s.%N)" "${line:0:240}"
done >"$RAW/compilations-timed.log" &
pack() {
    trap - EXIT TERM INT
    stamp "packing"
    pkill -P $$ tail 2>/dev/null
    [ -n "${running:-}" ] && kill -9 "$running" 2>/dev/null
    echo "compilation log: $(kernels_compiled) kernels, $(du -sh "$RAW/cubecl-compilation.log" | cut -f1); kernel cache: $(du -sh target/environment 2>/dev/null | cut -f1)"
    echo "the longest gaps after a logged compilation (s, kernel):"
    awk 'NR > 1 { printf "%8.2f  %s\n", $1 - t, k } { t = $1; $1 = ""; k = substr($0, 2, 150) }' "$RAW/compilations-timed.log" | sort -rn | head -10
    if [ -d target/environment ] && [ "$(du -sm target/environment | cut -f1)" -le 400 ]; then
        tar -cf - -C target environment | xz -T0 -6 >"$OUT/kernel-cache.tar.xz" && ls -l "$OUT/kernel-cache.tar.xz"
    fi
    if [ "$KERNEL_SOURCES" = 1 ]; then
        # Its own file (a returned file holds at most 16 MiB): sources compress ~10x; the first
        # 300 MB, should there be more.
        head -c 300M "$RAW/cubecl-compilation.log" | xz -T0 -6 >"$OUT/kernel-sources.log.xz" && ls -l "$OUT/kernel-sources.log.xz"
        [ "$(stat -c %s "$OUT/kernel-sources.log.xz")" -le 16000000 ] || { echo "  kernel-sources.log.xz over 16 MB: left out"; rm -f "$OUT/kernel-sources.log.xz"; }
        rm -f "$RAW/cubecl-compilation.log"
    fi
    tar -cf - -C "$RAW" . | xz -T0 -6 >"$OUT/raw.tar.xz" && ls -l "$OUT/raw.tar.xz" && tar -tJf "$OUT/raw.tar.xz" | tr '\n' ' ' && echo
    [ -n "${own_toml:-}" ] && rm -f cubecl.toml
    rm -rf "$bin" "$RAW"
    stamp "done"
    sleep 1 # tee's last lines reach gpu-check.log before the call collects OUT
}
trap pack EXIT
trap 'echo "  TERM: packing what there is"; exit 143' TERM INT
if [ ! -e cubecl.toml ]; then
    own_toml=1
    level=basic
    [ "$KERNEL_SOURCES" = 1 ] && level=full
    printf '[compilation.logger]\nlevel = "%s"\nfile = "%s"\n\n[autotune.logger]\nlevel = "minimal"\nfile = "%s"\n\n[profiling.logger]\nlevel = "disabled"\nfile = "%s"\n' \
        "$level" "$RAW/cubecl-compilation.log" "$RAW/cubecl-autotune.log" "$RAW/cubecl-profiling.log" >cubecl.toml
fi

status() { # pid, seconds
    echo "  [$2 s: cpu $(awk '{print ($14 + $15) / 100}' "/proc/$1/stat" 2>/dev/null) s, kernel cache $(du -sm target/environment 2>/dev/null | cut -f1) MB, $(kernels_compiled) kernels compiled, gpu $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)]"
}
# Runs a command (output to LOG) for at most LIMIT seconds (cut to what is left of the budget),
# printing every 15 s its CPU time, the kernel cache's size, the kernels compiled so far and the
# GPU's use: compiling and computing look alike from outside otherwise. With DONE_WHEN set (a
# function's name), it also stops the command once that function succeeds; either stop prints the
# command's peak and current memory first.
limited() { # limit, log, command...
    local limit log=$2
    limit=$(capped "$1")
    shift 2
    enough "$*" || return 1
    "$@" >"$log" 2>&1 &
    local pid=$! start=$SECONDS sample_at=45
    running=$pid
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
        # Where a long first run spends its CPU: the busy threads' stacks, at 45 s and 150 s (a
        # pass of this loop takes a second or more, so a test for an exact second could miss).
        if [ "$t" -ge "$sample_at" ]; then
            python3 scripts/gpu/stacks.py "$pid" "$RAW/stacks-$(basename "$log" .log)-$t.txt"
            sample_at=$((sample_at < 150 ? 150 : 1000000))
        fi
    done
    wait "$pid" 2>/dev/null
    local rc=$?
    tail -n 8 "$log"
    echo "  exit $rc after $((SECONDS - start)) s"
}

phase1() {
    stamp "1. device checks on $DEVICE: attention gradients, block recomputation"
    limited "$LIMIT_CHECK" "$RAW/device-check.log" "$bin/llama" device-check --device "$DEVICE"
    grep -E "FAILED|checks passed|on $DEVICE" "$RAW/device-check.log"
}

bench_ours() { # device, dtype, tag, extra flags
    local device=$1 dtype=$2 tag=$3
    shift 3
    # shellcheck disable=SC2086 # SHAPE is a list of flags
    limited "$LIMIT_FIRST" "$RAW/bench-ours-$device-$dtype-$tag.log" "$bin/llama" bench --config "$CONFIG_125M" $SHAPE \
        --steps 10 --gen-tokens 64 --device "$device" --dtype "$dtype" --json "$RAW/bench-ours-$device-$dtype-$tag.json" "$@"
}
bench_torch() { # tag, extra flags
    local tag=$1
    shift
    enough "torch $tag" || return 0
    # shellcheck disable=SC2086
    HF_HUB_OFFLINE=1 timeout "$(capped 150)" python3 scripts/bench/bench_torch.py --config "$CONFIG_125M" $SHAPE \
        --steps 10 --gen-tokens 64 --device cuda --dtype bf16 --threads 8 --json "$RAW/bench-torch-$tag.json" "$@" 2>&1 | tee "$RAW/bench-torch-$tag.log" | tail -8
}
have_torch() { python3 -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null; }
phase2() {
    stamp "2. bench round 1: ours $DEVICE $HALF"; bench_ours "$DEVICE" "$HALF" r1
    have_torch && { stamp "2. torch eager bf16"; bench_torch eager-bf16-r1; }
}
phase7() {
    stamp "7. bench round 2: ours $DEVICE $HALF"; bench_ours "$DEVICE" "$HALF" r2
    have_torch && { stamp "7. torch eager bf16"; bench_torch eager-bf16-r2; }
    stamp "7. ours $DEVICE $HALF, Burn's attention (A/B of ours)"; bench_ours "$DEVICE" "$HALF" burn-attention-r1 --burn-attention
    have_torch && { stamp "7. torch.compile bf16"; bench_torch compile-bf16-r1 --compile; }
    stamp "7. ours $DEVICE f32"; bench_ours "$DEVICE" f32 r1
    stamp "7. ours vulkan f16"; bench_ours vulkan f16 r1
}

phase3() {
    stamp "3. per-kernel time of 3 $HALF bench steps on $DEVICE (CubeCL's profiler: every launch timed)"
    # shellcheck disable=SC2086
    CUBECL_DEBUG_OPTION=profile limited 150 "$RAW/bench-profiled.log" "$bin/llama" bench --config "$CONFIG_125M" $SHAPE \
        --steps 3 --gen-tokens 0 --device "$DEVICE" --dtype "$HALF" || return 0
    python3 scripts/gpu/kernel_times.py "$RAW/cubecl-profiling.log" 25 | tee "$RAW/kernel-times.txt"
}

phase4() {
    stamp "4. pretrain $(basename "$CONFIG_125M"), 30 steps, $DEVICE $HALF"
    rm -rf runs/gpu-125m-check
    sed 's/^log_every = .*/log_every = 5/' "$CONFIG_125M" >"$RAW/pretrain-125m.toml"
    limited "$LIMIT_FIRST" "$RAW/pretrain-125m-$DEVICE-$HALF.log" "$bin/pretrain" --config "$RAW/pretrain-125m.toml" --device "$DEVICE" --dtype "$HALF" --max-steps 30 --out runs/gpu-125m-check
    cp runs/gpu-125m-check/metrics.jsonl "$RAW/metrics-125m-$DEVICE-$HALF.jsonl" 2>/dev/null || { echo "  no metrics.jsonl"; return 0; }
    python3 - "$RAW/metrics-125m-$DEVICE-$HALF.jsonl" <<'PY' || true
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
        enough "7B on $device" || return 0
        "$bin/llama" info --config configs/7b-gpu-check.toml --micro-batch 1 --micro-batches 8 --seq-len 4096 --recompute block --optimizer host --device-memory-gib 139 | tail -14
        nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -lms 250 >"$RAW/gpu-memory-7b-$device.csv" 2>/dev/null &
        sampler=$!
        run=runs/7b-gpu-check-$device
        rm -rf "$run"
        logged_enough() { [ "$(grep -c '"train/loss"' "$run/metrics.jsonl" 2>/dev/null)" -ge "$STEPS_7B" ] 2>/dev/null; }
        DONE_WHEN=logged_enough limited "$LIMIT_7B" "$RAW/pretrain-7b-$device.log" \
            "$bin/pretrain" --config configs/7b-gpu-check.toml --device "$device" --dtype "$dtype" --out "$run"
        kill $sampler 2>/dev/null
        cp "$run/metrics.jsonl" "$RAW/metrics-7b-$device.jsonl" 2>/dev/null && cat "$RAW/metrics-7b-$device.jsonl"
        awk -F', ' '$2 + 0 > peak { peak = $2 + 0 } END { printf "nvidia-smi peak memory.used: %d MiB = %.2f GiB\n", peak, peak / 1024 }' "$RAW/gpu-memory-7b-$device.csv"
        # Vulkan only when cuda did not get a step done.
        grep -q '"train/loss"' "$run/metrics.jsonl" 2>/dev/null && break
        echo "7B on $device logged no step"
    done
}
phase6() {
    stamp "6. host optimizer step, 2 B parameters"
    enough "the 2 B optimizer step" || return 0
    timeout "$(capped 150)" "$bin/llama" bench-optimizer --params 2 --steps 2 --trainer --json "$RAW/bench-optimizer-trainer-2b.json" 2>&1 | tail -5
    enough "the bare 2 B pass" || return 0
    timeout "$(capped 60)" "$bin/llama" bench-optimizer --params 2 --steps 2 --json "$RAW/bench-optimizer-flat-2b.json" 2>&1 | tail -3
}
for phase in $PHASES; do
    "phase$phase"
done
