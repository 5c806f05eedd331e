//! The Llama 2 transformer, whole, in one file.
//!
//! `tokens -> embedding -> n_layers x [x + attn(norm(x)); h + ffn(norm(h))] -> norm -> output`.
//! Pre-norm RMSNorm (f32 statistics), rotary position embeddings on q and k (Meta's interleaved
//! pair layout), grouped-query attention, SwiGLU feed-forward, no biases anywhere.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};

use crate::LlamaConfig;
use crate::attention::causal_attention;
use crate::decode_attention::one_query_attention;
use crate::device::is_flex;
use crate::loss::token_nll;
use crate::recompute::{memory_saving, rerun_in_backward};
use crate::rms_norm::rms_norm;
use crate::rotary::{rotate_pairs, rotate_rows};
use crate::swiglu::swiglu;

/// Standard deviation of the normal initialisation (as Hugging Face `initializer_range`).
pub const INIT_STD: f64 = 0.02;

fn linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(false).with_initializer(Initializer::Normal { mean: 0.0, std: INIT_STD }).init(device)
}

/// `linear.forward` over `[batch, seq, d_in]`. On the flex (CPU) backend as one `[batch * seq,
/// d_in]` matmul: given the 3-d input, Burn keeps a batched matmul whenever seq is a multiple of
/// 32, and flex then packs the weight once per sequence (the 32000-row output projection 8 times
/// per forward on bench-small) with one thread per sequence; one matmul packs it once and splits
/// the rows. On GPUs Burn's batched 3-d form is the faster one (bench-medium f32 on an H100
/// through Vulkan: backward 0.36 s batched, 0.54 s flattened). Up to 64 rows without autodiff
/// (a decoding step), [`crate::decode_projection::decode_linear`] reads the weight in place
/// instead of gemm's packing it per call.
///
/// # Shapes
/// - x: `[batch, seq, d_in]` -> `[batch, seq, d_out]`
fn apply(linear: &Linear, x: Tensor<3>) -> Tensor<3> {
    if !is_flex(&x.device()) {
        return linear.forward(x);
    }
    over_rows(x, |rows| {
        // A decoding step's few rows, without autodiff: the weight streamed once, unpacked.
        let few_rows = linear.bias.is_none().then(|| crate::decode_projection::decode_linear(&rows, &linear.weight.val())).flatten();
        few_rows.unwrap_or_else(|| linear.forward(rows))
    })
}

/// `f` applied to `x`'s `[batch * seq, d]` rows, the result reshaped back to `[batch, seq, _]`.
fn over_rows(x: Tensor<3>, f: impl FnOnce(Tensor<2>) -> Tensor<2>) -> Tensor<3> {
    let [b, t, d] = x.dims();
    let y = f(x.reshape([b * t, d]));
    let n = y.dims()[1];
    y.reshape([b, t, n])
}

fn norm_layer(config: &LlamaConfig, device: &Device) -> RmsNorm {
    RmsNormConfig::new(config.dim).with_epsilon(config.norm_eps).init(device)
}

/// Rotary position embedding in Meta's interleaved-pair layout: the pair `(x[2i], x[2i+1])` at
/// position `p` is rotated by the angle `p * theta^(-2i / head_dim)`.
///
/// Ours rather than `burn::nn::RotaryEncoding`, which rotates through a matmul with an f32
/// constant: that costs a matmul per call and fails on bf16/f16 inputs (mixed precision). Here the
/// rotation is [`rotate_pairs`]: element-wise, one fused pass on the CPU, the cos/sin tables cast
/// to the input's dtype elsewhere.
#[derive(Module, Debug)]
pub struct Rope {
    /// `[positions, head_dim / 2]` for the first `min(max_seq_len, ROPE_TABLE_POSITIONS)`
    /// positions, constants (never saved or trained).
    pub cos: Tensor<2>,
    pub sin: Tensor<2>,
    pub max_seq_len: usize,
    pub theta: f64,
}

/// Positions whose RoPE angles are tabulated when the model is built (16 MiB at head_dim 128);
/// the angles of later positions are computed when a sequence reaches them. A context length
/// read from a file (`max_position_embeddings`, up to [`crate::config::LIMITS`]) thus never sizes
/// an allocation.
pub const ROPE_TABLE_POSITIONS: usize = 1 << 15;

