//! The shared loop's arithmetic: global-norm clipping, accumulation scaling, non-finite skips.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::DType;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use llama_model::{Llama, LlamaConfig};
use llama_trainer::config::{OptimConfig, RunConfig, ScheduleConfig, TrainConfig};
use llama_trainer::optim::{clip_global_norm, global_grad_norm};
use llama_trainer::run::accumulate;
use llama_trainer::{LoopConfig, Metrics, Objective, Precision, Schedule, train};

fn tiny() -> LlamaConfig {
    LlamaConfig::new(16, 1, 2).with_vocab_size(11).with_multiple_of(8).with_max_seq_len(16)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn global_norm_clipping_matches_hand_computation() {
    let device = Device::flex();
    let model = tiny().init(&device);
    let mut grads = GradientsParams::new();
    // Two parameters get gradients: all 3s (norm^2 = 9 n1) and all 4s (norm^2 = 16 n2).
    let w1 = model.layers[0].attention.wq.weight.clone();
    let w2 = model.norm.gamma.clone();
    let (n1, n2) = (16 * 16, 16);
    grads.register(w1.id, Tensor::<2>::full([16, 16], 3.0, &device));
    grads.register(w2.id, Tensor::<1>::full([16], 4.0, &device));
    let want = ((9 * n1 + 16 * n2) as f64).sqrt();
    assert!((global_grad_norm(&model, &grads) - want).abs() < 1e-3);
    let before = clip_global_norm(&model, &mut grads, 1.0);
    assert!((before - want).abs() < 1e-3);
    // After clipping, the global norm is 1 and the direction is kept: every entry scaled by 1/want.
    assert!((global_grad_norm(&model, &grads) - 1.0).abs() < 1e-4);
    let g1 = host(grads.get::<2>(w1.id).unwrap());
    assert!(g1.iter().all(|&x| (x as f64 - 3.0 / want).abs() < 1e-6));
    // Below the threshold nothing changes.
    let mut small = GradientsParams::new();
    small.register(w2.id, Tensor::<1>::full([16], 0.01, &device));
    clip_global_norm(&model, &mut small, 1.0);
    assert!(host(small.get::<1>(w2.id).unwrap()).iter().all(|&x| (x - 0.01).abs() < 1e-9));
}

/// Sequences to learn, handed out in order; optionally poisoned on some steps.
struct Toy {
    rows: Vec<Vec<u32>>,
    next: usize,
    device: Device,
    nan_on_call: Option<Box<dyn Fn(usize) -> bool + Send + Sync>>,
    calls: std::sync::atomic::AtomicUsize,
    /// Multiplies every loss (1: the toy's own).
    loss_factor: f32,
}

impl Objective<Llama> for Toy {
    type Batch = Vec<Vec<u32>>;
    fn next_batch(&mut self, size: usize) -> anyhow::Result<Option<Self::Batch>> {
        let b: Vec<Vec<u32>> = (0..size).map(|i| self.rows[(self.next + i) % self.rows.len()].clone()).collect();
        self.next += size;
        Ok(Some(b))
    }
    fn weight(&self, batch: &Self::Batch) -> f64 {
        (batch.len() * (batch[0].len() - 1)) as f64
    }
    fn tokens(&self, batch: &Self::Batch) -> usize {
        batch.len() * (batch[0].len() - 1)
    }
    fn loss_sum(&self, model: &Llama, batch: &Self::Batch) -> Tensor<1> {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let t = batch[0].len() - 1;
        let inputs: Vec<i64> = batch.iter().flat_map(|w| w[..t].iter().map(|&x| x as i64)).collect();
        let targets: Vec<i64> = batch.iter().flat_map(|w| w[1..].iter().map(|&x| x as i64)).collect();
        let logits = model.forward(Tensor::<2, Int>::from_data(TensorData::new(inputs, [batch.len(), t]), &self.device));
        let [b, t, v] = logits.dims();
        let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [b * t, 1]), &self.device);
        let loss = log_softmax(logits.reshape([b * t, v]), 1).gather(1, targets).sum().neg();
        match &self.nan_on_call {
            Some(f) if f(call) => loss * f32::NAN,
            _ if self.loss_factor != 1.0 => loss * self.loss_factor,
            _ => loss,
        }
    }
    fn evaluate(&mut self, _: &Llama, _: u64, _: &mut Metrics) -> anyhow::Result<()> {
        Ok(())
    }
    fn data_state(&self) -> serde_json::Value {
        serde_json::json!(self.next)
    }
    fn restore_data_state(&mut self, s: &serde_json::Value) -> anyhow::Result<()> {
        self.next = s.as_u64().unwrap() as usize;
        Ok(())
    }
}

