//! Data parallelism over the devices of one machine (`run.devices = N`, `--devices N`).
//!
//! Each optimizer step's micro-batches are dealt out round-robin: replica `r` takes micro-batches
//! `r, r + N, r + 2N, ...` (the reader's windows sharded by rank), runs forward and backward on its
//! own device in its own thread, and the gradients are summed onto the first device, where the
//! one optimizer updates the one master model; the next step's replicas are copies of it. Every
//! micro-batch's loss is divided by the whole step's weight, so the summed gradient is exactly
//! that of one device running all the micro-batches (tested). Checkpoints hold the master model,
//! the optimizer and the one data cursor, so a run resumes on any device count.
//!
//! The reduction is a gather onto device 0 (`Tensor::to_device`) rather than Burn's
//! `burn::tensor::distributed::all_reduce`: that needs a backend with collective support (NCCL
//! through `cuda`); on `flex` it is `unimplemented!()` and on `vulkan`/`wgpu` it is not offered.
//! [`reduce`] is the one function to swap when NCCL is available to test.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, FloatDType, Tensor};
use llama_model::Precision;
use llama_model::recompute::{MemorySaving, with_memory_saving};

use crate::objective::Objective;
use crate::optim::scale_grads;

/// The devices of a run: `count` of the kind in `spec` (`flex`, `vulkan`, `cuda:2`, ...), indices
/// counting up from the one given, or under MPI from this rank's share of its node ([`device_names`]).
/// On `flex` there is one CPU device: N replicas share it (for testing the arithmetic; no speed-up).
pub fn devices(spec: &str, count: usize) -> Result<Vec<Device>, String> {
    device_names(spec, count, local_rank())?
        .iter()
        .map(|name| llama_model::device::parse(name).map(|d| d.autodiff()).map_err(|e| format!("run.devices: {e}")))
        .collect()
}

/// This process's first device (no autodiff), the one a stage builds its model on and the launch
/// check measures: `run.device` in one process; under MPI the node-local rank's, so that the
/// ranks of a node neither all compute on GPU 0 nor each open a context there.
pub fn rank_device(run: &crate::config::RunConfig) -> Result<Device, String> {
    let first = rank_device_name(run)?;
    llama_model::device::parse(&first).map_err(|e| format!("run.device: {e}"))
}

/// The name of [`rank_device`] (e.g. `cuda:3`), for messages and `nvidia-smi -i`.
pub fn rank_device_name(run: &crate::config::RunConfig) -> Result<String, String> {
    Ok(device_names(&run.device, run.devices, local_rank())?.swap_remove(0))
}

/// The node-local rank in an MPI job, `None` in one process.
fn local_rank() -> Option<usize> {
    let world = crate::distributed::world();
    world.is_distributed().then(|| world.local_rank())
}

/// The names of `count` devices of `spec`'s kind for a process that is `local_rank` on its node
/// (`None`: not an MPI job): indices count up from `spec`'s; in an MPI job each rank of a node
/// takes the next `count` (`cuda:LOCAL_RANK` for one each), unless `spec` names an index. The CPU
/// is one device, named `count` times.
pub fn device_names(spec: &str, count: usize, local_rank: Option<usize>) -> Result<Vec<String>, String> {
    if count == 0 {
        return Err("run.devices must be >= 1".into());
    }
    let (kind, first) = match spec.split_once(':') {
        Some((k, i)) => (k, i.parse::<usize>().map_err(|_| format!("run.device `{spec}`: `{i}` is not a device index"))?),
        None => (spec, local_rank.map_or(0, |r| r * count)),
    };
    let keep_spec = llama_model::device::is_cpu(kind) || (count == 1 && first == 0);
    Ok((0..count).map(|i| if keep_spec { spec.to_string() } else { format!("{kind}:{}", first + i) }).collect())
}

/// How a step's passes run: the compute dtype, the memory saving of the forward, and whether
/// the master model lives on the host (`run.optimizer = "host"`).
#[derive(Debug, Clone, Copy)]
pub struct StepPlan {
    pub precision: Precision,
    pub saving: MemorySaving,
    /// The master (f32 weights, optimizer) is on the host; the passes run on device copies in
    /// the compute dtype, whose gradients are summed in f32 on the device and come down to the
    /// host once per step.
    pub host_master: bool,
}

impl StepPlan {
    /// f32, no memory saving, optimizer beside the model.
    pub fn plain(precision: Precision) -> Self {
        Self { precision, saving: MemorySaving::default(), host_master: false }
    }
}

