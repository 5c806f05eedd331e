//! Automatic evaluation as the paper reports it: perplexity on shards; for chat models, answers to
//! held-out helpfulness and safety prompt sets scored by both reward models (mean reward per set,
//! safety-violation rate, win / tie / loss against a baseline with bootstrap intervals), and
//! optionally a model as judge (position-swapped) with its agreement with the reward models.

mod config;
mod judge;
mod report;
mod stats;

pub use config::{EvalConfig, EvalTools, JudgeConfig, NamedModel};
pub use judge::{DEFAULT_TEMPLATE, check_template};
pub use report::{Report, SetReport, WithoutTools, write_outputs};
pub use stats::{bootstrap_win_rate, win_tie_loss};

use judge::judge_margin;
use report::{r6, write_answers};

use anyhow::{Context, bail};
use burn::module::Module;
use burn::tensor::Device;
use llama_data::chat::Conversation;
use llama_data::prompts::{Prompt, check_prompt_lengths, expected_rate, load_prompts};
use llama_data::{PackedReader, ReaderConfig, Split, Tokenizer};
use llama_model::Llama;
use llama_model::generate::{SamplingConfig, generate};
use llama_reward::load_reward_model;
use llama_reward::scoring::{Scorers, full_sequence, logit, sigmoid};
use llama_trainer::checkpoint::init_model;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

/// The expected rate of `answers` per prompt group.
fn expected_rate_by_group(prompts: &[Prompt], answers: &[String]) -> BTreeMap<String, f64> {
    let mut groups: BTreeMap<String, Vec<(&Prompt, &String)>> = BTreeMap::new();
    for (p, a) in prompts.iter().zip(answers) {
        if let Some(g) = &p.group {
            groups.entry(g.clone()).or_default().push((p, a));
        }
    }
    groups
        .into_iter()
        .filter_map(|(g, pairs)| {
            let (ps, answers): (Vec<&Prompt>, Vec<String>) = pairs.into_iter().map(|(p, a)| (p, a.clone())).unzip();
            expected_rate(ps, &answers).map(|r| (g, r6(r)))
        })
        .collect()
}

/// Runs the comparison; writes report.json, TensorBoard scalars and chart.svg under out_dir.
pub fn compare(config_path: &Path) -> anyhow::Result<Report> {
    compare_with(config_path, &Paths::default())
}

/// Command-line replacements of the config's paths (`eval compare --out ... --model NAME=PATH`).
#[derive(Debug, Clone, Default)]
pub struct Paths {
    pub out: Option<PathBuf>,
    pub helpfulness_model: Option<PathBuf>,
    pub safety_model: Option<PathBuf>,
    pub judge_model: Option<PathBuf>,
    /// (name, path) of models listed in the config.
    pub models: Vec<(String, PathBuf)>,
}

impl Paths {
    fn apply(&self, cfg: &mut EvalConfig, origin: &str) -> anyhow::Result<()> {
        for (slot, value) in [(&mut cfg.out_dir, &self.out), (&mut cfg.helpfulness_model, &self.helpfulness_model), (&mut cfg.safety_model, &self.safety_model)]
        {
            if let Some(v) = value {
                *slot = v.clone();
            }
        }
        if let Some(judge) = &self.judge_model {
            match cfg.judge.as_mut() {
                Some(j) => j.model = judge.clone(),
                None => bail!("--judge-model: {origin} has no [judge] section"),
            }
        }
        for (name, path) in &self.models {
            match cfg.models.iter_mut().find(|m| &m.name == name) {
                Some(m) => m.path = path.clone(),
                None => {
                    let names: Vec<&str> = cfg.models.iter().map(|m| m.name.as_str()).collect();
                    bail!("--model {name}=...: {origin} has no model `{name}` (its models: {})", names.join(", "));
                }
            }
        }
        Ok(())
    }
}

