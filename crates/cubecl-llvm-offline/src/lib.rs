//! Offline stand-in for `cubecl-llvm` 0.11.3: see this crate's `Cargo.toml` for why it exists.
//!
//! `cubecl-cuda` compiles both of its kernel compilers and picks one at run time; with its `cpp`
//! feature (which `llama-model/cuda` turns on) the default is NVRTC and the LLVM route is reached
//! only by asking for `CudaBackend::Llvm` explicitly. What it names from `cubecl-llvm` is here:
//! the PTX version table and the feature narrowing are copied from upstream (plain Rust, tested
//! below); the LLVM compiler itself is a type whose `compile` returns an error.

use cubecl_core::ir::amd::GfxArch;
use cubecl_core::ir::nvidia::SmArch;
use cubecl_core::prelude::KernelDefinition;
use cubecl_environment::backtrace::BackTrace;
use cubecl_runtime::compiler::CompilationError;
use cubecl_runtime::kernel::BufferIOAttr;

pub mod nvptx {
    pub mod ptx_version {
        //! The PTX ISA version for the installed driver (copied from upstream `cubecl-llvm`).
        use core::fmt;

        /// A PTX ISA version, as the NVPTX target feature spells it: 8.7 is `87`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct PtxVersion(u32);

        impl PtxVersion {
            /// The newest version a driver of CUDA `driver` loads, as `cuDriverGetVersion`
            /// reports it (12.8 is `12080`). `None` below CUDA 10.0.
            pub fn for_driver(driver: i32) -> Option<Self> {
                DRIVER_PTX.iter().find(|(first_driver, _)| driver >= *first_driver).map(|(_, ptx)| Self(*ptx))
            }
        }

        impl fmt::Display for PtxVersion {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "ptx{}", self.0)
            }
        }

        /// The first CUDA release to load each PTX version, newest first (upstream's table).
        const DRIVER_PTX: &[(i32, u32)] = &[
            (13030, 93),
            (13020, 92),
            (13010, 91),
            (13000, 90),
            (12090, 88),
            (12080, 87),
            (12050, 85),
            (12040, 84),
            (12030, 83),
            (12020, 82),
            (12010, 81),
            (12000, 80),
            (11080, 78),
            (11070, 77),
            (11060, 76),
            (11050, 75),
            (11040, 74),
            (11030, 73),
            (11020, 72),
            (11010, 71),
            (11000, 70),
            (10020, 65),
            (10010, 64),
            (10000, 63),
        ];

        #[cfg(test)]
        mod tests {
            use super::*;

            #[test]
            fn a_driver_gets_the_newest_version_it_loads() {
                assert_eq!(PtxVersion::for_driver(12080), Some(PtxVersion(87)));
                assert_eq!(PtxVersion::for_driver(12060), Some(PtxVersion(85)));
                assert_eq!(PtxVersion::for_driver(13050), Some(PtxVersion(93)));
                assert_eq!(PtxVersion::for_driver(8000), None);
                assert_eq!(PtxVersion(87).to_string(), "ptx87");
            }
        }
    }
}

pub mod shared {
    pub mod lowered_features {
        //! What a device advertises, narrowed to what the LLVM backend lowers (copied from
        //! upstream `cubecl-llvm`). `cubecl-cuda` calls it only when the LLVM backend is the
        //! default, which it is not here; kept exact so that the stand-in never lies.
        use cubecl_core::ir::{ComplexKind, DeviceProperties, ElemType, FloatKind, OpaqueType};
        use cubecl_core::ir::{IntKind, UIntKind};

        const HALF: ElemType = ElemType::Float(FloatKind::F16);
        const BF16: ElemType = ElemType::Float(FloatKind::BF16);

        /// The GPU target a device's features are narrowed for.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum GpuTarget {
            Nvptx,
        }

