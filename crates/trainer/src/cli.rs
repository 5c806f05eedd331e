//! The command-line flags every training binary shares (`pretrain`, `sft`, `reward`), declared
//! once and flattened into each binary's own `clap` parser.

use std::path::PathBuf;

use llama_model::{OptimizerPlacement, Recompute};

use crate::Overrides;

/// Overrides of the run's TOML file.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainingArgs {
    /// Override the step count (train.max_steps; stages that count epochs derive it otherwise).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Override run.out_dir.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override run.device: flex (CPU), vulkan, wgpu, cuda[:N] (GPU ones need their cargo feature).
    #[arg(long)]
    pub device: Option<String>,
    /// Override run.dtype: f32, or bf16 / f16 mixed precision (f32 master weights; GPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Data parallel over N devices (run.devices): vulkan:0..N-1, cuda:0..N-1, ...
    #[arg(long)]
    pub devices: Option<usize>,
    /// Override train.recompute: `block` keeps only each transformer block's input and re-runs
    /// the block in backward (activations several-fold smaller, about one more forward a step).
    #[arg(long, value_enum)]
    pub recompute: Option<Recompute>,
    /// Override run.optimizer: `host` keeps the f32 master weights and AdamW moments in host
    /// memory and updates them on the CPU (the device holds compute weights, gradients and
    /// activations only).
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerPlacement>,
    /// Continue from the newest complete checkpoint in the output directory.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this step with a checkpoint, as an interruption would (the schedule still
    /// spans the whole run); `--resume` continues exactly.
    #[arg(long)]
    pub stop_after: Option<u64>,
}

impl TrainingArgs {
    /// The overrides these flags give, with `init` (for the stages that start from a model).
    pub fn overrides(self, init: Option<PathBuf>) -> Overrides {
        Overrides {
            max_steps: self.max_steps,
            out: self.out,
            device: self.device,
            dtype: self.dtype,
            devices: self.devices,
            recompute: self.recompute,
            optimizer: self.optimizer,
            init,
            resume: self.resume,
            stop_after: self.stop_after,
        }
    }
}
