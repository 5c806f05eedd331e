//! Next-token cross-entropy, fused on the CPU.
//!
//! `-log_softmax(logits)[target]` composed from Burn's tensor ops makes about ten full passes over
//! the `[rows, vocab]` logits (max, subtract, exp, sum, log, subtract, gather; then the backward
//! of each, a scatter into zeros included), allocates a logits-sized buffer for most of them and
//! keeps several alive for backward; Burn's flex `exp` runs on one thread. On bench-small the loss
//! was a quarter of the training step. [`token_nll`] is one Burn backend extension op
//! ([`TokenNllBackend`]) with its own backward: forward reads each row twice (max, then
//! sum of exp), backward writes `g * (softmax - onehot)` in one pass from the saved
//! log-sum-exp (`nll + logit[target]`), rows spread over the rayon pool. PyTorch's
//! `cross_entropy` does the same.
//!
//! Only the flex (CPU) backend has the fused kernel; on GPU backends and for non-f32 logits
//! [`token_nll`] composes Burn's ops (the same values; tested against each other).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int, Tensor, TensorData};
use rayon::prelude::*;

use crate::flex_kernels::{contiguous_f32, exp_nonpositive, f32_values, wide};

/// Negative log-likelihood of each row's target under `softmax(logits)`.
///
/// # Shapes
/// - logits: `[rows, vocab]`, targets: `[rows]` (ids in `0..vocab`) -> `[rows]`
///
/// # Panics
/// On a target outside `0..vocab` (callers validate token ids when data is loaded).
pub fn token_nll(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    if crate::flex_kernels::enabled(&logits.device()) && logits.dtype() == DType::F32 {
        let nll = <Dispatch as TokenNllBackend>::token_nll(logits.into_dispatch(), targets.into_dispatch());
        Tensor::from_dispatch(nll)
    } else {
        composed_token_nll(logits, targets)
    }
}

/// [`token_nll`] from Burn's differentiable ops: the reference the fused op is tested against,
/// and the path on every backend without the fused kernel.
pub fn composed_token_nll(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let [rows, _] = logits.dims();
    log_softmax(logits, 1).gather(1, targets.reshape([rows, 1])).reshape([rows]).neg()
}

/// The fused cross-entropy as a Burn backend extension: implemented for `Flex` and for
/// `Autodiff<Flex>` (which records [`TokenNll`]'s backward). [`token_nll`] calls it only on flex
/// tensors; any other backend would panic in Burn's dispatch.
#[backend_extension(Flex, Autodiff)]
pub trait TokenNllBackend: Backend {
    /// `-log_softmax(logits)[target]` per row. Shapes as [`token_nll`].
    fn token_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self>;

