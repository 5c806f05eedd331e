//! `sft` and `sft gatt` on bad input, as a user runs them: each case is refused with a non-zero
//! exit, no panic, a message naming the file and the key or line, and nothing in the fixture
//! directory changed (`llama_testkit::Case::refused`).

use std::path::Path;

use burn::tensor::Device;
use llama_model::LlamaConfig;
use llama_testkit::{Case, repo};

const SFT: &str = env!("CARGO_BIN_EXE_sft");
const GOOD: &str = "{\"prompt\": \"a\", \"response\": \"b\"}";

fn tiny(vocab: usize) -> LlamaConfig {
    LlamaConfig::new(32, 1, 2).with_vocab_size(vocab).with_multiple_of(16).with_max_seq_len(64)
}

/// A random model `dir/NAME` of vocabulary `vocab`.
fn model(dir: &Path, name: &str, vocab: usize) {
    llama_model::checkpoint::save_native(&tiny(vocab).init(&Device::flex()), &tiny(vocab), &dir.join(name)).unwrap();
}

/// A run config with `train` as the chat file and `init` as the model; `extra` is added to the
/// `[data]` section (one setting `seq_len` replaces the default's).
fn config(dir: &Path, name: &str, train: &str, init: &str, extra: &str) -> String {
    let seq_len = if extra.starts_with("seq_len") { "" } else { "seq_len = 32\n" };
    let text = format!(
        "init = \"{d}/{init}\"\n[data]\ntrain = \"{d}/{train}\"\ntokenizer = \"{r}/data/tokenizer.json\"\n{seq_len}{extra}\n[train]\nmax_steps = 1\nbatch_size = 2\nmicro_batch_size = 2\n[run]\nout_dir = \"{d}/out-{name}\"\n",
        d = dir.display(),
        r = repo().display()
    );
    llama_testkit::write_config(dir, name, &text)
}

