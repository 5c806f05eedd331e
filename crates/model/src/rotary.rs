//! The rotation of rotary position embeddings (RoPE), fused on the CPU.
//!
//! Composed from Burn's ops, rotating the interleaved pairs of q or k takes two slices, four
//! products, two sums and a concatenation forward (each a pass over the activations on one thread
//! in the flex backend) and as many backward, the concatenation's split included: on bench-medium
//! 125 ms of every layer's training step, for 0.3% of its FLOPs. [`rotate_pairs`] is one Burn
//! backend extension op ([`RotaryBackend`]): one pass forward, reading the strided `[batch, heads,
//! seq, head_dim]` view that the head split leaves (so the attention gets a row-major tensor
//! without another copy), and one pass backward, the inverse rotation, (batch, head) pairs
//! spread over the rayon pool.
//!
//! Only the flex (CPU) backend has the fused kernel, for f32; everywhere else [`rotate_pairs`]
//! composes Burn's ops (the same values; tested against each other).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use crate::flex_kernels::{contiguous_f32, f32_values};

/// Rotates each pair `(x[2i], x[2i+1])` of `x`'s last dimension at position `p` (the sequence
/// index plus `start`) by the angle whose cosine and sine are `cos[p, i]` and `sin[p, i]`:
/// `(x0 c - x1 s, x0 s + x1 c)` (Meta's interleaved layout).
///
/// # Shapes
/// - x: `[batch, heads, seq, head_dim]`
/// - cos, sin: `[max_seq_len, head_dim / 2]` with `start + seq <= max_seq_len`
/// - output: `[batch, heads, seq, head_dim]`
pub fn rotate_pairs(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>, start: usize) -> Tensor<4> {
    let [_, _, t, d] = x.dims();
    assert!(start + t <= cos.dims()[0] && 2 * cos.dims()[1] == d, "rotate_pairs: tables {:?} for {t} positions from {start}, head_dim {d}", cos.dims());
    if crate::flex_kernels::enabled(&x.device()) && x.dtype() == DType::F32 && cos.dtype() == DType::F32 {
        let out = <Dispatch as RotaryBackend>::rotate_pairs(x.into_dispatch(), cos.clone().into_dispatch(), sin.clone().into_dispatch(), start, false);
        Tensor::from_dispatch(out)
    } else {
        composed_rotate_pairs(x, cos, sin, start)
    }
}

/// [`rotate_pairs`] from Burn's differentiable ops (the tables cast to `x`'s dtype, for mixed
/// precision): the reference the fused op is tested against, and the path on every other backend.
pub fn composed_rotate_pairs(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>, start: usize) -> Tensor<4> {
    let [_, _, t, d] = x.dims();
    let table = |c: &Tensor<2>| c.clone().slice([start..start + t]).cast(x.dtype()).reshape([1, 1, t, d / 2, 1]);
    let (cos, sin) = (table(cos), table(sin));
    rotate_by(x, cos, sin)
}

/// Rotates one token per row by its own angles: continuous batching, where rows sit at
/// different positions.
///
/// # Shapes
/// - x: `[batch, heads, 1, head_dim]`, cos/sin: `[batch, head_dim / 2]` -> `[batch, heads, 1, head_dim]`
pub fn rotate_rows(x: Tensor<4>, cos: Tensor<2>, sin: Tensor<2>) -> Tensor<4> {
    let [b, _, _, d] = x.dims();
    let table = |c: Tensor<2>| c.cast(x.dtype()).reshape([b, 1, 1, d / 2, 1]);
    let (cos, sin) = (table(cos), table(sin));
    rotate_by(x, cos, sin)
}

/// The pair rotation with cos/sin tables that broadcast to `[batch, heads, seq, head_dim / 2, 1]`.
fn rotate_by(x: Tensor<4>, cos: Tensor<5>, sin: Tensor<5>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let pairs = x.reshape([b, h, t, d / 2, 2]);
    let even = pairs.clone().slice([0..b, 0..h, 0..t, 0..d / 2, 0..1]);
    let odd = pairs.slice([0..b, 0..h, 0..t, 0..d / 2, 1..2]);
    let rotated_even = even.clone() * cos.clone() - odd.clone() * sin.clone();
    let rotated_odd = even * sin + odd * cos;
    Tensor::cat(vec![rotated_even, rotated_odd], 4).reshape([b, h, t, d])
}

