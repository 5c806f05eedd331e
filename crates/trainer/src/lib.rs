//! The training loop every stage shares, and what it is made of: config sections with the
//! paper's defaults, AdamW with global-norm clipping, the LR schedule, gradient accumulation,
//! checkpoints with atomic rename and resume, TensorBoard events and terminal progress.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod distributed;
pub mod memory;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod optim_rules;
pub mod parallel;
pub mod precision;
pub mod run;
pub mod schedule;
pub mod sharded;
pub mod signals;
pub mod stage;
pub mod tensorboard;
pub mod test_hooks;

pub use cli::TrainingArgs;
pub use config::{OptimConfig, OptimizerPlacement, Recompute, RunConfig, ScheduleConfig, ScheduleKind, TrainConfig};
pub use metrics::Metrics;
pub use objective::Objective;
pub use precision::{LossScale, Precision};
pub use run::{LoopConfig, Overrides, Summary, train};
pub use schedule::Schedule;
pub use stage::Stage;

/// A model config as the TOML text (a `[model]` table) that checkpoints store and compare.
pub fn model_config_toml(config: &llama_model::LlamaConfig) -> anyhow::Result<String> {
    let mut table = toml::Table::new();
    table.insert("model".into(), toml::Value::try_from(config)?);
    Ok(toml::to_string(&table)?)
}
