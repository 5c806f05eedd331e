//! Rejection sampling: K samples per prompt, the best across rounds kept in a pool, SFT on it.
//!
//! Resumable by round: after each round's evaluation, `round-N/rs_state.json` records the pool,
//! the best round so far and the starting figures (the round's policy is its fine-tuning's last
//! checkpoint beside it). `rlhf --resume` continues after the newest such round; a round killed
//! before its state was written is run again from its start (its sampling is seeded by round and
//! chunk, so it repeats exactly).

use std::path::{Path, PathBuf};

/// Samples per chunk of prompts: the unit dealt over MPI ranks, sampled with one seed.
const CHUNK_SAMPLES: usize = 256;
/// Rows decoded at once within a chunk; a finished row's slot takes the chunk's next sample.
const GENERATION_SLOTS: usize = 64;

use anyhow::Context;
use burn::module::Module;
use burn::tensor::Device;
use llama_data::Tokenizer;
use llama_data::chat::{Message, Overlong, Role, pack};
use llama_data::prompts::{Prompt, expected_rate, load_prompts_for};
use llama_model::generate::SamplingConfig;
use llama_model::{Llama, LlamaConfig};
use llama_reward::scoring::Scorers;
use llama_reward::scoring::logit;
use llama_tools::Toolbox;
use llama_trainer::checkpoint::{RunLock, init_model};
use llama_trainer::config::{OptimConfig, RunConfig, ScheduleConfig, ScheduleKind, TrainConfig};
use llama_trainer::{LoopConfig, Metrics};

use crate::config::RlhfConfig;
use crate::scoring::{evaluate, greedy_answers, load_scorers, samples_text, scored_answers};

/// What a completed round leaves for a resumed run (`round-N/rs_state.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RoundState {
    round: usize,
    /// Best answer so far per prompt, over all rounds: (combined reward, answer tokens).
    pool: Vec<Option<(f64, Vec<u32>)>>,
    /// The held-out reward to beat and the round that holds it (None: the starting policy).
    best_reward: f64,
    best_round: Option<usize>,
    /// The starting policy's held-out reward and mean Rc (for the round lines).
    start_reward: f64,
    start_combined: f64,
    /// Rows of `metrics.jsonl` once this round was logged (a resumed run keeps exactly these).
    metrics_rows: usize,
}

const ROUND_STATE: &str = "rs_state.json";

fn round_path(out: &Path, round: usize) -> PathBuf {
    out.join(format!("round-{round}"))
}

/// The newest completed round's state under `out` (rounds 1..=`rounds`), if any.
fn latest_round(out: &Path, rounds: usize) -> anyhow::Result<Option<RoundState>> {
    for round in (1..=rounds).rev() {
        let path = round_path(out, round).join(ROUND_STATE);
        if path.is_file() {
            let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
            let state: RoundState = serde_json::from_str(&text).with_context(|| format!("{}: not a rejection-sampling round state", path.display()))?;
            return Ok(Some(state));
        }
    }
    Ok(None)
}

/// Rejection sampling rounds; returns the directory of the final policy (or None if no rounds).
/// With `resume`, continues after the newest completed round under the run directory. Each
/// round: [`RsRun::sample`] (K answers per prompt into the pool), [`RsRun::write_pool`] (the
/// pool as data), [`RsRun::fine_tune`] (SFT on it), [`RsRun::end_round`] (held-out reward,
/// the round's state, a signal's stop).
pub fn rejection_sampling(cfg: &RlhfConfig, origin: &str, resume: bool) -> anyhow::Result<Option<PathBuf>> {
    if cfg.rejection_sampling.rounds == 0 {
        return Ok(None);
    }
    let mut run = RsRun::start(cfg, origin, resume)?;
    for round in run.first_round..=cfg.rejection_sampling.rounds {
        run.sample(round)?;
        let kept = run.write_pool(round)?;
        run.fine_tune(round, kept)?;
        run.end_round(round)?;
    }
    Ok(run.finish())
}

/// One prompt's draws in a round: the K samples' rewards (logit Rc), the greedy answer's (with
/// `include_greedy`) and the best of them all (reward, answer tokens). What a rank sends the
/// others in an MPI job.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PromptDraws {
    rewards: Vec<f64>,
    greedy: Option<f64>,
    best: (f64, Vec<u32>),
}

/// The held-out reward to beat and the round that holds it (None: the starting policy).
#[derive(Debug, Clone, Copy)]
struct Best {
    reward: f64,
    round: Option<usize>,
}

/// The starting policy's held-out figures, which every round's line compares with.
#[derive(Debug, Clone, Copy)]
struct Start {
    reward: f64,
    combined: f64,
}

