//! PPO: the clipped losses, one gradient step per minibatch, and the resumable loop (the
//! rollouts: [`crate::rollout`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use llama_data::Tokenizer;
use llama_data::prompts::{Prompt, load_prompts_for, load_prompts_with_longest};
use llama_model::recompute::{MemorySaving, with_memory_saving};
use llama_model::{Llama, LlamaConfig, OptimizerPlacement, Precision, TrainingMemory};
use llama_reward::scoring::{Scorers, logit};
use llama_reward::{RewardModel, load_reward_model, right_pad};
use llama_trainer::Metrics;
use llama_trainer::checkpoint::{Checkpoints, RunLock, init_model};
use llama_trainer::config::OptimConfig;
use llama_trainer::optim::{Optimizer, StepOptimizer};
use llama_trainer::parallel::device_copy;
use llama_trainer::sharded::ShardedAdamW;
use llama_trainer::test_hooks::kill_point;
use serde::{Deserialize, Serialize};

use crate::config::{PpoConfig, RlhfConfig};
use crate::math::Whitener;
use crate::rollout::{Rollout, response_mask, rollout, scatter};
use crate::scoring::{HeldOut, evaluate, load_scorers, samples_text};

/// The PPO models and state.
pub struct PpoState {
    pub policy: Llama,
    pub value: RewardModel,
    pub reference: Llama,
    /// AdamW of the policy and of the value model: Burn's in one process, sharded over the ranks
    /// of an MPI job (ZeRO-1, as the trainer's).
    pub policy_optim: StepOptimizer,
    pub value_optim: StepOptimizer,
    /// With `run.optimizer = "host"`: the device the passes run on, while `policy` and `value`
    /// (the f32 masters, with their AdamWs) stay on the host. `None`: they train where they are.
    pub passes_on: Option<Device>,
    /// The compute dtype of the passes (`run.dtype`); the reference is held in it.
    pub precision: Precision,
    /// With a host master in bf16: the device copies of the policy and of the value model that
    /// their last updates wrote in the same pass (`StepOptimizer::step_with_copy`), which every
    /// pass reuses until the next update. None before the first update, after a resume and with
    /// f32 passes: each pass then makes its own copy.
    pub policy_copy: Option<Llama>,
    pub value_copy: Option<RewardModel>,
    pub whitener: Whitener,
    pub iteration: u64,
    pub cursor: usize,
    pub best_eval: Option<f64>,
    pub evals_without_gain: u64,
}

impl PpoState {
    /// The model that rollouts, evaluations and the update's passes run on for `master` (the
    /// policy or the value model), in the compute dtype: the master itself in f32, its tracked
    /// cast in bf16, or with a host master its copy on the run's device (the same parameter ids,
    /// so the gradients find the master's parameters): `written` (its `policy_copy` or
    /// `value_copy`) where the last update wrote one, else a fresh `device_copy`.
    pub fn for_passes<M: Module + Clone>(&self, master: &M, written: &Option<M>) -> M {
        match (&self.passes_on, written) {
            (Some(_), Some(copy)) => copy.clone(),
            (Some(device), None) => device_copy(master, self.precision, device),
            (None, _) => self.precision.compute_copy(master),
        }
    }
}