impl Rope {
    pub fn new(max_seq_len: usize, head_dim: usize, theta: f64, device: &Device) -> Self {
        let (cos, sin) = rope_tables(0..max_seq_len.min(ROPE_TABLE_POSITIONS), head_dim, theta, device);
        Self { cos, sin, max_seq_len, theta }
    }

    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// Rotates `x` whose tokens sit at `at`.
    ///
    /// # Shapes
    /// - x: `[batch, heads, seq, head_dim]` -> same (seq 1 with [`Positions::Rows`])
    pub fn apply(&self, x: Tensor<4>, at: Positions) -> Tensor<4> {
        let start = match at {
            Positions::From(start) => start,
            Positions::Rows(rows) => return self.apply_rows(x, rows),
        };
        let [_, _, t, head_dim] = x.dims();
        if start + t <= self.cos.dims()[0] {
            return rotate_pairs(x, &self.cos, &self.sin, start);
        }
        assert!(start + t <= self.max_seq_len, "positions {start}..{} past max_seq_len {}", start + t, self.max_seq_len);
        let (cos, sin) = rope_tables(start..start + t, head_dim, self.theta, &x.device());
        rotate_pairs(x, &cos, &sin, 0)
    }

    /// Rotates one token per row, row `r`'s at position `rows[r]`.
    fn apply_rows(&self, x: Tensor<4>, rows: &[usize]) -> Tensor<4> {
        let [b, _, t, head_dim] = x.dims();
        assert!(t == 1 && rows.len() == b, "one position per row: {} for x {:?}", rows.len(), x.dims());
        let device = x.device();
        if let Some(&p) = rows.iter().find(|&&p| p >= self.max_seq_len) {
            panic!("position {p} past max_seq_len {}", self.max_seq_len);
        }
        let (cos, sin) = if rows.iter().all(|&p| p < self.cos.dims()[0]) {
            let index = Tensor::<1, Int>::from_data(TensorData::new(rows.iter().map(|&p| p as i64).collect(), [b]), &device);
            (self.cos.clone().select(0, index.clone()), self.sin.clone().select(0, index))
        } else {
            let tables: Vec<(Tensor<2>, Tensor<2>)> = rows.iter().map(|&p| rope_tables(p..p + 1, head_dim, self.theta, &device)).collect();
            let (cos, sin): (Vec<_>, Vec<_>) = tables.into_iter().unzip();
            (Tensor::cat(cos, 0), Tensor::cat(sin, 0))
        };
        rotate_rows(x, cos, sin)
    }
}

/// Where the new tokens of a forward pass sit in their sequences.
#[derive(Debug, Clone, Copy)]
pub enum Positions<'a> {
    /// Every row's tokens at `start..start + seq`: training, prefill, decoding in lock step.
    From(usize),
    /// One token per row, row `r`'s at `rows[r]`: rows that advance independently (continuous
    /// batching, where a finished row's slot takes a new prompt).
    Rows(&'a [usize]),
}

impl Positions<'_> {
    /// One past the last position written.
    fn end(&self, seq: usize) -> usize {
        match self {
            Positions::From(start) => start + seq,
            Positions::Rows(rows) => rows.iter().max().map_or(0, |&p| p + 1),
        }
    }
}