/// A rejection-sampling run between its steps: models, prompts, scorers, the pool across rounds
/// and the run directory (`OUT/rejection-sampling`, locked).
struct RsRun<'a> {
    cfg: &'a RlhfConfig,
    origin: &'a str,
    tokenizer: Tokenizer,
    toolbox: Option<Toolbox>,
    train_device: Device,
    policy_config: LlamaConfig,
    policy: Llama,
    /// The starting policy, for the held-out KL.
    reference: Llama,
    scorers: Scorers,
    prompts: Vec<Prompt>,
    eval_prompts: Vec<Prompt>,
    out: PathBuf,
    metrics: Metrics,
    /// Best answer so far per prompt, over all rounds: (combined reward, answer tokens).
    pool: Vec<Option<(f64, Vec<u32>)>>,
    best: Best,
    start: Start,
    first_round: usize,
    /// Rank 0's hold on the run directory (None on the other ranks of an MPI job).
    _lock: Option<RunLock>,
}

impl<'a> RsRun<'a> {
    /// Loads the models and prompts, then resumes after the newest completed round (with
    /// `resume`) or evaluates the starting policy.
    fn start(cfg: &'a RlhfConfig, origin: &'a str, resume: bool) -> anyhow::Result<Self> {
        let rs = &cfg.rejection_sampling;
        let tokenizer = cfg.data.load_tokenizer(origin)?;
        let toolbox = rs.tools.as_ref().map(|t| t.toolbox("rejection_sampling.tools")).transpose().map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        let device = llama_trainer::parallel::rank_device(&cfg.run).map_err(anyhow::Error::msg)?;
        let train_device = device.clone().autodiff();
        let (policy_config, mut policy) = init_model(&cfg.policy, &train_device).with_context(|| format!("{origin}: policy"))?;
        let scorers = load_scorers(cfg, &policy_config, &tokenizer, &device, origin)?;
        let prompts = load_prompts_for(&cfg.data.prompts, &tokenizer, rs.max_new_tokens, policy_config.max_seq_len)?;
        let eval_prompts = load_prompts_for(&cfg.data.eval_prompts, &tokenizer, rs.max_new_tokens, policy_config.max_seq_len)?;
        let out = cfg.run.out_dir.join("rejection-sampling");
        // In an MPI job rank 0 holds the run directory and writes its files; every rank samples
        // its share of the prompts and trains its share of each round's batches.
        let world = llama_trainer::distributed::world();
        let lock = if world.is_root() { Some(RunLock::acquire(&out)?) } else { None };
        world.barrier();
        let reference = policy.clone();
        let resumed = if resume { latest_round(&out, rs.rounds)? } else { None };
        let (metrics, pool, best, start, first_round) = match resumed {
            Some(state) => {
                if state.pool.len() != prompts.len() {
                    anyhow::bail!(
                        "{}: its pool has {} prompts, data.prompts has {}; resume with the config it ran with",
                        round_path(&out, state.round).join(ROUND_STATE).display(),
                        state.pool.len(),
                        prompts.len()
                    );
                }
                policy = init_model(&round_path(&out, state.round), &train_device)
                    .with_context(|| format!("resuming rejection sampling after round {}", state.round))?
                    .1;
                let metrics = Metrics::open_after_rows(&out, rs.rounds as u64, state.round as u64, state.metrics_rows)?;
                metrics.println(&format!("rejection sampling: resumed after round {} of {}", state.round, rs.rounds));
                let best = Best { reward: state.best_reward, round: state.best_round };
                (metrics, state.pool, best, Start { reward: state.start_reward, combined: state.start_combined }, state.round + 1)
            }
            None => {
                if world.is_root() {
                    for round in 1..=rs.rounds {
                        // A fresh run: no state of an earlier run may be resumed into this one.
                        let _ = std::fs::remove_file(round_path(&out, round).join(ROUND_STATE));
                    }
                }
                let mut metrics = Metrics::open(&out, rs.rounds as u64, 0)?;
                let start = evaluate(&policy, &policy, &eval_prompts, &tokenizer, &scorers, rs.max_new_tokens, &cfg.eval, toolbox.as_ref())?;
                metrics.scalars(0, &start.scalars("rs"))?;
                metrics.println(&format!("rejection sampling: held-out reward of the starting policy {:.3} (mean Rc {:.3})", start.reward, start.combined));
                let best = Best { reward: start.reward, round: None };
                (metrics, vec![None; prompts.len()], best, Start { reward: start.reward, combined: start.combined }, 1)
            }
        };
        Ok(Self {
            cfg,
            origin,
            tokenizer,
            toolbox,
            train_device,
            policy_config,
            policy,
            reference,
            scorers,
            prompts,
            eval_prompts,
            out,
            metrics,
            pool,
            best,
            start,
            first_round,
            _lock: lock,
        })
    }

