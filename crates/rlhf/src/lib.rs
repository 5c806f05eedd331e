//! RLHF: rejection sampling, then PPO against the helpfulness and safety reward models.
//!
//! - Rejection sampling ([`rejection_sampling`]): K samples per prompt from the policy, scored by
//!   the combined reward, the best kept in a pool across rounds (so each round picks from the best
//!   of all rounds), then SFT on the pool.
//! - PPO ([`ppo`]): per iteration, rollouts from the policy (no autodiff), rewards
//!   `whiten(logit(Rc)) - beta * KL` per token, GAE, then one clipped policy + clipped value
//!   gradient step per minibatch. Policy, value model, both optimizers, whitening statistics and
//!   the prompt cursor are checkpointed; a resumed run continues exactly.

pub mod math;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use llama_data::Tokenizer;
use llama_data::chat::{Conversation, Message, Overlong, Role, pack};
use llama_model::recompute::{MemorySaving, with_memory_saving};
use llama_model::generate::{Generation, SamplingConfig, generate};
use llama_model::{Llama, LlamaConfig};
use llama_reward::{RewardModel, load_reward_model, right_pad};
use llama_trainer::checkpoint::{Checkpoints, init_model};
use llama_trainer::config::{OptimConfig, RunConfig, ScheduleConfig, ScheduleKind, TrainConfig, load_toml};
use llama_trainer::optim::{Optimizer, clip_global_norm};
use llama_trainer::test_hooks::kill_point;
use llama_trainer::{LoopConfig, Metrics, Schedule};
use serde::{Deserialize, Serialize};

use crate::math::{Whitener, combine, gae, kl_k1, logit, token_rewards, whiten_advantages};

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
}

impl Default for RsConfig {
    fn default() -> Self {
        Self { rounds: 1, k: 8, temperature: 1.2, max_new_tokens: 32, sft_steps: 50, lr: 2e-5, batch_size: 8, seq_len: 128, include_greedy: false, keep_best_round: false, seed: 0 }
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
            seed: 0,
            from_rejection_sampling: true,
        }
    }
}

/// One prompt with its safety tag.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub conversation: Conversation,
    pub is_safety: bool,
    /// Text a correct answer contains (the tiny data's fact), when the file gives one: a check of
    /// the answers that does not go through the reward models, to see reward hacking.
    pub expected: Option<String>,
    /// The line of the prompt file it came from (1-based), for messages.
    pub line: usize,
}

impl Prompt {
    /// The last user message: the question, for logs and data files.
    pub fn question(&self) -> String {
        self.conversation.exchanges().last().map(|(u, _)| u.content.clone()).unwrap_or_default()
    }

    /// Whether `answer` contains the expected text; `None` when the prompt has none.
    pub fn answer_is_expected(&self, answer: &str) -> Option<bool> {
        self.expected.as_ref().map(|e| answer.contains(e.as_str()))
    }
}

/// The share of `answers` (paired with `prompts`) that contain their prompt's expected text, over
/// the prompts that have one; `None` when none has.
pub fn expected_rate<'a>(prompts: impl IntoIterator<Item = &'a Prompt>, answers: &[String]) -> Option<f64> {
    let hits: Vec<bool> = prompts.into_iter().zip(answers).filter_map(|(p, a)| p.answer_is_expected(a)).collect();
    (!hits.is_empty()).then(|| hits.iter().filter(|&&h| h).count() as f64 / hits.len() as f64)
}

/// Reads prompts; a file with none is an error.
pub fn load_prompts(path: &Path) -> anyhow::Result<Vec<Prompt>> {
    let mut out = vec![];
    for line in llama_io::read_jsonl(path)? {
        let llama_io::JsonLine { at, line: n, value: v } = line?;
        let messages = match (v.get("prompt"), v.get("messages")) {
            (Some(serde_json::Value::String(p)), _) if !p.trim().is_empty() => vec![Message::new(Role::User, p.clone())],
            (_, Some(m)) => Conversation::from_json(&serde_json::json!({ "messages": m })).map_err(|e| anyhow::anyhow!("{at}: {e}"))?.messages,
            _ => bail!("{at}: expected a non-empty `prompt` string or `messages`"),
        };
        let conversation = Conversation { messages };
        conversation.validate().map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        let expected = match v.get("expected") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(e)) if !e.is_empty() => Some(e.clone()),
            Some(other) => bail!("{at}: `expected` must be a non-empty string (got {other})"),
        };
        out.push(Prompt { conversation, is_safety: v.get("is_safety").and_then(|b| b.as_bool()).unwrap_or(false), expected, line: n });
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// Refuses, before any work, a prompt of `path` that the model cannot answer in full: its tokens,
/// `max_new_tokens`, and the end-of-sequence token appended to an answer cut at that limit must
/// fit `max_seq_len`. The error names the file and line.
pub fn check_prompt_lengths(prompts: &[Prompt], path: &Path, tokenizer: &Tokenizer, max_new_tokens: usize, max_seq_len: usize) -> anyhow::Result<()> {
    for p in prompts {
        let at = format!("{}:{}", path.display(), p.line);
        let n = p.conversation.prompt_ids(tokenizer).map_err(|e| anyhow::anyhow!("{at}: {e}"))?.len();
        let total = n + max_new_tokens + 1;
        if total > max_seq_len {
            bail!(
                "{at}: the prompt is {n} tokens; with max_new_tokens ({max_new_tokens}) and the end-of-sequence token appended to a cut answer that is {total}, more than the model's max_seq_len ({max_seq_len}): shorten or remove the prompt, or lower max_new_tokens"
            );
        }
    }
    Ok(())
}

