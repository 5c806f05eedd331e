//! `eval compare`'s run file, as one TOML file.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::judge::DEFAULT_TEMPLATE;

/// An evaluation run, as one TOML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    pub tokenizer: PathBuf,
    /// `llama2` (Llama 2's template, the default) or `tokenizer` (the chat_template of the
    /// tokenizer_config.json beside the tokenizer, for a model that brings its own).
    #[serde(default)]
    pub chat_template: llama_data::chat::ChatTemplateChoice,

    pub helpfulness_model: PathBuf,
    pub safety_model: PathBuf,
    /// Prompt sets by name (JSONL: `prompt` or `messages`, optional `is_safety`).
    pub prompts: BTreeMap<String, PathBuf>,
    pub models: Vec<NamedModel>,
    /// Name of the model every other one is compared with.
    pub baseline: String,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0: greedy.
    #[serde(default)]
    pub temperature: f32,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "paper_safety_threshold")]
    pub safety_threshold: f64,
    /// A tie when the combined scores (logit) differ by at most this.
    #[serde(default = "default_tie_margin")]
    pub tie_margin: f64,
    #[serde(default = "default_bootstrap_samples")]
    pub bootstrap_samples: usize,
    #[serde(default)]
    pub judge: Option<JudgeConfig>,
    /// Prompt sets answered with the tools running (and again without, for the comparison).
    #[serde(default)]
    pub tools: Option<EvalTools>,
    pub out_dir: PathBuf,
}

impl EvalConfig {
    /// Whether prompt set `set` is answered with the tools running (named in `[tools] sets`).
    pub fn is_tool_set(&self, set: &str) -> bool {
        self.tools.as_ref().is_some_and(|t| t.sets.iter().any(|s| s == set))
    }

    /// Tokens per answer in the [tools] sets.
    pub fn tool_max_new_tokens(&self) -> usize {
        self.tools.as_ref().and_then(|t| t.max_new_tokens).unwrap_or(self.max_new_tokens)
    }

    /// Tokens per answer in prompt set `set`.
    pub fn max_new_tokens_of(&self, set: &str) -> usize {
        if self.is_tool_set(set) { self.tool_max_new_tokens() } else { self.max_new_tokens }
    }
}

/// `[tools]`: which prompt sets are answered with tool use, and the tools they get.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalTools {
    /// Names of `[prompts]` sets. Each is answered twice, tools running and tools off; its
    /// expected rate is read off the answer as a reader sees it (calls removed, results read in
    /// place: `llama_data::tool_markup::visible_text`).
    pub sets: Vec<String>,
    /// The search tool's corpus (JSONL of `key`, `value`); without it, search calls get an error.
    #[serde(default)]
    pub search_corpus: Option<PathBuf>,
    #[serde(default = "llama_tools::default_max_calls")]
    pub max_calls: usize,
    /// Tokens per answer in these sets (calls take some); default: `max_new_tokens`.
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

fn default_max_new_tokens() -> usize {
    32
}
fn paper_safety_threshold() -> f64 {
    0.15
}
fn default_tie_margin() -> f64 {
    0.1
}
fn default_bootstrap_samples() -> usize {
    1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedModel {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    pub model: PathBuf,
    #[serde(default = "default_judge_template")]
    pub template: String,
}

fn default_judge_template() -> String {
    DEFAULT_TEMPLATE.into()
}