#[test]
fn sft_refuses_bad_input_and_touches_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    model(dir, "policy", 2048);
    model(dir, "small", 256);
    model(dir, "unread", 2048);
    std::fs::write(dir.join("unread/model.safetensors"), "not weights").unwrap();
    let chats = [
        ("good.jsonl", format!("{GOOD}\n{GOOD}\n")),
        ("useronly.jsonl", format!("{GOOD}\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"and then?\"}}]}}\n")),
        (
            "untrained.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\", \"train\": false}]}\n".to_string(),
        ),
        ("robot.jsonl", "{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n".to_string()),
        ("order.jsonl", format!("{GOOD}\n{{\"messages\": [{{\"role\": \"assistant\", \"content\": \"x\"}}]}}\n")),
        ("emptychat.jsonl", format!("{GOOD}\n\n{{\"messages\": []}}\n")),
        ("broken.jsonl", format!("{GOOD}\n{{\"prompt\": broken\n")),
        ("nocontent.jsonl", "{\"messages\": [{\"role\": \"user\"}]}\n".to_string()),
        ("empty.jsonl", "\n".to_string()),
        ("chats.csv", "prompt,response\na,b\n".to_string()),
    ];
    for (name, text) in &chats {
        std::fs::write(dir.join(name), text).unwrap();
    }
    std::fs::write(dir.join("utf8.jsonl"), b"{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"\xff\xfe\", \"response\": \"b\"}\n").unwrap();
    // A file with no newline (a binary, /dev/zero copied by mistake), past the 4 MiB line cap.
    std::fs::write(dir.join("nonewline.jsonl"), vec![b'a'; 6 << 20]).unwrap();
    std::fs::write(dir.join("long.jsonl"), format!("{GOOD}\n{{\"prompt\": \"{}\", \"response\": \"b\"}}\n", "x".repeat(2000))).unwrap();
    std::fs::write(dir.join("instructions.txt"), "Act as a pirate.\n").unwrap();
    std::fs::write(dir.join("blank.txt"), "\n  \n").unwrap();
    let multiturn = repo().join("data/chat/multiturn.jsonl").display().to_string();

    let train = |name: &str, file: &str, needles: &[&str]| Case::new(name, &["--config", &config(dir, name, file, "policy", "")], needles);
    let at = |file: &str, line: usize| format!("{}:{line}", dir.join(file).display());
    // `data.train` as a list of files.
    let listed = |name: &str, list: &str, needles: &[&str]| {
        let path = config(dir, name, "unused.jsonl", "policy", "");
        let text = std::fs::read_to_string(&path).unwrap().replace(&format!("train = \"{}/unused.jsonl\"", dir.display()), &format!("train = {list}"));
        std::fs::write(&path, text).unwrap();
        Case::new(name, &["--config", &path], needles)
    };
    // `[train] max_steps = 1` of the config replaced by `line`.
    let in_train = |name: &str, line: &str| {
        let path = config(dir, name, "good.jsonl", "policy", "");
        std::fs::write(&path, std::fs::read_to_string(&path).unwrap().replace("max_steps = 1", line)).unwrap();
        path
    };
    let too_big = |name: &str| {
        let path = config(dir, name, "missing.jsonl", "unread", "");
        std::fs::write(&path, std::fs::read_to_string(&path).unwrap().replace("[run]\n", "[run]\ndevice_memory_gib = 0.000001\n")).unwrap();
        path
    };
    let cases = vec![
        listed("an empty list of chat files", "[]", &["data.train", "empty list"]),
        listed(
            "a list naming a missing file",
            &format!("[\"{}\", \"{}/gone.jsonl\"]", repo().join("data/chat/train.jsonl").display(), dir.display()),
            &["gone.jsonl"],
        ),
        // Chat files: the file and line of the bad conversation.
        train("a chat with only a user turn", "useronly.jsonl", &[&at("useronly.jsonl", 2), "no assistant answer"]),
        train("a chat whose answers are all untrained", "untrained.jsonl", &[&at("untrained.jsonl", 1), "no assistant answer"]),
        train("unknown role", "robot.jsonl", &[&at("robot.jsonl", 1), "unknown role `robot`"]),
        train("turns out of order", "order.jsonl", &[&at("order.jsonl", 2), "expected"]),
        train("an empty conversation", "emptychat.jsonl", &[&at("emptychat.jsonl", 3), "empty conversation"]),
        train("invalid JSON", "broken.jsonl", &[&at("broken.jsonl", 2), "invalid JSON"]),
        train("a message without content", "nocontent.jsonl", &[&at("nocontent.jsonl", 1), "content"]),
        train("invalid UTF-8", "utf8.jsonl", &[&at("utf8.jsonl", 2)]),
        train("no conversations", "empty.jsonl", &["empty.jsonl", "no conversations"]),
        train("a file with no newline", "nonewline.jsonl", &[&at("nonewline.jsonl", 1), "longer than 4194304 bytes"]).hostile(),
        train("a line over LLAMA2_MAX_LINE_BYTES", "long.jsonl", &[&at("long.jsonl", 2), "longer than 1000 bytes"]).env("LLAMA2_MAX_LINE_BYTES", "1000"),
        train("an unsupported chat file", "chats.csv", &["chats.csv", "unsupported chat file"]),
        train("a missing chat file", "missing.jsonl", &["missing.jsonl"]),
        // The config and the model.
        Case::new(
            "windows longer than the model",
            &["--config", &config(dir, "seq", "good.jsonl", "policy", "seq_len = 65")],
            &["seq.toml", "data.seq_len", "max_seq_len"],
        ),
        Case::new(
            "the tokenizer's chat template, which it does not have",
            &["--config", &config(dir, "template", "good.jsonl", "policy", "chat_template = \"tokenizer\"")],
            &["template.toml", "data.chat_template", "tokenizer_config.json"],
        ),
        Case::new(
            "an unknown chat template",
            &["--config", &config(dir, "chatml", "good.jsonl", "policy", "chat_template = \"chatml\"")],
            &["chatml.toml", "chatml", "llama2", "tokenizer"],
        ),
        Case::new(
            "unknown overlong policy",
            &["--config", &config(dir, "overlong", "good.jsonl", "policy", "overlong = \"cut\"")],
            &["overlong.toml", "cut", "truncate", "skip"],
        ),
        Case::new("unknown key", &["--config", &config(dir, "unknown", "good.jsonl", "policy", "epoch = 2")], &["unknown.toml", "epoch"]),
        Case::new("zero epochs", &["--config", &config(dir, "epochs", "good.jsonl", "policy", "epochs = 0")], &["epochs.toml", "data.epochs"]),
        Case::new(
            "train.max_tokens, which sft does not count",
            &["--config", &in_train("tokens", "max_tokens = 100")],
            &["tokens.toml", "train.max_tokens", "train.max_steps"],
        ),
        // The launch check comes before any data or weights are read: a run too big for its
        // device is refused for that, though its chat file is missing and its weights corrupt.
        Case::new("a run that does not fit its device, before its data", &["--config", &too_big("fit")], &["fit.toml", "needs about", "device_memory_gib"]),
        Case::new("a missing init", &["--config", &config(dir, "noinit", "good.jsonl", "nowhere", "")], &["noinit.toml", "nowhere"]),
        Case::new("a model smaller than the tokenizer", &["--config", &config(dir, "vocab", "good.jsonl", "small", "")], &["vocab.toml", "vocabulary"]),
        Case::new("a missing config", &["--config", &dir.join("nothere.toml").display().to_string()], &["nothere.toml"]),
        Case::new("no --config", &[], &["--config"]),
        // Ghost Attention data.
        Case::new(
            "gatt: a missing instructions file",
            &[
                "gatt",
                "--input",
                &multiturn,
                "--instructions",
                &dir.join("none.txt").display().to_string(),
                "--out",
                &dir.join("g.jsonl").display().to_string(),
            ],
            &["none.txt"],
        ),
        Case::new(
            "gatt: no instructions",
            &[
                "gatt",
                "--input",
                &multiturn,
                "--instructions",
                &dir.join("blank.txt").display().to_string(),
                "--out",
                &dir.join("g.jsonl").display().to_string(),
            ],
            &["blank.txt", "instruction"],
        ),
        Case::new(
            "gatt: a bad dialogue",
            &[
                "gatt",
                "--input",
                &dir.join("robot.jsonl").display().to_string(),
                "--instructions",
                &dir.join("instructions.txt").display().to_string(),
                "--out",
                &dir.join("g.jsonl").display().to_string(),
            ],
            &[&at("robot.jsonl", 1)],
        ),
        Case::new(
            "gatt: an output in a missing directory",
            &[
                "gatt",
                "--input",
                &multiturn,
                "--instructions",
                &dir.join("instructions.txt").display().to_string(),
                "--out",
                &dir.join("no/such/g.jsonl").display().to_string(),
            ],
            &["no/such/g"],
        ),
    ];
    llama_testkit::refuse_all(SFT, dir, &cases);
}

/// `[train] max_steps` in an SFT config is the run's length (it used to be overwritten by the
/// epochs' count without a word): 5 epochs of 2 chats in batches of 2 would be 5 steps.
#[test]
fn train_max_steps_in_the_config_is_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    model(dir, "policy", 2048);
    std::fs::write(dir.join("good.jsonl"), format!("{GOOD}\n{GOOD}\n")).unwrap();
    let path = config(dir, "steps", "good.jsonl", "policy", "epochs = 5");
    std::fs::write(&path, std::fs::read_to_string(&path).unwrap().replace("max_steps = 1", "max_steps = 3")).unwrap();
    let out = std::process::Command::new(SFT).args(["--config", &path]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| 3 steps of 2 sequences"), "{stdout}");
    let run = dir.join("out-steps/checkpoints");
    assert!(run.join("step-00000003").is_dir() && !run.join("step-00000004").exists(), "{stdout}");
}
