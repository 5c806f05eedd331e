//! AdamW with its state sharded over the ranks of a job (ZeRO stage 1), on the host.
//!
//! Every float parameter is laid end to end in one flat vector (the model's visiting order),
//! padded to a multiple of the world size and cut into equal blocks: rank `r` owns block `r`.
//! A step reduce-scatters the ranks' summed gradients (each rank receives the sum over ranks of
//! its block only), takes the global gradient norm from an all-reduce of the blocks' sums of
//! squares, clips, updates its block of the f32 master weights and of the two moments with
//! Burn's AdamW arithmetic ([`AdamWRule`]), and all-gathers the updated blocks so that every
//! rank holds the whole updated model. Each rank stores 8 bytes of optimizer state per parameter
//! divided by the world size.
//!
//! In one process (`run.optimizer = "host"`) the same state is updated without the flat
//! gradient: [`ShardedAdamW::step_in_place`] walks the parameters, each gradient brought down
//! from the device while the previous parameter updates, clipped by the global norm and AdamW
//! applied in one pass over the parameter's f32 master values, its gradient and its slot of the
//! two flat moments (writing the bf16 or f16 compute copy too, sent up while the next one
//! updates); the arithmetic is the per-tensor optimizer's, bit for bit, and no moment tensor is
//! allocated per step.
//!
//! Checkpoints hold one file per block (`optimizer/block-R-of-W.safetensors`: `moment_1`,
//! `moment_2`) and `optimizer/manifest.json` (world size, block length, the parameters' offsets,
//! step count); a run resumes at any world size (the blocks are re-cut from the files), or in a
//! single process.

use std::path::Path;
use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamGroup};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, Tensor, TensorData};
use llama_model::Precision;
use llama_model::adamw::{AdamWRule, HalfCopy, adamw_flat, sum_of_squares};
use serde::{Deserialize, Serialize};

use crate::config::OptimConfig;
use crate::distributed::World;

/// The folder of a checkpoint that holds sharded optimizer state.
pub const SHARDED_DIR: &str = "optimizer";
const MANIFEST: &str = "manifest.json";

/// Where one parameter lies in the flat vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    /// The module path (`layers.0.attention.wq.weight`), for messages and for other tools.
    pub path: String,
    pub offset: usize,
    pub shape: Vec<usize>,
    /// Whether weight decay applies (norms and embeddings are exempt unless configured).
    pub decay: bool,
}

impl Slot {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What `optimizer/manifest.json` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    world_size: usize,
    /// Elements per block (the flat vector padded to `world_size * block`).
    block: usize,
    /// Steps taken (AdamW's bias-correction time).
    time: usize,
    slots: Vec<Slot>,
}

/// ZeRO-1 AdamW of one rank: see the module docs.
pub struct ShardedAdamW {
    world: World,
    slots: Vec<Slot>,
    block: usize,
    moment_1: Vec<f32>,
    moment_2: Vec<f32>,
    time: usize,
    betas_eps: [f32; 3],
    weight_decay: f32,
    /// Seconds spent in the last step's collectives (reduce-scatter, norm, all-gather).
    comm_seconds: f64,
}

/// The parameters' slots in visiting order, with Burn's module paths.
struct Layout<'a> {
    path: Vec<String>,
    slots: Vec<Slot>,
    offset: usize,
    no_decay: Option<&'a ParamGroup>,
}

impl ModuleVisitor for Layout<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.join(".");
        let shape = param.val().dims().to_vec();
        let decay = !self.no_decay.is_some_and(|g| g.matches(&param.id, Some(&path)));
        let len: usize = shape.iter().product();
        self.slots.push(Slot { path, offset: self.offset, shape, decay });
        self.offset += len;
    }
}

fn layout<M: Module>(model: &M, config: &OptimConfig) -> Vec<Slot> {
    let no_decay = crate::optim_rules::no_decay_group(config);
    let mut l = Layout { path: vec![], slots: vec![], offset: 0, no_decay: no_decay.as_ref() };
    model.visit(&mut l);
    l.slots
}

