//! Does a device compute what the CPU computes? The two checks of the GPU path's own code, in the
//! library so that one binary runs them: `llama device-check --device cuda` on a GPU machine
//! (`scripts/gpu/check.sh` phase 1, from the binary the benchmarks run, so one device call
//! carries everything), and the GPU tests assert them (`cargo test --features cuda`).
//! - [`attention_gradients`]: our attention op's q, k, v gradients on the device, in one
//!   backward block and in several, against Burn's composed attention on flex.
//! - [`block_recomputation`]: the loss and every parameter's gradient of a small GQA model with
//!   block recomputation and chunked logits, against the plain pass on the same device.
//!
//! Each returns its [`Deviation`]s; on flex the same code compares the fused CPU kernels with the
//! composed ops (the CPU test below).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

use crate::attention::{BACKWARD_BLOCK_BUDGET, BACKWARD_BLOCK_ELEMENTS, causal_attention, composed_causal_attention};
use crate::recompute::{MemorySaving, with_memory_saving};
use crate::{Llama, LlamaConfig, ModelError, Precision};

/// How far one result of a check is from its reference, relative (see each check), against the
/// tolerance of that device's f32 arithmetic ([`crate::device::f32_tolerance_for_tests`]).
#[derive(Debug, Clone)]
pub struct Deviation {
    pub what: String,
    pub worst: f32,
    pub tolerance: f32,
}

impl Deviation {
    pub fn passed(&self) -> bool {
        self.worst <= self.tolerance
    }
}

impl std::fmt::Display for Deviation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.passed() { "ok" } else { "FAILED" };
        write!(f, "{}: {:.2e} (tolerance {:.0e}) {verdict}", self.what, self.worst, self.tolerance)
    }
}

/// Attention shapes `[batch, heads, seq, head_dim]` with one query block and with several (the
/// last one partial).
pub(crate) const ATTENTION_SHAPES: [[usize; 4]; 2] = [[2, 3, 9, 8], [1, 2, 2 * crate::attention::BLOCK + 22, 8]];

/// Seeded random q, k, v of `shape` on `device`.
pub(crate) fn random_qkv(device: &Device, shape: [usize; 4]) -> [Tensor<4>; 3] {
    device.seed(7);
    [0, 1, 2].map(|_| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), device))
}

/// The largest `|x - y| / (1 + |y|)` over two tensors' elements.
fn relative_deviation<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
    let (a, b) = (host(got), host(want));
    assert_eq!(a.len(), b.len(), "the check compares tensors of one shape");
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f32::max)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 values")
}

/// Our attention's q, k, v gradients on `spec` (the `Cube` route of its autodiff op on a GPU,
/// the fused kernel on flex), with the default backward block and with blocks of 64 query rows,
/// against Burn's composed attention on flex: each gradient's [`relative_deviation`].
pub fn attention_gradients(spec: &str) -> Result<Vec<Deviation>, ModelError> {
    let device = crate::device::parse(spec)?.autodiff();
    let flex = Device::flex().autodiff();
    let tolerance = crate::device::f32_tolerance_for_tests(spec);
    let mut out = vec![];
    for shape in ATTENTION_SHAPES {
        let [q, k, v] = random_qkv(&flex, shape);
        let weights = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &flex);
        let grads_on = |device: &Device, attend: fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>| {
            let [q, k, v] = [&q, &k, &v].map(|t| t.clone().to_device(device).require_grad());
            let out = attend(q.clone(), k.clone(), v.clone());
            let grads = (out * weights.clone().to_device(device)).sum().backward();
            [&q, &k, &v].map(|t| t.grad(&grads).expect("a gradient").to_device(&Device::flex()))
        };
        let want = grads_on(&flex, composed_causal_attention);
        let [b, h, t, _] = shape;
        for (blocks, budget) in [("one backward block", BACKWARD_BLOCK_ELEMENTS), ("blocks of 64 rows", b * h * t * 64)] {
            let got = crate::with_setting(&BACKWARD_BLOCK_BUDGET, budget, || grads_on(&device, causal_attention));
            for (name, (g, w)) in ["q", "k", "v"].into_iter().zip(got.into_iter().zip(want.clone())) {
                let what = format!("attention d{name} {shape:?}, {blocks}");
                out.push(Deviation { what, worst: relative_deviation(g, w), tolerance });
            }
        }
    }
    Ok(out)
}

/// A GQA model (dim 32, 3 layers, 4 heads, 2 kv heads, vocabulary `vocab`) and a batch of two
/// 80-token rows with their next-token targets, seeded, on `device`.
pub fn gqa_batch(device: &Device, vocab: usize) -> (Llama, Vec<Vec<u32>>, Tensor<1, Int>) {
    device.seed(5);
    let config = LlamaConfig::new(32, 3, 4).with_n_kv_heads(2).with_vocab_size(vocab).with_multiple_of(16).with_max_seq_len(96);
    let model = config.init(device);
    let (b, t) = (2, 80);
    let tokens: Vec<u32> = (0..b * (t + 1)).map(|i| (i * 11 + i / 7) as u32 % vocab as u32).collect();
    let rows: Vec<Vec<u32>> = tokens.chunks(t + 1).map(|r| r[..t].to_vec()).collect();
    let targets: Vec<i64> = tokens.chunks(t + 1).flat_map(|r| r[1..].iter().map(|&x| x as i64)).collect();
    (model, rows, Tensor::from_data(TensorData::new(targets, [b * t]), device))
}

