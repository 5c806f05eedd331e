//! What every checkpoint format shares ([`crate::checkpoint`] native, [`crate::hf`],
//! [`crate::gguf`]): the file names, errors naming the file, and the atomic safetensors write.

use std::collections::HashMap;
use std::path::Path;

use llama_io::tmp_sibling;

use crate::ModelError;

pub const NATIVE_CONFIG: &str = "config.toml";
pub const NATIVE_WEIGHTS: &str = "model.safetensors";
/// Training checkpoints keep burnpack weights (parameter ids preserved for the optimizer).
pub const NATIVE_WEIGHTS_BURNPACK: &str = "model.bpk";
pub const HF_CONFIG: &str = "config.json";
pub const HF_INDEX: &str = "model.safetensors.index.json";

pub(crate) fn ckpt_err(msg: impl Into<String>) -> ModelError {
    ModelError::Checkpoint(msg.into())
}

pub(crate) fn io_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Io(format!("{}: {e}", path.display()))
}

/// Writes a safetensors file through a temporary sibling and a rename, readable by all (0644, as
/// the other files; the safetensors crate creates its files 0600).
pub fn write_safetensors<'a, V: safetensors::View + 'a>(
    tensors: Vec<(String, V)>,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<(), ModelError> {
    let tmp = tmp_sibling(path);
    safetensors::tensor::serialize_to_file(tensors, metadata, &tmp).map_err(|e| ckpt_err(format!("{}: cannot write: {e}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}