/// cos and sin of the RoPE angles of `positions`, `[positions.len(), head_dim / 2]` each.
pub(crate) fn rope_tables(positions: std::ops::Range<usize>, head_dim: usize, theta: f64, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let (half, rows) = (head_dim / 2, positions.len());
    let (mut cos, mut sin) = (Vec::with_capacity(rows * half), Vec::with_capacity(rows * half));
    for p in positions {
        for i in 0..half {
            let angle = p as f64 * theta.powf(-2.0 * i as f64 / head_dim as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let table = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [rows, half]), device);
    (table(cos), table(sin))
}

/// Causal self-attention with RoPE and grouped-query attention (`n_kv_heads` <= `n_heads`).
#[derive(Module, Debug)]
pub struct Attention {
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    pub fn new(config: &LlamaConfig, device: &Device) -> Self {
        let (d, hd) = (config.dim, config.head_dim());
        Self {
            wq: linear(d, config.n_heads * hd, device),
            wk: linear(d, config.n_kv_heads() * hd, device),
            wv: linear(d, config.n_kv_heads() * hd, device),
            wo: linear(config.n_heads * hd, d, device),
            n_heads: config.n_heads,
            n_kv_heads: config.n_kv_heads(),
            head_dim: hd,
        }
    }

    /// # Shapes
    /// - x: `[batch, seq, dim]`, the new tokens at `at` (`start..start + seq`, or one per row)
    /// - mask: `[batch, seq, keys]` (keys: `start + seq`, or one past the last row's position),
    ///   `true` hides a key (added to the causal mask)
    /// - output: `[batch, seq, dim]`
    pub fn forward(&self, x: Tensor<3>, rope: &Rope, at: Positions, mask: Option<Tensor<3, Bool>>, cache: Option<&mut LayerCache>) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let heads = |y: Tensor<3>, n: usize| y.reshape([b, t, n, self.head_dim]).swap_dims(1, 2);
        let q = rope.apply(heads(apply(&self.wq, x.clone()), self.n_heads), at);
        let k = rope.apply(heads(apply(&self.wk, x.clone()), self.n_kv_heads), at);
        let v = heads(apply(&self.wv, x), self.n_kv_heads);
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v, at),
            None => (k, v),
        };
        let merge = |out: Tensor<4>| apply(&self.wo, out.swap_dims(1, 2).reshape([b, t, self.n_heads * self.head_dim]));
        // A decoding step on the CPU reads the cache in place.
        if let Some(out) = mask.as_ref().filter(|_| t == 1).and_then(|m| one_query_attention(&q, &k, &v, m)) {
            return merge(out);
        }
        let n_rep = self.n_heads / self.n_kv_heads;
        let (k, v) = (repeat_kv(k, n_rep), repeat_kv(v, n_rep));
        let out = match mask {
            None => causal_attention(q, k, v),
            Some(m) => {
                let [_, tq, tk] = m.dims();
                let mask = m.unsqueeze_dim::<4>(1).expand([b, self.n_heads, tq, tk]);
                let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
                attention(q, k, v, Some(mask), None, options)
            }
        };
        merge(out)
    }
}

/// Repeats each key/value head `n_rep` times so that GQA becomes plain multi-head attention.
///
/// # Shapes
/// - x: `[batch, n_kv_heads, seq, head_dim]` -> `[batch, n_kv_heads * n_rep, seq, head_dim]`
fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, h, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([b, h, n_rep, t, d]).reshape([b, h * n_rep, t, d])
}

/// SwiGLU feed-forward: `w2(silu(w1 x) * w3 x)`.
#[derive(Module, Debug)]
pub struct FeedForward {
    pub w1: Linear,
    pub w2: Linear,
    pub w3: Linear,
}

impl FeedForward {
    pub fn new(config: &LlamaConfig, device: &Device) -> Self {
        let (d, f) = (config.dim, config.ffn_hidden());
        Self { w1: linear(d, f, device), w2: linear(f, d, device), w3: linear(d, f, device) }
    }

    /// # Shapes
    /// - x: `[batch, seq, dim]` -> `[batch, seq, dim]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        apply(&self.w2, swiglu(apply(&self.w1, x.clone()), apply(&self.w3, x)))
    }
}

/// One pre-norm transformer block.
#[derive(Module, Debug)]
pub struct Block {
    pub attention_norm: RmsNorm,
    pub attention: Attention,
    pub ffn_norm: RmsNorm,
    pub feed_forward: FeedForward,
}

impl Block {
    pub fn new(config: &LlamaConfig, device: &Device) -> Self {
        Self {
            attention_norm: norm_layer(config, device),
            attention: Attention::new(config, device),
            ffn_norm: norm_layer(config, device),
            feed_forward: FeedForward::new(config, device),
        }
    }

    /// # Shapes
    /// - x: `[batch, seq, dim]` -> `[batch, seq, dim]`
    pub fn forward(&self, x: Tensor<3>, rope: &Rope, at: Positions, mask: Option<Tensor<3, Bool>>, cache: Option<&mut LayerCache>) -> Tensor<3> {
        let h = x.clone() + self.attention.forward(rms_norm(&self.attention_norm, x), rope, at, mask, cache);
        h.clone() + self.feed_forward.forward(rms_norm(&self.ffn_norm, h))
    }
}

/// The Llama decoder: embedding, blocks, final norm, output projection (absent when tied).
#[derive(Module, Debug)]
pub struct Llama {
    pub tok_embeddings: Embedding,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    pub output: Option<Linear>,
    /// RoPE cos/sin tables: constants, not parameters (never saved or trained).
    pub rope: Rope,
}