/// The copy of the host master that a step's passes run on `device`: the master's values in the
/// compute dtype as fresh leaves there (the same parameter ids, so the gradients find their
/// master parameters). Building it is what sends each step's updated weights up.
pub fn device_copy<M: Module + Clone>(master: &M, precision: Precision, device: &Device) -> M {
    // Cast on the host, then move: only compute-dtype weights ever reach the device.
    let cast = match precision {
        Precision::F32 => master.clone(),
        half => master.clone().map(&mut CastLeaves(half.dtype())),
    };
    cast.fork(device)
}

/// Replaces each parameter by its value cast to a dtype, as a new leaf (not a tracked cast).
struct CastLeaves(FloatDType);

impl ModuleMapper for CastLeaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let id = param.id;
        let value = param.val().inner().cast(self.0).autodiff().require_grad();
        Param::initialized(id, value)
    }
}

/// One replica's share of a step: the summed-then-scaled gradients of its micro-batches (on
/// `model`'s device: in f32, or with a host master and a single micro-batch in the compute
/// dtype) and the sum of their (unscaled) losses. `total_weight` is the whole step's, across all
/// replicas.
///
/// Memory, per parameter: in a half precision the passes run on a copy whose parameters are
/// fresh leaves in the compute dtype (a host master's copy already is one; else it is made
/// here from the f32 master), so a pass hands back its gradients in that dtype, and they are
/// added into the f32 sum one parameter at a time. The device then holds the copy, the pass's
/// gradients and the sum: 2 + 2 + 4 bytes in bf16, as `LlamaConfig::memory_estimate` counts. A
/// cast tracked by autodiff would hand back every gradient in f32 at once, beside the sum (4
/// bytes more), and casting the pass's gradients before summing would too.
pub fn backward_part<'a, M, O>(
    model: &M,
    objective: &O,
    batches: impl IntoIterator<Item = &'a O::Batch>,
    plan: StepPlan,
    scale: f64,
    total_weight: f64,
) -> (GradientsParams, f64)
where
    M: Module + Clone,
    O: Objective<M>,
    O::Batch: 'a,
{
    let mut sum = GradientsParams::new();
    let mut loss_sum = 0.0;
    // A host master's device copy is already in the compute dtype.
    let precision = if plan.host_master { Precision::F32 } else { plan.precision };
    let batches: Vec<&O::Batch> = batches.into_iter().collect();
    // The sum is f32, except a host master's single micro-batch: its gradients come down to the
    // host as they are, and are cast there.
    let in_f32 = !(plan.host_master && batches.len() == 1);
    for batch in batches {
        let grads = with_memory_saving(plan.saving, || {
            // A fresh compute copy per micro-batch: a backward pass consumes the graph.
            let compute = match precision {
                Precision::F32 => model.clone(),
                half => model.clone().map(&mut CastLeaves(half.dtype())),
            };
            let loss = objective.loss_sum(&compute, batch).cast(FloatDType::F32);
            loss_sum += loss.clone().into_scalar::<f32>() as f64;
            let grads = loss.mul_scalar(scale / total_weight).backward();
            GradientsParams::from_grads(grads, &compute)
        });
        model.visit(&mut AddInto { sum: &mut sum, grads, in_f32 });
    }
    (sum, loss_sum)
}

/// Adds each parameter's gradient in `grads` into `sum` (cast to f32 first when `in_f32`), a
/// parameter at a time, so that only one parameter's cast exists beside the gradients still to add.
struct AddInto<'a> {
    sum: &'a mut GradientsParams,
    grads: GradientsParams,
    in_f32: bool,
}

impl ModuleVisitor for AddInto<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            let g = if self.in_f32 && g.dtype() != FloatDType::F32.into() { g.cast(FloatDType::F32) } else { g };
            let total = match self.sum.remove::<D>(param.id) {
                Some(s) => s + g,
                None => g,
            };
            self.sum.register(param.id, total);
        }
    }
}