/// The master's gradients from a backward pass through `copy` (its `for_passes` model): a host
/// master's copy has leaves of its own, whose gradients stay on the device for the optimizer to
/// bring down (as the trainer's); otherwise the copy is the master or its tracked cast, whose
/// backward already reached the master's f32 leaves.
fn master_gradients<M: Module>(grads: &mut burn::tensor::Gradients, master: &M, copy: &M, host_master: bool) -> GradientsParams {
    GradientsParams::from_module(grads, if host_master { copy } else { master })
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
/// policy unless `train_policy` is false (the value warm-up). The losses are means over the
/// minibatch's response tokens. In an MPI job the minibatch's rows are dealt over the ranks: each
/// weighs its rows' mean by its share of those tokens, so the gradients summed over ranks (by
/// the sharded AdamW) and the statistics summed are the whole minibatch's.
pub fn ppo_step(state: &mut PpoState, rollout: &Rollout, idx: &[usize], cfg: &PpoConfig, pad: u32, train_policy: bool, saving: MemorySaving) -> StepStats {
    let world = llama_trainer::distributed::world();
    let tokens_of = |rows: &mut dyn Iterator<Item = usize>| rows.map(|i| rollout.logp[i].len()).sum::<usize>() as f64;
    let idx_all = idx;
    let idx: Vec<usize> = world.dealt(idx_all.len()).map(|j| idx_all[j]).collect();
    // 1 in one process (bit for bit the plain mean).
    let share = tokens_of(&mut idx.iter().copied()) / tokens_of(&mut idx_all.iter().copied()).max(1.0);
    let host_master = state.passes_on.is_some();
    let value_model = state.for_passes(&state.value, &state.value_copy);
    let device = value_model.head.weight.device();
    let seqs: Vec<Vec<u32>> = idx.iter().map(|&i| rollout.sequences[i].clone()).collect();
    let width = seqs.iter().map(Vec::len).max().unwrap_or(1) - 1;
    let b = idx.len();
    let t2 = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [b, width]), &device);
    let mask = t2(response_mask(rollout, &idx, width));
    let old_lp = t2(scatter(rollout, &idx, width, |i| rollout.logp[i].iter().map(|&x| x as f64).collect()));
    let adv = t2(scatter(rollout, &idx, width, |i| rollout.advantages[i].clone()));
    let ret = t2(scatter(rollout, &idx, width, |i| rollout.returns[i].clone()));
    let old_v = t2(scatter(rollout, &idx, width, |i| rollout.values[i].clone()));
    let masked_mean = |x: Tensor<2>| masked_mean(x, mask.clone());

    let (tokens, _) = right_pad(&seqs, pad, &device);
    // Value: clipped around the rollout's values.
    let values = with_memory_saving(saving, || value_model.values(tokens.clone())).slice([0..b, 0..width]);
    let value_loss = clipped_value_loss(values, old_v, ret, mask.clone(), cfg.value_clip).mul_scalar(share);
    // This rank's parts: policy loss, value loss, clip fraction, approx KL, entropy.
    let mut parts = [0.0, value_loss.clone().into_scalar::<f32>() as f64, 0.0, 0.0, 0.0];

    // Policy: clipped surrogate (not during the value warm-up).
    let policy = train_policy.then(|| state.for_passes(&state.policy, &state.policy_copy));
    let total = if let Some(policy) = &policy {
        let targets = tokens.clone().slice([0..b, 1..width + 1]).reshape([b * width]);
        let (hidden, lp) = with_memory_saving(saving, || {
            let hidden = policy.forward_hidden(tokens.slice([0..b, 0..width]), None);
            let lp = policy.token_nll(hidden.clone(), targets).neg().reshape([b, width]);
            (hidden, lp)
        });
        let policy_loss = clipped_policy_loss(lp.clone(), old_lp.clone(), adv, mask.clone(), cfg.clip).mul_scalar(share);

        // Diagnostics, detached.
        let log_ratio = (lp.detach() - old_lp).clone();
        let scalar = |x: Tensor<1>| x.into_scalar::<f32>() as f64 * share;
        parts[2] = scalar(masked_mean(log_ratio.clone().exp().sub_scalar(1.0).abs().greater_elem(cfg.clip).float()));
        parts[3] = scalar(masked_mean(log_ratio.clone().exp() - 1.0 - log_ratio));
        let entropy_tok = with_memory_saving(saving, || policy.token_entropy(hidden)).reshape([b, width]);
        parts[4] = scalar(masked_mean(entropy_tok));
        parts[0] = policy_loss.clone().into_scalar::<f32>() as f64;
        // The two models share no parameter, so one backward through the sum gives each its own
        // gradients; the value loss is unweighted, as its own AdamW would undo any constant weight.
        policy_loss + value_loss
    } else {
        value_loss
    };

    let mut grads = total.backward();
    // A host master: each update writes the next passes' device copy in its pass (in bf16).
    let copy_to = state.passes_on.as_ref().map(|device| (device, state.precision));
    if let Some(policy) = &policy {
        let pg = master_gradients(&mut grads, &state.policy, policy, host_master);
        let (pg, norm) = state.policy_optim.gradients(&state.policy, pg, cfg.grad_clip);
        (state.policy, state.policy_copy) = state.policy_optim.step_with_copy(cfg.lr, state.policy.clone(), pg, norm, cfg.grad_clip, copy_to);
    }
    let vg = master_gradients(&mut grads, &state.value, &value_model, host_master);
    let (vg, norm) = state.value_optim.gradients(&state.value, vg, cfg.grad_clip);
    (state.value, state.value_copy) = state.value_optim.step_with_copy(cfg.value_lr, state.value.clone(), vg, norm, cfg.grad_clip, copy_to);
    world.sum_f64(&mut parts);
    let [policy_loss, value_loss, clip_fraction, approx_kl, entropy] = parts;
    StepStats { policy_loss, value_loss, clip_fraction, approx_kl, entropy }
}