fn toy(device: &Device, nan: Option<Box<dyn Fn(usize) -> bool + Send + Sync>>) -> Toy {
    let rows = vec![vec![1, 3, 5, 7, 9, 2], vec![1, 4, 4, 4, 4, 2], vec![1, 8, 6, 8, 6, 2], vec![1, 10, 3, 10, 3, 2]];
    Toy { rows, next: 0, device: device.clone(), nan_on_call: nan, calls: Default::default(), loss_factor: 1.0 }
}

fn loop_config(out: &std::path::Path, steps: u64, batch: usize, micro: usize) -> LoopConfig {
    let train = TrainConfig {
        max_steps: Some(steps),
        batch_size: batch,
        micro_batch_size: micro,
        log_every: 1,
        eval_every: 100,
        checkpoint_every: 100,
        max_bad_steps: 2,
        ..TrainConfig::default()
    };
    let schedule = ScheduleConfig { warmup_steps: 0, ..ScheduleConfig::default() };
    LoopConfig {
        schedule: Schedule::new(&schedule, 1e-2, steps),
        total_steps: steps,
        stop_after: None,
        resume: false,
        flops_per_token: 1.0,
        model_config: "toy".into(),
        eval_at_start: false,
        train,
        run: RunConfig { out_dir: out.to_path_buf(), ..RunConfig::default() },
        optim: OptimConfig { lr: 1e-2, ..OptimConfig::default() },
        precision: Precision::F32,
        devices: vec![],
        tokenizer: None,
    }
}

/// One step over 4 sequences in 4 micro-batches of 1 gives the gradient of one batch of 4, and
/// both equal the gradient of the mean cross-entropy computed directly.
#[test]
fn accumulated_micro_batches_equal_one_big_batch() {
    let device = Device::flex().autodiff();
    let model = tiny().init(&device);
    let mut data = toy(&device, None);
    let big = vec![data.next_batch(4).unwrap().unwrap()];
    let mut data = toy(&device, None);
    let micro: Vec<_> = (0..4).map(|_| data.next_batch(1).unwrap().unwrap()).collect();
    let (g_big, loss_big) = accumulate(&model, &data, &big, Precision::F32, 1.0);
    let (g_micro, loss_micro) = accumulate(&model, &data, &micro, Precision::F32, 1.0);
    assert!((loss_big - loss_micro).abs() < 1e-5, "{loss_big} vs {loss_micro}");
    // The mean loss by hand: 4 rows x 5 targets.
    let direct = data.loss_sum(&model, &big[0]).div_scalar(20.0);
    assert!((direct.clone().into_scalar::<f32>() as f64 - loss_big).abs() < 1e-5);
    let g_direct = GradientsParams::from_grads(direct.backward(), &model);
    let id = model.layers[0].attention.wq.weight.id;
    let (a, b, c) = (host(g_big.get::<2>(id).unwrap()), host(g_micro.get::<2>(id).unwrap()), host(g_direct.get::<2>(id).unwrap()));
    let scale = c.iter().map(|x| x.abs()).fold(0.0, f32::max);
    assert!(scale > 1e-6);
    for (name, g) in [("one batch", &a), ("micro-batches", &b)] {
        let diff = g.iter().zip(&c).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-4 * scale, "{name}: gradient differs from the direct mean-loss gradient by {diff} (scale {scale})");
    }
    assert!((global_grad_norm(&model, &g_big) - global_grad_norm(&model, &g_micro)).abs() < 1e-4);
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run() {
    let device = Device::flex().autodiff();
    let model = tiny().init(&device);
    let tmp = tempfile::tempdir().unwrap();
    // One bad micro-batch (call 1 = the second step's): that step is skipped, the run goes on.
    let (_, summary) = train(model.clone(), &mut toy(&device, Some(Box::new(|c| c == 1))), &loop_config(&tmp.path().join("a"), 3, 1, 1)).unwrap();
    assert_eq!((summary.steps, summary.skipped), (3, 1));
    // Always bad: stops after max_bad_steps (2) with a checkpoint and a clear message.
    let err = train(model, &mut toy(&device, Some(Box::new(|_| true))), &loop_config(&tmp.path().join("b"), 10, 1, 1)).err().unwrap().to_string();
    assert!(err.contains("2 consecutive steps") && err.contains("checkpoints"), "{err}");
    assert!(tmp.path().join("b/checkpoints/step-00000002/state.json").is_file());
}

