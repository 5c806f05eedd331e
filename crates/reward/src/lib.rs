//! Reward models (helpfulness and safety): the Llama trunk with a scalar head read at the last
//! real token, trained with the margin ranking loss
//! `-log(sigmoid(r(x, y_chosen) - r(x, y_rejected) - m(rating)))`.
//!
//! Also the library API the rlhf stage calls ([`RewardModel::score`], [`load_reward_model`]).

pub mod scoring;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::module::Module;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use llama_data::Tokenizer;
use llama_data::chat::{Conversation, Message, Role};
use llama_data::sampler::{EpochCursor, EpochSampler};
use llama_model::{Llama, LlamaConfig};
use llama_trainer::checkpoint::MODEL_FILE;
use llama_trainer::config::{OptimConfig, RunConfig, ScheduleConfig, ScheduleKind, TrainConfig, load_toml};
use llama_trainer::{LoopConfig, Metrics, Objective, Stage, Summary};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};

/// The Llama trunk (its output projection dropped) and a scalar head.
#[derive(Module, Debug)]
pub struct RewardModel {
    pub trunk: Llama,
    pub head: Linear,
}

impl RewardModel {
    /// Puts a scalar head, initialised small (std 1e-3 so rewards start near 0), on a trunk.
    pub fn from_trunk(mut trunk: Llama, dim: usize, device: &Device) -> Self {
        trunk.output = None;
        let head = LinearConfig::new(dim, 1).with_bias(true).with_initializer(Initializer::Normal { mean: 0.0, std: 1e-3 }).init(device);
        Self { trunk, head }
    }

    /// A reward model of `config`'s shape (weights to be loaded).
    pub fn new(config: &LlamaConfig, device: &Device) -> Self {
        Self::from_trunk(config.clone().with_tie_word_embeddings(false).init(device), config.dim, device)
    }

    /// The reward of each right-padded sequence, read at its last real token (`lengths[i] - 1`).
    /// Causal attention means right padding can never reach that token, so the reward does not
    /// depend on the padding or on the batch neighbours.
    ///
    /// # Shapes
    /// - tokens `[batch, seq]`, lengths `batch` -> rewards `[batch]`
    pub fn forward(&self, tokens: Tensor<2, Int>, lengths: &[usize]) -> Tensor<1> {
        let hidden = self.trunk.forward_hidden(tokens, None);
        let [b, _, d] = hidden.dims();
        let last: Vec<i64> = lengths.iter().map(|&l| l as i64 - 1).collect();
        let index = Tensor::<1, Int>::from_data(TensorData::new(last, [b]), &hidden.device()).reshape([b, 1, 1]).expand([b, 1, d]);
        let at_last = hidden.gather(1, index).reshape([b, d]);
        // In f32 whatever the compute dtype, as the policy's logits.
        self.head.forward(at_last).reshape([b]).cast(FloatDType::F32)
    }

    /// The head at every position: PPO's value estimates of each prefix.
    ///
    /// # Shapes
    /// - tokens `[batch, seq]` -> values `[batch, seq]`
    pub fn values(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        let hidden = self.trunk.forward_hidden(tokens, None);
        let [b, t, _] = hidden.dims();
        self.head.forward(hidden).reshape([b, t]).cast(FloatDType::F32)
    }

    /// Rewards of token sequences of any lengths (no autodiff kept: call on `model.valid()`).
    pub fn score(&self, sequences: &[Vec<u32>], pad: u32) -> Vec<f32> {
        if sequences.is_empty() {
            return vec![];
        }
        let device = self.head.weight.device();
        let (tokens, lengths) = right_pad(sequences, pad, &device);
        self.forward(tokens, &lengths).into_data().try_to_vec::<f32>().expect("f32 rewards")
    }
}