/// What PPO ends with: the best policy's held-out reward and its KL to the starting policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PpoResult {
    pub reward: f64,
    pub kl: f64,
}

/// PPO from `start` (the SFT or rejection-sampling policy); resumable. In three parts, as the
/// training loop: [`PpoRun::start`] (a fresh run or a resumed one), [`PpoRun::iteration`] (a
/// rollout and its updates), [`PpoRun::after_iteration`] (log, evaluate, checkpoint, stop).
pub fn ppo(cfg: &RlhfConfig, start: &Path, resume: bool, stop_after: Option<u64>, origin: &str) -> anyhow::Result<PpoResult> {
    let mut run = PpoRun::start(cfg, start, resume, origin)?;
    while run.state.iteration < cfg.ppo.iterations {
        let values = run.iteration()?;
        if run.after_iteration(&values, stop_after)? == Next::Stop {
            break;
        }
    }
    run.finish()
}

/// Whether the loop goes on after an iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Continue,
    Stop,
}

/// One PPO run between its iterations: the models and their state, the prompts and scorers,
/// and the run directory (`OUT/ppo`: locked, its checkpoints, metrics and `best`).
struct PpoRun<'a> {
    cfg: &'a RlhfConfig,
    state: PpoState,
    tokenizer: Tokenizer,
    scorers: Scorers,
    prompts: Vec<Prompt>,
    eval_prompts: Vec<Prompt>,
    /// The policy's `[model]` table, stored in each checkpoint and compared on resume.
    model_config: String,
    /// The evaluation device (the training device's non-autodiff twin).
    device: Device,
    out: PathBuf,
    checkpoints: Checkpoints,
    metrics: Metrics,
    /// Rank 0's hold on the run directory (None on the other ranks of an MPI job).
    _lock: Option<RunLock>,
}

