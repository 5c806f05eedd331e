//! `reward` and `reward score` on bad input, as a user runs them: each case is refused with a
//! non-zero exit, no panic, a message naming the file and the key or line, and nothing in the
//! fixture directory changed (`llama_testkit::Case::refused`).

use std::path::Path;

use burn::tensor::Device;
use llama_model::LlamaConfig;
use llama_reward::RewardModel;
use llama_testkit::{Case, repo};

const REWARD: &str = env!("CARGO_BIN_EXE_reward");
const PAIR: &str = r#"{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away.", "rating": "better"}"#;

fn tiny(vocab: usize) -> LlamaConfig {
    LlamaConfig::new(32, 1, 2).with_vocab_size(vocab).with_multiple_of(16).with_max_seq_len(64)
}

/// A run config training the helpfulness model from `dir/init` on `help` and `safe` (files in
/// `dir`); `extra` lines go at the top level (one setting `target` replaces the default's).
fn config(dir: &Path, name: &str, init: &str, help: &str, safe: &str, extra: &str) -> String {
    let target = if extra.contains("target =") { "" } else { "target = \"helpfulness\"\n" };
    let text = format!(
        "{target}init = \"{d}/{init}\"\n{extra}\n[data]\ntokenizer = \"{r}/data/tokenizer.json\"\nhelpfulness = \"{d}/{help}\"\nsafety = \"{d}/{safe}\"\n[train]\nmax_steps = 1\nbatch_size = 2\nmicro_batch_size = 2\n[run]\nout_dir = \"{d}/out-{name}\"\n",
        d = dir.display(),
        r = repo().display()
    );
    llama_testkit::write_config(dir, name, &text)
}

