//! Throughput of `prepare` and of the packed reader on the shipped corpus.
//!
//! `cargo bench -p llama-data --bench reader` (release build). The reader's figure must be far
//! above what training consumes (thousands of tokens/s on CPU, ~1M/s on a large GPU job).

use std::path::Path;
use std::time::Instant;

use llama_data::prepare::{PrepareConfig, prepare};
use llama_data::{PackedReader, ReaderConfig, Split, Tokenizer};

fn main() {
    let repo = Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../..");
    let tokenizer = Tokenizer::from_file(&repo.join("data/tokenizer.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    let t = Instant::now();
    let config = PrepareConfig { show_progress: false, ..PrepareConfig::new(vec![repo.join("data/corpus/brown.jsonl")], shards.clone()) };
    let manifest = prepare(&config, &tokenizer).unwrap();
    let tokens = manifest.tokens(Split::Train) + manifest.tokens(Split::Val);
    let secs = t.elapsed().as_secs_f64();
    println!("prepare: {tokens} tokens in {secs:.2} s = {:.0} tokens/s (tokenize + zstd Parquet)", tokens as f64 / secs);
    for (seq_len, shuffle, world) in [(128, true, 1), (2048, true, 1), (2048, false, 1), (2048, true, 8)] {
        let epochs = 5;
        let config = ReaderConfig { shuffle, epochs: Some(epochs), world_size: world, ..ReaderConfig::new(seq_len) };
        let mut reader = PackedReader::open(&shards, Split::Train, tokenizer.vocab_size(), config).unwrap();
        let t = Instant::now();
        let mut read = 0usize;
        while let Some(w) = reader.next_window().unwrap() {
            read += w.len();
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "reader: seq_len {seq_len:>4}, shuffle {shuffle:>5}, rank 0 of {world}: {read} tokens in {secs:.3} s = {:.2} M tokens/s per rank",
            read as f64 / secs / 1e6
        );
    }
}
