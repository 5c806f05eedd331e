//! AdamW (Burn's arithmetic and state; one fused pass per parameter on the CPU, see
//! `llama_model::adamw`) with parameter groups, plus what Burn lacks: clipping by the *global*
//! gradient norm (Burn's `GradientClipping::Norm` clips each tensor on its own).

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use llama_model::adamw::FusedAdamW;

use crate::config::OptimConfig;
pub use crate::optim_rules::{NO_DECAY, clip_factor, no_decay_group};

/// The optimizer of a run: AdamW for all parameters, a zero-decay group for norms/embeddings.
#[derive(Clone)]
pub struct Optimizer {
    inner: ModuleOptimizer,
}

fn adamw(config: &OptimConfig, weight_decay: f64) -> FusedAdamW {
    FusedAdamW::new(config.beta1 as f32, config.beta2 as f32, config.eps as f32, weight_decay as f32)
}

impl Optimizer {
    pub fn new(config: &OptimConfig) -> Self {
        let mut inner = ModuleOptimizer::from(adamw(config, config.weight_decay));
        if let Some(group) = no_decay_group(config) {
            inner = inner.with_group(group, adamw(config, 0.0), None);
        }
        Self { inner }
    }

    /// One AdamW update of `model` with learning rate `lr`.
    pub fn step<M: Module>(&mut self, lr: f64, model: M, grads: GradientsParams) -> M {
        self.inner.step(lr, model, grads)
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        self.inner.save(path).map_err(|e| anyhow::anyhow!("{}: cannot save optimizer state: {e}", path.display()))
    }

    pub fn load(self, path: &Path) -> anyhow::Result<Self> {
        let inner = self.inner.load(path).map_err(|e| anyhow::anyhow!("{}: cannot load optimizer state: {e}", path.display()))?;
        Ok(Self { inner })
    }
}

struct SumOfSquares<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SumOfSquares<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            // In f32 whatever the gradient's dtype (a host master's single micro-batch leaves
            // them in the compute dtype on the device), one tensor at a time.
            let s = llama_model::adamw::tensor_sum_of_squares(&g.cast(burn::tensor::FloatDType::F32));
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

/// L2 norm of all gradients together (one host sync).
pub fn global_grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    let mut v = SumOfSquares { grads, total: None };
    model.visit(&mut v);
    v.total.map_or(0.0, |t| (t.into_scalar::<f32>() as f64).sqrt())
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// Multiplies every gradient by `factor`.
pub fn scale_grads<M: Module>(model: &M, grads: &mut GradientsParams, factor: f64) {
    model.visit(&mut Scale { grads, factor });
}

/// Clips to `max_norm` by the global norm; returns the norm before clipping. `max_norm` 0
/// disables clipping.
pub fn clip_global_norm<M: Module>(model: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let norm = global_grad_norm(model, grads);
    let factor = clip_factor(norm, max_norm);
    if factor != 1.0 {
        scale_grads(model, grads, factor);
    }
    norm
}

/// The optimizer of a run: Burn's (per parameter, on the model's device) in one process, or
/// the flat AdamW state of [`crate::sharded`]: sharded over the ranks of an MPI job, or whole in
/// one process with the master on the host (`run.optimizer = "host"`, updated in place there).
pub enum StepOptimizer {
    Local(Optimizer),
    Sharded(crate::sharded::ShardedAdamW),
}

/// Whether a run keeps the flat AdamW state of [`crate::sharded`] rather than Burn's record:
/// always over several ranks; with a host master; and when it resumes flat state
/// (`resumed_flat`: whether the checkpoint it resumes holds it, None for a fresh start). A run
/// that resumes Burn's record in one process keeps it, host master or not.
pub fn keeps_flat_state(distributed: bool, host_master: bool, resumed_flat: Option<bool>) -> bool {
    distributed || resumed_flat.unwrap_or(host_master)
}

