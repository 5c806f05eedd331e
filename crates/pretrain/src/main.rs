//! `pretrain --config configs/tiny.toml`: pre-train a Llama model on tokenized Parquet shards.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use llama_pretrain::{Overrides, run};

/// Pre-train a Llama 2 model (next-token cross-entropy) on tokenized Parquet shards.
///
/// One TOML file describes the run: [model] (keys or `preset = "7b.toml"`), [data], [optim],
/// [schedule], [train], [run], [eval]; defaults are the Llama 2 paper's. Unknown keys are errors;
/// every value is checked before the first step. Progress goes to the terminal, curves to
/// OUT/tensorboard (`tensorboard --logdir OUT`), every logged number to OUT/metrics.jsonl, and
/// checkpoints to OUT/checkpoints (resume with --resume).
#[derive(Parser)]
#[command(name = "pretrain", version)]
struct Cli {
    /// The run's TOML file (e.g. configs/tiny.toml, configs/7b.toml).
    #[arg(long)]
    config: PathBuf,
    /// Override train.max_steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Override run.out_dir.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override run.device: flex (CPU), vulkan, wgpu, cuda[:N] (GPU ones need their cargo feature).
    #[arg(long)]
    device: Option<String>,
    /// Override run.dtype: f32, or bf16 / f16 mixed precision (f32 master weights; GPU).
    #[arg(long)]
    dtype: Option<String>,
    /// Data parallel over N devices (run.devices): vulkan:0..N-1, cuda:0..N-1, ...
    #[arg(long)]
    devices: Option<usize>,
    /// Continue from the newest complete checkpoint in the output directory.
    #[arg(long)]
    resume: bool,
    /// Stop after this step with a checkpoint, as an interruption would (the schedule still
    /// spans max_steps); `--resume` continues exactly.
    #[arg(long)]
    stop_after: Option<u64>,
}

fn main() -> ExitCode {
    llama_model::host_memory::keep_freed_memory();
    let cli = Cli::parse();
    let overrides = Overrides { max_steps: cli.max_steps, out: cli.out, device: cli.device, dtype: cli.dtype, devices: cli.devices, resume: cli.resume, stop_after: cli.stop_after, init: None };
    match run(&cli.config, &overrides) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
