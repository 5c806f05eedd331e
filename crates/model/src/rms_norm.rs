//! RMSNorm, fused on the CPU.
//!
//! `burn::nn::RmsNorm` composes square, mean, add, sqrt, divide and multiply, each a pass over the
//! `[rows, dim]` activations on one thread in the flex backend, and about twice as many backward
//! (a model has `2 * n_layers + 1` of them). [`rms_norm`] is one Burn backend extension op
//! ([`RmsNormBackend`]) with its own backward: one pass forward and one backward per row, rows
//! spread over the rayon pool; the gain's gradient is summed per chunk of rows, then over chunks
//! in order (so it is the same from run to run).
//! Same arithmetic as Burn's module: f32 statistics, `x / sqrt(mean(x^2) + eps) * gamma`.
//!
//! Only the flex (CPU) backend has the fused kernel, for f32; everywhere else [`rms_norm`] calls
//! Burn's `RmsNorm::forward` (the same values; tested against each other).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::nn::RmsNorm;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use crate::flex_kernels::{contiguous_f32, f32_values};

/// `norm` applied to `x` (normalised over the last dimension).
///
/// # Shapes
/// - x: `[.., dim]` -> the same shape
pub fn rms_norm<const D: usize>(norm: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    let gamma = norm.gamma.val();
    if crate::flex_kernels::enabled(&x.device()) && x.dtype() == DType::F32 && gamma.dtype() == DType::F32 {
        let out = <Dispatch as RmsNormBackend>::rms_norm(x.into_dispatch(), gamma.into_dispatch(), norm.epsilon);
        Tensor::from_dispatch(out)
    } else {
        norm.forward(x)
    }
}

/// The fused RMSNorm as a Burn backend extension, implemented for `Flex` and `Autodiff<Flex>`;
/// [`rms_norm`] calls it only on flex tensors.
#[backend_extension(Flex, Autodiff)]
pub trait RmsNormBackend: Backend {
    /// `x / sqrt(mean(x^2) + epsilon) * gamma` over the last dimension; gamma `[dim]`.
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self>;

    /// Gradients of x and gamma from the output's gradient `grad` (x's shape).
    fn rms_norm_backward(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64, grad: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// Rows per rayon task (each task also sums its own share of the gain's gradient).
const ROWS_PER_TASK: usize = 64;

/// `1 / sqrt(mean(row^2) + epsilon)`.
fn inverse_rms(row: &[f32], epsilon: f64) -> f32 {
    let sum_sq: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (sum_sq / row.len() as f32 + epsilon as f32).sqrt()
}

impl RmsNormBackend for Flex {
    fn rms_norm(x: FlexTensor, gamma: FlexTensor, epsilon: f64) -> FlexTensor {
        let shape = x.layout().shape().clone();
        let (x, gamma) = (contiguous_f32(x), contiguous_f32(gamma));
        let (x, gamma) = (f32_values(&x), f32_values(&gamma));
        let d = gamma.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK).zip(x.par_chunks(d * ROWS_PER_TASK)).for_each(|(out, x)| {
            for (out, row) in out.chunks_mut(d).zip(x.chunks(d)) {
                let r = inverse_rms(row, epsilon);
                for ((o, &v), &g) in out.iter_mut().zip(row).zip(gamma) {
                    *o = v * r * g;
                }
            }
        });
        FlexTensor::from_data(TensorData::new(out, shape))
    }

    /// With `xhat = x r`, `r = 1 / rms(x)`, `h = grad * gamma`: `dx = r (h - xhat mean(h xhat))`
    /// per row, `dgamma = sum over rows of grad * xhat`.
    fn rms_norm_backward(x: FlexTensor, gamma: FlexTensor, epsilon: f64, grad: FlexTensor) -> (FlexTensor, FlexTensor) {
        let shape = x.layout().shape().clone();
        let (x, gamma, grad) = (contiguous_f32(x), contiguous_f32(gamma), contiguous_f32(grad));
        let (x, gamma, grad) = (f32_values(&x), f32_values(&gamma), f32_values(&grad));
        let d = gamma.len();
        let mut dx = vec![0f32; x.len()];
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK).zip(grad.par_chunks(d * ROWS_PER_TASK)))
            .map(|(dx, (x, grad))| {
                let mut dgamma = vec![0f32; d];
                for ((dx, row), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(grad.chunks(d)) {
                    let r = inverse_rms(row, epsilon);
                    let mut dot = 0f32;
                    for i in 0..d {
                        let xhat = row[i] * r;
                        dgamma[i] += g[i] * xhat;
                        dot += g[i] * gamma[i] * xhat;
                    }
                    let mean = dot / d as f32;
                    for i in 0..d {
                        dx[i] = r * (g[i] * gamma[i] - row[i] * r * mean);
                    }
                }
                dgamma
            })
            .collect();
        // Summed in chunk order: rayon's `reduce` would associate the partial sums in an order
        // that depends on work stealing, and the gain's gradient (so every later weight) would
        // change in its last bits from run to run.
        let mut dgamma = vec![0f32; d];
        for partial in &partials {
            for (sum, p) in dgamma.iter_mut().zip(partial) {
                *sum += p;
            }
        }
        (FlexTensor::from_data(TensorData::new(dx, shape)), FlexTensor::from_data(TensorData::new(dgamma, [d])))
    }
}

