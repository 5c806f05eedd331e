//! `prepare`: text (plain, JSONL, Parquet) -> tokenized Parquet shards with a manifest.
//!
//! Memory stays bounded whatever the corpus size: documents are read lazily, tokenized in
//! batches (in parallel, by `tokenizers`' rayon pool) and written out row group by row group.
//! Every `round(1 / val_fraction)`-th document goes to the validation split (deterministic).
//! The shards are written into a temporary directory that replaces the output only at the end.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_schema::DataType;
use indicatif::{ProgressBar, ProgressStyle};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::shards::{FORMAT, MANIFEST, Manifest, ShardWriter, Split};
use crate::{DataError, Tokenizer};

/// How plain `.txt` files are cut into documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TxtDocs {
    /// The whole file is one document.
    File,
    /// Paragraphs separated by blank lines are documents.
    BlankLine,
    /// Every non-empty line is a document.
    Line,
}

#[derive(Debug, Clone)]
pub struct PrepareConfig {
    /// Files or directories (searched for .txt, .jsonl, .parquet).
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    /// JSONL field / Parquet column holding the text.
    pub text_field: String,
    pub txt_docs: TxtDocs,
    /// Share of documents held out for validation (0 disables the split).
    pub val_fraction: f64,
    /// Roll to a new shard after this many tokens.
    pub shard_tokens: u64,
    /// Documents per Parquet row group (the reader's unit of streaming and shuffling).
    pub row_group_docs: usize,
    /// Replace an output directory that already holds shards.
    pub overwrite: bool,
    pub show_progress: bool,
}

impl PrepareConfig {
    pub fn new(inputs: Vec<PathBuf>, out: PathBuf) -> Self {
        Self {
            inputs,
            out,
            text_field: "text".into(),
            txt_docs: TxtDocs::File,
            val_fraction: 0.05,
            shard_tokens: 50_000_000,
            row_group_docs: 64,
            overwrite: false,
            show_progress: true,
        }
    }
}

/// Expands directories into their supported files, sorted; refuses unknown extensions.
pub fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let supported = |p: &Path| matches!(p.extension().and_then(|e| e.to_str()), Some("txt" | "jsonl" | "json" | "parquet"));
    let mut files = vec![];
    for input in inputs {
        if input.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|e| DataError::Io(format!("{}: {e}", input.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && supported(p))
                .collect();
            found.sort();
            files.extend(found);
        } else if input.is_file() {
            if !supported(input) {
                return Err(DataError::Config(format!("{}: unsupported input; expected .txt, .jsonl or .parquet", input.display())));
            }
            files.push(input.clone());
        } else {
            return Err(DataError::Io(format!("{}: input not found", input.display())));
        }
    }
    if files.is_empty() {
        return Err(DataError::Empty("no input files (.txt, .jsonl, .parquet) found".into()));
    }
    Ok(files)
}

