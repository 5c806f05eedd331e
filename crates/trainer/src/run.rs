//! The step-based training loop. A stage supplies an [`Objective`]: how to make micro-batches,
//! how to turn one into a summed loss, how to evaluate, and its data position; the loop does the
//! rest: accumulation with correct loss scaling, global-norm clipping, AdamW, the schedule,
//! non-finite step skipping, logging, evaluation, checkpoints and resume.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::store::ModuleSnapshot;
use llama_model::checkpoint::{load_weights, save_weights};

use crate::checkpoint::{Checkpoints, MODEL_FILE, OPTIMIZER_FILE, RunLock, STATE_FILE, TrainState};
use crate::config::{OptimConfig, OptimizerPlacement, RunConfig, TrainConfig};
use crate::metrics::{Metrics, peak_rss_bytes};
use crate::objective::Objective;
use crate::optim::{Optimizer, StepOptimizer};
use crate::parallel::{StepPlan, device_copy};
use crate::precision::{self, LossScale, Precision};
use crate::schedule::Schedule;
use crate::test_hooks::kill_point;

/// Everything the loop needs besides the model and the objective.
pub struct LoopConfig {
    pub train: TrainConfig,
    pub run: RunConfig,
    pub optim: OptimConfig,
    pub schedule: Schedule,
    pub total_steps: u64,
    /// Stop (with a checkpoint) after this step, as if interrupted; the schedule still spans
    /// `total_steps`.
    pub stop_after: Option<u64>,
    pub resume: bool,
    /// Training FLOPs per token, for MFU.
    pub flops_per_token: f64,
    /// The model config as TOML, stored in checkpoints and checked on resume.
    pub model_config: String,
    /// Evaluate the starting model before the first step of a new run (step 0).
    pub eval_at_start: bool,
    /// The compute dtype (`run.dtype`); master weights and optimizer state are always f32.
    pub precision: Precision,
    /// Data-parallel replicas' devices (`run.devices`); empty or one: the model's own device.
    pub devices: Vec<burn::tensor::Device>,
    /// The tokenizer the stage trains with: copied into every checkpoint with the files beside
    /// it (`llama_io::TOKENIZER_FILES`), so a checkpoint is a model directory that `llama chat`
    /// and the next stage read as they read a Hugging Face one.
    pub tokenizer: Option<PathBuf>,
}

/// Command-line overrides every training stage takes (`--max-steps --out --device --dtype
/// --devices --recompute --optimizer --init --resume --stop-after`; see [`crate::cli::TrainingArgs`]).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub max_steps: Option<u64>,
    pub out: Option<PathBuf>,
    pub device: Option<String>,
    /// Compute dtype (`run.dtype`): f32, bf16, f16.
    pub dtype: Option<String>,
    /// Data-parallel devices (`run.devices`).
    pub devices: Option<usize>,
    /// `train.recompute`.
    pub recompute: Option<llama_model::Recompute>,
    /// `run.optimizer`.
    pub optimizer: Option<llama_model::OptimizerPlacement>,
    /// What to start from (stages that start from a model).
    pub init: Option<PathBuf>,
    pub resume: bool,
    pub stop_after: Option<u64>,
}

impl Overrides {
    /// Applies `--out`, `--device`, `--dtype`, `--devices`, `--optimizer` to the run section and
    /// `--recompute` to the train section (the stages apply `--max-steps` their own way).
    pub fn apply(&self, run: &mut RunConfig, train: &mut TrainConfig) {
        if let Some(r) = self.recompute {
            train.recompute = r;
        }
        if let Some(o) = self.optimizer {
            run.optimizer = o;
        }
        if let Some(out) = &self.out {
            run.out_dir = out.clone();
        }
        if let Some(d) = &self.device {
            run.device = d.clone();
        }
        if let Some(d) = &self.dtype {
            run.dtype = d.clone();
        }
        if let Some(n) = self.devices {
            run.devices = n;
        }
    }
}

impl Overrides {
    /// The step count of a stage that trains for epochs over a fixed set of examples (`sft`,
    /// `reward`; see `TrainConfig::validate_epoch_stage`): `--max-steps`, else the config's
    /// `train.max_steps`, else `epochs` passes over `examples` in batches of `train.batch_size`.
    pub fn epoch_stage_steps(&self, train: &TrainConfig, examples: usize, epochs: u64) -> u64 {
        let epochs_worth = || (examples as u64 * epochs).div_ceil(train.batch_size as u64);
        self.max_steps.or(train.max_steps).unwrap_or_else(epochs_worth).max(1)
    }
}

