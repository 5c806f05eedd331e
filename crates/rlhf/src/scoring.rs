//! Scoring answers: the frozen reward models, the safety-gated combination, generation of
//! scored answers, the trainer's log-probs, and the held-out evaluation.

use anyhow::{Context, bail};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use llama_data::Tokenizer;
use llama_data::prompts::{Prompt, expected_rate};
use llama_model::generate::{SamplingConfig, generate_in_slots, row_seeds};
use llama_model::{Llama, LlamaConfig};
use llama_reward::scoring::{Scorers, Scores, full_sequence, logit};
use llama_reward::{RewardModel, load_reward_model, right_pad};

use crate::config::{EvalConfig, RlhfConfig};

/// The policy's answers to `prompts` (token ids `ids`) under `sampling`, `slots` rows decoded at
/// once (continuous batching; `usize::MAX`: all in one batch; row `i` seeded as `generate` seeds
/// it), scored: (answer tokens, prompt + answer sequences as scored, scores). With `tools`,
/// each answer's calls are run and their results appended ([`llama_tools::answer`]); its tokens
/// are then those after the prompt in the sequence the policy saw last (results included), and
/// that sequence is what is scored.
pub(crate) fn scored_answers(
    policy: &Llama,
    ids: &[Vec<u32>],
    prompts: &[&Prompt],
    tokenizer: &Tokenizer,
    scorers: &Scorers,
    sampling: &SamplingConfig,
    slots: usize,
    tools: Option<&llama_tools::Toolbox>,
) -> anyhow::Result<(Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Scores>)> {
    let sampling = SamplingConfig { eos_id: Some(tokenizer.eos_id()), ..sampling.clone() };
    let tokens: Vec<Vec<u32>> = match tools {
        None => generate_in_slots(policy, ids, &sampling, &row_seeds(sampling.seed, ids.len()), slots, |_, _| {}, |_, _| false)?.tokens,
        Some(toolbox) => {
            let chats: Vec<llama_data::chat::Conversation> = prompts.iter().map(|p| p.conversation.clone()).collect();
            let mut source = llama_tools::ModelContinue { model: policy, sampling: sampling.clone(), slots };
            let answers = llama_tools::answer(&mut source, tokenizer, &chats, Some(toolbox), sampling.max_new_tokens, policy.max_seq_len(), sampling.seed)?;
            // The prompt's ids begin the sequence (it is encoded with the answer as one string,
            // and the template's prompt ends where a word does); should a tokenizer merge across,
            // the answer's text is encoded after the prompt instead.
            ids.iter()
                .zip(&answers)
                .map(|(head, a)| match a.sequence.strip_prefix(head.as_slice()) {
                    Some(rest) => Ok(rest.to_vec()),
                    None => tokenizer.encode(&a.text, false, a.stopped_on_eos),
                })
                .collect::<Result<_, _>>()?
        }
    };
    let seqs: Vec<Vec<u32>> = ids.iter().zip(&tokens).map(|(p, r)| full_sequence(p, r, tokenizer.eos_id())).collect();
    // Scored `slots` rows at a time: the reward models' batches stay the generation's size.
    let scores = seqs.chunks(slots).zip(prompts.chunks(slots)).flat_map(|(seqs, prompts)| scorers.score(seqs, prompts)).collect();
    Ok((tokens, seqs, scores))
}