        /// Narrows `props` to what the LLVM backend lowers for `target`.
        pub fn restrict_features(props: &mut DeviceProperties, target: GpuTarget) {
            match target {
                GpuTarget::Nvptx => keep_nvptx_matrix_forms(props),
            }
            restrict_common(props);
        }

        fn keep_nvptx_matrix_forms(props: &mut DeviceProperties) {
            let is_half_or_single = |ty: ElemType| matches!(ty, ElemType::Float(FloatKind::F16) | ElemType::Float(FloatKind::F32));
            let byte = |ty: ElemType| matches!(ty, ElemType::Int(IntKind::I8) | ElemType::UInt(UIntKind::U8));
            let tf32 = ElemType::Float(FloatKind::TF32);
            let f32 = ElemType::Float(FloatKind::F32);
            let matmul = &mut props.features.matmul;
            matmul.cmma.retain(|config| {
                let half = config.a_type == HALF && config.b_type == HALF && is_half_or_single(config.cd_type);
                let bf16 = config.a_type == BF16 && config.b_type == BF16 && config.cd_type == f32;
                let tf32 = config.a_type == tf32 && config.b_type == tf32 && config.cd_type == f32 && (config.m, config.n, config.k) == (16, 16, 8);
                half || bf16 || tf32
            });
            matmul.mma.retain(|config| {
                let floats = (config.a_type == HALF || config.a_type == BF16) && config.b_type == config.a_type && config.cd_type == f32;
                let integers = byte(config.a_type) && byte(config.b_type) && config.cd_type == ElemType::Int(IntKind::I32);
                let tf32 =
                    config.a_type == tf32 && config.b_type == tf32 && config.cd_type == f32 && config.m == 16 && config.n == 8 && matches!(config.k, 4 | 8);
                floats || integers || tf32
            });
        }

        /// What neither GPU target of the LLVM backend lowers.
        fn restrict_common(props: &mut DeviceProperties) {
            let matmul = &mut props.features.matmul;
            matmul.cube_mma = Default::default();
            matmul.scaled_mma = Default::default();
            matmul.cmma_tensor_addressing = false;
            if matmul.cmma.is_empty() && matmul.mma.is_empty() {
                props.hardware.num_tensor_cores = None;
                props.hardware.min_tensor_cores_dim = None;
            }
            props.features.tma = Default::default();
            props.features.cube_cluster = false;
            props.features.copy_async = false;
            props.features.types.opaque.remove(&OpaqueType::TensorMap);
            props.features.types.opaque.remove(&OpaqueType::Barrier);
            props.features.types.atomic.retain(|ty, _| ty.elem_type() != BF16);
            props.features.types.complex.clear();
            for kind in [ComplexKind::C32, ComplexKind::C64] {
                props.features.types.elem.remove(&ElemType::Complex(kind));
            }
            props.features.types.atomic.retain(|ty, _| ty.vector_size() == 1);
        }
    }
}

/// The LLVM targets upstream knows; only the variants cubecl-cuda names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LlvmTarget {
    #[default]
    Cpu,
    Nvptx,
}

/// Options of the LLVM compiler, with the fields cubecl-cuda sets.
#[derive(Clone, Debug, Default)]
pub struct PlironOptions {
    pub cpu_buffer_alignment: Option<u32>,
    pub arch: Option<GfxArch>,
    pub sm_arch: Option<SmArch>,
    pub ptx_version: Option<nvptx::ptx_version::PtxVersion>,
    pub grid_constants: bool,
}

/// A compiled PTX module, as upstream's; never produced by this stand-in.
#[derive(Clone, Debug)]
pub struct NvptxModule {
    pub ptx: Vec<core::ffi::c_char>,
    pub entrypoint: String,
    pub ir: String,
    pub shared_memory_size: usize,
    pub io: Vec<BufferIOAttr>,
}

/// What the LLVM compiler produces; never produced by this stand-in.
#[derive(Clone, Debug)]
pub enum PlironArtifact {
    NvptxCode(NvptxModule),
}

