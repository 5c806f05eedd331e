//! Recomputation ("activation checkpointing") of a segment of the forward pass.
//!
//! [`rerun_in_backward`] runs `f(module, x)` without recording anything for backward except `x` itself
//! and references to the module's parameters (which exist anyway); backward runs `f` again on
//! them, on fresh autodiff leaves, backpropagates through that re-run and hands the gradients of
//! `x` and of every parameter on to the rest of the graph. Memory: the segment's intermediate
//! tensors (for a transformer block: the normed inputs, q/k/v, the attention probabilities, the
//! SwiGLU gate...) exist only while the segment runs, forward or backward; cost: one more forward
//! of the segment per backward.
//!
//! Burn 0.22 has no region-checkpoint API (its `BalancedCheckpointing` keeps every matmul
//! output), so this is an autodiff op of our own ([`Recomputed`]) whose backward calls
//! `backward()` on the re-run graph (a new graph: the fresh leaves share no node
//! with the outer one, whose lock the outer backward holds). The forward runs on the inner
//! (non-autodiff) values through Burn's ordinary ops, so it works on every backend it is routed
//! for: flex (with the fused kernels, whose thread-local switch the re-run sees as the
//! forward did) and the cubecl backends (vulkan, wgpu, cuda). In mixed precision the parameters
//! given to the op are the compute copy's cast nodes: their gradients go back through the casts
//! to the f32 master weights as without recomputation.
//!
//! [`with_memory_saving`] turns recomputation (and chunked logits) on for the calling thread:
//! the training loops wrap each micro-batch's forward in it; `Llama::forward_hidden` then
//! checkpoints every block, `Llama::token_nll` every chunk of positions.

use std::cell::Cell;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, BackendTensor, DispatchAutodiffContext, DispatchKindConversion, DispatchTensor, DispatchTensorKind, Flex};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::GradientCheckpointingStrategy;
use burn::tensor::Tensor;

use crate::memory::DEFAULT_LOGITS_CHUNK;

/// How a training forward saves memory (`train.recompute`, `train.logits_chunk`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemorySaving {
    /// Keep only each transformer block's input; backward re-runs the block.
    pub recompute_blocks: bool,
    /// Project to the vocabulary and take the loss this many positions at a time, recomputing
    /// each chunk's logits in backward: the `[positions, vocab]` logits never exist whole.
    pub logits_chunk: Option<usize>,
}

impl MemorySaving {
    /// The saving of `train.recompute` and `train.logits_chunk`: block recomputation brings
    /// chunked logits (of [`DEFAULT_LOGITS_CHUNK`] positions) unless a chunk is given.
    pub fn new(recompute: crate::Recompute, logits_chunk: Option<usize>) -> Self {
        let recompute_blocks = recompute == crate::Recompute::Block;
        Self { recompute_blocks, logits_chunk: logits_chunk.or(recompute_blocks.then_some(DEFAULT_LOGITS_CHUNK)) }
    }
}

thread_local! {
    static MEMORY_SAVING: Cell<MemorySaving> = const { Cell::new(MemorySaving { recompute_blocks: false, logits_chunk: None }) };
}

/// Runs `f` with `saving` in force on this thread (forward passes read it; a backward pass
/// re-runs what the forward recorded, whatever the setting is then).
pub fn with_memory_saving<R>(saving: MemorySaving, f: impl FnOnce() -> R) -> R {
    crate::with_setting(&MEMORY_SAVING, saving, f)
}

static RERUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many checkpointed segments backward passes have re-run in this process (for tests and
/// diagnostics: it shows that recomputation took place).
pub fn reruns() -> u64 {
    RERUNS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The setting in force on this thread.
pub fn memory_saving() -> MemorySaving {
    MEMORY_SAVING.get()
}

/// `f(module, x)`, recomputed in backward instead of stored (see the module docs). Without
/// autodiff (inference), or when neither `x` nor any parameter is tracked, it is `f(module, x)`.
///
/// `f` must be a pure function of the module's float parameters and `x`: any other tensor it
/// uses is a constant, and must not be part of an autodiff graph (use `.inner()` values).
///
/// # Shapes
/// - x: any `[..]` of rank `DI` -> `f`'s output of rank `DO`
pub fn rerun_in_backward<M, const DI: usize, const DO: usize>(
    module: &M,
    x: Tensor<DI>,
    f: impl Fn(&M, Tensor<DI>) -> Tensor<DO> + Send + Sync + 'static,
) -> Tensor<DO>
where
    M: Module + Clone + Send + Sync + 'static,
{
    if !x.is_autodiff() {
        return f(module, x);
    }
    let mut params = CollectParams(Vec::new());
    module.visit(&mut params);
    let template = module.valid();
    // The forward on the inner values: nothing of it is kept for backward.
    let output = f(&template, x.clone().inner());
    let inputs: Vec<DispatchTensor> = std::iter::once(x.into_dispatch()).chain(params.0).collect();
    let recompute = Rerun(Arc::new(move |mut values: Vec<DispatchTensor>, grad: DispatchTensor| {
        let x = Tensor::<DI>::from_dispatch(values.remove(0)).autodiff().require_grad();
        let mut leaves = FreshLeaves { values: values.into_iter(), grads: Vec::new() };
        let module = template.clone().map(&mut leaves);
        let output = f(&module, x.clone());
        let grads = (output * Tensor::<DO>::from_dispatch(grad)).sum().backward();
        std::iter::once(x.grad(&grads).map(Tensor::into_dispatch)).chain(leaves.grads.iter().map(|g| g(&grads))).collect()
    }));
    Tensor::from_dispatch(recomputed(inputs, output.autodiff().into_dispatch(), recompute))
}

/// The float parameters of a module, in visiting order, as dispatch tensors.
struct CollectParams(Vec<DispatchTensor>);

impl ModuleVisitor for CollectParams {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.val().autodiff().into_dispatch());
    }
}

/// Gradient of one fresh leaf, read from the re-run's gradients.
type LeafGrad = Box<dyn Fn(&burn::tensor::Gradients) -> Option<DispatchTensor>>;

/// Replaces every float parameter, in visiting order, by a fresh autodiff leaf holding the next
/// value, and remembers how to read each leaf's gradient.
struct FreshLeaves<I: Iterator<Item = DispatchTensor>> {
    values: I,
    grads: Vec<LeafGrad>,
}

impl<I: Iterator<Item = DispatchTensor>> ModuleMapper for FreshLeaves<I> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let value = self.values.next().expect("recomputed: fewer saved values than parameters");
        let leaf = Tensor::<D>::from_dispatch(value).autodiff().require_grad();
        let read = leaf.clone();
        self.grads.push(Box::new(move |grads| read.grad(grads).map(Tensor::into_dispatch)));
        Param::initialized(param.id, leaf)
    }
}

/// The re-run of a checkpointed segment: from the saved input values (`x`, then the parameters)
/// and the output's gradient, the gradient of each input (None where it got none).
#[derive(Clone)]
struct Rerun(Arc<dyn Fn(Vec<DispatchTensor>, DispatchTensor) -> Vec<Option<DispatchTensor>> + Send + Sync>);

impl std::fmt::Debug for Rerun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rerun")
    }
}

/// Routes the op to the backend of its inputs (flex, or a cubecl one) and the autodiff
/// checkpoint strategy they carry: by hand rather than through `#[backend_extension]`, whose
/// routing does not take a list of tensors.
fn recomputed(inputs: Vec<DispatchTensor>, output: DispatchTensor, recompute: Rerun) -> DispatchTensor {
    // The backend of the inputs, for one concrete checkpoint strategy (Burn converts dispatch
    // tensors into `Autodiff<B, C>` for its two strategies only, not for a generic `C`).
    macro_rules! on_strategy {
        ($strategy:ty) => {{
            let DispatchTensorKind::Autodiff(inner) = &inputs[0].kind else { unreachable!("recomputed: inputs are autodiff tensors") };
            match **inner {
                DispatchTensorKind::Flex(_) => on_backend::<Flex, $strategy>(inputs, output, recompute),
                #[cfg(any(feature = "vulkan", feature = "wgpu", feature = "cuda"))]
                DispatchTensorKind::Cube(_) => on_backend::<burn::backend::Cube, $strategy>(inputs, output, recompute),
                #[allow(unreachable_patterns)]
                _ => panic!("recomputed: no recomputation for this backend in this build"),
            }
        }};
    }
    match inputs[0].autodiff {
        DispatchAutodiffContext::Enabled(GradientCheckpointingStrategy::Balanced) => on_strategy!(BalancedCheckpointing),
        DispatchAutodiffContext::Enabled(_) => on_strategy!(NoCheckpointing),
        DispatchAutodiffContext::Disabled => unreachable!("recomputed: inputs are autodiff tensors"),
    }
}