    /// Gradient with respect to the logits of `sum_i grad_i * nll_i`:
    /// `grad_i * (softmax(logits_i) - onehot(target_i))`; `nll` is the forward's output.
    ///
    /// # Shapes
    /// - logits: `[rows, vocab]`, targets, nll, grad: `[rows]` -> `[rows, vocab]`
    fn token_nll_backward(logits: FloatTensor<Self>, targets: IntTensor<Self>, nll: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl TokenNllBackend for Flex {
    fn token_nll(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        let logits = contiguous_f32(logits);
        let (x, rows, vocab) = rows_of(&logits);
        let targets = target_ids(&targets, rows, vocab);
        let mut nll = vec![0f32; rows];
        nll.par_iter_mut().enumerate().for_each(|(i, out)| {
            let row = &x[i * vocab..(i + 1) * vocab];
            *out = wide(|| log_sum_exp(row)) - row[targets[i]];
        });
        FlexTensor::from_data(TensorData::new(nll, [rows]))
    }

    fn token_nll_backward(logits: FlexTensor, targets: FlexTensor, nll: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let logits = contiguous_f32(logits);
        let (x, rows, vocab) = rows_of(&logits);
        let targets = target_ids(&targets, rows, vocab);
        let (nll, grad) = (contiguous_f32(nll), contiguous_f32(grad));
        let (nll, grad) = (f32_values(&nll), f32_values(&grad));
        // Every element is written below: no zero-filling pass over the logits-sized buffer.
        let mut out: Vec<f32> = Vec::with_capacity(rows * vocab);
        out.spare_capacity_mut().par_chunks_mut(vocab).enumerate().for_each(|(i, out)| {
            let row = &x[i * vocab..(i + 1) * vocab];
            let t = targets[i];
            // log-sum-exp of the row, recovered from the forward's output without another pass.
            let lse = nll[i] + row[t];
            let g = grad[i];
            wide(|| {
                for (o, &v) in out.iter_mut().zip(row) {
                    o.write(g * exp_nonpositive(v - lse));
                }
            });
            out[t].write(g * exp_nonpositive(row[t] - lse) - g);
        });
        // SAFETY: the loop above initialised all rows * vocab elements (one chunk per row).
        unsafe { out.set_len(rows * vocab) };
        FlexTensor::from_data(TensorData::new(out, [rows, vocab]))
    }
}

/// The f32 rows of a contiguous `[rows, vocab]` flex tensor.
fn rows_of(logits: &FlexTensor) -> (&[f32], usize, usize) {
    let shape = logits.layout().shape();
    (f32_values(logits), shape[0], shape[1])
}

fn target_ids(targets: &FlexTensor, rows: usize, vocab: usize) -> Vec<usize> {
    let targets = targets.to_contiguous();
    let start = targets.layout().start_offset();
    let ids: Vec<i64> = match targets.dtype() {
        DType::I64 => targets.storage::<i64>()[start..start + rows].to_vec(),
        DType::I32 => targets.storage::<i32>()[start..start + rows].iter().map(|&t| t as i64).collect(),
        other => panic!("token_nll: targets must be i64 or i32, got {other:?}"),
    };
    ids.into_iter()
        .map(|t| match usize::try_from(t) {
            Ok(t) if t < vocab => t,
            _ => panic!("token_nll: target id {t} is outside the vocabulary 0..{vocab}"),
        })
        .collect()
}

/// `log(sum(exp(row)))`, shifted by the row's maximum so that nothing overflows.
#[inline(always)]
pub(crate) fn log_sum_exp(row: &[f32]) -> f32 {
    let max = max_of(row);
    if max == f32::NEG_INFINITY {
        return max;
    }
    max + sum_of(row, |v| exp_nonpositive(v - max)).ln()
}

/// The largest value of `row` (-inf for none). Eight independent accumulators let the compiler
/// vectorise the reduction.
#[inline(always)]
pub(crate) fn max_of(row: &[f32]) -> f32 {
    let (chunks, rest) = row.as_chunks::<8>();
    let mut maxes = [f32::NEG_INFINITY; 8];
    for chunk in chunks {
        for (m, &v) in maxes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    maxes.iter().chain(rest).copied().fold(f32::NEG_INFINITY, f32::max)
}

/// The sum of `f` over `row`, in eight accumulators of `f`'s type (vectorised, as [`max_of`]):
/// f32 for the softmax's sums, f64 for the gradient norm's squares.
#[inline]
pub(crate) fn sum_of<T>(row: &[f32], f: impl Fn(f32) -> T) -> T
where
    T: Copy + Default + std::ops::AddAssign + std::ops::Add<Output = T> + std::iter::Sum<T>,
{
    let (chunks, rest) = row.as_chunks::<8>();
    let mut sums = [T::default(); 8];
    for chunk in chunks {
        for (s, &v) in sums.iter_mut().zip(chunk) {
            *s += f(v);
        }
    }
    sums.iter().copied().sum::<T>() + rest.iter().map(|&v| f(v)).sum::<T>()
}

impl<B: Backend + TokenNllBackend, C: CheckpointStrategy> TokenNllBackend for Autodiff<B, C> {
    fn token_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let node = logits.node();
        let logits = logits.into_primitive();
        let nll = B::token_nll(logits.clone(), targets.clone());
        match TokenNll.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((logits, targets, nll.clone()), nll),
            OpsKind::UnTracked(prep) => prep.finish(nll),
        }
    }

    /// Not itself differentiated (no second derivatives of the loss are needed): computed on the
    /// inner backend and returned untracked.
    fn token_nll_backward(logits: FloatTensor<Self>, targets: IntTensor<Self>, nll: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        FloatTensor::<Self>::new(B::token_nll_backward(logits.into_primitive(), targets, nll.into_primitive(), grad.into_primitive()))
    }
}

/// The backward step [`TokenNllBackend::token_nll`] records on the autodiff graph.
#[derive(Debug)]
struct TokenNll;

impl<B: Backend + TokenNllBackend> Backward<B, 1> for TokenNll {
    /// The logits, the targets and the forward's output.
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (logits, targets, nll) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| B::token_nll_backward(logits, targets, nll, grad));
    }
}