/// A step's gradients as the optimizer wants them: every parameter's (already clipped for Burn's
/// optimizer; the in-place step clips as it updates), or this rank's block of the summed flat
/// gradient (clipped in the step).
pub enum StepGradients {
    Local(GradientsParams),
    Block(Vec<f32>),
}

impl StepOptimizer {
    /// The step's gradients, summed over ranks, and their global norm before clipping.
    pub fn gradients<M: Module>(&mut self, model: &M, mut grads: GradientsParams, max_norm: f64) -> (StepGradients, f64) {
        match self {
            Self::Local(_) => {
                // Burn's optimizer wants them on the model's device and in its dtype (a host
                // master's may still be on the device the passes ran on).
                grads = crate::parallel::reduce(model, vec![grads]);
                let norm = clip_global_norm(model, &mut grads, max_norm);
                (StepGradients::Local(grads), norm)
            }
            // One process: the gradients stay per parameter, the norm is the device optimizer's.
            Self::Sharded(sharded) if !sharded.is_distributed() => {
                let norm = global_grad_norm(model, &grads);
                (StepGradients::Local(grads), norm)
            }
            Self::Sharded(sharded) => {
                let block = sharded.reduce_gradients(model, &grads);
                let norm = sharded.global_norm(&block);
                (StepGradients::Block(block), norm)
            }
        }
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step<M: Module>(&mut self, lr: f64, model: M, grads: StepGradients, norm: f64, max_norm: f64) -> M {
        self.step_with_copy(lr, model, grads, norm, max_norm, None).0
    }

    /// One AdamW update at learning rate `lr`, and, where the update runs in place on the host
    /// (one process, flat state) and `copy_to`'s dtype is bf16, the updated weights' copy on its
    /// device written in the same pass (see [`crate::sharded::ShardedAdamW::step_in_place`]);
    /// None elsewhere.
    pub fn step_with_copy<M: Module>(
        &mut self,
        lr: f64,
        model: M,
        grads: StepGradients,
        norm: f64,
        max_norm: f64,
        copy_to: Option<(&Device, llama_model::Precision)>,
    ) -> (M, Option<M>) {
        match (self, grads) {
            (Self::Local(o), StepGradients::Local(g)) => (o.step(lr, model, g), None),
            (Self::Sharded(s), StepGradients::Block(b)) => (s.step(lr, model, b, norm, max_norm), None),
            (Self::Sharded(s), StepGradients::Local(g)) => s.step_in_place(lr, model, g, norm, max_norm, copy_to),
            _ => unreachable!("gradients come from the same optimizer"),
        }
    }

    /// The last step's seconds in collectives and bytes each rank sent (sharded only).
    pub fn comm_stats(&self) -> Option<(f64, u64)> {
        match self {
            Self::Sharded(s) if s.is_distributed() => Some(s.comm_stats()),
            _ => None,
        }
    }

    /// Writes the state into checkpoint directory `dir` (each rank its block when sharded).
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        match self {
            Self::Local(o) => o.save(&dir.join(crate::checkpoint::OPTIMIZER_FILE)),
            Self::Sharded(s) => s.save(dir),
        }
    }

    /// Restores the state from checkpoint directory `dir`.
    pub fn load(&mut self, dir: &Path) -> anyhow::Result<()> {
        let sharded_state = crate::sharded::ShardedAdamW::is_saved_in(dir);
        match self {
            Self::Local(o) if !sharded_state => {
                *o = o.clone().load(&dir.join(crate::checkpoint::OPTIMIZER_FILE))?;
                Ok(())
            }
            Self::Sharded(s) if sharded_state => s.load(dir),
            Self::Sharded(_) => anyhow::bail!(
                "{}: the optimizer state was written by a single process (unsharded); resume it with one process, not under mpirun",
                dir.display()
            ),
            Self::Local(_) => unreachable!("a sharded checkpoint is resumed with the sharded optimizer"),
        }
    }
}
