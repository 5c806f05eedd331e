//! Config sections every stage shares. Defaults are the Llama 2 pre-training recipe; each
//! section has `deny_unknown_fields` and a `validate` whose messages name the key.

use std::path::{Path, PathBuf};

use llama_model::recompute::MemorySaving;
pub use llama_model::{OptimizerPlacement, Recompute, TrainingMemory};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Reads and deserialises a TOML file; errors name the file, and toml names the key and line.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: cannot read config: {e}", path.display()))?;
    toml::from_str(llama_io::without_bom(&text)).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Resolves a `[model]` table: its keys, or `preset = "7b.toml"` (relative to the config file)
/// overridden by the other keys ([`llama_model::LlamaConfig::from_model_table`]).
pub fn resolve_model(value: &toml::Value, config_path: &Path) -> anyhow::Result<llama_model::LlamaConfig> {
    Ok(llama_model::LlamaConfig::from_model_table(value, config_path)?)
}

/// AdamW and clipping (Llama 2: beta1 0.9, beta2 0.95, eps 1e-5, weight decay 0.1, clip 1.0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate (3e-4 for 7B/13B, 1.5e-4 for 34B/70B).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Also decay RMSNorm weights and the embedding (the paper does not say; most recipes don't).
    pub decay_norms_and_embeddings: bool,
    /// Clip the gradient to this global L2 norm (0 disables).
    pub grad_clip: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self { lr: 3e-4, beta1: 0.9, beta2: 0.95, eps: 1e-5, weight_decay: 0.1, decay_norms_and_embeddings: false, grad_clip: 1.0 }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("optim.lr must be > 0, got {}", self.lr));
        }
        for (key, v) in [("optim.beta1", self.beta1), ("optim.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(format!("{key} must be in [0, 1), got {v}"));
            }
        }
        if !(self.eps > 0.0) {
            return Err(format!("optim.eps must be > 0, got {}", self.eps));
        }
        if !(self.weight_decay >= 0.0) {
            return Err(format!("optim.weight_decay must be >= 0, got {}", self.weight_decay));
        }
        if !(self.grad_clip >= 0.0) {
            return Err(format!("optim.grad_clip must be >= 0 (0 disables), got {}", self.grad_clip));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Linear warmup, then cosine decay to `min_lr_ratio * lr` at the last step.
    Cosine,
    /// Linear warmup, then linear decay to `min_lr_ratio * lr`.
    Linear,
    /// Linear warmup, then constant.
    Constant,
}

/// Learning-rate schedule (Llama 2 pre-training: 2000 warmup steps, cosine to 10%).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    /// Warmup as a share of all steps instead (the reward models: 3%); overrides warmup_steps.
    pub warmup_ratio: Option<f64>,
    /// Lower bound on the warmup when it comes from warmup_ratio (reward models: 5).
    pub min_warmup_steps: u64,
    pub min_lr_ratio: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self { kind: ScheduleKind::Cosine, warmup_steps: 2000, warmup_ratio: None, min_warmup_steps: 0, min_lr_ratio: 0.1 }
    }
}

impl ScheduleConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(format!("schedule.min_lr_ratio must be in [0, 1], got {}", self.min_lr_ratio));
        }
        if let Some(r) = self.warmup_ratio
            && !(0.0..1.0).contains(&r)
        {
            return Err(format!("schedule.warmup_ratio must be in [0, 1), got {r}"));
        }
        Ok(())
    }
}

/// Steps, batch and bookkeeping of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps; alternatively give `max_tokens`.
    pub max_steps: Option<u64>,
    /// Token budget; the step count is `ceil(max_tokens / (batch_size * seq_len))`.
    pub max_tokens: Option<u64>,
    /// Sequences per optimizer step, over all devices (Llama 2: 1024 x 4096 = 4M tokens).
    pub batch_size: usize,
    /// Sequences per forward/backward pass on one device; `batch_size / micro_batch_size`
    /// passes are accumulated into one step.
    pub micro_batch_size: usize,
    pub seed: u64,
    /// Stop after this many consecutive steps with a non-finite loss or gradient (they are
    /// skipped and counted), leaving a checkpoint of the last good state.
    pub max_bad_steps: u64,
    pub log_every: u64,
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    pub checkpoint_every: u64,
    /// Complete checkpoints kept (older ones are deleted).
    pub keep_checkpoints: usize,
    /// What the forward keeps for backward: "none" (everything), or "block" (each transformer
    /// block's input only; backward re-runs the block: about one more forward per step, the
    /// activations several-fold smaller).
    pub recompute: Recompute,
    /// Positions per chunk of the output projection and loss, each chunk's logits recomputed in
    /// backward so that the `[positions, vocab]` logits never exist whole (default: 1024 with
    /// recompute = "block", else the whole logits at once).
    pub logits_chunk: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_steps: None,
            max_tokens: None,
            batch_size: 1024,
            micro_batch_size: 4,
            seed: 0,
            max_bad_steps: 5,
            log_every: 10,
            eval_every: 1000,
            eval_batches: 20,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            recompute: Recompute::None,
            logits_chunk: None,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_steps.is_none() && self.max_tokens.is_none() {
            return Err("train.max_steps or train.max_tokens must be set".into());
        }
        if self.max_steps == Some(0) || self.max_tokens == Some(0) {
            return Err("train.max_steps / train.max_tokens must be > 0".into());
        }
        if self.batch_size == 0 || self.micro_batch_size == 0 {
            return Err("train.batch_size and train.micro_batch_size must be > 0".into());
        }
        if !self.batch_size.is_multiple_of(self.micro_batch_size) {
            return Err(format!("train.batch_size ({}) must be a multiple of train.micro_batch_size ({})", self.batch_size, self.micro_batch_size));
        }
        for (key, v) in [("train.log_every", self.log_every), ("train.eval_every", self.eval_every), ("train.checkpoint_every", self.checkpoint_every)] {
            if v == 0 {
                return Err(format!("{key} must be > 0"));
            }
        }
        if self.keep_checkpoints == 0 {
            return Err("train.keep_checkpoints must be >= 1".into());
        }
        MemoryConfig { recompute: self.recompute, logits_chunk: self.logits_chunk }.validate("train")
    }

    /// [`Self::validate`] for the stages that train for `data.epochs` over a fixed set of
    /// examples (`sft`, `reward`): `train.max_steps` is optional (when set it is the run's length,
    /// see `Overrides::epoch_stage_steps`), `train.max_tokens` is refused (they count examples).
    pub fn validate_epoch_stage(&self) -> Result<(), String> {
        if self.max_tokens.is_some() {
            return Err("train.max_tokens is not used by this stage (it trains data.epochs passes over its examples, or train.max_steps steps when set): remove it, or set train.max_steps".into());
        }
        Self { max_steps: Some(self.max_steps.unwrap_or(1)), ..self.clone() }.validate()
    }

    /// What a training forward saves (`recompute`, `logits_chunk` and its default).
    pub fn memory_saving(&self) -> MemorySaving {
        MemorySaving::new(self.recompute, self.logits_chunk)
    }

    /// Total optimizer steps for sequences of `seq_len` tokens.
    pub fn total_steps(&self, seq_len: usize) -> u64 {
        match (self.max_steps, self.max_tokens) {
            (Some(s), _) => s,
            (None, Some(t)) => t.div_ceil((self.batch_size * seq_len) as u64),
            (None, None) => 0,
        }
    }

    pub fn accumulation(&self) -> usize {
        self.batch_size / self.micro_batch_size
    }
}

