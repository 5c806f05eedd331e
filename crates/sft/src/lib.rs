//! Supervised fine-tuning: chats rendered with the Llama 2 template, packed, loss on answer
//! tokens only; evaluation by held-out loss, a success rate (answers that contain the expected
//! fact) and sample answers. Also Ghost Attention data generation.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::module::Module;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use llama_data::Tokenizer;
use llama_data::chat::{ChatTemplateChoice, Conversation, Message, Overlong, PackStats, Packed, Role, load_conversations, load_training_conversations, pack};
use llama_data::sampler::{EpochCursor, EpochSampler};
use llama_model::Llama;
use llama_model::generate::{SamplingConfig, generate};
use llama_trainer::config::{OptimConfig, RunConfig, ScheduleConfig, ScheduleKind, TrainConfig, load_toml};
use llama_trainer::{LoopConfig, Metrics, Objective, Stage, Summary};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use serde::Deserialize;

/// A fine-tuning run, as one TOML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// What to start from: a pretrain run directory, a checkpoint, a native or HF directory.
    pub init: PathBuf,
    pub data: SftData,
    #[serde(default = "sft_optim")]
    pub optim: OptimConfig,
    #[serde(default = "sft_schedule")]
    pub schedule: ScheduleConfig,
    #[serde(default = "sft_train")]
    pub train: TrainConfig,
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub eval: SftEval,
}

/// Llama 2 SFT: initial LR 2e-5, weight decay 0.1 (the paper's); cosine.
pub fn sft_optim() -> OptimConfig {
    OptimConfig { lr: 2e-5, ..OptimConfig::default() }
}
/// Cosine decay; the paper gives no warmup or floor for SFT: none by default, to 0.
pub fn sft_schedule() -> ScheduleConfig {
    ScheduleConfig { kind: ScheduleKind::Cosine, warmup_steps: 0, min_lr_ratio: 0.0, ..ScheduleConfig::default() }
}
/// 64 sequences per step (the paper's batch); the step count comes from `data.epochs`.
pub fn sft_train() -> TrainConfig {
    TrainConfig { batch_size: 64, micro_batch_size: 4, eval_every: 200, checkpoint_every: 200, ..TrainConfig::default() }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftData {
    /// Training chats: `.jsonl` or `.parquet` (`messages`, or `prompt`/`response`); one file or a
    /// list of files, read in order and shuffled together.
    pub train: TrainFiles,
    /// Held-out chats; those with an `expected` field also score the success rate.
    #[serde(default)]
    pub eval: Option<PathBuf>,
    pub tokenizer: PathBuf,
    pub seq_len: usize,
    /// Passes over the training chats (the paper: 2).
    #[serde(default = "paper_sft_epochs")]
    pub epochs: u64,
    /// What to do with a chat longer than seq_len + 1 tokens: truncate or skip (both counted).
    #[serde(default = "truncate")]
    pub overlong: Overlong,
    /// Keep packed chats from attending to each other (block-diagonal causal mask).
    #[serde(default)]
    pub separate_packed: bool,
    /// `llama2` (Llama 2's template, the default) or `tokenizer` (the chat_template of the
    /// tokenizer_config.json beside data.tokenizer, for a model that brings its own).
    #[serde(default)]
    pub chat_template: ChatTemplateChoice,
}

/// `data.train`: one path or a list of paths.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TrainFiles {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl TrainFiles {
    pub fn paths(&self) -> &[PathBuf] {
        match self {
            Self::One(p) => std::slice::from_ref(p),
            Self::Many(v) => v,
        }
    }

    /// The files, for messages: `a.jsonl` or `a.jsonl, b.jsonl`.
    pub fn display(&self) -> String {
        self.paths().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    }
}

