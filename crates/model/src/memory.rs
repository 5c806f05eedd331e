//! Training memory before launch: one device's share and the host's for a training run
//! ([`LlamaConfig::memory_estimate`]), and the five models of a PPO iteration
//! ([`LlamaConfig::ppo_memory_estimate`]).

use crate::config::{LlamaConfig, OptimizerPlacement, Recompute};
use crate::precision::Precision;

/// Positions per chunk of the output projection and loss when `train.logits_chunk` is not set
/// and blocks are recomputed: 1024 x 32000 f32 logits are 125 MiB per chunk.
pub const DEFAULT_LOGITS_CHUNK: usize = 1024;

/// Host bytes per value of the largest parameter while gradients stream into the in-place host
/// update: two f32 gradients on their way down and one in hand, the f32 master values being
/// updated, and bf16 copies in hand, queued and going up.
pub const STREAMED_BYTES_PER_VALUE: u64 = 3 * 4 + 4 + 3 * 2;

/// How a run trains, as far as memory goes: the inputs of [`LlamaConfig::memory_estimate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingMemory {
    pub precision: Precision,
    pub recompute: Recompute,
    pub optimizer: OptimizerPlacement,
    /// Positions per chunk of the output projection and loss (None: the whole logits at once).
    pub logits_chunk: Option<usize>,
    /// Whether attention keeps its probabilities for backward (`heads * seq` per token and layer
    /// in `precision`): the fused CPU attention does (flex, f32); on a GPU attention recomputes
    /// them in backward and keeps none.
    pub keeps_attention_probs: bool,
    /// Micro-batches per optimizer step on each device: with more than one, their gradients are
    /// summed on the device in f32 (an f32 copy of the gradients), wherever the optimizer is.
    pub micro_batches: usize,
    /// With the optimizer on the host: whether the step's gradients come down a parameter at a
    /// time into the in-place update (one process on one device, `trainer::sharded`'s
    /// `step_in_place`, PPO's too), rather than whole (several ranks or devices).
    pub streams_gradients: bool,
}

impl TrainingMemory {
    /// No recomputation, optimizer on the device, whole logits, attention as on a GPU.
    pub fn new(precision: Precision) -> Self {
        Self {
            precision,
            recompute: Recompute::None,
            optimizer: OptimizerPlacement::Device,
            logits_chunk: None,
            keeps_attention_probs: false,
            micro_batches: 1,
            streams_gradients: false,
        }
    }

    /// Whether attention keeps its probabilities when training in `precision` on the CPU
    /// (`on_cpu`) or a GPU: only the fused CPU kernel does, in f32.
    pub fn attention_keeps_probs(precision: Precision, on_cpu: bool) -> bool {
        on_cpu && precision == Precision::F32
    }
}

/// Estimated training memory, in bytes: one device's share (the first five fields) and the
/// host's (`host_*`, non-zero with the optimizer on the host).
#[derive(Debug, Clone, Copy)]
pub struct MemoryEstimate {
    pub weights: u64,
    /// f32 master copy kept beside low-precision weights on the device (0 in f32 or on the host).
    pub master_weights: u64,
    /// A micro-batch's gradients in the compute dtype, plus, with several micro-batches a step,
    /// their f32 sum (with the optimizer on the host it leaves the device once per step).
    pub gradients: u64,
    /// AdamW first and second moments, always f32 (0 when on the host).
    pub optimizer: u64,
    pub activations: u64,
    /// Host: f32 master weights (the model itself when the optimizer is on the host).
    pub host_master_weights: u64,
    /// Host: AdamW moments.
    pub host_optimizer: u64,
    /// Host: the step's f32 gradients, come down from the device: whole, or a few of the
    /// largest parameter's values in flight when they stream ([`STREAMED_BYTES_PER_VALUE`]).
    pub host_gradients: u64,
}

/// What a run really takes over the estimate of its resident state (weights, f32 master,
/// gradients and their sum, AdamW moments): these are allocated at their exact sizes, and
/// allocator rounding and the GPU context add a little. With [`ACTIVATION_OVERHEAD`] it covers
/// the three peaks measured with nvidia-smi (docs/benchmarks.md): Llama 2 7B, 1 x 4096, f16,
/// block recomputation, optimizer on the host, on an H200 through Vulkan: 33.94 GiB, against
/// 25.10 GiB of state and 6.85 of activations (1.06x the sum; this model gives 35.95); and the
/// 134M config, 16 x 512, on an H100 through Vulkan: 21.2 GiB in f32 and 13.3 in f16, against
/// about 2.0 GiB of state and 14.4 and 8.2 of activations (this model gives 22.3 and 13.6).
pub const RESIDENT_OVERHEAD: f64 = 1.05;