impl<'a> PpoRun<'a> {
    /// Loads the models and data, then resumes from the newest checkpoint (with `resume`) or
    /// evaluates the starting policy (a fresh run refuses a directory holding checkpoints).
    fn start(cfg: &'a RlhfConfig, start: &Path, resume: bool, origin: &str) -> anyhow::Result<Self> {
        let p = &cfg.ppo;
        let tokenizer = cfg.data.load_tokenizer(origin)?;
        // The fit check comes before any model is loaded: the configs, the prompts' lengths.
        let policy_config = llama_trainer::checkpoint::init_config(start).with_context(|| format!("{origin}: policy"))?;
        let (prompts, longest) = load_prompts_with_longest(&cfg.data.prompts, &tokenizer, p.max_new_tokens, policy_config.max_seq_len)?;
        let eval_prompts = load_prompts_for(&cfg.data.eval_prompts, &tokenizer, p.max_new_tokens, policy_config.max_seq_len)?;
        check_ppo_fits(cfg, &policy_config, longest, origin)?;
        let device = llama_trainer::parallel::rank_device(&cfg.run).map_err(anyhow::Error::msg)?;
        device.seed(p.seed);
        let train_device = device.clone().autodiff();
        let (policy_config, policy) = init_model(start, &train_device).with_context(|| format!("{origin}: policy"))?;
        let scorers = load_scorers(cfg, &policy_config, &tokenizer, &device, origin)?;
        // The value model starts from the helpfulness reward model (trainable copy).
        let (_, value) = load_reward_model(&cfg.helpfulness_model, &train_device)?;
        // Frozen: no gradients, no optimizer state, the weights in the compute dtype.
        let reference = cfg.precision().compute_copy(&policy.valid());
        // A host optimizer: the f32 masters and their AdamWs live in host memory, the passes run
        // on copies on the run's device (as the trainer's `run.optimizer = "host"`).
        let host_master = cfg.run.optimizer == OptimizerPlacement::Host;
        let (policy, value) = if host_master {
            let host = Device::flex().autodiff();
            (policy.fork(&host), value.fork(&host))
        } else {
            (policy, value)
        };
        let opt = OptimConfig { lr: p.lr, weight_decay: p.weight_decay, grad_clip: p.grad_clip, ..OptimConfig::default() };
        let out = cfg.run.out_dir.join("ppo");
        // In an MPI job rank 0 holds the run directory and writes what is shared.
        let world = llama_trainer::distributed::world();
        let lock = if world.is_root() { Some(RunLock::acquire(&out)?) } else { None };
        world.barrier();
        let checkpoints = Checkpoints::new(&out);
        if world.is_root() {
            checkpoints.remove_leftovers()?;
        }
        world.barrier();
        let latest = if resume { checkpoints.latest() } else { None };
        // Several ranks: both AdamWs sharded over them; a sharded checkpoint resumes sharded. A
        // host master: the same flat state whole, unless the run resumes Burn's optimizer state.
        let resumed_flat = latest.as_ref().map(|(_, dir)| is_sharded(dir));
        let sharded = llama_trainer::optim::keeps_flat_state(world.is_distributed(), host_master, resumed_flat);
        let (policy_optim, value_optim) = if sharded {
            (StepOptimizer::Sharded(ShardedAdamW::new(&policy, &opt, world)), StepOptimizer::Sharded(ShardedAdamW::new(&value, &opt, world)))
        } else {
            (StepOptimizer::Local(Optimizer::new(&opt)), StepOptimizer::Local(Optimizer::new(&opt)))
        };
        let mut state = PpoState {
            policy,
            value,
            reference,
            policy_optim,
            value_optim,
            passes_on: host_master.then(|| train_device.clone()),
            precision: cfg.precision(),
            policy_copy: None,
            value_copy: None,
            whitener: Whitener::default(),
            iteration: 0,
            cursor: 0,
            best_eval: None,
            evals_without_gain: 0,
        };
        let model_config = llama_trainer::model_config_toml(&policy_config)?;
        match (latest, checkpoints.latest()) {
            (Some((_, dir)), _) => restore(&mut state, &dir, &model_config)?,
            (None, Some((step, _))) if !resume => {
                bail!("{} already holds PPO checkpoints (iteration {step}); pass --resume or choose another --out", out.display())
            }
            _ => {}
        }
        let mut run = Self {
            cfg,
            metrics: Metrics::open(&out, p.iterations, state.iteration)?,
            state,
            tokenizer,
            scorers,
            prompts,
            eval_prompts,
            model_config,
            device,
            out,
            checkpoints,
            _lock: lock,
        };
        if run.state.iteration == 0 {
            if world.is_root() {
                save_best(&run.state.policy, &run.model_config, &cfg.data.tokenizer, &run.out)?;
            }
            let held_out = run.evaluate()?;
            run.metrics.println(&format!("PPO: held-out reward of the starting policy {:.3} (mean Rc {:.3})", held_out.reward, held_out.combined));
            run.state.best_eval = Some(held_out.reward);
        }
        Ok(run)
    }

