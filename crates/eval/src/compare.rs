//! `eval compare`: every model's answers to every prompt set, scored by both reward models and
//! compared with the baseline's (win / tie / loss, bootstrap interval, the judge), into
//! report.json, answers.jsonl, TensorBoard and chart.svg.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::module::Module;
use burn::tensor::Device;
use llama_data::Tokenizer;
use llama_data::chat::Conversation;
use llama_data::prompts::{Prompt, check_prompt_lengths, expected_rate, load_prompts};
use llama_model::Llama;
use llama_model::generate::{SamplingConfig, generate_in_slots, row_seed};
use llama_reward::load_reward_model;
use llama_reward::scoring::{Scorers, full_sequence, logit, sigmoid};
use llama_tools::Toolbox;
use llama_trainer::checkpoint::init_model;

use crate::config::EvalConfig;
use crate::judge::{check_template, judge_margin};
use crate::report::{Report, ScoredAnswers, SetReport, WithoutTools, r6, write_answers, write_outputs};
use crate::stats::{bootstrap_win_rate, win_tie_loss};

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

/// [`compare`] with some of the config's paths replaced. In parts: the config read and checked
/// ([`checked_config`]), the models and prompt sets loaded ([`Loaded::load`]), every model's
/// answers to every set generated and scored ([`answer_set`]), and the report built from them
/// ([`set_report`]).
pub fn compare_with(config_path: &Path, paths: &Paths) -> anyhow::Result<Report> {
    let origin = config_path.display().to_string();
    let cfg = checked_config(config_path, paths, &origin)?;
    let toolbox = match &cfg.tools {
        Some(t) => {
            let tools = llama_tools::ToolsConfig { search_corpus: t.search_corpus.clone(), max_calls: t.max_calls };
            Some(tools.toolbox("tools").map_err(|e| anyhow::anyhow!("{origin}: {e}"))?)
        }
        None => None,
    };
    let loaded = Loaded::load(&cfg, &origin)?;
    let mut scored: BTreeMap<String, BTreeMap<String, ScoredAnswers>> = BTreeMap::new();
    let mut tool_runs: BTreeMap<(String, String), ToolRun> = BTreeMap::new();
    // A line per model and set as each is done (a comparison of real models runs for tens of
    // minutes); on stderr, so that stdout stays the report.
    let (total, started, mut done) = (loaded.policies.len() * loaded.sets.len(), std::time::Instant::now(), 0);
    for (name, model) in &loaded.policies {
        for (set, prompts) in &loaded.sets {
            let begun = std::time::Instant::now();
            let (answers, tool_run) = answer_set(model, prompts, &loaded, &cfg, toolbox.as_ref().filter(|_| cfg.is_tool_set(set)))?;
            done += 1;
            eprintln!(
                "eval compare [{done}/{total}]: {name} answered the {} prompts of `{set}` in {:.1} s ({:.0} s in all)",
                prompts.len(),
                begun.elapsed().as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
            if let Some(run) = tool_run {
                tool_runs.insert((name.clone(), set.clone()), run);
            }
            scored.entry(name.clone()).or_default().insert(set.clone(), answers);
        }
    }
    let mut report = Report { baseline: cfg.baseline.clone(), seed: cfg.seed, models: BTreeMap::new() };
    for (name, by_set) in &scored {
        for (set, answers) in by_set {
            let baseline = (*name != cfg.baseline).then(|| &scored[&cfg.baseline][set]);
            let r = set_report(&cfg, &loaded, &loaded.sets[set], answers, tool_runs.get(&(name.clone(), set.clone())), baseline)?;
            report.models.entry(name.clone()).or_default().insert(set.clone(), r);
        }
    }
    write_outputs(&report, &cfg.out_dir)?;
    write_answers(&scored, &loaded.sets, &cfg.out_dir)?;
    Ok(report)
}

/// The eval config at `config_path` with `paths` applied, checked before anything is loaded.
fn checked_config(config_path: &Path, paths: &Paths, origin: &str) -> anyhow::Result<EvalConfig> {
    let mut cfg: EvalConfig = llama_trainer::config::load_toml(config_path)?;
    paths.apply(&mut cfg, origin)?;
    if !cfg.models.iter().any(|m| m.name == cfg.baseline) {
        bail!("{origin}: baseline `{}` is not one of the models", cfg.baseline);
    }
    if cfg.bootstrap_samples == 0 {
        bail!("{origin}: bootstrap_samples must be >= 1 (the win rate's 95% interval is read off that many resamples)");
    }
    if let Some(j) = &cfg.judge {
        check_template(&j.template).map_err(|e| anyhow::anyhow!("{origin}: judge.template: {e}"))?;
    }
    if let Some(t) = &cfg.tools {
        for set in &t.sets {
            if !cfg.prompts.contains_key(set) {
                let names: Vec<&str> = cfg.prompts.keys().map(String::as_str).collect();
                bail!("{origin}: tools.sets names `{set}`, which is not a prompt set (the [prompts] sets: {})", names.join(", "));
            }
        }
        if t.max_new_tokens == Some(0) {
            bail!("{origin}: tools.max_new_tokens must be >= 1");
        }
    }
    Ok(cfg)
}

/// What a comparison reads before generating: the tokenizer, the prompt sets, the reward models,
/// the models compared and the judge.
struct Loaded {
    tokenizer: Tokenizer,
    sets: BTreeMap<String, Vec<Prompt>>,
    scorers: Scorers,
    /// (name, model), in the config's order.
    policies: Vec<(String, Llama)>,
    /// The judge model and its template.
    judge: Option<(Llama, String)>,
}

impl Loaded {
    /// Loads everything, checking that the reward models share each model's vocabulary and that
    /// every prompt fits each model with its answer (and the EOS after a cut one).
    fn load(cfg: &EvalConfig, origin: &str) -> anyhow::Result<Self> {
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
            for (set, prompts) in &sets {
                check_prompt_lengths(prompts, &cfg.prompts[set], &tokenizer, cfg.max_new_tokens_of(set), c.max_seq_len)
                    .with_context(|| format!("{origin}: model `{}`", m.name))?;
            }
            policies.push((m.name.clone(), model));
        }
        let judge = match &cfg.judge {
            Some(j) => Some((init_model(&j.model, &device).with_context(|| format!("{origin}: judge.model"))?.1, j.template.clone())),
            None => None,
        };
        let scorers = Scorers { helpfulness: help, safety: safe, threshold: cfg.safety_threshold, pad: tokenizer.eos_id() };
        Ok(Self { tokenizer, sets, scorers, policies, judge })
    }
}