/// Loads a prompt file and checks every prompt's length ([`check_prompt_lengths`]).
pub fn load_prompts_for(path: &Path, tokenizer: &Tokenizer, max_new_tokens: usize, max_seq_len: usize) -> anyhow::Result<Vec<Prompt>> {
    let prompts = load_prompts(path)?;
    check_prompt_lengths(&prompts, path, tokenizer, max_new_tokens, max_seq_len)?;
    Ok(prompts)
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
    let p = &cfg.ppo;
    if p.batch_size == 0 || p.minibatch_size == 0 || p.batch_size % p.minibatch_size != 0 {
        bail!("{origin}: ppo.batch_size ({}) must be a positive multiple of ppo.minibatch_size ({})", p.batch_size, p.minibatch_size);
    }
    if p.value_coef.is_some() {
        bail!(
            "{origin}: ppo.value_coef is not a setting here: the value model is a separate network with its own AdamW, which normalises a constant weight on its loss away (it would only move where ppo.grad_clip clips); remove the key and set the value model's step size with ppo.value_lr"
        );
    }
    for (key, v) in [("ppo.beta", p.beta), ("ppo.clip", p.clip), ("ppo.value_clip", p.value_clip), ("ppo.gamma", p.gamma), ("ppo.lambda", p.lambda), ("ppo.weight_decay", p.weight_decay)] {
        if !(v >= 0.0) {
            bail!("{origin}: {key} must be >= 0 (got {v})");
        }
    }
    if p.temperature != 1.0 {
        // The ratio and the KL use the policy's own (temperature 1) log-probs: answers sampled at
        // another temperature come from another distribution, and PPO's ratio would be wrong.
        bail!("{origin}: ppo.temperature must be 1.0 (got {}): PPO's probability ratio and KL penalty use the policy's own log-probs, which are those of sampling at temperature 1", p.temperature);
    }
    if p.max_new_tokens == 0 || cfg.rejection_sampling.max_new_tokens == 0 {
        bail!("{origin}: ppo.max_new_tokens and rejection_sampling.max_new_tokens must be > 0");
    }
    if !(cfg.eval.temperature > 0.0) {
        bail!("{origin}: eval.temperature must be > 0 (got {}); eval.samples_per_prompt = 0 scores the greedy answers only", cfg.eval.temperature);
    }
    if !(p.lr > 0.0) || !(p.value_lr > 0.0) || p.eval_every == 0 || p.checkpoint_every == 0 {
        bail!("{origin}: ppo.lr, ppo.value_lr, ppo.eval_every and ppo.checkpoint_every must be > 0");
    }
    if p.iterations > 0 && p.value_warmup >= p.iterations {
        bail!("{origin}: ppo.value_warmup ({}) must be below ppo.iterations ({}): the policy would never train", p.value_warmup, p.iterations);
    }
    cfg.run.validate().map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    if cfg.run.dtype != "f32" {
        bail!(
            "{origin}: run.dtype `{}`: the rlhf stage computes in f32 only (bf16/f16 mixed precision is in the shared loop of pretrain, sft and reward); allowed values: f32",
            cfg.run.dtype
        );
    }
    Ok(())
}

/// The frozen models that score: both reward models and the tokenizer's pad.
pub struct Scorers {
    pub helpfulness: RewardModel,
    pub safety: RewardModel,
    pub threshold: f64,
    pub pad: u32,
}

/// Scores of one response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub helpfulness: f64,
    pub safety: f64,
    /// Rc in (0, 1) after the safety gate.
    pub combined: f64,
}

impl Scorers {
    pub fn score(&self, sequences: &[Vec<u32>], prompts: &[&Prompt]) -> Vec<Scores> {
        let h = self.helpfulness.score(sequences, self.pad);
        let s = self.safety.score(sequences, self.pad);
        h.iter()
            .zip(&s)
            .zip(prompts)
            .map(|((&h, &s), p)| Scores { helpfulness: h as f64, safety: s as f64, combined: combine(h as f64, s as f64, p.is_safety, self.threshold).0 })
            .collect()
    }
}

/// Prompt + response as scored and trained on: the response closed with EOS if it was cut.
pub fn full_sequence(prompt: &[u32], response: &[u32], eos: u32) -> Vec<u32> {
    let mut s = prompt.to_vec();
    s.extend_from_slice(response);
    if response.last() != Some(&eos) {
        s.push(eos);
    }
    s
}

/// The policy's answers to `prompts` (token ids `ids`) under `sampling`, scored: (answer tokens,
/// prompt + answer sequences as scored, scores).
fn scored_answers(policy: &Llama, ids: &[Vec<u32>], prompts: &[&Prompt], tokenizer: &Tokenizer, scorers: &Scorers, sampling: &SamplingConfig) -> anyhow::Result<(Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Scores>)> {
    let out = generate(policy, ids, &SamplingConfig { eos_id: Some(tokenizer.eos_id()), ..sampling.clone() })?;
    let seqs: Vec<Vec<u32>> = ids.iter().zip(&out.tokens).map(|(p, r)| full_sequence(p, r, tokenizer.eos_id())).collect();
    let scores = scorers.score(&seqs, prompts);
    Ok((out.tokens, seqs, scores))
}

/// The policy's greedy answers, scored: what the held-out evaluation always includes, and the
/// answer that competes with the K samples under `include_greedy`.
fn greedy_answers(policy: &Llama, ids: &[Vec<u32>], prompts: &[&Prompt], tokenizer: &Tokenizer, scorers: &Scorers, max_new: usize) -> anyhow::Result<(Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Scores>)> {
    scored_answers(policy, ids, prompts, tokenizer, scorers, &SamplingConfig::greedy(max_new))
}

/// Log-probabilities of each response token under `model`, by teacher forcing on right-padded
/// prompt + response sequences: the quantity the generator returned for the same tokens.
///
/// # Shapes
/// - output: `[batch, longest - 1]`, entry `j` the log-prob of token `j + 1`
pub fn token_logprobs(model: &Llama, sequences: &[Vec<u32>], pad: u32) -> Tensor<2> {
    let device = model.tok_embeddings.weight.device();
    let (tokens, _) = right_pad(sequences, pad, &device);
    let [b, t] = tokens.dims();
    let hidden = model.forward_hidden(tokens.clone().slice([0..b, 0..t - 1]), None);
    let targets = tokens.slice([0..b, 1..t]).reshape([b * (t - 1)]);
    model.token_nll(hidden, targets).neg().reshape([b, t - 1])
}

/// One PPO batch after the rollout: everything the update needs, on the host.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub sequences: Vec<Vec<u32>>,
    /// Per sequence: index of the first response token.
    pub prompt_len: Vec<usize>,
    /// Per sequence and response token: old log-prob, value, advantage, return.
    pub logp: Vec<Vec<f32>>,
    pub values: Vec<Vec<f64>>,
    pub advantages: Vec<Vec<f64>>,
    pub returns: Vec<Vec<f64>>,
    pub scores: Vec<Scores>,
    pub whitened: Vec<f64>,
    pub kl: Vec<f64>,
}

/// Response-token mask over `[batch, longest - 1]` targets.
fn response_mask(rollout: &Rollout, idx: &[usize], width: usize) -> Vec<f32> {
    let mut m = vec![0.0; idx.len() * width];
    for (row, &i) in idx.iter().enumerate() {
        let start = rollout.prompt_len[i] - 1;
        for j in 0..rollout.logp[i].len() {
            m[row * width + start + j] = 1.0;
        }
    }
    m
}

