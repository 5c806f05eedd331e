//! Tokenized Parquet shards: the manifest, the writer, and row-group reads.
//!
//! A shard is a Parquet file with one row per document and one column, `input_ids`, a list of
//! token ids (we write `list<uint32>`, zstd; we read list or large list of int32, int64, uint16 or
//! uint32, as pyarrow and `datasets` write them). A directory of shards carries `manifest.json`:
//! the tokenizer's fingerprint and vocab size, and documents and tokens per shard and split.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, UInt16Type, UInt32Type};
use arrow_array::{Array, ArrayRef, ListArray, RecordBatch, UInt32Array};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::DataError;

pub const COLUMN: &str = "input_ids";
pub const MANIFEST: &str = "manifest.json";

/// What `prepare` wrote, and what a reader checks against its tokenizer and model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub tokenizer_fingerprint: String,
    pub vocab_size: usize,
    pub bos_id: u32,
    pub eos_id: u32,
    pub train: Vec<ShardInfo>,
    pub val: Vec<ShardInfo>,
    /// Where the text came from (input paths), for the record.
    #[serde(default)]
    pub sources: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// File name relative to the manifest's directory.
    pub file: String,
    pub documents: u64,
    pub tokens: u64,
}

pub const FORMAT: &str = "llama2-rs-shards-v1";

impl Manifest {
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::Io(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| DataError::Shard(format!("{}: invalid manifest: {e}", path.display())))
    }

    pub fn save(&self, dir: &Path) -> Result<(), DataError> {
        let json = serde_json::to_string_pretty(self).expect("manifest serialises");
        Ok(llama_io::write_atomic(&dir.join(MANIFEST), json.as_bytes())?)
    }

    pub fn tokens(&self, split: Split) -> u64 {
        self.split(split).iter().map(|s| s.tokens).sum()
    }

    pub fn split(&self, split: Split) -> &[ShardInfo] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Refuses shards made with another tokenizer than the one a run uses.
    pub fn check_tokenizer(&self, fingerprint: &str, vocab_size: usize, dir: &Path) -> Result<(), DataError> {
        if self.tokenizer_fingerprint != fingerprint || self.vocab_size != vocab_size {
            return Err(DataError::Shard(format!(
                "{}: shards were made with tokenizer {} (vocab {}), but this run's tokenizer is {} (vocab {}); re-run prepare",
                dir.join(MANIFEST).display(),
                self.tokenizer_fingerprint,
                self.vocab_size,
                fingerprint,
                vocab_size
            )));
        }
        Ok(())
    }
}

/// Train or held-out validation documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// Writes documents into numbered shards `{split}-00000.parquet`, rolling to a new file after
/// `shard_tokens` tokens; each file is written under a temporary name and renamed when closed.
pub struct ShardWriter {
    dir: PathBuf,
    split: Split,
    shard_tokens: u64,
    row_group_docs: usize,
    current: Option<(ArrowWriter<File>, PathBuf, ShardInfo)>,
    pending: Vec<Vec<u32>>,
    pub shards: Vec<ShardInfo>,
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![Field::new(COLUMN, DataType::List(Arc::new(Field::new("item", DataType::UInt32, false))), false)]))
}

impl ShardWriter {
    pub fn new(dir: &Path, split: Split, shard_tokens: u64, row_group_docs: usize) -> Self {
        Self {
            dir: dir.to_path_buf(),
            split,
            shard_tokens: shard_tokens.max(1),
            row_group_docs: row_group_docs.max(1),
            current: None,
            pending: vec![],
            shards: vec![],
        }
    }