/// Copies each parameter's gradient (zeros where it has none) into its slot of the flat vector.
struct FlattenGrads<'a> {
    grads: &'a GradientsParams,
    flat: &'a mut [f32],
    slots: std::slice::Iter<'a, Slot>,
}

impl ModuleVisitor for FlattenGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let slot = self.slots.next().expect("the layout covers every parameter");
        if let Some(g) = self.grads.get::<D>(param.id) {
            let values = g.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 gradient values");
            self.flat[slot.offset..slot.offset + slot.len()].copy_from_slice(&values);
        }
    }
}

/// Copies the part of each parameter that falls in `range` of the flat vector into `out`.
struct FlattenRange<'a> {
    range: std::ops::Range<usize>,
    out: &'a mut [f32],
    slots: std::slice::Iter<'a, Slot>,
}

impl ModuleVisitor for FlattenRange<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let slot = self.slots.next().expect("the layout covers every parameter");
        let (start, end) = (slot.offset.max(self.range.start), (slot.offset + slot.len()).min(self.range.end));
        if start < end {
            let values = param.val().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 parameter values");
            self.out[start - self.range.start..end - self.range.start].copy_from_slice(&values[start - slot.offset..end - slot.offset]);
        }
    }
}

/// Each parameter's gradient as a job that brings it to the host in f32 (None where it has none),
/// in the model's visiting order: the download stage of [`ShardedAdamW::step_in_place`].
struct GradientDownloads<'a> {
    grads: &'a mut GradientsParams,
    jobs: Vec<Option<Box<dyn FnOnce() -> Vec<f32> + Send>>>,
}

impl ModuleVisitor for GradientDownloads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let grad = self.grads.remove::<D>(param.id);
        self.jobs.push(grad.map(|g| Box::new(move || f32_values(g)) as Box<dyn FnOnce() -> Vec<f32> + Send>));
    }
}

fn f32_values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 values")
}

/// Updates every parameter that has a gradient (received in order from the download stage), in
/// place: clip, AdamW and its moments' slots in one pass (`adamw_flat`), the result a new leaf on
/// the parameter's device and dtype. A parameter without a gradient is left as it is, as Burn's
/// optimizers leave it. With `uploads`, the same pass writes the 16-bit copy (`H`) of every
/// parameter, which goes to the upload stage.
struct UpdateInPlace<'a, H> {
    grads: std::sync::mpsc::Receiver<Option<Vec<f32>>>,
    uploads: Option<std::sync::mpsc::SyncSender<Vec<H>>>,
    slots: std::slice::Iter<'a, Slot>,
    moment_1: &'a mut [f32],
    moment_2: &'a mut [f32],
    clip: f32,
    rules: [AdamWRule; 2],
}

impl<H: HalfCopy> ModuleMapper for UpdateInPlace<'_, H> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let slot = self.slots.next().expect("the layout covers every parameter");
        let grad = self.grads.recv().expect("the download stage sends every parameter");
        let Some(grad) = grad else {
            // Not updated, still part of the copy.
            if let Some(uploads) = &self.uploads {
                let half = f32_values(param.val().inner()).into_iter().map(H::from_f32).collect();
                uploads.send(half).expect("the upload stage runs until the last parameter");
            }
            return param;
        };
        // The master's values are taken, not copied, where this is their only handle (the run
        // hands its model over for the update).
        let (id, old, _) = param.consume();
        let (device, dtype) = (old.device(), old.dtype());
        let mut values = f32_values(old.inner());
        let mut half = self.uploads.as_ref().map(|_| H::zeros(values.len()));
        let range = slot.offset..slot.offset + slot.len();
        let rule = if slot.decay { &self.rules[0] } else { &self.rules[1] };
        adamw_flat(&mut values, &grad, &mut self.moment_1[range.clone()], &mut self.moment_2[range], self.clip, rule, half.as_deref_mut());
        if let (Some(uploads), Some(half)) = (&self.uploads, half) {
            uploads.send(half).expect("the upload stage runs until the last parameter");
        }
        leaf(id, values, slot, &device, dtype)
    }
}

