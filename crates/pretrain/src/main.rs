//! `pretrain --config configs/tiny.toml`: pre-train a Llama model on tokenized Parquet shards.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use llama_pretrain::run;

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
    #[command(flatten)]
    training: llama_trainer::TrainingArgs,
}

fn main() -> ExitCode {
    llama_model::host_memory::keep_freed_memory();
    let cli = Cli::parse();
    // Under `mpirun` / `srun` (built with the `mpi` feature) this process is one rank of a job.
    llama_trainer::distributed::main_with(|| run(&cli.config, &cli.training.overrides(None)).map(|_| ()))
}
