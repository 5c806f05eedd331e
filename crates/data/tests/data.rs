//! Data pipeline tests: text -> shards -> reader round trip, packing across ranks, resume,
//! shards written by pyarrow, prompt sets, and bad input.

use std::path::{Path, PathBuf};

use llama_data::prepare::{PrepareConfig, prepare};
use llama_data::prompts::{expected_rate, load_prompts, load_prompts_for};
use llama_data::{Cursor, Manifest, PackedReader, ReaderConfig, ShardFile, Split, Tokenizer};

fn fixtures() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../../tests/fixtures")
}

const WORDS: &[&str] = &["the", "jury", "said", "county", "election", "fox", "river", "quick", "green", "house", "city", "of", "and", "a"];

/// A small deterministic corpus: 40 documents of varied lengths.
fn corpus() -> Vec<String> {
    (0..40)
        .map(|d| {
            let n = 5 + (d * 7) % 23;
            let words: Vec<&str> = (0..n).map(|i| WORDS[(d * 3 + i * 5 + i * i) % WORDS.len()]).collect();
            format!("Document {d}: {}.", words.join(" "))
        })
        .collect()
}

struct Prepared {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    tokenizer: Tokenizer,
    docs: Vec<String>,
}

fn prepared(row_group_docs: usize) -> Prepared {
    let tmp = tempfile::tempdir().unwrap();
    let docs = corpus();
    let jsonl = tmp.path().join("corpus.jsonl");
    let lines: Vec<String> = docs.iter().map(|d| serde_json::json!({ "text": d, "id": 1 }).to_string()).collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let tokenizer = Tokenizer::train(docs.iter(), 300).unwrap();
    let dir = tmp.path().join("shards");
    let config = PrepareConfig { val_fraction: 0.1, row_group_docs, shard_tokens: 150, show_progress: false, ..PrepareConfig::new(vec![jsonl], dir.clone()) };
    prepare(&config, &tokenizer).unwrap();
    Prepared { _tmp: tmp, dir, tokenizer, docs }
}

fn read_all(reader: &mut PackedReader) -> Vec<Vec<u32>> {
    let mut out = vec![];
    while let Some(w) = reader.next_window().unwrap() {
        out.push(w);
    }
    out
}

fn once(seq_len: usize, shuffle: bool) -> ReaderConfig {
    ReaderConfig { shuffle, epochs: Some(1), seed: 11, ..ReaderConfig::new(seq_len) }
}

#[test]
fn text_to_shards_to_reader_round_trips() {
    let p = prepared(4);
    let manifest = Manifest::load(&p.dir).unwrap();
    assert!(manifest.train.len() > 1, "several shards expected with shard_tokens = 150");
    assert_eq!(manifest.val.iter().map(|s| s.documents).sum::<u64>(), 4, "every 10th document is held out");
    assert_eq!(manifest.tokenizer_fingerprint, p.tokenizer.fingerprint());

    // Unshuffled, one epoch: the stream is [BOS] doc [EOS] for every train document in order.
    let train_docs: Vec<&String> = p.docs.iter().enumerate().filter(|(i, _)| i % 10 != 9).map(|(_, d)| d).collect();
    let mut stream = vec![];
    for d in &train_docs {
        stream.extend(p.tokenizer.encode(d, true, true).unwrap());
    }
    assert_eq!(manifest.tokens(Split::Train) as usize + 2 * train_docs.len(), stream.len());
    let seq_len = 16;
    let mut reader = PackedReader::open(&p.dir, Split::Train, p.tokenizer.vocab_size(), once(seq_len, false)).unwrap();
    let windows = read_all(&mut reader);
    assert_eq!(windows.len(), stream.len() / (seq_len + 1));
    let flat: Vec<u32> = windows.concat();
    assert_eq!(flat, stream[..flat.len()]);
    // Decoding the documents found between BOS and EOS gives the text back.
    let mut decoded = vec![];
    for piece in flat.split(|&t| t == p.tokenizer.eos_id()) {
        if piece.first() == Some(&p.tokenizer.bos_id()) {
            decoded.push(p.tokenizer.decode(piece).unwrap());
        }
    }
    let whole = decoded.len() - 1; // the last may be cut by the dropped tail
    for (got, want) in decoded[..whole].iter().zip(&train_docs) {
        assert_eq!(got, *want);
    }
}

