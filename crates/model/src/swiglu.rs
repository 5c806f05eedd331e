//! The SwiGLU gate `silu(gate) * up`, fused on the CPU.
//!
//! Composed from Burn's ops, `silu(g) * u` is four element-wise passes over the `[rows, ffn]`
//! activations forward (sigmoid, two products) and about eight backward, each on one thread in the
//! flex backend and each allocating an activation-sized buffer: on bench-medium 120 ms of every
//! layer's training step, as much as the layer's `w2` matmul. [`swiglu`] is one Burn backend
//! extension op ([`SwigluBackend`]) with its own backward: one pass forward, one pass backward
//! (writing both gradients), chunks spread over the rayon pool, with a branch-free sigmoid.
//!
//! Only the flex (CPU) backend has the fused kernel, for f32; everywhere else [`swiglu`] composes
//! Burn's ops (the same values; tested against each other).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use crate::flex_kernels::{CHUNK, contiguous_f32, exp_nonpositive, f32_values};

/// `silu(gate) * up` element-wise, `silu(g) = g * sigmoid(g)`.
///
/// # Shapes
/// - gate, up: `[..]` (the same shape) -> the same shape
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    assert_eq!(gate.dims(), up.dims(), "swiglu: gate and up differ in shape");
    if crate::flex_kernels::enabled(&gate.device()) && gate.dtype() == DType::F32 && up.dtype() == DType::F32 {
        Tensor::from_dispatch(<Dispatch as SwigluBackend>::swiglu(gate.into_dispatch(), up.into_dispatch()))
    } else {
        composed_swiglu(gate, up)
    }
}

/// [`swiglu`] from Burn's differentiable ops: the reference the fused op is tested against, and
/// the path on every backend without the fused kernel.
pub fn composed_swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    silu(gate) * up
}

/// The fused gate as a Burn backend extension, implemented for `Flex` and `Autodiff<Flex>`;
/// [`swiglu`] calls it only on flex tensors.
#[backend_extension(Flex, Autodiff)]
pub trait SwigluBackend: Backend {
    /// `silu(gate) * up`. Shapes as [`swiglu`].
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Gradients of gate and up from the output's gradient `grad` (all of the same shape):
    /// `d_up = grad * silu(g)`, `d_gate = grad * u * s (1 + g (1 - s))` with `s = sigmoid(g)`.
    fn swiglu_backward(gate: FloatTensor<Self>, up: FloatTensor<Self>, grad: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// `1 / (1 + exp(-x))` without branches (so that the loops vectorise) and without overflow:
/// `e = exp(-|x|) <= 1`, then `1 / (1 + e)` for `x >= 0` and `e / (1 + e)` below.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let numerator = if x >= 0.0 { 1.0 } else { e };
    numerator / (1.0 + e)
}

impl SwigluBackend for Flex {
    fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        let shape = gate.layout().shape().clone();
        let (gate, up) = (contiguous_f32(gate), contiguous_f32(up));
        let (g, u) = (f32_values(&gate), f32_values(&up));
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(u.par_chunks(CHUNK)).for_each(|((out, g), u)| {
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = g * sigmoid(g) * u;
            }
        });
        FlexTensor::from_data(TensorData::new(out, shape))
    }

    fn swiglu_backward(gate: FlexTensor, up: FlexTensor, grad: FlexTensor) -> (FlexTensor, FlexTensor) {
        let shape = gate.layout().shape().clone();
        let (gate, up, grad) = (contiguous_f32(gate), contiguous_f32(up), contiguous_f32(grad));
        let (g, u, dy) = (f32_values(&gate), f32_values(&up), f32_values(&grad));
        let (mut d_gate, mut d_up) = (vec![0f32; g.len()], vec![0f32; g.len()]);
        d_gate.par_chunks_mut(CHUNK).zip(d_up.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK))).for_each(
            |((d_gate, d_up), ((g, u), dy))| {
                for i in 0..g.len() {
                    let s = sigmoid(g[i]);
                    d_up[i] = dy[i] * g[i] * s;
                    d_gate[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                }
            },
        );
        (FlexTensor::from_data(TensorData::new(d_gate, shape.clone())), FlexTensor::from_data(TensorData::new(d_up, shape)))
    }
}

impl<B: Backend + SwigluBackend, C: CheckpointStrategy> SwigluBackend for Autodiff<B, C> {
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [gate.node(), up.node()];
        let (gate, up) = (gate.into_primitive(), up.into_primitive());
        let out = B::swiglu(gate.clone(), up.clone());
        match Swiglu.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((gate, up), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    /// Not differentiated itself: computed on the inner backend, returned untracked.
    fn swiglu_backward(gate: FloatTensor<Self>, up: FloatTensor<Self>, grad: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (d_gate, d_up) = B::swiglu_backward(gate.into_primitive(), up.into_primitive(), grad.into_primitive());
        (FloatTensor::<Self>::new(d_gate), FloatTensor::<Self>::new(d_up))
    }
}

/// The backward step [`SwigluBackend::swiglu`] records on the autodiff graph.
#[derive(Debug)]
struct Swiglu;

impl<B: Backend + SwigluBackend> Backward<B, 2> for Swiglu {
    /// gate and up.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (gate, up) = ops.state;
        let (d_gate, d_up) = B::swiglu_backward(gate, up, grad);
        for (node, g) in [(node_gate, d_gate), (node_up, d_up)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flex_kernels::assert_close;
    use burn::tensor::{Device, Distribution};

    /// Values from -40 to 40 (both sides of the sigmoid's branch point and its saturated tails)
    /// over more elements than one parallel chunk; `gate` is a strided view (dims swapped).
    fn inputs(device: &Device) -> [Tensor<3>; 2] {
        device.seed(11);
        let gate = Tensor::<3>::random([7, 3, 1000], Distribution::Uniform(-40.0, 40.0), device).swap_dims(0, 1);
        let up = Tensor::<3>::random([3, 7, 1000], Distribution::Normal(0.0, 1.0), device);
        [gate, up]
    }

    #[test]
    fn fused_forward_equals_composed() {
        let [gate, up] = inputs(&Device::flex());
        assert_close(swiglu(gate.clone(), up.clone()), composed_swiglu(gate, up), 1e-5);
    }

    /// Gradients of gate and up through the fused op and through Burn's composed ops, for an
    /// uneven upstream gradient and a strided gate, agree to 1e-5.
    #[test]
    fn fused_gradients_equal_composed() {
        let device = Device::flex().autodiff();
        let [gate, up] = inputs(&device);
        let weights = Tensor::<3>::random([3, 7, 1000], Distribution::Normal(0.0, 1.0), &device);
        let grads_of = |fused: bool| {
            let (gate, up) = (gate.clone().require_grad(), up.clone().require_grad());
            let out = if fused { swiglu(gate.clone(), up.clone()) } else { composed_swiglu(gate.clone(), up.clone()) };
            let grads = (out * weights.clone()).sum().backward();
            [gate.grad(&grads).unwrap(), up.grad(&grads).unwrap()]
        };
        for (fused, composed) in grads_of(true).into_iter().zip(grads_of(false)) {
            assert_close(fused, composed, 1e-5);
        }
    }
}