/// `--stop-after N` stops at step N even when that step's update was skipped, with a checkpoint
/// of step N that resumes to the uninterrupted run's end.
#[test]
fn stop_after_stops_on_a_skipped_step() {
    let device = Device::flex().autodiff();
    let model = tiny().init(&device);
    let tmp = tempfile::tempdir().unwrap();
    // Call 1 is step 2's only micro-batch: step 2 is skipped, and it is the step to stop after.
    let nan_at_step_2 = || -> Option<Box<dyn Fn(usize) -> bool + Send + Sync>> { Some(Box::new(|c| c == 1)) };
    let out = tmp.path().join("stopped");
    let cfg = LoopConfig { stop_after: Some(2), ..loop_config(&out, 5, 1, 1) };
    let (_, summary) = train(model.clone(), &mut toy(&device, nan_at_step_2()), &cfg).unwrap();
    assert_eq!((summary.steps, summary.skipped), (2, 1), "{summary:?}");
    assert!(out.join("checkpoints/step-00000002/state.json").is_file());
    assert!(!out.join("checkpoints/step-00000003").exists());
    // Resumed (calls restart at 0, so no more poison), it ends where a run from the same
    // checkpoint state would: step 5, one skipped step in all.
    let cfg = LoopConfig { resume: true, ..loop_config(&out, 5, 1, 1) };
    let (_, resumed) = train(model, &mut toy(&device, None), &cfg).unwrap();
    assert_eq!((resumed.steps, resumed.skipped), (5, 1), "{resumed:?}");
}

/// The per-step metric `key` a run wrote to metrics.jsonl.
fn metric_curve(out: &std::path::Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get(key).and_then(|x| x.as_f64()))
        .collect()
}

/// The per-step training losses a run wrote to metrics.jsonl.
fn loss_curve(out: &std::path::Path) -> Vec<f64> {
    metric_curve(out, "train/loss")
}

/// The steps that logged a training loss (the updated ones, with `log_every = 1`).
fn updated_steps(out: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("train/loss").is_some())
        .filter_map(|v| v["step"].as_u64())
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// bf16 and f16 gradients come back as f32 gradients of the f32 master parameters, and point
/// the same way as the f32 ones (cosine > 0.999 on every weight matrix of the tiny model).
#[test]
fn half_precision_gradients_are_f32_and_match_f32_gradients() {
    let device = Device::flex().autodiff();
    let model = tiny().init(&device);
    let mut data = toy(&device, None);
    let batch = vec![data.next_batch(4).unwrap().unwrap()];
    let (g32, loss32) = accumulate(&model, &data, &batch, Precision::F32, 1.0);
    for (precision, scale) in [(Precision::Bf16, 1.0), (Precision::F16, 1024.0)] {
        let (g, loss) = accumulate(&model, &data, &batch, precision, scale);
        assert!((loss - loss32).abs() < 0.02 * loss32, "{precision:?}: loss {loss} vs f32 {loss32}");
        let block = &model.layers[0];
        for (name, id) in [("wq", block.attention.wq.weight.id), ("w2", block.feed_forward.w2.weight.id), ("output", model.output.as_ref().unwrap().weight.id)]
        {
            let half = g.get::<2>(id).unwrap();
            assert_eq!(half.dtype(), DType::F32, "{precision:?} {name}: gradient dtype");
            let c = cosine(&host(half), &host(g32.get::<2>(id).unwrap()));
            assert!(c > 0.999, "{precision:?} {name}: cosine with the f32 gradient {c}");
        }
    }
    // The compute copy is in the half type, the master untouched.
    let compute = Precision::Bf16.compute_copy(&model);
    assert_eq!(compute.layers[0].attention.wq.weight.val().dtype(), DType::BF16);
    assert_eq!(model.layers[0].attention.wq.weight.val().dtype(), DType::F32);
}

