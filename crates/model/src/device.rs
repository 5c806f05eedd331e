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

/// Parses `flex`, `vulkan`, `vulkan:1`, `wgpu`, `cuda`, `cuda:0`, ... into a Burn device.
pub fn parse(spec: &str) -> Result<Device, ModelError> {
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => {
            let i: usize = i.parse().map_err(|_| ModelError::Device(format!("device `{spec}`: `{i}` is not a device index (expected e.g. cuda:0)")))?;
            (k, Some(i))
        }
        None => (spec, None),
    };
    #[allow(unused_variables)]
    let index_or_0 = index.unwrap_or(0);
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

/// The device the GPU tests run on: `LLAMA2_TEST_GPU` (e.g. `cuda`, `vulkan:1`), else the first
/// GPU backend this build has (cuda, vulkan, wgpu); `None` in a CPU-only build.
pub fn gpu_for_tests() -> Option<String> {
    if let Ok(spec) = std::env::var("LLAMA2_TEST_GPU") {
        return Some(spec);
    }
    let built = [("cuda", cfg!(feature = "cuda")), ("vulkan", cfg!(feature = "vulkan")), ("wgpu", cfg!(feature = "wgpu"))];
    built.into_iter().find(|(_, on)| *on).map(|(name, _)| name.to_string())
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
