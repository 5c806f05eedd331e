//! The one trait a stage implements to be trained by the shared loop ([`crate::run::train`]) and
//! its replicas ([`crate::parallel`]).

use burn::tensor::Tensor;

use crate::metrics::Metrics;

/// What a stage trains on and how.
pub trait Objective<M> {
    type Batch;

    /// The next micro-batch of `size` sequences; None when the data is exhausted.
    fn next_batch(&mut self, size: usize) -> anyhow::Result<Option<Self::Batch>>;

    /// How many loss terms (target tokens, pairs) the batch holds: the step's loss is the sum of
    /// every micro-batch's summed loss divided by the sum of their weights, so a step over
    /// several micro-batches equals one over their concatenation.
    fn weight(&self, batch: &Self::Batch) -> f64;

    /// Tokens the batch processes (for throughput).
    fn tokens(&self, batch: &Self::Batch) -> usize;

    /// The summed loss of the batch (a scalar on the model's autodiff device).
    fn loss_sum(&self, model: &M, batch: &Self::Batch) -> Tensor<1>;

    /// Runs the stage's evaluation and records its numbers.
    fn evaluate(&mut self, model: &M, step: u64, metrics: &mut Metrics) -> anyhow::Result<()>;

    /// Where the data readers are (saved in checkpoints).
    fn data_state(&self) -> serde_json::Value;
    fn restore_data_state(&mut self, state: &serde_json::Value) -> anyhow::Result<()>;
}