/// Training in bf16 from the same start follows the f32 loss curve: every step's loss within 2%
/// of f32's (measured over 45 random starts: within 0.32%; f16 within 0.04%). The LR (2e-3) keeps
/// the run below the edge of stability: at 3e-3 the f32 curve itself spikes after ~20 steps on
/// some starts, and two runs that differ only in rounding then part ways (1 start in ~50 read
/// 3.7% in CI). f16 with dynamic loss scaling: the gradients grow as the loss falls (gnorm 1.1 to
/// ~2.5), so an update here and there overflows and is skipped with the scale halved (60 random
/// starts: 0 skips on 2, 1 on 38, 2 on 20; CI saw 3 once), and the scale after 30 steps is at most
/// 2^16 halved once per skip. The curve, entry k being the loss after k updates, is compared entry
/// by entry with f32's (constant LR, so a skipped step only delays the updates; 60 starts: within
/// 0.02%). Master weights are f32 after training.
#[test]
fn mixed_precision_training_tracks_f32_and_keeps_f32_master_weights() {
    let device = Device::flex().autodiff();
    let model = tiny().init(&device);
    let tmp = tempfile::tempdir().unwrap();
    let run = |precision: Precision| {
        let out = tmp.path().join(precision.name());
        let constant = ScheduleConfig { warmup_steps: 0, kind: llama_trainer::ScheduleKind::Constant, ..ScheduleConfig::default() };
        let cfg = LoopConfig { precision, schedule: Schedule::new(&constant, 2e-3, 30), ..loop_config(&out, 30, 4, 2) };
        let (trained, summary) = train(model.clone(), &mut toy(&device, None), &cfg).unwrap();
        assert_eq!(summary.steps, 30, "{precision:?}");
        (trained, loss_curve(&out), out, summary.skipped)
    };
    let (_, f32_curve, _, skipped) = run(Precision::F32);
    assert_eq!((f32_curve.len(), skipped), (30, 0));
    // 30 steps at 2e-3 take the loss to 0.65-0.69 of its start (45 starts).
    assert!(f32_curve[29] < 0.8 * f32_curve[0], "f32 did not learn: {f32_curve:?}");
    for (precision, tolerance) in [(Precision::Bf16, 0.02), (Precision::F16, 0.01)] {
        let (trained, curve, out, skipped) = run(precision);
        assert_eq!(curve.len() as u64, 30 - skipped, "{precision:?}: one logged loss per update");
        assert!(skipped <= 5, "{precision:?} skipped {skipped} of 30 steps");
        let worst = curve.iter().zip(&f32_curve).map(|(a, b)| (a - b).abs() / b).fold(0.0, f64::max);
        assert!(worst <= tolerance, "{precision:?}: loss {worst:.4} (relative) away from f32's\n{curve:?}\n{f32_curve:?}");
        let mut dtypes = vec![];
        trained.visit(&mut ParamDtypes(&mut dtypes));
        assert!(!dtypes.is_empty() && dtypes.iter().all(|d| *d == DType::F32), "{precision:?}: master dtypes {dtypes:?}");
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints/step-00000030/state.json")).unwrap()).unwrap();
        match precision {
            Precision::Bf16 => assert!(skipped == 0 && state.get("loss_scale").is_none(), "{state}"),
            _ => {
                let scale = state["loss_scale"]["scale"].as_f64().unwrap();
                assert!(
                    scale * 2f64.powi(skipped as i32) <= 65536.0 && scale.log2().fract() == 0.0,
                    "a power of two, 2^16 halved at least once per skip: {scale}"
                );
            }
        }
    }
}

/// f16's loss scale is found on the first step, not paid for with a skipped step: a loss 100x the
/// toy's overflows f16 gradients at 2^16, and the first step runs again at halved scales until
/// they fit, so it updates; the run goes on at half the scale found, and the loss falls.
#[test]
fn f16_finds_its_loss_scale_on_the_first_step_without_skipping() {
    let device = Device::flex().autodiff();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f16");
    let constant = ScheduleConfig { warmup_steps: 0, kind: llama_trainer::ScheduleKind::Constant, ..ScheduleConfig::default() };
    let cfg = LoopConfig { precision: Precision::F16, schedule: Schedule::new(&constant, 2e-3, 8), ..loop_config(&out, 8, 4, 2) };
    let mut objective = Toy { loss_factor: 100.0, ..toy(&device, None) };
    let (_, summary) = train(tiny().init(&device), &mut objective, &cfg).unwrap();
    assert_eq!(summary.steps, 8);
    let updated = updated_steps(&out);
    assert_eq!(updated.first(), Some(&1), "the first step updated: {updated:?}");
    assert_eq!(updated.len() as u64, 8 - summary.skipped);
    let curve = loss_curve(&out);
    assert!(curve.last() < curve.first(), "the loss did not fall: {curve:?}");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints/step-00000008/state.json")).unwrap()).unwrap();
    let scale = state["loss_scale"]["scale"].as_f64().unwrap();
    assert!(scale <= 8192.0 && scale.log2().fract() == 0.0, "the first step reran at halved scales, then halved once for headroom: {scale}");
    assert_eq!(state["loss_scale"]["calibrated"], true);
}

