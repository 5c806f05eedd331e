//! `llama info`: the parameter count and the training memory of a config, before launch.

use std::path::PathBuf;

use anyhow::{Result, bail};
use llama_model::recompute::MemorySaving;
use llama_model::{LlamaConfig, OptimizerPlacement, Precision, Recompute, TrainingMemory};

#[derive(clap::Args)]
pub struct InfoArgs {
    /// A TOML file with a [model] table (configs/7b.toml, a run config, a checkpoint's config.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Sequences per micro-batch on one device.
    #[arg(long, default_value_t = 1)]
    pub micro_batch: usize,
    /// Micro-batches per optimizer step on one device (train.batch_size / micro_batch_size /
    /// devices / ranks): with --optimizer host and more than one, their f32 gradient sum is
    /// kept on the device.
    #[arg(long, default_value_t = 1)]
    pub micro_batches: usize,
    /// Sequence length (defaults to the model's max_seq_len).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Device memory in GiB: say whether the estimate fits.
    #[arg(long)]
    pub device_memory_gib: Option<f64>,
    /// What the forward keeps for backward (train.recompute).
    #[arg(long, value_enum, default_value_t = Recompute::None)]
    pub recompute: Recompute,
    /// Where the f32 master weights and AdamW moments live (run.optimizer).
    #[arg(long, value_enum, default_value_t = OptimizerPlacement::Device)]
    pub optimizer: OptimizerPlacement,
    /// Positions per chunk of the output projection and loss (train.logits_chunk; default:
    /// 1024 with --recompute block, else the whole logits).
    #[arg(long)]
    pub logits_chunk: Option<usize>,
    /// MPI ranks of a data-parallel job (`mpirun -np N`): also print each rank's share with
    /// AdamW's moments sharded over them and the bytes each rank moves per step.
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Estimate for training on the CPU (flex) rather than a GPU: in f32 the fused CPU
    /// attention keeps its probabilities for backward (heads x seq per token and layer).
    #[arg(long)]
    pub cpu: bool,
    /// Also estimate a PPO iteration's five models on one device: the policy (this config) and
    /// the value model train, the reference policy and the two reward models are frozen, and the
    /// rollout keeps a KV cache; updates of --micro-batch x --seq-len, rollouts of --rollout-batch.
    #[arg(long)]
    pub ppo: bool,
    /// With --ppo: the shape of the value model and the two reward models (default: --config).
    #[arg(long, requires = "ppo")]
    pub reward_config: Option<PathBuf>,
    /// With --ppo: sequences generated at once per device (ppo.batch_size / ranks).
    #[arg(long, default_value_t = 64, requires = "ppo")]
    pub rollout_batch: usize,
}

/// `llama info`.
pub fn run(args: InfoArgs) -> Result<()> {
    let InfoArgs {
        config,
        micro_batch,
        micro_batches,
        seq_len,
        device_memory_gib,
        recompute,
        optimizer,
        logits_chunk,
        ranks,
        cpu,
        ppo,
        reward_config,
        rollout_batch,
    } = args;
    let c = LlamaConfig::from_toml_file(&config)?;
    if ranks == 0 || micro_batches == 0 || rollout_batch == 0 {
        bail!("--ranks, --micro-batches and --rollout-batch must be >= 1");
    }
    let seq = seq_len.unwrap_or(c.max_seq_len);
    if logits_chunk == Some(0) {
        bail!("--logits-chunk must be > 0 (positions per chunk)");
    }
    let chunk_for = |r: Recompute| MemorySaving::new(r, logits_chunk).logits_chunk;
    println!("config           {}", config.display());
    println!(
        "shape            dim {} | layers {} | heads {} | kv heads {} | head dim {} | ffn {} | vocab {}",
        c.dim,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads(),
        c.head_dim(),
        c.ffn_hidden(),
        c.vocab_size
    );
    println!("parameters       {} ({:.3} B)", c.num_params(), c.num_params() as f64 / 1e9);
    println!("train FLOPs/tok  {:.3e} at seq {seq}", c.train_flops_per_token(seq));
    let fits = |m: &llama_model::MemoryEstimate| verdict(m.expected_peak(), device_memory_gib);
    let chunk_name = |c: Option<usize>| c.map_or("whole".to_string(), |c| c.to_string());
    println!(
        "\ntraining memory on {}, micro-batch {micro_batch} x seq {seq} ({micro_batches} a step), recompute {}, optimizer on the {}, logits {}:",
        if cpu { "the CPU" } else { "a GPU" },
        name(recompute),
        name(optimizer),
        chunk_name(chunk_for(recompute))
    );
    println!(
        "{:<6} {:>11} {:>11} {:>11} {:>11} {:>12} {:>12} {:>14} {:>11}",
        "dtype", "weights", "master f32", "grads", "AdamW", "activations", "device", "expected peak", "host"
    );
    for (dtype, p) in [("f32", Precision::F32), ("bf16", Precision::Bf16)] {
        let keeps_attention_probs = TrainingMemory::attention_keeps_probs(p, cpu);
        let plan = TrainingMemory {
            recompute,
            optimizer,
            logits_chunk: chunk_for(recompute),
            keeps_attention_probs,
            micro_batches,
            streams_gradients: ranks == 1,
            ..TrainingMemory::new(p)
        };
        let m = c.memory_estimate(micro_batch, seq, &plan);
        println!(
            "{dtype:<6} {:>11} {:>11} {:>11} {:>11} {:>12} {:>12} {:>14} {:>11}{}",
            gib(m.weights),
            gib(m.master_weights),
            gib(m.gradients),
            gib(m.optimizer),
            gib(m.activations),
            gib(m.total()),
            gib(m.expected_peak()),
            gib(m.host_total()),
            fits(&m)
        );
    }
    println!("\nbf16, every combination (device expected peak | host):");
    for r in [Recompute::None, Recompute::Block] {
        for o in [OptimizerPlacement::Device, OptimizerPlacement::Host] {
            let m = c.memory_estimate(
                micro_batch,
                seq,
                &TrainingMemory {
                    recompute: r,
                    optimizer: o,
                    logits_chunk: chunk_for(r),
                    keeps_attention_probs: TrainingMemory::attention_keeps_probs(Precision::Bf16, cpu),
                    micro_batches,
                    streams_gradients: ranks == 1,
                    ..TrainingMemory::new(Precision::Bf16)
                },
            );
            println!("  --recompute {:<5} --optimizer {:<6} {:>12} | {:>11}{}", name(r), name(o), gib(m.expected_peak()), gib(m.host_total()), fits(&m));
        }
    }
    println!(
        "\nexpected peak = resident state (weights, master, grads, AdamW) x {} + activations x {} (peaks measured on an H100 and an H200 over this estimate); host = f32 master weights, AdamW moments and f32 gradients ({})",
        llama_model::memory::RESIDENT_OVERHEAD,
        llama_model::memory::ACTIVATION_OVERHEAD,
        if ranks == 1 { "streamed a parameter at a time into the update" } else { "whole, flattened for the collectives" }
    );
    if ppo {
        let reward = match &reward_config {
            Some(path) => LlamaConfig::from_toml_file(path)?,
            None => c.clone(),
        };
        print_ppo(&c, &reward, micro_batch, seq, rollout_batch, device_memory_gib, cpu, &chunk_for);
    }
    if ranks > 1 {
        // trainer::sharded: flat f32 blocks, reduce-scattered gradients, all-gathered weights.
        let p = c.num_params();
        let moved = 2.0 * 4.0 * p as f64 * (ranks - 1) as f64 / ranks as f64;
        println!(
                "
with {ranks} MPI ranks (AdamW sharded, ZeRO-1): per rank, AdamW moments {} on the host (not {}); each rank keeps the f32 master and f32 gradients ({} each) and moves {:.2} GB per optimizer step (reduce-scatter of f32 gradients + all-gather of f32 weights)",
                gib(8 * p / ranks as u64),
                gib(8 * p),
                gib(4 * p),
                moved / 1e9
            );
    }
    Ok(())
}