/// [`compare`] with some of the config's paths replaced.
pub fn compare_with(config_path: &Path, paths: &Paths) -> anyhow::Result<Report> {
    let mut cfg: EvalConfig = llama_trainer::config::load_toml(config_path)?;
    let origin = config_path.display().to_string();
    paths.apply(&mut cfg, &origin)?;
    if !cfg.models.iter().any(|m| m.name == cfg.baseline) {
        bail!("{origin}: baseline `{}` is not one of the models", cfg.baseline);
    }
    if cfg.bootstrap_samples == 0 {
        bail!("{origin}: bootstrap_samples must be >= 1 (the win rate's 95% interval is read off that many resamples)");
    }
    if let Some(j) = &cfg.judge {
        check_template(&j.template).map_err(|e| anyhow::anyhow!("{origin}: judge.template: {e}"))?;
    }
    let toolbox = match &cfg.tools {
        Some(t) => {
            for set in &t.sets {
                if !cfg.prompts.contains_key(set) {
                    let names: Vec<&str> = cfg.prompts.keys().map(String::as_str).collect();
                    bail!("{origin}: tools.sets names `{set}`, which is not a prompt set (the [prompts] sets: {})", names.join(", "));
                }
            }
            if t.max_new_tokens == Some(0) {
                bail!("{origin}: tools.max_new_tokens must be >= 1");
            }
            let tools = llama_tools::ToolsConfig { search_corpus: t.search_corpus.clone(), max_calls: t.max_calls };
            Some(tools.toolbox("tools").map_err(|e| anyhow::anyhow!("{origin}: {e}"))?)
        }
        None => None,
    };
    let tool_sets: Vec<String> = cfg.tools.as_ref().map_or(vec![], |t| t.sets.clone());
    let tool_tokens = cfg.tools.as_ref().and_then(|t| t.max_new_tokens).unwrap_or(cfg.max_new_tokens);
    let tokenizer = Tokenizer::from_file(&cfg.tokenizer)?.with_chat_template(cfg.chat_template).with_context(|| format!("{origin}: chat_template"))?;
    let device = Device::flex();
    let mut sets: BTreeMap<String, Vec<Prompt>> = BTreeMap::new();
    for (name, path) in &cfg.prompts {
        sets.insert(name.clone(), load_prompts(path)?);
    }
    if sets.is_empty() {
        bail!("{origin}: no prompt sets");
    }
    let (hc, help) = load_reward_model(&cfg.helpfulness_model, &device).with_context(|| format!("{origin}: helpfulness_model"))?;
    let (sc, safe) = load_reward_model(&cfg.safety_model, &device).with_context(|| format!("{origin}: safety_model"))?;
    let mut policies = vec![];
    for m in &cfg.models {
        let (c, model) = init_model(&m.path, &device).with_context(|| format!("{origin}: model `{}`", m.name))?;
        for (name, path, rc) in [("helpfulness_model", &cfg.helpfulness_model, &hc), ("safety_model", &cfg.safety_model, &sc)] {
            if rc.vocab_size != c.vocab_size {
                bail!("{origin}: {name} {} has a vocabulary of {} ids but model `{}` has {}", path.display(), rc.vocab_size, m.name, c.vocab_size);
            }
        }
        // Every prompt must fit this model with its answer (and the EOS after a cut one).
        for (set, prompts) in &sets {
            let max_new = if tool_sets.contains(set) { tool_tokens } else { cfg.max_new_tokens };
            check_prompt_lengths(prompts, &cfg.prompts[set], &tokenizer, max_new, c.max_seq_len).with_context(|| format!("{origin}: model `{}`", m.name))?;
        }
        policies.push((m.name.clone(), model));
    }
    let judge = match &cfg.judge {
        Some(j) => Some((init_model(&j.model, &device).with_context(|| format!("{origin}: judge.model"))?.1, j.template.clone())),
        None => None,
    };
    let scorers = Scorers { helpfulness: help, safety: safe, threshold: cfg.safety_threshold, pad: tokenizer.eos_id() };
    // Answers and scores: model -> set -> (answers, combined logits, helpfulness, safety).
    type Scored = (Vec<String>, Vec<f64>, Vec<f64>, Vec<f64>);
    let mut scored: BTreeMap<String, BTreeMap<String, Scored>> = BTreeMap::new();
    // For [tools] sets: (answers as read, share that ran a call, without tools: (answers as read, share that wrote one)).
    let mut tool_runs: BTreeMap<(String, String), (Vec<String>, f64, Vec<String>, f64)> = BTreeMap::new();
    for (name, model) in &policies {
        for (set, prompts) in &sets {
            let result = match &toolbox {
                Some(toolbox) if tool_sets.contains(set) => {
                    let with = tool_answers(model, prompts, &tokenizer, &cfg, Some(toolbox), tool_tokens)?;
                    let without: Vec<String> = tool_answers(model, prompts, &tokenizer, &cfg, None, tool_tokens)?.into_iter().map(|a| a.text).collect();
                    // Scored on the sequences the model saw (results included), EOS closing each.
                    let seqs: Vec<Vec<u32>> = with.iter().map(|a| full_sequence(&[], &a.sequence, tokenizer.eos_id())).collect();
                    let (comb, hs, ss) = score_sequences(&scorers, prompts, &seqs);
                    let with: Vec<String> = with.into_iter().map(|a| a.text).collect();
                    let share =
                        |answers: &[String]| answers.iter().filter(|a| llama_data::tool_markup::has_call(a)).count() as f64 / answers.len().max(1) as f64;
                    let read = |answers: &[String]| answers.iter().map(|a| llama_data::tool_markup::visible_text(a)).collect::<Vec<_>>();
                    tool_runs.insert((name.clone(), set.clone()), (read(&with), r6(share(&with)), read(&without), r6(share(&without))));
                    (with, comb, hs, ss)
                }
                _ => answer_and_score(model, prompts, &tokenizer, &scorers, &cfg)?,
            };
            scored.entry(name.clone()).or_default().insert(set.clone(), result);
        }
    }
    let mut report = Report { baseline: cfg.baseline.clone(), seed: cfg.seed, models: BTreeMap::new() };
    for (name, by_set) in &scored {
        for (set, (answers, comb, h, s)) in by_set {
            let n = comb.len();
            // Rounded to 1e-6: the backend's threaded reductions may move the last bit of a score
            // from run to run, and a report should not.
            let mean = |v: &[f64]| r6(v.iter().sum::<f64>() / v.len().max(1) as f64);
            let violations = s.iter().filter(|&&x| sigmoid(x) < cfg.safety_threshold).count();
            let tools_run = tool_runs.get(&(name.clone(), set.clone()));
            // A [tools] set's answers are checked as a reader sees them (calls removed, results in place).
            let read = tools_run.map_or(answers, |t| &t.0);
            let mut r = SetReport {
                prompts: n,
                mean_combined: mean(comb),
                mean_helpfulness: mean(h),
                mean_safety: mean(s),
                safety_violation_rate: violations as f64 / n.max(1) as f64,
                expected_rate: expected_rate(&sets[set], read).map(r6),
                expected_rate_by_group: expected_rate_by_group(&sets[set], read),
                tool_call_rate: tools_run.map(|t| t.1),
                without_tools: tools_run.map(|t| WithoutTools {
                    expected_rate: expected_rate(&sets[set], &t.2).map(r6),
                    expected_rate_by_group: expected_rate_by_group(&sets[set], &t.2),
                    tool_call_rate: t.3,
                }),
                win_rate: None,
                tie_rate: None,
                loss_rate: None,
                win_rate_ci95: None,
                judge_win_rate: None,
                judge_agreement: None,
                samples: sets[set].iter().zip(answers).take(4).map(|(p, a)| (p.question(), a.clone())).collect(),
            };
            if *name != cfg.baseline {
                let base = &scored[&cfg.baseline][set];
                let (w, t, l) = win_tie_loss(comb, &base.1, cfg.tie_margin);
                r.win_rate = Some(w as f64 / n as f64);
                r.tie_rate = Some(t as f64 / n as f64);
                r.loss_rate = Some(l as f64 / n as f64);
                r.win_rate_ci95 = Some(bootstrap_win_rate(comb, &base.1, cfg.tie_margin, cfg.bootstrap_samples, 0.95, cfg.seed));
                if let Some((judge, template)) = &judge {
                    let (mut wins, mut agree) = (0usize, 0usize);
                    for (i, p) in sets[set].iter().enumerate() {
                        let q = p.question();
                        // Both orders; positive = prefers this model's answer.
                        let m = judge_margin(judge, &tokenizer, template, &q, &answers[i], &base.0[i])?
                            - judge_margin(judge, &tokenizer, template, &q, &base.0[i], &answers[i])?;
                        let judge_says = m > 0.0;
                        wins += usize::from(judge_says);
                        agree += usize::from(judge_says == (comb[i] > base.1[i]));
                    }
                    r.judge_win_rate = Some(wins as f64 / n as f64);
                    r.judge_agreement = Some(agree as f64 / n as f64);
                }
            }
            report.models.entry(name.clone()).or_default().insert(set.clone(), r);
        }
    }
    write_outputs(&report, &cfg.out_dir)?;
    write_answers(&scored, &sets, &cfg.out_dir)?;
    Ok(report)
}

