#!/usr/bin/env python3
"""Times NVRTC on every CUDA kernel a GPU run compiled, on any CPU, no GPU needed.

check.sh brings back CubeCL's compilation log at level "full" (kernel-sources.log.xz): each kernel's
name, id and CUDA C++ source, in the order the run compiled them. This replays them through NVRTC
with the options cubecl-cuda 0.11.3 passes (`--gpu-architecture=sm_90a`, `-lineinfo`, the CUDA and
CCCL include folders; `compile_to_ptx` in its compute/context.rs), one at a time in one process as
CubeCL does, and prints each kernel's seconds and PTX size, the slowest, and the sums by kernel
family: what a first run spends compiling, and which kernels to look at. Options NVRTC could be
given instead (e.g. `--opt=-pch`, precompiled headers) are tried with --opt; --hoist-includes moves
each source's `#include` lines to its top (NVRTC's automatic PCH needs them first; CubeCL writes
its typedefs first).

NVRTC without a CUDA toolkit, from the package index (the version of the GPU machine's, 13.0 on the
H200 of 2026-12-04):
    pip download --no-deps -d wheels "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" \\
        "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*"
    for w in wheels/*.whl; do python3 -m zipfile -e "$w" cuda13/; done
    xz -dc kernel-sources.log.xz > sources.log
    scripts/gpu/nvrtc_replay.py sources.log --cuda cuda13/nvidia/cu13 [--limit 50] [--opt=-pch]
"""
import argparse
import ctypes
import glob
import os
import re
import sys
import time
from collections import defaultdict


def kernels(path):
    """(name, source) of each kernel block of a CubeCL "full" compilation log."""
    name, source, inside = None, None, False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("[START_KERNEL_COMPILATION]"):
                name, source, inside = "?", None, False
            elif line.startswith("name: ") and source is None:
                name = line[6:].strip()
            elif line.startswith("```") and not inside and source is None and name is not None:
                inside, source = True, []
            elif line.startswith("```") and inside:
                inside = False
            elif inside:
                source.append(line)
            elif line.startswith("[END_KERNEL_COMPILATION]") and source is not None:
                yield name, "".join(source)
                name, source = None, None


def family(name):
    return name.split("<")[0].strip()


def hoist_includes(source):
    includes = sorted(set(re.findall(r"^#include <[^>]+>\n", source, flags=re.M)))
    return "".join(includes) + re.sub(r"^#include <[^>]+>\n", "", source, flags=re.M)


class Nvrtc:
    def __init__(self, root):
        libs = [d for d in ("lib", "lib64") if os.path.isdir(os.path.join(root, d))]
        found = lambda pattern: sorted(p for d in libs for p in glob.glob(os.path.join(root, d, pattern)))
        # libnvrtc opens its builtins by name: load them first, globally.
        for builtins in found("libnvrtc-builtins.so*")[:1]:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        lib = [p for p in found("libnvrtc.so*") if ".alt." not in p]
        if not lib:
            sys.exit(f"no libnvrtc.so* under {root}/lib or lib64 (see this script's header)")
        self.lib = ctypes.CDLL(lib[0])
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        self.version = f"{major.value}.{minor.value}"
        self.include = os.path.join(root, "include")

    def compile(self, source, arch, extra):
        """Seconds, PTX bytes, and the log when NVRTC refused the source."""
        lib = self.lib
        prog = ctypes.c_void_p()
        if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), None, 0, None, None) != 0:
            return 0.0, 0, "nvrtcCreateProgram failed"
        # cubecl-cuda's options, in its order.
        opts = [f"--gpu-architecture={arch}", f"--include-path={self.include}", "-lineinfo"]
        if os.path.isdir(os.path.join(self.include, "cccl")):
            opts.append(f"--include-path={os.path.join(self.include, 'cccl')}")
        opts += extra
        argv = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        start = time.perf_counter()
        rc = lib.nvrtcCompileProgram(prog, len(opts), argv)
        seconds = time.perf_counter() - start
        size = ctypes.c_size_t()
        log = None
        if rc != 0:
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
            size.value = 0
        else:
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        return seconds, size.value, log


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("log", help="CubeCL's compilation log at level full (kernel-sources.log.xz, unpacked)")
    p.add_argument("--cuda", required=True, help="a CUDA root with lib*/libnvrtc.so* and include/ (see the header)")
    p.add_argument(
        "--arch",
        default="sm_90a",
        help="what cubecl-cuda asks for (sm_90a on an H100/H200: PTX and a cubin, which cubecl-cuda drops); "
        "compute_90a makes the PTX only, and the difference is ptxas, about what the driver pays again to load that PTX",
    )
    p.add_argument("--opt", action="append", default=[], help="an extra NVRTC option (repeatable), e.g. --opt=-pch")
    p.add_argument("--hoist-includes", action="store_true", help="move each source's #include lines to its top, sorted")
    p.add_argument("--limit", type=int, default=0, help="only the first N kernels (0: all)")
    p.add_argument("--top", type=int, default=15, help="how many of the slowest kernels and families to list")
    a = p.parse_args()

    nvrtc = Nvrtc(a.cuda)
    found = list(kernels(a.log))
    if a.limit:
        found = found[: a.limit]
    if not found:
        sys.exit(f"{a.log}: no kernel with a source (is it CubeCL's log at level \"full\"?)")
    print(f"NVRTC {nvrtc.version}, {a.arch}, extra options {a.opt or 'none'}{', includes hoisted' if a.hoist_includes else ''}: {len(found)} kernels")
    rows, failed = [], 0
    started = time.perf_counter()
    for i, (name, source) in enumerate(found):
        if a.hoist_includes:
            source = hoist_includes(source)
        seconds, ptx, log = nvrtc.compile(source, a.arch, a.opt)
        if log is not None:
            failed += 1
            print(f"  kernel {i} ({family(name)}) refused: {log.strip()[:400]}")
        rows.append((seconds, ptx, source.count("\n"), i, name))
        print(f"  {i:4d} {seconds:7.2f} s {ptx / 1024:8.0f} KiB PTX {source.count(chr(10)):6d} lines  {family(name)[:100]}", flush=True)
    total = time.perf_counter() - started
    print(f"total {total:.1f} s for {len(rows)} kernels ({failed} refused); mean {total / len(rows):.2f} s")
    print(f"the {a.top} slowest:")
    for seconds, ptx, lines, i, name in sorted(rows, reverse=True)[: a.top]:
        print(f"  {seconds:7.2f} s  #{i:<4d} {lines:6d} lines  {name[:160]}")
    by_family = defaultdict(lambda: [0.0, 0])
    for seconds, _, _, _, name in rows:
        by_family[family(name)][0] += seconds
        by_family[family(name)][1] += 1
    print("by family (seconds, kernels):")
    for fam, (seconds, count) in sorted(by_family.items(), key=lambda kv: -kv[1][0])[: a.top]:
        print(f"  {seconds:8.1f} s {count:5d}  {fam[:140]}")


if __name__ == "__main__":
    main()
