//! Causal self-attention: a fused kernel on the CPU, recomputed probabilities elsewhere.
//!
//! Under autodiff Burn 0.22 composes attention from about ten tensor ops (matmul, scale, causal
//! mask built and applied, max, subtract, exp, sum, divide, matmul) and as many more in backward,
//! each a full pass over the `[batch, heads, seq, seq]` scores, and the graph keeps several of
//! those score-sized tensors per layer until backward. [`causal_attention`] takes one of two
//! autodiff ops of our own instead:
//!
//! - On flex (CPU) f32, [`CausalAttentionBackend`]: per (batch, head), in parallel over the rayon
//!   pool, one matmul for the scores, one in-place masked softmax, one matmul for the output;
//!   backward is the four matmuls and one element-wise pass of the softmax gradient. It keeps the
//!   probabilities for backward (one score-sized tensor per layer).
//! - Everywhere else (the cubecl backends: vulkan, wgpu, cuda; flex in other dtypes or with the
//!   fused kernels off), [`RecomputedAttentionBackend`]: the forward is the backend's own
//!   `attention` (on cubecl, with autotune, cubek's flash attention where it launches), and keeps
//!   only q, k, v and the output; backward recomputes the probabilities from q and k, a block of
//!   query rows at a time against the keys up to the block's end (FlashAttention-2's backward
//!   written in Burn's tensor ops, with materialised blocks instead of a fused kernel). No
//!   score-sized tensor outlives its layer's backward, and one block's are bounded by
//!   [`BACKWARD_BLOCK_ELEMENTS`].
//!
//! Queries and keys of different lengths (prefill into a KV cache) and extra masks (padding) go
//! to Burn's `attention`; a decoding step's one query per row on flex f32 goes to
//! [`crate::decode_attention`], which reads the cache in place.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::backend::{TensorMetadata, get_or_init_device_settings};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Shape, Slice, Tensor, TensorData};
use rayon::prelude::*;
use std::cell::Cell;
use std::ops::Range;

use crate::flex_kernels::{contiguous_f32, exp_nonpositive, f32_values};

/// `softmax(q k^T / sqrt(head_dim) + causal mask) v`: query `i` sees keys `0..=i`.
///
/// # Shapes
/// - q, k, v: `[batch, heads, seq, head_dim]` (k and v already repeated to `heads`) -> same
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    if q.dims()[2] != k.dims()[2] || BURN_ATTENTION.get() {
        composed_causal_attention(q, k, v)
    } else if crate::flex_kernels::enabled(&q.device()) && q.dtype() == DType::F32 {
        let out = <Dispatch as CausalAttentionBackend>::causal_attention(q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
        Tensor::from_dispatch(out)
    } else {
        recomputed_causal_attention(q, k, v)
    }
}

thread_local! {
    /// Set by [`with_burn_attention`] for the calling thread.
    static BURN_ATTENTION: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with [`causal_attention`] going to Burn's composed attention on every backend (which
/// keeps the probabilities for backward): for benchmarks that measure what the recomputed op
/// buys (`llama bench --burn-attention`). The backward of a graph follows its forward's path.
pub fn with_burn_attention<R>(f: impl FnOnce() -> R) -> R {
    crate::with_setting(&BURN_ATTENTION, true, f)
}

/// [`causal_attention`] through [`RecomputedAttentionBackend`] (the path on every backend but
/// flex f32): Burn's attention forward, probabilities recomputed by blocks in backward.
///
/// # Shapes
/// - q, k, v: `[batch, heads, seq, head_dim]`, the same `seq` -> same
pub fn recomputed_causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let out = <Dispatch as RecomputedAttentionBackend>::recomputed_attention(q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
    Tensor::from_dispatch(out)
}

/// [`causal_attention`] through Burn's `attention` (composed under autodiff): the reference both
/// autodiff ops are tested against, and the path for a KV cache.
pub fn composed_causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    attention(q, k, v, None, None, CAUSAL)
}

/// Burn's options for plain causal attention (default scale `1 / sqrt(head_dim)`).
const CAUSAL: AttentionModuleOptions = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };

