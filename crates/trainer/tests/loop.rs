//! The shared loop's arithmetic: global-norm clipping, accumulation scaling, non-finite skips.

use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use llama_model::{Llama, LlamaConfig};
use llama_trainer::config::{OptimConfig, RunConfig, ScheduleConfig, TrainConfig};
use llama_trainer::optim::{clip_global_norm, global_grad_norm};
use llama_trainer::run::accumulate;
use llama_trainer::{LoopConfig, Metrics, Objective, Schedule, train};

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
    nan_on_call: Option<Box<dyn Fn(usize) -> bool>>,
    calls: std::cell::Cell<usize>,
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
        let call = self.calls.get();
        self.calls.set(call + 1);
        let t = batch[0].len() - 1;
        let inputs: Vec<i64> = batch.iter().flat_map(|w| w[..t].iter().map(|&x| x as i64)).collect();
        let targets: Vec<i64> = batch.iter().flat_map(|w| w[1..].iter().map(|&x| x as i64)).collect();
        let logits = model.forward(Tensor::<2, Int>::from_data(TensorData::new(inputs, [batch.len(), t]), &self.device));
        let [b, t, v] = logits.dims();
        let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [b * t, 1]), &self.device);
        let loss = log_softmax(logits.reshape([b * t, v]), 1).gather(1, targets).sum().neg();
        match &self.nan_on_call {
            Some(f) if f(call) => loss * f32::NAN,
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

fn toy(device: &Device, nan: Option<Box<dyn Fn(usize) -> bool>>) -> Toy {
    let rows = vec![vec![1, 3, 5, 7, 9, 2], vec![1, 4, 4, 4, 4, 2], vec![1, 8, 6, 8, 6, 2], vec![1, 10, 3, 10, 3, 2]];
    Toy { rows, next: 0, device: device.clone(), nan_on_call: nan, calls: Default::default() }
}

fn loop_config(out: &std::path::Path, steps: u64, batch: usize, micro: usize) -> LoopConfig {
    let train = TrainConfig { max_steps: Some(steps), batch_size: batch, micro_batch_size: micro, log_every: 1, eval_every: 100, checkpoint_every: 100, max_bad_steps: 2, ..TrainConfig::default() };
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
    let (g_big, loss_big) = accumulate(&model, &data, &big);
    let (g_micro, loss_micro) = accumulate(&model, &data, &micro);
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
