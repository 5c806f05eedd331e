//! `prepare` on bad input, as a user runs it: each case is refused with a non-zero exit, no panic,
//! a message naming the file and the flag or line, and nothing outside its output touched
//! (`llama_testkit::Case::refused` checks the whole fixture directory).

use std::path::Path;

use llama_testkit::{Case, repo};

const PREPARE: &str = env!("CARGO_BIN_EXE_prepare");

/// Inputs, the shipped tokenizer, a foreign directory, and a shard directory of our own.
fn fixture(dir: &Path) {
    std::fs::copy(repo().join("data/tokenizer.json"), dir.join("tok.json")).unwrap();
    std::fs::write(dir.join("good.jsonl"), "{\"text\": \"the jury said\"}\n{\"text\": \"the fox\"}\n").unwrap();
    std::fs::write(dir.join("bad.jsonl"), "{\"text\": \"fine\"}\n{\"text\": \"also fine\"}\n{\"text\": broken\n").unwrap();
    std::fs::write(dir.join("nofield.jsonl"), "{\"body\": \"no text field\"}\n").unwrap();
    std::fs::write(dir.join("number.jsonl"), "{\"text\": 17}\n").unwrap();
    std::fs::write(dir.join("empty.jsonl"), "\n\n").unwrap();
    std::fs::write(dir.join("notes.csv"), "text\nhello\n").unwrap();
    std::fs::write(dir.join("fake.parquet"), "hello, I am text").unwrap();
    std::fs::write(dir.join("broken.json"), "{\"model\": ").unwrap();
    std::fs::create_dir_all(dir.join("mine")).unwrap();
    std::fs::write(dir.join("mine/precious.txt"), "keep me").unwrap();
    let ok =
        std::process::Command::new(PREPARE).args(["--input", "good.jsonl", "--tokenizer", "tok.json", "--out", "shards"]).current_dir(dir).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    std::fs::write(dir.join("shards/notes.md"), "mine").unwrap();
    std::fs::create_dir_all(dir.join("own")).unwrap();
    let ok = std::process::Command::new(PREPARE).args(["--input", "good.jsonl", "--tokenizer", "tok.json", "--out", "own"]).current_dir(dir).output().unwrap();
    assert!(ok.status.success());
}

#[test]
fn prepare_refuses_bad_input_and_touches_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fixture(dir);
    let base = |input: &str, out: &str| vec!["--input".to_string(), input.into(), "--tokenizer".into(), "tok.json".into(), "--out".into(), out.into()];
    let case = |name: &str, input: &str, out: &str, extra: &[&str], needles: &[&str]| {
        let mut args = base(input, out);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Case::new(name, &args, needles).in_dir(dir)
    };
    let cases = [
        // Destructive before: a directory prepare did not write, with or without --overwrite.
        case("foreign output directory", "good.jsonl", "mine", &[], &["mine", "not a shard directory"]),
        case("foreign output directory, --overwrite", "good.jsonl", "mine", &["--overwrite"], &["mine", "not a shard directory"]),
        case("the working directory", "good.jsonl", ".", &["--overwrite"], &["--out ."]),
        case("our shards beside a foreign file, --overwrite", "good.jsonl", "shards", &["--overwrite"], &["notes.md", "did not write"]),
        case("our own shards without --overwrite", "good.jsonl", "own", &[], &["own", "--overwrite"]),
        // Inputs.
        case("invalid JSON line", "bad.jsonl", "out", &[], &["bad.jsonl:3", "invalid JSON"]),
        case("no text field", "nofield.jsonl", "out", &[], &["nofield.jsonl:1", "`text`"]),
        case("text not a string", "number.jsonl", "out", &[], &["number.jsonl:1", "`text`"]),
        case("another text field than the file has", "good.jsonl", "out", &["--text-field", "body"], &["good.jsonl:1", "`body`"]),
        case("no documents", "empty.jsonl", "out", &[], &["empty.jsonl", "no documents"]),
        case("missing input", "missing.jsonl", "out", &[], &["missing.jsonl"]),
        case("unsupported input type", "notes.csv", "out", &[], &["notes.csv"]),
        case("a .parquet that is not Parquet", "fake.parquet", "out", &[], &["fake.parquet", "Parquet"]),
        case("chat Parquet without a text column", &repo().join("tests/fixtures/chat.parquet").display().to_string(), "out", &[], &["chat.parquet", "`text`"]),
        // Flags.
        case("validation share above 1", "good.jsonl", "out", &["--val-fraction", "1.5"], &["--val-fraction", "1.5"]),
        case("zero documents per row group", "good.jsonl", "out", &["--row-group-docs", "0"], &["--row-group-docs"]),
        case("zero tokens per shard", "good.jsonl", "out", &["--shard-tokens", "0"], &["--shard-tokens"]),
        case("training over an existing tokenizer", "good.jsonl", "out", &["--train-tokenizer", "300"], &["tok.json", "--overwrite"]),
        case("a tokenizer too small for the special ids", "good.jsonl", "out", &["--train-tokenizer", "2", "--overwrite"], &["--train-tokenizer", "2"]),
        Case::new("missing tokenizer", &["--input", "good.jsonl", "--tokenizer", "nothere.json", "--out", "out"], &["nothere.json"]).in_dir(dir),
        Case::new("corrupt tokenizer", &["--input", "good.jsonl", "--tokenizer", "broken.json", "--out", "out"], &["broken.json"]).in_dir(dir),
        Case::new("no --out", &["--input", "good.jsonl", "--tokenizer", "tok.json"], &["--out"]).in_dir(dir),
    ];
    llama_testkit::refuse_all(PREPARE, dir, &cases);
    assert_eq!(std::fs::read_to_string(dir.join("mine/precious.txt")).unwrap(), "keep me");
}