/// Replaces every parameter by its uploaded 16-bit values (flat, in visiting order) as a new leaf:
/// the compute copy that [`crate::parallel::device_copy`] would make of the updated master.
struct Uploaded(std::vec::IntoIter<Tensor<1>>);

impl ModuleMapper for Uploaded {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let flat = self.0.next().expect("one upload per parameter");
        Param::initialized(param.id, flat.reshape(param.val().dims()).autodiff().require_grad())
    }
}

/// Parameter `id` holding `values` (shaped as `slot`) as a new leaf on `device` in `dtype`.
fn leaf<const D: usize>(id: burn::module::ParamId, values: Vec<f32>, slot: &Slot, device: &Device, dtype: DType) -> Param<Tensor<D>> {
    let value = Tensor::<D>::from_data(TensorData::new(values, slot.shape.clone()), &device.clone().inner()).cast(dtype).autodiff().require_grad();
    Param::initialized(id, value)
}

/// Replaces every parameter by its slot of the flat vector (a new leaf on its device and dtype).
struct Unflatten<'a> {
    flat: &'a [f32],
    slots: std::slice::Iter<'a, Slot>,
}

impl ModuleMapper for Unflatten<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let slot = self.slots.next().expect("the layout covers every parameter");
        let old = param.val();
        leaf(param.id, self.flat[slot.offset..slot.offset + slot.len()].to_vec(), slot, &old.device(), old.dtype())
    }
}

impl ShardedAdamW {
    /// Zero state for `model`'s parameters, sharded over `world`.
    pub fn new<M: Module>(model: &M, config: &OptimConfig, world: World) -> Self {
        let slots = layout(model, config);
        let total = slots.last().map_or(0, |s| s.offset + s.len());
        let block = total.div_ceil(world.size());
        Self {
            world,
            slots,
            block,
            moment_1: vec![0.0; block],
            moment_2: vec![0.0; block],
            time: 0,
            betas_eps: [config.beta1 as f32, config.beta2 as f32, config.eps as f32],
            weight_decay: config.weight_decay as f32,
            comm_seconds: 0.0,
        }
    }

    /// Whether the state is sharded over several ranks (else one process holds all of it).
    pub fn is_distributed(&self) -> bool {
        self.world.is_distributed()
    }

    /// Elements of the flat vector (without padding).
    pub fn total(&self) -> usize {
        self.slots.last().map_or(0, |s| s.offset + s.len())
    }

    fn range(&self) -> std::ops::Range<usize> {
        let start = self.world.rank() * self.block;
        start..start + self.block
    }

    /// Every rank's model made equal to rank 0's (run once at the start of a job).
    pub fn broadcast_model<M: Module>(&self, model: M) -> M {
        if !self.world.is_distributed() {
            return model;
        }
        let mut flat = vec![0f32; self.total()];
        model.visit(&mut FlattenRange { range: 0..self.total(), out: &mut flat, slots: self.slots.iter() });
        self.world.broadcast(&mut flat);
        model.map(&mut Unflatten { flat: &flat, slots: self.slots.iter() })
    }

    /// This rank's block of the gradient summed over ranks (`grads` holds this rank's part,
    /// already divided by the whole step's weight and unscaled).
    pub fn reduce_gradients<M: Module>(&mut self, model: &M, grads: &GradientsParams) -> Vec<f32> {
        let mut flat = vec![0f32; self.block * self.world.size()];
        model.visit(&mut FlattenGrads { grads, flat: &mut flat, slots: self.slots.iter() });
        let started = Instant::now();
        let block = self.world.reduce_scatter_sum(&flat);
        self.comm_seconds = started.elapsed().as_secs_f64();
        block
    }

    /// The L2 norm of the whole summed gradient (every rank gets the same value).
    pub fn global_norm(&mut self, block: &[f32]) -> f64 {
        let mut sum = [sum_of_squares(block)];
        let started = Instant::now();
        self.world.sum_f64(&mut sum);
        self.comm_seconds += started.elapsed().as_secs_f64();
        sum[0].sqrt()
    }