fn on_backend<B, C>(inputs: Vec<DispatchTensor>, output: DispatchTensor, recompute: Rerun) -> DispatchTensor
where
    B: Backend,
    C: CheckpointStrategy,
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B, C>>,
{
    let tracked = |t: DispatchTensor| {
        <DispatchTensor as DispatchKindConversion<Autodiff<B, C>>>::try_into_backend(t).unwrap_or_else(|e| panic!("recomputed: {e}")).float()
    };
    let inputs: Vec<FloatTensor<Autodiff<B, C>>> = inputs.into_iter().map(tracked).collect();
    let output = tracked(output).into_primitive();
    macro_rules! arities {
        ($($n:literal)*) => {
            match inputs.len() {
                $($n => record::<B, C, $n>(inputs, output, recompute),)*
                n => panic!("recomputed: a segment takes at most {MAX_INPUTS} inputs (its input and parameters), got {n}"),
            }
        };
    }
    let out = arities!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
    <DispatchTensor as DispatchKindConversion<Autodiff<B, C>>>::from_backend(BackendTensor::Float(out))
}

/// Records the op with `N` parents (the backward step's arity is a compile-time constant).
fn record<B, C, const N: usize>(inputs: Vec<FloatTensor<Autodiff<B, C>>>, output: FloatTensor<B>, recompute: Rerun) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend,
    C: CheckpointStrategy,
    DispatchTensor: DispatchKindConversion<B>,
{
    let nodes: [_; N] = inputs.iter().map(|t| t.node()).collect::<Vec<_>>().try_into().unwrap_or_else(|_| unreachable!("N inputs"));
    let values: Vec<FloatTensor<B>> = inputs.into_iter().map(|t| t.into_primitive()).collect();
    match Recomputed::<N>.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((values, recompute), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// The most inputs (the segment's input and its parameters) a checkpointed segment may have.
pub const MAX_INPUTS: usize = 16;

/// The backward step of a checkpointed segment with `N` inputs.
#[derive(Debug)]
struct Recomputed<const N: usize>;

impl<B: Backend, const N: usize> Backward<B, N> for Recomputed<N>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    /// The inputs' values and the re-run.
    type State = (Vec<FloatTensor<B>>, Rerun);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (values, recompute) = ops.state;
        RERUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let wrap = |t: FloatTensor<B>| <DispatchTensor as DispatchKindConversion<B>>::from_backend(BackendTensor::Float(t));
        let input_grads = (recompute.0)(values.into_iter().map(wrap).collect(), wrap(grad));
        for (parent, g) in ops.parents.into_iter().zip(input_grads) {
            if let (Some(node), Some(g)) = (parent, g) {
                let g = <DispatchTensor as DispatchKindConversion<B>>::try_into_backend(g).expect("checkpoint: gradient on another backend").float();
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{Device, Distribution};

    /// A two-layer segment, checkpointed and not: the same output, and the same gradients for
    /// the input and both weights (the re-run's gradients reach the outer graph's leaves).
    #[test]
    fn checkpointed_segment_has_the_plain_gradients() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let layers: (Linear, Linear) = (LinearConfig::new(6, 9).init(&device), LinearConfig::new(9, 4).init(&device));
        let x = Tensor::<2>::random([5, 6], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let upstream = Tensor::<2>::random([5, 4], Distribution::Normal(0.0, 1.0), &device);
        let segment = |m: &(Linear, Linear), x: Tensor<2>| m.1.forward(burn::tensor::activation::gelu(m.0.forward(x)));
        let run = |checkpointed: bool| {
            let y = if checkpointed { rerun_in_backward(&layers, x.clone(), segment) } else { segment(&layers, x.clone()) };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let g = |t: Tensor<2>| t.grad(&grads).unwrap().into_data().try_to_vec::<f32>().unwrap();
            (
                y.into_data().try_to_vec::<f32>().unwrap(),
                g(x.clone()),
                g(layers.0.weight.val()),
                g(layers.1.weight.val()),
                layers.1.bias.as_ref().unwrap().val().grad(&grads).is_some(),
            )
        };
        let (plain, ckpt) = (run(false), run(true));
        assert!(ckpt.4, "the bias got no gradient through the checkpoint");
        for (a, b) in [(&plain.0, &ckpt.0), (&plain.1, &ckpt.1), (&plain.2, &ckpt.2), (&plain.3, &ckpt.3)] {
            assert_eq!(a.len(), b.len());
            for (p, c) in a.iter().zip(b) {
                assert!((p - c).abs() <= 1e-6 * (1.0 + p.abs()), "{p} vs {c}");
            }
        }
    }
}