/// A [tools] set answered with the tools running and without them, as a reader sees the answers
/// (calls removed, results in place).
struct ToolRun {
    answers: Vec<String>,
    /// Share of answers that ran a call.
    call_rate: f64,
    without_tools: Vec<String>,
    /// Share of the tools-off answers that wrote a call.
    without_tools_call_rate: f64,
}

/// `model`'s answers to `prompts`, scored; with a `toolbox` (a [tools] set) through the tool
/// runtime, scored on the sequences the model saw (results included), and answered again with
/// the tools off.
fn answer_set(
    model: &Llama,
    prompts: &[Prompt],
    loaded: &Loaded,
    cfg: &EvalConfig,
    toolbox: Option<&Toolbox>,
) -> anyhow::Result<(ScoredAnswers, Option<ToolRun>)> {
    let (tokenizer, scorers) = (&loaded.tokenizer, &loaded.scorers);
    let Some(toolbox) = toolbox else { return Ok((answer_and_score(model, prompts, tokenizer, scorers, cfg)?, None)) };
    let max_new = cfg.tool_max_new_tokens();
    let with = tool_answers(model, prompts, tokenizer, cfg, Some(toolbox), max_new)?;
    let without: Vec<String> = tool_answers(model, prompts, tokenizer, cfg, None, max_new)?.into_iter().map(|a| a.text).collect();
    let seqs: Vec<Vec<u32>> = with.iter().map(|a| full_sequence(&[], &a.sequence, tokenizer.eos_id())).collect();
    let mut scored = score_sequences(scorers, prompts, &seqs);
    scored.answers = with.into_iter().map(|a| a.text).collect();
    let share = |answers: &[String]| answers.iter().filter(|a| llama_data::tool_markup::has_call(a)).count() as f64 / answers.len().max(1) as f64;
    let read = |answers: &[String]| answers.iter().map(|a| llama_data::tool_markup::visible_text(a)).collect::<Vec<_>>();
    let run = ToolRun {
        answers: read(&scored.answers),
        call_rate: r6(share(&scored.answers)),
        without_tools: read(&without),
        without_tools_call_rate: r6(share(&without)),
    };
    Ok((scored, Some(run)))
}