/// What the activations really take over their estimate: allocator pools of many mid-sized
/// buffers, the f32 copies of logits, buffers kept for backward that the estimate leaves out.
/// The 134M runs above show it (1.33x in f32, 1.37x in f16, taking the state at
/// [`RESIDENT_OVERHEAD`]); they were measured when attention was Burn's composed op, whose two
/// kept score-sized tensors per layer the estimate then counted, and are not re-measured since
/// attention recomputes them. A single overhead on the whole total, as before, would charge the
/// 7B state's 100 GiB (the f32 master and moments on the device) the 134M runs' activation slack.
pub const ACTIVATION_OVERHEAD: f64 = 1.4;

/// The peak to plan for from a device's `resident` state and `transient` activations.
pub fn expected_peak(resident: u64, transient: u64) -> u64 {
    (resident as f64 * RESIDENT_OVERHEAD + transient as f64 * ACTIVATION_OVERHEAD) as u64
}

impl MemoryEstimate {
    /// The device's total.
    pub fn total(&self) -> u64 {
        self.weights + self.master_weights + self.gradients + self.optimizer + self.activations
    }

    /// The host's total (0 with the optimizer on the device).
    pub fn host_total(&self) -> u64 {
        self.host_master_weights + self.host_optimizer + self.host_gradients
    }

    /// The peak to plan for: the resident state and the activations, each with its measured
    /// overhead ([`expected_peak`]).
    pub fn expected_peak(&self) -> u64 {
        expected_peak(self.total() - self.activations, self.activations)
    }
}

impl LlamaConfig {
    /// Memory needed to train on one device with `micro_batch` sequences of `seq_len` tokens.
    ///
    /// Weights and gradients in the compute dtype, and with several micro-batches a step their
    /// f32 sum; AdamW moments in f32 and an f32 master copy (when the compute dtype is not f32)
    /// on the device, or with `OptimizerPlacement::Host` on the host. Activations count the
    /// tensors our forward keeps for backward and the logits with their f32 softmax and
    /// gradient; with `Recompute::Block`, each block's input plus twice one block's tensors (its
    /// re-run and the gradients flowing through it); with `logits_chunk`, the logits of one
    /// chunk. Attention keeps no score-sized tensor on a GPU (it recomputes its probabilities in
    /// backward, `crate::attention`), its probabilities with `keeps_attention_probs` (the fused
    /// CPU kernel); one layer's attention at a time holds four `[batch, heads, seq, seq]`
    /// tensors while it runs (Burn's composed forward, where the flash kernel does not launch).
    /// An estimate: allocator slack and workspace are not counted ([`expected_peak`] adds them).
    pub fn memory_estimate(&self, micro_batch: usize, seq_len: usize, plan: &TrainingMemory) -> MemoryEstimate {
        self.estimate(self.num_params(), self.vocab_size as u64, micro_batch, seq_len, plan)
    }

    /// [`LlamaConfig::memory_estimate`] of a reward or value model of this shape
    /// ([`LlamaConfig::reward_model_params`]): one output per position instead of
    /// `vocab_size` logits.
    pub fn reward_model_memory_estimate(&self, micro_batch: usize, seq_len: usize, plan: &TrainingMemory) -> MemoryEstimate {
        self.estimate(self.reward_model_params(), 1, micro_batch, seq_len, plan)
    }

    /// The parameters of a reward or value model of this shape (`llama_reward::RewardModel`):
    /// the trunk without the output projection, and a scalar head (`dim` weights and a bias).
    pub fn reward_model_params(&self) -> u64 {
        self.clone().with_tie_word_embeddings(true).num_params() + self.dim as u64 + 1
    }

