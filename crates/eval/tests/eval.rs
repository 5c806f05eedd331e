//! `eval compare` end to end on tiny random models: a reproducible report, the chart, and bad input.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use llama_model::LlamaConfig;
use llama_reward::RewardModel;

fn repo() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../..")
}

fn save_rm(dir: &Path, config: &LlamaConfig) {
    std::fs::create_dir_all(dir).unwrap();
    llama_model::checkpoint::save_weights(&RewardModel::new(config, &Device::flex()), &dir.join("model.bpk")).unwrap();
    let mut table = toml::Table::new();
    table.insert("model".into(), toml::Value::try_from(config).unwrap());
    std::fs::write(dir.join("config.toml"), toml::to_string(&table).unwrap()).unwrap();
}

fn setup(tmp: &Path, rm_vocab: usize, extra: &str) -> PathBuf {
    let config = |v: usize| LlamaConfig::new(32, 1, 2).with_vocab_size(v).with_multiple_of(16).with_max_seq_len(128);
    for name in ["a", "b"] {
        let c = config(2048);
        llama_model::checkpoint::save_native(&c.init(&Device::flex()), &c, &tmp.join(name)).unwrap();
    }
    save_rm(&tmp.join("help"), &config(rm_vocab));
    save_rm(&tmp.join("safe"), &config(rm_vocab));
    let cfg = format!(
        "tokenizer = \"{r}/data/tokenizer.json\"\nhelpfulness_model = \"{t}/help\"\nsafety_model = \"{t}/safe\"\nbaseline = \"a\"\nmax_new_tokens = 4\nbootstrap_samples = 200\nout_dir = \"{t}/out\"\n{extra}\n[prompts]\nhelpfulness = \"{r}/data/eval/helpfulness.jsonl\"\nsafety = \"{r}/data/eval/safety.jsonl\"\n[[models]]\nname = \"a\"\npath = \"{t}/a\"\n[[models]]\nname = \"b\"\npath = \"{t}/b\"\n",
        r = repo().display(),
        t = tmp.display()
    );
    let path = tmp.join("eval.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

#[test]
fn the_report_is_reproducible_and_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), 2048, "");
    let first = llama_eval::compare(&cfg).unwrap();
    let again = llama_eval::compare(&cfg).unwrap();
    assert_eq!(first, again, "same seed, same report");
    let b = &first.models["b"]["helpfulness"];
    assert_eq!(b.prompts, 96);
    let (w, t, l) = (b.win_rate.unwrap(), b.tie_rate.unwrap(), b.loss_rate.unwrap());
    assert!((w + t + l - 1.0).abs() < 1e-9);
    let (lo, hi) = b.win_rate_ci95.unwrap();
    assert!(lo <= w && w <= hi, "{lo} {w} {hi}");
    assert!(first.models["a"]["safety"].win_rate.is_none(), "the baseline has no win rate");
    let out = tmp.path().join("out");
    assert!(std::fs::read_to_string(out.join("chart.svg")).unwrap().contains("<svg"));
    let json: llama_eval::Report = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(json, first);
    assert!(std::fs::read_dir(out.join("tensorboard")).unwrap().count() >= 2);
    // answers.jsonl: a row per model, set and prompt, agreeing with the report.
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("answers.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2 * (96 + 32));
    let b_help: Vec<&serde_json::Value> = rows.iter().filter(|r| r["model"] == "b" && r["set"] == "helpfulness").collect();
    assert_eq!(b_help.len(), 96);
    let mean = b_help.iter().map(|r| r["combined_logit"].as_f64().unwrap()).sum::<f64>() / 96.0;
    assert!((mean - b.mean_combined).abs() < 1e-5, "{mean} vs {}", b.mean_combined);
    // The shipped helpfulness prompts state the expected fact; the safety ones do not.
    let hits = b_help.iter().filter(|r| r["contains_expected"].as_bool().unwrap()).count();
    assert_eq!(b.expected_rate, Some((hits as f64 / 96.0 * 1e6).round() / 1e6));
    assert!(b_help.iter().all(|r| r["answer"].as_str().unwrap().contains(r["expected"].as_str().unwrap()) == r["contains_expected"].as_bool().unwrap()));
    assert_eq!(first.models["b"]["safety"].expected_rate, None);
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    // Reward models of another vocabulary.
    let cfg = setup(tmp.path(), 1000, "");
    let err = llama_eval::compare(&cfg).unwrap_err().to_string();
    assert!(err.contains("vocabulary") && err.contains("eval.toml"), "{err}");
    // A judge template without its placeholders.
    let cfg = setup(tmp.path(), 2048, "[judge]\nmodel = \"x\"\ntemplate = \"Which is better: {answer_a} or {answer_b}?\"");
    let err = llama_eval::compare(&cfg).unwrap_err().to_string();
    assert!(err.contains("{question}"), "{err}");
    // A prompt set with no prompts.
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace("[judge]\nmodel = \"x\"\ntemplate = \"Which is better: {answer_a} or {answer_b}?\"", "");
    let text = text.replace(&format!("{}/data/eval/safety.jsonl", repo().display()), &empty.display().to_string());
    std::fs::write(&cfg, text).unwrap();
    let err = llama_eval::compare(&cfg).unwrap_err().to_string();
    assert!(err.contains("no prompts"), "{err}");
    // No resamples: an error, not an interval that misses the win rate.
    let cfg = setup(tmp.path(), 2048, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("bootstrap_samples = 200", "bootstrap_samples = 0");
    std::fs::write(&cfg, text).unwrap();
    let err = llama_eval::compare(&cfg).unwrap_err().to_string();
    assert!(err.contains("bootstrap_samples must be >= 1"), "{err}");
    // A prompt too long for the model with its answer: refused before any work, file and line named.
    let cfg = setup(tmp.path(), 2048, "");
    let long = tmp.path().join("long.jsonl");
    std::fs::write(&long, format!("{{\"prompt\": \"Hi\"}}\n{{\"prompt\": \"{}\"}}\n", "the jury said ".repeat(400))).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(&format!("{}/data/eval/safety.jsonl", repo().display()), &long.display().to_string());
    std::fs::write(&cfg, text).unwrap();
    let err = format!("{:#}", llama_eval::compare(&cfg).unwrap_err());
    assert!(err.contains(&format!("{}:2:", long.display())) && err.contains("max_seq_len"), "{err}");
}

/// Perplexity of an untrained model is about the vocabulary size (uniform guessing), and it
/// reads any model directory.
#[test]
fn perplexity_of_an_untrained_model_is_near_the_vocabulary_size() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = llama_data::Tokenizer::from_file(&repo().join("data/tokenizer.json")).unwrap();
    let corpus = std::fs::read_to_string(repo().join("data/corpus/brown.jsonl")).unwrap();
    let src = tmp.path().join("c.jsonl");
    std::fs::write(&src, corpus.lines().take(30).collect::<Vec<_>>().join("\n")).unwrap();
    let shards = tmp.path().join("shards");
    let cfg = llama_data::prepare::PrepareConfig { show_progress: false, val_fraction: 0.2, ..llama_data::prepare::PrepareConfig::new(vec![src], shards.clone()) };
    llama_data::prepare::prepare(&cfg, &tok).unwrap();
    let config = LlamaConfig::new(32, 1, 2).with_vocab_size(2048).with_multiple_of(16).with_max_seq_len(128);
    let model = config.init(&Device::flex());
    let (ppl, tokens) = llama_eval::perplexity(&model, &shards, llama_data::Split::Val, 64, 16, 4).unwrap();
    assert_eq!(tokens, 16 * 64);
    assert!(ppl > 1500.0 && ppl < 2800.0, "{ppl}");
    let err = llama_eval::perplexity(&model, &tmp.path().join("none"), llama_data::Split::Val, 64, 16, 4).unwrap_err().to_string();
    assert!(err.contains("none"), "{err}");
    // From the command line, shards of another tokenizer than the model's are refused.
    let dir = tmp.path().join("model");
    llama_model::checkpoint::save_native(&model, &config, &dir).unwrap();
    let texts: Vec<String> = corpus.lines().take(20).map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string()).collect();
    llama_data::Tokenizer::train(texts.iter(), 300).unwrap().save(&dir.join("tokenizer.json")).unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_eval"))
            .args(["perplexity", "--model", dir.to_str().unwrap(), "--shards", shards.to_str().unwrap(), "--seq-len", "64", "--max-windows", "4"])
            .args(extra)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = run(&[]);
    assert!(!ok && err.contains("re-run prepare") && !err.contains("panicked"), "{err}");
    let (ok, err) = run(&["--tokenizer", repo().join("data/tokenizer.json").to_str().unwrap()]);
    assert!(ok, "the shards' own tokenizer: {err}");
}

/// A perplexity window longer than the model's context is an error naming the limit, before any
/// data is read (it used to panic inside RoPE).
#[test]
fn perplexity_refuses_windows_longer_than_the_model() {
    let model = LlamaConfig::new(32, 1, 2).with_vocab_size(64).with_multiple_of(16).with_max_seq_len(48).init(&Device::flex());
    for seq_len in [0, 49] {
        let err = llama_eval::perplexity(&model, Path::new("no-such-shards"), llama_data::Split::Val, seq_len, 4, 2).unwrap_err().to_string();
        assert!(err.contains(&format!("--seq-len {seq_len}")) && err.contains("48"), "{err}");
    }
}