/// Places per-response-token host values at their target positions.
fn scatter(rollout: &Rollout, idx: &[usize], width: usize, values: impl Fn(usize) -> Vec<f64>) -> Vec<f32> {
    let mut m = vec![0.0; idx.len() * width];
    for (row, &i) in idx.iter().enumerate() {
        let start = rollout.prompt_len[i] - 1;
        for (j, v) in values(i).into_iter().enumerate() {
            m[row * width + start + j] = v as f32;
        }
    }
    m
}

/// The PPO models and state.
pub struct PpoState {
    pub policy: Llama,
    pub value: RewardModel,
    pub reference: Llama,
    pub policy_optim: Optimizer,
    pub value_optim: Optimizer,
    pub whitener: Whitener,
    pub iteration: u64,
    pub cursor: usize,
    pub best_eval: Option<f64>,
    pub evals_without_gain: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PpoSaved {
    iteration: u64,
    cursor: usize,
    whitener: Whitener,
    best_eval: Option<f64>,
    evals_without_gain: u64,
    model_config: String,
}

/// Samples `prompts` from the policy and builds the batch: scores, whitened rewards, KL against
/// the reference, values, GAE.
pub fn rollout(state: &mut PpoState, prompts: &[&Prompt], tokenizer: &Tokenizer, scorers: &Scorers, cfg: &PpoConfig, seed: u64) -> anyhow::Result<Rollout> {
    let policy = state.policy.valid();
    let prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.conversation.prompt_ids(tokenizer)).collect::<Result<_, _>>()?;
    let sampling = SamplingConfig { temperature: cfg.temperature, top_k: None, top_p: None, max_new_tokens: cfg.max_new_tokens, eos_id: Some(tokenizer.eos_id()), seed };
    let Generation { tokens, logprobs, .. } = generate(&policy, &prompt_ids, &sampling)?;
    let eos = tokenizer.eos_id();
    let sequences: Vec<Vec<u32>> = prompt_ids.iter().zip(&tokens).map(|(p, r)| full_sequence(p, r, eos)).collect();
    let prompt_len: Vec<usize> = prompt_ids.iter().map(Vec::len).collect();
    // The appended EOS of a cut response is part of what is scored but was not sampled: its
    // log-prob comes from the same teacher-forced pass as the reference's.
    let policy_lp = token_logprobs(&policy, &sequences, scorers.pad).into_data().try_to_vec::<f32>().expect("f32");
    let ref_lp = token_logprobs(&state.reference.valid(), &sequences, scorers.pad).into_data().try_to_vec::<f32>().expect("f32");
    let width = sequences.iter().map(Vec::len).max().unwrap_or(1) - 1;
    let value_model = state.value.valid();
    let device = value_model.head.weight.device();
    let (padded, _) = right_pad(&sequences, scorers.pad, &device);
    let values_all = value_model.values(padded).into_data().try_to_vec::<f32>().expect("f32");
    let full_width = width + 1;
    let scores = scorers.score(&sequences, prompts);
    let logits: Vec<f64> = scores.iter().map(|s| logit(s.combined)).collect();
    state.whitener.update(&logits);
    let whitened: Vec<f64> = logits.iter().map(|&l| state.whitener.whiten(l)).collect();
    let mut out = Rollout { sequences: vec![], prompt_len, logp: vec![], values: vec![], advantages: vec![], returns: vec![], scores, whitened, kl: vec![] };
    for (i, seq) in sequences.iter().enumerate() {
        let start = out.prompt_len[i] - 1;
        let n = seq.len() - out.prompt_len[i];
        let mut lp: Vec<f32> = logprobs[i].clone();
        lp.truncate(n);
        while lp.len() < n {
            lp.push(policy_lp[i * width + start + lp.len()]);
        }
        let rl: Vec<f32> = (0..n).map(|j| ref_lp[i * width + start + j]).collect();
        let kl = kl_k1(&lp, &rl);
        let v: Vec<f64> = (0..n).map(|j| values_all[i * full_width + start + j] as f64).collect();
        let rewards = token_rewards(&kl, cfg.beta, out.whitened[i]);
        let (adv, ret) = gae(&rewards, &v, cfg.gamma, cfg.lambda);
        out.kl.push(kl.iter().sum());
        out.logp.push(lp);
        out.values.push(v);
        out.advantages.push(adv);
        out.returns.push(ret);
    }
    out.sequences = sequences;
    whiten_advantages(&mut out.advantages);
    Ok(out)
}

/// Metrics of one gradient step.
#[derive(Debug, Clone, Default)]
pub struct StepStats {
    pub policy_loss: f64,
    pub value_loss: f64,
    pub clip_fraction: f64,
    pub approx_kl: f64,
    pub entropy: f64,
}

/// The mean of `x` over the positions where `mask` is 1 (over none: 0).
///
/// # Shapes
/// - `x`, `mask`: `[batch, width]`; returns `[1]`.
pub fn masked_mean(x: Tensor<2>, mask: Tensor<2>) -> Tensor<1> {
    let count = mask.clone().sum().into_scalar::<f32>().max(1.0) as f64;
    (x * mask).sum().div_scalar(count)
}

/// PPO's clipped surrogate over the response tokens (`mask`): the mean of
/// `max(-A r, -A clip(r, 1 - clip, 1 + clip))` with `r = exp(lp - old_lp)`, so a token's ratio
/// moves the loss only until it leaves the clip range in the direction its advantage favours.
///
/// # Shapes
/// - `lp`, `old_lp`, `adv`, `mask`: `[batch, width]`; returns `[1]`.
pub fn clipped_policy_loss(lp: Tensor<2>, old_lp: Tensor<2>, adv: Tensor<2>, mask: Tensor<2>, clip: f64) -> Tensor<1> {
    let ratio = (lp - old_lp).exp();
    let unclipped = adv.clone().neg() * ratio.clone();
    let clipped = adv.neg() * ratio.clamp(1.0 - clip, 1.0 + clip);
    masked_mean(unclipped.max_pair(clipped), mask)
}

/// The value loss clipped around the rollout's values (OpenRLHF's, TRL's): half the mean over the
/// response tokens of `max((v - R)^2, (v_old + clip(v - v_old, -clip, clip) - R)^2)`.
///
/// # Shapes
/// - `values`, `old_values`, `returns`, `mask`: `[batch, width]`; returns `[1]`.
pub fn clipped_value_loss(values: Tensor<2>, old_values: Tensor<2>, returns: Tensor<2>, mask: Tensor<2>, clip: f64) -> Tensor<1> {
    let v_clipped = old_values.clone() + (values.clone() - old_values).clamp(-clip, clip);
    masked_mean((values - returns.clone()).powi_scalar(2).max_pair((v_clipped - returns).powi_scalar(2)), mask).mul_scalar(0.5)
}