fn paper_sft_epochs() -> u64 {
    2
}
fn truncate() -> Overlong {
    Overlong::Truncate
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftEval {
    /// Held-out chats answered (greedy) at each evaluation for the success rate.
    pub success_samples: usize,
    /// Answers logged as text at each evaluation.
    pub text_samples: usize,
    pub max_new_tokens: usize,
}

impl Default for SftEval {
    fn default() -> Self {
        Self { success_samples: 100, text_samples: 4, max_new_tokens: 24 }
    }
}

/// Reads and validates an SFT config; errors name the file and key.
pub fn load_config(path: &Path) -> anyhow::Result<SftConfig> {
    let cfg: SftConfig = load_toml(path)?;
    let origin = path.display();
    for check in [cfg.optim.validate(), cfg.schedule.validate(), cfg.run.validate()] {
        check.map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    }
    cfg.train.validate_epoch_stage().map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    if cfg.data.seq_len == 0 {
        bail!("{origin}: data.seq_len must be > 0");
    }
    if cfg.data.epochs == 0 {
        bail!("{origin}: data.epochs must be > 0");
    }
    if cfg.data.train.paths().is_empty() {
        bail!("{origin}: data.train is an empty list (give a chat file, or a list of them)");
    }
    Ok(cfg)
}

/// Renders and tokenizes chats; returns (ids, answer mask) per chat. With `truncate_at` (the
/// window length, under `overlong = "truncate"`), a chat longer than any window could hold is cut
/// first ([`Conversation::cut_for`]): its first `truncate_at` tokens are the same, and a huge
/// chat costs no more than a window's worth of tokenizing.
pub fn tokenize_all(chats: &[Conversation], tokenizer: &Tokenizer, truncate_at: Option<usize>) -> anyhow::Result<Vec<(Vec<u32>, Vec<bool>)>> {
    let max_token_bytes = tokenizer.max_token_bytes();
    chats
        .iter()
        .map(|c| {
            let cut = truncate_at.and_then(|n| c.cut_for(n, max_token_bytes));
            Ok(cut.as_ref().unwrap_or(c).tokenize(tokenizer)?)
        })
        .collect()
}

/// Inputs, targets, loss mask and (optionally) the packed-chat attention mask of sequences.
///
/// # Shapes
/// - inputs `[batch, seq]`, targets `[batch * seq, 1]`, mask `[batch * seq]`,
///   attention `[batch, seq, seq]` (`true` hides a key)
pub fn batch_tensors(seqs: &[Packed], separate: bool, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>, Tensor<1>, Option<Tensor<3, Bool>>) {
    let (b, t) = (seqs.len(), seqs[0].ids.len() - 1);
    let inputs: Vec<i64> = seqs.iter().flat_map(|s| s.ids[..t].iter().map(|&x| x as i64)).collect();
    let targets: Vec<i64> = seqs.iter().flat_map(|s| s.ids[1..].iter().map(|&x| x as i64)).collect();
    let mask: Vec<f32> = seqs.iter().flat_map(|s| s.loss_mask.iter().map(|&m| if m { 1.0 } else { 0.0 })).collect();
    let attention = separate.then(|| {
        let data: Vec<bool> = seqs
            .iter()
            .flat_map(|s| {
                let seg = &s.segment[..t];
                seg.iter().flat_map(move |q| seg.iter().map(move |k| q != k))
            })
            .collect();
        Tensor::<3, Bool>::from_data(TensorData::new(data, [b, t, t]), device)
    });
    (
        Tensor::from_data(TensorData::new(inputs, [b, t]), device),
        Tensor::from_data(TensorData::new(targets, [b * t, 1]), device),
        Tensor::from_data(TensorData::new(mask, [b * t]), device),
        attention,
    )
}

/// Summed cross-entropy over answer tokens only: masked positions contribute exactly zero.
pub fn masked_loss_sum(model: &Llama, seqs: &[Packed], separate: bool, device: &Device) -> Tensor<1> {
    let (inputs, targets, mask, attention) = batch_tensors(seqs, separate, device);
    masked_nll_sum(model, inputs, targets, mask, attention)
}

/// `sum(mask * -log p(target))` over all positions.
///
/// # Shapes
/// - inputs `[batch, seq]`, targets `[batch * seq, 1]`, mask `[batch * seq]`,
///   attention `[batch, seq, seq]`
pub fn masked_nll_sum(model: &Llama, inputs: Tensor<2, Int>, targets: Tensor<2, Int>, mask: Tensor<1>, attention: Option<Tensor<3, Bool>>) -> Tensor<1> {
    let [b, t] = inputs.dims();
    let nll = model.token_nll(model.forward_hidden(inputs, attention), targets.reshape([b * t]));
    (nll * mask).sum()
}

/// The SFT objective.
pub struct Sft {
    pub train: Vec<Packed>,
    pub eval: Vec<Packed>,
    pub eval_chats: Vec<(Conversation, Option<String>)>,
    pub tokenizer: Tokenizer,
    pub separate: bool,
    /// Epochs over `train`, shuffled per epoch.
    pub sampler: EpochSampler,
    pub device: Device,
    pub eval_cfg: SftEval,
    pub micro_batch: usize,
}

impl Sft {
    /// Mean answer-token loss on the held-out chats (no autodiff).
    pub fn eval_loss(&self, model: &Llama) -> Option<f64> {
        if self.eval.is_empty() {
            return None;
        }
        let model = model.valid();
        let device = model.tok_embeddings.weight.device();
        let (mut sum, mut n) = (0.0, 0usize);
        for chunk in self.eval.chunks(self.micro_batch.max(1)) {
            sum += masked_loss_sum(&model, chunk, self.separate, &device).into_scalar::<f32>() as f64;
            n += chunk.iter().map(|p| p.loss_mask.iter().filter(|&&m| m).count()).sum::<usize>();
        }
        (n > 0).then(|| sum / n as f64)
    }

    /// Greedy answers to held-out chats; the share that contains the expected fact.
    pub fn success(&self, model: &Llama, limit: usize) -> anyhow::Result<(Option<f64>, Vec<(String, String)>)> {
        let model = model.valid();
        let chats: Vec<&(Conversation, Option<String>)> = self.eval_chats.iter().take(limit).collect();
        if chats.is_empty() {
            return Ok((None, vec![]));
        }
        let mut answers = vec![];
        let mut hits = (0usize, 0usize);
        for group in chats.chunks(16) {
            let prompts: Vec<Vec<u32>> = group.iter().map(|(c, _)| c.prompt_ids(&self.tokenizer)).collect::<Result<_, _>>()?;
            let sampling = SamplingConfig { eos_id: Some(self.tokenizer.eos_id()), ..SamplingConfig::greedy(self.eval_cfg.max_new_tokens) };
            let out = generate(&model, &prompts, &sampling)?;
            for ((c, expected), tokens) in group.iter().zip(&out.tokens) {
                let answer = self.tokenizer.decode(tokens)?;
                if let Some(e) = expected {
                    hits.1 += 1;
                    hits.0 += usize::from(answer.contains(e.as_str()));
                }
                let question = c.exchanges().last().map(|(u, _)| u.content.clone()).unwrap_or_default();
                answers.push((question, answer));
            }
        }
        Ok(((hits.1 > 0).then(|| hits.0 as f64 / hits.1 as f64), answers))
    }
}

impl Objective<Llama> for Sft {
    type Batch = Vec<Packed>;

    fn next_batch(&mut self, size: usize) -> anyhow::Result<Option<Vec<Packed>>> {
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            match self.sampler.next_index() {
                Some(i) => out.push(self.train[i].clone()),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    fn weight(&self, batch: &Vec<Packed>) -> f64 {
        batch.iter().map(|p| p.loss_mask.iter().filter(|&&m| m).count()).sum::<usize>() as f64
    }

    fn tokens(&self, batch: &Vec<Packed>) -> usize {
        batch.iter().map(|p| p.ids.len() - 1).sum()
    }

    fn loss_sum(&self, model: &Llama, batch: &Vec<Packed>) -> Tensor<1> {
        masked_loss_sum(model, batch, self.separate, &model.device())
    }

    fn evaluate(&mut self, model: &Llama, step: u64, metrics: &mut Metrics) -> anyhow::Result<()> {
        let mut values = vec![];
        if let Some(loss) = self.eval_loss(model) {
            values.push(("eval/loss", loss));
        }
        let (rate, answers) = self.success(model, self.eval_cfg.success_samples)?;
        if let Some(r) = rate {
            values.push(("eval/success_rate", r));
        }
        if !values.is_empty() {
            metrics.scalars(step, &values)?;
            let shown: Vec<String> = values.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            metrics.println(&format!("step {step}: {}", shown.join(" | ")));
        }
        let text: String = answers.iter().take(self.eval_cfg.text_samples).map(|(q, a)| format!("**{q}**\n\n{a}\n\n")).collect();
        if !text.is_empty() {
            metrics.text(step, "samples", &text)?;
        }
        Ok(())
    }

    fn data_state(&self) -> serde_json::Value {
        serde_json::to_value(self.sampler.cursor()).expect("cursor serialises")
    }

    fn restore_data_state(&mut self, state: &serde_json::Value) -> anyhow::Result<()> {
        let cursor: EpochCursor = serde_json::from_value(state.clone()).context("checkpoint state has no valid SFT cursor")?;
        self.sampler.restore(cursor)
    }
}

fn expected_of(path: &Path) -> anyhow::Result<Vec<Option<String>>> {
    if path.extension().is_some_and(|e| e == "parquet") {
        return Ok(vec![]);
    }
    let expected = |line: llama_io::JsonLine| line.value.get("expected").and_then(|e| e.as_str()).map(String::from);
    Ok(llama_io::read_jsonl(path)?.map(|line| line.map(expected)).collect::<std::io::Result<_>>()?)
}

fn report(what: &str, stats: &PackStats) {
    llama_trainer::distributed::world().say(format_args!(
        "{what}: {} chats -> {} sequences, {} answer tokens{}{}",
        stats.conversations,
        stats.sequences,
        stats.loss_tokens,
        if stats.truncated > 0 { format!(", {} truncated (longer than the sequence)", stats.truncated) } else { String::new() },
        if stats.skipped > 0 { format!(", {} skipped (longer than the sequence)", stats.skipped) } else { String::new() },
    ));
}

/// Command-line overrides (the trainer's, shared by every stage).
pub use llama_trainer::Overrides;

/// Everything `sft` does after parsing its arguments.
pub fn run(config_path: &Path, overrides: &Overrides) -> anyhow::Result<Summary> {
    let mut cfg = load_config(config_path)?;
    overrides.apply(&mut cfg.run, &mut cfg.train);
    if let Some(i) = &overrides.init {
        cfg.init = i.clone();
    }
    let origin = config_path.display().to_string();
    // Everything that can refuse the run comes before the data and the weights are read.
    let stage = Stage::open(&origin, &cfg.init)?;
    let tokenizer =
        Tokenizer::from_file(&cfg.data.tokenizer)?.with_chat_template(cfg.data.chat_template).with_context(|| format!("{origin}: data.chat_template"))?;
    stage.check_tokenizer(tokenizer.vocab_size())?;
    stage.check_seq_len("data.seq_len", cfg.data.seq_len)?;
    stage.check_launch(&cfg.run, &cfg.train, cfg.data.seq_len)?;
    let mut chats = vec![];
    for path in cfg.data.train.paths() {
        chats.extend(load_training_conversations(path)?);
    }
    if chats.is_empty() {
        bail!("{}: no conversations", cfg.data.train.display());
    }
    // Pads are masked out of the loss (and of attention when separate_packed); EOS is a harmless id.
    let pad = tokenizer.eos_id();
    let truncate_at = (cfg.data.overlong == Overlong::Truncate).then_some(cfg.data.seq_len + 1);
    let (train, stats) = pack(&tokenize_all(&chats, &tokenizer, truncate_at)?, cfg.data.seq_len, pad, cfg.data.overlong);
    report("train", &stats);
    if train.is_empty() || stats.loss_tokens == 0 {
        bail!("{}: no trainable answer tokens after packing", cfg.data.train.display());
    }
    let (eval, eval_chats) = match &cfg.data.eval {
        Some(path) => {
            let chats = load_conversations(path)?;
            let (eval, stats) = pack(&tokenize_all(&chats, &tokenizer, truncate_at)?, cfg.data.seq_len, pad, cfg.data.overlong);
            report("eval", &stats);
            let mut expected = expected_of(path)?;
            expected.resize(chats.len(), None);
            (eval, chats.into_iter().zip(expected).collect())
        }
        None => (vec![], vec![]),
    };
    let total_steps = overrides.epoch_stage_steps(&cfg.train, train.len(), cfg.data.epochs);
    cfg.train.max_steps = Some(total_steps);
    let loop_config =
        LoopConfig::new(cfg.train.clone(), cfg.run.clone(), cfg.optim, &cfg.schedule, total_steps, &stage.model_config, cfg.data.seq_len, overrides, true)?
            .with_tokenizer(&cfg.data.tokenizer);
    let (train_device, model) = stage.load_model(&cfg.run, cfg.train.seed)?;
    let world = llama_trainer::distributed::world();
    world.say(format_args!(
        "sft: {} parameters from {} | {} steps of {} sequences x {} tokens | out {}",
        stage.model_config.num_params(),
        cfg.init.display(),
        total_steps,
        cfg.train.batch_size,
        cfg.data.seq_len,
        cfg.run.out_dir.display()
    ));
    let mut objective = Sft {
        // In an MPI job each rank takes every `world`-th draw.
        sampler: EpochSampler::new(train.len(), cfg.data.epochs, cfg.train.seed).for_rank(world.rank(), world.size()),
        train,
        eval,
        eval_chats,
        tokenizer,
        separate: cfg.data.separate_packed,
        device: train_device,
        eval_cfg: cfg.eval,
        micro_batch: cfg.train.micro_batch_size,
    };
    let (_, summary) = llama_trainer::train(model, &mut objective, &loop_config)?;
    if let Some(dir) = &summary.checkpoint {
        world.say(format_args!("done: {} steps; checkpoint {}", summary.steps, dir.display()));
    }
    Ok(summary)
}

/// Ghost Attention data (Touvron et al. 2023, section 3.3): for each multi-turn dialogue, one
/// instruction (drawn with `seed`) is attached to the first user turn only, and every assistant
/// turn but the last is marked `"train": false`, so the loss falls on the last answer alone.
///
/// The paper samples the answers from the current chat model with the instruction attached to
/// every user turn; here the dialogue's own answers are used as given (generate them with the
/// instruction first if they do not follow it).
pub fn ghost_attention(dialogues: &[Conversation], instructions: &[String], seed: u64) -> anyhow::Result<Vec<Conversation>> {
    if instructions.is_empty() {
        bail!("no instructions given");
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = vec![];
    for d in dialogues {
        let instruction = instructions.choose(&mut rng).expect("non-empty");
        let mut messages: Vec<Message> = vec![];
        let assistants = d.messages.iter().filter(|m| m.role == Role::Assistant).count();
        let mut seen_user = false;
        let mut seen_assistant = 0;
        for m in &d.messages {
            let mut m = m.clone();
            match m.role {
                Role::User if !seen_user => {
                    m.content = format!("{instruction} {}", m.content);
                    seen_user = true;
                }
                Role::Assistant => {
                    seen_assistant += 1;
                    m.train = seen_assistant == assistants;
                }
                _ => {}
            }
            messages.push(m);
        }
        out.push(Conversation { messages });
    }
    Ok(out)
}