/// The fused rotation as a Burn backend extension, implemented for `Flex` and `Autodiff<Flex>`;
/// [`rotate_pairs`] calls it only on flex tensors.
#[backend_extension(Flex, Autodiff)]
pub trait RotaryBackend: Backend {
    /// [`rotate_pairs`], or with `inverse` the rotation by the opposite angles (its backward).
    fn rotate_pairs(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, start: usize, inverse: bool) -> FloatTensor<Self>;
}

impl RotaryBackend for Flex {
    fn rotate_pairs(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, start: usize, inverse: bool) -> FlexTensor {
        assert_eq!(x.dtype(), DType::F32, "rotate_pairs: x must be f32");
        // Any layout whose last dimension is unit-stride is read in place (the head split's view).
        let x = if x.layout().strides().iter().all(|&s| s >= 0) && x.layout().strides()[3] == 1 { x } else { x.to_contiguous() };
        let shape = x.layout().shape();
        let [b, h, t, d] = [shape[0], shape[1], shape[2], shape[3]];
        let s = x.layout().strides();
        let [sb, sh, st] = [s[0] as usize, s[1] as usize, s[2] as usize];
        let values = &x.storage::<f32>()[x.layout().start_offset()..];
        let (cos, sin) = (contiguous_f32(cos), contiguous_f32(sin));
        let half = d / 2;
        let (cos, sin) = (&f32_values(&cos)[start * half..], &f32_values(&sin)[start * half..]);
        let sign = if inverse { -1.0 } else { 1.0 };
        let mut out = vec![0f32; b * h * t * d];
        out.par_chunks_mut(t * d).enumerate().for_each(|(bh, out)| {
            let base = (bh / h) * sb + (bh % h) * sh;
            for (p, out) in out.chunks_mut(d).enumerate() {
                let row = &values[base + p * st..][..d];
                let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
                for (i, (o, x)) in out.chunks_exact_mut(2).zip(row.chunks_exact(2)).enumerate() {
                    let (c, s) = (c[i], sign * s[i]);
                    o[0] = x[0] * c - x[1] * s;
                    o[1] = x[0] * s + x[1] * c;
                }
            }
        });
        FlexTensor::from_data(TensorData::new(out, [b, h, t, d]))
    }
}