/// The LLVM compiler's place: every `compile` is refused, naming the fix.
#[derive(Clone, Debug, Default)]
pub struct PlironCompiler {
    pub target: LlvmTarget,
}

/// The message of every refused compilation.
pub const LLVM_UNAVAILABLE: &str = "this build has no LLVM kernel compiler: llama2-rs patches \
     cubecl-llvm with an offline stand-in (crates/cubecl-llvm-offline) and compiles CUDA kernels \
     with NVRTC (cubecl's `cuda-cpp`); select the NVRTC backend (CudaBackend::Cpp), which is the \
     default in this build";

impl PlironCompiler {
    /// Refuses: this build has no LLVM (see [`LLVM_UNAVAILABLE`]).
    pub fn compile(&mut self, _kernel: KernelDefinition, _options: &PlironOptions) -> Result<PlironArtifact, CompilationError> {
        Err(CompilationError::Generic { reason: LLVM_UNAVAILABLE.to_string(), backtrace: BackTrace::capture() })
    }

    /// The language tag upstream gives each target's output.
    pub fn lang_tag(&self) -> &'static str {
        match self.target {
            LlvmTarget::Cpu => "mlir",
            LlvmTarget::Nvptx => "llvm",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubecl_core::ir::features::{Features, MmaConfig};
    use cubecl_core::ir::{DeviceIdentity, DeviceProperties, ElemType, FloatKind, HardwareProperties, MemoryDeviceProperties};
    use shared::lowered_features::restrict_features;

    fn device_properties() -> DeviceProperties {
        let hardware = HardwareProperties {
            load_width: 128,
            vector_register_count: None,
            plane_size_min: 32,
            plane_size_max: 32,
            max_bindings: 32,
            max_shared_memory_size: 65536,
            max_cube_count: (u32::MAX, u16::MAX as u32, u16::MAX as u32),
            max_units_per_cube: 1024,
            max_cube_dim: (1024, 1024, 1024),
            num_streaming_multiprocessors: None,
            num_tensor_cores: Some(4),
            min_tensor_cores_dim: Some(8),
            num_cpu_cores: None,
            last_level_cache_size: None,
            max_vector_size: usize::MAX,
            cube_mma_reserved_shared_memory: 0,
        };
        let identity = DeviceIdentity { name: "offline".into(), fingerprint: "offline".into(), physical: None };
        DeviceProperties::new(Features::default(), MemoryDeviceProperties::new(u64::MAX, 256), hardware, cubecl_core::profile::TimingMethod::Device, identity)
    }

    /// Upstream's test: bf16 operands keep only their f32-accumulator forms, and TMA, clusters
    /// and async copy are taken away.
    #[test]
    fn nvptx_narrowing_keeps_bf16_with_f32_accumulators_only() {
        let bf16 = ElemType::Float(FloatKind::BF16);
        let f32 = ElemType::Float(FloatKind::F32);
        let config = |cd_type, m, n, k| MmaConfig { a_type: bf16, b_type: bf16, cd_type, m, n, k };
        let mut props = device_properties();
        props.features.matmul.cmma.extend([config(f32, 16, 16, 16), config(f32, 32, 8, 16), config(bf16, 16, 16, 16)]);
        props.features.matmul.mma.extend([config(f32, 16, 8, 16), config(bf16, 16, 8, 16)]);
        props.features.copy_async = true;
        props.features.cube_cluster = true;
        restrict_features(&mut props, shared::lowered_features::GpuTarget::Nvptx);
        assert_eq!(props.features.matmul.cmma.len(), 2);
        assert!(props.features.matmul.cmma.iter().all(|c| c.cd_type == f32));
        assert_eq!(props.features.matmul.mma.len(), 1);
        assert!(!props.features.copy_async && !props.features.cube_cluster);
        assert_eq!(props.hardware.num_tensor_cores, Some(4));
    }
}
