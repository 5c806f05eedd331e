//! The pre-training stage: next-token cross-entropy on packed windows of tokenized shards.
//!
//! `main.rs` parses the command line; [`run`] reads and checks the whole config, prepares the
//! shards if asked, builds the model and data, and hands them to the shared training loop.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use llama_data::prepare::{PrepareConfig, prepare};
use llama_data::{Cursor, Manifest, PackedReader, ReaderConfig, Split, Tokenizer};
use llama_model::generate::{SamplingConfig, generate};
use llama_model::{Llama, LlamaConfig};
use llama_trainer::config::{OptimConfig, RunConfig, ScheduleConfig, TrainConfig, load_toml, resolve_model};
use llama_trainer::{LoopConfig, Metrics, Objective, Summary};
use serde::Deserialize;

/// A pre-training run, as one TOML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    /// The model: its keys, or `preset = "7b.toml"` plus overrides.
    pub model: toml::Value,
    pub data: DataConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub eval: EvalConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Directory of shards written by `prepare` (train and val splits).
    pub shards: PathBuf,
    /// The tokenizer the shards were made with (checked against the manifest).
    pub tokenizer: PathBuf,
    /// Tokens per training sequence (windows are seq_len + 1 long).
    pub seq_len: usize,
    /// When `shards` does not exist yet, tokenize this text (file or directory) into it first.
    #[serde(default)]
    pub source: Option<PathBuf>,
    #[serde(default = "shuffled_by_default")]
    pub shuffle: bool,
}

fn shuffled_by_default() -> bool {
    true
}

/// Evaluation extras: sample generations from fixed prompts at every evaluation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub prompts: Vec<String>,
    pub max_new_tokens: usize,
    pub temperature: f32,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { prompts: vec![], max_new_tokens: 48, temperature: 0.8 }
    }
}

/// Command-line overrides of the common knobs (the trainer's, shared by every stage).
pub use llama_trainer::Overrides;

/// Reads, overrides and validates a config file; every error names the file and the key.
pub fn load_config(path: &Path, overrides: &Overrides) -> anyhow::Result<(PretrainConfig, LlamaConfig)> {
    let mut cfg: PretrainConfig = load_toml(path)?;
    let model = resolve_model(&cfg.model, path)?;
    if let Some(s) = overrides.max_steps {
        cfg.train.max_steps = Some(s);
    }
    overrides.apply(&mut cfg.run, &mut cfg.train);
    check(&cfg, &model, &path.display().to_string())?;
    Ok((cfg, model))
}

/// Checks a config (read by [`load_config`], or built in code) and its model; errors start with
/// `origin` and name the key.
pub fn check(cfg: &PretrainConfig, model: &LlamaConfig, origin: &str) -> anyhow::Result<()> {
    let checks = [cfg.optim.validate(), cfg.schedule.validate(), cfg.train.validate(), cfg.run.validate()];
    for check in checks {
        check.map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    }
    if cfg.data.seq_len == 0 || cfg.data.seq_len > model.max_seq_len {
        bail!("{origin}: data.seq_len ({}) must be in 1..=model.max_seq_len ({})", cfg.data.seq_len, model.max_seq_len);
    }
    if !(cfg.eval.temperature >= 0.0) {
        bail!("{origin}: eval.temperature must be >= 0");
    }
    Ok(())
}

/// A micro-batch: `size` windows of `seq_len + 1` tokens.
pub struct Windows(pub Vec<Vec<u32>>);

pub use llama_model::loss::{cross_entropy_sum, inputs_and_targets};

/// The pre-training objective over a packed reader.
pub struct Pretrain {
    train: PackedReader,
    shards: PathBuf,
    vocab_size: usize,
    seq_len: usize,
    micro_batch: usize,
    eval_batches: usize,
    tokenizer: Tokenizer,
    eval: EvalConfig,
    /// Cross-entropy of the validation tokens under the training unigram distribution.
    pub unigram_loss: Option<f64>,
}

