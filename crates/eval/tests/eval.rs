//! `eval compare` end to end on tiny random models: a reproducible report, the chart, and bad input.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use llama_model::LlamaConfig;
use llama_reward::RewardModel;

fn repo() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../..")
}

fn save_rm(dir: &Path, config: &LlamaConfig) {
    llama_reward::save_reward_model(&RewardModel::new(config, &Device::flex()), config, dir).unwrap();
}

fn tiny(vocab: usize) -> LlamaConfig {
    LlamaConfig::new(32, 1, 2).with_vocab_size(vocab).with_multiple_of(16).with_max_seq_len(128)
}

/// Chat models `a` and `b` and reward models `help` and `safe` (vocabulary `rm_vocab`) in `tmp`.
fn models(tmp: &Path, rm_vocab: usize) {
    for name in ["a", "b"] {
        llama_model::checkpoint::save_native(&tiny(2048).init(&Device::flex()), &tiny(2048), &tmp.join(name)).unwrap();
    }
    save_rm(&tmp.join("help"), &tiny(rm_vocab));
    save_rm(&tmp.join("safe"), &tiny(rm_vocab));
}

/// `tmp/NAME.toml` comparing `a` and `b`; `extra` goes at the top level and `(from, to)` edits
/// the text.
fn config(tmp: &Path, name: &str, extra: &str, edits: &[(&str, &str)]) -> PathBuf {
    let mut cfg = format!(
        "tokenizer = \"{r}/data/tokenizer.json\"\nhelpfulness_model = \"{t}/help\"\nsafety_model = \"{t}/safe\"\nbaseline = \"a\"\nmax_new_tokens = 4\nbootstrap_samples = 200\nout_dir = \"{t}/out\"\n{extra}\n[prompts]\nhelpfulness = \"{r}/data/eval/helpfulness.jsonl\"\nsafety = \"{r}/data/eval/safety.jsonl\"\n[[models]]\nname = \"a\"\npath = \"{t}/a\"\n[[models]]\nname = \"b\"\npath = \"{t}/b\"\n",
        r = repo().display(),
        t = tmp.display()
    );
    for (from, to) in edits {
        assert!(cfg.contains(from), "{name}: `{from}` not in the config");
        cfg = cfg.replace(from, to);
    }
    let path = tmp.join(format!("{name}.toml"));
    std::fs::write(&path, cfg).unwrap();
    path
}

fn setup(tmp: &Path, rm_vocab: usize, extra: &str) -> PathBuf {
    models(tmp, rm_vocab);
    config(tmp, "eval", extra, &[])
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
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("answers.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
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

    // The command line replaces the config's paths: `b` read from `a`'s directory ties with it
    // everywhere, and the report goes to --out.
    let out2 = tmp.path().join("out2");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_eval"))
        .args(["compare", "--config", cfg.to_str().unwrap(), "--out", out2.to_str().unwrap(), "--model", &format!("b={}", tmp.path().join("a").display())])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    // Progress: a line per model and set, on stderr.
    let progress = String::from_utf8_lossy(&run.stderr);
    let sets = first.models["a"].len();
    assert!(progress.contains(&format!("eval compare [{}/{}]: b answered the", 2 * sets, 2 * sets)), "{progress}");
    let swapped: llama_eval::Report = serde_json::from_str(&std::fs::read_to_string(out2.join("report.json")).unwrap()).unwrap();
    assert_eq!(swapped.models["b"]["helpfulness"].tie_rate, Some(1.0));
    assert_eq!(swapped.models["a"], first.models["a"]);
}

/// A `[tools]` set is answered through the tool runtime, and again with the tools off: for models
/// that write no call, both give plain generation's answers, so the scores equal a run without
/// `[tools]`, no answer calls a tool, and the expected rates with and without tools agree.
#[test]
fn tool_sets_are_answered_with_and_without_tools() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = llama_eval::compare(&setup(tmp.path(), 2048, "")).unwrap();
    let corpus = repo().join("data/tools/search.jsonl");
    let cfg = config(tmp.path(), "tools", &format!("[tools]\nsets = [\"helpfulness\"]\nsearch_corpus = \"{}\"", corpus.display()), &[]);
    let tools = llama_eval::compare(&cfg).unwrap();
    for model in ["a", "b"] {
        let (p, t) = (&plain.models[model]["helpfulness"], &tools.models[model]["helpfulness"]);
        assert_eq!((t.mean_combined, t.mean_helpfulness, t.mean_safety), (p.mean_combined, p.mean_helpfulness, p.mean_safety), "{model}");
        assert_eq!(t.expected_rate, p.expected_rate, "{model}");
        assert_eq!(t.tool_call_rate, Some(0.0));
        let without = t.without_tools.as_ref().unwrap();
        assert_eq!((without.expected_rate, without.tool_call_rate), (t.expected_rate, 0.0));
        assert!(p.tool_call_rate.is_none() && p.without_tools.is_none());
        assert_eq!(tools.models[model]["safety"], plain.models[model]["safety"], "a set outside [tools] is unchanged");
    }
}