/// One clipped-PPO gradient step on the minibatch `idx` of `rollout`: the value model, and the
/// policy unless `train_policy` is false (the value warm-up).
pub fn ppo_step(state: &mut PpoState, rollout: &Rollout, idx: &[usize], cfg: &PpoConfig, pad: u32, train_policy: bool, saving: MemorySaving) -> StepStats {
    let device = state.policy.tok_embeddings.weight.device();
    let seqs: Vec<Vec<u32>> = idx.iter().map(|&i| rollout.sequences[i].clone()).collect();
    let width = seqs.iter().map(Vec::len).max().unwrap_or(1) - 1;
    let b = idx.len();
    let t2 = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [b, width]), &device);
    let mask = t2(response_mask(rollout, idx, width));
    let old_lp = t2(scatter(rollout, idx, width, |i| rollout.logp[i].iter().map(|&x| x as f64).collect()));
    let adv = t2(scatter(rollout, idx, width, |i| rollout.advantages[i].clone()));
    let ret = t2(scatter(rollout, idx, width, |i| rollout.returns[i].clone()));
    let old_v = t2(scatter(rollout, idx, width, |i| rollout.values[i].clone()));
    let masked_mean = |x: Tensor<2>| masked_mean(x, mask.clone());

    let (tokens, _) = right_pad(&seqs, pad, &device);
    // Value: clipped around the rollout's values.
    let values = with_memory_saving(saving, || state.value.values(tokens.clone())).slice([0..b, 0..width]);
    let value_loss = clipped_value_loss(values, old_v, ret, mask.clone(), cfg.value_clip);
    let mut stats = StepStats { value_loss: value_loss.clone().into_scalar::<f32>() as f64, ..StepStats::default() };

    // Policy: clipped surrogate (not during the value warm-up).
    let total = if train_policy {
        let targets = tokens.clone().slice([0..b, 1..width + 1]).reshape([b * width]);
        let (hidden, lp) = with_memory_saving(saving, || {
            let hidden = state.policy.forward_hidden(tokens.slice([0..b, 0..width]), None);
            let lp = state.policy.token_nll(hidden.clone(), targets).neg().reshape([b, width]);
            (hidden, lp)
        });
        let policy_loss = clipped_policy_loss(lp.clone(), old_lp.clone(), adv, mask.clone(), cfg.clip);

        // Diagnostics, detached.
        let log_ratio = (lp.detach() - old_lp).clone();
        stats.approx_kl = masked_mean(log_ratio.clone().exp() - 1.0 - log_ratio.clone()).into_scalar::<f32>() as f64;
        stats.clip_fraction = masked_mean(log_ratio.exp().sub_scalar(1.0).abs().greater_elem(cfg.clip).float()).into_scalar::<f32>() as f64;
        let entropy_tok = with_memory_saving(saving, || state.policy.token_entropy(hidden)).reshape([b, width]);
        stats.entropy = masked_mean(entropy_tok).into_scalar::<f32>() as f64;
        stats.policy_loss = policy_loss.clone().into_scalar::<f32>() as f64;
        // The two models share no parameter, so one backward through the sum gives each its own
        // gradients; the value loss is unweighted, as its own AdamW would undo any constant weight.
        policy_loss + value_loss
    } else {
        value_loss
    };

    let mut grads = total.backward();
    if train_policy {
        let mut pg = GradientsParams::from_module(&mut grads, &state.policy);
        clip_global_norm(&state.policy, &mut pg, cfg.grad_clip);
        state.policy = state.policy_optim.step(cfg.lr, state.policy.clone(), pg);
    }
    let mut vg = GradientsParams::from_module(&mut grads, &state.value);
    clip_global_norm(&state.value, &mut vg, cfg.grad_clip);
    state.value = state.value_optim.step(cfg.value_lr, state.value.clone(), vg);
    stats
}

/// The held-out evaluation of a policy: the mean combined reward of its answers to the held-out
/// prompts (the greedy answer and `eval.samples_per_prompt` sampled ones per prompt; as logit(Rc)
/// and as Rc), their mean KL to the reference, and the greedy answers of a few for the logs.
pub struct HeldOut {
    /// Mean `logit(Rc)`: PPO's reward scale (what early stopping compares).
    pub reward: f64,
    /// Mean `Rc`, the combined score in [0, 1] itself: bounded, so a few answers scored near 0 or
    /// 1 cannot swing it the way they swing the logit mean.
    pub combined: f64,
    /// Mean summed per-token `log pi - log pi_ref` (k1).
    pub kl: f64,
    /// The share of the answers (greedy and sampled) that contain the prompt's `expected` text,
    /// over the prompts that give one.
    pub expected: Option<f64>,
    /// (question, greedy answer) pairs.
    pub samples: Vec<(String, String)>,
}

impl HeldOut {
    /// `{stage}/eval_reward`, `eval_combined`, `eval_kl` and, when the prompts give expected
    /// answers, `eval_expected`.
    pub fn scalars(&self, stage: &str) -> Vec<(String, f64)> {
        let mut v = vec![("eval_reward", self.reward), ("eval_combined", self.combined), ("eval_kl", self.kl)];
        v.extend(self.expected.map(|e| ("eval_expected", e)));
        v.into_iter().map(|(k, x)| (format!("{stage}/{k}"), x)).collect()
    }
}