    /// The estimate for a model of `p` parameters whose last layer has `outputs` outputs per
    /// position (the vocabulary's logits, or a reward model's one score).
    fn estimate(&self, p: u64, outputs: u64, micro_batch: usize, seq_len: usize, plan: &TrainingMemory) -> MemoryEstimate {
        let b = plan.precision.bytes();
        let tokens = (micro_batch * seq_len) as u64;
        let d = self.dim as u64;
        let kv = (self.n_kv_heads() * self.head_dim()) as u64;
        let f = self.ffn_hidden() as u64;
        let h = self.n_heads as u64;
        let t = seq_len as u64;
        let layers = self.n_layers as u64;
        // Per token and layer: two norm inputs and outputs (4d), q/k/v (d + 2kv), RoPE'd q/k
        // (d + kv), expanded k/v for GQA (2d), attention output (d), residuals (2d), SwiGLU
        // gate, up, silu and product (4f); the attention probabilities (h t) if kept.
        let probs = if plan.keeps_attention_probs { h * t } else { 0 };
        let per_token_layer = 4 * d + (d + 2 * kv) + (d + kv) + 2 * d + d + 2 * d + 4 * f + probs;
        let attention_scores = 4 * micro_batch as u64 * h * t * t * b;
        let blocks = match plan.recompute {
            Recompute::None => tokens * layers * per_token_layer * b,
            Recompute::Block => tokens * layers * d * b + 2 * tokens * per_token_layer * b,
        };
        let logit_rows = plan.logits_chunk.map_or(tokens, |c| (c as u64).min(tokens));
        let logits = logit_rows * outputs * (b + 4 + 4);
        let master = if plan.precision == Precision::F32 { 0 } else { p * 4 };
        let on_host = plan.optimizer == OptimizerPlacement::Host;
        // Several micro-batches a step: their f32 sum beside each pass's gradients (the trainer's
        // `parallel::backward_part` adds them in a parameter at a time).
        let gradient_sum = if plan.micro_batches > 1 { p * 4 } else { 0 };
        let largest_param = (self.vocab_size as u64).max(self.ffn_hidden() as u64) * d;
        let host_gradients = if plan.streams_gradients { largest_param * STREAMED_BYTES_PER_VALUE } else { p * 4 };
        MemoryEstimate {
            weights: p * b,
            master_weights: if on_host { 0 } else { master },
            gradients: p * b + gradient_sum,
            optimizer: if on_host { 0 } else { 2 * p * 4 },
            activations: blocks + logits + attention_scores,
            host_master_weights: if on_host { p * 4 } else { 0 },
            host_optimizer: if on_host { 2 * p * 4 } else { 0 },
            host_gradients: if on_host { host_gradients } else { 0 },
        }
    }

    /// What a PPO iteration holds on one device with this config as the policy (and its frozen
    /// reference) and `reward` as the shape of the value model and of the two reward models:
    /// updates of `micro_batch` sequences of `seq_len` tokens, rollouts of `rollout_batch`.
    pub fn ppo_memory_estimate(&self, reward: &LlamaConfig, micro_batch: usize, seq_len: usize, rollout_batch: usize, plan: &TrainingMemory) -> PpoMemory {
        let b = plan.precision.bytes();
        let kv_dim = (self.n_kv_heads() * self.head_dim()) as u64;
        let (mut policy, mut value) = (self.memory_estimate(micro_batch, seq_len, plan), reward.reward_model_memory_estimate(micro_batch, seq_len, plan));
        if plan.optimizer == OptimizerPlacement::Device {
            // PPO's passes beside an f32 master run on its tracked cast (`Precision::compute_copy`),
            // whose backward hands the gradients back in f32.
            policy.gradients += self.num_params() * (4 - b);
            value.gradients += reward.reward_model_params() * (4 - b);
        }
        PpoMemory {
            policy,
            value,
            reference: self.num_params() * b,
            reward_models: 2 * reward.reward_model_params() * b,
            kv_cache: 2 * self.n_layers as u64 * kv_dim * (rollout_batch * seq_len) as u64 * b,
        }
    }
}

/// One PPO iteration's memory on one device (Llama 2, section 3.2.3: five models). The policy
/// and the value model train (weights, gradients, AdamW, activations, as any run); the reference
/// policy and the helpfulness and safety reward models are frozen (weights only, in the compute
/// dtype); the rollout keeps K and V of every policy layer for its batch.
#[derive(Debug, Clone, Copy)]
pub struct PpoMemory {
    pub policy: MemoryEstimate,
    pub value: MemoryEstimate,
    pub reference: u64,
    /// Both reward models.
    pub reward_models: u64,
    pub kv_cache: u64,
}

