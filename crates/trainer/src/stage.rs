//! The start a fine-tuning stage (`sft`, `reward`) shares, in the order that spends nothing
//! before a refusal: the starting model's config is read without its weights, the tokenizer and
//! the sequence length are checked against it, the launch check (device, dtype, memory fit)
//! runs, and only then are the device seeded and the weights loaded.
//!
//! `pretrain` builds its model from its own `[model]` table instead of an `init` checkpoint, so
//! it runs the same launch check through [`crate::LoopConfig::new`] first thing.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::tensor::Device;
use llama_model::{Llama, LlamaConfig};

use crate::config::{RunConfig, TrainConfig};

/// The model a stage starts from, known by its config until [`Stage::load_model`] reads it.
#[derive(Debug, Clone)]
pub struct Stage {
    /// The config file, which every message names.
    origin: String,
    init: PathBuf,
    pub model_config: LlamaConfig,
}

impl Stage {
    /// Reads the config of the model at `init` (a run directory, a checkpoint, a Hugging Face
    /// directory or a GGUF file), not its weights.
    pub fn open(origin: &str, init: &Path) -> anyhow::Result<Self> {
        let model_config = crate::checkpoint::init_config(init).with_context(|| format!("{origin}: init"))?;
        Ok(Self { origin: origin.to_string(), init: init.to_path_buf(), model_config })
    }

    /// A tokenizer of `tokenizer_ids` ids must not produce one the model has no embedding for.
    pub fn check_tokenizer(&self, tokenizer_ids: usize) -> anyhow::Result<()> {
        Ok(self.model_config.check_vocabulary(&self.origin, tokenizer_ids)?)
    }

    /// `seq_len` (from config key `key`) fits the model's positions.
    pub fn check_seq_len(&self, key: &str, seq_len: usize) -> anyhow::Result<()> {
        if seq_len > self.model_config.max_seq_len {
            bail!("{}: {key} ({seq_len}) exceeds the model's max_seq_len ({})", self.origin, self.model_config.max_seq_len);
        }
        Ok(())
    }

    /// The launch check ([`crate::memory::check_launch`]) for sequences of `seq_len` tokens.
    pub fn check_launch(&self, run: &RunConfig, train: &TrainConfig, seq_len: usize) -> anyhow::Result<()> {
        crate::memory::check_launch(run, &self.model_config, train, seq_len).map_err(|e| anyhow::anyhow!("{}: {e}", self.origin))?;
        Ok(())
    }

    /// Seeds `run.device` with `seed` and loads the weights onto its autodiff twin, which it
    /// returns beside the model.
    pub fn load_model(&self, run: &RunConfig, seed: u64) -> anyhow::Result<(Device, Llama)> {
        let device = crate::parallel::rank_device(run).map_err(anyhow::Error::msg)?;
        device.seed(seed);
        let train_device = device.autodiff();
        let (config, model) = crate::checkpoint::init_model(&self.init, &train_device).with_context(|| format!("{}: init", self.origin))?;
        if config != self.model_config {
            bail!("{}: init {} changed while the run started", self.origin, self.init.display());
        }
        Ok((train_device, model))
    }
}