/// Right-pads sequences into one tensor and returns their lengths.
///
/// # Shapes
/// - output `[batch, longest]`
pub fn right_pad(sequences: &[Vec<u32>], pad: u32, device: &Device) -> (Tensor<2, Int>, Vec<usize>) {
    let longest = sequences.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let mut ids = Vec::with_capacity(sequences.len() * longest);
    for s in sequences {
        ids.extend(s.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(pad as i64, longest - s.len()));
    }
    let lengths = sequences.iter().map(|s| s.len().max(1)).collect();
    (Tensor::from_data(TensorData::new(ids, [sequences.len(), longest]), device), lengths)
}

/// The paper's four preference ratings, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rating {
    SignificantlyBetter,
    Better,
    SlightlyBetter,
    NegligiblyBetterOrUnsure,
}

impl Rating {
    pub const ALL: [Rating; 4] = [Rating::SignificantlyBetter, Rating::Better, Rating::SlightlyBetter, Rating::NegligiblyBetterOrUnsure];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "significantly_better" => Self::SignificantlyBetter,
            "better" => Self::Better,
            "slightly_better" => Self::SlightlyBetter,
            "negligibly_better_or_unsure" | "negligibly_better" | "unsure" => Self::NegligiblyBetterOrUnsure,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::SignificantlyBetter => "significantly_better",
            Self::Better => "better",
            Self::SlightlyBetter => "slightly_better",
            Self::NegligiblyBetterOrUnsure => "negligibly_better_or_unsure",
        }
    }
}

/// Margin presets of the paper's table 28.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MarginPreset {
    None,
    /// 1, 2/3, 1/3, 0.
    Small,
    /// 3, 2, 1, 0.
    Large,
}

impl MarginPreset {
    pub fn margin(self, rating: Rating) -> f64 {
        let i = Rating::ALL.iter().position(|r| *r == rating).expect("a rating");
        match self {
            MarginPreset::None => 0.0,
            MarginPreset::Small => [1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0][i],
            MarginPreset::Large => [3.0, 2.0, 1.0, 0.0][i],
        }
    }
}

/// The ranking loss summed over pairs: `sum -log sigmoid(r_c - r_r - m)`.
pub fn ranking_loss_sum(chosen: Tensor<1>, rejected: Tensor<1>, margins: Tensor<1>) -> Tensor<1> {
    log_sigmoid(chosen - rejected - margins).sum().neg()
}

/// Helpfulness or safety.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Helpfulness,
    Safety,
}

/// One preference pair, tokenized: prompt + chosen and prompt + rejected.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub rating: Rating,
    pub category: Category,
    /// The line of the file it came from (1-based), for messages.
    pub line: usize,
}

/// Refuses, before any work, a pair of `path` longer than the model's `max_seq_len` (its
/// positions have no rotary table), naming the file and line.
pub fn check_pair_lengths(pairs: &[Pair], path: &Path, max_seq_len: usize) -> anyhow::Result<()> {
    if let Some(p) = pairs.iter().find(|p| p.chosen.len().max(p.rejected.len()) > max_seq_len) {
        bail!(
            "{}:{}: prompt + answer are {} tokens, more than the model's max_seq_len ({max_seq_len}): shorten or remove the pair",
            path.display(),
            p.line,
            p.chosen.len().max(p.rejected.len())
        );
    }
    Ok(())
}

/// Counted, not fatal.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairStats {
    pub pairs: usize,
    pub identical: usize,
    pub empty_prompt: usize,
}

/// Tokens of a prompt (text or chat messages) followed by a response, with the chat template;
/// the sequence ends with EOS, where the reward is read.
pub fn render(prompt: &serde_json::Value, response: &str, tokenizer: &Tokenizer) -> Result<Vec<u32>, String> {
    let mut messages = match prompt {
        serde_json::Value::String(s) => vec![Message::new(Role::User, s.clone())],
        serde_json::Value::Array(_) => Conversation::from_json(&serde_json::json!({ "messages": prompt }))?.messages,
        _ => return Err("`prompt` must be a string or a list of messages".into()),
    };
    messages.push(Message::new(Role::Assistant, response));
    let c = Conversation { messages };
    c.validate()?;
    Ok(c.tokenize(tokenizer).map_err(|e| e.to_string())?.0)
}

