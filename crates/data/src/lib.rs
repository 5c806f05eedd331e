//! Data for every stage: the tokenizer, tokenized Parquet shards (`prepare`), and the streaming
//! packed reader with its resumable cursor. Knows nothing of the model.

pub mod chat;
mod deal;
pub mod prepare;
pub mod prompts;
pub mod reader;
pub mod sampler;
pub mod shards;
pub mod tokenizer;
pub mod tool_markup;

pub use reader::{Cursor, PackedReader, ReaderConfig};
pub use shards::{Manifest, ShardFile, ShardInfo, ShardWriter, Split};
pub use tokenizer::Tokenizer;

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

impl From<std::io::Error> for DataError {
    /// `llama_io`'s errors already name the path (and line).
    fn from(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}
