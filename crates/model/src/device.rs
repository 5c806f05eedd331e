//! Run-time device selection: `flex` (CPU, always built), `vulkan[:N]`, `wgpu[:N]`, `cuda[:N]`
//! (each present only when its cargo feature is enabled).

use burn::tensor::Device;

use crate::ModelError;

/// Names of the devices this binary was built with, for `--help` and error messages.
pub fn available() -> Vec<&'static str> {
    let mut names = vec!["flex"];
    if cfg!(feature = "vulkan") {
        names.push("vulkan[:N]");
    }
    if cfg!(feature = "wgpu") {
        names.push("wgpu[:N]");
    }
    if cfg!(feature = "cuda") {
        names.push("cuda[:N]");
    }
    names
}

/// Parses `flex`, `vulkan`, `vulkan:1`, `wgpu`, `cuda`, `cuda:0`, ... into a Burn device, and
/// opens a GPU device once per process ([`probe`]): every command that takes `--device` then
/// meets a missing driver as this error, not as a panic in the backend's device thread.
pub fn parse(spec: &str) -> Result<Device, ModelError> {
    let device = parse_unopened(spec)?;
    if !is_cpu(spec) {
        static OPENED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let mut opened = OPENED.lock().unwrap_or_else(|e| e.into_inner());
        if !opened.iter().any(|s| s == spec) {
            probe(&device, spec)?;
            opened.push(spec.to_string());
        }
    }
    Ok(device)
}

/// Whether `spec` names a device this build has, without opening it: for validating a config,
/// which should not start a GPU (the launch opens the device it runs on, through [`parse`]).
pub fn check_available(spec: &str) -> Result<(), ModelError> {
    parse_unopened(spec).map(drop)
}

/// [`parse`] without opening the device.
fn parse_unopened(spec: &str) -> Result<Device, ModelError> {
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => {
            let i: usize = i.parse().map_err(|_| ModelError::Device(format!("device `{spec}`: `{i}` is not a device index (expected e.g. cuda:0)")))?;
            (k, Some(i))
        }
        None => (spec, None),
    };
    #[allow(unused_variables)]
    let index_or_0 = index.unwrap_or(0);
    if !is_cpu(kind) {
        enable_kernel_cache();
    }
    match kind {
        "flex" | "cpu" if index.is_none() => Ok(Device::flex()),
        #[cfg(feature = "vulkan")]
        "vulkan" => Ok(Device::vulkan(gpu_kind(index))),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(gpu_kind(index))),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(index_or_0)),
        _ => Err(ModelError::Device(format!(
            "device `{spec}` is not available in this build; available: {} \
             (GPU backends are cargo features: --features vulkan|wgpu|cuda)",
            available().join(", ")
        ))),
    }
}

/// Turns on CubeCL's persistent cache of compiled kernels, which its default configuration leaves
/// off, before the first GPU device opens: without it every process compiles every kernel again
/// (NVRTC on CUDA), and on an H200 the first step of a 134M model had not finished after 170 s.
/// The rest of the configuration is CubeCL's own (a `cubecl.toml` above the working directory,
/// its `CUBECL_*` variables); `LLAMA2_KERNEL_CACHE=0` leaves the cache off. Once per process; a
/// configuration CubeCL has read already is kept. Only with the `kernel-cache` feature (the
/// binaries' GPU features turn it on).
fn enable_kernel_cache() {
    #[cfg(feature = "kernel-cache")]
    {
        use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if std::env::var("LLAMA2_KERNEL_CACHE").is_ok_and(|v| v == "0") {
                return;
            }
            let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
            config.compilation.cache = true;
            let _ = CubeClRuntimeConfig::try_set(config);
        });
    }
}

/// The device the GPU tests run on: `LLAMA2_TEST_GPU` (e.g. `cuda`, `vulkan:1`), else the first
/// GPU backend this build has (cuda, vulkan, wgpu); `None` in a CPU-only build.
pub fn gpu_for_tests() -> Option<String> {
    if let Ok(spec) = std::env::var("LLAMA2_TEST_GPU") {
        return Some(spec);
    }
    let built = [("cuda", cfg!(feature = "cuda")), ("vulkan", cfg!(feature = "vulkan")), ("wgpu", cfg!(feature = "wgpu"))];
    built.into_iter().find(|(_, on)| *on).map(|(name, _)| name.to_string())
}

/// How closely f32 results on the GPU test device `spec` can match exact f32 arithmetic, relative:
/// on CUDA, Burn's matmul autotune runs f32 products on the tensor cores in TF32 (10-bit
/// mantissa, ~1e-3 relative; `burn-cubecl`'s `adjust_dtypes`), so an exact zero came out as
/// -2.8e-4 on an H200; elsewhere f32 is f32. A wrong gradient is off by its own size, far above
/// either.
pub fn f32_tolerance_for_tests(spec: &str) -> f32 {
    if spec.starts_with("cuda") { 5e-3 } else { 1e-4 }
}

/// Whether `spec` names the CPU backend (one device, host memory).
pub fn is_cpu(spec: &str) -> bool {
    spec == "flex" || spec == "cpu"
}

/// Whether `device` is the flex (CPU) backend, with or without autodiff: the backend our fused
/// kernels (`loss`, `attention`) are written for.
pub fn is_flex(device: &Device) -> bool {
    matches!(device.as_dispatch().clone().inner(), burn::backend::DispatchDevice::Flex(_))
}

/// Opens `device` with a one-element computation, so that a missing driver or adapter is a clear
/// error before any work rather than a panic inside the backend's device thread.
pub fn probe(device: &Device, spec: &str) -> Result<(), ModelError> {
    if is_cpu(spec) {
        return Ok(());
    }
    use std::sync::{Arc, Mutex};
    let first_message: Arc<Mutex<Option<String>>> = Arc::default();
    let previous = std::panic::take_hook();
    let sink = first_message.clone();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        sink.lock().unwrap().get_or_insert(text);
    }));
    let d = device.clone();
    let opened = std::panic::catch_unwind(move || burn::tensor::Tensor::<1>::zeros([1], &d).into_data());
    std::panic::set_hook(previous);
    match opened {
        Ok(_) => Ok(()),
        Err(_) => {
            let why = first_message.lock().unwrap().take().unwrap_or_default();
            Err(ModelError::Device(format!(
                "device `{spec}` cannot be opened: {why}. Check the GPU driver (Vulkan: the libvulkan1 loader and the vendor's ICD, `vulkaninfo --summary`; CUDA: nvidia-smi)"
            )))
        }
    }
}

#[cfg(any(feature = "vulkan", feature = "wgpu"))]
fn gpu_kind(index: Option<usize>) -> burn::tensor::DeviceKind {
    match index {
        Some(i) => burn::tensor::DeviceKind::DiscreteGpu(i),
        None => burn::tensor::DeviceKind::DefaultDevice,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_flex_and_rejects_unknown() {
        assert!(super::parse("flex").is_ok());
        let err = super::parse("tpu:0").unwrap_err().to_string();
        assert!(err.contains("tpu:0") && err.contains("flex"), "{err}");
        assert!(super::parse("cuda:x").is_err());
    }
}
