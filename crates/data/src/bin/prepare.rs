//! `prepare`: tokenize text into Parquet shards that the training stages stream from.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Parser;
use llama_data::prepare::{PrepareConfig, TxtDocs, documents, prepare};
use llama_data::{Split, Tokenizer};

/// Tokenize plain text (.txt), JSONL (.jsonl, a text field) or Parquet (a text column) into
/// zstd Parquet shards (`input_ids: list<uint32>`, one row per document) with a manifest and a
/// held-out validation split. Optionally train the BPE tokenizer (byte fallback, Llama ids:
/// <unk>=0, <s>=1, </s>=2) on the same inputs first.
#[derive(Parser)]
#[command(name = "prepare", version)]
struct Cli {
    /// Input files or directories; repeat for several.
    #[arg(long, required = true)]
    input: Vec<PathBuf>,
    /// Output directory for the shards and manifest.json.
    #[arg(long)]
    out: PathBuf,
    /// tokenizer.json to use (or to write, with --train-tokenizer).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Train a tokenizer of this vocabulary size on the inputs and save it to --tokenizer first.
    #[arg(long, value_name = "VOCAB")]
    train_tokenizer: Option<usize>,
    /// JSONL field or Parquet column holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// How .txt files are cut into documents.
    #[arg(long, value_enum, default_value_t = TxtDocs::File)]
    txt_docs: TxtDocs,
    /// Share of documents held out for validation.
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Tokens per shard before starting the next file.
    #[arg(long, default_value_t = 50_000_000)]
    shard_tokens: u64,
    /// Documents per Parquet row group (the unit the reader streams and shuffles).
    #[arg(long, default_value_t = 64)]
    row_group_docs: usize,
    /// Replace an existing output directory (and an existing tokenizer with --train-tokenizer).
    #[arg(long)]
    overwrite: bool,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let config = PrepareConfig {
        text_field: cli.text_field.clone(),
        txt_docs: cli.txt_docs,
        val_fraction: cli.val_fraction,
        shard_tokens: cli.shard_tokens,
        row_group_docs: cli.row_group_docs,
        overwrite: cli.overwrite,
        show_progress: true,
        ..PrepareConfig::new(cli.input.clone(), cli.out.clone())
    };
    config.validate()?;
    let tokenizer = match cli.train_tokenizer {
        Some(vocab) => {
            if cli.tokenizer.exists() && !cli.overwrite {
                bail!("{} exists; pass --overwrite to replace it", cli.tokenizer.display());
            }
            let docs = documents(&cli.input, &cli.text_field, cli.txt_docs)?;
            eprintln!("training a {vocab}-token BPE tokenizer on {} documents", docs.len());
            let tok = Tokenizer::train(docs.iter(), vocab).with_context(|| format!("--train-tokenizer {vocab}"))?;
            if let Some(dir) = cli.tokenizer.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            tok.save(&cli.tokenizer)?;
            eprintln!("wrote {} (vocab {}, {})", cli.tokenizer.display(), tok.vocab_size(), tok.fingerprint());
            tok
        }
        None => Tokenizer::from_file(&cli.tokenizer)?,
    };
    let m = prepare(&config, &tokenizer)?;
    for split in [Split::Train, Split::Val] {
        let shards = m.split(split);
        println!("{:<5} {} shards, {} documents, {} tokens", split.name(), shards.len(), shards.iter().map(|s| s.documents).sum::<u64>(), m.tokens(split));
    }
    println!("wrote {}", cli.out.display());
    Ok(())
}