impl LlamaConfig {
    /// Builds a randomly initialised model (normal, std 0.02; norms at 1) on `device`.
    ///
    /// Burn initialises parameters lazily, at their first use, from the device's random stream:
    /// left lazy, the weights would depend on which code touches them first (a forward pass
    /// reads `w3` before `w2`, a checkpoint or a device copy visits `w2` first). So every
    /// parameter is drawn here, in declaration order.
    pub fn init(&self, device: &Device) -> Llama {
        let model = self.init_lazy(device);
        model.visit(&mut Materialize);
        model
    }

    /// [`LlamaConfig::init`] with the parameters left to draw at first use: for loaders, which
    /// replace every one of them (drawing 7B random weights first would cost a minute).
    pub(crate) fn init_lazy(&self, device: &Device) -> Llama {
        Llama {
            tok_embeddings: EmbeddingConfig::new(self.vocab_size, self.dim).with_initializer(Initializer::Normal { mean: 0.0, std: INIT_STD }).init(device),
            layers: (0..self.n_layers).map(|_| Block::new(self, device)).collect(),
            norm: norm_layer(self, device),
            output: (!self.tie_word_embeddings).then(|| linear(self.dim, self.vocab_size, device)),
            rope: Rope::new(self.max_seq_len, self.head_dim(), self.rope_theta, device),
        }
    }
}