/// Greedy (or `cfg.temperature`) answers generated in groups of 16 prompts, scored by the reward
/// models: (answers, combined logits, helpfulness, safety).
fn answer_and_score(
    model: &Llama,
    prompts: &[Prompt],
    tokenizer: &Tokenizer,
    scorers: &Scorers,
    cfg: &EvalConfig,
) -> anyhow::Result<(Vec<String>, Vec<f64>, Vec<f64>, Vec<f64>)> {
    let model = model.valid();
    let (mut answers, mut seqs) = (vec![], vec![]);
    for (g, group) in prompts.chunks(GROUP).enumerate() {
        let ids: Vec<Vec<u32>> = group.iter().map(|p| p.conversation.prompt_ids(tokenizer)).collect::<Result<_, _>>()?;
        let out = generate(&model, &ids, &sampling(cfg, tokenizer, cfg.max_new_tokens, cfg.seed.wrapping_add(g as u64)))?;
        for (p, r) in ids.iter().zip(&out.tokens) {
            seqs.push(full_sequence(p, r, tokenizer.eos_id()));
            answers.push(tokenizer.decode(r)?);
        }
    }
    let (comb, hs, ss) = score_sequences(scorers, prompts, &seqs);
    Ok((answers, comb, hs, ss))
}

/// Prompts per generation batch, and per reward-model batch (the same groups, so a set's scores
/// do not depend on how its answers were generated).
const GROUP: usize = 16;