    /// One iteration: a rollout of the next batch of prompts, then one gradient step per
    /// minibatch (the value model's alone during the warm-up). Returns the iteration's scalars.
    fn iteration(&mut self) -> anyhow::Result<Vec<(&'static str, f64)>> {
        let (p, state) = (&self.cfg.ppo, &mut self.state);
        let batch: Vec<&Prompt> = (0..p.batch_size).map(|i| &self.prompts[(state.cursor + i) % self.prompts.len()]).collect();
        state.cursor = (state.cursor + p.batch_size) % self.prompts.len();
        let seed = p.seed.wrapping_mul(1_000_003).wrapping_add(state.iteration);
        let ro = rollout(state, &batch, &self.tokenizer, &self.scorers, p, seed)?;
        let train_policy = state.iteration >= p.value_warmup;
        let order: Vec<usize> = (0..batch.len()).collect();
        let stats: Vec<StepStats> =
            order.chunks(p.minibatch_size).map(|mb| ppo_step(state, &ro, mb, p, self.scorers.pad, train_policy, self.cfg.memory.memory_saving())).collect();
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
        Ok(values)
    }

    /// After an iteration: its scalars logged; the held-out evaluation when due (keeping the
    /// best policy, counting evaluations without a gain); a checkpoint when due, at the end, or
    /// on SIGTERM / SIGINT (which then ends the run: exit 0, `--resume` goes on).
    fn after_iteration(&mut self, values: &[(&str, f64)], stop_after: Option<u64>) -> anyhow::Result<Next> {
        let p = &self.cfg.ppo;
        let iteration = self.state.iteration;
        self.metrics.scalars(iteration, values)?;
        let value_of = |key: &str| values.iter().find(|(k, _)| *k == key).map_or(f64::NAN, |(_, v)| *v);
        self.metrics.progress(iteration, p.iterations, &format!("reward {:.3} | kl {:.3}", value_of("ppo/reward_combined"), value_of("ppo/kl_k1")));
        kill_point("logged", iteration);
        let mut stopped_early = false;
        // While the policy is frozen its held-out reward is the start's: nothing to evaluate.
        if iteration > p.value_warmup && (iteration.is_multiple_of(p.eval_every) || iteration == p.iterations) {
            let held_out = self.evaluate()?;
            let r = held_out.reward;
            self.metrics.println(&format!("iteration {iteration}: held-out reward {r:.3}, mean Rc {:.3}, KL {:.3}", held_out.combined, held_out.kl));
            if self.state.best_eval.is_none_or(|b| r > b) {
                self.state.best_eval = Some(r);
                self.state.evals_without_gain = 0;
                if llama_trainer::distributed::world().is_root() {
                    save_best(&self.state.policy, &self.model_config, &self.cfg.data.tokenizer, &self.out)?;
                }
            } else {
                self.state.evals_without_gain += 1;
            }
            if p.patience > 0 && self.state.evals_without_gain >= p.patience {
                self.metrics.println(&format!("early stop: no held-out gain in {} evaluations", p.patience));
                stopped_early = true;
            }
        }
        let stop_now = stop_after == Some(iteration) || stopped_early;
        let last = iteration == p.iterations || stop_now;
        // Every rank asks at the same point, so all stop at the same iteration.
        let signal = if last { None } else { llama_trainer::distributed::signal_received_by_any_rank() };
        if iteration.is_multiple_of(p.checkpoint_every) || last || signal.is_some() {
            let checkpoint = self.save()?;
            if let Some(signal) = signal {
                self.metrics.finish();
                return Err(llama_trainer::signals::Interrupted { signal, unit: "PPO iteration", step: iteration, checkpoint }.into());
            }
        }
        Ok(if stop_now { Next::Stop } else { Next::Continue })
    }

    /// The current policy on the held-out prompts, logged at this iteration.
    fn evaluate(&mut self) -> anyhow::Result<HeldOut> {
        let (p, state) = (&self.cfg.ppo, &self.state);
        let held_out = evaluate(
            &state.for_passes(&state.policy, &state.policy_copy),
            &state.reference,
            &self.eval_prompts,
            &self.tokenizer,
            &self.scorers,
            p.max_new_tokens,
            &self.cfg.eval,
            None,
        )?;
        self.metrics.scalars(state.iteration, &held_out.scalars("ppo"))?;
        self.metrics.text(state.iteration, "ppo/samples", &samples_text(&held_out.samples, 6))?;
        Ok(held_out)
    }

