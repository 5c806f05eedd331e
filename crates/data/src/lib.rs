//! Data for every stage: the tokenizer, tokenized Parquet shards (`prepare`), and the streaming
//! packed reader with its resumable cursor. Knows nothing of the model.

pub mod chat;
pub mod prepare;
pub mod reader;
pub mod shards;
pub mod tokenizer;

pub use reader::{Cursor, PackedReader, ReaderConfig};
pub use shards::{Manifest, ShardFile, ShardInfo, ShardWriter, Split};
pub use tokenizer::Tokenizer;

use std::path::Path;

/// Errors of the data crate; messages name the file (and line or row where it applies).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Tokenizer(String),
    #[error("{0}")]
    Shard(String),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Empty(String),
}

/// Writes `bytes` to `path` through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| DataError::Io(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| DataError::Io(format!("{}: {e}", path.display())))
}