/// Inputs and targets of packed windows of `seq_len + 1` tokens.
///
/// # Shapes
/// - output: inputs `[batch, seq_len]`, targets `[batch * seq_len, 1]`
pub fn inputs_and_targets(windows: &[Vec<u32>], device: &burn::tensor::Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let (b, t) = (windows.len(), windows[0].len() - 1);
    let inputs: Vec<i64> = windows.iter().flat_map(|w| w[..t].iter().map(|&x| x as i64)).collect();
    let targets: Vec<i64> = windows.iter().flat_map(|w| w[1..].iter().map(|&x| x as i64)).collect();
    (Tensor::from_data(TensorData::new(inputs, [b, t]), device), Tensor::from_data(TensorData::new(targets, [b * t, 1]), device))
}

/// Summed next-token cross-entropy of packed windows: pre-training's loss and validation loss,
/// and `eval perplexity`'s.
pub fn cross_entropy_sum(model: &crate::Llama, windows: &[Vec<u32>], device: &burn::tensor::Device) -> Tensor<1> {
    let (inputs, targets) = inputs_and_targets(windows, device);
    let [b, t] = inputs.dims();
    model.token_nll(model.forward_hidden(inputs, None), targets.reshape([b * t])).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flex_kernels::assert_close;
    use burn::tensor::Device;

    fn inputs(device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
        let (rows, vocab) = (7, 50);
        let values: Vec<f32> = (0..rows * vocab).map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0).collect();
        let targets: Vec<i64> = (0..rows as i64).map(|r| (r * 13 + 5) % vocab as i64).collect();
        (Tensor::from_data(TensorData::new(values, [rows, vocab]), device), Tensor::from_data(TensorData::new(targets, [rows]), device))
    }

    #[test]
    fn fused_forward_equals_composed() {
        let device = Device::flex();
        let (logits, targets) = inputs(&device);
        let fused = token_nll(logits.clone(), targets.clone());
        let composed = composed_token_nll(logits, targets);
        assert_close(fused, composed, 1e-5);
    }

    /// Gradients through the fused op and through Burn's composed ops, with unequal upstream
    /// weights per row (as SFT's answer-token mask gives), agree to 1e-5.
    #[test]
    fn fused_gradient_equals_composed() {
        let device = Device::flex().autodiff();
        let (logits, targets) = inputs(&device);
        let weights = Tensor::<1>::from_floats([0.5, 0.0, 1.0, 2.0, 1.0, 0.25, 3.0], &device);
        let grad_of = |use_fused: bool| {
            let x = logits.clone().require_grad();
            let nll = if use_fused { token_nll(x.clone(), targets.clone()) } else { composed_token_nll(x.clone(), targets.clone()) };
            let grads = (nll * weights.clone()).sum().backward();
            x.grad(&grads).unwrap()
        };
        let (fused, composed) = (grad_of(true), grad_of(false));
        assert!(composed.clone().abs().max().into_scalar::<f32>() > 1e-3, "the reference gradient is not trivially zero");
        assert_close(fused, composed, 1e-5);
    }

    #[test]
    #[should_panic(expected = "outside the vocabulary")]
    fn target_outside_the_vocabulary_is_named() {
        let device = Device::flex();
        let logits = Tensor::<2>::zeros([2, 4], &device);
        let targets = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 4], [2]), &device);
        let _ = token_nll(logits, targets).into_data();
    }
}