impl Llama {
    /// Next-token logits for every position (causal, no cache).
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]` -> `[batch, seq, vocab]`
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.project(self.forward_hidden(tokens, None))
    }

    /// Final-normed hidden states; `mask` hides extra keys on top of the causal mask (padding,
    /// or the boundaries of packed conversations).
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`, mask: `[batch, seq, seq]` -> `[batch, seq, dim]`
    ///
    /// Under [`crate::recompute::with_memory_saving`] with `recompute_blocks`, a training
    /// forward keeps only each block's input and backward re-runs the block.
    pub fn forward_hidden(&self, tokens: Tensor<2, Int>, mask: Option<Tensor<3, Bool>>) -> Tensor<3> {
        let mut x = self.tok_embeddings.forward(tokens);
        let recompute = memory_saving().recompute_blocks && x.is_autodiff();
        for layer in &self.layers {
            x = if recompute {
                // Constants of the re-run: the RoPE tables off the autodiff graph.
                let (rope, mask) = (self.rope.valid(), mask.clone());
                rerun_in_backward(layer, x, move |block, x| block.forward(x, &rope, Positions::From(0), mask.clone(), None))
            } else {
                layer.forward(x, &self.rope, Positions::From(0), mask.clone(), None)
            };
        }
        rms_norm(&self.norm, x)
    }

    /// Next-token negative log-likelihood of `targets` given final hidden states: the output
    /// projection and [`token_nll`] together. Under [`crate::recompute::with_memory_saving`]
    /// with `logits_chunk = Some(n)`, both run `n` positions at a time and each chunk's logits
    /// are recomputed in backward, so neither the `[batch * seq, vocab]` logits nor their
    /// gradient ever exist whole.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, dim]`, targets: `[batch * seq]` -> `[batch * seq]`
    pub fn token_nll(&self, hidden: Tensor<3>, targets: Tensor<1, Int>) -> Tensor<1> {
        let [b, t, d] = hidden.dims();
        let rows = b * t;
        let hidden = hidden.reshape([rows, d]);
        let chunk = match memory_saving().logits_chunk {
            Some(chunk) if hidden.is_autodiff() && chunk < rows => chunk,
            _ => return token_nll(self.project_rows(hidden), targets),
        };
        assert!(chunk > 0, "logits_chunk must be > 0");
        let nll: Vec<Tensor<1>> = (0..rows)
            .step_by(chunk)
            .map(|r0| {
                let r1 = (r0 + chunk).min(rows);
                let (h, y) = (hidden.clone().slice([r0..r1, 0..d]), targets.clone().slice([r0..r1]));
                match &self.output {
                    Some(output) => rerun_in_backward(output, h, move |output, h| token_nll(logits_f32(output.forward(h)), y.clone())),
                    None => rerun_in_backward(&self.tok_embeddings, h, move |embedding, h| {
                        token_nll(logits_f32(h.matmul(embedding.weight.val().transpose())), y.clone())
                    }),
                }
            })
            .collect();
        Tensor::cat(nll, 0)
    }

    /// Entropy (nats) of the next-token distribution at each position, a diagnostic: computed
    /// off the autodiff graph, `logits_chunk` positions at a time under
    /// [`crate::recompute::with_memory_saving`] (else all at once).
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, dim]` -> `[batch * seq]`
    pub fn token_entropy(&self, hidden: Tensor<3>) -> Tensor<1> {
        let [b, t, d] = hidden.dims();
        let rows = b * t;
        let (plain, hidden) = (self.valid(), hidden.inner().reshape([rows, d]));
        let chunk = memory_saving().logits_chunk.unwrap_or(rows).max(1);
        let entropy: Vec<Tensor<1>> = (0..rows)
            .step_by(chunk)
            .map(|r0| {
                let r1 = (r0 + chunk).min(rows);
                let logp = burn::tensor::activation::log_softmax(plain.project_rows(hidden.clone().slice([r0..r1, 0..d])), 1);
                (logp.clone().exp() * logp).sum_dim(1).reshape([r1 - r0]).neg()
            })
            .collect();
        Tensor::cat(entropy, 0)
    }

    /// [`Llama::project`] of `[rows, dim]` hidden states.
    fn project_rows(&self, hidden: Tensor<2>) -> Tensor<2> {
        logits_f32(match &self.output {
            Some(output) => output.forward(hidden),
            None => hidden.matmul(self.tok_embeddings.weight.val().transpose()),
        })
    }

    /// Runs new tokens through the model, reading and extending `cache`.
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]` at positions `cache.len()..cache.len() + seq`
    /// - mask: `[batch, seq, cache.len() + seq]`, `true` hides a key
    /// - output: logits `[batch, seq, vocab]`
    pub fn forward_cached(&self, tokens: Tensor<2, Int>, cache: &mut KvCache, mask: Option<Tensor<3, Bool>>) -> Tensor<3> {
        let start = cache.len;
        self.project(self.forward_cached_hidden(tokens, cache, Positions::From(start), mask))
    }

    /// [`Llama::forward_cached`] before the output projection, the new tokens at `at` (a
    /// prefill needs only its last position's logits; a cache being filled, none).
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]` (seq 1 with [`Positions::Rows`])
    /// - mask: `[batch, seq, keys]`, keys one past the last position written
    /// - output: `[batch, seq, dim]`
    pub fn forward_cached_hidden(&self, tokens: Tensor<2, Int>, cache: &mut KvCache, at: Positions, mask: Option<Tensor<3, Bool>>) -> Tensor<3> {
        let [_, t] = tokens.dims();
        let mut x = self.tok_embeddings.forward(tokens);
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, &self.rope, at, mask.clone(), Some(layer_cache));
        }
        cache.len = cache.len.max(at.end(t));
        rms_norm(&self.norm, x)
    }

    /// Output projection of hidden states (through the embedding matrix when tied).
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, dim]` -> `[batch, seq, vocab]`
    ///
    /// Logits are f32 whatever the compute dtype, so that log-softmax and the losses built on
    /// it never run in half precision (what PyTorch's autocast does for cross-entropy).
    pub fn project(&self, hidden: Tensor<3>) -> Tensor<3> {
        logits_f32(match &self.output {
            Some(output) => apply(output, hidden),
            None if is_flex(&hidden.device()) => over_rows(hidden, |rows| rows.matmul(self.tok_embeddings.weight.val().transpose())),
            None => hidden.matmul(self.tok_embeddings.weight.val().transpose().unsqueeze()),
        })
    }

    pub fn max_seq_len(&self) -> usize {
        self.rope.max_seq_len()
    }

    /// The device the weights live on (inputs are made there: a data-parallel replica's differs
    /// from the objective's).
    pub fn device(&self) -> Device {
        self.tok_embeddings.weight.device()
    }

    pub fn vocab_size(&self) -> usize {
        self.tok_embeddings.weight.dims()[0]
    }

    /// Replaces a parameter's value, keeping its id (optimizer state stays attached).
    pub(crate) fn set<const D: usize>(param: &mut Param<Tensor<D>>, value: Tensor<D>) {
        let mut new = Param::from_tensor(value);
        new.id = param.id;
        *param = new;
    }
}

/// Draws every lazily initialised parameter (see [`LlamaConfig::init`]).
struct Materialize;

impl burn::module::ModuleVisitor for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.val();
    }
}

/// Logits in f32 whatever the compute dtype (see [`Llama::project`]).
fn logits_f32<const D: usize>(logits: Tensor<D>) -> Tensor<D> {
    // Casting f32 to f32 would still add a node to the autodiff graph.
    if logits.dtype() == DType::F32 { logits } else { logits.cast(DType::F32) }
}