/// The fused attention as a Burn backend extension, implemented for `Flex` and `Autodiff<Flex>`;
/// [`causal_attention`] calls it only on flex tensors.
#[backend_extension(Flex, Autodiff)]
pub trait CausalAttentionBackend: Backend {
    /// The attention output. Shapes as [`causal_attention`].
    fn causal_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The output and the attention probabilities `[batch, heads, seq, seq]` (zero above the
    /// diagonal), which backward needs.
    fn causal_attention_with_probs(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Gradients of q, k and v from the output's gradient.
    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Contiguous f32 values of a flex tensor and its 4 dims.
fn values(t: &FlexTensor) -> (FlexTensor, [usize; 4]) {
    let t = contiguous_f32(t.clone());
    let s = t.layout().shape();
    let dims = [s[0], s[1], s[2], s[3]];
    (t, dims)
}

/// A matrix inside a slice: element `(r, c)` is `data[r * rs + c * cs]`, so a transposed view is
/// the same data with the strides swapped.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// The row-major matrix whose rows are `cols` long.
    fn rows(data: &'a [f32], cols: usize) -> Self {
        Self { data, rs: cols, cs: 1 }
    }

    /// Head `bh`'s `[seq, head_dim]` matrix of a row-major `[batch * heads, seq, head_dim]` slice.
    fn head(data: &'a [f32], bh: usize, t: usize, d: usize) -> Self {
        Self::rows(&data[bh * t * d..][..t * d], d)
    }

    fn t(self) -> Self {
        Self { rs: self.cs, cs: self.rs, ..self }
    }

    /// The sub-matrix from element `(r, c)` on.
    fn at(self, r: usize, c: usize) -> Self {
        Self { data: &self.data[r * self.rs + c * self.cs..], ..self }
    }
}

/// `dst = scale * lhs * rhs` for `lhs` `[m, k]` and `rhs` `[k, n]`; `dst` is row-major with
/// rows `dst_rs` apart. One thread: the callers run one (batch, head) per rayon task.
#[allow(clippy::too_many_arguments)]
fn matmul(dst: &mut [f32], dst_rs: usize, m: usize, n: usize, k: usize, lhs: View, rhs: View, scale: f32) {
    assert!(m == 0 || dst.len() >= (m - 1) * dst_rs + n, "matmul destination too small");
    let last = |v: View, rows: usize, cols: usize| (rows == 0 || cols == 0) || (rows - 1) * v.rs + (cols - 1) * v.cs < v.data.len();
    assert!(last(lhs, m, k) && last(rhs, k, n), "matmul operand outside its slice");
    // SAFETY: the asserts above keep every element gemm reads or writes inside the slices; dst
    // does not alias the inputs (a `&mut` borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Query rows per block: block `[r0, r1)` is scored against keys `0..r1` only, so the matmuls
/// skip all but the diagonal blocks above the causal diagonal (about 44% of the FLOPs at 512
/// positions, instead of the full square).
pub(crate) const BLOCK: usize = 64;

/// The starts and ends of the query blocks of a sequence of `t` positions.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(BLOCK).map(move |r0| (r0, (r0 + BLOCK).min(t)))
}

impl CausalAttentionBackend for Flex {
    fn causal_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor) -> FlexTensor {
        Self::causal_attention_with_probs(q, k, v).0
    }

    fn causal_attention_with_probs(q: FlexTensor, k: FlexTensor, v: FlexTensor) -> (FlexTensor, FlexTensor) {
        let ((q, [b, h, t, d]), (k, _), (v, _)) = (values(&q), values(&k), values(&v));
        let (q, k, v) = (f32_values(&q), f32_values(&k), f32_values(&v));
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; b * h * t * d];
        let mut probs = vec![0f32; b * h * t * t];
        out.par_chunks_mut(t * d).zip(probs.par_chunks_mut(t * t)).enumerate().for_each(|(bh, (out, p))| {
            let (q, k, v) = (View::head(q, bh, t, d), View::head(k, bh, t, d), View::head(v, bh, t, d));
            for (r0, r1) in blocks(t) {
                // scores of queries r0..r1 against keys 0..r1 (k^T: k's strides swapped)
                matmul(&mut p[r0 * t..], t, r1 - r0, r1, d, q.at(r0, 0), k.t(), scale);
                for i in r0..r1 {
                    // keys 0..=i are seen; the rest of the row stays zero
                    let seen = &mut p[i * t..][..i + 1];
                    let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for s in seen.iter_mut() {
                        *s = exp_nonpositive(*s - max);
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    seen.iter_mut().for_each(|s| *s *= inv);
                    p[i * t + i + 1..i * t + r1].fill(0.0);
                }
                matmul(&mut out[r0 * d..], d, r1 - r0, d, r1, View::rows(p, t).at(r0, 0), v, 1.0);
            }
        });
        (FlexTensor::from_data(TensorData::new(out, [b, h, t, d])), FlexTensor::from_data(TensorData::new(probs, [b, h, t, t])))
    }

    fn causal_attention_backward(q: FlexTensor, k: FlexTensor, v: FlexTensor, probs: FlexTensor, grad: FlexTensor) -> (FlexTensor, FlexTensor, FlexTensor) {
        let ((q, [b, h, t, d]), (k, _), (v, _), (probs, _), (grad, _)) = (values(&q), values(&k), values(&v), values(&probs), values(&grad));
        let (q, k, v, probs, grad) = (f32_values(&q), f32_values(&k), f32_values(&v), f32_values(&probs), f32_values(&grad));
        let scale = 1.0 / (d as f32).sqrt();
        let (mut dq, mut dk, mut dv) = (vec![0f32; b * h * t * d], vec![0f32; b * h * t * d], vec![0f32; b * h * t * d]);
        dq.par_chunks_mut(t * d).zip(dk.par_chunks_mut(t * d)).zip(dv.par_chunks_mut(t * d)).enumerate().for_each(|(bh, ((dq, dk), dv))| {
            let head = |x| View::head(x, bh, t, d);
            let (q, k, v, g) = (head(q), head(k), head(v), head(grad));
            let p = View::rows(&probs[bh * t * t..][..t * t], t);
            // ds = p * (dp - rowsum(p * dp)) with dp = g v^T, by query blocks; zero above the
            // diagonal (p is), and dq = ds k * scale from each finished block.
            let mut ds = vec![0f32; t * t];
            for (r0, r1) in blocks(t) {
                matmul(&mut ds[r0 * t..], t, r1 - r0, r1, d, g.at(r0, 0), v.t(), 1.0);
                for i in r0..r1 {
                    let (row, p_row) = (&mut ds[i * t..][..r1], &p.data[i * t..][..r1]);
                    let dot: f32 = row.iter().zip(p_row).map(|(a, b)| a * b).sum();
                    row.iter_mut().zip(p_row).for_each(|(x, &p)| *x = p * (*x - dot));
                }
                matmul(&mut dq[r0 * d..], d, r1 - r0, d, r1, View::rows(&ds, t).at(r0, 0), k, scale);
            }
            // Keys c0..c1 are seen by queries c0..t only: dv = p^T g, dk = ds^T q * scale.
            let ds = View::rows(&ds, t);
            for (c0, c1) in blocks(t) {
                matmul(&mut dv[c0 * d..], d, c1 - c0, d, t - c0, p.t().at(c0, c0), g.at(c0, 0), 1.0);
                matmul(&mut dk[c0 * d..], d, c1 - c0, d, t - c0, ds.t().at(c0, c0), q.at(c0, 0), scale);
            }
        });
        let shape = [b, h, t, d];
        (
            FlexTensor::from_data(TensorData::new(dq, shape)),
            FlexTensor::from_data(TensorData::new(dk, shape)),
            FlexTensor::from_data(TensorData::new(dv, shape)),
        )
    }
}

impl<B: Backend + CausalAttentionBackend, C: CheckpointStrategy> CausalAttentionBackend for Autodiff<B, C> {
    fn causal_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [q.node(), k.node(), v.node()];
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        let (out, probs) = B::causal_attention_with_probs(q.clone(), k.clone(), v.clone());
        match CausalAttention.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((q, k, v, probs), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    /// Not differentiated itself: computed on the inner backend, returned untracked.
    fn causal_attention_with_probs(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (out, probs) = B::causal_attention_with_probs(q.into_primitive(), k.into_primitive(), v.into_primitive());
        (FloatTensor::<Self>::new(out), FloatTensor::<Self>::new(probs))
    }

    /// Not differentiated itself: computed on the inner backend, returned untracked.
    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) =
            B::causal_attention_backward(q.into_primitive(), k.into_primitive(), v.into_primitive(), probs.into_primitive(), grad.into_primitive());
        (FloatTensor::<Self>::new(dq), FloatTensor::<Self>::new(dk), FloatTensor::<Self>::new(dv))
    }
}

