//! AdamW with one fused pass per parameter on the CPU.
//!
//! Burn's AdamW composes about twelve tensor ops per parameter and step (two moment updates, two
//! bias corrections, square root, divide, decay, update), each a pass over the parameter on one
//! thread in the flex backend: on bench-medium (134 M parameters) that was 0.6-0.9 s a step.
//! [`FusedAdamW`] is a Burn [`Optimizer`] with Burn's AdamW state ([`AdamWState`], so optimizer
//! checkpoints of either load in the other) whose step on flex f32 tensors is one pass over the
//! parameter, its gradient and both moments, chunks spread over the rayon pool; the arithmetic is
//! Burn's, in the same order. On other backends it calls Burn's AdamW. It lives beside the other
//! fused flex kernels; the trainer and `llama bench` both build their optimizers from it.

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, Optimizer};
use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

use crate::flex_kernels::{CHUNK, contiguous_f32, f32_values};

/// AdamW: Burn's arithmetic and state, one fused pass per parameter on the CPU.
#[derive(Clone)]
pub struct FusedAdamW {
    burn: AdamW,
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
}

impl FusedAdamW {
    /// Burn's AdamW with these settings (no AMSGrad, plain decoupled weight decay).
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32) -> Self {
        let config = AdamWConfig::new().with_beta_1(beta_1).with_beta_2(beta_2).with_epsilon(epsilon).with_weight_decay(weight_decay);
        Self { burn: config.build(), beta_1, beta_2, epsilon, weight_decay }
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(&self, lr: LearningRate, tensor: Tensor<D>, grad: Tensor<D>, state: Option<Self::State<D>>) -> (Tensor<D>, Option<Self::State<D>>) {
        if !crate::flex_kernels::enabled(&tensor.device()) || tensor.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            return self.burn.step(lr, tensor, grad, state);
        }
        let (time, moment_1, moment_2) = match state {
            Some(s) => (s.momentum.time + 1, s.momentum.moment_1, s.momentum.moment_2),
            // Zero moments: the first update then gives Burn's initial `(1 - beta) g` and `g^2`.
            None => (1, tensor.zeros_like(), tensor.zeros_like()),
        };
        let (tensor, moment_1, moment_2) = <Dispatch as AdamWBackend>::adamw_update(
            tensor.into_dispatch(),
            grad.into_dispatch(),
            moment_1.into_dispatch(),
            moment_2.into_dispatch(),
            lr,
            [self.beta_1, self.beta_2, self.epsilon, self.weight_decay],
            time,
        );
        let momentum = AdaptiveMomentumState::new(time, Tensor::from_dispatch(moment_1), Tensor::from_dispatch(moment_2));
        (Tensor::from_dispatch(tensor), Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <AdamW as Optimizer>::to_device(state, device)
    }
}