#[test]
fn reward_refuses_bad_input_and_touches_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let device = Device::flex();
    llama_model::checkpoint::save_native(&tiny(2048).init(&device), &tiny(2048), &dir.join("policy")).unwrap();
    llama_model::checkpoint::save_native(&tiny(256).init(&device), &tiny(256), &dir.join("small")).unwrap();
    llama_reward::save_reward_model(&RewardModel::new(&tiny(2048), &device), &tiny(2048), &dir.join("rm")).unwrap();
    let long = "word ".repeat(80);
    let files = [
        ("good.jsonl", format!("{PAIR}\n{PAIR}\n")),
        ("rating.jsonl", format!("{PAIR}\n{}\n", r#"{"prompt": "Hi", "chosen": "a", "rejected": "b", "rating": "amazing"}"#)),
        ("norejected.jsonl", "{\"prompt\": \"Hi\", \"chosen\": \"Hello.\"}\n".to_string()),
        ("category.jsonl", "{\"prompt\": \"Hi\", \"chosen\": \"a\", \"rejected\": \"b\", \"category\": \"honesty\"}\n".to_string()),
        ("broken.jsonl", format!("{PAIR}\n{{\"prompt\": \n")),
        ("long.jsonl", format!("{PAIR}\n{{\"prompt\": \"{long}\", \"chosen\": \"a\", \"rejected\": \"b\"}}\n")),
        ("same.jsonl", "{\"prompt\": \"Hi\", \"chosen\": \"a\", \"rejected\": \"a\"}\n".to_string()),
        ("score.jsonl", "{\"prompt\": \"Hi\", \"response\": \"Hello.\"}\n".to_string()),
        ("scorelong.jsonl", format!("{{\"prompt\": \"Hi\", \"response\": \"Hello.\"}}\n{{\"prompt\": \"{long}\", \"response\": \"Hello.\"}}\n")),
        ("noprompt.jsonl", "{\"response\": \"Hello.\"}\n".to_string()),
        ("scorebroken.jsonl", "{\"prompt\": \"Hi\", \n".to_string()),
    ];
    for (name, text) in &files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let at = |file: &str, line: usize| format!("{}:{line}", dir.join(file).display());
    let train = |name: &str, help: &str, extra: &str, needles: &[&str]| {
        Case::new(name, &["--config", &config(dir, name, "policy", help, "good.jsonl", extra)], needles)
    };
    let score = |name: &str, model: &str, input: &str, needles: &[&str]| {
        let (model, input) = (dir.join(model).display().to_string(), dir.join(input).display().to_string());
        Case::new(name, &["score", "--model", &model, "--tokenizer", &repo().join("data/tokenizer.json").display().to_string(), "--input", &input], needles)
    };
    // A config asking for the tokenizer's own chat template, which the shipped tokenizer lacks.
    let template = config(dir, "template", "policy", "good.jsonl", "good.jsonl", "");
    let text = std::fs::read_to_string(&template).unwrap().replace("[data]\n", "[data]\nchat_template = \"tokenizer\"\n");
    std::fs::write(&template, text).unwrap();
    // A run too big for its device, from a model whose weights are corrupt.
    llama_model::checkpoint::save_native(&tiny(2048).init(&device), &tiny(2048), &dir.join("unread")).unwrap();
    std::fs::write(dir.join("unread/model.safetensors"), "not weights").unwrap();
    let too_big = config(dir, "fit", "unread", "good.jsonl", "good.jsonl", "");
    std::fs::write(&too_big, std::fs::read_to_string(&too_big).unwrap().replace("[run]\n", "[run]\ndevice_memory_gib = 0.000001\n")).unwrap();
    let cases = vec![
        // The launch check comes before the weights are read.
        Case::new("a run that does not fit its device, before its weights", &["--config", &too_big], &["fit.toml", "needs about", "device_memory_gib"]),
        Case::new(
            "the tokenizer's chat template, which it does not have",
            &["--config", &template],
            &["template.toml", "data.chat_template", "tokenizer_config.json"],
        ),
        // Preference files: the file and line.
        train("unknown rating", "rating.jsonl", "", &[&at("rating.jsonl", 2), "unknown rating `amazing`", "significantly_better"]),
        train("no rejected answer", "norejected.jsonl", "", &[&at("norejected.jsonl", 1), "rejected"]),
        train("unknown category", "category.jsonl", "", &[&at("category.jsonl", 1), "honesty"]),
        train("invalid JSON", "broken.jsonl", "", &[&at("broken.jsonl", 2), "invalid JSON"]),
        train("a pair longer than the model", "long.jsonl", "", &[&at("long.jsonl", 2), "max_seq_len (64)"]),
        train("a missing pair file", "missing.jsonl", "", &["missing.jsonl"]),
        Case::new(
            "no pairs to train on",
            &["--config", &config(dir, "nopairs", "policy", "same.jsonl", "same.jsonl", "")],
            &["nopairs.toml", "no preference pairs"],
        ),
        // The config and the model.
        train("unknown target", "good.jsonl", "target = \"honesty\"", &["unknown target.toml", "honesty", "helpfulness"]),
        train("unknown key", "good.jsonl", "epochs = 2", &["unknown key.toml", "epochs"]),
        Case::new("a missing init", &["--config", &config(dir, "noinit", "nowhere", "good.jsonl", "good.jsonl", "")], &["noinit.toml", "nowhere"]),
        Case::new(
            "a model smaller than the tokenizer",
            &["--config", &config(dir, "vocab", "small", "good.jsonl", "good.jsonl", "")],
            &["vocab.toml", "vocabulary"],
        ),
        Case::new("no --config", &[], &["--config"]),
        // Scoring.
        score("score: a response longer than the model", "rm", "scorelong.jsonl", &[&at("scorelong.jsonl", 2), "max_seq_len (64)"]),
        score("score: no prompt", "rm", "noprompt.jsonl", &[&at("noprompt.jsonl", 1), "`prompt`"]),
        score("score: invalid JSON", "rm", "scorebroken.jsonl", &[&at("scorebroken.jsonl", 1), "invalid JSON"]),
        score("score: a missing input", "rm", "nothere.jsonl", &["nothere.jsonl"]),
        score("score: not a reward model", "policy", "score.jsonl", &["policy"]),
        score("score: a missing model", "nowhere", "score.jsonl", &["nowhere"]),
    ];
    llama_testkit::refuse_all(REWARD, dir, &cases);
}

/// `[train] max_steps` in a reward config is the run's length (it used to be overwritten by the
/// epochs' count without a word); `train.max_tokens` is refused with the reason.
#[test]
fn train_max_steps_in_the_config_is_honoured_and_max_tokens_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    llama_model::checkpoint::save_native(&tiny(2048).init(&Device::flex()), &tiny(2048), &dir.join("policy")).unwrap();
    std::fs::write(dir.join("pairs.jsonl"), format!("{PAIR}\n{PAIR}\n")).unwrap();
    let path = config(dir, "steps", "policy", "pairs.jsonl", "pairs.jsonl", "");
    let text = std::fs::read_to_string(&path).unwrap().replace("max_steps = 1", "max_steps = 3");
    std::fs::write(&path, text.replace("[data]\n", "[data]\nepochs = 5\n")).unwrap();
    let out = std::process::Command::new(REWARD).args(["--config", &path]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| 3 steps of 2 pairs"), "{stdout}");
    let run = dir.join("out-steps/checkpoints");
    assert!(run.join("step-00000003").is_dir() && !run.join("step-00000004").exists(), "{stdout}");
    let tokens = config(dir, "tokens", "policy", "pairs.jsonl", "pairs.jsonl", "");
    std::fs::write(&tokens, std::fs::read_to_string(&tokens).unwrap().replace("max_steps = 1", "max_tokens = 100")).unwrap();
    let case = Case::new("train.max_tokens", &["--config", &tokens], &["tokens.toml", "train.max_tokens", "train.max_steps"]);
    llama_testkit::refuse_all(REWARD, dir, &[case]);
}