/// The backward step [`CausalAttentionBackend::causal_attention`] records on the autodiff graph.
#[derive(Debug)]
struct CausalAttention;

impl<B: Backend + CausalAttentionBackend> Backward<B, 3> for CausalAttention {
    /// q, k, v and the attention probabilities.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        register_qkv_grads::<B, _>(ops, grads, |(q, k, v, probs), grad| B::causal_attention_backward(q, k, v, probs, grad));
    }
}

/// The backward of an attention op over (q, k, v): `qkv_grads` turns the op's state and the
/// output's gradient into the three inputs' gradients, registered on the parents that track one.
fn register_qkv_grads<B: Backend, S>(
    ops: Ops<S, 3>,
    grads: &mut Gradients,
    qkv_grads: impl FnOnce(S, FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>),
) {
    let [node_q, node_k, node_v] = ops.parents;
    let grad = grads.consume::<B>(&ops.node);
    let (dq, dk, dv) = qkv_grads(ops.state, grad);
    for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
        if let Some(node) = node {
            grads.register::<B>(node.id, g);
        }
    }
}

/// Elements (`batch * heads * rows * keys`) of one block of recomputed scores in
/// [`RecomputedAttentionBackend`]'s backward: 2^26, 256 MiB in f32. Bench-medium (batch 16, 12
/// heads, 512 tokens) is one block; Llama 2 7B at 1 x 4096 is 8 blocks of 512 query rows.
pub const BACKWARD_BLOCK_ELEMENTS: usize = 1 << 26;