/// The report of one model on one set: mean rewards, safety violations, expected text; against
/// the `baseline`'s answers (None: this is the baseline) win / tie / loss with its bootstrap
/// interval, and the judge's verdicts in both orders.
fn set_report(
    cfg: &EvalConfig,
    loaded: &Loaded,
    prompts: &[Prompt],
    scored: &ScoredAnswers,
    tool_run: Option<&ToolRun>,
    baseline: Option<&ScoredAnswers>,
) -> anyhow::Result<SetReport> {
    let n = scored.combined.len();
    // Rounded to 1e-6: the backend's threaded reductions may move the last bit of a score from
    // run to run, and a report should not.
    let mean = |v: &[f64]| r6(v.iter().sum::<f64>() / v.len().max(1) as f64);
    let violations = scored.safety.iter().filter(|&&x| sigmoid(x) < cfg.safety_threshold).count();
    // A [tools] set's answers are checked as a reader sees them.
    let read = tool_run.map_or(&scored.answers, |t| &t.answers);
    let mut r = SetReport {
        prompts: n,
        mean_combined: mean(&scored.combined),
        mean_helpfulness: mean(&scored.helpfulness),
        mean_safety: mean(&scored.safety),
        safety_violation_rate: violations as f64 / n.max(1) as f64,
        expected_rate: expected_rate(prompts, read).map(r6),
        expected_rate_by_group: expected_rate_by_group(prompts, read),
        tool_call_rate: tool_run.map(|t| t.call_rate),
        without_tools: tool_run.map(|t| WithoutTools {
            expected_rate: expected_rate(prompts, &t.without_tools).map(r6),
            expected_rate_by_group: expected_rate_by_group(prompts, &t.without_tools),
            tool_call_rate: t.without_tools_call_rate,
        }),
        win_rate: None,
        tie_rate: None,
        loss_rate: None,
        win_rate_ci95: None,
        judge_win_rate: None,
        judge_agreement: None,
        samples: prompts.iter().zip(&scored.answers).take(4).map(|(p, a)| (p.question(), a.clone())).collect(),
    };
    let Some(base) = baseline else { return Ok(r) };
    let (w, t, l) = win_tie_loss(&scored.combined, &base.combined, cfg.tie_margin);
    r.win_rate = Some(w as f64 / n as f64);
    r.tie_rate = Some(t as f64 / n as f64);
    r.loss_rate = Some(l as f64 / n as f64);
    r.win_rate_ci95 = Some(bootstrap_win_rate(&scored.combined, &base.combined, cfg.tie_margin, cfg.bootstrap_samples, 0.95, cfg.seed));
    if let Some((judge, template)) = &loaded.judge {
        let (mut wins, mut agree) = (0usize, 0usize);
        for (i, p) in prompts.iter().enumerate() {
            let q = p.question();
            // Both orders; positive = prefers this model's answer.
            let m = judge_margin(judge, &loaded.tokenizer, template, &q, &scored.answers[i], &base.answers[i])?
                - judge_margin(judge, &loaded.tokenizer, template, &q, &base.answers[i], &scored.answers[i])?;
            let judge_says = m > 0.0;
            wins += usize::from(judge_says);
            agree += usize::from(judge_says == (scored.combined[i] > base.combined[i]));
        }
        r.judge_win_rate = Some(wins as f64 / n as f64);
        r.judge_agreement = Some(agree as f64 / n as f64);
    }
    Ok(r)
}