    pub fn write(&mut self, doc: Vec<u32>) -> Result<(), DataError> {
        if self.current.is_none() {
            let file = format!("{}-{:05}.parquet", self.split.name(), self.shards.len());
            let tmp = self.dir.join(format!(".{file}.tmp"));
            let handle = File::create(&tmp).map_err(|e| DataError::Io(format!("{}: {e}", tmp.display())))?;
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("valid level")))
                .set_max_row_group_row_count(Some(self.row_group_docs))
                .build();
            let writer = ArrowWriter::try_new(handle, schema(), Some(props)).map_err(|e| DataError::Shard(format!("{file}: {e}")))?;
            self.current = Some((writer, tmp, ShardInfo { file, documents: 0, tokens: 0 }));
        }
        let (_, _, info) = self.current.as_mut().expect("opened above");
        info.documents += 1;
        info.tokens += doc.len() as u64;
        let full = info.tokens >= self.shard_tokens;
        self.pending.push(doc);
        if self.pending.len() >= self.row_group_docs || full {
            self.flush_pending()?;
        }
        if full {
            self.close_current()?;
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<(), DataError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let (writer, _, info) = self.current.as_mut().expect("a shard is open while docs are pending");
        let docs = std::mem::take(&mut self.pending);
        let batch = RecordBatch::try_new(schema(), vec![list_array(&docs)]).map_err(|e| DataError::Shard(format!("{}: {e}", info.file)))?;
        writer.write(&batch).map_err(|e| DataError::Shard(format!("{}: {e}", info.file)))?;
        writer.flush().map_err(|e| DataError::Shard(format!("{}: {e}", info.file)))
    }

    fn close_current(&mut self) -> Result<(), DataError> {
        self.flush_pending()?;
        if let Some((writer, tmp, info)) = self.current.take() {
            writer.close().map_err(|e| DataError::Shard(format!("{}: {e}", info.file)))?;
            let dest = self.dir.join(&info.file);
            std::fs::rename(&tmp, &dest).map_err(|e| DataError::Io(format!("{}: {e}", dest.display())))?;
            self.shards.push(info);
        }
        Ok(())
    }

    /// Closes the open shard and returns the list of shards written.
    pub fn finish(mut self) -> Result<Vec<ShardInfo>, DataError> {
        self.close_current()?;
        Ok(self.shards)
    }
}

fn list_array(docs: &[Vec<u32>]) -> ArrayRef {
    let mut offsets = Vec::with_capacity(docs.len() + 1);
    offsets.push(0i32);
    let mut values = Vec::with_capacity(docs.iter().map(Vec::len).sum());
    for d in docs {
        values.extend_from_slice(d);
        offsets.push(values.len() as i32);
    }
    let field = Arc::new(Field::new("item", DataType::UInt32, false));
    Arc::new(ListArray::new(field, arrow_buffer::OffsetBuffer::new(offsets.into()), Arc::new(UInt32Array::from(values)), None))
}

/// One open shard: its path and row-group sizes, after checking the column and its type.
#[derive(Debug, Clone)]
pub struct ShardFile {
    pub path: PathBuf,
    /// Documents in each row group.
    pub row_groups: Vec<usize>,
    column: usize,
}

impl ShardFile {
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let err = |m: String| DataError::Shard(format!("{}: {m}", path.display()));
        let file = File::open(path).map_err(|e| DataError::Io(format!("{}: {e}", path.display())))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(format!("not a readable Parquet file: {e}")))?;
        let schema = builder.schema();
        let (column, field) = schema.column_with_name(COLUMN).ok_or_else(|| {
            err(format!("no `{COLUMN}` column (columns: {})", schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")))
        })?;
        let item = match field.data_type() {
            DataType::List(item) | DataType::LargeList(item) => item.data_type().clone(),
            other => return Err(err(format!("column `{COLUMN}` has type {other}; expected a list of integers"))),
        };
        if !matches!(item, DataType::Int32 | DataType::Int64 | DataType::UInt16 | DataType::UInt32) {
            return Err(err(format!("column `{COLUMN}` holds {item}; expected int32, int64, uint16 or uint32 token ids")));
        }
        let row_groups = builder.metadata().row_groups().iter().map(|rg| rg.num_rows() as usize).collect();
        Ok(Self { path: path.to_path_buf(), row_groups, column })
    }

    pub fn documents(&self) -> usize {
        self.row_groups.iter().sum()
    }

    /// Reads the documents of row group `rg`, checking every id against `vocab_size`.
    pub fn read_row_group(&self, rg: usize, vocab_size: usize) -> Result<Vec<Vec<u32>>, DataError> {
        let err = |m: String| DataError::Shard(format!("{}: {m}", self.path.display()));
        let file = File::open(&self.path).map_err(|e| DataError::Io(format!("{}: {e}", self.path.display())))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(format!("not a readable Parquet file: {e}")))?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), [self.column]);
        let reader = builder.with_row_groups(vec![rg]).with_projection(mask).with_batch_size(8192).build().map_err(|e| err(e.to_string()))?;
        let first_row: usize = self.row_groups[..rg].iter().sum();
        let mut docs = Vec::with_capacity(self.row_groups[rg]);
        for batch in reader {
            let batch = batch.map_err(|e| err(format!("row group {rg}: {e}")))?;
            let col = batch.column(0);
            for i in 0..col.len() {
                let row = first_row + docs.len();
                if col.is_null(i) {
                    return Err(err(format!("row {row}: `{COLUMN}` is null")));
                }
                let doc = list_values(col.as_ref(), i).map_err(|m| err(format!("row group {rg}, row {row}: {m}")))?;
                if let Some(&bad) = doc.iter().find(|&&t| t as usize >= vocab_size) {
                    return Err(err(format!("row {row}: token id {bad} is outside the vocabulary (size {vocab_size})")));
                }
                docs.push(doc);
            }
        }
        Ok(docs)
    }
}

