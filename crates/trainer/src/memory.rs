//! The checks before launch: the run's device exists and computes in its dtype, and the run fits
//! it (the model crate's estimate of one device's training memory: weights, f32 master copy,
//! gradients, AdamW moments, activations of a micro-batch, against what the device has).

use llama_model::memory::{ACTIVATION_OVERHEAD, RESIDENT_OVERHEAD};
use llama_model::{LlamaConfig, OptimizerPlacement, Recompute, TrainingMemory};

use crate::config::{RunConfig, TrainConfig};

/// What can only be checked with the model in hand, before any work: the device computes in
/// `run.dtype`, and one device's training memory estimate (with the run's recomputation,
/// logits chunks and optimizer placement) fits in its memory.
pub fn check_launch(run: &RunConfig, model: &LlamaConfig, train: &TrainConfig, seq_len: usize) -> Result<llama_model::Precision, String> {
    let precision = crate::precision::parse(&run.dtype)?;
    // Opens this rank's GPU, so that a missing driver is this error before any work.
    let device = crate::parallel::rank_device(run)?;
    precision.check_device(&device, &run.device)?;
    let plan = run.training_memory(precision, train);
    check_fits(run, model, train.micro_batch_size, seq_len, &plan)?;
    let m = model.memory_estimate(train.micro_batch_size, seq_len, &plan);
    check_host_fits(run, m.host_total(), m.expected_peak(), "this run", llama_model::host_memory::total_bytes())?;
    Ok(precision)
}

/// With the optimizer on the host, one process: the host's share (`host`: f32 masters, AdamW
/// moments, gradients in flight), plus the passes' share when the device is the CPU (the same
/// memory), against the machine's memory (`total`, MemTotal), so that a run that cannot hold
/// its optimizer is refused at launch rather than killed at its first update. An MPI job's ranks
/// share a node in ways this process does not see (how many, each its block of the moments): it
/// is not checked.
pub fn check_host_fits(run: &RunConfig, host: u64, device_expected: u64, what: &str, total: Option<u64>) -> Result<(), String> {
    let Some(total) = total.filter(|_| host > 0 && !crate::distributed::world().is_distributed()) else { return Ok(()) };
    let on_cpu = llama_model::device::is_cpu(&run.device);
    let need = host + if on_cpu { device_expected } else { 0 };
    if need <= total {
        return Ok(());
    }
    Err(format!(
        "{what} needs about {} GiB of host memory with run.optimizer = \"host\" (f32 master weights, AdamW moments and gradients in flight: {} GiB{}) but this machine has {} GiB (/proc/meminfo MemTotal); use run.optimizer = \"device\" where the device holds it, shard the optimizer over MPI ranks on several machines (mpirun), or use a machine with more memory (`llama info` prints both estimates)",
        g(need),
        g(host),
        if on_cpu { format!(", and the passes on the CPU {} GiB", g(device_expected)) } else { String::new() },
        g(total)
    ))
}