#[test]
fn ranks_split_one_epoch_so_every_token_is_seen_exactly_once() {
    let p = prepared(3);
    let vocab = p.tokenizer.vocab_size();
    let seq_len = 8;
    let global = read_all(&mut PackedReader::open(&p.dir, Split::Train, vocab, once(seq_len, true)).unwrap());
    let world = 3;
    let per_rank: Vec<Vec<Vec<u32>>> = (0..world)
        .map(|rank| read_all(&mut PackedReader::open(&p.dir, Split::Train, vocab, ReaderConfig { rank, world_size: world, ..once(seq_len, true) }).unwrap()))
        .collect();
    // Window k of the global stream is rank k % world's window k / world.
    for (k, w) in global.iter().enumerate() {
        assert_eq!(&per_rank[k % world][k / world], w);
    }
    assert_eq!(per_rank.iter().map(Vec::len).sum::<usize>(), global.len());
    // The union over ranks holds every packed token once: the token counts equal the corpus
    // counts, less the dropped partial window at the end.
    let manifest = Manifest::load(&p.dir).unwrap();
    let train_docs = manifest.train.iter().map(|s| s.documents).sum::<u64>() as usize;
    let total = manifest.tokens(Split::Train) as usize + 2 * train_docs;
    let seen: usize = per_rank.iter().flatten().map(Vec::len).sum();
    assert_eq!(seen, total - total % (seq_len + 1));
    let bos_seen = per_rank.iter().flatten().flatten().filter(|&&t| t == p.tokenizer.bos_id()).count();
    assert!(bos_seen >= train_docs - 1 && bos_seen <= train_docs, "{bos_seen} of {train_docs} documents");
    // Shuffling changes the order but not the content.
    let unshuffled = read_all(&mut PackedReader::open(&p.dir, Split::Train, vocab, once(seq_len, false)).unwrap());
    assert_ne!(unshuffled, global);
    let count = |ws: &[Vec<u32>]| {
        let mut c = vec![0usize; vocab];
        ws.iter().flatten().for_each(|&t| c[t as usize] += 1);
        c
    };
    let (a, b) = (count(&unshuffled), count(&global));
    let diff: usize = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).sum();
    assert!(diff <= 2 * (seq_len + 1), "shuffled and unshuffled streams differ by more than the dropped tails: {diff}");
}

#[test]
fn a_restored_cursor_continues_exactly_across_epochs() {
    let p = prepared(4);
    let vocab = p.tokenizer.vocab_size();
    let config = ReaderConfig { seed: 5, rank: 1, world_size: 2, ..ReaderConfig::new(12) };
    let mut straight = PackedReader::open(&p.dir, Split::Train, vocab, config.clone()).unwrap();
    let mut expected: Vec<Vec<u32>> = vec![];
    while straight.cursor().epoch < 1 || expected.len() < 20 {
        expected.push(straight.next_window().unwrap().unwrap());
    }
    let crossing = expected.len() - 5; // some stops before the epoch boundary, one after
    for stop in [1, 17, crossing, expected.len() - 2] {
        let mut first = PackedReader::open(&p.dir, Split::Train, vocab, config.clone()).unwrap();
        for w in &expected[..stop] {
            assert_eq!(&first.next_window().unwrap().unwrap(), w);
        }
        let saved = serde_json::to_string(first.cursor()).unwrap();
        drop(first);
        let mut resumed = PackedReader::open(&p.dir, Split::Train, vocab, config.clone()).unwrap();
        resumed.restore(serde_json::from_str::<Cursor>(&saved).unwrap()).unwrap();
        for (i, w) in expected[stop..].iter().enumerate() {
            assert_eq!(&resumed.next_window().unwrap().unwrap(), w, "window {} after resuming at {stop}", stop + i);
        }
    }
}