    /// K samples per prompt (and the greedy answer with `include_greedy`) from the current
    /// policy, scored; each prompt's best replaces its pool entry when better. Logs the reward
    /// of the best of the first k samples for every k, and the round's means. In an MPI job the
    /// prompts' chunks are dealt over the ranks and their draws gathered in prompt order, so every
    /// rank holds the same pool, the one a single process draws: a chunk is
    /// [`CHUNK_SAMPLES`] samples decoded [`GENERATION_SLOTS`] at a time, seeded by (round, chunk),
    /// whichever rank runs it.
    fn sample(&mut self, round: usize) -> anyhow::Result<()> {
        let rs = &self.cfg.rejection_sampling;
        let per_chunk = (CHUNK_SAMPLES / rs.k).max(1);
        let chunks: Vec<&[Prompt]> = self.prompts.chunks(per_chunk).collect();
        let world = llama_trainer::distributed::world();
        let mine: anyhow::Result<Vec<Vec<PromptDraws>>> = world.dealt(chunks.len()).map(|c| self.draw_chunk(round, c, chunks[c])).collect();
        let mine = world.all_ok(mine, || "another rank failed while sampling".into())?;
        let draws: Vec<PromptDraws> = world.gather_dealt(chunks.len(), mine)?.into_iter().flatten().collect();
        let mut best_of_k = vec![0.0; rs.k];
        let (mut mean_all, mut n_all) = (0.0, 0usize);
        let mut greedy_sum = 0.0;
        for (entry, draw) in self.pool.iter_mut().zip(draws) {
            let mut running = f64::NEG_INFINITY;
            for (k, r) in draw.rewards.iter().enumerate() {
                running = running.max(*r);
                best_of_k[k] += running;
                mean_all += r;
                n_all += 1;
            }
            greedy_sum += draw.greedy.unwrap_or(0.0);
            let (best_r, answer) = draw.best;
            if entry.as_ref().is_none_or(|(r, _)| best_r > *r) {
                *entry = Some((best_r, answer));
            }
        }
        let n = self.prompts.len() as f64;
        for (k, v) in best_of_k.iter().enumerate() {
            self.metrics.scalars(k as u64 + 1, &[(&format!("rs/round{round}/reward_best_of_k") as &str, v / n)])?;
        }
        let pool_mean = self.pool.iter().flatten().map(|(r, _)| r).sum::<f64>() / n;
        let mean_sample = mean_all / n_all.max(1) as f64;
        self.metrics
            .scalars(round as u64, &[("rs/sample_mean_reward", mean_sample), ("rs/max_reward", best_of_k[rs.k - 1] / n), ("rs/pool_mean_reward", pool_mean)])?;
        if rs.include_greedy {
            self.metrics.scalars(round as u64, &[("rs/greedy_mean_reward", greedy_sum / n)])?;
        }
        self.metrics.println(&format!(
            "round {round}: mean sample reward {mean_sample:.3}, best of {} {:.3}, pool {pool_mean:.3}",
            rs.k,
            best_of_k[rs.k - 1] / n
        ));
        Ok(())
    }