/// The fused update as a Burn backend extension, implemented for `Flex` (the optimizer works on
/// the parameters' inner, non-autodiff tensors).
#[backend_extension(Flex)]
pub trait AdamWBackend: Backend {
    /// One AdamW step: (parameter, first moment, second moment) after it. `betas_eps_decay` is
    /// `[beta_1, beta_2, epsilon, weight_decay]`; `time` the step number from 1.
    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        lr: f64,
        betas_eps_decay: [f32; 4],
        time: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// See [`tensor_sum_of_squares`].
    fn sum_of_squares(t: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl AdamWBackend for Flex {
    fn adamw_update(
        param: FlexTensor,
        grad: FlexTensor,
        moment_1: FlexTensor,
        moment_2: FlexTensor,
        lr: f64,
        betas_eps_decay: [f32; 4],
        time: usize,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let shape = param.layout().shape().clone();
        let (param, grad, moment_1, moment_2) = (contiguous_f32(param), contiguous_f32(grad), contiguous_f32(moment_1), contiguous_f32(moment_2));
        let (p, g, m, v) = (f32_values(&param), f32_values(&grad), f32_values(&moment_1), f32_values(&moment_2));
        let rule = AdamWRule::new(lr, betas_eps_decay, time);
        let n = p.len();
        let (mut p_out, mut m_out, mut v_out) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        p_out.par_chunks_mut(CHUNK).zip(m_out.par_chunks_mut(CHUNK)).zip(v_out.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, ((p_out, m_out), v_out))| {
            let range = c * CHUNK..(c * CHUNK + p_out.len());
            let (p, g, m, v) = (&p[range.clone()], &g[range.clone()], &m[range.clone()], &v[range]);
            for i in 0..p.len() {
                (p_out[i], m_out[i], v_out[i]) = rule.apply(p[i], g[i], m[i], v[i]);
            }
        });
        let tensor = |values: Vec<f32>| FlexTensor::from_data(TensorData::new(values, shape.clone()));
        (tensor(p_out), tensor(m_out), tensor(v_out))
    }

    fn sum_of_squares(t: FlexTensor) -> FlexTensor {
        let t = contiguous_f32(t);
        FlexTensor::from_data(TensorData::new(vec![sum_of_squares(f32_values(&t)) as f32], [1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::{GradientsParams, ModuleOptimizer};
    use burn::tensor::Distribution;

    /// Four steps of the fused optimizer and of Burn's AdamW from the same model and gradients
    /// (weight decay on, the paper's betas) give the same parameters to 1e-6.
    #[test]
    fn fused_steps_equal_burns_adamw() {
        let device = Device::flex().autodiff();
        device.seed(9);
        let config = AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.95).with_epsilon(1e-5).with_weight_decay(0.1);
        let start: Linear = LinearConfig::new(40, 1000).init(&device);
        let x = Tensor::<2>::random([8, 40], Distribution::Normal(0.0, 1.0), &device);
        let train = |mut optim: ModuleOptimizer| {
            let mut model = start.clone();
            for step in 0..4 {
                let loss = model.forward(x.clone()).powi_scalar(2).mean() * (step + 1) as f32;
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(1e-2, model, grads);
            }
            model.weight.val().into_data().try_to_vec::<f32>().unwrap()
        };
        let fused = train(ModuleOptimizer::from(FusedAdamW::new(0.9, 0.95, 1e-5, 0.1)));
        let burn = train(config.init());
        let moved = fused.iter().zip(&start.weight.val().into_data().try_to_vec::<f32>().unwrap()).any(|(a, b)| (a - b).abs() > 1e-3);
        assert!(moved, "the parameters did not move");
        for (i, (a, b)) in fused.iter().zip(&burn).enumerate() {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "weight {i}: fused {a} vs Burn {b}");
        }
    }

    /// The flat in-place pass (several chunks, a ragged end) gives the per-element rule's values
    /// bit for bit, with the clip factor applied to the gradient first, and its bf16 or f16 copy is
    /// the updated parameter rounded.
    #[test]
    fn flat_pass_equals_the_rule_element_by_element() {
        let n = 3 * FLAT_CHUNK + 77;
        let value = |i: usize, k: f32| ((i as f32 * 0.618 + k).sin()) * 0.1;
        let (p0, g, m0, v0): (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) = (0..n)
            .map(|i| (value(i, 0.0), value(i, 1.0), value(i, 2.0) * 0.01, value(i, 3.0).abs() * 0.001))
            .fold((vec![], vec![], vec![], vec![]), |mut acc, (a, b, c, d)| {
                acc.0.push(a);
                acc.1.push(b);
                acc.2.push(c);
                acc.3.push(d);
                acc
            });
        let rule = AdamWRule::new(3e-4, [0.9, 0.95, 1e-5, 0.1], 7);
        let (mut p, mut m, mut v, mut half) = (p0.clone(), m0.clone(), v0.clone(), vec![half::bf16::ZERO; n]);
        adamw_flat(&mut p, &g, &mut m, &mut v, 0.5, &rule, Some(&mut half));
        for i in 0..n {
            let want = rule.apply(p0[i], g[i] * 0.5, m0[i], v0[i]);
            assert_eq!((p[i].to_bits(), m[i].to_bits(), v[i].to_bits()), (want.0.to_bits(), want.1.to_bits(), want.2.to_bits()), "element {i}");
            assert_eq!(half[i], half::bf16::from_f32(want.0));
        }
        assert!(p.iter().zip(&p0).any(|(a, b)| a != b));
        // An f16 copy: the same update, the copy rounded to f16.
        let (mut p16, mut m16, mut v16, mut half16) = (p0.clone(), m0.clone(), v0.clone(), vec![half::f16::ZERO; n]);
        adamw_flat(&mut p16, &g, &mut m16, &mut v16, 0.5, &rule, Some(&mut half16));
        assert_eq!((&p16, &m16, &v16), (&p, &m, &v));
        assert!(half16.iter().zip(&p).all(|(h, x)| *h == half::f16::from_f32(*x)));
        let exact: f64 = g.iter().map(|&x| (x as f64) * (x as f64)).sum();
        assert!((sum_of_squares(&g) - exact).abs() <= 1e-9 * exact);
    }

    /// The in-place sum of squares on flex (a ragged length, a transposed view) is Burn's
    /// `(t * t).sum()` to f32 rounding, as one f32 value.
    #[test]
    fn tensor_sum_of_squares_is_burns() {
        let device = Device::flex();
        device.seed(4);
        let t = Tensor::<2>::random([37, 29], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        for t in [t.clone(), t.transpose()] {
            let fused = tensor_sum_of_squares(&t);
            assert_eq!((fused.dims(), fused.dtype()), ([1], DType::F32));
            let (fused, burn) = (fused.into_scalar::<f32>(), (t.clone() * t).sum().into_scalar::<f32>());
            assert!((fused - burn).abs() <= 1e-5 * burn && burn > 900.0, "{fused} vs {burn}");
        }
    }
}

/// Elements per task of [`adamw_flat`]: 64 Ki f32 (256 KiB a stream, five streams in flight).
const FLAT_CHUNK: usize = 1 << 16;

/// A 16-bit compute dtype the fused update can write its copy in (bf16, f16).
pub trait HalfCopy: burn::tensor::Element + Copy + Send + Sync {
    /// The value rounded to nearest, ties to even, as Burn's cast rounds it.
    fn from_f32(x: f32) -> Self;
    /// The dtype of the copy's tensors.
    const DTYPE: DType;
    /// `n` zeros, allocated zeroed (`calloc`: fresh pages are mapped zero, not written), so that
    /// the pages are first touched by the parallel pass that fills them, not by one thread
    /// writing zeros beforehand (a 1 B model's bf16 copy is 2 GB).
    fn zeros(n: usize) -> Vec<Self>;
}

impl HalfCopy for half::bf16 {
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    const DTYPE: DType = DType::BF16;
    fn zeros(n: usize) -> Vec<Self> {
        use half::vec::HalfBitsVecExt;
        vec![0u16; n].reinterpret_into()
    }
}

impl HalfCopy for half::f16 {
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    const DTYPE: DType = DType::F16;
    fn zeros(n: usize) -> Vec<Self> {
        use half::vec::HalfBitsVecExt;
        vec![0u16; n].reinterpret_into()
    }
}

/// One AdamW step over a flat f32 parameter vector, in place, in one pass on the rayon pool: each
/// gradient times `clip` (the global-norm clip factor, 1.0 when not clipping), then `rule`, and,
/// when `half_out` is given, the updated parameter rounded to bf16 or f16 there (the compute copy
/// a host optimizer sends to the device). The arithmetic is [`AdamWRule::apply`]'s, so results
/// equal the per-tensor step's bit for bit; what changes is the memory traffic: 30 bytes per
/// parameter (read p, g, m, v; write p, m, v and the 16-bit copy), each touched once.
///
/// # Shapes
/// `p`, `g`, `m`, `v` and `half_out` all have the same length.
pub fn adamw_flat<H: HalfCopy>(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], clip: f32, rule: &AdamWRule, half_out: Option<&mut [H]>) {
    let n = p.len();
    assert!(g.len() == n && m.len() == n && v.len() == n, "adamw_flat: parameter, gradient and moments differ in length");
    let step = |(((p, g), m), v): (((&mut [f32], &[f32]), &mut [f32]), &mut [f32]), half: Option<&mut [H]>| {
        for i in 0..p.len() {
            (p[i], m[i], v[i]) = rule.apply(p[i], g[i] * clip, m[i], v[i]);
        }
        if let Some(half) = half {
            for (h, x) in half.iter_mut().zip(p.iter()) {
                *h = H::from_f32(*x);
            }
        }
    };
    let chunks = p.par_chunks_mut(FLAT_CHUNK).zip(g.par_chunks(FLAT_CHUNK)).zip(m.par_chunks_mut(FLAT_CHUNK)).zip(v.par_chunks_mut(FLAT_CHUNK));
    match half_out {
        Some(half) => {
            assert_eq!(half.len(), n, "adamw_flat: the 16-bit copy differs in length");
            chunks.zip(half.par_chunks_mut(FLAT_CHUNK)).for_each(|(c, h)| step(c, Some(h)));
        }
        None => chunks.for_each(|c| step(c, None)),
    }
}

/// The sum of squares of `g` in f64, on the rayon pool (the global norm's one read of the
/// gradients).
pub fn sum_of_squares(g: &[f32]) -> f64 {
    // Eight running sums (`loss::sum_of`), so that the loop vectorises and is not held to one
    // addition's latency per value (a single f64 sum read 7 GB/s on two cores, the memory gives 20).
    g.par_chunks(FLAT_CHUNK).map(|c| crate::loss::sum_of(c, |x| (x as f64) * (x as f64))).sum()
}

/// The sum of squares of a tensor's values as a one-element f32 tensor beside it: on flex f32
/// one read in place ([`sum_of_squares`], in f64); elsewhere Burn's `(t * t).sum()`. The global
/// gradient norm's per-tensor term: Burn's form allocated a squared copy of every gradient, and
/// was 40% of a host optimizer step on the CPU.
pub fn tensor_sum_of_squares<const D: usize>(t: &Tensor<D>) -> Tensor<1> {
    if crate::flex_kernels::enabled(&t.device()) && t.dtype() == DType::F32 && !t.is_autodiff() {
        return Tensor::from_dispatch(<Dispatch as AdamWBackend>::sum_of_squares(t.clone().into_dispatch()));
    }
    (t.clone() * t.clone()).sum()
}

/// One AdamW step's arithmetic for single values, as Burn computes it (f32 factors and bias
/// corrections, the decay rate in f64): shared by the fused flex step and the trainer's sharded
/// optimizer, so both give Burn's numbers.
#[derive(Debug, Clone, Copy)]
pub struct AdamWRule {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    factor_1: f32,
    factor_2: f32,
    correction_1: f32,
    correction_2: f32,
    keep: f32,
    lr: f32,
}

impl AdamWRule {
    /// The rule of step `time` (from 1) at learning rate `lr`; `betas_eps_decay` is
    /// `[beta_1, beta_2, epsilon, weight_decay]`.
    pub fn new(lr: f64, betas_eps_decay: [f32; 4], time: usize) -> Self {
        let [beta_1, beta_2, epsilon, weight_decay] = betas_eps_decay;
        Self {
            beta_1,
            beta_2,
            epsilon,
            factor_1: 1.0 - beta_1,
            factor_2: 1.0 - beta_2,
            correction_1: 1f32 - beta_1.powi(time as i32),
            correction_2: 1f32 - beta_2.powi(time as i32),
            keep: (1.0 - lr * weight_decay as f64) as f32,
            lr: lr as f32,
        }
    }

    /// (parameter, first moment, second moment) after the step, from their values before it
    /// and the gradient.
    #[inline]
    pub fn apply(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let m_new = m * self.beta_1 + g * self.factor_1;
        let v_new = v * self.beta_2 + g * g * self.factor_2;
        let delta = (m_new / self.correction_1) / ((v_new / self.correction_2).sqrt() + self.epsilon);
        (p * self.keep - delta * self.lr, m_new, v_new)
    }
}