struct ParamDtypes<'a>(&'a mut Vec<DType>);

impl burn::module::ModuleVisitor for ParamDtypes<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        self.0.push(param.val().dtype());
    }
}

#[test]
fn half_precision_names_the_allowed_values() {
    let err = LoopConfig::new(
        TrainConfig::default(),
        RunConfig { dtype: "fp8".into(), ..RunConfig::default() },
        OptimConfig::default(),
        &ScheduleConfig::default(),
        10,
        &tiny(),
        8,
        &Default::default(),
        false,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("fp8") && err.contains("f32, bf16, f16"), "{err}");
}

fn max_param_diff(a: &Llama, b: &Llama) -> f32 {
    let (mut x, mut y) = (vec![], vec![]);
    a.visit(&mut Flatten(&mut x));
    b.visit(&mut Flatten(&mut y));
    assert_eq!(x.len(), y.len());
    x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max)
}

struct Flatten<'a>(&'a mut Vec<f32>);

impl burn::module::ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        self.0.extend(host(param.val()));
    }
}

/// Two replicas with micro-batch 2 give the gradient of one device with batch 4; and whole runs
/// agree: 2 devices x micro-batch 2 (batch 4) trains to the same weights and losses as 1 device
/// with micro-batch 4, and a 2-device run interrupted at step 3 resumes on 1 device to the same
/// end. (flex has one CPU device, so the replicas share it: this tests the sharding, the loss
/// scaling and the reduction, not a speed-up.)
#[test]
fn data_parallel_equals_one_device_with_the_whole_batch_and_resumes_on_another_count() {
    use llama_trainer::parallel;
    let device = Device::flex().autodiff();
    let model = tiny().init(&device);
    let two = parallel::devices("flex", 2).unwrap();
    let mut data = toy(&device, None);
    let whole = vec![data.next_batch(4).unwrap().unwrap()];
    let mut data = toy(&device, None);
    let halves: Vec<_> = (0..2).map(|_| data.next_batch(2).unwrap().unwrap()).collect();
    let (g1, l1) = accumulate(&model, &data, &whole, Precision::F32, 1.0);
    let (g2, l2) = parallel::accumulate(&model, &data, &halves, parallel::StepPlan::plain(Precision::F32), 1.0, &two, None);
    assert!((l1 - l2).abs() < 1e-5, "loss {l1} vs {l2}");
    for id in [model.layers[0].attention.wq.weight.id, model.layers[0].feed_forward.w1.weight.id, model.output.as_ref().unwrap().weight.id] {
        let (a, b) = (host(g1.get::<2>(id).unwrap()), host(g2.get::<2>(id).unwrap()));
        let scale = a.iter().map(|x| x.abs()).fold(0.0, f32::max);
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(scale > 1e-6 && diff < 1e-5 * scale.max(1.0), "gradient differs by {diff} (scale {scale})");
    }

    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, micro: usize, devices: Vec<Device>, stop_after: Option<u64>, resume: bool| {
        let cfg = LoopConfig { devices, stop_after, resume, ..loop_config(&tmp.path().join(name), 6, 4, micro) };
        train(model.clone(), &mut toy(&device, None), &cfg).unwrap()
    };
    let (one, _) = run("one", 4, vec![], None, false);
    let (dp, _) = run("two", 2, two.clone(), None, false);
    assert_eq!(loss_curve(&tmp.path().join("one")).len(), 6);
    for (a, b) in loss_curve(&tmp.path().join("one")).iter().zip(&loss_curve(&tmp.path().join("two"))) {
        assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
    }
    let diff = max_param_diff(&one, &dp);
    assert!(diff < 1e-5, "2 devices end {diff} away from 1 device");
    run("moved", 2, two, Some(3), false);
    let (moved, summary) = run("moved", 4, vec![], None, true);
    assert_eq!(summary.steps, 6);
    let diff = max_param_diff(&one, &moved);
    assert!(diff < 1e-5, "resumed on another device count: {diff}");
}