impl PpoMemory {
    /// The device's total: what stays resident (the trained models' weights, master copies,
    /// gradients and moments; the frozen weights) and the larger of the update's activations and
    /// the rollout's KV cache, which are never alive at once.
    pub fn total(&self) -> u64 {
        let resident = |m: &MemoryEstimate| m.total() - m.activations;
        resident(&self.policy) + resident(&self.value) + self.reference + self.reward_models + self.transient()
    }

    /// The larger of the update's activations and the rollout's KV cache.
    pub fn transient(&self) -> u64 {
        (self.policy.activations + self.value.activations).max(self.kv_cache)
    }

    /// The peak to plan for: the resident models and the transient part (activations or KV
    /// cache), each with its measured overhead ([`expected_peak`]).
    pub fn expected_peak(&self) -> u64 {
        let transient = self.transient();
        expected_peak(self.total() - transient, transient)
    }

    /// The host's total (the two AdamWs' state with the optimizer on the host).
    pub fn host_total(&self) -> u64 {
        self.policy.host_total() + self.value.host_total()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(name: &str) -> LlamaConfig {
        let path = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../../configs").join(name);
        LlamaConfig::from_toml_file(&path).unwrap()
    }

    #[test]
    fn memory_estimate_counts_adam_and_master_weights() {
        let c = preset("7b.toml");
        let p = c.num_params();
        let m32 = c.memory_estimate(1, 4096, &TrainingMemory::new(Precision::F32));
        assert_eq!(m32.weights, 4 * p);
        assert_eq!(m32.optimizer, 8 * p);
        assert_eq!(m32.master_weights, 0);
        assert_eq!(m32.host_total(), 0);
        let m16 = c.memory_estimate(1, 4096, &TrainingMemory::new(Precision::Bf16));
        assert_eq!(m16.weights, 2 * p);
        assert_eq!(m16.master_weights, 4 * p);
        assert!(m16.activations < m32.activations);
    }

    /// The fused CPU attention's kept probabilities are `heads * seq` values per token and
    /// layer; attention's transient scores (four `[batch, heads, seq, seq]` tensors) count once.
    #[test]
    fn memory_estimate_counts_attention_probabilities_only_where_kept() {
        let c = preset("7b.toml");
        let gpu = c.memory_estimate(2, 1024, &TrainingMemory::new(Precision::F32));
        let cpu = c.memory_estimate(2, 1024, &TrainingMemory { keeps_attention_probs: true, ..TrainingMemory::new(Precision::F32) });
        assert_eq!(cpu.activations - gpu.activations, (2 * 1024) * 32 * (32 * 1024) * 4);
        let longer = c.memory_estimate(2, 2048, &TrainingMemory::new(Precision::F32));
        // Four f32 score tensors of micro-batch 2 x 32 heads x seq x seq.
        let scores = |seq: u64| 4 * (2 * 32 * seq * seq) * 4;
        // Without kept probabilities the rest grows linearly with the tokens (logits included).
        assert_eq!((gpu.activations - scores(1024)) / 2048, (longer.activations - scores(2048)) / 4096);
    }

    /// The host optimizer moves exactly the f32 master and AdamW's moments off the device (and
    /// adds the f32 gradient accumulator on the host); block recomputation and chunked logits
    /// cut the activations several-fold at 7B x 4096 and leave the rest alone.
    #[test]
    fn memory_estimate_knows_recomputation_chunks_and_the_host_optimizer() {
        let c = preset("7b.toml");
        let p = c.num_params();
        let plain = c.memory_estimate(1, 4096, &TrainingMemory::new(Precision::Bf16));
        let host = c.memory_estimate(1, 4096, &TrainingMemory { optimizer: OptimizerPlacement::Host, ..TrainingMemory::new(Precision::Bf16) });
        assert_eq!(plain.total() - host.total(), plain.master_weights + plain.optimizer);
        assert_eq!((host.master_weights, host.optimizer), (0, 0));
        assert_eq!(host.host_total(), 4 * p + 8 * p + 4 * p);
        // Several micro-batches a step: their f32 sum on the device too.
        let accumulating =
            c.memory_estimate(1, 4096, &TrainingMemory { micro_batches: 8, optimizer: OptimizerPlacement::Host, ..TrainingMemory::new(Precision::Bf16) });
        assert_eq!(accumulating.total() - host.total(), 4 * p);
        assert_eq!(accumulating.host_total(), host.host_total());
        // The same sum with the optimizer on the device (trainer's `gradient_memory` test measures both).
        let on_device = c.memory_estimate(1, 4096, &TrainingMemory { micro_batches: 8, ..TrainingMemory::new(Precision::Bf16) });
        assert_eq!(on_device.total() - plain.total(), 4 * p);
        // The expected peak charges the activations more slack than the state.
        let peak = on_device.expected_peak() as f64;
        let state = (on_device.total() - on_device.activations) as f64;
        assert!((peak - (state * RESIDENT_OVERHEAD + on_device.activations as f64 * ACTIVATION_OVERHEAD)).abs() < 2.0);
        // One process on one device: the gradients stream, a few of the embedding's 131 M
        // values at a time (3.1 GB, not 27 GB).
        let streaming = c.memory_estimate(
            1,
            4096,
            &TrainingMemory { streams_gradients: true, optimizer: OptimizerPlacement::Host, ..TrainingMemory::new(Precision::Bf16) },
        );
        assert_eq!(streaming.host_gradients, 32000 * 4096 * 22);
        assert_eq!(streaming.total(), host.total());
        let saving = TrainingMemory { recompute: Recompute::Block, logits_chunk: Some(1024), ..TrainingMemory::new(Precision::Bf16) };
        let lean = c.memory_estimate(1, 4096, &saving);
        assert!(lean.activations * 4 < plain.activations, "{} vs {}", lean.activations, plain.activations);
        assert_eq!((lean.weights, lean.gradients, lean.optimizer), (plain.weights, plain.gradients, plain.optimizer));
        // The saved block inputs: 32 layers x 4096 tokens x 4096 x 2 bytes = 1 GiB of it.
        assert!(lean.activations > 32 * 4096 * 4096 * 2);
    }

    #[test]
    fn a_reward_model_is_the_trunk_and_a_scalar_head() {
        let c = LlamaConfig::new(64, 2, 4).with_vocab_size(100).with_multiple_of(16);
        // The untied output projection (vocab x dim) goes, a head of dim + 1 comes.
        assert_eq!(c.reward_model_params(), c.num_params() - 100 * 64 + 65);
        let tied = c.clone().with_tie_word_embeddings(true);
        assert_eq!(tied.reward_model_params(), tied.num_params() + 65);
        let plan = TrainingMemory::new(Precision::F32);
        let (lm, rm) = (c.memory_estimate(2, 16, &plan), c.reward_model_memory_estimate(2, 16, &plan));
        assert_eq!(lm.weights - rm.weights, (100 * 64 - 65) * 4);
        // Logits: 32 positions x 100 outputs x (4 + 4 + 4) bytes against one output each.
        assert_eq!(lm.activations - rm.activations, 32 * 99 * 12);
    }

    #[test]
    fn ppo_holds_two_trained_models_three_frozen_and_the_larger_of_activations_and_cache() {
        let policy = LlamaConfig::new(64, 2, 4).with_vocab_size(100).with_multiple_of(16).with_max_seq_len(64);
        let reward = LlamaConfig::new(32, 2, 4).with_vocab_size(100).with_multiple_of(16).with_max_seq_len(64);
        let plan = TrainingMemory::new(Precision::Bf16);
        let m = policy.ppo_memory_estimate(&reward, 2, 64, 8, &plan);
        assert_eq!(m.reference, policy.num_params() * 2);
        assert_eq!(m.reward_models, 2 * reward.reward_model_params() * 2);
        // K and V, 2 layers, 4 heads x 16, 8 sequences of 64 positions, bf16.
        assert_eq!(m.kv_cache, 2 * 2 * 64 * 8 * 64 * 2);
        let resident = m.policy.total() - m.policy.activations + m.value.total() - m.value.activations + m.reference + m.reward_models;
        assert_eq!(m.total(), resident + (m.policy.activations + m.value.activations).max(m.kv_cache));
        // A rollout batch large enough makes the cache the transient that counts.
        let big = policy.ppo_memory_estimate(&reward, 2, 64, 4096, &plan);
        assert_eq!(big.total(), resident + big.kv_cache);
        assert!(big.kv_cache > big.policy.activations + big.value.activations);
        // Beside an f32 master on the device the passes' gradients are f32; a host master's
        // copy hands them back in the compute dtype.
        assert_eq!(m.policy.gradients, policy.num_params() * 4);
        let host = policy.ppo_memory_estimate(&reward, 2, 64, 8, &TrainingMemory { optimizer: OptimizerPlacement::Host, ..plan });
        assert_eq!(host.policy.gradients, policy.num_params() * 2);
    }
}