/// A cursor saved in one shard set is refused in another (the same documents prepared again
/// with other row groups: the index that panicked), the error saying what changed; a cursor of
/// an older checkpoint, without the record, that points past the shards is an error, not a panic.
#[test]
fn a_cursor_is_refused_in_shards_that_changed_since_it_was_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |row_group_docs: usize| {
        let mut w = llama_data::ShardWriter::new(tmp.path(), Split::Train, 1_000_000, row_group_docs);
        for d in 0..12u32 {
            w.write((0..20 + d).map(|t| 3 + (t + d) % 50).collect()).unwrap();
        }
        w.finish().unwrap();
    };
    write(4);
    let config = ReaderConfig { shuffle: false, ..ReaderConfig::new(16) };
    let mut reader = PackedReader::open(tmp.path(), Split::Train, 64, config.clone()).unwrap();
    for _ in 0..14 {
        reader.next_window().unwrap().unwrap();
    }
    let saved = reader.cursor().clone();
    assert_eq!(saved.unit, 2, "the cursor is in the third row group of 4 documents");
    write(6);
    let mut resumed = PackedReader::open(tmp.path(), Split::Train, 64, config.clone()).unwrap();
    let err = resumed.restore(saved.clone()).unwrap_err().to_string();
    assert!(err.contains("shards changed") && err.contains("train-00000.parquet had") && err.contains("3 row groups") && err.contains("2 row groups"), "{err}");
    // Without the record (an older checkpoint's cursor), the position is checked as it is read.
    let mut resumed = PackedReader::open(tmp.path(), Split::Train, 64, config).unwrap();
    resumed.restore(Cursor { shards: None, unit: 1, doc: 7, ..saved }).unwrap();
    let err = resumed.next_window().unwrap_err().to_string();
    assert!(err.contains("points at token") && err.contains("shards changed"), "{err}");
}

#[test]
fn shards_written_by_pyarrow_are_read_for_every_integer_type() {
    let dir = fixtures().join("shards");
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let docs: Vec<Vec<u32>> = serde_json::from_value(expected["docs"].clone()).unwrap();
    for name in ["int32", "int64", "uint16", "uint32", "large_int64"] {
        let file = ShardFile::open(&dir.join(format!("{name}.parquet"))).unwrap();
        assert_eq!(file.row_groups, vec![2, 1], "{name}");
        let got: Vec<Vec<u32>> = (0..2).flat_map(|rg| file.read_row_group(rg, 100).unwrap()).collect();
        assert_eq!(got, docs, "{name}");
    }
}