impl<B: Backend + RotaryBackend, C: CheckpointStrategy> RotaryBackend for Autodiff<B, C> {
    /// The tables are constants (never differentiated); `x`'s gradient is the output's gradient
    /// rotated back.
    fn rotate_pairs(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, start: usize, inverse: bool) -> FloatTensor<Self> {
        let node = x.node();
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        let out = B::rotate_pairs(x.into_primitive(), cos.clone(), sin.clone(), start, inverse);
        match RotatePairs.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((cos, sin, start, inverse), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// The backward step [`RotaryBackend::rotate_pairs`] records on the autodiff graph.
#[derive(Debug)]
struct RotatePairs;

impl<B: Backend + RotaryBackend> Backward<B, 1> for RotatePairs {
    /// The tables, the start position and the direction of the forward rotation.
    type State = (FloatTensor<B>, FloatTensor<B>, usize, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (cos, sin, start, inverse) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| B::rotate_pairs(grad, cos, sin, start, !inverse));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flex_kernels::assert_close;
    use crate::model::{Positions, Rope};
    use burn::tensor::{Device, Distribution};

    /// The head split's strided view `[batch, heads, seq, head_dim]` of `[batch, seq, heads *
    /// head_dim]` rows, as `Attention::forward` passes it.
    fn heads(device: &Device) -> Tensor<4> {
        device.seed(5);
        Tensor::<3>::random([2, 9, 3 * 8], Distribution::Normal(0.0, 1.0), device).reshape([2, 9, 3, 8]).swap_dims(1, 2)
    }

    #[test]
    fn fused_forward_equals_composed_from_any_start() {
        let device = Device::flex();
        let rope = Rope::new(32, 8, 10_000.0, &device);
        for start in [0, 5, 23] {
            let x = heads(&device);
            assert_close(rotate_pairs(x.clone(), &rope.cos, &rope.sin, start), composed_rotate_pairs(x, &rope.cos, &rope.sin, start), 1e-6);
        }
    }

    /// The gradient through the fused op and through Burn's composed ops, for an uneven upstream
    /// gradient, agrees to 1e-6.
    #[test]
    fn fused_gradient_equals_composed() {
        let device = Device::flex().autodiff();
        let rope = Rope::new(32, 8, 10_000.0, &device);
        let x = heads(&device);
        let weights = Tensor::<4>::random([2, 3, 9, 8], Distribution::Normal(0.0, 1.0), &device);
        let grad_of = |fused: bool| {
            let x = x.clone().require_grad();
            let out = if fused { rotate_pairs(x.clone(), &rope.cos, &rope.sin, 3) } else { composed_rotate_pairs(x.clone(), &rope.cos, &rope.sin, 3) };
            x.grad(&(out * weights.clone()).sum().backward()).unwrap()
        };
        assert_close(grad_of(true), grad_of(false), 1e-6);
    }

    #[test]
    fn the_inverse_rotation_undoes_the_rotation() {
        let device = Device::flex();
        let rope = Rope::new(32, 8, 10_000.0, &device);
        let x = heads(&device);
        let there = rotate_pairs(x.clone(), &rope.cos, &rope.sin, 4);
        let back = Tensor::from_dispatch(<Dispatch as RotaryBackend>::rotate_pairs(
            there.into_dispatch(),
            rope.cos.clone().into_dispatch(),
            rope.sin.clone().into_dispatch(),
            4,
            true,
        ));
        assert_close(back, x, 1e-6);
    }

    /// Past the tabulated positions the angles are computed for the positions in use: a
    /// sequence straddling the table's end is rotated exactly as by a table of every position.
    #[test]
    fn positions_past_the_table_rotate_as_a_full_table_would() {
        use crate::model::ROPE_TABLE_POSITIONS;
        let device = Device::flex();
        let rope = Rope::new(ROPE_TABLE_POSITIONS + 16, 8, 10_000.0, &device);
        assert_eq!((rope.cos.dims()[0], rope.max_seq_len()), (ROPE_TABLE_POSITIONS, ROPE_TABLE_POSITIONS + 16));
        let (cos, sin) = crate::model::rope_tables(0..ROPE_TABLE_POSITIONS + 16, 8, 10_000.0, &device);
        let x = heads(&device);
        for start in [ROPE_TABLE_POSITIONS - 4, ROPE_TABLE_POSITIONS + 7] {
            let want = rotate_pairs(x.clone(), &cos, &sin, start).into_data();
            assert_eq!(rope.apply(x.clone(), Positions::From(start)).into_data(), want, "from position {start}");
        }
    }

    /// Rows at their own positions (continuous batching), in the table and past it, are rotated
    /// as each row alone at its position.
    #[test]
    fn rows_at_their_own_positions_rotate_as_each_row_alone() {
        use crate::model::ROPE_TABLE_POSITIONS;
        let device = Device::flex();
        let rope = Rope::new(ROPE_TABLE_POSITIONS + 16, 8, 10_000.0, &device);
        let x = heads(&device).slice([0..2, 0..3, 0..1, 0..8]);
        for rows in [[0, 7], [ROPE_TABLE_POSITIONS - 1, ROPE_TABLE_POSITIONS + 9]] {
            let together = rope.apply(x.clone(), Positions::Rows(&rows));
            for (r, &p) in rows.iter().enumerate() {
                let alone = rope.apply(x.clone().slice([r..r + 1, 0..3, 0..1, 0..8]), Positions::From(p));
                assert_close(together.clone().slice([r..r + 1, 0..3, 0..1, 0..8]), alone, 1e-6);
            }
        }
    }
}