#[test]
fn a_batch_that_does_not_split_over_the_devices_is_refused() {
    let run = RunConfig { devices: 3, ..RunConfig::default() };
    let train = TrainConfig { batch_size: 8, micro_batch_size: 2, ..TrainConfig::default() };
    let err =
        LoopConfig::new(train, run, OptimConfig::default(), &ScheduleConfig::default(), 10, &tiny(), 8, &Default::default(), false).err().unwrap().to_string();
    assert!(err.contains("run.devices (3)") && err.contains("train.micro_batch_size (2)"), "{err}");
}

/// `run.optimizer = "host"` (master weights and the flat AdamW state on the host, updated in
/// place; passes on a compute copy) trains to the weights and losses of `"device"` (Burn's
/// optimizer) bit for bit, in f32, bf16 and f16, with the gradients clipped; a run interrupted
/// under either resumes under the other to the same end. On the CPU both sides are flex, so this
/// checks the path (copies, casts, gradients found by parameter id, f32 accumulation, the clip and
/// AdamW of the in-place pass), not a transfer.
#[test]
fn host_optimizer_equals_device_optimizer_and_resumes_across_the_switch() {
    use llama_trainer::OptimizerPlacement::{Device as OnDevice, Host};
    let device = Device::flex().autodiff();
    let model = tiny().init(&device);
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, precision: Precision, optimizer, stop_after: Option<u64>, resume: bool| {
        let out = tmp.path().join(name);
        // 4 micro-batches a step: the host path sums their gradients on the device in f32.
        let base = loop_config(&out, 6, 4, 1);
        let cfg = LoopConfig { precision, stop_after, resume, run: RunConfig { optimizer, ..base.run.clone() }, ..base };
        let (trained, summary) = train(model.clone(), &mut toy(&device, None), &cfg).unwrap();
        (trained, summary, loss_curve(&out))
    };
    // The same arithmetic, bit for bit, bf16 and f16 included (which also shows that the host
    // path's passes do run in the compute dtype: an f32 pass would not give their losses
    // exactly), with the 16-bit copies written by the update's pass.
    for (precision, tol) in [(Precision::F32, 0.0), (Precision::Bf16, 0.0), (Precision::F16, 0.0)] {
        let p = precision.name();
        let (on_device, _, device_curve) = run(&format!("{p}-device"), precision, OnDevice, None, false);
        let (on_host, summary, host_curve) = run(&format!("{p}-host"), precision, Host, None, false);
        // An f16 step may overflow and be skipped (no loss logged), on both sides alike.
        let logged = if precision == Precision::F16 { 4..=6 } else { 6..=6 };
        assert!(summary.steps == 6 && logged.contains(&host_curve.len()), "{p}: {} steps, losses {host_curve:?}", summary.steps);
        assert_eq!(host_curve.len(), device_curve.len(), "{p}: losses {host_curve:?} (host) vs {device_curve:?} (device)");
        assert!(host_curve[host_curve.len() - 1] < host_curve[0], "{p}: host run did not learn: {host_curve:?}");
        for (a, b) in device_curve.iter().zip(&host_curve) {
            assert!((a - b).abs() <= tol * a.abs().max(1.0), "{p}: loss {a} (device) vs {b} (host)");
        }
        let mut dtypes = vec![];
        on_host.visit(&mut ParamDtypes(&mut dtypes));
        assert!(dtypes.iter().all(|d| *d == DType::F32), "{p}: host master dtypes {dtypes:?}");
        let diff = max_param_diff(&on_device, &on_host);
        assert!(diff <= tol as f32, "{p}: host optimizer ends {diff} away from the device optimizer");
        // The equality covers clipped steps, and the host run kept the flat state (which resumes
        // at any world size).
        let norms = metric_curve(&tmp.path().join(format!("{p}-host")), "train/grad_norm");
        assert!(norms.iter().any(|&n| n > 1.0), "{p}: no step was clipped (grad norms {norms:?})");
        let saved = tmp.path().join(format!("{p}-host/checkpoints/step-00000006/optimizer/manifest.json"));
        assert!(saved.is_file(), "{p}: {} is missing", saved.display());
    }
    for (first, then) in [(Host, OnDevice), (OnDevice, Host)] {
        let name = format!("switch-{first:?}");
        run(&name, Precision::F32, first, Some(3), false);
        let (resumed, summary, _) = run(&name, Precision::F32, then, None, true);
        assert_eq!(summary.steps, 6);
        let (reference, _, _) = run(&format!("reference-{first:?}"), Precision::F32, OnDevice, None, false);
        let diff = max_param_diff(&reference, &resumed);
        assert!(diff < 1e-6, "{first:?} then {then:?}: {diff} away from the uninterrupted run");
    }
}