/// The step's gradients (unscaled) and mean loss: with several `devices`, computed by one
/// replica per device in parallel threads and summed on `master`'s device in f32; with none or
/// one, by `master` itself, or with a host master by its compute copy on `devices[0]` (else the
/// master's device): `prepared` if given (the optimizer's, see
/// [`crate::optim::StepOptimizer::step_with_copy`]), else [`device_copy`]'s. A host master's
/// gradients then stay on that device, as the passes left them (f32, or the compute dtype for a
/// single micro-batch), for the optimizer to bring down; with a loss scale they come down first,
/// to be unscaled in f32.
pub fn accumulate<M, O>(
    master: &M,
    objective: &O,
    batches: &[O::Batch],
    plan: StepPlan,
    scale: f64,
    devices: &[Device],
    prepared: Option<M>,
) -> (GradientsParams, f64)
where
    M: Module + Clone + Send + Sync,
    O: Objective<M> + Sync,
    O::Batch: Sync,
{
    let world = devices.len();
    // In an MPI job `batches` is this rank's share: the step's weight and loss are the job's.
    let ranks = crate::distributed::world();
    let mut total_weight = [batches.iter().map(|b| objective.weight(b)).sum::<f64>()];
    ranks.sum_f64(&mut total_weight);
    let total_weight = total_weight[0].max(1.0);
    let job_loss = |loss_sum: f64| {
        let mut loss = [loss_sum];
        ranks.sum_f64(&mut loss);
        loss[0] / total_weight
    };
    if world <= 1 {
        let replica = if plan.host_master {
            // No device given: the passes run beside the master (as on the CPU).
            let device = devices.first().cloned().unwrap_or_else(|| master.devices()[0].clone());
            prepared.unwrap_or_else(|| device_copy(master, plan.precision, &device))
        } else {
            master.clone()
        };
        let (mut grads, loss_sum) = backward_part(&replica, objective, batches, plan, scale, total_weight);
        if scale != 1.0 {
            grads = reduce(master, vec![grads]);
            scale_grads(master, &mut grads, 1.0 / scale);
        }
        return (grads, job_loss(loss_sum));
    }
    let parts: Vec<(GradientsParams, f64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, device)| {
                scope.spawn(move || {
                    let replica = if plan.host_master {
                        device_copy(master, plan.precision, device)
                    } else if rank == 0 {
                        master.clone()
                    } else {
                        master.clone().fork(device)
                    };
                    backward_part(&replica, objective, batches.iter().skip(rank).step_by(world), plan, scale, total_weight)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a data-parallel replica panicked")).collect()
    });
    let loss_sum: f64 = parts.iter().map(|(_, l)| l).sum();
    let mut grads = reduce(master, parts.into_iter().map(|(g, _)| g).collect());
    if scale != 1.0 {
        scale_grads(master, &mut grads, 1.0 / scale);
    }
    (grads, job_loss(loss_sum))
}

/// Sums the replicas' gradients, parameter by parameter, onto the master's device and dtype.
pub fn reduce<M: Module>(master: &M, parts: Vec<GradientsParams>) -> GradientsParams {
    let mut sum = SumOnto { parts, out: GradientsParams::new() };
    master.visit(&mut sum);
    sum.out
}

struct SumOnto {
    parts: Vec<GradientsParams>,
    out: GradientsParams,
}

impl ModuleVisitor for SumOnto {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let (device, dtype) = (value.device(), value.dtype());
        let total = self
            .parts
            .iter_mut()
            .filter_map(|g| g.remove::<D>(param.id))
            .map(|g| {
                let g = g.to_device(&device);
                if g.dtype() == dtype { g } else { g.cast(dtype) }
            })
            .reduce(|a, b| a + b);
        if let Some(total) = total {
            self.out.register(param.id, total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mpi_rank_takes_its_own_devices_of_the_node() {
        let names = |spec, count, rank| device_names(spec, count, rank).unwrap();
        assert_eq!(names("cuda", 1, None), ["cuda"]);
        assert_eq!(names("cuda", 2, None), ["cuda:0", "cuda:1"]);
        assert_eq!(names("cuda:2", 2, None), ["cuda:2", "cuda:3"]);
        assert_eq!(names("cuda", 1, Some(0)), ["cuda"]);
        assert_eq!(names("cuda", 1, Some(3)), ["cuda:3"]);
        assert_eq!(names("vulkan", 2, Some(1)), ["vulkan:2", "vulkan:3"]);
        assert_eq!(names("cuda:1", 1, Some(3)), ["cuda:1"], "an index named in the config is every rank's");
        assert_eq!(names("flex", 2, Some(1)), ["flex", "flex"]);
        assert!(device_names("cuda", 0, None).unwrap_err().contains("run.devices"));
        assert!(device_names("cuda:x", 1, Some(1)).unwrap_err().contains("`x` is not a device index"));
    }
}