    /// The last step's time in collectives, and the bytes each rank sent in them: a ring
    /// reduce-scatter and all-gather of the padded f32 vector each send (N - 1) / N of it.
    pub fn comm_stats(&self) -> (f64, u64) {
        let n = self.world.size() as u64;
        (self.comm_seconds, 2 * 4 * self.block as u64 * (n - 1))
    }

    /// Clips `block` to `max_norm` by the global `norm` (`optim_rules::clip_factor`, as `optim::clip_global_norm`),
    /// updates this rank's block and returns the model with every rank's updated block.
    pub fn step<M: Module>(&mut self, lr: f64, model: M, block: Vec<f32>, norm: f64, max_norm: f64) -> M {
        let (clip, [decaying, exempt]) = self.next_step(lr, norm, max_norm);
        let range = self.range();
        let mut master = vec![0f32; self.block];
        model.visit(&mut FlattenRange { range: range.clone(), out: &mut master, slots: self.slots.iter() });
        for slot in &self.slots {
            let (start, end) = (slot.offset.max(range.start), (slot.offset + slot.len()).min(range.end));
            let (a, b) = (start.saturating_sub(range.start), end.saturating_sub(range.start));
            if a < b {
                let rule = if slot.decay { &decaying } else { &exempt };
                // Clip, AdamW and the moments in one pass over this slot's part of the block.
                adamw_flat(&mut master[a..b], &block[a..b], &mut self.moment_1[a..b], &mut self.moment_2[a..b], clip, rule, None::<&mut [half::bf16]>);
            }
        }
        let started = Instant::now();
        let flat = self.world.all_gather(&master);
        self.comm_seconds += started.elapsed().as_secs_f64();
        model.map(&mut Unflatten { flat: &flat, slots: self.slots.iter() })
    }

    /// Counts a step and returns its clip factor (of the global `norm`, as
    /// `optim::clip_global_norm`'s) and AdamW rules: with weight decay, and without (the exempt
    /// group).
    fn next_step(&mut self, lr: f64, norm: f64, max_norm: f64) -> (f32, [AdamWRule; 2]) {
        self.time += 1;
        let [b1, b2, eps] = self.betas_eps;
        let rules = [AdamWRule::new(lr, [b1, b2, eps, self.weight_decay], self.time), AdamWRule::new(lr, [b1, b2, eps, 0.0], self.time)];
        (crate::optim_rules::clip_factor(norm, max_norm) as f32, rules)
    }

    /// One process's update: each parameter's gradient (`grads`, every one of them, unclipped,
    /// on any device and in any float dtype) times the clip factor of the global `norm`, then
    /// AdamW, parameter by parameter in place (see the module docs). The same numbers as
    /// [`crate::optim::Optimizer`] after `clip_global_norm`, bit for bit.
    ///
    /// With `copy_to` (the device the passes run on and their compute dtype) in bf16 or f16, the
    /// same pass also writes each updated parameter in that dtype, and the second model returned
    /// is those values on that device: the next step's compute copy (what
    /// [`crate::parallel::device_copy`] makes), without a separate cast. In f32 there is nothing to
    /// cast (None: the caller's copy is the master itself, moved). Three stages overlap, one
    /// parameter apart, as ZeRO-Offload's do: a thread brings the next gradient down while this
    /// one updates a parameter, and another sends the previous one's copy up.
    pub fn step_in_place<M: Module>(
        &mut self,
        lr: f64,
        model: M,
        grads: GradientsParams,
        norm: f64,
        max_norm: f64,
        copy_to: Option<(&Device, Precision)>,
    ) -> (M, Option<M>) {
        match copy_to {
            Some((device, Precision::Bf16)) => self.update_in_place::<M, half::bf16>(lr, model, grads, norm, max_norm, Some(device)),
            Some((device, Precision::F16)) => self.update_in_place::<M, half::f16>(lr, model, grads, norm, max_norm, Some(device)),
            _ => self.update_in_place::<M, half::bf16>(lr, model, grads, norm, max_norm, None),
        }
    }

