//! PPO: rollouts, the clipped losses, one gradient step per minibatch, and the resumable loop.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use llama_data::Tokenizer;
use llama_data::prompts::{Prompt, load_prompts_for};
use llama_model::Llama;
use llama_model::generate::{Generation, SamplingConfig, generate};
use llama_model::recompute::{MemorySaving, with_memory_saving};
use llama_reward::scoring::{Scorers, Scores, full_sequence, logit};
use llama_reward::{RewardModel, load_reward_model, right_pad};
use llama_trainer::Metrics;
use llama_trainer::checkpoint::{Checkpoints, init_model};
use llama_trainer::config::OptimConfig;
use llama_trainer::optim::{Optimizer, clip_global_norm};
use llama_trainer::test_hooks::kill_point;
use serde::{Deserialize, Serialize};

use crate::config::{PpoConfig, RlhfConfig};
use crate::math::{Whitener, gae, kl_k1, token_rewards, whiten_advantages};
use crate::scoring::{HeldOut, evaluate, load_scorers, samples_text, token_logprobs};

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
    let sampling =
        SamplingConfig { temperature: cfg.temperature, top_k: None, top_p: None, max_new_tokens: cfg.max_new_tokens, eos_id: Some(tokenizer.eos_id()), seed };
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

/// PPO from `start` (the SFT or rejection-sampling policy); resumable.
pub fn ppo(cfg: &RlhfConfig, start: &Path, resume: bool, stop_after: Option<u64>, origin: &str) -> anyhow::Result<(f64, f64)> {
    let p = &cfg.ppo;
    let tokenizer = cfg.data.load_tokenizer(origin)?;
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
            llama_io::copy_tokenizer_files(&cfg.data.tokenizer, dir)?;
            std::fs::write(dir.join("ppo_state.json"), serde_json::to_string_pretty(&saved)?)?;
            written("ppo_state.json")
        })
    };
    if state.iteration == 0 {
        save_best(&state.policy, &model_config, &cfg.data.tokenizer, &out)?;
        let held_out = evaluate(&state.policy, &state.reference, &eval_prompts, &tokenizer, &scorers, p.max_new_tokens, &cfg.eval, None)?;
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
        if state.iteration > p.value_warmup && (state.iteration.is_multiple_of(p.eval_every) || state.iteration == p.iterations) {
            let held_out = evaluate(&state.policy, &state.reference, &eval_prompts, &tokenizer, &scorers, p.max_new_tokens, &cfg.eval, None)?;
            let (r, kl) = (held_out.reward, held_out.kl);
            metrics.scalars(state.iteration, &held_out.scalars("ppo"))?;
            metrics.text(state.iteration, "ppo/samples", &samples_text(&held_out.samples, 6))?;
            metrics.println(&format!("iteration {}: held-out reward {r:.3}, mean Rc {:.3}, KL {kl:.3}", state.iteration, held_out.combined));
            if state.best_eval.is_none_or(|b| r > b) {
                state.best_eval = Some(r);
                state.evals_without_gain = 0;
                save_best(&state.policy, &model_config, &cfg.data.tokenizer, &out)?;
            } else {
                state.evals_without_gain += 1;
            }
            if p.patience > 0 && state.evals_without_gain >= p.patience {
                metrics.println(&format!("early stop: no held-out gain in {} evaluations", p.patience));
                stopped_early = true;
            }
        }
        let stop_now = stop_after == Some(state.iteration);
        // SIGTERM / SIGINT between iterations: save this one and end (exit 0; --resume goes on).
        let last = state.iteration == p.iterations || stop_now || stopped_early;
        let signal = if last { None } else { llama_trainer::signals::received() };
        if state.iteration.is_multiple_of(p.checkpoint_every) || last || signal.is_some() {
            let checkpoint = save(&state)?;
            if let Some(signal) = signal {
                metrics.finish();
                return Err(llama_trainer::signals::Interrupted { signal, unit: "PPO iteration", step: state.iteration, checkpoint }.into());
            }
        }
        if stop_now || stopped_early {
            break;
        }
    }
    metrics.finish();
    // The result of PPO is the best policy on the held-out prompts (early stopping).
    let (_, best) = init_model(&out.join("best"), &device)?;
    let HeldOut { reward: r, kl, .. } = evaluate(&best, &state.reference, &eval_prompts, &tokenizer, &scorers, p.max_new_tokens, &cfg.eval, None)?;
    println!("best PPO policy (held-out reward {:.3}) in {}", state.best_eval.unwrap_or(r), out.join("best").display());
    Ok((r, kl))
}

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