/// Greedy (or `cfg.temperature`) answers, [`GROUP`] rows decoded at once with continuous
/// batching (prompt `j` of group `g` seeded as `generate` seeds row `j` with `cfg.seed + g`),
/// scored by the reward models.
fn answer_and_score(model: &Llama, prompts: &[Prompt], tokenizer: &Tokenizer, scorers: &Scorers, cfg: &EvalConfig) -> anyhow::Result<ScoredAnswers> {
    let model = model.valid();
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.conversation.prompt_ids(tokenizer)).collect::<Result<_, _>>()?;
    let seeds: Vec<u64> = (0..prompts.len()).map(|i| row_seed(cfg.seed.wrapping_add((i / GROUP) as u64), (i % GROUP) as u64)).collect();
    let out = generate_in_slots(&model, &ids, &sampling(cfg, tokenizer, cfg.max_new_tokens, cfg.seed), &seeds, GROUP, |_, _| {}, |_, _| false)?;
    let seqs: Vec<Vec<u32>> = ids.iter().zip(&out.tokens).map(|(p, r)| full_sequence(p, r, tokenizer.eos_id())).collect();
    let answers: Vec<String> = out.tokens.iter().map(|r| tokenizer.decode(r)).collect::<Result<_, _>>()?;
    Ok(ScoredAnswers { answers, ..score_sequences(scorers, prompts, &seqs) })
}

/// Rows decoded at once, and prompts per reward-model batch.
const GROUP: usize = 16;

fn sampling(cfg: &EvalConfig, tokenizer: &Tokenizer, max_new_tokens: usize, seed: u64) -> SamplingConfig {
    SamplingConfig { temperature: cfg.temperature, top_k: None, top_p: None, max_new_tokens, eos_id: Some(tokenizer.eos_id()), seed, logprobs: false }
}

/// The scores of prompt + answer sequences (answers left empty for the caller), scored in groups
/// of [`GROUP`] prompts.
fn score_sequences(scorers: &Scorers, prompts: &[Prompt], seqs: &[Vec<u32>]) -> ScoredAnswers {
    let (mut comb, mut hs, mut ss) = (vec![], vec![], vec![]);
    for (group, seqs) in prompts.chunks(GROUP).zip(seqs.chunks(GROUP)) {
        let group_refs: Vec<&Prompt> = group.iter().collect();
        for score in scorers.score(seqs, &group_refs) {
            comb.push(logit(score.combined));
            hs.push(score.helpfulness);
            ss.push(score.safety);
        }
    }
    ScoredAnswers { answers: vec![], combined: comb, helpfulness: hs, safety: ss }
}

/// Answers through the tool runtime (`toolbox` None: tools off), in groups of [`GROUP`] prompts.
fn tool_answers(
    model: &Llama,
    prompts: &[Prompt],
    tokenizer: &Tokenizer,
    cfg: &EvalConfig,
    toolbox: Option<&Toolbox>,
    max_new_tokens: usize,
) -> anyhow::Result<Vec<llama_tools::ToolAnswer>> {
    let model = model.valid();
    let mut answers = vec![];
    for (g, group) in prompts.chunks(GROUP).enumerate() {
        // The runtime seeds each row from the seed it is given (`sampling`'s is not used).
        let mut source = llama_tools::ModelContinue { model: &model, sampling: sampling(cfg, tokenizer, max_new_tokens, 0), slots: usize::MAX };
        let chats: Vec<Conversation> = group.iter().map(|p| p.conversation.clone()).collect();
        answers.extend(llama_tools::answer(&mut source, tokenizer, &chats, toolbox, max_new_tokens, model.max_seq_len(), cfg.seed.wrapping_add(g as u64))?);
    }
    Ok(answers)
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
