//! Mixed precision, as the training loop does it (Burn has no autocast and no loss scaler).
//!
//! The model the optimizer sees (the *master*) always holds f32 parameters, and AdamW's moments
//! are f32 because they are made from f32 gradients. For each step the loop builds a *compute
//! copy*: every parameter cast to bf16 or f16 **as a tracked autodiff op**. The forward and
//! backward passes run in the compute dtype; the cast's backward turns each parameter's gradient
//! back into f32 on the master parameter, so `GradientsParams::from_grads(grads, &master)` reads
//! f32 gradients and the update is applied in f32. Numerically sensitive parts stay f32 inside the
//! model: RMSNorm statistics (Burn's `RmsNorm`), and the logits, which `Llama::project` casts to f32
//! before any log-softmax.
//!
//! f16 has a narrow exponent range, so it also needs loss scaling ([`LossScale`]): the loss is
//! multiplied by a large factor before the backward pass so small gradients do not flush to
//! zero, the gradients are divided by it again, and a step whose gradients overflowed is skipped
//! with the factor halved. bf16 has f32's range and needs none.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Device, FloatDType, Tensor};
use serde::{Deserialize, Serialize};

/// The compute dtype of a run (`run.dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub const ALLOWED: &'static str = "f32, bf16, f16";

    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(format!("run.dtype `{other}` is not a compute dtype: allowed values: {}", Self::ALLOWED)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    pub fn dtype(self) -> FloatDType {
        match self {
            Self::F32 => FloatDType::F32,
            Self::Bf16 => FloatDType::BF16,
            Self::F16 => FloatDType::F16,
        }
    }

    /// Whether this precision trains with a dynamic loss scale.
    pub fn needs_loss_scaling(self) -> bool {
        self == Self::F16
    }

    /// An error naming the device when it cannot compute in this dtype (checked before any work:
    /// Vulkan drivers, for one, often store bf16 but cannot do arithmetic on it).
    pub fn check_device(self, device: &Device, device_name: &str) -> Result<(), String> {
        if self == Self::F32 || device.supports_dtype(DType::from(self.dtype())) {
            return Ok(());
        }
        let supported: Vec<&str> =
            [Self::F32, Self::Bf16, Self::F16].into_iter().filter(|p| device.supports_dtype(DType::from(p.dtype()))).map(|p| p.name()).collect();
        Err(format!(
            "run.dtype `{}`: device `{device_name}` cannot compute in {} (it supports: {}); choose one of those, or the cuda build for bf16",
            self.name(),
            self.name(),
            supported.join(", ")
        ))
    }

    /// The model a step's forward and backward passes run: `master` itself in f32, else a copy
    /// whose parameters are the master's cast to the compute dtype, inside the autodiff graph,
    /// so that gradients flow back to the f32 master parameters (same parameter ids).
    pub fn compute_model<M: Module + Clone>(self, master: &M) -> M {
        match self {
            Self::F32 => master.clone(),
            _ => master.clone().map(&mut CastParams(self.dtype())),
        }
    }
}

struct CastParams(FloatDType);

impl ModuleMapper for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let dtype = self.0;
        param.map(|t| t.cast(dtype))
    }
}

/// Dynamic loss scaling for f16 (as PyTorch's `GradScaler`): start at 2^16, halve on a step whose
/// gradients are not finite (the step is skipped), double after `growth_interval` good steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: u64,
}

impl LossScale {
    pub const INITIAL: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u64 = 2000;
    /// Below this the scale is not the problem: the step counts as a bad step of the run.
    pub const MIN: f64 = 1.0;

    pub fn new() -> Self {
        Self { scale: Self::INITIAL, good_steps: 0 }
    }

    /// Records a step whose gradients were finite.
    pub fn good_step(&mut self) {
        self.good_steps += 1;
        if self.good_steps >= Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
    }

    /// Records an overflow; returns false when the scale cannot go lower (a real divergence).
    pub fn overflow(&mut self) -> bool {
        self.good_steps = 0;
        if self.scale / 2.0 < Self::MIN {
            return false;
        }
        self.scale /= 2.0;
        true
    }
}

impl Default for LossScale {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_others() {
        assert_eq!(Precision::parse("bf16"), Ok(Precision::Bf16));
        let err = Precision::parse("fp8").unwrap_err();
        assert!(err.contains("fp8") && err.contains("f32, bf16, f16"), "{err}");
    }

    #[test]
    fn loss_scale_halves_on_overflow_and_grows_after_good_steps() {
        let mut s = LossScale::new();
        assert!(s.overflow());
        assert_eq!(s.scale, 32768.0);
        for _ in 0..LossScale::GROWTH_INTERVAL {
            s.good_step();
        }
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        let mut low = LossScale { scale: 1.0, good_steps: 3 };
        assert!(!low.overflow());
        assert_eq!(low.scale, 1.0);
    }

    #[test]
    fn flex_computes_in_all_three() {
        let device = Device::flex();
        for p in [Precision::F32, Precision::Bf16, Precision::F16] {
            assert!(p.check_device(&device, "flex").is_ok());
        }
    }
}