/// Reads preference pairs from JSONL: `{prompt (text or messages), chosen, rejected, rating,
/// category | is_safety}` or the transcript form `{chosen, rejected}` (full texts, rating
/// `better`). `default_category` applies when a line names none. Errors and skips name the line.
pub fn load_pairs(path: &Path, tokenizer: &Tokenizer, default_category: Category) -> anyhow::Result<(Vec<Pair>, PairStats)> {
    let mut stats = PairStats::default();
    let mut pairs = vec![];
    for line in llama_io::read_jsonl(path)? {
        let llama_io::JsonLine { at, line: n, value: v } = line?;
        let field = |k: &str| -> anyhow::Result<String> {
            v.get(k).and_then(|x| x.as_str()).map(String::from).ok_or_else(|| anyhow::anyhow!("{at}: missing string `{k}`"))
        };
        let (chosen, rejected) = (field("chosen")?, field("rejected")?);
        let rating = match v.get("rating") {
            None | Some(serde_json::Value::Null) => Rating::Better,
            Some(r) => {
                let r = r.as_str().unwrap_or_default();
                Rating::parse(r).ok_or_else(|| {
                    anyhow::anyhow!("{at}: unknown rating `{r}` (expected significantly_better, better, slightly_better or negligibly_better_or_unsure)")
                })?
            }
        };
        let category = match (v.get("category").and_then(|c| c.as_str()), v.get("is_safety").and_then(|c| c.as_bool())) {
            (Some("safety"), _) | (None, Some(true)) => Category::Safety,
            (Some("helpfulness"), _) | (None, Some(false)) => Category::Helpfulness,
            (Some(other), _) => bail!("{at}: unknown category `{other}` (expected helpfulness or safety)"),
            (None, None) => default_category,
        };
        if chosen == rejected {
            stats.identical += 1;
            continue;
        }
        let (c, r) = match v.get("prompt") {
            Some(p) => {
                if p.as_str().is_some_and(|s| s.trim().is_empty()) || p.as_array().is_some_and(|a| a.is_empty()) {
                    stats.empty_prompt += 1;
                    continue;
                }
                let c = render(p, &chosen, tokenizer).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
                let r = render(p, &rejected, tokenizer).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
                (c, r)
            }
            None => (tokenizer.encode(&chosen, true, true)?, tokenizer.encode(&rejected, true, true)?),
        };
        pairs.push(Pair { chosen: c, rejected: r, rating, category, line: n });
    }
    stats.pairs = pairs.len();
    if stats.identical + stats.empty_prompt > 0 {
        llama_trainer::distributed::world().warn(format_args!(
            "{}: skipped {} pairs whose chosen and rejected are identical and {} with an empty prompt",
            path.display(),
            stats.identical,
            stats.empty_prompt
        ));
    }
    Ok((pairs, stats))
}

/// The paper's data mixing: the helpfulness model trains on its data plus an equal number of
/// safety pairs; the safety model on its data plus helpfulness pairs making 10% of the mix.
pub fn mix(target: Category, helpfulness: &[Pair], safety: &[Pair], seed: u64) -> Vec<Pair> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (own, other, extra) = match target {
        Category::Helpfulness => (helpfulness, safety, helpfulness.len()),
        Category::Safety => (safety, helpfulness, safety.len() / 9),
    };
    let mut out: Vec<Pair> = own.to_vec();
    out.extend(other.sample(&mut rng, extra.min(other.len())).cloned());
    out.shuffle(&mut rng);
    out
}