/// Calls `f` with every document of `path`, in order.
pub fn for_each_document(path: &Path, text_field: &str, txt_docs: TxtDocs, f: &mut dyn FnMut(String) -> Result<(), DataError>) -> Result<(), DataError> {
    let io = |e: std::io::Error| DataError::Io(format!("{}: {e}", path.display()));
    match path.extension().and_then(|e| e.to_str()) {
        Some("txt") => {
            let reader = BufReader::new(File::open(path).map_err(io)?);
            let mut paragraph = String::new();
            let mut whole = String::new();
            for (n, line) in reader.lines().enumerate() {
                let line = line.map_err(|e| DataError::Input(format!("{}:{}: {e}", path.display(), n + 1)))?;
                let line = if n == 0 { llama_io::without_bom(&line).to_string() } else { line };
                match txt_docs {
                    TxtDocs::Line if !line.trim().is_empty() => f(line)?,
                    TxtDocs::Line => {}
                    TxtDocs::BlankLine if line.trim().is_empty() => {
                        if !paragraph.is_empty() {
                            f(std::mem::take(&mut paragraph))?;
                        }
                    }
                    TxtDocs::BlankLine => {
                        if !paragraph.is_empty() {
                            paragraph.push('\n');
                        }
                        paragraph.push_str(&line);
                    }
                    TxtDocs::File => {
                        whole.push_str(&line);
                        whole.push('\n');
                    }
                }
            }
            if !paragraph.is_empty() {
                f(paragraph)?;
            }
            if !whole.trim().is_empty() {
                f(whole)?;
            }
            Ok(())
        }
        Some("jsonl" | "json") => {
            for line in llama_io::read_jsonl(path)? {
                let llama_io::JsonLine { at, value, .. } = line?;
                match value.get(text_field) {
                    Some(serde_json::Value::String(s)) => f(s.clone())?,
                    Some(other) => return Err(DataError::Input(format!("{at}: field `{text_field}` is {other}, not a string"))),
                    None => return Err(DataError::Input(format!("{at}: no `{text_field}` field"))),
                }
            }
            Ok(())
        }
        Some("parquet") => {
            let err = |m: String| DataError::Input(format!("{}: {m}", path.display()));
            let builder =
                ParquetRecordBatchReaderBuilder::try_new(File::open(path).map_err(io)?).map_err(|e| err(format!("not a readable Parquet file: {e}")))?;
            let (index, field) = builder.schema().column_with_name(text_field).ok_or_else(|| err(format!("no `{text_field}` column")))?;
            if !matches!(field.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
                return Err(err(format!("column `{text_field}` has type {}; expected a string", field.data_type())));
            }
            let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
            let reader = builder.with_projection(mask).with_batch_size(1024).build().map_err(|e| err(e.to_string()))?;
            let mut row = 0;
            for batch in reader {
                let batch = batch.map_err(|e| err(e.to_string()))?;
                let col = batch.column(0);
                for i in 0..col.len() {
                    row += 1;
                    if col.is_null(i) {
                        return Err(err(format!("row {}: `{text_field}` is null", row - 1)));
                    }
                    let s = match col.data_type() {
                        DataType::Utf8 => col.as_string::<i32>().value(i).to_string(),
                        DataType::LargeUtf8 => col.as_string::<i64>().value(i).to_string(),
                        _ => col.as_string_view().value(i).to_string(),
                    };
                    f(s)?;
                }
            }
            Ok(())
        }
        _ => Err(DataError::Config(format!("{}: unsupported input", path.display()))),
    }
}

impl PrepareConfig {
    /// The settings' ranges, named as `prepare`'s flags.
    pub fn validate(&self) -> Result<(), DataError> {
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(DataError::Config(format!("--val-fraction {}: must be in [0, 1)", self.val_fraction)));
        }
        if self.shard_tokens == 0 || self.row_group_docs == 0 {
            return Err(DataError::Config(format!("--shard-tokens ({}) and --row-group-docs ({}) must be > 0", self.shard_tokens, self.row_group_docs)));
        }
        Ok(())
    }
}

/// Tokenizes `config.inputs` into shards under `config.out`; returns the manifest written.
pub fn prepare(config: &PrepareConfig, tokenizer: &Tokenizer) -> Result<Manifest, DataError> {
    config.validate()?;
    let files = input_files(&config.inputs)?;
    let replaced = check_output_dir(&config.out, config.overwrite)?;
    let parent = config.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| DataError::Io(format!("{}: {e}", parent.display())))?;
    let tmp = llama_io::tmp_sibling(&config.out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| DataError::Io(format!("{}: {e}", tmp.display())))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| DataError::Io(format!("{}: {e}", tmp.display())))?;
    let result = write_shards(config, tokenizer, &files, &tmp);
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if config.out.exists() {
        // Only what the check above found there: our own files (or nothing).
        for file in &replaced {
            let path = config.out.join(file);
            std::fs::remove_file(&path).map_err(|e| DataError::Io(format!("{}: {e}", path.display())))?;
        }
        std::fs::remove_dir(&config.out).map_err(|e| DataError::Io(format!("{}: cannot replace it: {e}", config.out.display())))?;
    }
    std::fs::rename(&tmp, &config.out).map_err(|e| DataError::Io(format!("{}: {e}", config.out.display())))?;
    Ok(manifest)
}