/// What a training forward keeps for backward, for loops that have no `[train]` section (RLHF's
/// `[memory]`): the same keys and defaults as `train.recompute` and `train.logits_chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    pub recompute: Recompute,
    pub logits_chunk: Option<usize>,
}

impl MemoryConfig {
    pub fn validate(&self, section: &str) -> Result<(), String> {
        if self.logits_chunk == Some(0) {
            return Err(format!("{section}.logits_chunk must be > 0 (positions per chunk), or left out for the default"));
        }
        Ok(())
    }

    pub fn memory_saving(&self) -> MemorySaving {
        MemorySaving::new(self.recompute, self.logits_chunk)
    }
}

/// Where the run writes, and what it runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Checkpoints, TensorBoard events and metrics.jsonl go here.
    pub out_dir: PathBuf,
    /// flex (CPU), or vulkan / wgpu / cuda[:N] when built with that feature.
    pub device: String,
    /// Compute dtype: f32, or bf16 / f16 mixed precision (f32 master weights and AdamW state,
    /// forward and backward in the half type; f16 adds dynamic loss scaling). On CPU use f32:
    /// flex computes half types through f32 conversions, which is slower.
    pub dtype: String,
    /// Peak FLOP/s of the device in TFLOP/s, for MFU (default: 0.1 on CPU, 989 on CUDA = H100 bf16 dense).
    pub peak_tflops: Option<f64>,
    /// The device's memory in GiB for the fit check before launch (default: nvidia-smi's figure
    /// on a GPU, RAM on the CPU).
    pub device_memory_gib: Option<f64>,
    /// Data parallel over this many devices of `device`'s kind (indices counting up from its
    /// own): each runs micro-batches of `train.micro_batch_size`; gradients are summed on the
    /// first. On flex the replicas share the one CPU device (no speed-up).
    pub devices: usize,
    /// Where the f32 master weights and AdamW's moments live: "device", or "host" (host memory,
    /// updated on the CPU; the device keeps the compute-dtype weights, their gradients and the
    /// activations; each micro-batch's gradients come down and each step's weights go up).
    pub optimizer: OptimizerPlacement,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("runs/default"),
            device: "flex".into(),
            dtype: "f32".into(),
            peak_tflops: None,
            device_memory_gib: None,
            devices: 1,
            optimizer: OptimizerPlacement::Device,
        }
    }
}

impl RunConfig {
    pub fn validate(&self) -> Result<(), String> {
        crate::precision::parse(&self.dtype)?;
        if let Err(e) = llama_model::device::check_available(&self.device) {
            return Err(format!("run.device: {e}"));
        }
        if self.peak_tflops.is_some_and(|p| !(p > 0.0)) {
            return Err("run.peak_tflops must be > 0".into());
        }
        if self.devices == 0 {
            return Err("run.devices must be >= 1".into());
        }
        if self.device_memory_gib.is_some_and(|g| !(g > 0.0)) {
            return Err("run.device_memory_gib must be > 0".into());
        }
        Ok(())
    }

    /// The memory-relevant settings of a run in `precision` (on the CPU in f32, attention is the
    /// fused kernel that keeps its probabilities).
    pub fn training_memory(&self, precision: llama_model::Precision, train: &TrainConfig) -> TrainingMemory {
        TrainingMemory {
            precision,
            recompute: train.recompute,
            optimizer: self.optimizer,
            logits_chunk: train.memory_saving().logits_chunk,
            keeps_attention_probs: TrainingMemory::attention_keeps_probs(precision, llama_model::device::is_cpu(&self.device)),
            micro_batches: train.accumulation() / (self.devices * crate::distributed::world().size()).max(1),
            streams_gradients: self.devices == 1 && !crate::distributed::world().is_distributed(),
        }
    }

    pub fn peak_flops(&self) -> f64 {
        let default = if self.device.starts_with("cuda") { 989.0 } else { 0.1 };
        self.peak_tflops.unwrap_or(default) * 1e12
    }
}