#[test]
fn bad_shards_are_clear_errors_naming_the_file() {
    let dir = fixtures().join("shards");
    let err = ShardFile::open(&dir.join("bad_strings.parquet")).unwrap_err().to_string();
    assert!(err.contains("bad_strings.parquet") && err.contains("list of integers"), "{err}");
    let err = ShardFile::open(&dir.join("bad_missing_column.parquet")).unwrap_err().to_string();
    assert!(err.contains("bad_missing_column.parquet") && err.contains("no `input_ids` column"), "{err}");
    let file = ShardFile::open(&dir.join("bad_out_of_vocab.parquet")).unwrap();
    let err = file.read_row_group(0, 100).unwrap_err().to_string();
    assert!(err.contains("bad_out_of_vocab.parquet") && err.contains("row 1") && err.contains("100"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let not_parquet = tmp.path().join("notes.parquet");
    std::fs::write(&not_parquet, "hello, I am text").unwrap();
    let err = ShardFile::open(&not_parquet).unwrap_err().to_string();
    assert!(err.contains("notes.parquet") && err.contains("not a readable Parquet file"), "{err}");
    let truncated = tmp.path().join("truncated.parquet");
    let bytes = std::fs::read(dir.join("int32.parquet")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = ShardFile::open(&truncated).unwrap_err().to_string();
    assert!(err.contains("truncated.parquet"), "{err}");

    // A directory with no documents for the split.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = PackedReader::open(&empty, Split::Train, 100, ReaderConfig::new(4)).err().unwrap().to_string();
    assert!(err.contains("no documents"), "{err}");
}

#[test]
fn prepare_rejects_bad_inputs_and_keeps_existing_output() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = Tokenizer::train(corpus().iter(), 300).unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"text\": \"also fine\"}\n{\"text\": broken\n").unwrap();
    let out = tmp.path().join("out");
    let cfg = |input: &Path| PrepareConfig { show_progress: false, ..PrepareConfig::new(vec![input.to_path_buf()], out.clone()) };
    let err = prepare(&cfg(&bad), &tok).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:3") && err.contains("invalid JSON"), "{err}");
    std::fs::write(&bad, "{\"body\": \"no text field\"}\n").unwrap();
    let err = prepare(&cfg(&bad), &tok).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:1") && err.contains("`text`"), "{err}");
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    assert!(prepare(&cfg(&empty), &tok).unwrap_err().to_string().contains("no documents"));
    assert!(!out.exists(), "failed runs leave no output behind");

    // A good run, then a refusal to overwrite, then a manifest check against another tokenizer.
    let good = tmp.path().join("good.jsonl");
    std::fs::write(&good, "{\"text\": \"the jury said\"}\n{\"text\": \"the fox\"}\n").unwrap();
    prepare(&cfg(&good), &tok).unwrap();
    let err = prepare(&cfg(&good), &tok).unwrap_err().to_string();
    assert!(err.contains("--overwrite"), "{err}");
    let other = Tokenizer::train(corpus().iter().rev(), 290).unwrap();
    let m = Manifest::load(&out).unwrap();
    let err = m.check_tokenizer(other.fingerprint(), other.vocab_size(), &out).unwrap_err().to_string();
    assert!(err.contains("manifest.json") && err.contains("re-run prepare"), "{err}");
    assert!(m.check_tokenizer(tok.fingerprint(), tok.vocab_size(), &out).is_ok());
    // A model whose vocabulary is smaller than the shards' is refused at open.
    let err = PackedReader::open(&out, Split::Train, 100, ReaderConfig::new(4)).err().unwrap().to_string();
    assert!(err.contains("larger than the model"), "{err}");
}

/// `prepare` never empties a directory it did not write: an existing directory with other files
/// is refused (with or without --overwrite) and left as it was; `.` is refused; --overwrite
/// replaces a shard directory's own files, and refuses one that also holds a foreign file.
#[test]
fn prepare_never_deletes_what_it_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = Tokenizer::train(corpus().iter(), 300).unwrap();
    let good = tmp.path().join("good.jsonl");
    std::fs::write(&good, "{\"text\": \"the jury said\"}\n{\"text\": \"the fox\"}\n").unwrap();
    let cfg = |out: &Path, overwrite: bool| PrepareConfig { show_progress: false, overwrite, ..PrepareConfig::new(vec![good.clone()], out.to_path_buf()) };

    let mine = tmp.path().join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("precious.txt"), "keep me").unwrap();
    for overwrite in [false, true] {
        let err = prepare(&cfg(&mine, overwrite), &tok).unwrap_err().to_string();
        assert!(err.contains("mine") && err.contains("not a shard directory"), "{err}");
        assert_eq!(std::fs::read_to_string(mine.join("precious.txt")).unwrap(), "keep me");
    }
    let err = prepare(&cfg(Path::new("."), true), &tok).unwrap_err().to_string();
    assert!(err.contains("--out ."), "{err}");

    // An empty directory is fine; --overwrite replaces our own shards.
    let shards = tmp.path().join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    prepare(&cfg(&shards, false), &tok).unwrap();
    prepare(&cfg(&shards, true), &tok).unwrap();
    assert!(Manifest::load(&shards).is_ok());
    // ... but not when something else lives beside them.
    std::fs::write(shards.join("notes.md"), "mine").unwrap();
    let err = prepare(&cfg(&shards, true), &tok).unwrap_err().to_string();
    assert!(err.contains("notes.md") && err.contains("did not write"), "{err}");
    assert_eq!(std::fs::read_to_string(shards.join("notes.md")).unwrap(), "mine");
    assert!(Manifest::load(&shards).is_ok(), "the refused run left the shards alone");
}