    /// Checkpoint `OUT/ppo/checkpoints/step-N`: the policy as a model directory (config.toml +
    /// model.bpk + the tokenizer files, so it loads wherever a model is expected), the value
    /// model, both optimizers and the loop state. The newest `ppo.keep_checkpoints` are kept.
    fn save(&self) -> anyhow::Result<PathBuf> {
        let state = &self.state;
        let saved = PpoSaved {
            iteration: state.iteration,
            cursor: state.cursor,
            whitener: state.whitener.clone(),
            best_eval: state.best_eval,
            evals_without_gain: state.evals_without_gain,
            model_config: self.model_config.clone(),
        };
        // Every rank writes its blocks of sharded optimizer state; rank 0 the rest, and
        // publishes the checkpoint once all succeeded.
        let world = llama_trainer::distributed::world();
        self.checkpoints.save(state.iteration, self.cfg.ppo.keep_checkpoints, world, |dir, written| {
            save_optimizer(&state.policy_optim, dir, POLICY_OPTIMIZER)?;
            save_optimizer(&state.value_optim, dir, VALUE_OPTIMIZER)?;
            if !world.is_root() {
                return Ok(());
            }
            llama_model::checkpoint::save_weights(&state.policy, &dir.join(POLICY))?;
            written(POLICY)?;
            std::fs::write(dir.join(llama_model::checkpoint::NATIVE_CONFIG), &saved.model_config)?;
            llama_io::copy_tokenizer_files(&self.cfg.data.tokenizer, dir)?;
            llama_model::checkpoint::save_weights(&state.value, &dir.join(VALUE))?;
            std::fs::write(dir.join(PPO_STATE), serde_json::to_string_pretty(&saved)?)?;
            written(PPO_STATE)
        })
    }

    /// The result of PPO: the best policy on the held-out prompts (early stopping), evaluated.
    fn finish(self) -> anyhow::Result<PpoResult> {
        self.metrics.finish();
        let (_, best) = init_model(&self.out.join("best"), &self.device)?;
        let p = &self.cfg.ppo;
        let held_out = evaluate(&best, &self.state.reference, &self.eval_prompts, &self.tokenizer, &self.scorers, p.max_new_tokens, &self.cfg.eval, None)?;
        llama_trainer::distributed::world().say(format_args!(
            "best PPO policy (held-out reward {:.3}) in {}",
            self.state.best_eval.unwrap_or(held_out.reward),
            self.out.join("best").display()
        ));
        Ok(PpoResult { reward: held_out.reward, kl: held_out.kl })
    }
}

/// The launch check of PPO ([`llama_trainer::memory::check_ppo_fits`]): its five models in the
/// compute dtype (the trained two with f32 masters) with both AdamWs where `run.optimizer` puts them, minibatches and rollouts of sequences of
/// the longest prompt and answer, against `run.device`.
fn check_ppo_fits(cfg: &RlhfConfig, policy: &LlamaConfig, longest: usize, origin: &str) -> anyhow::Result<()> {
    let reward = llama_reward::reward_model_config(&cfg.helpfulness_model).with_context(|| format!("{origin}: helpfulness_model"))?;
    let precision = cfg.precision();
    let plan = TrainingMemory {
        recompute: cfg.memory.recompute,
        logits_chunk: cfg.memory.memory_saving().logits_chunk,
        // The fused CPU attention keeps its probabilities for the backward pass.
        keeps_attention_probs: TrainingMemory::attention_keeps_probs(precision, llama_model::device::is_cpu(&cfg.run.device)),
        optimizer: cfg.run.optimizer,
        // One process: a host master's gradients come down a parameter at a time.
        streams_gradients: !llama_trainer::distributed::world().is_distributed(),
        ..TrainingMemory::new(precision)
    };
    let (micro_batch, rollout_batch) = (cfg.ppo.minibatch_size, cfg.ppo.batch_size);
    let m = policy.ppo_memory_estimate(&reward, micro_batch, longest, rollout_batch, &plan);
    llama_trainer::memory::check_ppo_fits(&cfg.run, &m, micro_batch, longest, rollout_batch).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    llama_trainer::memory::check_host_fits(&cfg.run, m.host_total(), m.expected_peak(), "PPO", llama_model::host_memory::total_bytes())
        .map_err(|e| anyhow::anyhow!("{origin}: {e}"))
}