/// A reward-model run, as one TOML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// Which model this run trains.
    pub target: Category,
    /// What to start from: an SFT or pretrain run, a checkpoint, a native or HF directory.
    pub init: PathBuf,
    pub data: RewardData,
    #[serde(default = "reward_optim")]
    pub optim: OptimConfig,
    #[serde(default = "reward_schedule")]
    pub schedule: ScheduleConfig,
    #[serde(default = "reward_train")]
    pub train: TrainConfig,
    #[serde(default)]
    pub run: RunConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardData {
    pub tokenizer: PathBuf,
    pub helpfulness: PathBuf,
    pub safety: PathBuf,
    pub helpfulness_eval: Option<PathBuf>,
    pub safety_eval: Option<PathBuf>,
    #[serde(default = "small_margins")]
    pub margin: MarginPreset,
    #[serde(default = "paper_reward_epochs")]
    pub epochs: u64,
    /// `llama2` (Llama 2's template, the default) or `tokenizer` (the chat_template of the
    /// tokenizer_config.json beside the tokenizer, for a model that brings its own).
    #[serde(default)]
    pub chat_template: llama_data::chat::ChatTemplateChoice,
}

fn small_margins() -> MarginPreset {
    MarginPreset::Small
}
fn paper_reward_epochs() -> u64 {
    1
}

/// Max LR 1e-5 (5e-6 for 70B), weight decay 0.1.
pub fn reward_optim() -> OptimConfig {
    OptimConfig { lr: 1e-5, ..OptimConfig::default() }
}
/// Cosine to 10%, warmup 3% of the steps, at least 5.
pub fn reward_schedule() -> ScheduleConfig {
    ScheduleConfig { kind: ScheduleKind::Cosine, warmup_ratio: Some(0.03), min_warmup_steps: 5, min_lr_ratio: 0.1, ..ScheduleConfig::default() }
}
/// 512 pairs per batch.
pub fn reward_train() -> TrainConfig {
    TrainConfig { batch_size: 512, micro_batch_size: 8, eval_every: 100, checkpoint_every: 100, ..TrainConfig::default() }
}

/// Accuracy and margin on held-out pairs, overall and per rating.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    pub accuracy: f64,
    pub mean_margin: f64,
    pub per_rating: BTreeMap<Rating, (usize, f64)>,
    pub mean_reward: f64,
}

/// Scores held-out pairs (no autodiff).
pub fn evaluate_pairs(model: &RewardModel, pairs: &[Pair], pad: u32, batch: usize) -> Evaluation {
    let model = model.valid();
    let mut correct = BTreeMap::<Rating, (usize, usize)>::new();
    let (mut margin_sum, mut reward_sum) = (0.0, 0.0);
    for chunk in pairs.chunks(batch.max(1)) {
        let c = model.score(&chunk.iter().map(|p| p.chosen.clone()).collect::<Vec<_>>(), pad);
        let r = model.score(&chunk.iter().map(|p| p.rejected.clone()).collect::<Vec<_>>(), pad);
        for ((p, rc), rr) in chunk.iter().zip(&c).zip(&r) {
            let e = correct.entry(p.rating).or_default();
            e.0 += usize::from(rc > rr);
            e.1 += 1;
            margin_sum += (rc - rr) as f64;
            reward_sum += (rc + rr) as f64 / 2.0;
        }
    }
    let n = pairs.len().max(1) as f64;
    let hits: usize = correct.values().map(|v| v.0).sum();
    Evaluation {
        accuracy: hits as f64 / n,
        mean_margin: margin_sum / n,
        mean_reward: reward_sum / n,
        per_rating: correct.into_iter().map(|(k, (h, t))| (k, (t, h as f64 / t as f64))).collect(),
    }
}

/// The reward-model objective.
pub struct RewardObjective {
    pub train: Vec<Pair>,
    pub evals: Vec<(String, Vec<Pair>)>,
    pub margin: MarginPreset,
    pub pad: u32,
    /// Epochs over `train`, shuffled per epoch.
    pub sampler: EpochSampler,
    pub device: Device,
}

impl Objective<RewardModel> for RewardObjective {
    type Batch = Vec<Pair>;

