//! Automatic evaluation as the paper reports it: perplexity on shards; for chat models, answers to
//! held-out helpfulness and safety prompt sets scored by both reward models (mean reward per set,
//! safety-violation rate, win / tie / loss against a baseline with bootstrap intervals), and
//! optionally a model as judge (position-swapped) with its agreement with the reward models.
//!
//! Modules by job: [`compare`] (the comparison), `stats` (win / tie / loss, bootstrap), `judge`
//! (its template and margin), `config` (the run file), `report` (report.json, answers.jsonl,
//! chart); this file holds perplexity.

mod compare;
mod config;
mod judge;
mod report;
mod stats;

pub use compare::{Paths, compare, compare_with};
pub use config::{EvalConfig, EvalTools, JudgeConfig, NamedModel};
pub use judge::{DEFAULT_TEMPLATE, check_template};
pub use report::{Report, SetReport, WithoutTools, write_outputs};
pub use stats::{bootstrap_win_rate, win_tie_loss};

use anyhow::bail;
use burn::module::Module;
use llama_data::{PackedReader, ReaderConfig, Split};
use llama_model::Llama;
use std::path::Path;

/// Perplexity of a model on a split of a shard directory (up to `max_windows` windows).
pub fn perplexity(model: &Llama, shards: &Path, split: Split, seq_len: usize, max_windows: usize, batch: usize) -> anyhow::Result<(f64, usize)> {
    if seq_len == 0 || seq_len > model.max_seq_len() {
        bail!("--seq-len {seq_len}: must be in 1..={} (the model's max_seq_len)", model.max_seq_len());
    }
    let model = model.valid();
    let config = ReaderConfig { shuffle: false, epochs: Some(1), ..ReaderConfig::new(seq_len) };
    let mut reader = PackedReader::open(shards, split, model.vocab_size(), config)?;
    let device = model.tok_embeddings.weight.device();
    let (mut sum, mut tokens, mut windows) = (0.0, 0usize, 0usize);
    while windows < max_windows {
        let mut w = vec![];
        while w.len() < batch && windows + w.len() < max_windows {
            match reader.next_window()? {
                Some(x) => w.push(x),
                None => break,
            }
        }
        if w.is_empty() {
            break;
        }
        windows += w.len();
        tokens += w.len() * seq_len;
        sum += llama_model::loss::cross_entropy_sum(&model, &w, &device).into_scalar::<f32>() as f64;
    }
    if tokens == 0 {
        bail!("{}: no {} windows of {} tokens to evaluate", shards.display(), split.name(), seq_len + 1);
    }
    if !sum.is_finite() {
        bail!("the loss on {} ({}) is {sum}: the model's outputs are not finite", shards.display(), split.name());
    }
    Ok(((sum / tokens as f64).exp(), tokens))
}