thread_local! {
    /// [`BACKWARD_BLOCK_ELEMENTS`]; tests lower it to split small problems into several blocks.
    pub(crate) static BACKWARD_BLOCK_BUDGET: Cell<usize> = const { Cell::new(BACKWARD_BLOCK_ELEMENTS) };
}

/// Causal attention whose backward recomputes the probabilities (see the module doc), as a Burn
/// backend extension for flex, the cubecl backends and autodiff over either. The two methods'
/// bodies are Burn tensor ops of the backend they run on, so every backend shares them; only
/// `Autodiff` has its own forward, which records the op.
#[backend_extension(Flex, Cube: cfg(any(feature = "vulkan", feature = "wgpu", feature = "cuda")), Autodiff)]
pub trait RecomputedAttentionBackend: Backend {
    /// The backend's causal `attention` (flash on cubecl where autotune picks it).
    fn recomputed_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::attention(q, k, v, None, None, CAUSAL)
    }

    /// Gradients of q, k and v from the output `out` and its gradient `grad`.
    fn recomputed_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        recomputed_backward::<Self>(q, k, v, out, grad)
    }
}

impl RecomputedAttentionBackend for Flex {}

#[cfg(any(feature = "vulkan", feature = "wgpu", feature = "cuda"))]
impl RecomputedAttentionBackend for burn::backend::Cube {}