    /// The draws of chunk `chunk_i` (`chunk`, its prompts): K samples per prompt seeded by
    /// (round, chunk), decoded [`GENERATION_SLOTS`] at a time with continuous batching (a slot
    /// whose answer ends takes the next sample), the greedy answers with `include_greedy`, all
    /// scored.
    fn draw_chunk(&self, round: usize, chunk_i: usize, chunk: &[Prompt]) -> anyhow::Result<Vec<PromptDraws>> {
        let rs = &self.cfg.rejection_sampling;
        let sampler = self.policy.valid();
        let ids: Vec<Vec<u32>> = chunk.iter().map(|p| p.conversation.prompt_ids(&self.tokenizer)).collect::<Result<_, _>>()?;
        let batch: Vec<Vec<u32>> = ids.iter().flat_map(|p| std::iter::repeat_n(p.clone(), rs.k)).collect();
        let seed = rs.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((round as u64) << 32 | chunk_i as u64);
        let sampling =
            SamplingConfig { temperature: rs.temperature, top_k: None, top_p: None, max_new_tokens: rs.max_new_tokens, eos_id: None, seed, logprobs: false };
        let owners: Vec<&Prompt> = chunk.iter().flat_map(|p| std::iter::repeat_n(p, rs.k)).collect();
        let (samples, _, scores) =
            scored_answers(&sampler, &batch, &owners, &self.tokenizer, &self.scorers, &sampling, GENERATION_SLOTS, self.toolbox.as_ref())?;
        // The policy's own greedy answer competes too: the kept answer is never worse than
        // what the policy already says, so fine-tuning on the pool cannot teach it a worse one.
        let greedy = if rs.include_greedy {
            let refs: Vec<&Prompt> = chunk.iter().collect();
            let (tokens, _, scores) =
                greedy_answers(&sampler, &ids, &refs, &self.tokenizer, &self.scorers, rs.max_new_tokens, GENERATION_SLOTS, self.toolbox.as_ref())?;
            Some((tokens, scores))
        } else {
            None
        };
        Ok((0..chunk.len())
            .map(|j| {
                let rewards: Vec<f64> = (0..rs.k).map(|s| logit(scores[j * rs.k + s].combined)).collect();
                let (best_s, mut best_r) = rewards.iter().enumerate().fold((0, f64::NEG_INFINITY), |acc, (s, r)| if *r > acc.1 { (s, *r) } else { acc });
                let mut answer = samples[j * rs.k + best_s].clone();
                let greedy = greedy.as_ref().map(|(tokens, scores)| {
                    let r = logit(scores[j].combined);
                    if r > best_r {
                        (best_r, answer) = (r, tokens[j].clone());
                    }
                    r
                });
                PromptDraws { rewards, greedy, best: (best_r, answer) }
            })
            .collect())
    }

    /// The pool as text, decoded once: written as data (`pool-round-N.jsonl`, what this round
    /// fine-tunes on) and counted for the expected text. Returns each kept prompt's index and answer.
    fn write_pool(&mut self, round: usize) -> anyhow::Result<Vec<(usize, String)>> {
        let kept: Vec<(usize, &Prompt, f64, String)> = self
            .prompts
            .iter()
            .zip(&self.pool)
            .enumerate()
            .filter_map(|(i, (p, best))| best.as_ref().map(|(r, tokens)| self.tokenizer.decode(tokens).map(|text| (i, p, *r, text))))
            .collect::<Result<_, _>>()?;
        let mut rows = String::new();
        for (_, p, r, text) in &kept {
            let mut row = serde_json::json!({ "prompt": p.question(), "answer": text, "reward": r, "is_safety": p.is_safety });
            if let Some(hit) = p.answer_is_expected(text) {
                row["expected"] = p.expected.clone().into();
                row["contains_expected"] = hit.into();
            }
            rows.push_str(&row.to_string());
            rows.push('\n');
        }
        if llama_trainer::distributed::world().is_root() {
            llama_io::write_atomic(&self.out.join(format!("pool-round-{round}.jsonl")), rows.as_bytes())?;
        }
        let answers: Vec<String> = kept.iter().map(|(_, _, _, text)| text.clone()).collect();
        if let Some(e) = expected_rate(kept.iter().map(|(_, p, _, _)| *p), &answers) {
            self.metrics.scalars(round as u64, &[("rs/pool_expected", e)])?;
        }
        Ok(kept.into_iter().map(|(i, _, _, text)| (i, text)).collect())
    }

