//! Mixed precision, as the training loop does it (Burn has no autocast and no loss scaler).
//!
//! The model the optimizer sees (the *master*) always holds f32 parameters, and AdamW's moments
//! are f32 because they are made from f32 gradients. For each micro-batch the loop builds a
//! *compute copy*: every parameter cast to bf16 or f16 as a fresh leaf with the master
//! parameter's id (`parallel::backward_part`; with `run.optimizer = "host"` the optimizer writes
//! that copy itself). The forward and backward passes run in the compute dtype, and each
//! parameter's gradient is cast to f32 as it is added into the step's f32 sum, one parameter at a
//! time (a host master's single micro-batch is cast on the host), so that the update is applied
//! in f32 and no second full set of f32 gradients is ever held (`tests/gradient_memory.rs`
//! measures it). `Precision::compute_copy`, a cast tracked by
//! autodiff, gives the same gradients and serves the stages' frozen models and PPO's passes.
//! Numerically sensitive parts stay f32 inside the model: RMSNorm statistics (Burn's `RmsNorm`),
//! and the logits, which `Llama::project` casts to f32 before any log-softmax.
//!
//! f16 has a narrow exponent range, so it also needs loss scaling ([`LossScale`]): the loss is
//! multiplied by a large factor before the backward pass so small gradients do not flush to
//! zero, the gradients are divided by it again, and a step whose gradients overflowed is skipped
//! with the factor halved. bf16 has f32's range and needs none.

use serde::{Deserialize, Serialize};

pub use llama_model::Precision;

/// `run.dtype` parsed, with an error that names the key and the allowed values.
pub fn parse(name: &str) -> Result<Precision, String> {
    Precision::parse(name).ok_or_else(|| format!("run.dtype `{name}` is not a compute dtype: allowed values: {}", Precision::ALLOWED))
}

/// Whether this precision trains with a dynamic loss scale (f16 only).
pub fn needs_loss_scaling(precision: Precision) -> bool {
    precision == Precision::F16
}

/// Dynamic loss scaling for f16 (as PyTorch's `GradScaler`): start at 2^16, halve on a step whose
/// gradients are not finite (the step is skipped), double after `growth_interval` good steps.
///
/// Unlike `GradScaler`, the first update is never skipped for nothing: until a run's first good
/// step the scale is still being found ([`LossScale::recalibrate`]), and an overflow halves it
/// and runs the same micro-batches again instead of spending the step; a scale found that way
/// is halved once more after that step, as headroom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: u64,
    /// Whether a step has succeeded at some scale (checkpoints written before this field existed
    /// had trained, so they read as calibrated).
    #[serde(default = "calibrated_by_default")]
    pub calibrated: bool,
}

fn calibrated_by_default() -> bool {
    true
}

impl LossScale {
    pub const INITIAL: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u64 = 2000;
    /// Below this the scale is not the problem: the step counts as a bad step of the run.
    pub const MIN: f64 = 1.0;

    pub fn new() -> Self {
        Self { scale: Self::INITIAL, good_steps: 0, calibrated: false }
    }

    /// Records a step whose gradients were finite.
    pub fn good_step(&mut self) {
        if !self.calibrated && self.scale < Self::INITIAL {
            // The scale just found is the largest at which the first step's gradients were
            // finite: the run goes on at half of it, as headroom for gradients that grow.
            self.scale /= 2.0;
        }
        self.calibrated = true;
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

    /// An overflow before the run's first good step: halves the scale and returns true when the
    /// step should run again at the new one (false once calibrated, or at the floor: the
    /// overflow is then an ordinary skipped step).
    pub fn recalibrate(&mut self) -> bool {
        !self.calibrated && self.overflow()
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
        assert_eq!(parse("bf16"), Ok(Precision::Bf16));
        let err = parse("fp8").unwrap_err();
        assert!(err.contains("fp8") && err.contains("f32, bf16, f16"), "{err}");
    }

    #[test]
    fn loss_scale_halves_on_overflow_and_grows_after_good_steps() {
        // A run past its first good step.
        let mut s = LossScale { calibrated: true, ..LossScale::new() };
        assert!(s.overflow());
        assert_eq!(s.scale, 32768.0);
        for _ in 0..LossScale::GROWTH_INTERVAL {
            s.good_step();
        }
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        let mut low = LossScale { scale: 1.0, good_steps: 3, calibrated: true };
        assert!(!low.overflow());
        assert_eq!(low.scale, 1.0);
    }

    #[test]
    fn the_scale_is_recalibrated_only_before_the_first_good_step() {
        let mut s = LossScale::new();
        assert!(s.recalibrate() && s.recalibrate());
        assert_eq!(s.scale, 16384.0);
        s.good_step();
        assert_eq!(s.scale, 8192.0, "the scale found, halved for headroom");
        assert!(!s.recalibrate(), "after a good step an overflow skips the step");
        assert_eq!(s.scale, 8192.0);
        let mut at_once = LossScale::new();
        at_once.good_step();
        assert_eq!(at_once.scale, LossScale::INITIAL, "no overflow, no headroom taken");
        let mut floor = LossScale { scale: 1.0, good_steps: 0, calibrated: false };
        assert!(!floor.recalibrate(), "at the floor the overflow is a skipped step");
        let old: LossScale = serde_json::from_str(r#"{"scale": 1024.0, "good_steps": 5}"#).unwrap();
        assert!(old.calibrated, "a checkpoint from before the field had trained");
    }

    #[test]
    fn flex_computes_in_all_three() {
        let device = burn::tensor::Device::flex();
        for p in [Precision::F32, Precision::Bf16, Precision::F16] {
            assert!(p.check_device(&device, "flex").is_ok());
        }
    }
}