impl Pretrain {
    /// Validation loss over up to `eval_batches` micro-batches of the val split (no autodiff).
    pub fn validation_loss(&self, model: &Llama) -> anyhow::Result<Option<f64>> {
        let config = ReaderConfig { shuffle: false, epochs: Some(1), ..ReaderConfig::new(self.seq_len) };
        let mut reader = match PackedReader::open(&self.shards, Split::Val, self.vocab_size, config) {
            Ok(r) => r,
            Err(llama_data::DataError::Empty(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let model = model.valid();
        let device = model.tok_embeddings.weight.device();
        let (mut sum, mut count) = (0.0, 0usize);
        for _ in 0..self.eval_batches {
            let mut windows = vec![];
            while windows.len() < self.micro_batch {
                match reader.next_window()? {
                    Some(w) => windows.push(w),
                    None => break,
                }
            }
            if windows.is_empty() {
                break;
            }
            count += windows.len() * self.seq_len;
            sum += cross_entropy_sum(&model, &windows, &device).into_scalar::<f32>() as f64;
        }
        Ok((count > 0).then(|| sum / count as f64))
    }
}

impl Objective<Llama> for Pretrain {
    type Batch = Windows;

    fn next_batch(&mut self, size: usize) -> anyhow::Result<Option<Windows>> {
        Ok(self.train.next_batch(size)?.map(Windows))
    }

    fn weight(&self, batch: &Windows) -> f64 {
        (batch.0.len() * self.seq_len) as f64
    }

    fn tokens(&self, batch: &Windows) -> usize {
        batch.0.len() * self.seq_len
    }

    fn loss_sum(&self, model: &Llama, batch: &Windows) -> Tensor<1> {
        cross_entropy_sum(model, &batch.0, &model.device())
    }

    fn evaluate(&mut self, model: &Llama, step: u64, metrics: &mut Metrics) -> anyhow::Result<()> {
        if let Some(loss) = self.validation_loss(model)? {
            let mut values = vec![("val/loss", loss), ("val/perplexity", loss.exp())];
            if let Some(u) = self.unigram_loss {
                values.push(("val/unigram_loss", u));
            }
            metrics.scalars(step, &values)?;
            metrics.println(&format!("step {step}: val loss {loss:.4} (perplexity {:.1})", loss.exp()));
        }
        if !self.eval.prompts.is_empty() {
            let prompts: Vec<Vec<u32>> = self.eval.prompts.iter().map(|p| self.tokenizer.encode(p, true, false)).collect::<Result<_, _>>()?;
            let sampling = SamplingConfig {
                temperature: self.eval.temperature,
                top_p: Some(0.95),
                top_k: None,
                max_new_tokens: self.eval.max_new_tokens,
                eos_id: Some(self.tokenizer.eos_id()),
                seed: step,
                logprobs: false,
            };
            let out = generate(&model.valid(), &prompts, &sampling)?;
            let mut text = String::new();
            for (p, tokens) in self.eval.prompts.iter().zip(&out.tokens) {
                text.push_str(&format!("**{p}**{}\n\n", self.tokenizer.decode(tokens)?));
            }
            metrics.text(step, "samples", &text)?;
        }
        Ok(())
    }

    fn data_state(&self) -> serde_json::Value {
        serde_json::json!({ "train": self.train.cursor() })
    }

    fn restore_data_state(&mut self, state: &serde_json::Value) -> anyhow::Result<()> {
        let cursor: Cursor = serde_json::from_value(state["train"].clone()).context("checkpoint state has no valid train cursor")?;
        self.train.restore(cursor)?;
        Ok(())
    }
}

/// Cross-entropy (nats/token) of the validation targets under the add-one-smoothed unigram
/// distribution of the first `max_tokens` training tokens: the bar a model must clear.
pub fn unigram_baseline(shards: &Path, vocab_size: usize, seq_len: usize, max_tokens: usize) -> anyhow::Result<Option<f64>> {
    let once = |split| PackedReader::open(shards, split, vocab_size, ReaderConfig { shuffle: false, epochs: Some(1), ..ReaderConfig::new(seq_len) });
    let mut counts = vec![1.0f64; vocab_size];
    let mut train = once(Split::Train)?;
    let mut seen = 0;
    while let Some(w) = train.next_window()? {
        w[1..].iter().for_each(|&t| counts[t as usize] += 1.0);
        seen += seq_len;
        if seen >= max_tokens {
            break;
        }
    }
    let total: f64 = counts.iter().sum();
    let mut val = match once(Split::Val) {
        Ok(r) => r,
        Err(llama_data::DataError::Empty(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let (mut sum, mut n) = (0.0, 0usize);
    while let Some(w) = val.next_window()? {
        for &t in &w[1..] {
            sum -= (counts[t as usize] / total).ln();
            n += 1;
        }
    }
    Ok((n > 0).then(|| sum / n as f64))
}

/// Everything `pretrain` does after parsing its arguments.
pub fn run(config_path: &Path, overrides: &Overrides) -> anyhow::Result<Summary> {
    let (cfg, model_config) = load_config(config_path, overrides)?;
    run_config(cfg, model_config, &config_path.display().to_string(), overrides)
}

/// [`run`] on a config already read and checked ([`load_config`], or built in code and passed
/// through [`check`]); `origin` names it in errors.
pub fn run_config(cfg: PretrainConfig, model_config: LlamaConfig, origin: &str, overrides: &Overrides) -> anyhow::Result<Summary> {
    // Built first: its launch check (device, dtype, memory fit) runs before any work.
    let total_steps = cfg.train.total_steps(cfg.data.seq_len);
    let loop_config =
        LoopConfig::new(cfg.train.clone(), cfg.run.clone(), cfg.optim.clone(), &cfg.schedule, total_steps, &model_config, cfg.data.seq_len, overrides, false)
            .map_err(|e| anyhow::anyhow!("{origin}: {e:#}"))?
            .with_tokenizer(&cfg.data.tokenizer);
    let tokenizer = Tokenizer::from_file(&cfg.data.tokenizer)?;
    if tokenizer.vocab_size() > model_config.vocab_size {
        bail!(
            "{}: the tokenizer {} has {} ids but model.vocab_size is {}",
            origin,
            cfg.data.tokenizer.display(),
            tokenizer.vocab_size(),
            model_config.vocab_size
        );
    }
    // In an MPI job rank 0 prepares missing shards while the others wait.
    let world = llama_trainer::distributed::world();
    if world.is_root() && !cfg.data.shards.exists() {
        match &cfg.data.source {
            Some(source) => {
                println!("preparing shards {} from {}", cfg.data.shards.display(), source.display());
                prepare(&PrepareConfig::new(vec![source.clone()], cfg.data.shards.clone()), &tokenizer)?;
            }
            None => {
                bail!("{}: data.shards {} does not exist (run `prepare`, or set data.source to prepare it automatically)", origin, cfg.data.shards.display())
            }
        }
    }
    world.barrier();
    let manifest_path = cfg.data.shards.join(llama_data::shards::MANIFEST);
    if manifest_path.is_file() {
        let manifest = Manifest::load(&cfg.data.shards)?;
        if manifest.vocab_size > model_config.vocab_size {
            bail!("{}: the shards' vocabulary ({} ids) exceeds model.vocab_size ({})", manifest_path.display(), manifest.vocab_size, model_config.vocab_size);
        }
        manifest.check_tokenizer(tokenizer.fingerprint(), tokenizer.vocab_size(), &cfg.data.shards)?;
    }
    let device = llama_trainer::parallel::rank_device(&cfg.run).map_err(anyhow::Error::msg)?;
    device.seed(cfg.train.seed);
    let train_device = device.clone().autodiff();
    // Each rank reads every `world`-th window of the one global stream.
    let reader_config =
        ReaderConfig { seed: cfg.train.seed, shuffle: cfg.data.shuffle, rank: world.rank(), world_size: world.size(), ..ReaderConfig::new(cfg.data.seq_len) };
    let train_reader = PackedReader::open(&cfg.data.shards, Split::Train, model_config.vocab_size, reader_config)?;
    let unigram_loss = unigram_baseline(&cfg.data.shards, model_config.vocab_size, cfg.data.seq_len, 2_000_000)?;
    world.say(format_args!(
        "model: {} parameters | {} steps of {} x {} tokens | device {} | out {}",
        model_config.num_params(),
        total_steps,
        cfg.train.batch_size,
        cfg.data.seq_len,
        cfg.run.device,
        cfg.run.out_dir.display()
    ));
    if let Some(u) = unigram_loss {
        world.say(format_args!("unigram baseline on the validation split: {u:.4} nats/token"));
    }
    // With the optimizer on the host the f32 master is built there: it never visits the device.
    let init_device = match cfg.run.optimizer {
        llama_trainer::OptimizerPlacement::Host => {
            let host = Device::flex();
            host.seed(cfg.train.seed);
            host.autodiff()
        }
        llama_trainer::OptimizerPlacement::Device => train_device.clone(),
    };
    let model = model_config.init(&init_device);
    let mut objective = Pretrain {
        train: train_reader,
        shards: cfg.data.shards.clone(),
        vocab_size: model_config.vocab_size,
        seq_len: cfg.data.seq_len,
        micro_batch: cfg.train.micro_batch_size,
        eval_batches: cfg.train.eval_batches,
        tokenizer,
        eval: cfg.eval,
        unigram_loss,
    };
    let (_, summary) = llama_trainer::train(model, &mut objective, &loop_config)?;
    if let Some(dir) = &summary.checkpoint {
        world.say(format_args!("done: {} steps, {} tokens; checkpoint {}", summary.steps, summary.tokens, dir.display()));
    }
    Ok(summary)
}