impl<B: Backend + RmsNormBackend, C: CheckpointStrategy> RmsNormBackend for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        let nodes = [x.node(), gamma.node()];
        let (x, gamma) = (x.into_primitive(), gamma.into_primitive());
        let out = B::rms_norm(x.clone(), gamma.clone(), epsilon);
        match RmsNormStep.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x, gamma, epsilon), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    /// Not differentiated itself: computed on the inner backend, returned untracked.
    fn rms_norm_backward(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64, grad: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dgamma) = B::rms_norm_backward(x.into_primitive(), gamma.into_primitive(), epsilon, grad.into_primitive());
        (FloatTensor::<Self>::new(dx), FloatTensor::<Self>::new(dgamma))
    }
}

/// The backward step [`RmsNormBackend::rms_norm`] records on the autodiff graph.
#[derive(Debug)]
struct RmsNormStep;

impl<B: Backend + RmsNormBackend> Backward<B, 2> for RmsNormStep {
    /// x, gamma and epsilon.
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_gamma] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, gamma, epsilon) = ops.state;
        let (dx, dgamma) = B::rms_norm_backward(x, gamma, epsilon, grad);
        for (node, g) in [(node_x, dx), (node_gamma, dgamma)] {
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
    use burn::module::Param;
    use burn::nn::RmsNormConfig;
    use burn::tensor::{Device, Distribution};

    /// A norm with a non-trivial gain, and `[2, 70, 24]` inputs (more rows than one task),
    /// strided (dims swapped) as a view would be.
    fn inputs(device: &Device) -> (RmsNorm, Tensor<3>) {
        device.seed(3);
        let mut norm = RmsNormConfig::new(24).with_epsilon(1e-5).init(device);
        norm.gamma = Param::from_tensor(Tensor::random([24], Distribution::Uniform(0.5, 1.5), device));
        let x = Tensor::<3>::random([70, 2, 24], Distribution::Normal(0.0, 2.0), device).swap_dims(0, 1);
        (norm, x)
    }

    #[test]
    fn fused_forward_equals_burns() {
        let (norm, x) = inputs(&Device::flex());
        assert_close(rms_norm(&norm, x.clone()), norm.forward(x), 1e-5);
    }

    /// Gradients of x and of the gain through the fused op and through Burn's module, for an
    /// uneven upstream gradient, agree to 1e-4.
    #[test]
    fn fused_gradients_equal_burns() {
        let device = Device::flex().autodiff();
        let (norm, x) = inputs(&device);
        let weights = Tensor::<3>::random([2, 70, 24], Distribution::Normal(0.0, 1.0), &device);
        let grads_of = |fused: bool| {
            let x = x.clone().require_grad();
            let out = if fused { rms_norm(&norm, x.clone()) } else { norm.forward(x.clone()) };
            let grads = (out * weights.clone()).sum().backward();
            (x.grad(&grads).unwrap(), norm.gamma.val().grad(&grads).unwrap())
        };
        let ((dx, dgamma), (dx_ref, dgamma_ref)) = (grads_of(true), grads_of(false));
        assert_close(dx, dx_ref, 1e-4);
        assert_close(dgamma, dgamma_ref, 1e-4);
    }
}
