//! `llama bench-optimizer`: the host optimizer step against the machine's memory bandwidth.
//!
//! With `run.optimizer = "host"` every optimizer step is one pass over the flat f32 master on the
//! CPU: the global norm (a read of the gradients), then the clip, AdamW and the bf16 copy for the
//! device (`llama_model::adamw::adamw_flat`: read p, g, m, v; write p, m, v, bf16), 34 bytes per
//! parameter in all. Such a pass can go no faster than the memory: the bound is those bytes at the
//! bandwidth of a plain parallel copy measured in the same run (the faster of `memcpy` and a
//! loop). The ratio bound / measured says how close the step comes (1.0: at the bandwidth).
//! `--trainer` times the trainer's own step (Burn modules, gradients streamed, the copy sent up)
//! instead of the bare pass.

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

/// Runs the benchmark on `billions` x 1e9 parameters for `steps` timed steps (after one warm-up):
/// of `adamw_flat` over flat vectors, or with `trainer` of the trainer's own step on a Llama
/// model (see [`trainer_steps`]).
pub fn run(billions: f64, steps: usize, trainer: bool, json: Option<PathBuf>) -> Result<()> {
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
    let bandwidth = copy_bandwidth();
    println!("memory bandwidth (parallel copy of 1 GiB, read + write): {:.2} GB/s", bandwidth / 1e9);
    let (n, seconds) = if trainer { trainer_steps(billions, steps)? } else { (n, flat_steps(n, steps)) };
    println!(
        "{} on {n} parameters ({:.1} GiB held), {threads} threads",
        if trainer { "the trainer's step" } else { "adamw_flat" },
        n as f64 * HELD_BYTES / GIB
    );
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
            "path": if trainer { "trainer" } else { "adamw_flat" },
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

/// Seconds of each timed step of `adamw_flat` (with the norm's read of the gradients) over flat
/// vectors of `n` values.
fn flat_steps(n: usize, steps: usize) -> Vec<f64> {
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
    std::hint::black_box(&half);
    seconds
}

/// The parameters and seconds of each timed step of what `run.optimizer = "host"` runs in bf16
/// on one device, here with the CPU as the device: the global norm of the gradients
/// (`optim::global_grad_norm`), then `ShardedAdamW::step_in_place` (gradients streamed down,
/// clip, AdamW and the bf16 compute copy in one pass, the copy sent up) on a Llama model of
/// dim 2048 with as many layers as come nearest `billions` (Llama 2's vocabulary), its master in
/// f32.
fn trainer_steps(billions: f64, steps: usize) -> Result<(usize, Vec<f64>)> {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor};
    use llama_model::LlamaConfig;
    use llama_trainer::distributed::World;
    use llama_trainer::optim::global_grad_norm;
    use llama_trainer::sharded::ShardedAdamW;

    let shape = |layers: usize| LlamaConfig::new(2048, layers, 16).with_vocab_size(32000);
    let per_layer = shape(2).num_params() - shape(1).num_params();
    let layers = ((billions * 1e9 - shape(0).num_params() as f64) / per_layer as f64).round().max(1.0) as usize;
    let config = shape(layers);
    let device = Device::flex().autodiff();
    let mut model = config.init(&device);
    // Gradients as a step leaves them: f32, one per parameter, on the device.
    struct Gradients(GradientsParams);
    impl ModuleVisitor for Gradients {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.register(param.id, param.val().inner().mul_scalar(1e-3));
        }
    }
    let mut optimizer = ShardedAdamW::new(&model, &llama_trainer::OptimConfig::default(), World::single());
    let mut seconds = vec![];
    for step in 0..=steps {
        let mut grads = Gradients(GradientsParams::new());
        model.visit(&mut grads);
        let started = Instant::now();
        let norm = global_grad_norm(&model, &grads.0);
        let norm_s = started.elapsed().as_secs_f64();
        let (updated, copy) = optimizer.step_in_place(3e-4, model, grads.0, norm, 1.0, Some((&device, llama_model::Precision::Bf16)));
        model = updated;
        std::hint::black_box(copy);
        if step > 0 {
            let total = started.elapsed().as_secs_f64();
            println!("  step {step}: {total:.3} s (global norm {norm_s:.3} s, in-place update {:.3} s)", total - norm_s);
            seconds.push(total);
        }
    }
    Ok((config.num_params() as usize, seconds))
}

const GIB: f64 = (1u64 << 30) as f64;

/// Read + write bytes per second of a parallel copy of 1 GiB, in chunks as the optimizer pass
/// goes: the best of 5 rounds of each of two copies, `memcpy` (`copy_from_slice`) and a loop the
/// compiler cannot turn into one (`d = s + 0.0`). Either can be the slow one: on a 2-core AMD EPYC
/// VM glibc's `memcpy` (`rep movsb`) copied at 4.7 GB/s in this binary where the loop reached 21,
/// so a bound from `memcpy` alone made every pass look faster than memory.
fn copy_bandwidth() -> f64 {
    let n = (1usize << 30) / 4;
    let src: Vec<f32> = (0..n).into_par_iter().map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let mut best = f64::INFINITY;
    for round in 0..10 {
        let started = Instant::now();
        let chunks = dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16));
        if round % 2 == 0 {
            chunks.for_each(|(d, s)| d.copy_from_slice(s));
        } else {
            chunks.for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d = s + 0.0));
        }
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