/// `expected` in a prompt file: read when given, refused when not a string, and the share of
/// answers containing it counted over the prompts that have one.
#[test]
fn expected_answers_are_read_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("p.jsonl");
    std::fs::write(&path, "{\"prompt\": \"My name is Tina. What is my name?\", \"expected\": \"Tina\"}\n{\"prompt\": \"Rob a bank?\", \"is_safety\": true}\n{\"prompt\": \"I live in Oslo. Where?\", \"expected\": \"Oslo\"}\n").unwrap();
    let prompts = load_prompts(&path).unwrap();
    assert_eq!(prompts.iter().map(|p| p.expected.as_deref()).collect::<Vec<_>>(), [Some("Tina"), None, Some("Oslo")]);
    let answers = |a: [&str; 3]| a.map(String::from).to_vec();
    assert_eq!(expected_rate(&prompts, &answers(["Your name is Tina.", "No.", "You live in Rome."])), Some(0.5));
    assert_eq!(expected_rate(&prompts, &answers(["Tina", "Tina", "Oslo"])), Some(1.0));
    assert_eq!(expected_rate(&prompts[1..2], &answers(["x", "", ""])), None);
    std::fs::write(&path, "{\"prompt\": \"Hi?\", \"expected\": 3}\n").unwrap();
    let err = load_prompts(&path).unwrap_err().to_string();
    assert!(err.contains("p.jsonl:1") && err.contains("`expected` must be a non-empty string"), "{err}");
}

/// A prompt that cannot be answered within the model's length is refused when the file is
/// loaded, naming the file and line, and counting the end-of-sequence token appended to a cut
/// answer (a prompt of exactly max_seq_len - max_new_tokens tokens is one too many).
#[test]
fn over_long_prompts_are_refused_at_load_with_file_and_line() {
    let tok = Tokenizer::from_file(&fixtures().join("../../data/tokenizer.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("prompts.jsonl");
    let long = "the jury said ".repeat(40);
    std::fs::write(&path, format!("{{\"prompt\": \"Hi\"}}\n\n{{\"prompt\": \"{long}\"}}\n")).unwrap();
    let err = load_prompts_for(&path, &tok, 8, 64).unwrap_err().to_string();
    assert!(err.contains(&format!("{}:3:", path.display())) && err.contains("max_seq_len (64)"), "{err}");
    let short = load_prompts(&path).unwrap().remove(0);
    let n = short.conversation.prompt_ids(&tok).unwrap().len();
    let exact = tmp.path().join("exact.jsonl");
    std::fs::write(&exact, "{\"prompt\": \"Hi\"}\n").unwrap();
    assert!(load_prompts_for(&exact, &tok, 8, n + 8).is_err(), "no room for the EOS after a cut answer");
    assert_eq!(load_prompts_for(&exact, &tok, 8, n + 9).unwrap().len(), 1);
}

/// Under `overlong = "truncate"` a chat far longer than a window is cut before it is tokenized:
/// the cut chat's first window of ids and loss mask are the whole chat's, whether the cut falls
/// in a question or in an answer, and only a few KB are tokenized.
#[test]
fn a_huge_chat_is_cut_before_tokenizing_without_changing_its_first_window() {
    use llama_data::chat::{Conversation, Message, Role};
    let tok = Tokenizer::from_file(&fixtures().join("../../data/tokenizer.json")).unwrap();
    let text = "The jury said the county election was conducted well, and 12 of them agreed. ".repeat(4000);
    let window = 65;
    for (question, answer) in [(text.as_str(), "It was."), ("How was the election?", text.as_str())] {
        let chat = Conversation { messages: vec![Message::new(Role::User, question), Message::new(Role::Assistant, answer)] };
        let cut = chat.cut_for(window, tok.max_token_bytes()).expect("a 300 KB chat is cut");
        let kept: usize = cut.messages.iter().map(|m| m.content.len()).sum();
        assert!(kept < 16_000, "{kept} bytes kept");
        let (whole_ids, whole_mask) = chat.tokenize(&tok).unwrap();
        let (cut_ids, cut_mask) = cut.tokenize(&tok).unwrap();
        assert!(cut_ids.len() > window);
        assert_eq!((&cut_ids[..window], &cut_mask[..window]), (&whole_ids[..window], &whole_mask[..window]));
    }
    // A chat that fits is left as it is.
    let short = Conversation { messages: vec![Message::new(Role::User, "Hi"), Message::new(Role::Assistant, "Hello")] };
    assert!(short.cut_for(window, tok.max_token_bytes()).is_none());
}
