//! `pretrain` on bad input, as a user runs it: each case is refused with a non-zero exit, no
//! panic, a message naming the file and the key (or shard, row, checkpoint), and nothing in the
//! fixture directory changed outside the run's own output (`llama_testkit::Case::refused`).

mod common;

use std::path::{Path, PathBuf};

use common::{Fixture, pretrain};
use llama_testkit::Case;

const PRETRAIN: &str = env!("CARGO_BIN_EXE_pretrain");
const MODEL: &str = "dim = 32\nn_layers = 2\nn_heads = 2\nn_kv_heads = 1\nvocab_size = 400\nmultiple_of = 16\nmax_seq_len = 64";
const TRAIN: &str = "max_steps = 2\nbatch_size = 2\nmicro_batch_size = 2\nlog_every = 1\neval_every = 100\neval_batches = 1\ncheckpoint_every = 1";

/// A shard directory (no manifest: read as shards written by others) holding one file.
fn shard_dir(root: &Path, name: &str, file: &Path) -> String {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(file, dir.join("train-00000.parquet")).unwrap();
    dir.display().to_string()
}

#[test]
fn pretrain_refuses_bad_input_and_touches_nothing_else() {
    let f = Fixture::new(400);
    let root = f.dir.path();
    let shards = f.path("shards");
    // A config named NAME whose text is the standard one with `(from, to)` replacements.
    let edited = |name: &str, model: &str, train: &str, edits: &[(&str, &str)]| -> String {
        let path = f.config(name, model, train, "");
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (from, to) in edits {
            assert!(text.contains(from), "{name}: `{from}` not in the config");
            text = text.replace(from, to);
        }
        std::fs::write(&path, text).unwrap();
        path
    };
    let with_shards = |name: &str, dir: &str| edited(name, MODEL, TRAIN, &[(&format!("shards = \"{shards}\""), &format!("shards = \"{dir}\""))]);
    let fixtures = common::repo().join("tests/fixtures/shards");
    let not_parquet = root.join("notes.parquet");
    std::fs::write(&not_parquet, "hello, I am text").unwrap();
    let other = Fixture::new(600);

    // A finished run to resume, and its checkpoint corrupted in a copy.
    let done = f.config("done", MODEL, TRAIN, "");
    assert!(pretrain(&["--config", &done], &[]).0);
    let broken = f.config("broken", MODEL, TRAIN, "");
    assert!(pretrain(&["--config", &broken], &[]).0);
    let newest = PathBuf::from(f.path("out-broken/checkpoints/step-00000002"));
    let weights = std::fs::read(newest.join("model.bpk")).unwrap();
    std::fs::write(newest.join("model.bpk"), &weights[..weights.len() / 2]).unwrap();
    let state_broken = f.config("state", MODEL, TRAIN, "");
    assert!(pretrain(&["--config", &state_broken], &[]).0);
    std::fs::write(f.path("out-state/checkpoints/step-00000002/state.json"), "{\"step\": ").unwrap();

    // The same corpus prepared again with other row groups, and a config that resumes the
    // finished run `done` on it: its saved data cursor no longer points where it did.
    let regrouped = f.prepare("s-regrouped", 2);
    let changed =
        edited("changed", MODEL, TRAIN, &[(&format!("shards = \"{shards}\""), &format!("shards = \"{}\"", regrouped.display())), ("out-changed", "out-done")]);

    let out = |name: &str| PathBuf::from(f.path(&format!("out-{name}")));
    let run = |name: &str, config: &str, extra: &[&str], needles: &[&str]| {
        let mut args = vec!["--config", config];
        args.extend(extra);
        Case::new(name, &args, needles)
    };
    let cases = vec![
        // The config file.
        run("malformed TOML", &edited("toml", MODEL, "max_steps = [", &[]), &[], &["toml.toml", "TOML parse error"]),
        run("unknown key", &edited("unknown", MODEL, &format!("{TRAIN}\nlearning_rate = 1"), &[]), &[], &["unknown.toml", "learning_rate"]),
        run("wrong type", &edited("type", MODEL, "max_steps = \"six\"\nbatch_size = 2\nmicro_batch_size = 2", &[]), &[], &["type.toml", "max_steps"]),
        run("negative LR", &edited("neglr", MODEL, TRAIN, &[("lr = 3e-3", "lr = -1.0")]), &[], &["neglr.toml", "optim.lr"]),
        run(
            "batch not a multiple of the micro-batch",
            &edited("divisible", MODEL, "max_steps = 2\nbatch_size = 5\nmicro_batch_size = 2", &[]),
            &[],
            &["divisible.toml", "train.micro_batch_size"],
        ),
        run("unknown preset", &edited("preset", "preset = \"8b.toml\"", TRAIN, &[]), &[], &["preset.toml", "8b.toml"]),
        run("heads do not divide the width", &edited("heads", &MODEL.replace("n_heads = 2", "n_heads = 3"), TRAIN, &[]), &[], &["heads.toml", "n_heads"]),
        run("unknown dtype", &edited("dtype", MODEL, TRAIN, &[("[run]\n", "[run]\ndtype = \"f8\"\n")]), &[], &["dtype.toml", "run.dtype", "f8"]),
        run("unknown device", &edited("device", MODEL, TRAIN, &[("[run]\n", "[run]\ndevice = \"tpu\"\n")]), &[], &["device.toml", "tpu"]),
        run("zero logits chunk", &edited("chunk", MODEL, &format!("{TRAIN}\nlogits_chunk = 0"), &[]), &[], &["chunk.toml", "train.logits_chunk"]),
        run("windows longer than the model", &edited("seq", MODEL, TRAIN, &[("seq_len = 32", "seq_len = 65")]), &[], &["seq.toml", "data.seq_len", "65"]),
        run(
            "tokenizer larger than the model",
            &edited("vocab", &MODEL.replace("vocab_size = 400", "vocab_size = 256"), TRAIN, &[]),
            &[],
            &["vocab.toml", "model.vocab_size"],
        ),
        run("missing config", &f.path("nothere.toml"), &[], &["nothere.toml"]),
        // The data.
        run("missing shard directory", &with_shards("missing", &f.path("nowhere")), &[], &["nowhere", "does not exist"]),
        run("shards of a larger tokenizer", &with_shards("bigger", &other.path("shards")), &[], &["manifest.json", "exceeds model.vocab_size"]),
        run(
            "shards of another tokenizer",
            &edited(
                "othertok",
                &MODEL.replace("vocab_size = 400", "vocab_size = 600"),
                TRAIN,
                &[(&format!("shards = \"{shards}\""), &format!("shards = \"{}\"", other.path("shards")))],
            ),
            &[],
            &["manifest.json", "tokenizer"],
        ),
        run(
            "a shard that is not Parquet",
            &with_shards("notparquet", &shard_dir(root, "s-text", &not_parquet)),
            &[],
            &["train-00000.parquet", "not a readable Parquet file"],
        ),
        run(
            "a shard of strings",
            &with_shards("strings", &shard_dir(root, "s-strings", &fixtures.join("bad_strings.parquet"))),
            &[],
            &["train-00000.parquet", "list of integers"],
        ),
        run(
            "a shard without input_ids",
            &with_shards("nocolumn", &shard_dir(root, "s-nocol", &fixtures.join("bad_missing_column.parquet"))),
            &[],
            &["train-00000.parquet", "input_ids"],
        ),
        run("a token id outside the vocabulary", &with_shards("oov", &out_of_vocab(root)), &[], &["train-00000.parquet", "row 1"]).may_create(out("oov")),
        run("a null token id", &with_shards("null", &null_ids(root)), &[], &["train-00000.parquet", "row group 0, row 1", "null"]).may_create(out("null")),
        run(
            "no documents",
            &with_shards("empty", &{
                std::fs::create_dir_all(root.join("s-empty")).unwrap();
                root.join("s-empty").display().to_string()
            }),
            &[],
            &["s-empty", "no documents"],
        ),
        // The run directory.
        run("a finished run without --resume", &done, &[], &["out-done", "already holds checkpoints", "--resume"]),
        run(
            "another model on --resume",
            &edited("done", &MODEL.replace("dim = 32", "dim = 64"), TRAIN, &[]),
            &["--resume"],
            &["step-00000002", "another model config"],
        ),
        run("a truncated checkpoint on --resume", &broken, &["--resume"], &["step-00000002", "model.bpk"]),
        run("a corrupt checkpoint state on --resume", &state_broken, &["--resume"], &["step-00000002", "state.json"]),
        run(
            "shards that changed since the checkpoint on --resume",
            &changed,
            &["--resume", "--max-steps", "4"],
            &["train-00000.parquet", "row groups", "now has"],
        ),
        // The command line.
        run("zero max steps", &done, &["--max-steps", "0", "--resume"], &["done.toml", "max_steps"]),
        run("unknown recompute", &done, &["--recompute", "layers"], &["--recompute", "layers"]),
        Case::new("no --config", &[], &["--config"]),
    ];
    llama_testkit::refuse_all(PRETRAIN, root, &cases);

    // A run directory another process is writing.
    let locked = f.config("locked", MODEL, TRAIN, "");
    let _lock = llama_trainer::checkpoint::RunLock::acquire(&out("locked")).unwrap();
    run("a run directory being written", &locked, &[], &["out-locked", "another run"]).refused(PRETRAIN, root);
}

