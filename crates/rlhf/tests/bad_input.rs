//! `rlhf` on bad input, as a user runs it: each case is refused with a non-zero exit, no panic, a
//! message naming the file and the key or line, and nothing in the fixture directory changed
//! (`llama_testkit::Case::refused`): no work is done before the inputs are known to be good.

use std::path::Path;

use burn::tensor::Device;
use llama_model::LlamaConfig;
use llama_reward::RewardModel;
use llama_testkit::{Case, repo};

const RLHF: &str = env!("CARGO_BIN_EXE_rlhf");

fn tiny(vocab: usize) -> LlamaConfig {
    LlamaConfig::new(32, 1, 2).with_vocab_size(vocab).with_multiple_of(16).with_max_seq_len(64)
}

/// A config of the random models in `dir`; `prompts` is a file in `dir` (or the shipped set when
/// empty); `extra` adds sections (a `[ppo]` there replaces the default one; one starting with
/// `[run]` adds keys to that section).
fn config(dir: &Path, name: &str, prompts: &str, extra: &str) -> String {
    let prompts = if prompts.is_empty() { repo().join("data/rlhf/prompts.jsonl") } else { dir.join(prompts) };
    let (extra, run) = match extra.strip_prefix("[run]\n") {
        Some(run) => ("", run),
        None => (extra, ""),
    };
    let ppo = if extra.contains("[ppo]") { "" } else { "[ppo]\niterations = 2\nbatch_size = 2\nminibatch_size = 2\nmax_new_tokens = 6\n" };
    let text = format!(
        "policy = \"{d}/policy\"\nhelpfulness_model = \"{d}/help\"\nsafety_model = \"{d}/safe\"\n[data]\ntokenizer = \"{r}/data/tokenizer.json\"\nprompts = \"{p}\"\neval_prompts = \"{r}/data/rlhf/eval_prompts.jsonl\"\n[rejection_sampling]\nrounds = 0\n{ppo}{extra}\n[run]\nout_dir = \"{d}/out-{name}\"\n{run}\n",
        d = dir.display(),
        r = repo().display(),
        p = prompts.display()
    );
    llama_testkit::write_config(dir, name, &text)
}