/// Mixed precision on the CPU is allowed (it tests that path) but rarely what a CPU user wants:
/// a note, printed once per run by the loop's setup.
pub fn note_cpu_precision(run: &RunConfig, precision: llama_model::Precision) {
    if precision != llama_model::Precision::F32 && llama_model::device::is_cpu(&run.device) && crate::distributed::world().is_root() {
        eprintln!(
            "note: run.dtype = \"{}\" on the CPU: mixed precision is meant for GPUs; run.dtype = \"f32\" is the CPU's tested and benchmarked setting",
            run.dtype
        );
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes as GiB with one decimal, for the launch checks' messages.
fn g(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / GIB)
}

/// The device's memory in bytes and where that figure came from: `run.device_memory_gib` if set;
/// else `nvidia-smi` for a GPU device (absent on other vendors: no check); else, on the CPU,
/// the machine's RAM.
pub fn device_capacity(run: &RunConfig) -> Option<(u64, String)> {
    if let Some(gib) = run.device_memory_gib {
        return Some(((gib * GIB) as u64, "run.device_memory_gib".into()));
    }
    if llama_model::device::is_cpu(&run.device) {
        return Some((llama_model::host_memory::total_bytes()?, "/proc/meminfo MemTotal".into()));
    }
    let name = crate::parallel::rank_device_name(run).ok()?;
    let index = name.split_once(':').map_or("0", |(_, i)| i);
    let out = std::process::Command::new("nvidia-smi").args(["--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", index]).output().ok()?;
    let mib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some((mib << 20, format!("nvidia-smi, GPU {index}")))
}

/// An error before any work when the estimate exceeds the device's memory; None when it fits or
/// the capacity is unknown.
pub fn check_fits(run: &RunConfig, model: &LlamaConfig, micro_batch: usize, seq_len: usize, plan: &TrainingMemory) -> Result<(), String> {
    let Some((capacity, source)) = device_capacity(run) else { return Ok(()) };
    let m = model.memory_estimate(micro_batch, seq_len, plan);
    let precision = plan.precision;
    let expected = m.expected_peak();
    if expected <= capacity {
        return Ok(());
    }
    let mut knobs = vec!["lower train.micro_batch_size (gradient accumulation keeps the batch)"];
    if precision == llama_model::Precision::F32 {
        knobs.push("use run.dtype = \"bf16\"");
    }
    if plan.recompute == Recompute::None {
        knobs.push("set train.recompute = \"block\"");
    }
    if plan.optimizer == OptimizerPlacement::Device {
        knobs.push("set run.optimizer = \"host\"");
    }
    knobs.push("or choose a larger device");
    Err(format!(
        "this run needs about {} GiB on device `{}` (micro-batch {micro_batch} x seq {seq_len} in {}: weights {}, f32 master {}, gradients {}, AdamW {} GiB, x {RESIDENT_OVERHEAD}; activations {} GiB, x {ACTIVATION_OVERHEAD}) but the device has {} GiB ({source}); {} (`llama info --config ... --micro-batch N --recompute block --optimizer host` prints the estimate)",
        g(expected),
        run.device,
        precision.name(),
        g(m.weights),
        g(m.master_weights),
        g(m.gradients),
        g(m.optimizer),
        g(m.activations),
        g(capacity),
        knobs.join(", "),
    ))
}

/// [`check_fits`] for a PPO iteration ([`llama_model::PpoMemory`]): its five models, the update's
/// activations or the rollout's KV cache, against the device of `run`.
pub fn check_ppo_fits(run: &RunConfig, m: &llama_model::PpoMemory, micro_batch: usize, seq_len: usize, rollout_batch: usize) -> Result<(), String> {
    let Some((capacity, source)) = device_capacity(run) else { return Ok(()) };
    let expected = m.expected_peak();
    if expected <= capacity {
        return Ok(());
    }
    Err(format!(
        "PPO needs about {} GiB on device `{}` (policy {}, value model {}, reference {}, reward models {} GiB, and the larger of the update's activations (minibatch {micro_batch} x seq {seq_len}) and the rollout's KV cache ({rollout_batch} sequences, {} GiB); the resident models x {RESIDENT_OVERHEAD}, that larger part x {ACTIVATION_OVERHEAD}) but the device has {} GiB ({source}); lower ppo.batch_size or ppo.minibatch_size, set memory.recompute = \"block\", or choose a larger device (`llama info --config ... --ppo` prints the estimate)",
        g(expected),
        run.device,
        g(m.policy.total()),
        g(m.value.total()),
        g(m.reference),
        g(m.reward_models),
        g(m.kv_cache),
        g(capacity)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama_model::Precision;

    /// The host optimizer's share is checked against the machine's memory: 7B's (78 GiB) fits
    /// 128 GiB, not 64; on a CPU device the passes' share counts too; with the optimizer on the
    /// device nothing is checked.
    #[test]
    fn the_host_optimizer_must_fit_the_machines_memory() {
        let gib = |g: u64| Some(g << 30);
        let seven_b = LlamaConfig::from_toml_file(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/7b.toml")).unwrap();
        let plan = TrainingMemory { optimizer: OptimizerPlacement::Host, streams_gradients: true, ..TrainingMemory::new(Precision::Bf16) };
        let m = seven_b.memory_estimate(1, 4096, &plan);
        let gpu = RunConfig { device: "cuda".into(), ..RunConfig::default() };
        assert!(check_host_fits(&gpu, m.host_total(), m.expected_peak(), "this run", gib(128)).is_ok());
        let err = check_host_fits(&gpu, m.host_total(), m.expected_peak(), "this run", gib(64)).unwrap_err();
        assert!(err.contains("78.0 GiB of host memory") && err.contains("has 64.0 GiB") && err.contains("run.optimizer"), "{err}");
        let cpu = RunConfig { device: "flex".into(), ..RunConfig::default() };
        let err = check_host_fits(&cpu, m.host_total(), m.expected_peak(), "this run", gib(128)).unwrap_err();
        assert!(err.contains("the passes on the CPU"), "{err}");
        let on_device = seven_b.memory_estimate(1, 4096, &TrainingMemory::new(Precision::Bf16));
        assert_eq!(on_device.host_total(), 0);
        assert!(check_host_fits(&gpu, on_device.host_total(), on_device.expected_peak(), "this run", gib(1)).is_ok());
    }

    #[test]
    fn refuses_a_model_larger_than_the_stated_memory_and_accepts_a_small_one() {
        let run = RunConfig { device_memory_gib: Some(80.0), ..RunConfig::default() };
        let seven_b = LlamaConfig::new(4096, 32, 32);
        let err = check_fits(&run, &seven_b, 4, 4096, &TrainingMemory::new(Precision::F32)).unwrap_err();
        assert!(err.contains("80.0 GiB") && err.contains("micro_batch_size") && err.contains("run.device_memory_gib"), "{err}");
        assert!(err.contains("train.recompute") && err.contains("run.optimizer"), "{err}");
        let tiny = LlamaConfig::new(64, 2, 4).with_vocab_size(256);
        assert!(check_fits(&run, &tiny, 4, 128, &TrainingMemory::new(Precision::F32)).is_ok());
    }

    /// At micro-batch 1 x 4096 in bf16 on an 80 GiB device, 13B fits only with both block
    /// recomputation and the host optimizer; 7B needs the host optimizer and fits without
    /// recomputation too (74 GiB expected: attention keeps no score-sized tensors); with the
    /// optimizer on the device neither fits.
    #[test]
    fn seven_and_thirteen_b_fit_eighty_gib_with_the_host_optimizer() {
        let run = RunConfig { device_memory_gib: Some(80.0), ..RunConfig::default() };
        let preset = |name: &str| LlamaConfig::from_toml_file(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs").join(name)).unwrap();
        let plan = |recompute, optimizer| TrainingMemory {
            recompute,
            optimizer,
            logits_chunk: (recompute == Recompute::Block).then_some(1024),
            ..TrainingMemory::new(Precision::Bf16)
        };
        for (name, fits_without_recompute) in [("7b.toml", true), ("13b.toml", false)] {
            let model = preset(name);
            assert!(check_fits(&run, &model, 1, 4096, &plan(Recompute::Block, OptimizerPlacement::Host)).is_ok(), "{name}");
            assert_eq!(check_fits(&run, &model, 1, 4096, &plan(Recompute::None, OptimizerPlacement::Host)).is_ok(), fits_without_recompute, "{name}");
            for r in [Recompute::None, Recompute::Block] {
                assert!(check_fits(&run, &model, 1, 4096, &plan(r, OptimizerPlacement::Device)).is_err(), "{name} {r:?}");
            }
        }
    }
}