impl LoopConfig {
    /// The loop configuration of a stage's run: the schedule over `total_steps` from the peak LR,
    /// FLOPs per token at `seq_len` for MFU, the model config for checkpoints, and the overrides'
    /// `--resume` / `--stop-after`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        train: TrainConfig,
        run: RunConfig,
        optim: OptimConfig,
        schedule: &crate::config::ScheduleConfig,
        total_steps: u64,
        model: &llama_model::LlamaConfig,
        seq_len: usize,
        overrides: &Overrides,
        eval_at_start: bool,
    ) -> anyhow::Result<Self> {
        let precision = crate::memory::check_launch(&run, model, &train, seq_len).map_err(anyhow::Error::msg)?;
        crate::memory::note_cpu_precision(&run, precision);
        let devices = crate::parallel::devices(&run.device, run.devices).map_err(anyhow::Error::msg)?;
        let accumulation = train.accumulation();
        let ranks = crate::distributed::world().size();
        if !accumulation.is_multiple_of(run.devices * ranks) {
            bail!(
                "train.batch_size ({}) must be a multiple of train.micro_batch_size ({}) x run.devices ({}) x MPI ranks ({ranks}): each device runs micro-batches of micro_batch_size",
                train.batch_size,
                train.micro_batch_size,
                run.devices
            );
        }
        Ok(Self {
            precision,
            devices,
            schedule: Schedule::new(schedule, optim.lr, total_steps),
            total_steps,
            stop_after: overrides.stop_after,
            resume: overrides.resume,
            flops_per_token: model.train_flops_per_token(seq_len),
            model_config: crate::model_config_toml(model)?,
            eval_at_start,
            train,
            run,
            optim,
            tokenizer: None,
        })
    }

    /// The tokenizer checkpoints carry (see [`LoopConfig::tokenizer`]).
    pub fn with_tokenizer(mut self, tokenizer_json: &Path) -> Self {
        self.tokenizer = Some(tokenizer_json.to_path_buf());
        self
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub steps: u64,
    pub tokens: u64,
    pub skipped: u64,
    pub last_loss: Option<f64>,
    pub checkpoint: Option<PathBuf>,
}

/// Gradients and loss of one optimizer step over several micro-batches: each micro-batch's
/// summed loss is divided by the total weight of the step before its backward pass, so the
/// accumulated gradient is that of the mean loss over the whole step, however it is split.
///
/// The passes run on `precision`'s compute copy of `model`; the gradients returned are f32 and
/// belong to `model`'s (master) parameters. `loss_scale` multiplies the loss before each backward
/// pass and divides the gradients after (1.0 unless f16).
pub fn accumulate<M, O>(model: &M, objective: &O, batches: &[O::Batch], precision: Precision, loss_scale: f64) -> (GradientsParams, f64)
where
    M: Module + Clone + Send + Sync,
    O: Objective<M> + Sync,
    O::Batch: Sync,
{
    crate::parallel::accumulate(model, objective, batches, StepPlan::plain(precision), loss_scale, &[], None)
}

