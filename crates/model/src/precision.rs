//! The compute dtype of training and of the memory estimate, and the one piece of mixed-precision
//! machinery every backend needs from the model side: the compute copy, whose parameters are the
//! f32 master's cast inside the autodiff graph (the trainer's `precision` module does the rest:
//! loss scaling, f32 gradient accumulation).

/// The compute dtype of a training run (`run.dtype`) and of the memory estimate: f32, or bf16 /
/// f16 mixed precision with f32 master weights (the trainer's `precision` module does the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub const ALLOWED: &'static str = "f32, bf16, f16";

    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 | Precision::F16 => 2,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" | "fp32" | "float32" => Some(Self::F32),
            "bf16" | "bfloat16" => Some(Self::Bf16),
            "f16" | "fp16" | "float16" => Some(Self::F16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    pub fn dtype(self) -> burn::tensor::FloatDType {
        match self {
            Self::F32 => burn::tensor::FloatDType::F32,
            Self::Bf16 => burn::tensor::FloatDType::BF16,
            Self::F16 => burn::tensor::FloatDType::F16,
        }
    }

    /// An error naming the device when it cannot compute in this dtype (Vulkan drivers, for one,
    /// store bf16 but cannot do arithmetic on it).
    pub fn check_device(self, device: &burn::tensor::Device, device_name: &str) -> Result<(), String> {
        let computes = |p: Precision| p == Precision::F32 || device.supports_dtype(burn::tensor::DType::from(p.dtype()));
        if computes(self) {
            return Ok(());
        }
        let supported: Vec<&str> = [Precision::F32, Precision::Bf16, Precision::F16].into_iter().filter(|p| computes(*p)).map(|p| p.name()).collect();
        Err(format!(
            "run.dtype `{0}`: device `{device_name}` cannot compute in {0} (it supports: {1}); choose one of those, or the cuda build for bf16",
            self.name(),
            supported.join(", ")
        ))
    }

    /// The model a mixed-precision step runs: `master` itself in f32, else a copy whose
    /// parameters are the master's cast to this dtype *inside the autodiff graph* (Burn's cast is
    /// differentiable), so the backward pass carries f32 gradients back to the f32 master
    /// parameters, which keep their ids.
    pub fn compute_copy<M: burn::module::Module + Clone>(self, master: &M) -> M {
        match self {
            Self::F32 => master.clone(),
            half => master.clone().map(&mut CastParams(half.dtype())),
        }
    }
}

struct CastParams(burn::tensor::FloatDType);

impl burn::module::ModuleMapper for CastParams {
    fn map_float<const D: usize>(&mut self, param: burn::module::Param<burn::tensor::Tensor<D>>) -> burn::module::Param<burn::tensor::Tensor<D>> {
        let dtype = self.0;
        param.map(|t| t.cast(dtype))
    }
}
