//! `rlhf --config configs/rlhf-tiny.toml`: rejection sampling, then PPO.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// RLHF as in Llama 2: rejection sampling (K samples per prompt, the best by the combined reward
/// kept across rounds, then SFT on them), then PPO against the helpfulness and safety reward
/// models (Rc = safety score if the prompt is tagged unsafe or its safety probability < 0.15,
/// else helpfulness; reward whiten(logit(Rc)) - beta * KL per token; clipped policy and value
/// losses, one gradient step per minibatch, AdamW at a constant 1e-6). Everything is logged to
/// OUT/rejection-sampling and OUT/ppo (TensorBoard + metrics.jsonl); --resume continues a stopped run.
#[derive(Parser)]
#[command(name = "rlhf", version)]
struct Cli {
    #[arg(long)]
    config: PathBuf,
    /// Override run.out_dir.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue where the run stopped: rejection sampling after its newest completed round (a
    /// round cut short is run again), then PPO from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop PPO after this iteration with a checkpoint.
    #[arg(long)]
    stop_after: Option<u64>,
    /// Go straight to PPO.
    #[arg(long)]
    skip_rejection_sampling: bool,
    /// Override policy (the SFT run or checkpoint).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Override helpfulness_model.
    #[arg(long)]
    helpfulness_model: Option<PathBuf>,
    /// Override safety_model.
    #[arg(long)]
    safety_model: Option<PathBuf>,
}

fn main() -> ExitCode {
    llama_model::host_memory::keep_freed_memory();
    let cli = Cli::parse();
    let options = llama_rlhf::RunOptions {
        paths: llama_rlhf::Paths { out: cli.out, policy: cli.policy, helpfulness_model: cli.helpfulness_model, safety_model: cli.safety_model },
        resume: cli.resume,
        stop_after: cli.stop_after,
        skip_rejection_sampling: cli.skip_rejection_sampling,
    };
    // Under `mpirun` / `srun` (built with the `mpi` feature) each process is one rank of the job.
    // SIGTERM / SIGINT are recorded, and PPO or rejection sampling saves and ends between
    // iterations (an exit 0).
    llama_trainer::distributed::main_with(|| llama_rlhf::run(&cli.config, &options))
}
