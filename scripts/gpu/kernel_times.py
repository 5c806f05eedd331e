#!/usr/bin/env python3
"""Per-kernel device time from CubeCL's profiling log, summed by kernel.

CubeCL's profiler (`CUBECL_DEBUG_OPTION=profile`, or `[profiling.logger] level = "basic"` in
cubecl.toml) times every launch and writes one line per launch: `| 3.920742ms | Name | Detail_hash`.
This sums them by kernel (the whole name, hash included: one fused kernel each) and prints the
largest, with their launch counts and share of the total, then the same summed by kernel family
(the name without its hash), which says what kind of work dominates. scripts/gpu/check.sh phase 3.

Usage: python3 scripts/gpu/kernel_times.py cubecl-profiling.log [TOP]
"""
import re
import sys
from collections import defaultdict

UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}
LINE = re.compile(r"^\|\s*([0-9.]+)(s|ms|µs|us|ns)\s*\|\s*(.+?)\s*$")
HASH = re.compile(r"_[0-9a-f]{6,}$")
# The parts of a name every matmul shares (its argument types), left out of what is printed.
NOISE = {"TensorArgs", "FusedMatmulArgs", "DynamicScalar", "DynamicSize", "()"}


def short(name):
    parts = [p.strip() for p in name.split("|")]
    return " | ".join(p for p in parts if p not in NOISE and not p.startswith("__"))


def table(title, sums, counts, total, top):
    print(f"{title}: {len(sums)} kinds, {sum(counts.values())} launches, {total * 1e3:.1f} ms in all")
    print(f"{'share':>6} {'total ms':>10} {'launches':>8} {'mean µs':>9}  kernel")
    for name, seconds in sorted(sums.items(), key=lambda kv: -kv[1])[:top]:
        n = counts[name]
        print(f"{100 * seconds / total:5.1f}% {seconds * 1e3:10.2f} {n:8d} {seconds / n * 1e6:9.1f}  {name[:200]}")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    by_kernel, launches = defaultdict(float), defaultdict(int)
    try:
        lines = open(sys.argv[1], encoding="utf-8", errors="replace")
    except OSError as e:
        sys.exit(f"{sys.argv[1]}: {e}")
    for line in lines:
        m = LINE.match(line)
        if m:
            name = short(m.group(3))
            by_kernel[name] += float(m.group(1)) * UNITS[m.group(2)]
            launches[name] += 1
    total = sum(by_kernel.values())
    if total == 0:
        sys.exit(f"{sys.argv[1]}: no timed launch")
    table("by kernel", by_kernel, launches, total, top)
    by_family, family_launches = defaultdict(float), defaultdict(int)
    for name, seconds in by_kernel.items():
        family = " | ".join(HASH.sub("", part.strip()) for part in name.split("|"))
        by_family[family] += seconds
        family_launches[family] += launches[name]
    print()
    table("by family", by_family, family_launches, total, top)


if __name__ == "__main__":
    main()
