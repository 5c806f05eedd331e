//! The gradients' share of a step's memory, measured: the live heap's peak while
//! `parallel::accumulate` runs on the CPU (flex tensors live on the heap), counted by this test
//! binary's allocator, against what `LlamaConfig::memory_estimate` counts for the same plan.
//! A second set of gradients that the estimate does not count (an f32 cast of every gradient
//! beside the sum, say: 4 bytes a parameter) fails it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use burn::tensor::{Device, Tensor};
use llama_model::{Llama, LlamaConfig, OptimizerPlacement, TrainingMemory};
use llama_trainer::parallel::{StepPlan, accumulate, device_copy};
use llama_trainer::{Metrics, Objective, Precision};

/// The system allocator, keeping the live bytes and their peak.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(bytes: isize) {
    let now = LIVE.fetch_add(bytes, Relaxed) + bytes;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size() as isize);
        }
        ptr
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size() as isize);
        }
        ptr
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, size) };
        if !new.is_null() {
            grew(size as isize - layout.size() as isize);
        }
        new
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Next-token cross-entropy on fixed sequences.
struct Sequences(Device);

impl Objective<Llama> for Sequences {
    type Batch = Vec<Vec<u32>>;
    fn next_batch(&mut self, _: usize) -> anyhow::Result<Option<Self::Batch>> {
        unreachable!("the test hands its batches over")
    }
    fn weight(&self, batch: &Self::Batch) -> f64 {
        (batch.len() * (batch[0].len() - 1)) as f64
    }
    fn tokens(&self, batch: &Self::Batch) -> usize {
        batch.len() * (batch[0].len() - 1)
    }
    fn loss_sum(&self, model: &Llama, batch: &Self::Batch) -> Tensor<1> {
        llama_model::loss::cross_entropy_sum(model, batch, &self.0)
    }
    fn evaluate(&mut self, _: &Llama, _: u64, _: &mut Metrics) -> anyhow::Result<()> {
        Ok(())
    }
    fn data_state(&self) -> serde_json::Value {
        serde_json::json!(0)
    }
    fn restore_data_state(&mut self, _: &serde_json::Value) -> anyhow::Result<()> {
        Ok(())
    }
}

/// In f32 and bf16, optimizer on the device and on the host, one and four micro-batches a step:
/// the weights the passes run on, the gradients and their f32 sum take what the estimate says,
/// within half a byte per parameter (backward's transients and the tiny activations). The model
/// is mostly its blocks' matrices (as 7B is), so no single parameter is a large share.
#[test]
fn the_gradient_phase_takes_what_the_memory_estimate_counts() {
    let device = Device::flex().autodiff();
    let config = LlamaConfig::new(256, 4, 4).with_vocab_size(256).with_multiple_of(32).with_max_seq_len(16);
    let master = config.init(&device);
    let p = config.num_params() as isize;
    let objective = Sequences(device.clone());
    // Once untimed: what the first pass allocates for good (the thread pool, say) is not a step's.
    drop(accumulate(&master, &objective, &[vec![vec![1, 3, 5, 7, 9, 2]]], StepPlan::plain(Precision::F32), 1.0, &[], None));
    let mut report = vec![];
    for precision in [Precision::F32, Precision::Bf16] {
        for optimizer in [OptimizerPlacement::Device, OptimizerPlacement::Host] {
            for micro_batches in [1usize, 4] {
                let host = optimizer == OptimizerPlacement::Host;
                let batches: Vec<Vec<Vec<u32>>> = (0..micro_batches as u32).map(|i| vec![vec![1, 3 + i, 5, 7, 9, 2]]).collect();
                let plan = StepPlan { host_master: host, ..StepPlan::plain(precision) };
                // A host master's passes run on a copy made before the step (the optimizer writes
                // it); in f32 on the device they run on the master itself: both are held already.
                let copy = host.then(|| device_copy(&master, precision, &device));
                let held_before = if host || precision == Precision::F32 { p * precision.bytes() as isize } else { 0 };
                let base = LIVE.load(Relaxed);
                PEAK.store(base, Relaxed);
                let (grads, _) = accumulate(&master, &objective, &batches, plan, 1.0, &[], copy);
                let measured = PEAK.load(Relaxed) - base + held_before;
                drop(grads);
                let estimate = config.memory_estimate(
                    1,
                    5,
                    &TrainingMemory {
                        optimizer,
                        micro_batches,
                        keeps_attention_probs: TrainingMemory::attention_keeps_probs(precision, true),
                        ..TrainingMemory::new(precision)
                    },
                );
                let expected = (estimate.weights + estimate.gradients + estimate.activations) as isize;
                let per_param = |bytes: isize| bytes as f64 / p as f64;
                let line = format!(
                    "{} {optimizer:?} x{micro_batches}: measured {:.2} bytes a parameter, estimate {:.2}",
                    precision.name(),
                    per_param(measured),
                    per_param(expected)
                );
                report.push(((measured - expected).abs() * 2 > p, line));
            }
        }
    }
    let text: Vec<&str> = report.iter().map(|(_, line)| line.as_str()).collect();
    eprintln!("{}", text.join("\n"));
    assert!(report.iter().all(|(off, _)| !off), "the estimate is off by more than half a byte a parameter:\n{}", text.join("\n"));
}