/// `eval compare` and `eval perplexity` on bad input, as a user runs them: each case is refused
/// with a non-zero exit, no panic, a message naming the file and the key or line, and nothing in
/// the fixture directory changed (`llama_testkit::Case::refused`).
#[test]
fn eval_refuses_bad_input_and_touches_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    models(dir, 2048);
    let small = dir.join("small");
    save_rm(&small.join("help"), &tiny(1000));
    // Finite weights whose activations overflow f32: a loss of NaN, not a perplexity.
    struct Scale;
    impl burn::module::ModuleMapper for Scale {
        fn map_float<const D: usize>(&mut self, param: burn::module::Param<burn::tensor::Tensor<D>>) -> burn::module::Param<burn::tensor::Tensor<D>> {
            param.map(|t| t.mul_scalar(1e20))
        }
    }
    let huge = burn::module::Module::map(tiny(2048).init(&Device::flex()), &mut Scale);
    llama_model::checkpoint::save_native(&huge, &tiny(2048), &dir.join("huge")).unwrap();
    // Shards of the shipped tokenizer, and a model directory whose tokenizer is another one.
    let tok = llama_data::Tokenizer::from_file(&repo().join("data/tokenizer.json")).unwrap();
    let corpus = std::fs::read_to_string(repo().join("data/corpus/brown.jsonl")).unwrap();
    let src = dir.join("c.jsonl");
    std::fs::write(&src, corpus.lines().take(30).collect::<Vec<_>>().join("\n")).unwrap();
    let shards = dir.join("shards");
    llama_data::prepare::prepare(
        &llama_data::prepare::PrepareConfig { show_progress: false, val_fraction: 0.2, ..llama_data::prepare::PrepareConfig::new(vec![src], shards.clone()) },
        &tok,
    )
    .unwrap();
    let texts: Vec<String> =
        corpus.lines().take(20).map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string()).collect();
    std::fs::create_dir_all(dir.join("othertok")).unwrap();
    let other_tok = dir.join("othertok/tokenizer.json");
    llama_data::Tokenizer::train(texts.iter(), 300).unwrap().save(&other_tok).unwrap();
    std::fs::write(dir.join("empty.jsonl"), "").unwrap();
    std::fs::write(dir.join("long.jsonl"), format!("{{\"prompt\": \"Hi\"}}\n{{\"prompt\": \"{}\"}}\n", "the jury said ".repeat(60))).unwrap();
    std::fs::write(dir.join("broken.jsonl"), "{\"prompt\": \"Hi\"}\n{\"prompt\": \n").unwrap();

    let safety = format!("{}/data/eval/safety.jsonl", repo().display());
    let compare = |name: &str, extra: &str, edits: &[(&str, &str)], needles: &[&str]| {
        llama_testkit::Case::new(name, &["compare", "--config", &config(dir, name, extra, edits).display().to_string()], needles)
    };
    let at = |file: &str, line: usize| format!("{}:{line}", dir.join(file).display());
    let (a, shards_arg) = (dir.join("a").display().to_string(), shards.display().to_string());
    let perplexity = |name: &str, extra: &[&str], needles: &[&str]| {
        let mut args = vec!["perplexity", "--model", &a, "--shards", &shards_arg];
        args.extend(extra);
        llama_testkit::Case::new(name, &args, needles)
    };
    let small_help = format!("{}/help", small.display());
    let (broken, long, empty) =
        (dir.join("broken.jsonl").display().to_string(), dir.join("long.jsonl").display().to_string(), dir.join("empty.jsonl").display().to_string());
    let help_model = format!("helpfulness_model = \"{}/help\"", dir.display());
    let cases = vec![
        compare(
            "reward models of another vocabulary",
            "",
            &[(&help_model, &format!("helpfulness_model = \"{small_help}\""))],
            &["vocabulary", "reward models of another vocabulary.toml"],
        ),
        compare(
            "a judge template without the question",
            "[judge]\nmodel = \"x\"\ntemplate = \"Which is better: {answer_a} or {answer_b}?\"",
            &[],
            &["{question}"],
        ),
        compare("no prompts", "", &[(&safety, &empty)], &["empty.jsonl", "no prompts"]),
        compare("no resamples", "", &[("bootstrap_samples = 200", "bootstrap_samples = 0")], &["bootstrap_samples must be >= 1"]),
        compare("a prompt too long for the model", "", &[(&safety, &long)], &[&format!("{}:", at("long.jsonl", 2)), "max_seq_len"]),
        compare("invalid JSON in a prompt set", "", &[(&safety, &broken)], &[&at("broken.jsonl", 2), "invalid JSON"]),
        compare("an unknown baseline", "", &[("baseline = \"a\"", "baseline = \"z\"")], &["baseline", "z"]),
        compare("a missing model", "", &[(&format!("path = \"{}/b\"", dir.display()), "path = \"/nowhere/b\"")], &["/nowhere/b"]),
        compare("unknown key", "judges = 2", &[], &["judges"]),
        compare("a tool set that is not a prompt set", "[tools]\nsets = [\"arithmetic\"]", &[], &["tools.sets", "arithmetic", "helpfulness, safety"]),
        compare(
            "a search corpus that is not there",
            "[tools]\nsets = [\"safety\"]\nsearch_corpus = \"/nowhere/search.jsonl\"",
            &[],
            &["tools.search_corpus", "/nowhere/search.jsonl"],
        ),
        compare("a cap of no tool calls", "[tools]\nsets = [\"safety\"]\nmax_calls = 0", &[], &["tools.max_calls"]),
        compare("the tokenizer's chat template, which it does not have", "chat_template = \"tokenizer\"", &[], &["chat_template", "tokenizer_config.json"]),
        llama_testkit::Case::new(
            "a --model the config does not list",
            &["compare", "--config", &config(dir, "listed", "", &[]).display().to_string(), "--model", "z=/x"],
            &["--model z=", "listed.toml", "a, b"],
        ),
        llama_testkit::Case::new(
            "a --model without a name",
            &["compare", "--config", &config(dir, "noname", "", &[]).display().to_string(), "--model", "/x"],
            &["--model", "NAME=PATH"],
        ),
        llama_testkit::Case::new(
            "a --judge-model without a judge",
            &["compare", "--config", &config(dir, "nojudge", "", &[]).display().to_string(), "--judge-model", "/x"],
            &["--judge-model", "nojudge.toml"],
        ),
        llama_testkit::Case::new("a missing config", &["compare", "--config", &dir.join("nothere.toml").display().to_string()], &["nothere.toml"]),
        perplexity("windows longer than the model", &["--seq-len", "129"], &["--seq-len 129", "128"]),
        perplexity("zero-token windows", &["--seq-len", "0"], &["--seq-len 0"]),
        perplexity("shards of another tokenizer", &["--tokenizer", &other_tok.display().to_string()], &["manifest.json", "re-run prepare"]),
        llama_testkit::Case::new("missing shards", &["perplexity", "--model", &a, "--shards", "/nowhere/shards"], &["/nowhere/shards"]),
        llama_testkit::Case::new(
            "a model whose outputs overflow",
            &[
                "perplexity",
                "--model",
                &dir.join("huge").display().to_string(),
                "--shards",
                &shards_arg,
                "--tokenizer",
                &repo().join("data/tokenizer.json").display().to_string(),
            ],
            &["NaN", "not finite"],
        ),
        llama_testkit::Case::new("no subcommand", &[], &["Usage"]),
    ];
    llama_testkit::refuse_all(env!("CARGO_BIN_EXE_eval"), dir, &cases);
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
    let cfg =
        llama_data::prepare::PrepareConfig { show_progress: false, val_fraction: 0.2, ..llama_data::prepare::PrepareConfig::new(vec![src], shards.clone()) };
    llama_data::prepare::prepare(&cfg, &tok).unwrap();
    let config = LlamaConfig::new(32, 1, 2).with_vocab_size(2048).with_multiple_of(16).with_max_seq_len(128);
    let model = config.init(&Device::flex());
    let (ppl, tokens) = llama_eval::perplexity(&model, &shards, llama_data::Split::Val, 64, 16, 4).unwrap();
    assert_eq!(tokens, 16 * 64);
    assert!(ppl > 1500.0 && ppl < 2800.0, "{ppl}");
    let err = llama_eval::perplexity(&model, &tmp.path().join("none"), llama_data::Split::Val, 64, 16, 4).unwrap_err().to_string();
    assert!(err.contains("none"), "{err}");
    // From the command line, with the shards' own tokenizer named (another one is refused:
    // `eval_refuses_bad_input_and_touches_nothing_else`).
    let dir = tmp.path().join("model");
    llama_model::checkpoint::save_native(&model, &config, &dir).unwrap();
    let texts: Vec<String> =
        corpus.lines().take(20).map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string()).collect();
    llama_data::Tokenizer::train(texts.iter(), 300).unwrap().save(&dir.join("tokenizer.json")).unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_eval"))
            .args(["perplexity", "--model", dir.to_str().unwrap(), "--shards", shards.to_str().unwrap(), "--seq-len", "64", "--max-windows", "4"])
            .args(extra)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = run(&["--tokenizer", repo().join("data/tokenizer.json").to_str().unwrap()]);
    assert!(ok, "the shards' own tokenizer: {err}");
}
