//! PPO's rollout: an iteration's prompts sampled from the policy and scored, with the
//! per-token figures the update needs (log-probs, the reference's, values, GAE). In an MPI job
//! the rows are dealt over the ranks and the batch is assembled in row order on every rank.

use burn::module::Module;
use llama_data::Tokenizer;
use llama_data::prompts::Prompt;
use llama_model::generate::{Generation, SamplingConfig, generate_until, row_seed};
use llama_reward::right_pad;
use llama_reward::scoring::{Scorers, Scores, full_sequence, logit};
use serde::{Deserialize, Serialize};

use crate::config::PpoConfig;
use crate::math::{gae, kl_k1, token_rewards, whiten_advantages};
use crate::ppo::PpoState;
use crate::scoring::token_logprobs;

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

/// One rollout row as its rank measured it: what [`rollout`] gathers from the ranks of an MPI
/// job before the batch-wide arithmetic (whitening, GAE), which every rank then does alike.
#[derive(Debug, Serialize, Deserialize)]
struct RolloutRow {
    sequence: Vec<u32>,
    prompt_len: usize,
    /// Per response token: the policy's log-prob (the generator's; the teacher-forced pass's
    /// for an appended EOS), the reference's, and the value.
    logp: Vec<f32>,
    ref_logp: Vec<f32>,
    values: Vec<f64>,
    scores: Scores,
}

/// Samples `prompts` from the policy and builds the batch: scores, whitened rewards, KL against
/// the reference, values, GAE. Row `i` samples with the RNG seeded by `row_seed(seed, i)`; in an
/// MPI job the rows are dealt over the ranks, each measures its own, and every rank assembles
/// the whole batch in row order.
pub fn rollout(state: &mut PpoState, prompts: &[&Prompt], tokenizer: &Tokenizer, scorers: &Scorers, cfg: &PpoConfig, seed: u64) -> anyhow::Result<Rollout> {
    let world = llama_trainer::distributed::world();
    let mine: Vec<usize> = world.dealt(prompts.len()).collect();
    let rows = world.all_ok(rollout_rows(state, prompts, &mine, tokenizer, scorers, cfg, seed), || "another rank failed in the rollout".into())?;
    let rows = world.gather_dealt(prompts.len(), rows)?;
    let logits: Vec<f64> = rows.iter().map(|r| logit(r.scores.combined)).collect();
    state.whitener.update(&logits);
    let whitened: Vec<f64> = logits.iter().map(|&l| state.whitener.whiten(l)).collect();
    let mut out = Rollout {
        sequences: vec![],
        prompt_len: vec![],
        logp: vec![],
        values: vec![],
        advantages: vec![],
        returns: vec![],
        scores: vec![],
        whitened,
        kl: vec![],
    };
    for (i, row) in rows.into_iter().enumerate() {
        let kl = kl_k1(&row.logp, &row.ref_logp);
        let rewards = token_rewards(&kl, cfg.beta, out.whitened[i]);
        let (adv, ret) = gae(&rewards, &row.values, cfg.gamma, cfg.lambda);
        out.kl.push(kl.iter().sum());
        out.sequences.push(row.sequence);
        out.prompt_len.push(row.prompt_len);
        out.logp.push(row.logp);
        out.values.push(row.values);
        out.advantages.push(adv);
        out.returns.push(ret);
        out.scores.push(row.scores);
    }
    whiten_advantages(&mut out.advantages);
    Ok(out)
}

/// The rows `mine` of the rollout of `prompts`: sampled in one batch, scored, with the policy's,
/// the reference's and the value model's per-token figures.
fn rollout_rows(
    state: &PpoState,
    prompts: &[&Prompt],
    mine: &[usize],
    tokenizer: &Tokenizer,
    scorers: &Scorers,
    cfg: &PpoConfig,
    seed: u64,
) -> anyhow::Result<Vec<RolloutRow>> {
    if mine.is_empty() {
        return Ok(vec![]);
    }
    let policy = state.for_passes(&state.policy, &state.policy_copy).valid();
    let prompts: Vec<&Prompt> = mine.iter().map(|&i| prompts[i]).collect();
    let prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.conversation.prompt_ids(tokenizer)).collect::<Result<_, _>>()?;
    let sampling = SamplingConfig {
        temperature: cfg.temperature,
        top_k: None,
        top_p: None,
        max_new_tokens: cfg.max_new_tokens,
        eos_id: Some(tokenizer.eos_id()),
        seed,
        logprobs: false,
    };
    let seeds: Vec<u64> = mine.iter().map(|&i| row_seed(seed, i as u64)).collect();
    let Generation { tokens, .. } = generate_until(&policy, &prompt_ids, &sampling, &seeds, |_, _| {}, |_, _| false)?;
    let eos = tokenizer.eos_id();
    let sequences: Vec<Vec<u32>> = prompt_ids.iter().zip(&tokens).map(|(p, r)| full_sequence(p, r, eos)).collect();
    // The old log-probs come from a teacher-forced pass, as the reference's, not from the
    // sampler: in bf16 the cached decode rounds otherwise than a full pass, and the first
    // update's ratio must be exactly 1. It also covers the appended EOS of a cut response,
    // which is scored but was not sampled.
    let policy_lp = token_logprobs(&policy, &sequences, scorers.pad).into_data().try_to_vec::<f32>().expect("f32");
    let ref_lp = token_logprobs(&state.reference.valid(), &sequences, scorers.pad).into_data().try_to_vec::<f32>().expect("f32");
    let width = sequences.iter().map(Vec::len).max().unwrap_or(1) - 1;
    let value_model = state.for_passes(&state.value, &state.value_copy).valid();
    let device = value_model.head.weight.device();
    let (padded, _) = right_pad(&sequences, scorers.pad, &device);
    let values_all = value_model.values(padded).into_data().try_to_vec::<f32>().expect("f32");
    let full_width = width + 1;
    let scores = scorers.score(&sequences, &prompts);
    Ok(sequences
        .into_iter()
        .zip(scores)
        .enumerate()
        .map(|(i, (sequence, scores))| {
            let prompt_len = prompt_ids[i].len();
            let start = prompt_len - 1;
            let n = sequence.len() - prompt_len;
            let logp = (0..n).map(|j| policy_lp[i * width + start + j]).collect();
            let ref_logp = (0..n).map(|j| ref_lp[i * width + start + j]).collect();
            let values = (0..n).map(|j| values_all[i * full_width + start + j] as f64).collect();
            RolloutRow { sequence, prompt_len, logp, ref_logp, values, scores }
        })
        .collect())
}

/// Response-token mask over `[batch, longest - 1]` targets.
pub(crate) fn response_mask(rollout: &Rollout, idx: &[usize], width: usize) -> Vec<f32> {
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
pub(crate) fn scatter(rollout: &Rollout, idx: &[usize], width: usize, values: impl Fn(usize) -> Vec<f64>) -> Vec<f32> {
    let mut m = vec![0.0; idx.len() * width];
    for (row, &i) in idx.iter().enumerate() {
        let start = rollout.prompt_len[i] - 1;
        for (j, v) in values(i).into_iter().enumerate() {
            m[row * width + start + j] = v as f32;
        }
    }
    m
}