/// Trains `model` on `objective` until `total_steps`, `stop_after`, or the data runs out.
///
/// Three parts, as torchtitan splits its loop: [`Run::start_or_resume`] (lock, checkpoint or
/// fresh start), [`Run::step`] (one optimizer step: updated or skipped), [`Run::after_step`]
/// (log, evaluate, checkpoint, stop) for either outcome.
pub fn train<M, O>(model: M, objective: &mut O, cfg: &LoopConfig) -> anyhow::Result<(M, Summary)>
where
    M: Module + ModuleSnapshot + Clone + Send + Sync,
    O: Objective<M> + Sync,
    O::Batch: Sync,
{
    let mut run = Run::start_or_resume(model, objective, cfg)?;
    while run.state.step < cfg.total_steps {
        let Some(batches) = run.next_batches(objective)? else { break };
        let outcome = run.step(objective, &batches);
        if run.after_step(objective, outcome)? == Flow::Stop {
            break;
        }
    }
    run.finish(objective)
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepOutcome {
    /// The weights were updated.
    Updated { loss: f64, grad_norm: f64, lr: f64 },
    /// f16 gradients overflowed at the loss scale, which was lowered: an expected event.
    Overflowed,
    /// A non-finite loss or gradient norm: no update.
    NonFinite { loss: f64, grad_norm: f64 },
}

/// Whether the loop goes on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// A run in progress: the model, its optimizer, the counters, and where they are written.
struct Run<'c, M> {
    cfg: &'c LoopConfig,
    world: crate::distributed::World,
    /// One writer per run directory: rank 0 holds the lock for the job.
    _lock: Option<RunLock>,
    /// The master model: taken out only while the optimizer updates it (an update consumes the
    /// model, and a second handle on its tensors would stop the update from working in place).
    model: Option<M>,
    optimizer: StepOptimizer,
    state: TrainState,
    metrics: Metrics,
    checkpoints: Checkpoints,
    plan: StepPlan,
    compute_device: burn::tensor::Device,
    /// With a host master in bf16 or f16 on one device: the master's compute copy on that device, as the
    /// last update wrote it (the next step's passes and evaluations run on it).
    compute_copy: Option<M>,
    /// This rank's micro-batches per step.
    accumulation: usize,
    /// Start and tokens of the current logging window (tokens/s, MFU).
    window: (Instant, usize),
    /// The last updated step's seconds: the whole step, and its update alone (from the
    /// gradient norm, which waits for the device's passes, to the updated model: with a host
    /// optimizer, the gradients' download, AdamW and the upload, what the device waits for).
    step_seconds: [f64; 2],
    saved_step: u64,
    evaluated_step: u64,
    last_loss: Option<f64>,
    last_checkpoint: Option<PathBuf>,
}

