//! Batched generation with a KV cache: B prompts of different lengths, temperature / top-k /
//! top-p / greedy sampling, per-row stop on EOS or `max_new_tokens`, seeded and reproducible.
//!
//! Prompts are left-padded to a common length and pad keys are masked. RoPE depends only on the
//! distance between a query and a key, so a row shifted right by its padding sees exactly the
//! attention it would see unpadded (up to float rounding): the logits equal those of a full forward
//! pass over the row alone.
//!
//! The log-probability returned for each generated token is that of the model's own distribution
//! (log-softmax of the raw logits, temperature 1, no top-k/top-p filtering): the quantity PPO's
//! trainer recomputes, so the two can be compared directly.

use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;

use crate::decode_projection::PackedVocab;
use crate::device::is_flex;
use crate::flex_kernels::wide;
use crate::{KvCache, Llama, ModelError, Positions};

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (None or 0: no limit).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` (None or >= 1: no limit).
    pub top_p: Option<f32>,
    pub max_new_tokens: usize,
    /// Stop a row when it produces this token (it is included in the output).
    pub eos_id: Option<u32>,
    pub seed: u64,
    /// Return each generated token's log-probability ([`Generation::logprobs`]). Off by
    /// default, as in Hugging Face `generate` (`output_scores`): at greedy it is a pass of `exp`
    /// over the vocabulary per row and token, a tenth of a decoding step at batch 64.
    pub logprobs: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: None, top_p: None, max_new_tokens: 64, eos_id: Some(2), seed: 0, logprobs: false }
    }
}

impl SamplingConfig {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { temperature: 0.0, max_new_tokens, ..Self::default() }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::Generation(format!("temperature must be >= 0, got {}", self.temperature)));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ModelError::Generation(format!("top_p must be in (0, 1], got {p}")));
        }
        Ok(())
    }
}

/// What [`generate`] returns, one entry per prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated tokens (the prompt excluded; the EOS included when the row stopped on it).
    pub tokens: Vec<Vec<u32>>,
    /// `log p(token | prefix)` under the model, for each generated token, where
    /// [`SamplingConfig::logprobs`] asks for them (empty rows otherwise).
    pub logprobs: Vec<Vec<f32>>,
    /// Whether the row stopped on EOS (false: it hit `max_new_tokens`).
    pub stopped_on_eos: Vec<bool>,
}

/// Incremental decoder over a batch of slots, each holding one sequence: [`generate_in_slots`]
/// drives it, tests use it to compare cached logits with full forward passes.
///
/// The slots' sequences sit in one preallocated KV cache, each from its own start; while every
/// slot's next token has the same position (prompts left-padded to a common length, decoded in
/// lock step) a step is one plain cached forward. When a finished slot takes a new prompt
/// ([`BatchDecoder::refill`]), the slots' positions part, and a step rotates and writes each
/// row at its own position and masks each row's keys to its own span.
pub struct BatchDecoder<'a> {
    model: &'a Llama,
    cache: KvCache,
    /// The first key of each slot's sequence (its left padding).
    start: Vec<usize>,
    /// The position of each slot's next input token.
    position: Vec<usize>,
    /// On flex in f32, the output projection's weight made once, at the first step (see
    /// [`Projection`]).
    projection: std::cell::OnceCell<Option<Projection>>,
    /// The last step's logits, handed back by [`BatchDecoder::recycle`] for the next step to
    /// write into (no allocation of the logits per token).
    spare_logits: Vec<f32>,
    device: Device,
}

impl<'a> BatchDecoder<'a> {
    /// Feeds the prompts and returns the logits for the first new token of each row.
    ///
    /// # Shapes
    /// - output: `[batch, vocab]`
    pub fn prefill(model: &'a Llama, prompts: &[Vec<u32>], max_new_tokens: usize) -> Result<(Self, Tensor<2>), ModelError> {
        let longest = check_prompts(model, prompts, max_new_tokens)?;
        Self::prefill_within(model, prompts, longest + max_new_tokens)
    }

    /// [`BatchDecoder::prefill`] into a cache of `capacity` positions per slot (checked prompts).
    fn prefill_within(model: &'a Llama, prompts: &[Vec<u32>], capacity: usize) -> Result<(Self, Tensor<2>), ModelError> {
        let mut cache = KvCache::for_model(model, prompts.len(), capacity);
        let (pad, hidden) = left_padded_forward(model, prompts, &mut cache);
        let [batch, longest, dim] = hidden.dims();
        let last = model.project(hidden.slice([0..batch, longest - 1..longest, 0..dim])).squeeze_dim::<2>(1);
        let device = model.device();
        Ok((Self { model, cache, start: pad, position: vec![longest; batch], projection: std::cell::OnceCell::new(), spare_logits: Vec::new(), device }, last))
    }

    /// Puts new prompts into slots `slots` (`prompts[j]` into `slots[j]`): all of each prompt
    /// but its last token goes into the cache now; the returned last tokens are the slots' next
    /// inputs, so that the following [`BatchDecoder::step`] gives their first logits.
    pub fn refill(&mut self, slots: &[usize], prompts: &[&[u32]]) -> Vec<u32> {
        let heads: Vec<Vec<u32>> = prompts.iter().map(|p| p[..p.len() - 1].to_vec()).collect();
        let longest = heads.iter().map(Vec::len).max().unwrap_or(0);
        if longest > 0 {
            let mut fresh = KvCache::for_model(self.model, slots.len(), longest);
            let (pad, _) = left_padded_forward(self.model, &heads, &mut fresh);
            self.cache.copy_rows(slots, &fresh, longest);
            for (&slot, pad) in slots.iter().zip(pad) {
                self.start[slot] = pad;
            }
        } else {
            slots.iter().for_each(|&slot| self.start[slot] = 0);
        }
        slots.iter().for_each(|&slot| self.position[slot] = longest);
        prompts.iter().map(|p| p[p.len() - 1]).collect()
    }

    /// Takes back the host values of the last step's logits (read out of its tensor, which on
    /// flex hands over its buffer), so that the next step writes into them instead of a fresh
    /// `[batch, vocab]` buffer.
    pub fn recycle(&mut self, logits: Vec<f32>) {
        self.spare_logits = logits;
    }

    /// Feeds one token per slot and returns the logits for the next one.
    ///
    /// # Shapes
    /// - output: `[batch, vocab]`
    pub fn step(&mut self, next: &[u32]) -> Tensor<2> {
        let batch = self.position.len();
        let ids: Vec<i64> = next.iter().map(|&t| t as i64).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, 1]), &self.device);
        let first = self.position[0];
        let lock_step = self.position.iter().all(|&p| p == first);
        let keys = self.position.iter().max().map_or(0, |&p| p + 1);
        let mask: Vec<bool> = self.start.iter().zip(&self.position).flat_map(|(&s, &p)| (0..keys).map(move |k| k < s || k > p)).collect();
        let mask = Tensor::<3, Bool>::from_data(TensorData::new(mask, [batch, 1, keys]), &self.device);
        let hidden = if lock_step {
            self.cache.set_len(first);
            self.model.forward_cached_hidden(tokens, &mut self.cache, Positions::From(first), Some(mask))
        } else {
            self.model.forward_cached_hidden(tokens, &mut self.cache, Positions::Rows(&self.position), Some(mask))
        };
        // A slot at the end of the cache stays there: only an idle slot gets there (an active one
        // never outgrows its prompt + max_new_tokens), and it rewrites its own last key.
        let last = self.cache.capacity() - 1;
        self.position.iter_mut().for_each(|p| *p = (*p + 1).min(last));
        let (model, device) = (self.model, &self.device);
        let projection =
            self.projection.get_or_init(|| (is_flex(device) && model.tok_embeddings.weight.val().dtype() == DType::F32).then(|| Projection::new(model)));
        let [vocab, dim] = self.model.tok_embeddings.weight.dims();
        match projection {
            Some(Projection::Packed(weight)) => {
                let rows = hidden.reshape([batch, dim]).into_data().try_into_vec::<f32>().expect("flex f32 hidden states");
                let mut logits = std::mem::take(&mut self.spare_logits);
                weight.logits_into(&rows, batch, &mut logits);
                Tensor::from_data(TensorData::new(logits, [batch, vocab]), device)
            }
            Some(Projection::VocabMajor(weight)) => weight.clone().matmul(hidden.reshape([batch, dim]).transpose()).transpose(),
            None => self.model.project(hidden).squeeze_dim::<2>(1),
        }
    }
}

/// The output projection of [`BatchDecoder::step`] on flex in f32, from the weight as a
/// `[vocab, dim]` matrix (the tied embedding, or the output weight transposed).
enum Projection {
    /// Packed for the decoding kernels of [`crate::decode_projection`] (x86-64 with AVX-512 or
    /// AVX2): each step streams it once.
    Packed(PackedVocab),
    /// Elsewhere, contiguous for gemm: a step's logits are `weight · hiddenᵀ`, which gemm
    /// multiplies without repacking the weight the way it does for `hidden · weight` (10
    /// against 13 ms for 32 rows of bench-small).
    VocabMajor(Box<Tensor<2>>),
}

impl Projection {
    fn new(model: &Llama) -> Self {
        let weight = match &model.output {
            Some(output) => output.weight.val().transpose(),
            None => model.tok_embeddings.weight.val(),
        };
        let [vocab, dim] = weight.dims();
        if PackedVocab::supported() {
            let values = weight.into_data().try_into_vec::<f32>().expect("flex f32 weights");
            return Self::Packed(PackedVocab::new(&values, vocab, dim).expect("the kernels' instructions were found"));
        }
        // The tied embedding is contiguous already; the output weight's transpose is copied once.
        Self::VocabMajor(Box::new(match &model.output {
            Some(_) => Tensor::from_data(weight.into_data(), &model.device()),
            None => weight,
        }))
    }
}

/// Checks prompts against the model (none empty, ids in the vocabulary, the longest with
/// `max_new_tokens` within the context) and returns the longest prompt's length.
fn check_prompts(model: &Llama, prompts: &[Vec<u32>], max_new_tokens: usize) -> Result<usize, ModelError> {
    if prompts.is_empty() {
        return Err(ModelError::Generation("no prompts to generate from".into()));
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(ModelError::Generation(format!("prompt {i} is empty (it needs at least a BOS token)")));
    }
    let vocab = model.vocab_size();
    for (i, p) in prompts.iter().enumerate() {
        if let Some(&t) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Generation(format!("prompt {i}: token id {t} is outside the vocabulary (size {vocab})")));
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let total = longest + max_new_tokens;
    if total > model.max_seq_len() {
        return Err(ModelError::Generation(format!(
            "longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's max_seq_len ({})",
            model.max_seq_len()
        )));
    }
    Ok(longest)
}

/// Runs prompts left-padded to the longest (pad keys masked) through the model into `cache`,
/// from position 0; returns each row's padding and the final hidden states.
///
/// # Shapes
/// - output: `[batch, longest, dim]`
fn left_padded_forward(model: &Llama, prompts: &[Vec<u32>], cache: &mut KvCache) -> (Vec<usize>, Tensor<3>) {
    let device = model.device();
    let (batch, longest) = (prompts.len(), prompts.iter().map(Vec::len).max().unwrap_or(0));
    let pad: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut ids = Vec::with_capacity(batch * longest);
    for (p, &n) in prompts.iter().zip(&pad) {
        ids.extend(std::iter::repeat_n(0i64, n));
        ids.extend(p.iter().map(|&t| t as i64));
    }
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, longest]), &device);
    // A pad query may see earlier pads (so no softmax row is empty); a real query never sees a pad.
    let mut mask = Vec::with_capacity(batch * longest * longest);
    for &n in &pad {
        for q in 0..longest {
            for k in 0..longest {
                mask.push(k < n && q >= n);
            }
        }
    }
    let mask = Tensor::<3, Bool>::from_data(TensorData::new(mask, [batch, longest, longest]), &device);
    cache.set_len(0);
    let hidden = model.forward_cached_hidden(tokens, cache, Positions::From(0), Some(mask));
    (pad, hidden)
}

/// Generates up to `config.max_new_tokens` tokens after each prompt.
///
/// Run it on a model without autodiff (`model.valid()` or a plain device): generation keeps no
/// graph. Row `i` draws from its own RNG seeded by `(seed, i)`, so a row's sample depends only on
/// the seed, its prompt and its index.
pub fn generate(model: &Llama, prompts: &[Vec<u32>], config: &SamplingConfig) -> Result<Generation, ModelError> {
    generate_streaming(model, prompts, config, |_, _| {})
}

/// [`generate`], calling `on_token(row, token)` as each token is chosen (for output printed as
/// it is generated); the tokens and their order are [`generate`]'s.
pub fn generate_streaming(model: &Llama, prompts: &[Vec<u32>], config: &SamplingConfig, on_token: impl FnMut(usize, u32)) -> Result<Generation, ModelError> {
    generate_until(model, prompts, config, &row_seeds(config.seed, prompts.len()), on_token, |_, _| false)
}

/// The seed of row `row`'s RNG in [`generate`]: a row's sample depends only on the seed, its
/// prompt and its index.
pub fn row_seed(seed: u64, row: u64) -> u64 {
    seed ^ row.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// [`row_seed`] of rows `0..rows`: the seeds [`generate`] gives its rows.
pub fn row_seeds(seed: u64, rows: usize) -> Vec<u64> {
    (0..rows as u64).map(|row| row_seed(seed, row)).collect()
}

/// The general form, every prompt in one batch: row `i` samples from an RNG seeded by
/// `seeds[i]`, and stops at EOS, at `config.max_new_tokens`, or as soon as `stop(row, tokens so
/// far)` returns true after one of its tokens (a tool call complete, a per-row budget spent);
/// `stopped_on_eos` stays false for a row `stop` ended.
pub fn generate_until(
    model: &Llama,
    prompts: &[Vec<u32>],
    config: &SamplingConfig,
    seeds: &[u64],
    on_token: impl FnMut(usize, u32),
    stop: impl FnMut(usize, &[u32]) -> bool,
) -> Result<Generation, ModelError> {
    generate_in_slots(model, prompts, config, seeds, prompts.len(), on_token, stop)
}

/// [`generate_until`] with continuous batching: `slots` rows decode at once, and a row that
/// finishes hands its slot to the next waiting prompt (prefilled into it), so that no slot idles
/// while prompts wait, as vLLM batches. Each row's tokens are those it gets in any batch (its own
/// RNG, its own keys), up to float rounding; with `slots >= prompts.len()` this is one batch
/// decoded in lock step.
pub fn generate_in_slots(
    model: &Llama,
    prompts: &[Vec<u32>],
    config: &SamplingConfig,
    seeds: &[u64],
    slots: usize,
    mut on_token: impl FnMut(usize, u32),
    mut stop: impl FnMut(usize, &[u32]) -> bool,
) -> Result<Generation, ModelError> {
    config.validate()?;
    let rows = prompts.len();
    if seeds.len() != rows {
        return Err(ModelError::Generation(format!("{} seeds for {rows} prompts", seeds.len())));
    }
    let longest = check_prompts(model, prompts, config.max_new_tokens)?;
    let slots = slots.clamp(1, rows);
    let mut out = Generation { tokens: vec![vec![]; rows], logprobs: vec![vec![]; rows], stopped_on_eos: vec![false; rows] };
    if config.max_new_tokens == 0 {
        return Ok(out);
    }
    let (mut decoder, mut logits) = BatchDecoder::prefill_within(model, &prompts[..slots], longest + config.max_new_tokens)?;
    // Which row each slot decodes (None: idle), and that row's RNG.
    let mut row_in: Vec<Option<usize>> = (0..slots).map(Some).collect();
    let mut rngs: Vec<StdRng> = seeds[..slots].iter().map(|&s| StdRng::seed_from_u64(s)).collect();
    let mut waiting = slots..rows;
    let vocab = model.vocab_size();
    loop {
        let host: Vec<f32> = logits.into_data().convert::<f32>().try_into_vec().map_err(|e| ModelError::Generation(format!("cannot read logits: {e:?}")))?;
        let mut next = vec![config.eos_id.unwrap_or(0); slots];
        // The rows' draws in parallel (each row has its own RNG, so the result does not depend
        // on the threads), then their bookkeeping in slot order.
        let drawn: Vec<Option<(usize, Option<f32>)>> = host
            .par_chunks(vocab)
            .zip(rngs.par_iter_mut())
            .zip(row_in.par_iter())
            .map(|((row_logits, rng), row)| {
                row.map(|_| match config.logprobs {
                    true => {
                        let (token, logprob) = sample_with_logprob(row_logits, config, rng);
                        (token, Some(logprob))
                    }
                    false => (sample(row_logits, config, rng), None),
                })
            })
            .collect();
        decoder.recycle(host);
        for (slot, draw) in drawn.into_iter().enumerate() {
            let (Some((token, logprob)), Some(row)) = (draw, row_in[slot]) else { continue };
            let token = token as u32;
            out.tokens[row].push(token);
            out.logprobs[row].extend(logprob);
            on_token(row, token);
            next[slot] = token;
            let finished = if config.eos_id == Some(token) {
                out.stopped_on_eos[row] = true;
                true
            } else {
                stop(row, &out.tokens[row]) || out.tokens[row].len() == config.max_new_tokens
            };
            if finished {
                row_in[slot] = None;
            }
        }
        // Idle slots take the waiting prompts, in order.
        let idle: Vec<usize> = (0..slots).filter(|&s| row_in[s].is_none()).collect();
        let (refilled, fresh): (Vec<usize>, Vec<&[u32]>) = idle
            .into_iter()
            .zip(waiting.by_ref())
            .map(|(slot, row)| {
                row_in[slot] = Some(row);
                rngs[slot] = StdRng::seed_from_u64(seeds[row]);
                (slot, prompts[row].as_slice())
            })
            .unzip();
        if !refilled.is_empty() {
            for (&slot, token) in refilled.iter().zip(decoder.refill(&refilled, &fresh)) {
                next[slot] = token;
            }
        }
        if row_in.iter().all(Option::is_none) {
            break;
        }
        logits = decoder.step(&next);
    }
    Ok(out)
}

/// `log softmax(logits)[index]`, by the training loss's vectorised log-sum-exp (the libm `exp`
/// over the vocabulary per row and token was a tenth of greedy decoding).
pub fn log_softmax_at(logits: &[f32], index: usize) -> f32 {
    logits[index] - crate::loss::log_sum_exp(logits)
}

/// Picks one token from a row of logits according to `config`, with its log-probability under
/// the model (at temperature 1 whatever `config.temperature`): [`sample`]'s draw, and at
/// temperature 1 without top-k/top-p the log-probability `logit - max - ln(sum)` from the draw's
/// own sum; greedy, the first maximum and `-ln(sum)` (two vectorised passes); otherwise
/// [`log_softmax_at`].
pub fn sample_with_logprob(logits: &[f32], config: &SamplingConfig, rng: &mut StdRng) -> (usize, f32) {
    if config.temperature == 0.0 {
        return wide(|| {
            let (token, max) = first_max(logits);
            (token, -crate::loss::sum_of(logits, |l| crate::flex_kernels::exp_nonpositive(l - max)).ln())
        });
    }
    if config.temperature == 1.0 && plain(config, logits.len()) {
        let (token, max, total) = wide(|| draw_by_blocks(logits, 1.0, rng));
        return (token, ((logits[token] - max) as f64 - total.ln()) as f32);
    }
    let token = sample(logits, config, rng);
    (token, log_softmax_at(logits, token))
}

/// Whether `config` samples from the whole softmax (no top-k, no top-p).
fn plain(config: &SamplingConfig, vocab: usize) -> bool {
    config.top_k.is_none_or(|k| k == 0 || k >= vocab) && config.top_p.is_none_or(|p| p >= 1.0)
}

/// Picks one token from a row of logits according to `config`: the argmax at temperature 0; a
/// draw from the softmax of `logits / temperature` by [`draw_by_blocks`] without top-k/top-p;
/// with them, from the sorted kept tokens.
pub fn sample(logits: &[f32], config: &SamplingConfig, rng: &mut StdRng) -> usize {
    if config.temperature == 0.0 {
        return wide(|| first_max(logits)).0;
    }
    if plain(config, logits.len()) {
        return wide(|| draw_by_blocks(logits, 1.0 / config.temperature, rng)).0;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = config.top_k.filter(|&k| k > 0) {
        order.truncate(k);
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / config.temperature as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = config.top_p.filter(|&p| p < 1.0) {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|&q| {
                cumulative += q;
                cumulative >= p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, &p) in probs.iter().enumerate() {
        if u < p {
            return order[i];
        }
        u -= p;
    }
    order[probs.len() - 1]
}

/// A draw from the softmax of `logits * scale` by the inverse CDF in the vocabulary's order, in
/// two vectorised passes and no buffer of the vocabulary's size (no sort, no libm call per
/// token): the row's maximum, then the sums of the shifted exponentials by blocks of
/// [`DRAW_BLOCK`]; one uniform picks a block by those sums, then a token inside it. Returns the
/// token, the maximum and the sum of all the weights.
#[inline(always)]
fn draw_by_blocks(logits: &[f32], scale: f32, rng: &mut StdRng) -> (usize, f32, f64) {
    let max = crate::loss::max_of(logits);
    let weight = |l: f32| crate::flex_kernels::exp_nonpositive((l - max) * scale);
    let block_sums: Vec<f64> = logits.chunks(DRAW_BLOCK).map(|block| crate::loss::sum_of(block, weight) as f64).collect();
    let total: f64 = block_sums.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (b, &block_sum) in block_sums.iter().enumerate() {
        if u >= block_sum {
            u -= block_sum;
            continue;
        }
        let start = b * DRAW_BLOCK;
        let block = &logits[start..(start + DRAW_BLOCK).min(logits.len())];
        for (i, &l) in block.iter().enumerate() {
            let w = weight(l) as f64;
            if u < w {
                return (start + i, max, total);
            }
            u -= w;
        }
        // The block's sum rounded above its weights' running difference: its last token of
        // positive weight (a positive block sum has one).
        return (start + block.iter().rposition(|&l| weight(l) > 0.0).unwrap_or(0), max, total);
    }
    // Rounding left `u` past the last weight: the last token of positive weight.
    (logits.iter().rposition(|&l| weight(l) > 0.0).unwrap_or(0), max, total)
}

/// Tokens per block of [`draw_by_blocks`]: the inner scan is this long.
const DRAW_BLOCK: usize = 256;

/// The argmax (the first of tied maxima; 0 for none) and the maximum, in two vectorised passes.
#[inline(always)]
fn first_max(logits: &[f32]) -> (usize, f32) {
    let max = crate::loss::max_of(logits);
    (logits.iter().position(|&l| l == max).unwrap_or(0), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> SamplingConfig {
        SamplingConfig { temperature, top_k, top_p, ..SamplingConfig::default() }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(sample(&[0.1, 3.0, -1.0, 2.9], &cfg(0.0, None, None), &mut rng), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        let logits = [0.0, 5.0, 4.9, -3.0];
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            assert_eq!(sample(&logits, &cfg(1.0, Some(1), None), &mut rng), 1);
            // p(1) ~ 0.52, p(2) ~ 0.47: a nucleus of 0.9 holds exactly tokens 1 and 2.
            let t = sample(&logits, &cfg(1.0, None, Some(0.9)), &mut rng);
            assert!(t == 1 || t == 2, "{t}");
        }
    }

    /// Logits ln(1), ln(3): token 1 comes 3/4 of the time at temperature 1, 9/10 at 0.5 (weights
    /// 1 and 9), and the same over a vocabulary of several draw blocks (the two tokens in
    /// different blocks, every other token at -inf).
    #[test]
    fn sampling_follows_the_distribution() {
        let mut wide = vec![f32::NEG_INFINITY; 3 * DRAW_BLOCK + 5];
        (wide[7], wide[2 * DRAW_BLOCK + 3]) = (0.0, 3f32.ln());
        for (logits, one, temperature, want) in
            [(vec![0.0f32, 3f32.ln()], 1, 1.0, 0.75), (vec![0.0f32, 3f32.ln()], 1, 0.5, 0.9), (wide, 2 * DRAW_BLOCK + 3, 1.0, 0.75)]
        {
            let mut rng = StdRng::seed_from_u64(7);
            let n = 20_000;
            let ones = (0..n).filter(|_| sample(&logits, &cfg(temperature, None, None), &mut rng) == one).count();
            let share = ones as f64 / n as f64;
            assert!((share - want).abs() < 0.015, "temperature {temperature}, {} tokens: {share}", logits.len());
        }
    }

    /// The blocked draw of plain sampling follows the softmax (token frequencies within 1.5
    /// points over 20,000 draws of three tokens) and returns log_softmax_at's log-prob (1e-6);
    /// other settings, greedy included, draw as `sample` does, with the same log-prob (1e-6).
    #[test]
    fn plain_sampling_follows_the_distribution_with_its_logprobs() {
        let logits = [0.0f32, 3f32.ln(), 2f32.ln()];
        let mut rng = StdRng::seed_from_u64(3);
        let mut counts = [0usize; 3];
        let n = 20_000;
        for _ in 0..n {
            let (token, logprob) = sample_with_logprob(&logits, &cfg(1.0, None, None), &mut rng);
            assert!((logprob - log_softmax_at(&logits, token)).abs() <= 1e-6, "{logprob} vs {}", log_softmax_at(&logits, token));
            counts[token] += 1;
        }
        for (count, want) in counts.iter().zip([1.0 / 6.0, 3.0 / 6.0, 2.0 / 6.0]) {
            assert!((*count as f64 / n as f64 - want).abs() < 0.015, "{counts:?}");
        }
        for config in [cfg(0.0, None, None), cfg(0.7, None, None), cfg(1.0, Some(2), None), cfg(1.0, None, Some(0.5))] {
            let (mut a, mut b) = (StdRng::seed_from_u64(9), StdRng::seed_from_u64(9));
            for _ in 0..100 {
                let token = sample(&logits, &config, &mut a);
                let (got, logprob) = sample_with_logprob(&logits, &config, &mut b);
                assert_eq!(got, token, "{config:?}");
                assert!((logprob - log_softmax_at(&logits, token)).abs() <= 1e-6, "{config:?}: {logprob}");
            }
        }
        // Greedy picks the first of tied maxima.
        assert_eq!(sample_with_logprob(&[1.0, 3.0, 3.0, -2.0], &cfg(0.0, None, None), &mut rng).0, 1);
    }

    #[test]
    fn log_softmax_matches_formula() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        assert!((log_softmax_at(&l, 2) as f64 - (3.0 - z.ln())).abs() < 1e-6);
    }
}