/// Checks, before any work, that `out` may receive a shard directory: it does not exist, or is an
/// empty directory, or (with `overwrite`) is a shard directory `prepare` wrote that holds nothing
/// else. Returns the files to remove when replacing it. Anything else is refused, naming it: a
/// directory we did not write is never emptied.
fn check_output_dir(out: &Path, overwrite: bool) -> Result<Vec<String>, DataError> {
    if out.file_name().is_none() {
        return Err(DataError::Config(format!("--out {}: name a directory of its own for the shards (e.g. data/shards/mine)", out.display())));
    }
    if !out.exists() {
        return Ok(vec![]);
    }
    if !out.is_dir() {
        return Err(DataError::Config(format!("--out {} exists and is not a directory", out.display())));
    }
    let entries: Vec<String> = std::fs::read_dir(out)
        .and_then(|dir| dir.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned())).collect())
        .map_err(|e| DataError::Io(format!("{}: {e}", out.display())))?;
    if entries.is_empty() {
        return Ok(vec![]);
    }
    let Ok(manifest) = Manifest::load(out) else {
        return Err(DataError::Config(format!(
            "--out {} exists and is not a shard directory written by prepare (no valid {MANIFEST}); choose a new or empty directory",
            out.display()
        )));
    };
    if !overwrite {
        return Err(DataError::Config(format!("{} already holds shards; pass --overwrite to replace them", out.display())));
    }
    let ours: std::collections::HashSet<&str> = manifest.train.iter().chain(&manifest.val).map(|s| s.file.as_str()).chain([MANIFEST]).collect();
    let foreign: Vec<&str> = entries.iter().map(String::as_str).filter(|e| !ours.contains(e)).collect();
    if !foreign.is_empty() {
        return Err(DataError::Config(format!(
            "{} holds files prepare did not write ({}); --overwrite replaces only a shard directory's own files: move them or choose another --out",
            out.display(),
            foreign.join(", ")
        )));
    }
    Ok(entries)
}

fn write_shards(config: &PrepareConfig, tokenizer: &Tokenizer, files: &[PathBuf], dir: &Path) -> Result<Manifest, DataError> {
    let total_bytes: u64 = files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
    let bar = if config.show_progress { ProgressBar::new(total_bytes) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} tokenizing [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let period = if config.val_fraction > 0.0 { (1.0 / config.val_fraction).round().max(2.0) as u64 } else { u64::MAX };
    let mut train = ShardWriter::new(dir, Split::Train, config.shard_tokens, config.row_group_docs);
    let mut val = ShardWriter::new(dir, Split::Val, config.shard_tokens, config.row_group_docs);
    let mut pending: Vec<String> = vec![];
    let mut doc_index = 0u64;
    let batch_docs = 256;
    let mut flush = |pending: &mut Vec<String>, train: &mut ShardWriter, val: &mut ShardWriter| -> Result<(), DataError> {
        let texts: Vec<&str> = pending.iter().map(String::as_str).collect();
        let encoded = tokenizer.encode_batch(&texts)?;
        for (text, ids) in pending.iter().zip(encoded) {
            bar.inc(text.len() as u64);
            if doc_index % period == period - 1 {
                val.write(ids)?
            } else {
                train.write(ids)?
            }
            doc_index += 1;
        }
        bar.set_message(format!("{doc_index} docs"));
        pending.clear();
        Ok(())
    };
    for file in files {
        for_each_document(file, &config.text_field, config.txt_docs, &mut |text| {
            pending.push(text);
            if pending.len() >= batch_docs {
                flush(&mut pending, &mut train, &mut val)?;
            }
            Ok(())
        })?;
    }
    flush(&mut pending, &mut train, &mut val)?;
    bar.finish_and_clear();
    let (train, val) = (train.finish()?, val.finish()?);
    if train.iter().map(|s| s.documents).sum::<u64>() == 0 {
        let names: Vec<String> = config.inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(DataError::Empty(format!("{}: no documents (no non-empty `{}` text)", names.join(", "), config.text_field)));
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        tokenizer_fingerprint: tokenizer.fingerprint().into(),
        vocab_size: tokenizer.vocab_size(),
        bos_id: tokenizer.bos_id(),
        eos_id: tokenizer.eos_id(),
        train,
        val,
        sources: files.iter().map(|f| f.display().to_string()).collect(),
    };
    manifest.save(dir)?;
    Ok(manifest)
}

/// Reads every document of the inputs (for tokenizer training), streaming.
pub fn documents(inputs: &[PathBuf], text_field: &str, txt_docs: TxtDocs) -> Result<Vec<String>, DataError> {
    let mut docs = vec![];
    for file in input_files(inputs)? {
        for_each_document(&file, text_field, txt_docs, &mut |t| {
            docs.push(t);
            Ok(())
        })?;
    }
    Ok(docs)
}