/// Restores the models, optimizers and loop state of PPO checkpoint `dir` into `state`.
fn restore(state: &mut PpoState, dir: &Path, model_config: &str) -> anyhow::Result<()> {
    let saved: PpoSaved = serde_json::from_str(&std::fs::read_to_string(dir.join(PPO_STATE))?)?;
    if saved.model_config != model_config {
        bail!("{}: this PPO checkpoint was written for another policy config", dir.display());
    }
    llama_model::checkpoint::load_weights(&mut state.policy, &dir.join(POLICY))?;
    llama_model::checkpoint::load_weights(&mut state.value, &dir.join(VALUE))?;
    (state.policy_copy, state.value_copy) = (None, None);
    load_optimizer(&mut state.policy_optim, dir, POLICY_OPTIMIZER)?;
    load_optimizer(&mut state.value_optim, dir, VALUE_OPTIMIZER)?;
    state.whitener = saved.whitener;
    state.iteration = saved.iteration;
    state.cursor = saved.cursor;
    state.best_eval = saved.best_eval;
    state.evals_without_gain = saved.evals_without_gain;
    llama_trainer::distributed::world().say(format_args!("resumed PPO from {} (iteration {})", dir.display(), state.iteration));
    Ok(())
}

/// The policy's weights are the model directory's `model.bpk`.
const POLICY: &str = llama_trainer::checkpoint::MODEL_FILE;
const VALUE: &str = "value.bpk";
/// The optimizers' states: `NAME.bpk` (Burn's, one process), or the folder `NAME/` of sharded
/// blocks (`NAME/optimizer/block-R-of-N.safetensors`, the trainer's layout).
const POLICY_OPTIMIZER: &str = "policy_optimizer";
const VALUE_OPTIMIZER: &str = "value_optimizer";

fn save_optimizer(optimizer: &StepOptimizer, dir: &Path, name: &str) -> anyhow::Result<()> {
    match optimizer {
        // Local only in one process (several ranks always shard).
        StepOptimizer::Local(o) => o.save(&dir.join(format!("{name}.bpk"))),
        StepOptimizer::Sharded(s) => s.save(&dir.join(name)),
    }
}

fn load_optimizer(optimizer: &mut StepOptimizer, dir: &Path, name: &str) -> anyhow::Result<()> {
    match optimizer {
        StepOptimizer::Local(o) if !ShardedAdamW::is_saved_in(&dir.join(name)) => {
            *o = o.clone().load(&dir.join(format!("{name}.bpk")))?;
            Ok(())
        }
        StepOptimizer::Sharded(s) if ShardedAdamW::is_saved_in(&dir.join(name)) => s.load(&dir.join(name)),
        StepOptimizer::Sharded(_) => {
            bail!("{}: PPO's optimizer state was written by a single process (unsharded); resume it with one process, not under mpirun", dir.display())
        }
        StepOptimizer::Local(_) => unreachable!("a sharded checkpoint is resumed with the sharded optimizer"),
    }
}

/// Whether PPO checkpoint `dir` holds sharded optimizer state.
fn is_sharded(dir: &Path) -> bool {
    ShardedAdamW::is_saved_in(&dir.join(POLICY_OPTIMIZER))
}
const PPO_STATE: &str = "ppo_state.json";

/// Early stopping keeps the policy with the best held-out reward in `OUT/ppo/best` (a model
/// directory: config.toml + model.bpk + the tokenizer files), written atomically.
fn save_best(policy: &Llama, model_config: &str, tokenizer: &Path, out: &Path) -> anyhow::Result<()> {
    llama_io::write_dir_atomic(&out.join("best"), |tmp| -> anyhow::Result<()> {
        llama_model::checkpoint::save_weights(policy, &tmp.join("model.bpk"))?;
        std::fs::write(tmp.join(llama_model::checkpoint::NATIVE_CONFIG), model_config)?;
        llama_io::copy_tokenizer_files(tokenizer, tmp)?;
        Ok(())
    })
}