#[test]
fn rlhf_refuses_bad_input_and_touches_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let device = Device::flex();
    llama_model::checkpoint::save_native(&tiny(2048).init(&device), &tiny(2048), &dir.join("policy")).unwrap();
    for (name, vocab) in [("help", 2048), ("safe", 2048), ("help-small", 1000)] {
        llama_reward::save_reward_model(&RewardModel::new(&tiny(vocab), &device), &tiny(vocab), &dir.join(name)).unwrap();
    }
    let long = "the jury said ".repeat(20);
    let files = [
        ("long.jsonl", format!("{{\"prompt\": \"Hi\"}}\n{{\"prompt\": \"{long}\"}}\n")),
        ("broken.jsonl", "{\"prompt\": \"Hi\"}\n{\"prompt\": \n".to_string()),
        ("empty.jsonl", "\n\n".to_string()),
        ("expected.jsonl", "{\"prompt\": \"Hi?\", \"expected\": 3}\n".to_string()),
        ("noprompt.jsonl", "{\"question\": \"Hi?\"}\n".to_string()),
        ("answered.jsonl", "{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\"}]}\n".to_string()),
    ];
    for (name, text) in &files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let at = |file: &str, line: usize| format!("{}:{line}", dir.join(file).display());
    let with = |name: &str, prompts: &str, extra: &str, needles: &[&str]| Case::new(name, &["--config", &config(dir, name, prompts, extra)], needles);
    // The default [ppo] section with `key = value` set (replacing the default's value, if any).
    let ppo = |name: &str, setting: &str, needles: &[&str]| {
        let key = setting.split(" = ").next().unwrap();
        let mut lines: Vec<String> = ["iterations = 2", "batch_size = 2", "minibatch_size = 2", "max_new_tokens = 6"]
            .iter()
            .filter(|l| !l.starts_with(&format!("{key} ")))
            .map(|l| l.to_string())
            .collect();
        lines.push(setting.to_string());
        with(name, "", &format!("[ppo]\n{}\n", lines.join("\n")), needles)
    };
    let cases = vec![
        // Prompt files: the file and line, before any work.
        with("a prompt too long for the model", "long.jsonl", "", &[&at("long.jsonl", 2), "max_seq_len (64)"]),
        with("invalid JSON", "broken.jsonl", "", &[&at("broken.jsonl", 2), "invalid JSON"]),
        with("no prompts", "empty.jsonl", "", &["empty.jsonl", "no prompts"]),
        with("expected not a string", "expected.jsonl", "", &[&at("expected.jsonl", 1), "`expected` must be a non-empty string"]),
        with("no prompt field", "noprompt.jsonl", "", &[&at("noprompt.jsonl", 1), "`prompt`"]),
        with("a conversation that starts with an answer", "answered.jsonl", "", &[&at("answered.jsonl", 1)]),
        with("a missing prompt file", "nothere.jsonl", "", &["nothere.jsonl"]),
        // PPO settings.
        ppo("sampling at another temperature", "temperature = 0.7", &["ppo.temperature must be 1.0"]),
        ppo("no new tokens", "max_new_tokens = 0", &["ppo.max_new_tokens"]),
        ppo("a value-loss weight", "value_coef = 0.1", &["ppo.value_coef", "ppo.value_lr"]),
        ppo("negative weight decay", "weight_decay = -0.1", &["ppo.weight_decay"]),
        ppo("batch not a multiple of the minibatch", "batch_size = 3", &["ppo.batch_size (3)", "ppo.minibatch_size (2)"]),
        ppo("a warm-up as long as the run", "value_warmup = 2", &["ppo.value_warmup (2) must be below ppo.iterations (2)"]),
        ppo("zero LR", "lr = 0.0", &["ppo.lr"]),
        ppo("no checkpoint kept", "keep_checkpoints = 0", &["ppo.keep_checkpoints"]),
        ppo("unknown key", "kl_coef = 0.1", &["kl_coef"]),
        with("no samples per round", "", "[rejection_sampling]\nrounds = 1\nk = 0\n", &["rejection_sampling"]),
        with(
            "a search corpus that is not there",
            "",
            &format!("[rejection_sampling.tools]\nsearch_corpus = \"{}/nowhere.jsonl\"\n", dir.display()),
            &["rejection_sampling.tools.search_corpus", "nowhere.jsonl"],
        ),
        with("a cap of no tool calls", "", "[rejection_sampling.tools]\nmax_calls = 0\n", &["rejection_sampling.tools.max_calls"]),
        with("a zero evaluation temperature", "", "[eval]\ntemperature = 0.0\n", &["eval.temperature"]),
        with("f16, which PPO cannot scale", "", "[run]\ndtype = \"f16\"\n", &["run.dtype", "bf16"]),
        // PPO's launch check: its five models and the rollout's cache against the device.
        with(
            "PPO that does not fit its device",
            "",
            "[run]\ndevice_memory_gib = 0.000001\n",
            &["PPO needs about", "reward models", "KV cache", "run.device_memory_gib"],
        ),
        // Models.
        Case::new(
            "a reward model of another vocabulary",
            &["--config", &config(dir, "vocab", "", ""), "--helpfulness-model", &dir.join("help-small").display().to_string()],
            &["help-small", "vocabulary", "helpfulness_model"],
        ),
        Case::new(
            "the tokenizer's chat template, which it does not have",
            &["--config", &{
                let path = config(dir, "template", "", "");
                let text = std::fs::read_to_string(&path).unwrap().replace("[data]\n", "[data]\nchat_template = \"tokenizer\"\n");
                std::fs::write(&path, text).unwrap();
                path
            }],
            &["template.toml", "data.chat_template", "tokenizer_config.json"],
        ),
        Case::new("a missing policy", &["--config", &config(dir, "nopolicy", "", ""), "--policy", &dir.join("nowhere").display().to_string()], &["nowhere"]),
        Case::new("a missing config", &["--config", &dir.join("nothere.toml").display().to_string()], &["nothere.toml"]),
    ];
    llama_testkit::refuse_all(RLHF, dir, &cases);
}