    /// [`ShardedAdamW::step_in_place`] with its copy (if any) in `H`.
    fn update_in_place<M: Module, H: HalfCopy>(
        &mut self,
        lr: f64,
        model: M,
        mut grads: GradientsParams,
        norm: f64,
        max_norm: f64,
        copy_to: Option<&Device>,
    ) -> (M, Option<M>) {
        assert!(!self.world.is_distributed(), "step_in_place updates the whole model: one process only");
        let (clip, rules) = self.next_step(lr, norm, max_norm);
        let total = self.total();
        let mut downloads = GradientDownloads { grads: &mut grads, jobs: vec![] };
        model.visit(&mut downloads);
        let jobs = downloads.jobs;
        let (moment_1, moment_2) = (&mut self.moment_1[..total], &mut self.moment_2[..total]);
        let slots = self.slots.iter();
        std::thread::scope(|scope| {
            // One parameter in the channel and one in hand: the host holds at most a few
            // parameters' gradients and copies beside the master and the moments.
            let (grad_tx, grad_rx) = std::sync::mpsc::sync_channel(1);
            scope.spawn(move || {
                for job in jobs {
                    if grad_tx.send(job.map(|download| download())).is_err() {
                        break;
                    }
                }
            });
            let (uploads, uploader) = match copy_to {
                Some(device) => {
                    let device = device.clone().inner();
                    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<H>>(1);
                    let uploader = scope.spawn(move || {
                        rx.into_iter()
                            .map(|half| {
                                let len = half.len();
                                Tensor::<1>::from_data(TensorData::new(half, [len]), (&device, H::DTYPE))
                            })
                            .collect::<Vec<_>>()
                    });
                    (Some(tx), Some(uploader))
                }
                None => (None, None),
            };
            let mut update = UpdateInPlace { grads: grad_rx, uploads, slots, moment_1, moment_2, clip, rules };
            let updated = model.map(&mut update);
            // Closing the channel ends the upload stage.
            drop(update);
            let copy = uploader.map(|u| {
                let flat = u.join().expect("the upload stage panicked");
                updated.clone().map(&mut Uploaded(flat.into_iter()))
            });
            (updated, copy)
        })
    }