/// A shard directory whose row 1 holds a null id (the list values' validity bitmap), as a
/// careless pyarrow writer makes: its slot holds an arbitrary number.
fn null_ids(root: &Path) -> String {
    use arrow_array::types::UInt32Type;
    use arrow_array::{Array, ListArray, RecordBatch};
    let dir = root.join("s-null");
    std::fs::create_dir_all(&dir).unwrap();
    let ids = ListArray::from_iter_primitive::<UInt32Type, _, _>([Some(vec![Some(1), Some(5), Some(9), Some(2)]), Some(vec![Some(1), None, Some(3), Some(2)])]);
    let schema = std::sync::Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new("input_ids", ids.data_type().clone(), false)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![std::sync::Arc::new(ids)]).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(dir.join("train-00000.parquet")).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    dir.display().to_string()
}

/// A shard directory whose row 1 holds the id 400, one past a vocabulary of 400.
fn out_of_vocab(root: &Path) -> String {
    let dir = root.join("s-oov");
    std::fs::create_dir_all(&dir).unwrap();
    let mut writer = llama_data::shards::ShardWriter::new(&dir, llama_data::Split::Train, 1_000, 1);
    for doc in [vec![1, 5, 9, 2], vec![1, 7, 400, 3, 2], vec![1, 8, 8, 2]] {
        writer.write(doc).unwrap();
    }
    writer.finish().unwrap();
    dir.display().to_string()
}
