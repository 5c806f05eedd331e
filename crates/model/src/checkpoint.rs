//! Model checkpoints: which kind a directory holds, a run's checkpoints, and our native format
//! (the Hugging Face adapter is [`crate::hf`], re-exported here).
//!
//! Native: `config.toml` (a `[model]` table) + `model.safetensors` (Burn module paths, Meta's
//! interleaved RoPE layout, Burn's `[d_in, d_out]` linear layout), written by `burn::store`.
//!
//! Every write goes to a temporary file that is renamed into place: an interrupted save never
//! leaves a half-written file under the final name.

use std::path::{Path, PathBuf};

use burn::store::{BurnpackStore, ModuleSnapshot, SafetensorsStore};
use burn::tensor::Device;
use llama_io::{tmp_sibling, write_atomic};

use crate::{Llama, LlamaConfig, ModelError};

pub use crate::hf::{config_from_hf, config_to_hf, load_hf, save_hf};

pub use crate::files::{HF_CONFIG, HF_INDEX, NATIVE_CONFIG, NATIVE_WEIGHTS, NATIVE_WEIGHTS_BURNPACK, write_safetensors};
pub(crate) use crate::files::{ckpt_err, io_err};

/// Which kind of checkpoint a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Native,
    HuggingFace,
}

pub fn detect(dir: &Path) -> Result<Format, ModelError> {
    if !dir.is_dir() {
        return Err(ckpt_err(format!("{}: not a checkpoint directory (it does not exist or is not a directory)", dir.display())));
    }
    if dir.join(NATIVE_CONFIG).is_file() {
        Ok(Format::Native)
    } else if dir.join(HF_CONFIG).is_file() {
        Ok(Format::HuggingFace)
    } else {
        Err(ckpt_err(format!("{}: neither a native checkpoint ({NATIVE_CONFIG}) nor a Hugging Face directory ({HF_CONFIG})", dir.display())))
    }
}

/// The checkpoints in a run's checkpoint folder (`OUT/checkpoints`): its `step-N` directories,
/// oldest first. The name is what makes one complete: a checkpoint is written under a temporary
/// name and renamed to `step-N` only once every file is there, and pruning renames it away
/// before deleting it (`trainer::checkpoint`).
pub fn list_checkpoints(folder: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(folder) else { return vec![] };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().to_string_lossy().strip_prefix("step-")?.parse().ok()?, e.path())))
        .collect();
    found.sort();
    found
}

/// A training run directory (`OUT/checkpoints/step-N/`) resolves to its newest checkpoint.
pub fn resolve(dir: &Path) -> PathBuf {
    list_checkpoints(&dir.join("checkpoints")).pop().map_or_else(|| dir.to_path_buf(), |(_, newest)| newest)
}

/// Loads either kind of checkpoint directory (or a run directory's newest checkpoint), or a
/// GGUF file (llama.cpp's; its weights dequantized): wherever a model is expected (`init`,
/// `--checkpoint`, `--policy`), a `.gguf` file serves as a directory does.
pub fn load(dir: &Path, device: &Device) -> Result<(LlamaConfig, Llama), ModelError> {
    if crate::gguf::is_gguf(dir) {
        let (config, model, _) = crate::gguf::load_gguf(dir, device)?;
        return Ok((config, model));
    }
    let dir = &resolve(dir);
    match detect(dir)? {
        Format::Native => load_native(dir, device),
        Format::HuggingFace => load_hf(dir, device),
    }
}

/// The config of what [`load`] would load, read without the weights (a launch check needs the
/// model's shape before anything large is read).
pub fn load_config(dir: &Path) -> Result<LlamaConfig, ModelError> {
    if crate::gguf::is_gguf(dir) {
        return crate::gguf::gguf_config(dir);
    }
    let dir = &resolve(dir);
    match detect(dir)? {
        Format::Native => LlamaConfig::from_toml_file(&dir.join(NATIVE_CONFIG)),
        Format::HuggingFace => crate::hf::hf_config(dir),
    }
}

// ---------------------------------------------------------------------------------------------
// Native

/// Saves `model` and its config as a native checkpoint directory (created if needed).
pub fn save_native(model: &Llama, config: &LlamaConfig, dir: &Path) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    save_weights(model, &dir.join(NATIVE_WEIGHTS))?;
    let mut table = toml::Table::new();
    table.insert("model".into(), toml::Value::try_from(config).map_err(|e| ckpt_err(e.to_string()))?);
    let text = toml::to_string(&table).map_err(|e| ckpt_err(e.to_string()))?;
    Ok(write_atomic(&dir.join(NATIVE_CONFIG), text.as_bytes())?)
}