pub fn evaluate(policy: &Llama, reference: &Llama, prompts: &[Prompt], tokenizer: &Tokenizer, scorers: &Scorers, max_new: usize, eval: &EvalConfig) -> anyhow::Result<HeldOut> {
    let policy = policy.valid();
    let reference = reference.valid();
    let mut rewards = vec![];
    let mut combined = vec![];
    let mut kls = vec![];
    let mut samples = vec![];
    let (mut answered, mut texts): (Vec<&Prompt>, Vec<String>) = (vec![], vec![]);
    for (g, group) in prompts.chunks(16).enumerate() {
        let ids: Vec<Vec<u32>> = group.iter().map(|p| p.conversation.prompt_ids(tokenizer)).collect::<Result<_, _>>()?;
        let refs: Vec<&Prompt> = group.iter().collect();
        // The greedy answers, then each round of sampled ones with its fixed seed.
        let samplings = std::iter::once(SamplingConfig::greedy(max_new)).chain((0..eval.samples_per_prompt).map(|s| SamplingConfig {
            temperature: eval.temperature,
            top_k: None,
            top_p: None,
            max_new_tokens: max_new,
            eos_id: None,
            seed: eval.seed.wrapping_mul(1_000_003).wrapping_add((g * eval.samples_per_prompt + s) as u64),
        }));
        for (i, sampling) in samplings.enumerate() {
            let (answers, seqs, scores) = scored_answers(&policy, &ids, &refs, tokenizer, scorers, &sampling)?;
            for s in scores {
                rewards.push(logit(s.combined));
                combined.push(s.combined);
            }
            kls.extend(sequence_kls(&policy, &reference, &ids, &seqs, scorers.pad));
            for (p, r) in group.iter().zip(&answers) {
                let text = tokenizer.decode(r)?;
                if i == 0 {
                    samples.push((p.question(), text.clone()));
                }
                answered.push(p);
                texts.push(text);
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(HeldOut { reward: mean(&rewards), combined: mean(&combined), kl: mean(&kls), expected: expected_rate(answered, &texts), samples })
}

/// Per sequence, the summed `log pi - log pi_ref` (k1) of its response tokens (those after the
/// prompt `ids[i]`).
fn sequence_kls(policy: &Llama, reference: &Llama, ids: &[Vec<u32>], seqs: &[Vec<u32>], pad: u32) -> Vec<f64> {
    let lp = token_logprobs(policy, seqs, pad).into_data().try_to_vec::<f32>().expect("f32");
    let rl = token_logprobs(reference, seqs, pad).into_data().try_to_vec::<f32>().expect("f32");
    let width = seqs.iter().map(Vec::len).max().unwrap_or(1) - 1;
    seqs.iter()
        .enumerate()
        .map(|(i, s)| {
            let start = ids[i].len() - 1;
            let n = s.len() - ids[i].len();
            (0..n).map(|j| (lp[i * width + start + j] - rl[i * width + start + j]) as f64).sum::<f64>()
        })
        .collect()
}

fn samples_text(samples: &[(String, String)], n: usize) -> String {
    samples.iter().take(n).map(|(q, a)| format!("**{q}**\n\n{a}\n\n")).collect()
}

/// Loads the reward models and checks that they share the policy's vocabulary.
pub fn load_scorers(cfg: &RlhfConfig, policy_config: &LlamaConfig, tokenizer: &Tokenizer, device: &Device, origin: &str) -> anyhow::Result<Scorers> {
    let (hc, helpfulness) = load_reward_model(&cfg.helpfulness_model, device).with_context(|| format!("{origin}: helpfulness_model"))?;
    let (sc, safety) = load_reward_model(&cfg.safety_model, device).with_context(|| format!("{origin}: safety_model"))?;
    for (name, path, c) in [("helpfulness_model", &cfg.helpfulness_model, &hc), ("safety_model", &cfg.safety_model, &sc)] {
        if c.vocab_size != policy_config.vocab_size {
            bail!(
                "{origin}: {name} {} has a vocabulary of {} ids but the policy has {}: the reward models must share the policy's tokenizer",
                path.display(),
                c.vocab_size,
                policy_config.vocab_size
            );
        }
    }
    if tokenizer.vocab_size() > policy_config.vocab_size {
        bail!("{origin}: the tokenizer has {} ids but the policy's vocabulary is {}", tokenizer.vocab_size(), policy_config.vocab_size);
    }
    Ok(Scorers { helpfulness: helpfulness.valid(), safety: safety.valid(), threshold: cfg.data.safety_threshold, pad: tokenizer.eos_id() })
}

/// Rejection sampling rounds; returns the directory of the final policy (or None if no rounds).
pub fn rejection_sampling(cfg: &RlhfConfig, origin: &str) -> anyhow::Result<Option<PathBuf>> {
    let rs = &cfg.rejection_sampling;
    if rs.rounds == 0 {
        return Ok(None);
    }
    let tokenizer = Tokenizer::from_file(&cfg.data.tokenizer)?;
    let device = llama_model::device::parse(&cfg.run.device)?;
    let train_device = device.clone().autodiff();
    let (policy_config, mut policy) = init_model(&cfg.policy, &train_device).with_context(|| format!("{origin}: policy"))?;
    let scorers = load_scorers(cfg, &policy_config, &tokenizer, &device, origin)?;
    let prompts = load_prompts_for(&cfg.data.prompts, &tokenizer, rs.max_new_tokens, policy_config.max_seq_len)?;
    let eval_prompts = load_prompts_for(&cfg.data.eval_prompts, &tokenizer, rs.max_new_tokens, policy_config.max_seq_len)?;
    let out = cfg.run.out_dir.join("rejection-sampling");
    let _lock = llama_trainer::checkpoint::RunLock::acquire(&out)?;
    let mut metrics = Metrics::open(&out, rs.rounds as u64, 0)?;
    let start = evaluate(&policy, &policy, &eval_prompts, &tokenizer, &scorers, rs.max_new_tokens, &cfg.eval)?;
    let r0 = start.reward;
    metrics.scalars(0, &start.scalars("rs"))?;
    metrics.println(&format!("rejection sampling: held-out reward of the starting policy {r0:.3} (mean Rc {:.3})", start.combined));
    // Best answer so far per prompt, over all rounds: (combined reward, answer tokens).
    let mut pool: Vec<Option<(f64, Vec<u32>)>> = vec![None; prompts.len()];
    let reference = policy.clone();
    // (held-out reward, round directory): the best round, or the last one without keep_best_round.
    let mut best: (f64, Option<PathBuf>) = (r0, None);
    for round in 1..=rs.rounds {
        let sampler = policy.valid();
        let mut best_of_k = vec![0.0; rs.k];
        let (mut mean_all, mut n_all) = (0.0, 0usize);
        let mut greedy_sum = 0.0;
        for (chunk_i, chunk) in prompts.chunks((64 / rs.k).max(1)).enumerate() {
            let ids: Vec<Vec<u32>> = chunk.iter().map(|p| p.conversation.prompt_ids(&tokenizer)).collect::<Result<_, _>>()?;
            let batch: Vec<Vec<u32>> = ids.iter().flat_map(|p| std::iter::repeat_n(p.clone(), rs.k)).collect();
            let seed = rs.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((round as u64) << 32 | chunk_i as u64);
            let sampling = SamplingConfig { temperature: rs.temperature, top_k: None, top_p: None, max_new_tokens: rs.max_new_tokens, eos_id: None, seed };
            let owners: Vec<&Prompt> = chunk.iter().flat_map(|p| std::iter::repeat_n(p, rs.k)).collect();
            let (samples, _, scores) = scored_answers(&sampler, &batch, &owners, &tokenizer, &scorers, &sampling)?;
            // The policy's own greedy answer competes too: the kept answer is never worse than
            // what the policy already says, so fine-tuning on the pool cannot teach it a worse one.
            let greedy = if rs.include_greedy {
                let refs: Vec<&Prompt> = chunk.iter().collect();
                let (tokens, _, scores) = greedy_answers(&sampler, &ids, &refs, &tokenizer, &scorers, rs.max_new_tokens)?;
                Some((tokens, scores))
            } else {
                None
            };
            for (j, _) in chunk.iter().enumerate() {
                let global = chunk_i * (64 / rs.k).max(1) + j;
                let rewards: Vec<f64> = (0..rs.k).map(|s| logit(scores[j * rs.k + s].combined)).collect();
                let mut running = f64::NEG_INFINITY;
                for (k, r) in rewards.iter().enumerate() {
                    running = running.max(*r);
                    best_of_k[k] += running;
                    mean_all += r;
                    n_all += 1;
                }
                let (best_s, mut best_r) = rewards.iter().enumerate().fold((0, f64::NEG_INFINITY), |acc, (s, r)| if *r > acc.1 { (s, *r) } else { acc });
                let mut answer = samples[j * rs.k + best_s].clone();
                if let Some((tokens, scores)) = &greedy {
                    let r = logit(scores[j].combined);
                    greedy_sum += r;
                    if r > best_r {
                        (best_r, answer) = (r, tokens[j].clone());
                    }
                }
                if pool[global].as_ref().is_none_or(|(r, _)| best_r > *r) {
                    pool[global] = Some((best_r, answer));
                }
            }
        }
        let n = prompts.len() as f64;
        for (k, v) in best_of_k.iter().enumerate() {
            metrics.scalars(k as u64 + 1, &[(&format!("rs/round{round}/reward_best_of_k") as &str, v / n)])?;
        }
        let pool_mean = pool.iter().flatten().map(|(r, _)| r).sum::<f64>() / n;
        metrics.scalars(round as u64, &[("rs/sample_mean_reward", mean_all / n_all.max(1) as f64), ("rs/max_reward", best_of_k[rs.k - 1] / n), ("rs/pool_mean_reward", pool_mean)])?;
        if rs.include_greedy {
            metrics.scalars(round as u64, &[("rs/greedy_mean_reward", greedy_sum / n)])?;
        }
        metrics.println(&format!(
            "round {round}: mean sample reward {:.3}, best of {} {:.3}, pool {:.3}",
            mean_all / n_all.max(1) as f64,
            rs.k,
            best_of_k[rs.k - 1] / n,
            pool_mean
        ));
        // The pool as text, decoded once: written as data (pool-round-N.jsonl, what this round
        // fine-tunes on), counted for the expected text, then fine-tuned on.
        let kept: Vec<(&Prompt, f64, String)> = prompts
            .iter()
            .zip(&pool)
            .filter_map(|(p, best)| best.as_ref().map(|(r, tokens)| tokenizer.decode(tokens).map(|text| (p, *r, text))))
            .collect::<Result<_, _>>()?;
        let mut rows = String::new();
        for (p, r, text) in &kept {
            let mut row = serde_json::json!({ "prompt": p.question(), "answer": text, "reward": r, "is_safety": p.is_safety });
            if let Some(hit) = p.answer_is_expected(text) {
                row["expected"] = p.expected.clone().into();
                row["contains_expected"] = hit.into();
            }
            rows.push_str(&row.to_string());
            rows.push('\n');
        }
        llama_io::write_atomic(&out.join(format!("pool-round-{round}.jsonl")), rows.as_bytes())?;
        let answers: Vec<String> = kept.iter().map(|(_, _, text)| text.clone()).collect();
        if let Some(e) = expected_rate(kept.iter().map(|(p, _, _)| *p), &answers) {
            metrics.scalars(round as u64, &[("rs/pool_expected", e)])?;
        }
        // Fine-tune on the pool with the SFT objective.
        let chats: Vec<(Vec<u32>, Vec<bool>)> = kept
            .into_iter()
            .map(|(p, _, text)| {
                let mut c = p.conversation.clone();
                c.messages.push(Message::new(Role::Assistant, text));
                c.tokenize(&tokenizer)
            })
            .collect::<Result<_, _>>()?;
        let (packed, _) = pack(&chats, rs.seq_len, tokenizer.eos_id(), Overlong::Truncate);
        let packed_len = packed.len();
        let round_dir = out.join(format!("round-{round}"));
        let mut objective = llama_sft::Sft {
            train: packed,
            eval: vec![],
            eval_chats: vec![],
            tokenizer: tokenizer.clone(),
            separate: true,
            sampler: llama_trainer::EpochSampler::new(packed_len, u64::MAX, round as u64),
            device: train_device.clone(),
            eval_cfg: llama_sft::SftEval { success_samples: 0, text_samples: 0, max_new_tokens: 1 },
            micro_batch: rs.batch_size,
        };
        let train = TrainConfig {
            max_steps: Some(rs.sft_steps),
            batch_size: rs.batch_size,
            micro_batch_size: rs.batch_size,
            log_every: 10,
            eval_every: u64::MAX,
            checkpoint_every: u64::MAX,
            keep_checkpoints: 1,
            recompute: cfg.memory.recompute,
            logits_chunk: cfg.memory.logits_chunk,
            ..TrainConfig::default()
        };
        let schedule = ScheduleConfig { kind: ScheduleKind::Cosine, warmup_steps: 0, min_lr_ratio: 0.0, ..ScheduleConfig::default() };
        let loop_config = LoopConfig {
            schedule: Schedule::new(&schedule, rs.lr, rs.sft_steps),
            total_steps: rs.sft_steps,
            stop_after: None,
            resume: false,
            flops_per_token: policy_config.train_flops_per_token(rs.seq_len),
            model_config: llama_trainer::model_config_toml(&policy_config)?,
            eval_at_start: false,
            train,
            run: RunConfig { out_dir: round_dir.clone(), ..cfg.run.clone() },
            optim: OptimConfig { lr: rs.lr, ..OptimConfig::default() },
            precision: llama_trainer::Precision::F32,
            devices: vec![],
        };
        if round_dir.exists() {
            std::fs::remove_dir_all(&round_dir)?;
        }
        let (tuned, _) = llama_trainer::train(policy, &mut objective, &loop_config)?;
        policy = tuned;
        let held_out = evaluate(&policy, &reference, &eval_prompts, &tokenizer, &scorers, rs.max_new_tokens, &cfg.eval)?;
        let (r, kl) = (held_out.reward, held_out.kl);
        metrics.scalars(round as u64, &held_out.scalars("rs"))?;
        metrics.text(round as u64, "rs/samples", &samples_text(&held_out.samples, 6))?;
        metrics.println(&format!(
            "round {round}: held-out reward {r:.3} (start {r0:.3}), mean Rc {:.3} (start {:.3}), KL to the SFT policy {kl:.3}",
            held_out.combined, start.combined
        ));
        if !rs.keep_best_round || r > best.0 {
            best = (r, Some(round_dir));
        }
    }
    if rs.keep_best_round {
        match &best.1 {
            Some(dir) => metrics.println(&format!("rejection sampling: keeping {} (held-out reward {:.3})", dir.display(), best.0)),
            None => metrics.println(&format!("rejection sampling: no round beat the starting policy ({r0:.3}); PPO starts from it")),
        }
    }
    Ok(best.1)
}

/// PPO from `start` (the SFT or rejection-sampling policy); resumable.
pub fn ppo(cfg: &RlhfConfig, start: &Path, resume: bool, stop_after: Option<u64>, origin: &str) -> anyhow::Result<(f64, f64)> {
    let p = &cfg.ppo;
    let tokenizer = Tokenizer::from_file(&cfg.data.tokenizer)?;
    let device = llama_model::device::parse(&cfg.run.device)?;
    device.seed(p.seed);
    let train_device = device.clone().autodiff();
    let (policy_config, policy) = init_model(start, &train_device).with_context(|| format!("{origin}: policy"))?;
    let scorers = load_scorers(cfg, &policy_config, &tokenizer, &device, origin)?;
    let prompts = load_prompts_for(&cfg.data.prompts, &tokenizer, p.max_new_tokens, policy_config.max_seq_len)?;
    let eval_prompts = load_prompts_for(&cfg.data.eval_prompts, &tokenizer, p.max_new_tokens, policy_config.max_seq_len)?;
    // The value model starts from the helpfulness reward model (trainable copy).
    let (_, value) = load_reward_model(&cfg.helpfulness_model, &train_device)?;
    let opt = OptimConfig { lr: p.lr, weight_decay: p.weight_decay, grad_clip: p.grad_clip, ..OptimConfig::default() };
    let reference = policy.valid();
    let mut state = PpoState {
        policy,
        value,
        reference,
        policy_optim: Optimizer::new(&opt),
        value_optim: Optimizer::new(&opt),
        whitener: Whitener::default(),
        iteration: 0,
        cursor: 0,
        best_eval: None,
        evals_without_gain: 0,
    };
    let model_config = llama_trainer::model_config_toml(&policy_config)?;
    let out = cfg.run.out_dir.join("ppo");
    let _lock = llama_trainer::checkpoint::RunLock::acquire(&out)?;
    let checkpoints = Checkpoints::new(&out);
    checkpoints.remove_leftovers()?;
    match (resume, checkpoints.latest()) {
        (true, Some((_, dir))) => {
            let saved: PpoSaved = serde_json::from_str(&std::fs::read_to_string(dir.join("ppo_state.json"))?)?;
            if saved.model_config != model_config {
                bail!("{}: this PPO checkpoint was written for another policy config", dir.display());
            }
            llama_model::checkpoint::load_weights(&mut state.policy, &dir.join("policy.bpk"))?;
            llama_model::checkpoint::load_weights(&mut state.value, &dir.join("value.bpk"))?;
            state.policy_optim = state.policy_optim.clone().load(&dir.join("policy_optimizer.bpk"))?;
            state.value_optim = state.value_optim.clone().load(&dir.join("value_optimizer.bpk"))?;
            state.whitener = saved.whitener;
            state.iteration = saved.iteration;
            state.cursor = saved.cursor;
            state.best_eval = saved.best_eval;
            state.evals_without_gain = saved.evals_without_gain;
            println!("resumed PPO from {} (iteration {})", dir.display(), state.iteration);
        }
        (false, Some((step, _))) => bail!("{} already holds PPO checkpoints (iteration {step}); pass --resume or choose another --out", out.display()),
        _ => {}
    }
    let mut metrics = Metrics::open(&out, p.iterations, state.iteration)?;
    let save = |state: &PpoState| -> anyhow::Result<PathBuf> {
        let saved = PpoSaved {
            iteration: state.iteration,
            cursor: state.cursor,
            whitener: state.whitener.clone(),
            best_eval: state.best_eval,
            evals_without_gain: state.evals_without_gain,
            model_config: model_config.clone(),
        };
        checkpoints.save(state.iteration, 2, llama_trainer::distributed::World::single(), |dir, written| {
            llama_model::checkpoint::save_weights(&state.policy, &dir.join("policy.bpk"))?;
            written("policy.bpk")?;
            llama_model::checkpoint::save_weights(&state.value, &dir.join("value.bpk"))?;
            state.policy_optim.save(&dir.join("policy_optimizer.bpk"))?;
            state.value_optim.save(&dir.join("value_optimizer.bpk"))?;
            // The policy alone, loadable as a model: config.toml + model.bpk.
            llama_model::checkpoint::save_weights(&state.policy, &dir.join("model.bpk"))?;
            std::fs::write(dir.join(llama_model::checkpoint::NATIVE_CONFIG), &saved.model_config)?;
            std::fs::write(dir.join("ppo_state.json"), serde_json::to_string_pretty(&saved)?)?;
            written("ppo_state.json")
        })
    };
    if state.iteration == 0 {
        save_best(&state.policy, &model_config, &out)?;
        let held_out = evaluate(&state.policy, &state.reference, &eval_prompts, &tokenizer, &scorers, p.max_new_tokens, &cfg.eval)?;
        let r = held_out.reward;
        metrics.scalars(0, &held_out.scalars("ppo"))?;
        metrics.text(0, "ppo/samples", &samples_text(&held_out.samples, 6))?;
        metrics.println(&format!("PPO: held-out reward of the starting policy {r:.3} (mean Rc {:.3})", held_out.combined));
        state.best_eval = Some(r);
    }
    let mut stopped_early = false;
    while state.iteration < p.iterations {
        let batch: Vec<&Prompt> = (0..p.batch_size).map(|i| &prompts[(state.cursor + i) % prompts.len()]).collect();
        state.cursor = (state.cursor + p.batch_size) % prompts.len();
        let seed = p.seed.wrapping_mul(1_000_003).wrapping_add(state.iteration);
        let ro = rollout(&mut state, &batch, &tokenizer, &scorers, p, seed)?;
        let train_policy = state.iteration >= p.value_warmup;
        let mut stats = vec![];
        let order: Vec<usize> = (0..batch.len()).collect();
        for mb in order.chunks(p.minibatch_size) {
            stats.push(ppo_step(&mut state, &ro, mb, p, scorers.pad, train_policy, cfg.memory.memory_saving()));
        }
        state.iteration += 1;
        kill_point("update", state.iteration);
        let n = ro.scores.len() as f64;
        let mean = |f: &dyn Fn(&StepStats) -> f64| stats.iter().map(f).sum::<f64>() / stats.len() as f64;
        let mut values = vec![
            ("ppo/reward_combined", ro.scores.iter().map(|s| logit(s.combined)).sum::<f64>() / n),
            ("ppo/reward_helpfulness", ro.scores.iter().map(|s| s.helpfulness).sum::<f64>() / n),
            ("ppo/reward_safety", ro.scores.iter().map(|s| s.safety).sum::<f64>() / n),
            ("ppo/reward_whitened", ro.whitened.iter().sum::<f64>() / n),
            ("ppo/kl_k1", ro.kl.iter().sum::<f64>() / n),
            ("ppo/clip_fraction", mean(&|s| s.clip_fraction)),
            ("ppo/approx_kl", mean(&|s| s.approx_kl)),
            ("ppo/policy_loss", mean(&|s| s.policy_loss)),
            ("ppo/value_loss", mean(&|s| s.value_loss)),
            ("ppo/entropy", mean(&|s| s.entropy)),
            ("ppo/response_length", ro.logp.iter().map(|l| l.len() as f64).sum::<f64>() / n),
        ];
        if !train_policy {
            // The value warm-up: no policy step, so no policy-step statistics.
            values.retain(|(k, _)| !matches!(*k, "ppo/clip_fraction" | "ppo/approx_kl" | "ppo/policy_loss" | "ppo/entropy"));
        }
        metrics.scalars(state.iteration, &values)?;
        let value_of = |key: &str| values.iter().find(|(k, _)| *k == key).map_or(f64::NAN, |(_, v)| *v);
        metrics.progress(state.iteration, p.iterations, &format!("reward {:.3} | kl {:.3}", value_of("ppo/reward_combined"), value_of("ppo/kl_k1")));
        kill_point("logged", state.iteration);
        // While the policy is frozen its held-out reward is the start's: nothing to evaluate.
        if state.iteration > p.value_warmup && (state.iteration % p.eval_every == 0 || state.iteration == p.iterations) {
            let held_out = evaluate(&state.policy, &state.reference, &eval_prompts, &tokenizer, &scorers, p.max_new_tokens, &cfg.eval)?;
            let (r, kl) = (held_out.reward, held_out.kl);
            metrics.scalars(state.iteration, &held_out.scalars("ppo"))?;
            metrics.text(state.iteration, "ppo/samples", &samples_text(&held_out.samples, 6))?;
            metrics.println(&format!("iteration {}: held-out reward {r:.3}, mean Rc {:.3}, KL {kl:.3}", state.iteration, held_out.combined));
            if state.best_eval.is_none_or(|b| r > b) {
                state.best_eval = Some(r);
                state.evals_without_gain = 0;
                save_best(&state.policy, &model_config, &out)?;
            } else {
                state.evals_without_gain += 1;
            }
            if p.patience > 0 && state.evals_without_gain >= p.patience {
                metrics.println(&format!("early stop: no held-out gain in {} evaluations", p.patience));
                stopped_early = true;
            }
        }
        let stop_now = stop_after == Some(state.iteration);
        if state.iteration % p.checkpoint_every == 0 || state.iteration == p.iterations || stop_now || stopped_early {
            save(&state)?;
        }
        if stop_now || stopped_early {
            break;
        }
    }
    metrics.finish();
    // The result of PPO is the best policy on the held-out prompts (early stopping).
    let (_, best) = init_model(&out.join("best"), &device)?;
    let HeldOut { reward: r, kl, .. } = evaluate(&best, &state.reference, &eval_prompts, &tokenizer, &scorers, p.max_new_tokens, &cfg.eval)?;
    println!("best PPO policy (held-out reward {:.3}) in {}", state.best_eval.unwrap_or(r), out.join("best").display());
    Ok((r, kl))
}

/// Early stopping keeps the policy with the best held-out reward in `OUT/ppo/best` (a model
/// directory: config.toml + model.bpk), written atomically.
fn save_best(policy: &Llama, model_config: &str, out: &Path) -> anyhow::Result<()> {
    llama_io::write_dir_atomic(&out.join("best"), |tmp| -> anyhow::Result<()> {
        llama_model::checkpoint::save_weights(policy, &tmp.join("model.bpk"))?;
        std::fs::write(tmp.join(llama_model::checkpoint::NATIVE_CONFIG), model_config)?;
        Ok(())
    })
}

/// The whole `rlhf --config` run: rejection sampling (if rounds > 0), then PPO (if iterations > 0).
pub fn run(config_path: &Path, out: Option<PathBuf>, resume: bool, stop_after: Option<u64>, skip_rs: bool) -> anyhow::Result<()> {
    run_with(config_path, &Paths { out, ..Paths::default() }, resume, stop_after, skip_rs)
}

/// Command-line replacements of the config's paths.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    pub out: Option<PathBuf>,
    pub policy: Option<PathBuf>,
    pub helpfulness_model: Option<PathBuf>,
    pub safety_model: Option<PathBuf>,
}

/// [`run`] with any of the config's paths replaced.
pub fn run_with(config_path: &Path, paths: &Paths, resume: bool, stop_after: Option<u64>, skip_rs: bool) -> anyhow::Result<()> {
    let mut cfg: RlhfConfig = load_toml(config_path)?;
    if let Some(o) = &paths.out {
        cfg.run.out_dir = o.clone();
    }
    if let Some(p) = &paths.policy {
        cfg.policy = p.clone();
    }
    if let Some(p) = &paths.helpfulness_model {
        cfg.helpfulness_model = p.clone();
    }
    if let Some(p) = &paths.safety_model {
        cfg.safety_model = p.clone();
    }
    let origin = config_path.display().to_string();
    validate(&cfg, &origin)?;
    load_prompts(&cfg.data.prompts)?;
    load_prompts(&cfg.data.eval_prompts)?;
    let rs_dir = if skip_rs { None } else { rejection_sampling(&cfg, &origin)? };
    if cfg.ppo.iterations > 0 {
        let existing_rs = cfg.run.out_dir.join("rejection-sampling").join(format!("round-{}", cfg.rejection_sampling.rounds));
        let start = match (cfg.ppo.from_rejection_sampling, rs_dir) {
            (true, Some(dir)) => dir,
            (true, None) if skip_rs && existing_rs.join("checkpoints").is_dir() => existing_rs,
            _ => cfg.policy.clone(),
        };
        let (r, kl) = ppo(&cfg, &start, resume, stop_after, &origin)?;
        println!("PPO done: held-out reward {r:.3}, KL to the starting policy {kl:.3}");
    }
    Ok(())
}