impl<'c, M> Run<'c, M>
where
    M: Module + ModuleSnapshot + Clone + Send + Sync,
{
    /// Takes the run directory, then resumes from its newest checkpoint (`--resume`) or starts
    /// fresh (refusing a directory that already holds a run); evaluates at step 0 when asked.
    fn start_or_resume<O>(mut model: M, objective: &mut O, cfg: &'c LoopConfig) -> anyhow::Result<Self>
    where
        O: Objective<M> + Sync,
        O::Batch: Sync,
    {
        let out = &cfg.run.out_dir;
        let world = crate::distributed::world();
        // Creates the directory too.
        let lock = if world.is_root() { Some(RunLock::acquire(out)?) } else { None };
        world.barrier();
        let host_master = cfg.run.optimizer == OptimizerPlacement::Host;
        if host_master {
            // The f32 master weights and AdamW's moments live in host memory (flex); each step's
            // passes run on a compute-dtype copy on the run's device (`parallel::device_copy`).
            model = model.fork(&burn::tensor::Device::flex().autodiff());
        }
        let plan = StepPlan { precision: cfg.precision, saving: cfg.train.memory_saving(), host_master };
        let compute_device = cfg.devices.first().cloned().unwrap_or_else(|| model.devices()[0].clone());
        let checkpoints = Checkpoints::new(out);
        if world.is_root() {
            // This run owns the directory now (the lock): what a killed run left half-written goes.
            checkpoints.remove_leftovers()?;
        }
        // Several ranks: AdamW sharded over them (ZeRO-1), and resumed the same way in one process.
        // A host master: the same flat state whole, updated in place (its checkpoints then resume
        // at any world size), unless the run resumes Burn's optimizer state.
        let latest = checkpoints.latest();
        let resumed_flat = latest.as_ref().filter(|_| cfg.resume).map(|(_, dir)| crate::sharded::ShardedAdamW::is_saved_in(dir));
        let sharded = crate::optim::keeps_flat_state(world.is_distributed(), host_master, resumed_flat);
        let mut optimizer = if sharded {
            StepOptimizer::Sharded(crate::sharded::ShardedAdamW::new(&model, &cfg.optim, world))
        } else {
            StepOptimizer::Local(Optimizer::new(&cfg.optim))
        };
        let mut state = TrainState {
            step: 0,
            tokens: 0,
            skipped: 0,
            consecutive_bad: 0,
            data: serde_json::Value::Null,
            model_config: cfg.model_config.clone(),
            seed: cfg.train.seed,
            loss_scale: precision::needs_loss_scaling(cfg.precision).then(LossScale::new),
        };
        match (cfg.resume, latest) {
            (true, Some((_, dir))) => {
                state = Checkpoints::load_state(&dir)?;
                if state.model_config != cfg.model_config {
                    bail!(
                        "{}: this checkpoint was written for another model config; resume with the config it was trained with, or choose another run.out_dir",
                        dir.display()
                    );
                }
                load_weights(&mut model, &dir.join(MODEL_FILE))?;
                optimizer.load(&dir)?;
                objective.restore_data_state(&state.data).with_context(|| format!("restoring the data position from {}", dir.display()))?;
                if precision::needs_loss_scaling(cfg.precision) && state.loss_scale.is_none() {
                    state.loss_scale = Some(LossScale::new());
                }
                if world.is_root() {
                    println!("resumed from {} (step {})", dir.display(), state.step);
                }
            }
            (true, None) if world.is_root() => println!("no checkpoint in {}: starting a new run", checkpoints.root().display()),
            (true, None) => {}
            (false, Some((step, dir))) => bail!(
                "{} already holds checkpoints of a run (newest: step {step}, {}); pass --resume to continue it, or choose another --out",
                out.display(),
                dir.display()
            ),
            (false, None) => {}
        }
        if let StepOptimizer::Sharded(sharded) = &optimizer {
            // Every rank starts from rank 0's weights, whatever each drew or loaded.
            model = sharded.broadcast_model(model);
        }
        let metrics = Metrics::open(out, cfg.total_steps, state.step)?;
        let mut run = Self {
            cfg,
            world,
            _lock: lock,
            model: Some(model),
            optimizer,
            metrics,
            checkpoints,
            plan,
            compute_device,
            compute_copy: None,
            // Each rank runs its share of the step's micro-batches (LoopConfig::new checked it divides).
            accumulation: cfg.train.accumulation() / world.size(),
            window: (Instant::now(), 0),
            step_seconds: [0.0; 2],
            saved_step: state.step,
            evaluated_step: state.step,
            last_loss: None,
            last_checkpoint: None,
            state,
        };
        if !llama_model::device::is_flex(&run.compute_device) {
            // A quiet first step is otherwise indistinguishable from a hang.
            run.metrics.println(
                "the first step compiles the GPU kernels: minutes on a machine that has not run this model before (later runs reuse CubeCL's kernel cache)",
            );
        }
        if cfg.eval_at_start && run.state.step == 0 {
            objective.evaluate(&run.for_eval(), 0, &mut run.metrics)?;
        }
        Ok(run)
    }

    fn model(&self) -> &M {
        self.model.as_ref().expect("the model is back after every update")
    }

    /// What evaluation runs on: the master itself, or its copy on the device.
    fn for_eval(&self) -> M {
        match &self.compute_copy {
            Some(copy) => copy.clone(),
            None if self.plan.host_master => device_copy(self.model(), self.cfg.precision, &self.compute_device),
            None => self.model().clone(),
        }
    }

    /// This rank's micro-batches of the next step; `None` (said once) when any rank's data ran out.
    fn next_batches<O: Objective<M>>(&mut self, objective: &mut O) -> anyhow::Result<Option<Vec<O::Batch>>> {
        let mut batches = Vec::with_capacity(self.accumulation);
        for _ in 0..self.accumulation {
            match objective.next_batch(self.cfg.train.micro_batch_size)? {
                Some(b) => batches.push(b),
                None => break,
            }
        }
        if !self.world.all(batches.len() == self.accumulation) {
            self.metrics.println(&format!("data exhausted after step {}", self.state.step));
            return Ok(None);
        }
        Ok(Some(batches))
    }

    /// One optimizer step: the passes over `batches`, the reduction, the clip and the update,
    /// unless the loss or the gradients are not finite (the step then counts, with no update).
    fn step<O>(&mut self, objective: &O, batches: &[O::Batch]) -> StepOutcome
    where
        O: Objective<M> + Sync,
        O::Batch: Sync,
    {
        let cfg = self.cfg;
        let step_started = Instant::now();
        let mut step_tokens = [batches.iter().map(|b| objective.tokens(b)).sum::<usize>() as f64];
        self.world.sum_f64(&mut step_tokens);
        let step_tokens = step_tokens[0] as usize;
        let (grads, loss, grad_norm) = loop {
            let scale = self.state.loss_scale.as_ref().map_or(1.0, |s| s.scale);
            let prepared = self.compute_copy.take();
            let (grads, loss) = crate::parallel::accumulate(self.model(), objective, batches, self.plan, scale, &cfg.devices, prepared);
            kill_point("backward", self.state.step + 1);
            let (grads, grad_norm) = self.optimizer.gradients(self.model.as_ref().expect("the model is back after every update"), grads, cfg.optim.grad_clip);
            // Before the run's first update the f16 scale is still being found: an overflow
            // halves it and the same micro-batches run again (every rank sees the same norm).
            if loss.is_finite() && !grad_norm.is_finite() && self.state.loss_scale.as_mut().is_some_and(LossScale::recalibrate) {
                let scale = self.state.loss_scale.as_ref().map_or(1.0, |s| s.scale);
                self.metrics.println(&format!(
                    "step {}: f16 gradients overflowed before the first update; running it again at loss scale {scale}",
                    self.state.step + 1
                ));
                continue;
            }
            break (grads, loss, grad_norm);
        };
        let lr = cfg.schedule.lr(self.state.step);
        self.state.step += 1;
        self.state.tokens += step_tokens as u64;
        self.window.1 += step_tokens;
        if loss.is_finite() && !grad_norm.is_finite() && self.state.loss_scale.as_mut().is_some_and(|s| s.overflow()) {
            self.state.skipped += 1;
            return StepOutcome::Overflowed;
        }
        if !(loss.is_finite() && grad_norm.is_finite()) {
            self.state.skipped += 1;
            self.state.consecutive_bad += 1;
            return StepOutcome::NonFinite { loss, grad_norm };
        }
        self.state.consecutive_bad = 0;
        if let Some(s) = self.state.loss_scale.as_mut() {
            s.good_step();
        }
        let update_started = Instant::now();
        let model = self.model.take().expect("the model is back after every update");
        // A host master on one device: the update writes the next compute copy too (bf16, f16).
        let copy_to = (self.plan.host_master && cfg.devices.len() <= 1).then_some((&self.compute_device, cfg.precision));
        let (model, copy) = self.optimizer.step_with_copy(lr, model, grads, grad_norm, cfg.optim.grad_clip, copy_to);
        (self.model, self.compute_copy) = (Some(model), copy);
        self.step_seconds = [step_started.elapsed().as_secs_f64(), update_started.elapsed().as_secs_f64()];
        self.last_loss = Some(loss);
        kill_point("update", self.state.step);
        StepOutcome::Updated { loss, grad_norm, lr }
    }

    /// After a step, updated or skipped: its metrics, then evaluation and a checkpoint when due,
    /// and the stop that `--stop-after` asks for. Too many non-finite steps in a row end the run
    /// with an error, after a checkpoint of the last good weights.
    fn after_step<O: Objective<M>>(&mut self, objective: &mut O, outcome: StepOutcome) -> anyhow::Result<Flow> {
        let cfg = self.cfg;
        let step = self.state.step;
        let last = step == cfg.total_steps || cfg.stop_after == Some(step);
        match outcome {
            StepOutcome::Updated { loss, grad_norm, lr } => {
                if step.is_multiple_of(cfg.train.log_every) || last {
                    self.log(loss, grad_norm, lr)?;
                }
            }
            StepOutcome::Overflowed => {
                let scale = self.state.loss_scale.as_ref().map_or(1.0, |s| s.scale);
                self.metrics.scalars(step, &[("train/skipped_steps", self.state.skipped as f64), ("train/loss_scale", scale)])?;
                self.metrics.println(&format!("step {step}: f16 gradients overflowed; update skipped, loss scale now {scale}"));
            }
            StepOutcome::NonFinite { loss, grad_norm } => {
                self.metrics.scalars(step, &[("train/skipped_steps", self.state.skipped as f64)])?;
                self.metrics.println(&format!("step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); update skipped"));
                if self.state.consecutive_bad >= cfg.train.max_bad_steps {
                    let dir = self.save(objective)?;
                    self.metrics.finish();
                    bail!(
                        "stopping: {} consecutive steps had a non-finite loss or gradient (lower optim.lr, check the data); the last good weights are saved in {}",
                        self.state.consecutive_bad,
                        dir.display()
                    );
                }
            }
        }
        if step.is_multiple_of(cfg.train.eval_every) || last {
            objective.evaluate(&self.for_eval(), step, &mut self.metrics)?;
            self.evaluated_step = step;
            self.window.0 = Instant::now();
        }
        if step.is_multiple_of(cfg.train.checkpoint_every) || last {
            self.last_checkpoint = Some(self.save(objective)?);
            self.window.0 = Instant::now();
        }
        if cfg.stop_after == Some(step) {
            self.metrics.println(&format!("stopping after step {step} as asked (--stop-after)"));
            return Ok(Flow::Stop);
        }
        // After the last step the run ends anyway (and an outer loop, PPO's or rejection
        // sampling's, asks for itself).
        if !last && let Some(signal) = crate::distributed::signal_received_by_any_rank() {
            let checkpoint = match (&self.last_checkpoint, self.saved_step == step) {
                (Some(dir), true) => dir.clone(),
                _ => self.save(objective)?,
            };
            self.metrics.finish();
            return Err(crate::signals::Interrupted { signal, unit: "step", step, checkpoint }.into());
        }
        Ok(Flow::Continue)
    }

    /// The metrics of an updated step, and the progress line.
    fn log(&mut self, loss: f64, grad_norm: f64, lr: f64) -> anyhow::Result<()> {
        let (cfg, step) = (self.cfg, self.state.step);
        let secs = self.window.0.elapsed().as_secs_f64().max(1e-9);
        let tok_s = self.window.1 as f64 / secs;
        let mfu = tok_s * cfg.flops_per_token / cfg.run.peak_flops();
        let mut values = vec![
            ("train/loss", loss),
            ("train/lr", lr),
            ("train/grad_norm", grad_norm),
            ("train/tokens_per_s", tok_s),
            ("train/mfu", mfu),
            ("train/tokens", self.state.tokens as f64),
            ("train/skipped_steps", self.state.skipped as f64),
        ];
        if let Some(s) = &self.state.loss_scale {
            values.push(("train/loss_scale", s.scale));
        }
        values.push(("time/step_seconds", self.step_seconds[0]));
        values.push(("time/update_seconds", self.step_seconds[1]));
        if let Some((seconds, bytes)) = self.optimizer.comm_stats() {
            // The last step's collectives (MPI), on rank 0.
            values.push(("dist/comm_seconds", seconds));
            values.push(("dist/comm_bytes_per_rank", bytes as f64));
        }
        if let Some(rss) = peak_rss_bytes() {
            values.push(("memory/peak_rss_gib", rss as f64 / (1u64 << 30) as f64));
        }
        // On a GPU: what Burn's memory pool has reserved on the device (it grows to the peak).
        if let Some(pool) = self.compute_device.memory_pool_usage() {
            values.push(("memory/device_reserved_gib", pool.bytes_reserved as f64 / (1u64 << 30) as f64));
        }
        self.metrics.scalars(step, &values)?;
        self.metrics.progress(step, cfg.total_steps, &format!("loss {loss:.4} | lr {lr:.2e} | gnorm {grad_norm:.3} | {tok_s:.0} tok/s"));
        self.window = (Instant::now(), 0);
        kill_point("logged", step);
        Ok(())
    }

    /// A checkpoint of the current step. Every rank calls it: rank 0 writes the model and the
    /// state, each rank its optimizer block.
    fn save<O: Objective<M>>(&mut self, objective: &O) -> anyhow::Result<PathBuf> {
        let mut state = self.state.clone();
        state.data = objective.data_state();
        let (world, model, optimizer, tokenizer) = (self.world, self.model(), &self.optimizer, self.cfg.tokenizer.as_deref());
        let dir = self.checkpoints.save(state.step, self.cfg.train.keep_checkpoints, world, |dir, written| {
            if world.is_root() {
                save_weights(model, &dir.join(MODEL_FILE))?;
                written(MODEL_FILE)?;
            }
            optimizer.save(dir)?;
            written(OPTIMIZER_FILE)?;
            if world.is_root() {
                // config.toml beside model.bpk makes the checkpoint a native model directory too
                // (`llama generate --checkpoint OUT`, `sft init = OUT`).
                std::fs::write(dir.join(llama_model::checkpoint::NATIVE_CONFIG), &state.model_config)?;
                if let Some(tokenizer) = tokenizer {
                    llama_io::copy_tokenizer_files(tokenizer, dir)?;
                }
                std::fs::write(dir.join(STATE_FILE), serde_json::to_string_pretty(&state)?)?;
            }
            written(STATE_FILE)
        })?;
        self.saved_step = state.step;
        Ok(dir)
    }

    /// The end of the run: a last evaluation and checkpoint when the last step had none.
    fn finish<O: Objective<M>>(mut self, objective: &mut O) -> anyhow::Result<(M, Summary)> {
        let step = self.state.step;
        if step > self.evaluated_step {
            objective.evaluate(&self.for_eval(), step, &mut self.metrics)?;
        }
        if step > self.saved_step {
            self.last_checkpoint = Some(self.save(objective)?);
        }
        self.metrics.finish();
        let summary =
            Summary { steps: step, tokens: self.state.tokens, skipped: self.state.skipped, last_loss: self.last_loss, checkpoint: self.last_checkpoint };
        Ok((self.model.expect("the model is back after every update"), summary))
    }
}