/// `llama info --ppo`: a PPO iteration's memory on one device for every dtype, recomputation and
/// optimizer placement.
fn print_ppo(
    policy: &LlamaConfig,
    reward: &LlamaConfig,
    micro_batch: usize,
    seq: usize,
    rollout_batch: usize,
    device_memory_gib: Option<f64>,
    cpu: bool,
    chunk_for: &dyn Fn(Recompute) -> Option<usize>,
) {
    println!(
        "\nPPO on {}: policy and reference {:.2} B, value and two reward models {:.2} B each; updates of {micro_batch} x seq {seq}, rollouts of {rollout_batch} sequences",
        if cpu { "the CPU" } else { "one GPU" },
        policy.num_params() as f64 / 1e9,
        reward.reward_model_params() as f64 / 1e9
    );
    println!(
        "{:<6} {:<9} {:<9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>14} {:>10}",
        "dtype", "recompute", "optimizer", "policy", "value", "reference", "rewards", "KV cache", "expected peak", "host"
    );
    for precision in [Precision::F32, Precision::Bf16] {
        for r in [Recompute::None, Recompute::Block] {
            for o in [OptimizerPlacement::Device, OptimizerPlacement::Host] {
                // The fused CPU attention keeps its probabilities for the backward pass.
                let keeps_attention_probs = TrainingMemory::attention_keeps_probs(precision, cpu);
                let plan = TrainingMemory {
                    recompute: r,
                    optimizer: o,
                    logits_chunk: chunk_for(r),
                    keeps_attention_probs,
                    streams_gradients: true,
                    ..TrainingMemory::new(precision)
                };
                let m = policy.ppo_memory_estimate(reward, micro_batch, seq, rollout_batch, &plan);
                let fits = verdict(m.expected_peak(), device_memory_gib);
                println!(
                    "{:<6} {:<9} {:<9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>14} {:>10}{fits}",
                    precision.name(),
                    name(r),
                    name(o),
                    gib(m.policy.total()),
                    gib(m.value.total()),
                    gib(m.reference),
                    gib(m.reward_models),
                    gib(m.kv_cache),
                    gib(m.expected_peak()),
                    gib(m.host_total())
                );
            }
        }
    }
    println!(
        "policy and value = weights, master, gradients, AdamW and activations each; the update's activations and the rollout's KV cache are never alive at once, so the peak counts the larger (x {}; the rest x {})",
        llama_model::memory::ACTIVATION_OVERHEAD,
        llama_model::memory::RESIDENT_OVERHEAD
    );
}

/// Whether an expected peak of `bytes` fits `device_memory_gib` (nothing said without it).
fn verdict(bytes: u64, device_memory_gib: Option<f64>) -> &'static str {
    match device_memory_gib {
        Some(g) if (bytes as f64) <= g * (1u64 << 30) as f64 => "  fits",
        Some(_) => "  does NOT fit",
        None => "",
    }
}

/// A clap value's name as typed on the command line.
fn name(value: impl clap::ValueEnum) -> String {
    value.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string())
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}
