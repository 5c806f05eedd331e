//! The `rlhf` run file: the config sections with the paper's values as defaults, and their
//! validation before any work.

use std::path::PathBuf;

use anyhow::bail;
use llama_model::Precision;
use llama_trainer::config::RunConfig;
use serde::Deserialize;

/// An RLHF run, as one TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlhfConfig {
    /// The SFT policy to start from (run, checkpoint, native or HF directory).
    pub policy: PathBuf,
    /// Reward model runs (or checkpoints).
    pub helpfulness_model: PathBuf,
    pub safety_model: PathBuf,
    pub data: PromptData,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub rejection_sampling: RsConfig,
    #[serde(default)]
    pub ppo: PpoConfig,
    /// Block recomputation and chunked logits for rejection sampling's fine-tuning and PPO's
    /// policy and value passes (`recompute`, `logits_chunk`, as in `[train]`).
    #[serde(default)]
    pub memory: llama_trainer::config::MemoryConfig,
    #[serde(default)]
    pub run: RunConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptData {
    pub tokenizer: PathBuf,
    /// JSONL: `{"prompt": "...", "is_safety": bool}` (or `messages`).
    pub prompts: PathBuf,
    /// Held-out prompts for evaluation and early stopping.
    pub eval_prompts: PathBuf,
    /// Safety-gate threshold on the safety model's probability (the paper: 0.15).
    #[serde(default = "gate")]
    pub safety_threshold: f64,
    /// `llama2` (Llama 2's template, the default) or `tokenizer` (the chat_template of the
    /// tokenizer_config.json beside the tokenizer, for a model that brings its own).
    #[serde(default)]
    pub chat_template: llama_data::chat::ChatTemplateChoice,
}

impl PromptData {
    /// The tokenizer, rendering chats with `chat_template`.
    pub fn load_tokenizer(&self, origin: &str) -> anyhow::Result<llama_data::Tokenizer> {
        use anyhow::Context;
        llama_data::Tokenizer::from_file(&self.tokenizer)?.with_chat_template(self.chat_template).with_context(|| format!("{origin}: data.chat_template"))
    }
}

fn gate() -> f64 {
    0.15
}

/// The held-out evaluation that rejection sampling's rounds and PPO's early stopping compare.
/// The mean reward of one greedy answer per prompt is a noisy judge on small prompt sets: a
/// greedy answer flips to another one at tiny policy changes. Ours also scores
/// `samples_per_prompt` sampled answers per prompt, drawn with the same seeds at every
/// evaluation (common random numbers), so that two evaluations differ by the policy only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Sampled answers per held-out prompt, scored beside the greedy answer (0: greedy only).
    pub samples_per_prompt: usize,
    pub temperature: f32,
    pub seed: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { samples_per_prompt: 4, temperature: 1.0, seed: 1 }
    }
}

/// Rejection sampling (the paper: K up to 100, temperature 1.2-1.3 in later rounds).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RsConfig {
    pub rounds: usize,
    pub k: usize,
    pub temperature: f32,
    pub max_new_tokens: usize,
    /// Fine-tuning on the pool after each round (SFT loss).
    pub sft_steps: u64,
    pub lr: f64,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Let the policy's greedy answer compete with the K samples (ours; the paper keeps the best
    /// sample only).
    pub include_greedy: bool,
    /// Hand PPO the round with the best held-out reward (the starting policy included) rather
    /// than the last round (ours: early stopping on held-out prompts, as PPO does).
    pub keep_best_round: bool,
    /// Seed of the K samples (0 reproduces earlier runs; vary it to repeat an experiment).
    pub seed: u64,
    /// `[rejection_sampling.tools]`: sample with the tools running (a call the policy writes is
    /// run and its result appended), so the pool keeps answers with their calls and results; the
    /// results carry no loss when the round fine-tunes on them. The held-out evaluation (and so
    /// `keep_best_round`) answers with the tools too.
    pub tools: Option<llama_tools::ToolsConfig>,
}

impl Default for RsConfig {
    fn default() -> Self {
        Self {
            rounds: 1,
            k: 8,
            temperature: 1.2,
            max_new_tokens: 32,
            sft_steps: 50,
            lr: 2e-5,
            batch_size: 8,
            seq_len: 128,
            include_greedy: false,
            keep_best_round: false,
            seed: 0,
            tools: None,
        }
    }
}

