//! The Llama 2 architecture on Burn 0.22.
//!
//! - [`LlamaConfig`]: hyper-parameters, validation, exact parameter count, memory estimate.
//! - [`Llama`]: the module (see `model.rs`, the whole forward in one file) and its [`KvCache`].
//! - [`generate`]: batched sampling with temperature / top-k / top-p / greedy, returning the
//!   log-probability of every generated token.
//! - [`checkpoint`]: native checkpoints and Hugging Face `LlamaForCausalLM` directories, both ways.
//! - [`device`]: `--device flex|vulkan|wgpu|cuda[:N]` parsing.
//! - [`attention`]: causal self-attention, one fused op with its own backward on the CPU.
//! - [`loss`]: next-token cross-entropy, one fused op with its own backward on the CPU.
//! - [`rms_norm`], [`rotary`], [`swiglu`]: RMSNorm, RoPE's rotation and the SwiGLU gate, each one
//!   fused op with its own backward on the CPU.
//! - [`adamw`]: Burn's AdamW with one fused pass per parameter on the CPU (same state, same values).
//! - [`recompute`]: block recomputation and chunked logits (`with_memory_saving`), one op with
//!   its own backward on every backend.
//! - [`host_memory`]: the allocator policy every binary sets first (reuse, not re-fault, big buffers).

pub mod adamw;
pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod decode_attention;
pub mod decode_projection;
pub mod device;
pub mod device_check;
mod files;
mod flex_kernels;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod host_memory;
pub mod loss;
pub mod memory;
pub mod model;
pub mod precision;
pub mod quants;
pub mod recompute;
pub mod rms_norm;
pub mod rotary;
pub mod swiglu;

pub use config::{LlamaConfig, OptimizerPlacement, Recompute};
pub use flex_kernels::without_fused_kernels;
pub use memory::{MemoryEstimate, PpoMemory, TrainingMemory};
pub use model::{Attention, Block, FeedForward, KvCache, Llama, Positions};
pub use precision::Precision;

/// Runs `f` with the thread-local `setting` set to `value`, restoring the previous value after,
/// even if `f` panics (the switches [`without_fused_kernels`] and
/// [`recompute::with_memory_saving`]).
pub(crate) fn with_setting<T: Copy + 'static, R>(setting: &'static std::thread::LocalKey<std::cell::Cell<T>>, value: T, f: impl FnOnce() -> R) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<std::cell::Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.set(self.1);
        }
    }
    let _restore = Restore(setting, setting.replace(value));
    f()
}

/// Errors of the model crate; each message says what was wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Checkpoint(String),
    #[error("{0}")]
    Generation(String),
    #[error("{0}")]
    Device(String),
}

impl From<std::io::Error> for ModelError {
    /// `llama_io`'s errors already name the path.
    fn from(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}