/// The ids of list entry `i`, whatever the list and integer types.
fn list_values(col: &dyn Array, i: usize) -> Result<Vec<u32>, String> {
    let values: ArrayRef = match col.data_type() {
        DataType::List(_) => col.as_list::<i32>().value(i),
        DataType::LargeList(_) => col.as_list::<i64>().value(i),
        other => return Err(format!("unexpected type {other}")),
    };
    // The values' own nulls (the validity bitmap) are not ids: their slots hold arbitrary numbers.
    if let Some(j) = (0..values.len()).find(|&j| values.is_null(j)) {
        return Err(format!("token {j} of the document is null"));
    }
    fn convert<T: TryInto<u32> + Copy + std::fmt::Display>(v: &[T]) -> Result<Vec<u32>, String> {
        v.iter().map(|&x| x.try_into().map_err(|_| format!("token id {x} is not a valid id"))).collect()
    }
    match values.data_type() {
        DataType::UInt32 => Ok(values.as_primitive::<UInt32Type>().values().to_vec()),
        DataType::UInt16 => Ok(values.as_primitive::<UInt16Type>().values().iter().map(|&x| x as u32).collect()),
        DataType::Int32 => convert(values.as_primitive::<Int32Type>().values()),
        DataType::Int64 => convert(values.as_primitive::<Int64Type>().values()),
        other => Err(format!("unexpected id type {other}")),
    }
}

/// The shard files of one split of a directory: from the manifest when there is one, else every
/// `{split}-*.parquet`, else (for directories written by others) every `*.parquet`.
pub fn split_files(dir: &Path, split: Split) -> Result<Vec<PathBuf>, DataError> {
    if !dir.is_dir() {
        return Err(DataError::Shard(format!("{}: shard directory not found", dir.display())));
    }
    if dir.join(MANIFEST).is_file() {
        let manifest = Manifest::load(dir)?;
        return Ok(manifest.split(split).iter().map(|s| dir.join(&s.file)).collect());
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::Io(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    all.sort();
    let prefix = format!("{}-", split.name());
    let named: Vec<PathBuf> = all.iter().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix))).cloned().collect();
    Ok(if named.is_empty() { all } else { named })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list entry marked null by the values' validity bitmap is refused, naming the row group
    /// and row, not read as the arbitrary number its slot holds.
    #[test]
    fn null_token_ids_are_refused_with_their_row() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("train-00000.parquet");
        let ids = ListArray::from_iter_primitive::<UInt32Type, _, _>([Some(vec![Some(1), Some(5), Some(2)]), Some(vec![Some(1), None, Some(2)])]);
        let schema = Arc::new(Schema::new(vec![Field::new(COLUMN, ids.data_type().clone(), false)]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ids)]).unwrap();
        let mut writer = ArrowWriter::try_new(File::create(&path).unwrap(), schema, None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let shard = ShardFile::open(&path).unwrap();
        let err = shard.read_row_group(0, 100).unwrap_err().to_string();
        assert!(err.contains("train-00000.parquet") && err.contains("row group 0, row 1") && err.contains("null"), "{err}");
    }
}