impl<B: Backend + RecomputedAttentionBackend, C: CheckpointStrategy> RecomputedAttentionBackend for Autodiff<B, C> {
    fn recomputed_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [q.node(), k.node(), v.node()];
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        let out = B::recomputed_attention(q.clone(), k.clone(), v.clone());
        match RecomputedAttention.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((q, k, v, out.clone()), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// The backward step [`RecomputedAttentionBackend::recomputed_attention`] records.
#[derive(Debug)]
struct RecomputedAttention;

impl<B: Backend + RecomputedAttentionBackend> Backward<B, 3> for RecomputedAttention {
    /// q, k, v and the output.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        register_qkv_grads::<B, _>(ops, grads, |(q, k, v, out), grad| B::recomputed_attention_backward(q, k, v, out, grad));
    }
}

/// Query rows per block of the recomputed backward: as many as keep `batch_heads * rows * seq`
/// under [`BACKWARD_BLOCK_ELEMENTS`], a multiple of 64 (at least 64), all `seq` if they fit.
fn backward_block_rows(batch_heads: usize, seq: usize) -> usize {
    let rows = BACKWARD_BLOCK_BUDGET.get() / (batch_heads * seq).max(1);
    if rows >= seq { seq } else { (rows / 64 * 64).max(64) }
}

/// FlashAttention-2's backward (Dao 2023, algorithm 2) in tensor ops, by blocks of query rows
/// `[start, end)` against keys `[0, end)` (the later keys are masked for all of them):
/// `P = softmax(s q k^T + mask)`, `dV += P^T dO`, `dP = dO V^T`, `dS = P (dP - D)` with
/// `D = rowsum(dO * O)` (equal to `rowsum(P * dP)`, one pass over `[seq, head_dim]` instead of
/// the scores), `dQ = s dS K`, `dK += s dS^T Q`. In the inputs' dtype, as Burn's composed
/// attention computes (f16 in mixed precision).
fn recomputed_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let [batch, heads, seq, head_dim] = q.shape().dims::<4>();
    let scale = 1.0 / (head_dim as f64).sqrt();
    let device = q.device();
    let settings = get_or_init_device_settings::<B>(&device);
    // Rows `r` of a `[batch, heads, seq, last]` tensor (q, k, v, the gradient; `delta`'s last is 1).
    let rows = |t: FloatTensor<B>, r: Range<usize>| {
        let last = t.shape().dims::<4>()[3];
        B::float_slice(t, &[Slice::from(0..batch), Slice::from(0..heads), Slice::from(r), Slice::from(0..last)])
    };
    let delta = B::float_sum_dim(B::float_mul(grad.clone(), out), 3);
    let block = backward_block_rows(batch * heads, seq);
    let starts: Vec<usize> = (0..seq).step_by(block).collect();
    let (mut dq_blocks, mut dk, mut dv) = (Vec::with_capacity(starts.len()), None, None);
    // The last block first: it sees every key, so its dK and dV are whole and the earlier
    // blocks add into their leading rows.
    for &start in starts.iter().rev() {
        let end = (start + block).min(seq);
        let (q_rows, grad_rows, delta_rows) = (rows(q.clone(), start..end), rows(grad.clone(), start..end), rows(delta.clone(), start..end));
        let (k_seen, v_seen) = (rows(k.clone(), 0..end), rows(v.clone(), 0..end));
        let scores = B::float_mul_scalar(B::float_matmul(q_rows.clone(), B::float_transpose(k_seen.clone())), scale.into());
        let query_pos = B::int_reshape(B::int_arange(start as i64..end as i64, &device, settings.int_dtype), Shape::new([end - start, 1]));
        let key_pos = B::int_reshape(B::int_arange(0..end as i64, &device, settings.int_dtype), Shape::new([1, end]));
        let later_key = B::bool_reshape(B::int_lower(query_pos, key_pos, settings.bool_dtype), Shape::new([1, 1, end - start, end]));
        let later_key = B::bool_expand(later_key, Shape::new([batch, heads, end - start, end]));
        let scores = B::float_mask_fill(scores, later_key, f32::NEG_INFINITY.into());
        let exp = B::float_exp(B::float_sub(scores.clone(), B::float_max_dim(scores, 3)));
        let probs = B::float_div(exp.clone(), B::float_sum_dim(exp, 3));
        let dv_seen = B::float_matmul(B::float_transpose(probs.clone()), grad_rows.clone());
        let dprobs = B::float_matmul(grad_rows, B::float_transpose(v_seen));
        let dscores = B::float_mul_scalar(B::float_mul(probs, B::float_sub(dprobs, delta_rows)), scale.into());
        dq_blocks.push(B::float_matmul(dscores.clone(), k_seen));
        let dk_seen = B::float_matmul(B::float_transpose(dscores), q_rows);
        let add_rows = |total: Option<FloatTensor<B>>, part: FloatTensor<B>| match total {
            None => part,
            Some(total) => {
                let range = [Slice::from(0..batch), Slice::from(0..heads), Slice::from(0..end), Slice::from(0..head_dim)];
                let sum = B::float_add(B::float_slice(total.clone(), &range), part);
                B::float_slice_assign(total, &range, sum)
            }
        };
        dk = Some(add_rows(dk, dk_seen));
        dv = Some(add_rows(dv, dv_seen));
    }
    dq_blocks.reverse();
    let dq = if dq_blocks.len() == 1 { dq_blocks.pop().unwrap() } else { B::float_cat(dq_blocks, 2) };
    (dq, dk.expect("seq > 0"), dv.expect("seq > 0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flex_kernels::assert_close;
    use burn::tensor::{Device, Distribution};

    use crate::device_check::{ATTENTION_SHAPES as SHAPES, random_qkv as qkv};

    #[test]
    fn fused_forward_equals_composed() {
        for shape in SHAPES {
            let [q, k, v] = qkv(&Device::flex(), shape);
            assert_close(causal_attention(q.clone(), k.clone(), v.clone()), composed_causal_attention(q, k, v), 1e-5);
        }
    }

    /// Gradients of q, k and v through the fused op and through Burn's composed attention, for an
    /// uneven upstream gradient, agree to 1e-4; also for strided (swapped-dims) inputs as the
    /// model passes them.
    #[test]
    fn fused_gradients_equal_composed() {
        for shape in SHAPES {
            gradients_equal_composed(shape, causal_attention);
        }
    }

    #[test]
    fn recomputed_forward_equals_composed() {
        for shape in SHAPES {
            let [q, k, v] = qkv(&Device::flex().autodiff(), shape);
            assert_close(recomputed_causal_attention(q.clone(), k.clone(), v.clone()), composed_causal_attention(q, k, v), 1e-5);
        }
    }

    /// The recomputed backward equals Burn's composed attention's in one block and split into
    /// blocks of 64 query rows (the second shape: 3 blocks, the last partial; the first: 64-row
    /// blocks of 9 rows are one).
    #[test]
    fn recomputed_gradients_equal_composed_in_one_block_and_in_several() {
        for shape in SHAPES {
            gradients_equal_composed(shape, recomputed_causal_attention);
            let [b, h, t, _] = shape;
            assert_eq!(backward_block_rows(b * h, t), t);
            crate::with_setting(&BACKWARD_BLOCK_BUDGET, b * h * t * 64, || {
                assert_eq!(backward_block_rows(b * h, t), t.min(64));
                gradients_equal_composed(shape, recomputed_causal_attention);
            });
        }
    }

    #[test]
    fn backward_blocks_bound_the_scores_of_7b() {
        // Llama 2 7B, micro-batch 1 x 4096: 32 heads.
        assert_eq!(backward_block_rows(32, 4096), 512);
        const { assert!(32 * 512 * 4096 <= BACKWARD_BLOCK_ELEMENTS) };
        // Bench-medium, 16 x 512, 12 heads: one block.
        assert_eq!(backward_block_rows(16 * 12, 512), 512);
    }

    /// On a cubecl device (`device::gpu_for_tests`: cuda, vulkan or wgpu; Mesa's lavapipe runs
    /// wgpu on a CPU) the recomputed op, in one block and in several, gives the gradients of
    /// Burn's composed attention on flex: the `Cube` route of the extension and of its autodiff
    /// op. Built only with a GPU feature.
    #[cfg(any(feature = "vulkan", feature = "wgpu", feature = "cuda"))]
    #[test]
    fn recomputed_gradients_on_gpu_equal_composed_on_flex() {
        let spec = crate::device::gpu_for_tests().unwrap();
        eprintln!("attention gradients on {spec}");
        for d in crate::device_check::attention_gradients(&spec).unwrap() {
            assert!(d.passed(), "{d}");
        }
    }

    fn gradients_equal_composed(shape: [usize; 4], attend: fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>) {
        let device = Device::flex().autodiff();
        let [q, k, v] = qkv(&device, shape);
        let weights = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let grads_of = |ours: bool| {
            let (q, k, v) = (q.clone().require_grad(), k.clone().require_grad(), v.clone().require_grad());
            // Strided views, as `Attention::forward` produces them.
            let (qs, ks, vs) = (q.clone().swap_dims(1, 2).swap_dims(1, 2), k.clone(), v.clone().swap_dims(1, 2).swap_dims(1, 2));
            let out = if ours { attend(qs, ks, vs) } else { composed_causal_attention(qs, ks, vs) };
            let grads = (out * weights.clone()).sum().backward();
            [q.grad(&grads).unwrap(), k.grad(&grads).unwrap(), v.grad(&grads).unwrap()]
        };
        for (ours, composed) in grads_of(true).into_iter().zip(grads_of(false)) {
            assert_close(ours, composed, 1e-4);
        }
    }
}