/// The policy's greedy answers, scored: what the held-out evaluation always includes, and the
/// answer that competes with the K samples under `include_greedy`.
pub(crate) fn greedy_answers(
    policy: &Llama,
    ids: &[Vec<u32>],
    prompts: &[&Prompt],
    tokenizer: &Tokenizer,
    scorers: &Scorers,
    max_new: usize,
    slots: usize,
    tools: Option<&llama_tools::Toolbox>,
) -> anyhow::Result<(Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Scores>)> {
    scored_answers(policy, ids, prompts, tokenizer, scorers, &SamplingConfig::greedy(max_new), slots, tools)
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

/// [`HeldOut`] of `policy` against `reference`. With `tools` the answers are made as the samples
/// are (the calls run, their results appended, [`scored_answers`]), so the held-out reward rates
/// the policy as it answers; the KL then counts the result tokens too, which neither model wrote
/// but both read.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    policy: &Llama,
    reference: &Llama,
    prompts: &[Prompt],
    tokenizer: &Tokenizer,
    scorers: &Scorers,
    max_new: usize,
    eval: &EvalConfig,
    tools: Option<&llama_tools::Toolbox>,
) -> anyhow::Result<HeldOut> {
    let policy = policy.valid();
    let reference = reference.valid();
    // Groups of 16 prompts, dealt over the ranks of an MPI job and gathered in prompt order: each
    // group is answered in the same batches whichever rank takes it.
    let groups: Vec<&[Prompt]> = prompts.chunks(16).collect();
    let world = llama_trainer::distributed::world();
    let mine: anyhow::Result<Vec<GroupHeldOut>> =
        world.dealt(groups.len()).map(|g| held_out_group(&policy, &reference, g, groups[g], tokenizer, scorers, max_new, eval, tools)).collect();
    let mine = world.all_ok(mine, || "another rank failed in the held-out evaluation".into())?;
    let (mut rewards, mut combined, mut kls, mut samples) = (vec![], vec![], vec![], vec![]);
    let (mut answered, mut texts): (Vec<&Prompt>, Vec<String>) = (vec![], vec![]);
    for (group, part) in groups.iter().zip(world.gather_dealt(groups.len(), mine)?) {
        rewards.extend(part.rewards);
        combined.extend(part.combined);
        kls.extend(part.kls);
        // The greedy answers come first: one per prompt.
        samples.extend(group.iter().map(Prompt::question).zip(part.texts.iter().cloned()));
        answered.extend(group.iter().cycle().take(part.texts.len()));
        texts.extend(part.texts);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(HeldOut { reward: mean(&rewards), combined: mean(&combined), kl: mean(&kls), expected: expected_rate(answered, &texts), samples })
}

/// One group's part of [`evaluate`], as a rank sends it to the others: per answer (the greedy
/// ones first, then each round of sampled ones, a row per prompt) its logit(Rc), Rc, KL and text.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct GroupHeldOut {
    rewards: Vec<f64>,
    combined: Vec<f64>,
    kls: Vec<f64>,
    texts: Vec<String>,
}

/// Group `g` of [`evaluate`]: its greedy answers, then each round of sampled ones with its fixed
/// seed (by group and round), scored.
fn held_out_group(
    policy: &Llama,
    reference: &Llama,
    g: usize,
    group: &[Prompt],
    tokenizer: &Tokenizer,
    scorers: &Scorers,
    max_new: usize,
    eval: &EvalConfig,
    tools: Option<&llama_tools::Toolbox>,
) -> anyhow::Result<GroupHeldOut> {
    let ids: Vec<Vec<u32>> = group.iter().map(|p| p.conversation.prompt_ids(tokenizer)).collect::<Result<_, _>>()?;
    let refs: Vec<&Prompt> = group.iter().collect();
    let samplings = std::iter::once(SamplingConfig::greedy(max_new)).chain((0..eval.samples_per_prompt).map(|s| SamplingConfig {
        temperature: eval.temperature,
        top_k: None,
        top_p: None,
        max_new_tokens: max_new,
        eos_id: None,
        seed: eval.seed.wrapping_mul(1_000_003).wrapping_add((g * eval.samples_per_prompt + s) as u64),
        logprobs: false,
    }));
    let mut part = GroupHeldOut { rewards: vec![], combined: vec![], kls: vec![], texts: vec![] };
    for sampling in samplings {
        let (answers, seqs, scores) = scored_answers(policy, &ids, &refs, tokenizer, scorers, &sampling, usize::MAX, tools)?;
        for s in scores {
            part.rewards.push(logit(s.combined));
            part.combined.push(s.combined);
        }
        part.kls.extend(sequence_kls(policy, reference, &ids, &seqs, scorers.pad));
        for r in &answers {
            part.texts.push(tokenizer.decode(r)?);
        }
    }
    Ok(part)
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

pub(crate) fn samples_text(samples: &[(String, String)], n: usize) -> String {
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
    policy_config.check_vocabulary(origin, tokenizer.vocab_size())?;
    // Frozen: no gradients, no optimizer state, the weights in the compute dtype.
    let frozen = |m: RewardModel| cfg.precision().compute_copy(&m.valid());
    Ok(Scorers { helpfulness: frozen(helpfulness), safety: frozen(safety), threshold: cfg.data.safety_threshold, pad: tokenizer.eos_id() })
}
