//! Host memory: the allocator policy for training on the CPU, and the process's peak resident size.
//!
//! A training step allocates and frees the same large buffers every step (logits alone are
//! batch x seq x vocab x 4 bytes: 262 MB for bench-small). glibc serves every allocation above
//! its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it with `munmap` on free,
//! so each step the kernel maps, zero-fills and page-faults those buffers again: on bench-small
//! that was a third of the step (`perf`: `clear_page_erms`, `exc_page_fault`, and Burn's flex
//! backend copying every new tensor once more into an aligned buffer, which faults too).
//!
//! [`keep_freed_memory`] makes glibc serve large blocks from its heap and never give the heap
//! back, so a step reuses the previous step's pages: what PyTorch's caching allocator does on a
//! GPU. The cost: resident memory stays at the run's peak instead of falling between steps.
//! Measured in `docs/benchmarks.md` (bench-small training 450 -> 712 tokens/s).

/// Every binary calls this first thing in `main`; tests do not (they are not timed).
/// A no-op off glibc (musl, macOS, Windows).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before the process allocates
    // in earnest and before other threads start. A refused value leaves glibc's default.
    unsafe {
        // No mmap for large blocks: they come from the heap (glibc still falls back to mmap
        // when the heap cannot grow, so this never turns into an allocation failure).
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // Never trim the heap's free top back to the kernel.
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// This machine's memory in bytes (Linux `MemTotal`), if known.
pub fn total_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