/// `train.recompute = "block"` trains to the weights and losses of `"none"` (1e-5), also with 2
/// data-parallel replicas and the host optimizer, and a run interrupted with one resumes with the
/// other to the same end.
#[test]
fn block_recomputation_trains_like_none_and_resumes_across_the_switch() {
    use llama_trainer::Recompute;
    let device = Device::flex().autodiff();
    let config = LlamaConfig::new(16, 2, 4).with_n_kv_heads(2).with_vocab_size(11).with_multiple_of(8).with_max_seq_len(16);
    let model = config.init(&device);
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, recompute, stop_after: Option<u64>, resume: bool| {
        let out = tmp.path().join(name);
        let base = loop_config(&out, 6, 4, 2);
        let cfg = LoopConfig { stop_after, resume, train: TrainConfig { recompute, ..base.train.clone() }, ..base };
        let (trained, summary) = train(model.clone(), &mut toy(&device, None), &cfg).unwrap();
        (trained, summary, loss_curve(&out))
    };
    let (plain, _, plain_curve) = run("none", Recompute::None, None, false);
    let (recomputed, _, curve) = run("block", Recompute::Block, None, false);
    assert!(curve[5] < curve[0], "did not learn: {curve:?}");
    for (a, b) in plain_curve.iter().zip(&curve) {
        assert!((a - b).abs() < 1e-5 * a.abs().max(1.0), "loss {a} (none) vs {b} (block)");
    }
    assert!(max_param_diff(&plain, &recomputed) < 1e-5);
    // With data parallel (2 replicas, each recomputing in its own thread) and the host
    // optimizer together: the same end.
    let out = tmp.path().join("dp-host");
    let base = loop_config(&out, 6, 4, 2);
    let cfg = LoopConfig {
        devices: llama_trainer::parallel::devices("flex", 2).unwrap(),
        train: TrainConfig { recompute: Recompute::Block, ..base.train.clone() },
        run: RunConfig { optimizer: llama_trainer::OptimizerPlacement::Host, ..base.run.clone() },
        ..base
    };
    let (both, _) = train(model.clone(), &mut toy(&device, None), &cfg).unwrap();
    let diff = max_param_diff(&plain, &both);
    assert!(diff < 1e-5, "2 replicas + block + host optimizer: {diff} away");
    run("switch", Recompute::None, Some(3), false);
    let (resumed, summary, _) = run("switch", Recompute::Block, None, true);
    assert_eq!(summary.steps, 6);
    let diff = max_param_diff(&plain, &resumed);
    assert!(diff < 1e-5, "none then block: {diff} away from the uninterrupted run");
}

#[test]
fn a_zero_logits_chunk_is_refused_with_the_key() {
    let train = TrainConfig { max_steps: Some(1), logits_chunk: Some(0), ..TrainConfig::default() };
    let err = train.validate().unwrap_err();
    assert!(err.contains("train.logits_chunk"), "{err}");
    let parsed: Result<TrainConfig, _> = toml::from_str("max_steps = 1\nrecompute = \"layers\"\n");
    let err = parsed.unwrap_err().to_string();
    assert!(err.contains("recompute") && err.contains("block") && err.contains("none"), "{err}");
}

/// A config saved with a UTF-8 byte-order mark (as Windows editors write it) reads as without.
#[test]
fn a_config_with_a_byte_order_mark_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bom.toml");
    std::fs::write(&path, "\u{feff}lr = 0.25\n").unwrap();
    let optim: OptimConfig = llama_trainer::config::load_toml(&path).unwrap();
    assert_eq!(optim.lr, 0.25);
}