/// Keys and values of one layer for the positions seen so far, preallocated to `max_len`.
/// The buffers are written in place: [`LayerCache::append`] takes them out (so nothing else
/// holds them and the backend writes without a copy; on the CPU a copy of the whole cache per
/// token and layer was most of a decoding step) and puts them back.
#[derive(Debug, Clone)]
pub struct LayerCache {
    k: Option<Tensor<4>>,
    v: Option<Tensor<4>>,
}

impl LayerCache {
    /// Writes the new keys/values at `at` and returns all of them up to the last one written.
    ///
    /// # Shapes
    /// - k, v: `[batch, n_kv_heads, seq, head_dim]` -> `[batch, n_kv_heads, end, head_dim]`
    fn append(&mut self, k: Tensor<4>, v: Tensor<4>, at: Positions) -> (Tensor<4>, Tensor<4>) {
        let [b, h, t, d] = k.dims();
        let end = at.end(t);
        let write = |buffer: &mut Option<Tensor<4>>, new: Tensor<4>| {
            let all = buffer.take().expect("the cache's buffers are put back after every append");
            assert!(end <= all.dims()[2], "KV cache overflow: {end} > {}", all.dims()[2]);
            let all = match at {
                Positions::From(start) => all.slice_assign([0..b, 0..h, start..end, 0..d], new),
                Positions::Rows(rows) => crate::decode_attention::write_at_rows(all, &new, rows),
            };
            *buffer = Some(all.clone());
            all.slice([0..b, 0..h, 0..end, 0..d])
        };
        (write(&mut self.k, k), write(&mut self.v, v))
    }

    /// Copies the first `len` positions of `src`'s row `from` into row `to`.
    fn copy_row(&mut self, to: usize, src: &LayerCache, from: usize, len: usize) {
        let copy = |buffer: &mut Option<Tensor<4>>, src: &Option<Tensor<4>>| {
            let (all, src) = (buffer.take().expect("the cache's buffers are in place"), src.as_ref().expect("the cache's buffers are in place"));
            let [_, h, _, d] = all.dims();
            *buffer = Some(all.slice_assign([to..to + 1, 0..h, 0..len, 0..d], src.clone().slice([from..from + 1, 0..h, 0..len, 0..d])));
        };
        copy(&mut self.k, &src.k);
        copy(&mut self.v, &src.v);
    }
}

/// A key/value cache for incremental decoding, sized for grouped-query attention: it stores
/// `n_kv_heads` heads, not `n_heads`, so 70B's cache is 8x smaller than with MHA.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl KvCache {
    pub fn new(config: &LlamaConfig, batch: usize, max_len: usize, device: &Device) -> Self {
        let shape = [batch, config.n_kv_heads(), max_len, config.head_dim()];
        let layer = || LayerCache { k: Some(Tensor::zeros(shape, device)), v: Some(Tensor::zeros(shape, device)) };
        Self { layers: (0..config.n_layers).map(|_| layer()).collect(), len: 0 }
    }

    /// A cache shaped for `model` (layers, KV heads and head width read off its weights, in its
    /// dtype).
    pub fn for_model(model: &Llama, batch: usize, max_len: usize) -> Self {
        let weight = model.tok_embeddings.weight.val();
        // In the model's dtype: the keys and values written into it are.
        let (device, dtype) = (weight.device(), burn::tensor::FloatDType::from(weight.dtype()));
        let zeros = |shape: [usize; 4]| Some(Tensor::<4>::zeros(shape, &device).cast(dtype));
        let layers = model
            .layers
            .iter()
            .map(|block| {
                let a = &block.attention;
                let shape = [batch, a.n_kv_heads, max_len, a.head_dim];
                LayerCache { k: zeros(shape), v: zeros(shape) }
            })
            .collect();
        Self { layers, len: 0 }
    }

    /// Number of positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the first `len` positions of `src`'s rows into this cache's rows `to` (`to[j]`
    /// takes `src`'s row `j`): prompts prefilled on their own, moved into the slots of a batch.
    pub fn copy_rows(&mut self, to: &[usize], src: &KvCache, len: usize) {
        for (layer, src) in self.layers.iter_mut().zip(&src.layers) {
            for (from, &to) in to.iter().enumerate() {
                layer.copy_row(to, src, from, len);
            }
        }
        self.len = self.len.max(len);
    }

    /// Sets the number of positions in use (the start of the next lock-step forward).
    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    pub fn capacity(&self) -> usize {
        self.layers.first().and_then(|l| l.k.as_ref()).map_or(0, |k| k.dims()[2])
    }
}
