//! `llama bench-optimizer`: the host optimizer step against the machine's memory bandwidth.
//!
//! With `run.optimizer = "host"` every optimizer step is one pass over the flat f32 master on the
//! CPU: the global norm (a read of the gradients), then the clip, AdamW and the bf16 copy for the
//! device (`llama_model::adamw::adamw_flat`: read p, g, m, v; write p, m, v, bf16), 34 bytes per
//! parameter in all. Such a pass can go no faster than the memory: the bound is those bytes at the
//! bandwidth of a plain parallel copy measured in the same run. The ratio bound / measured says
//! how close the step comes (1.0: at the bandwidth).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use half::bf16;
use llama_model::adamw::{AdamWRule, adamw_flat, sum_of_squares};
use rayon::prelude::*;

/// Bytes per parameter of one step: the norm's read of g (4), then read p, g, m, v (16), write
/// p, m, v (12) and the bf16 copy (2).
const STEP_BYTES: f64 = 34.0;

/// Bytes per parameter the run holds: p, g, m, v in f32 and the bf16 copy.
const HELD_BYTES: f64 = 18.0;

/// Runs the benchmark on `billions` x 1e9 parameters for `steps` timed steps (after one warm-up).
pub fn run(billions: f64, steps: usize, json: Option<PathBuf>) -> Result<()> {
    if !(billions > 0.0) || steps == 0 {
        bail!("--params and --steps must be > 0");
    }
    let n = (billions * 1e9) as usize;
    let needed = n as f64 * HELD_BYTES;
    if let Some(available) = available_bytes()
        && needed > available as f64 * 0.9
    {
        bail!(
            "--params {billions}: the benchmark holds {HELD_BYTES} bytes per parameter ({:.1} GiB) but {:.1} GiB of memory is available",
            needed / GIB,
            available as f64 / GIB
        );
    }
    let threads = rayon::current_num_threads();
    println!("optimizer step on {n} parameters ({:.1} GiB held), {threads} threads", needed / GIB);
    let bandwidth = copy_bandwidth();
    println!("memory bandwidth (parallel copy of 1 GiB, read + write): {:.2} GB/s", bandwidth / 1e9);

    // Values as a run has them: small weights, gradients and moments, every page touched.
    let fill = |k: f32, scale: f32| -> Vec<f32> { (0..n).into_par_iter().map(|i| ((i as f32 * 0.618 + k).sin()) * scale).collect() };
    let (mut p, g, mut m) = (fill(0.0, 0.02), fill(1.0, 1e-3), fill(2.0, 1e-4));
    let mut v: Vec<f32> = fill(3.0, 1e-6).into_par_iter().map(f32::abs).collect();
    let mut half = vec![bf16::ZERO; n];
    let max_norm = 1.0;
    let mut seconds = vec![];
    for step in 0..=steps {
        let started = Instant::now();
        let norm = sum_of_squares(&g).sqrt();
        let clip = if norm > max_norm { (max_norm / (norm + 1e-6)) as f32 } else { 1.0 };
        let rule = AdamWRule::new(3e-4, [0.9, 0.95, 1e-5, 0.1], step + 1);
        adamw_flat(&mut p, &g, &mut m, &mut v, clip, &rule, Some(&mut half));
        if step > 0 {
            seconds.push(started.elapsed().as_secs_f64());
        }
    }
    let best = seconds.iter().cloned().fold(f64::INFINITY, f64::min);
    let mean = seconds.iter().sum::<f64>() / seconds.len() as f64;
    let bound = n as f64 * STEP_BYTES / bandwidth;
    let achieved = n as f64 * STEP_BYTES / best;
    println!(
        "step: best {best:.3} s, mean {mean:.3} s = {:.3} s per billion parameters; {:.2} GB/s moved ({STEP_BYTES} bytes/parameter)",
        best / (n as f64 / 1e9),
        achieved / 1e9
    );
    println!("bandwidth bound {bound:.3} s: ratio bound / best = {:.2}", bound / best);
    if let Some(path) = json {
        let report = serde_json::json!({
            "params": n, "threads": threads, "steps": steps,
            "copy_bandwidth_gb_per_s": bandwidth / 1e9,
            "step_s_best": best, "step_s_mean": mean,
            "s_per_billion_params": best / (n as f64 / 1e9),
            "bytes_per_param": STEP_BYTES, "bound_s": bound, "ratio_to_bound": bound / best,
        });
        llama_io::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(())
}

const GIB: f64 = (1u64 << 30) as f64;

/// Read + write bytes per second of a parallel copy of 1 GiB (the best of 5), in chunks as the
/// optimizer pass goes.
fn copy_bandwidth() -> f64 {
    let n = (1usize << 30) / 4;
    let src: Vec<f32> = (0..n).into_par_iter().map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(started.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * (n * 4) as f64 / best
}

/// MemAvailable from /proc/meminfo, in bytes.
fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