/// The mean next-token loss of `rows` in `precision` with `saving`, and every parameter's
/// gradient (its shape, its values), in the model's parameter order.
pub fn loss_and_grads(
    model: &Llama,
    rows: &[Vec<u32>],
    targets: &Tensor<1, Int>,
    precision: Precision,
    saving: MemorySaving,
) -> (f32, Vec<(String, Vec<f32>)>) {
    let device = model.device();
    let (b, t) = (rows.len(), rows[0].len());
    let flat: Vec<i64> = rows.iter().flatten().map(|&x| x as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, t]), &device);
    let loss = with_memory_saving(saving, || {
        let compute = precision.compute_copy(model);
        compute.token_nll(compute.forward_hidden(ids, None), targets.clone()).mean()
    });
    let grads = GradientsParams::from_grads(loss.backward(), model);
    (loss.into_scalar::<f32>(), all_grads(model, &grads))
}

/// Every parameter's gradient in `grads` (its shape, its values; empty where it has none), in
/// `model`'s parameter order.
pub fn all_grads<M: Module>(model: &M, grads: &GradientsParams) -> Vec<(String, Vec<f32>)> {
    let mut all = AllGrads { grads, out: vec![] };
    model.visit(&mut all);
    all.out
}

struct AllGrads<'a> {
    grads: &'a GradientsParams,
    out: Vec<(String, Vec<f32>)>,
}

impl ModuleVisitor for AllGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let grad = self.grads.get::<D>(param.id).map(host).unwrap_or_default();
        self.out.push((format!("{:?}", param.val().dims()), grad));
    }
}

/// The largest difference of each parameter's gradient, relative to that parameter's largest
/// reference gradient (infinite where the reference is all zero: nothing would be checked).
pub fn gradient_deviations(got: &[(String, Vec<f32>)], want: &[(String, Vec<f32>)]) -> Vec<(String, f32)> {
    assert_eq!(got.len(), want.len(), "parameter count");
    got.iter()
        .zip(want)
        .enumerate()
        .map(|(i, ((shape, g), (_, w)))| {
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = if g.len() == w.len() { g.iter().zip(w).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) } else { f32::INFINITY };
            (format!("parameter {i} {shape}"), if scale > 1e-7 { diff / scale } else { f32::INFINITY })
        })
        .collect()
}

/// Block recomputation with chunked logits on `spec` against the plain pass on `spec`, in f32:
/// the loss's difference, each parameter's [`gradient_deviations`], and whether any block was
/// re-run at all (infinite when none was).
pub fn block_recomputation(spec: &str) -> Result<Vec<Deviation>, ModelError> {
    let device = crate::device::parse(spec)?.autodiff();
    let tolerance = crate::device::f32_tolerance_for_tests(spec);
    let (model, rows, targets) = gqa_batch(&device, 60);
    let (plain_loss, plain) = loss_and_grads(&model, &rows, &targets, Precision::F32, MemorySaving::default());
    let before = crate::recompute::reruns();
    let (loss, grads) = loss_and_grads(&model, &rows, &targets, Precision::F32, MemorySaving { recompute_blocks: true, logits_chunk: Some(48) });
    let reruns = crate::recompute::reruns() - before;
    let mut out = vec![
        Deviation {
            what: format!("recomputation re-ran {reruns} segments (3 blocks + 4 logits chunks)"),
            worst: if reruns >= 7 { 0.0 } else { f32::INFINITY },
            tolerance,
        },
        Deviation { what: format!("recomputed loss {loss} vs plain {plain_loss}"), worst: (loss - plain_loss).abs(), tolerance },
    ];
    for (what, worst) in gradient_deviations(&grads, &plain) {
        out.push(Deviation { what: format!("recomputed gradient of {what}"), worst, tolerance });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On flex both checks compare our fused kernels with the composed ops (attention) and
    /// recomputation with the plain pass, and pass; a deviation above its tolerance reads as a
    /// failure.
    #[test]
    fn both_checks_pass_on_flex() {
        let attention = attention_gradients("flex").unwrap();
        assert_eq!(attention.len(), 2 * 2 * 3);
        let recomputation = block_recomputation("flex").unwrap();
        assert!(recomputation.len() > 2 + 20, "{} deviations", recomputation.len());
        for d in attention.iter().chain(&recomputation) {
            assert!(d.passed(), "{d}");
        }
        // The attention check measures something: the fused kernel is not the composed op bit
        // for bit.
        assert!(attention.iter().any(|d| d.worst > 0.0));
        let failed = Deviation { what: "x".into(), worst: 2e-4, tolerance: 1e-4 };
        assert!(!failed.passed() && failed.to_string().ends_with("FAILED"));
    }
}
