#!/usr/bin/env python3
"""Where a running process spends its CPU: its busy threads and their stacks, from one sample.

The H200 machine has no perf, gdb or strace, but cuda-gdb attaches to a running process and
prints every thread's stack. Frames in our stripped binary read `??`, but those in shared
libraries name their library: NVRTC compiling (libnvrtc), the driver compiling PTX
(libnvidia-ptxjitcompiler, libcuda), or our own code (the executable). This reads each thread's
CPU time from /proc twice, a second apart, then attaches the debugger once (`cuda-gdb`, or `gdb`
where that is all there is) and prints the threads that were busy, each with its top frames.
scripts/gpu/check.sh calls it on a first run that takes long.

Usage: python3 scripts/gpu/stacks.py PID RAW_OUT   (RAW_OUT: the debugger's whole output)
"""
import os
import re
import shutil
import subprocess
import sys
import time

# glibc's frames of a wait, shown as one "wait".
WAIT = re.compile(r"futex|pthread_cond|clock_nanosleep|^syscall$|epoll_wait|__poll")
THREAD = re.compile(r'^Thread \d+ \(.*\(LWP (\d+)\)(?: "([^"]*)")?\):')
GENERIC = re.compile(r"<[^<>]*>")
FRAME = re.compile(r"^#(\d+)\s+(?:0x[0-9a-f]+ in )?(.+?) \(")
LIBRARY = re.compile(r" from (\S+)$")


def cpu_seconds(pid):
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            pass
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    pid, raw_out = int(sys.argv[1]), sys.argv[2]
    try:
        before = cpu_seconds(pid)
        time.sleep(1.0)
        after = cpu_seconds(pid)
    except FileNotFoundError:
        print(f"  stacks: process {pid} has ended")
        return
    busy = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    debugger = shutil.which("cuda-gdb") or shutil.which("gdb")
    if debugger is None:
        print("  stacks: no cuda-gdb or gdb here; busy threads (CPU s in 1 s):", {t: round(s, 2) for t, s in busy.items() if s > 0.05})
        return
    try:
        result = subprocess.run(
            [debugger, "-q", "-batch", "-p", str(pid), "-ex", "set pagination off", "-ex", "thread apply all bt 12"],
            capture_output=True, text=True, timeout=30,
        )
        text = result.stdout + result.stderr
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += "\n(the debugger did not finish within 30 s)"
    with open(raw_out, "w") as f:
        f.write(text)
    threads, current = {}, None
    for line in text.splitlines():
        m = THREAD.match(line)
        if m:
            current = int(m.group(1))
            threads[current] = {"name": m.group(2) or "", "frames": []}
            continue
        m = FRAME.match(line)
        if m and current is not None:
            func = m.group(2)
            lib = LIBRARY.search(line)
            lib = lib.group(1) if lib else None
            if WAIT.search(func):
                where = "wait"
            elif func in ("start_thread", "clone3", "clone"):
                continue
            else:
                # Generic arguments make Rust names unreadably long: keep the path alone.
                while GENERIC.search(func):
                    func = GENERIC.sub("", func)
                where = func[-90:] + "@" + (os.path.basename(lib) if lib else "exe")
            frames = threads[current]["frames"]
            if not frames or frames[-1] != where:
                frames.append(where)
    shown = 0
    for tid, info in sorted(threads.items(), key=lambda kv: -busy.get(kv[0], 0.0)):
        frames = info["frames"]
        if busy.get(tid, 0.0) < 0.05:
            continue
        shown += 1
        print(f"  thread {tid} {info['name']!r} cpu {busy.get(tid, 0.0):.2f} s/s: {' < '.join(frames[:8])}")
    print(f"  stacks: {shown} busy of {len(threads)} threads (all of them in {os.path.basename(raw_out)})")


if __name__ == "__main__":
    main()