    fn next_batch(&mut self, size: usize) -> anyhow::Result<Option<Vec<Pair>>> {
        let mut out = vec![];
        while out.len() < size {
            match self.sampler.next_index() {
                Some(i) => out.push(self.train[i].clone()),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    fn weight(&self, batch: &Vec<Pair>) -> f64 {
        batch.len() as f64
    }

    fn tokens(&self, batch: &Vec<Pair>) -> usize {
        batch.iter().map(|p| p.chosen.len() + p.rejected.len()).sum()
    }

    fn loss_sum(&self, model: &RewardModel, batch: &Vec<Pair>) -> Tensor<1> {
        // Chosen and rejected in one forward pass: rows 0..b are chosen, b..2b rejected.
        let b = batch.len();
        let seqs: Vec<Vec<u32>> = batch.iter().map(|p| p.chosen.clone()).chain(batch.iter().map(|p| p.rejected.clone())).collect();
        let device = model.trunk.device();
        let (tokens, lengths) = right_pad(&seqs, self.pad, &device);
        let rewards = model.forward(tokens, &lengths);
        let margins: Vec<f32> = batch.iter().map(|p| self.margin.margin(p.rating) as f32).collect();
        let margins = Tensor::<1>::from_data(TensorData::new(margins, [b]), &device);
        ranking_loss_sum(rewards.clone().slice([0..b]), rewards.slice([b..2 * b]), margins)
    }

    fn evaluate(&mut self, model: &RewardModel, step: u64, metrics: &mut Metrics) -> anyhow::Result<()> {
        for (name, pairs) in &self.evals {
            if pairs.is_empty() {
                continue;
            }
            let e = evaluate_pairs(model, pairs, self.pad, 16);
            let mut values: Vec<(String, f64)> = vec![
                (format!("eval/{name}/accuracy"), e.accuracy),
                (format!("eval/{name}/mean_margin"), e.mean_margin),
                (format!("eval/{name}/mean_reward"), e.mean_reward),
            ];
            for (rating, (_, acc)) in &e.per_rating {
                values.push((format!("eval/{name}/accuracy_{}", rating.name()), *acc));
            }
            let refs: Vec<(&str, f64)> = values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            metrics.scalars(step, &refs)?;
            metrics.println(&format!("step {step}: {name} accuracy {:.3}, mean margin {:.3}", e.accuracy, e.mean_margin));
        }
        Ok(())
    }

    fn data_state(&self) -> serde_json::Value {
        serde_json::to_value(self.sampler.cursor()).expect("cursor serialises")
    }

    fn restore_data_state(&mut self, state: &serde_json::Value) -> anyhow::Result<()> {
        let cursor: EpochCursor = serde_json::from_value(state.clone()).context("checkpoint state has no valid reward cursor")?;
        self.sampler.restore(cursor)
    }
}

/// The shape of the reward model at `path` (a run directory or a checkpoint), read without its
/// weights.
pub fn reward_model_config(path: &Path) -> anyhow::Result<LlamaConfig> {
    let dir = llama_model::checkpoint::resolve(path);
    LlamaConfig::from_toml_file(&dir.join(llama_model::checkpoint::NATIVE_CONFIG)).with_context(|| format!("{}: not a reward model checkpoint", dir.display()))
}

/// Loads a trained reward model: a reward run directory or one of its checkpoints.
pub fn load_reward_model(path: &Path, device: &Device) -> anyhow::Result<(LlamaConfig, RewardModel)> {
    let dir = llama_model::checkpoint::resolve(path);
    let config = reward_model_config(&dir)?;
    let mut model = RewardModel::new(&config, device);
    llama_model::checkpoint::load_weights(&mut model, &dir.join(MODEL_FILE))?;
    Ok((config, model))
}

/// Writes a reward model as a directory [`load_reward_model`] reads (`config.toml` and
/// `model.bpk`, as a reward run's checkpoints hold them), e.g. a freshly initialised one.
pub fn save_reward_model(model: &RewardModel, config: &LlamaConfig, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    llama_model::checkpoint::save_weights(model, &dir.join(MODEL_FILE))?;
    let text = llama_trainer::model_config_toml(config)?;
    llama_io::write_atomic(&dir.join(llama_model::checkpoint::NATIVE_CONFIG), text.as_bytes())?;
    Ok(())
}

/// Command-line overrides (the trainer's, shared by every stage).
pub use llama_trainer::Overrides;

/// Everything `reward --config` does after parsing its arguments.
pub fn run(config_path: &Path, overrides: &Overrides) -> anyhow::Result<Summary> {
    let mut cfg: RewardConfig = load_toml(config_path)?;
    let origin = config_path.display();
    overrides.apply(&mut cfg.run, &mut cfg.train);
    if let Some(i) = &overrides.init {
        cfg.init = i.clone();
    }
    for check in [cfg.optim.validate(), cfg.schedule.validate(), cfg.run.validate(), cfg.train.validate_epoch_stage()] {
        check.map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    }
    if cfg.data.epochs == 0 {
        bail!("{origin}: data.epochs must be > 0");
    }
    let tokenizer =
        Tokenizer::from_file(&cfg.data.tokenizer)?.with_chat_template(cfg.data.chat_template).with_context(|| format!("{origin}: data.chat_template"))?;
    // Everything that can refuse the run comes before the weights are read (the launch check
    // needs the longest pair, so the pairs come first).
    let stage = Stage::open(&origin.to_string(), &cfg.init)?;
    stage.check_tokenizer(tokenizer.vocab_size())?;
    let load = |path: &Path, category: Category| -> anyhow::Result<Vec<Pair>> {
        let (pairs, _) = load_pairs(path, &tokenizer, category)?;
        check_pair_lengths(&pairs, path, stage.model_config.max_seq_len)?;
        Ok(pairs)
    };
    let help = load(&cfg.data.helpfulness, Category::Helpfulness)?;
    let safe = load(&cfg.data.safety, Category::Safety)?;
    let train = mix(cfg.target, &help, &safe, cfg.train.seed);
    if train.is_empty() {
        bail!("{origin}: no preference pairs to train on");
    }
    let longest = train.iter().map(|p| p.chosen.len().max(p.rejected.len())).max().unwrap_or(0);
    let mut evals = vec![];
    for (name, path, category) in [("helpfulness", &cfg.data.helpfulness_eval, Category::Helpfulness), ("safety", &cfg.data.safety_eval, Category::Safety)] {
        if let Some(p) = path {
            evals.push((name.to_string(), load(p, category)?));
        }
    }
    let total_steps = overrides.epoch_stage_steps(&cfg.train, train.len(), cfg.data.epochs);
    cfg.train.max_steps = Some(total_steps);
    cfg.train.validate().map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    let loop_config =
        LoopConfig::new(cfg.train.clone(), cfg.run.clone(), cfg.optim, &cfg.schedule, total_steps, &stage.model_config, longest.max(1), overrides, true)
            .map_err(|e| anyhow::anyhow!("{origin}: {e:#}"))?
            .with_tokenizer(&cfg.data.tokenizer);
    let (train_device, trunk) = stage.load_model(&cfg.run, cfg.train.seed)?;
    let model = RewardModel::from_trunk(trunk, stage.model_config.dim, &train_device);
    let world = llama_trainer::distributed::world();
    world.say(format_args!(
        "reward ({:?}): {} pairs ({} helpfulness, {} safety available) | {} steps of {} pairs | out {}",
        cfg.target,
        train.len(),
        help.len(),
        safe.len(),
        total_steps,
        cfg.train.batch_size,
        cfg.run.out_dir.display()
    ));
    let mut objective = RewardObjective {
        // In an MPI job each rank takes every `world`-th draw.
        sampler: EpochSampler::new(train.len(), cfg.data.epochs, cfg.train.seed).for_rank(world.rank(), world.size()),
        train,
        evals,
        margin: cfg.data.margin,
        pad: tokenizer.eos_id(),
        device: train_device,
    };
    let (_, summary) = llama_trainer::train(model, &mut objective, &loop_config)?;
    Ok(summary)
}