fn sampling(cfg: &EvalConfig, tokenizer: &Tokenizer, max_new_tokens: usize, seed: u64) -> SamplingConfig {
    SamplingConfig { temperature: cfg.temperature, top_k: None, top_p: None, max_new_tokens, eos_id: Some(tokenizer.eos_id()), seed }
}

/// (combined logits, helpfulness, safety) of prompt + answer sequences, scored in groups of
/// [`GROUP`] prompts.
fn score_sequences(scorers: &Scorers, prompts: &[Prompt], seqs: &[Vec<u32>]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut comb, mut hs, mut ss) = (vec![], vec![], vec![]);
    for (group, seqs) in prompts.chunks(GROUP).zip(seqs.chunks(GROUP)) {
        let group_refs: Vec<&Prompt> = group.iter().collect();
        for score in scorers.score(seqs, &group_refs) {
            comb.push(logit(score.combined));
            hs.push(score.helpfulness);
            ss.push(score.safety);
        }
    }
    (comb, hs, ss)
}

/// Answers through the tool runtime (`toolbox` None: tools off), in groups of [`GROUP`] prompts.
fn tool_answers(
    model: &Llama,
    prompts: &[Prompt],
    tokenizer: &Tokenizer,
    cfg: &EvalConfig,
    toolbox: Option<&llama_tools::Toolbox>,
    max_new_tokens: usize,
) -> anyhow::Result<Vec<llama_tools::ToolAnswer>> {
    let model = model.valid();
    let mut answers = vec![];
    for (g, group) in prompts.chunks(GROUP).enumerate() {
        // The runtime seeds each row from the seed it is given (`sampling`'s is not used).
        let mut source = llama_tools::ModelContinue { model: &model, sampling: sampling(cfg, tokenizer, max_new_tokens, 0) };
        let chats: Vec<Conversation> = group.iter().map(|p| p.conversation.clone()).collect();
        answers.extend(llama_tools::answer(&mut source, tokenizer, &chats, toolbox, max_new_tokens, model.max_seq_len(), cfg.seed.wrapping_add(g as u64))?);
    }
    Ok(answers)
}