/// Saves a module's parameters alone, atomically: burnpack when the path ends in `.bpk` (it
/// keeps parameter ids, so optimizer state saved beside it stays attached on resume), safetensors
/// otherwise (Burn module paths as tensor names).
pub fn save_weights<M: ModuleSnapshot>(model: &M, path: &Path) -> Result<(), ModelError> {
    let tmp = tmp_sibling(path);
    let result = if is_burnpack(path) {
        let mut store = BurnpackStore::from_file(&tmp).overwrite(true).auto_extension(false).metadata("format", "llama2-rs");
        model.save_into(&mut store).map_err(|e| e.to_string())
    } else {
        let mut store = SafetensorsStore::from_file(&tmp).overwrite(true).metadata("format", "llama2-rs");
        model.save_into(&mut store).map_err(|e| e.to_string())
    };
    result.map_err(|e| ckpt_err(format!("{}: cannot save weights: {e}", path.display())))?;
    // Burn's stores create the file readable by its owner only (0600); a model directory is
    // shared like any other output, so it gets the mode `File::create` gives the files beside it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(|e| io_err(path, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

fn is_burnpack(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "bpk")
}

/// Loads a native checkpoint directory.
pub fn load_native(dir: &Path, device: &Device) -> Result<(LlamaConfig, Llama), ModelError> {
    let config = LlamaConfig::from_toml_file(&dir.join(NATIVE_CONFIG))?;
    config.check_host_memory(device, &dir.join(NATIVE_CONFIG).display().to_string())?;
    let mut model = config.init_lazy(device);
    let weights = if dir.join(NATIVE_WEIGHTS).is_file() { dir.join(NATIVE_WEIGHTS) } else { dir.join(NATIVE_WEIGHTS_BURNPACK) };
    load_weights(&mut model, &weights)?;
    Ok((config, model))
}

/// Loads a weights file (burnpack `.bpk` or safetensors) into `model`, requiring every parameter
/// to be present with exactly the model's shape: a checkpoint of another config is an error
/// naming the tensor.
pub fn load_weights<M: ModuleSnapshot>(model: &mut M, path: &Path) -> Result<(), ModelError> {
    if !path.is_file() {
        return Err(ckpt_err(format!("{}: weights file not found", path.display())));
    }
    let result = if is_burnpack(path) {
        let mut store = BurnpackStore::from_file(path).auto_extension(false).allow_partial(true).validate(false);
        model.load_from(&mut store).map_err(|e| e.to_string())
    } else {
        let mut store = SafetensorsStore::from_file(path).allow_partial(true).validate(false);
        model.load_from(&mut store).map_err(|e| e.to_string())
    };
    let result = result.map_err(|e| ckpt_err(format!("{}: cannot read weights: {e}", path.display())))?;
    let mut problems: Vec<String> = result.errors.iter().map(|e| format!("{e}")).collect();
    problems.extend(result.missing.iter().map(|(p, _)| format!("missing tensor `{p}`")));
    problems.extend(result.unused.iter().map(|p| format!("unexpected tensor `{p}`")));
    if !problems.is_empty() {
        let shown = problems.iter().take(6).cloned().collect::<Vec<_>>().join("; ");
        let more = if problems.len() > 6 { format!(" (and {} more)", problems.len() - 6) } else { String::new() };
        return Err(ckpt_err(format!("{}: checkpoint does not match the model's config: {shown}{more}", path.display())));
    }
    check_finite(model, &path.display().to_string())
}

/// Refuses a model with a NaN or infinite weight, naming the first such tensor: every loader
/// calls it, so such a file never yields an empty or plausible-but-wrong answer. One reduction
/// per tensor (`0 * w` sums to NaN exactly when some `w` is not finite) and one read back.
pub fn check_finite<M: burn::module::Module>(model: &M, origin: &str) -> Result<(), ModelError> {
    #[derive(Default)]
    struct Sums {
        path: Vec<String>,
        names: Vec<String>,
        sums: Vec<burn::tensor::Tensor<1>>,
    }
    impl burn::module::ModuleVisitor for Sums {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<D>>) {
            self.names.push(self.path.join("."));
            self.sums.push(param.val().cast(burn::tensor::DType::F32).mul_scalar(0.0).sum());
        }
    }
    let mut sums = Sums::default();
    model.visit(&mut sums);
    if sums.sums.is_empty() {
        return Ok(());
    }
    let values = burn::tensor::Tensor::cat(sums.sums, 0).into_data().try_to_vec::<f32>().map_err(|e| ckpt_err(format!("{origin}: {e:?}")))?;
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(ckpt_err(format!("{origin}: tensor `{}` holds NaN or infinite values", sums.names[i]))),
        None => Ok(()),
    }
}