    /// The round's fine-tuning: the SFT objective on the kept answers (prompt index, text),
    /// packed, through the shared training loop into `round-N` (its checkpoint is the round's
    /// policy).
    fn fine_tune(&mut self, round: usize, kept: Vec<(usize, String)>) -> anyhow::Result<()> {
        let (cfg, rs) = (self.cfg, &self.cfg.rejection_sampling);
        let chats: Vec<(Vec<u32>, Vec<bool>)> = kept
            .into_iter()
            .map(|(i, text)| {
                let mut c = self.prompts[i].conversation.clone();
                c.messages.push(Message::new(Role::Assistant, text));
                c.tokenize(&self.tokenizer)
            })
            .collect::<Result<_, _>>()?;
        let (packed, _) = pack(&chats, rs.seq_len, self.tokenizer.eos_id(), Overlong::Truncate);
        let packed_len = packed.len();
        let round_dir = round_path(&self.out, round);
        // A step's batch is split over the ranks (validated: batch_size is a multiple of them).
        let world = llama_trainer::distributed::world();
        let micro_batch = rs.batch_size / world.size();
        let mut objective = llama_sft::Sft {
            train: packed,
            eval: vec![],
            eval_chats: vec![],
            tokenizer: self.tokenizer.clone(),
            separate: true,
            // In an MPI job each rank takes every `size`-th draw of the one shuffled sequence.
            sampler: llama_data::sampler::EpochSampler::new(packed_len, u64::MAX, round as u64).for_rank(world.rank(), world.size()),
            device: self.train_device.clone(),
            eval_cfg: llama_sft::SftEval { success_samples: 0, text_samples: 0, max_new_tokens: 1 },
            micro_batch,
        };
        let train = TrainConfig {
            max_steps: Some(rs.sft_steps),
            batch_size: rs.batch_size,
            micro_batch_size: micro_batch,
            log_every: 10,
            eval_every: u64::MAX,
            checkpoint_every: u64::MAX,
            keep_checkpoints: 1,
            recompute: cfg.memory.recompute,
            logits_chunk: cfg.memory.logits_chunk,
            ..TrainConfig::default()
        };
        let schedule = ScheduleConfig { kind: ScheduleKind::Cosine, warmup_steps: 0, min_lr_ratio: 0.0, ..ScheduleConfig::default() };
        // Through LoopConfig::new, so the round's fine-tuning gets the launch checks every stage gets.
        let run = RunConfig { out_dir: round_dir.clone(), ..cfg.run.clone() };
        let optim = OptimConfig { lr: rs.lr, ..OptimConfig::default() };
        let loop_config =
            LoopConfig::new(train, run, optim, &schedule, rs.sft_steps, &self.policy_config, rs.seq_len, &llama_trainer::Overrides::default(), false)
                .with_context(|| format!("{}: rejection_sampling", self.origin))?
                .with_tokenizer(&cfg.data.tokenizer);
        if world.is_root() && round_dir.exists() {
            std::fs::remove_dir_all(&round_dir)?;
        }
        world.barrier();
        let (tuned, _) = llama_trainer::train(self.policy.clone(), &mut objective, &loop_config)?;
        self.policy = tuned;
        Ok(())
    }

    /// The end of a round: the tuned policy's held-out reward (the best round so far kept), the
    /// round's state written (`round-N/rs_state.json`: what a resumed run starts after), and on
    /// SIGTERM / SIGINT the run ends there (exit 0; `--resume` starts the next round).
    fn end_round(&mut self, round: usize) -> anyhow::Result<()> {
        let rs = &self.cfg.rejection_sampling;
        let held_out = evaluate(
            &self.policy,
            &self.reference,
            &self.eval_prompts,
            &self.tokenizer,
            &self.scorers,
            rs.max_new_tokens,
            &self.cfg.eval,
            self.toolbox.as_ref(),
        )?;
        let (r, kl) = (held_out.reward, held_out.kl);
        self.metrics.scalars(round as u64, &held_out.scalars("rs"))?;
        self.metrics.text(round as u64, "rs/samples", &samples_text(&held_out.samples, 6))?;
        let start = self.start;
        self.metrics.println(&format!(
            "round {round}: held-out reward {r:.3} (start {:.3}), mean Rc {:.3} (start {:.3}), KL to the SFT policy {kl:.3}",
            start.reward, held_out.combined, start.combined
        ));
        if !rs.keep_best_round || r > self.best.reward {
            self.best = Best { reward: r, round: Some(round) };
        }
        let state = RoundState {
            round,
            pool: self.pool.clone(),
            best_reward: self.best.reward,
            best_round: self.best.round,
            start_reward: start.reward,
            start_combined: start.combined,
            metrics_rows: llama_trainer::metrics::rows_logged(&self.out),
        };
        let round_dir = round_path(&self.out, round);
        let world = llama_trainer::distributed::world();
        if world.is_root() {
            llama_io::write_atomic(&round_dir.join(ROUND_STATE), serde_json::to_string(&state)?.as_bytes())?;
        }
        world.barrier();
        llama_trainer::test_hooks::kill_point("round", round as u64);
        if round < rs.rounds
            && let Some(signal) = llama_trainer::distributed::signal_received_by_any_rank()
        {
            self.metrics.finish();
            return Err(llama_trainer::signals::Interrupted { signal, unit: "rejection-sampling round", step: round as u64, checkpoint: round_dir }.into());
        }
        Ok(())
    }

    /// The policy PPO starts from: the best round's (with `keep_best_round`) or the last one's;
    /// None when no round beat the starting policy.
    fn finish(self) -> Option<PathBuf> {
        let best_dir = self.best.round.map(|round| round_path(&self.out, round));
        if self.cfg.rejection_sampling.keep_best_round {
            match &best_dir {
                Some(dir) => self.metrics.println(&format!("rejection sampling: keeping {} (held-out reward {:.3})", dir.display(), self.best.reward)),
                None => self.metrics.println(&format!("rejection sampling: no round beat the starting policy ({:.3}); PPO starts from it", self.start.reward)),
            }
        }
        best_dir
    }
}