    /// Writes this rank's block into `dir/optimizer/` (and, on rank 0, the manifest). Every rank
    /// writes into the same (shared) directory.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let folder = dir.join(SHARDED_DIR);
        std::fs::create_dir_all(&folder).map_err(|e| anyhow::anyhow!("{}: {e}", folder.display()))?;
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (m1, m2) = (bytes(&self.moment_1), bytes(&self.moment_2));
        let shape = vec![self.block];
        let tensors = vec![
            ("moment_1".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), &m1)?),
            ("moment_2".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &m2)?),
        ];
        llama_model::checkpoint::write_safetensors(tensors, None, &folder.join(block_file(self.world.rank(), self.world.size())))?;
        if self.world.is_root() {
            let manifest = Manifest { world_size: self.world.size(), block: self.block, time: self.time, slots: self.slots.clone() };
            let path = folder.join(MANIFEST);
            std::fs::write(&path, serde_json::to_string_pretty(&manifest)?).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// Whether a checkpoint directory holds sharded optimizer state.
    pub fn is_saved_in(dir: &Path) -> bool {
        dir.join(SHARDED_DIR).join(MANIFEST).is_file()
    }

    /// Restores this rank's block from a checkpoint written at any world size.
    pub fn load(&mut self, dir: &Path) -> anyhow::Result<()> {
        let folder = dir.join(SHARDED_DIR);
        let path = folder.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let saved: Manifest = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: invalid optimizer manifest: {e}", path.display()))?;
        if saved.slots != self.slots {
            anyhow::bail!("{}: the optimizer state was written for other parameters (shapes or order differ from this model's)", path.display());
        }
        let range = self.range();
        let total = self.total();
        for r in 0..saved.world_size {
            let (start, end) = ((r * saved.block).max(range.start), ((r + 1) * saved.block).min(range.end).min(total));
            if start >= end {
                continue;
            }
            let file = folder.join(block_file(r, saved.world_size));
            let bytes = std::fs::read(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            for (name, out) in [("moment_1", &mut self.moment_1), ("moment_2", &mut self.moment_2)] {
                let view = tensors.tensor(name).map_err(|e| anyhow::anyhow!("{}: {name}: {e}", file.display()))?;
                if view.dtype() != safetensors::Dtype::F32 || view.shape() != [saved.block] {
                    anyhow::bail!("{}: {name} is not {} f32 values", file.display(), saved.block);
                }
                let values = view.data();
                for i in start..end {
                    let at = (i - r * saved.block) * 4;
                    out[i - range.start] = f32::from_le_bytes(values[at..at + 4].try_into().expect("4 bytes"));
                }
            }
        }
        self.time = saved.time;
        Ok(())
    }
}

fn block_file(rank: usize, world: usize) -> String {
    format!("block-{rank:05}-of-{world:05}.safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::Distribution;

    fn values<const D: usize>(t: Tensor<D>) -> (DType, Vec<f32>) {
        (t.dtype(), t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap())
    }

    /// The in-place step's bf16 or f16 copy, written in its pass and sent up by its upload
    /// stage, is the updated master cast as `device_copy` casts it, bit for bit, on the device
    /// asked for and as trainable leaves; the master is the same with or without the copy.
    #[test]
    fn the_in_place_step_writes_the_compute_copy_of_its_update() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let model: Linear = LinearConfig::new(24, 300).init(&device);
        let x = Tensor::<2>::random([4, 24], Distribution::Normal(0.0, 1.0), &device);
        let grads = || GradientsParams::from_grads(model.forward(x.clone()).powi_scalar(2).mean().backward(), &model);
        let config = OptimConfig::default();
        let world = crate::distributed::world();
        let (plain, none) = ShardedAdamW::new(&model, &config, world).step_in_place(1e-2, model.clone(), grads(), 0.5, 1.0, None);
        assert!(none.is_none());
        // f32 needs no cast: the caller moves the master itself.
        let (_, in_f32) = ShardedAdamW::new(&model, &config, world).step_in_place(1e-2, model.clone(), grads(), 0.5, 1.0, Some((&device, Precision::F32)));
        assert!(in_f32.is_none());
        for (precision, dtype) in [(Precision::F16, DType::F16), (Precision::Bf16, DType::BF16)] {
            let (updated, copy) = ShardedAdamW::new(&model, &config, world).step_in_place(1e-2, model.clone(), grads(), 0.5, 1.0, Some((&device, precision)));
            let copy = copy.expect("a copy was asked for");
            assert_eq!(values(plain.weight.val()), values(updated.weight.val()));
            assert_ne!(values(model.weight.val()), values(updated.weight.val()), "the step did not move the weights");
            let cast = crate::parallel::device_copy(&updated, precision, &device);
            for (got, want) in [(copy.weight.val(), cast.weight.val()), (copy.clone().bias.unwrap().val().unsqueeze(), cast.bias.unwrap().val().unsqueeze())] {
                assert!(got.is_autodiff() && got.device() == device, "{:?}", got.device());
                let (got, want) = (values(got), values(want));
                assert_eq!(got.0, dtype);
                assert_eq!(got, want);
            }
        }
        let (_, copy) = ShardedAdamW::new(&model, &config, world).step_in_place(1e-2, model.clone(), grads(), 0.5, 1.0, Some((&device, Precision::Bf16)));
        let copy = copy.expect("a copy was asked for");
        // Trainable: a pass through the copy gives its weight a gradient.
        let loss = copy.forward(x.cast(burn::tensor::FloatDType::BF16)).sum();
        assert!(GradientsParams::from_grads(loss.backward(), &copy).get::<2>(copy.weight.id).is_some());
    }
}