/// PPO. Paper values where it gives them (batch 512, minibatch 64, clip 0.2, beta 0.01 for
/// 7B/13B, constant LR 1e-6, clip 1.0, one gradient step per minibatch); ours otherwise, stated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    /// Iterations of rollout + update (the paper: 200-400).
    pub iterations: u64,
    /// Prompts per iteration.
    pub batch_size: usize,
    /// Prompts per gradient step (one step per minibatch).
    pub minibatch_size: usize,
    pub beta: f64,
    pub clip: f64,
    /// Clip of the value update around the rollout's values (OpenRLHF: 0.5; ours 0.2).
    pub value_clip: f64,
    /// Not a setting (TRL's weight of the value loss in a loss shared with the policy): here the
    /// value model is a network of its own with its own AdamW, which normalises away any constant
    /// weight on its loss. Present only so that a config setting it is told why ([`validate`]).
    #[doc(hidden)]
    pub value_coef: Option<toml::Value>,
    /// GAE discount and lambda (the paper does not say; ours gamma 1, lambda 0.95, as TRL).
    pub gamma: f64,
    pub lambda: f64,
    pub lr: f64,
    /// AdamW weight decay of the policy and the value model (the paper's 0.1; none on norms and
    /// embeddings, as in every stage).
    pub weight_decay: f64,
    /// LR of the value model (OpenRLHF's defaults: critic 9e-6 against actor 1e-6). The value
    /// model starts as a reward model, whose scores are on another scale than the whitened
    /// returns it must predict: at the policy's LR it needs most of a short run to get there.
    pub value_lr: f64,
    /// Iterations at the start that train the value model only, the policy frozen (OpenRLHF's
    /// `freezing_actor_steps`): until the values fit the returns, GAE's advantages are mostly
    /// the values' error. Counted in `iterations`; no held-out evaluation while frozen.
    pub value_warmup: u64,
    pub grad_clip: f64,
    pub temperature: f32,
    pub max_new_tokens: usize,
    /// Evaluate on held-out prompts every this many iterations; stop after `patience`
    /// evaluations without a better mean reward (0: never stop early).
    pub eval_every: u64,
    pub patience: u64,
    pub checkpoint_every: u64,
    /// How many of the newest PPO checkpoints are kept (at least 1).
    pub keep_checkpoints: usize,
    pub seed: u64,
    /// Start from the rejection-sampling policy when the run has one.
    pub from_rejection_sampling: bool,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            iterations: 200,
            batch_size: 512,
            minibatch_size: 64,
            beta: 0.01,
            clip: 0.2,
            value_clip: 0.2,
            value_coef: None,
            gamma: 1.0,
            lambda: 0.95,
            lr: 1e-6,
            weight_decay: 0.1,
            value_lr: 9e-6,
            value_warmup: 0,
            grad_clip: 1.0,
            temperature: 1.0,
            max_new_tokens: 64,
            eval_every: 10,
            patience: 5,
            checkpoint_every: 10,
            keep_checkpoints: 2,
            seed: 0,
            from_rejection_sampling: true,
        }
    }
}

/// Checks everything that can be checked before any work; errors name the file and key.
pub fn validate(cfg: &RlhfConfig, origin: &str) -> anyhow::Result<()> {
    cfg.memory.validate("memory").map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    let rs = &cfg.rejection_sampling;
    if rs.rounds > 0 && rs.k < 1 {
        bail!("{origin}: rejection_sampling.k must be >= 1 (got {})", rs.k);
    }
    if rs.rounds > 0 && (rs.batch_size == 0 || rs.seq_len == 0 || !(rs.lr > 0.0)) {
        bail!("{origin}: rejection_sampling.batch_size, seq_len and lr must be > 0");
    }
    if let Some(tools) = &rs.tools {
        // The corpus is read here too, so a missing or malformed one stops the run before any work.
        tools.toolbox("rejection_sampling.tools").map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    }
    let p = &cfg.ppo;
    if p.batch_size == 0 || p.minibatch_size == 0 || !p.batch_size.is_multiple_of(p.minibatch_size) {
        bail!("{origin}: ppo.batch_size ({}) must be a positive multiple of ppo.minibatch_size ({})", p.batch_size, p.minibatch_size);
    }
    if p.value_coef.is_some() {
        bail!(
            "{origin}: ppo.value_coef is not a setting here: the value model is a separate network with its own AdamW, which normalises a constant weight on its loss away (it would only move where ppo.grad_clip clips); remove the key and set the value model's step size with ppo.value_lr"
        );
    }
    for (key, v) in [
        ("ppo.beta", p.beta),
        ("ppo.clip", p.clip),
        ("ppo.value_clip", p.value_clip),
        ("ppo.gamma", p.gamma),
        ("ppo.lambda", p.lambda),
        ("ppo.weight_decay", p.weight_decay),
    ] {
        if !(v >= 0.0) {
            bail!("{origin}: {key} must be >= 0 (got {v})");
        }
    }
    if p.temperature != 1.0 {
        // The ratio and the KL use the policy's own (temperature 1) log-probs: answers sampled at
        // another temperature come from another distribution, and PPO's ratio would be wrong.
        bail!(
            "{origin}: ppo.temperature must be 1.0 (got {}): PPO's probability ratio and KL penalty use the policy's own log-probs, which are those of sampling at temperature 1",
            p.temperature
        );
    }
    if p.max_new_tokens == 0 || cfg.rejection_sampling.max_new_tokens == 0 {
        bail!("{origin}: ppo.max_new_tokens and rejection_sampling.max_new_tokens must be > 0");
    }
    if !(cfg.eval.temperature > 0.0) {
        bail!("{origin}: eval.temperature must be > 0 (got {}); eval.samples_per_prompt = 0 scores the greedy answers only", cfg.eval.temperature);
    }
    if !(p.lr > 0.0) || !(p.value_lr > 0.0) || p.eval_every == 0 || p.checkpoint_every == 0 || p.keep_checkpoints == 0 {
        bail!("{origin}: ppo.lr, ppo.value_lr, ppo.eval_every, ppo.checkpoint_every and ppo.keep_checkpoints must be > 0");
    }
    if p.iterations > 0 && p.value_warmup >= p.iterations {
        bail!("{origin}: ppo.value_warmup ({}) must be below ppo.iterations ({}): the policy would never train", p.value_warmup, p.iterations);
    }
    cfg.run.validate().map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    if cfg.precision() == Precision::F16 {
        bail!("{origin}: run.dtype `f16`: PPO has no loss scaler, and f16's range needs one; allowed values: f32, bf16 (bf16 has f32's range)");
    }
    Ok(())
}

impl RlhfConfig {
    /// The compute dtype (`run.dtype`, validated): the frozen models are held in it and the
    /// policy's and value model's passes run in it; their masters and AdamWs stay f32.
    pub fn precision(&self) -> Precision {
        llama_trainer::precision::parse(&self.run.dtype).unwrap_or(Precision::F32)
    }
}
