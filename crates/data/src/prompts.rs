//! Prompt sets (`{prompt | messages, is_safety, expected, group}` JSONL), which rejection sampling, PPO
//! and `eval compare` answer: loading with file:line errors and the length check against a model.

use std::path::Path;

use crate::Tokenizer;
use crate::chat::{Conversation, Message, Role};
use anyhow::bail;

/// One prompt with its safety tag.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub conversation: Conversation,
    pub is_safety: bool,
    /// Text a correct answer contains (the tiny data's fact), when the file gives one: a check of
    /// the answers that does not go through the reward models, to see reward hacking.
    pub expected: Option<String>,
    /// A label the evaluation reports the expected rate of separately (e.g. `known` and `cutoff`
    /// in the temporal set), when the file gives one.
    pub group: Option<String>,
    /// The line of the prompt file it came from (1-based), for messages.
    pub line: usize,
}

impl Prompt {
    /// The last user message: the question, for logs and data files.
    pub fn question(&self) -> String {
        self.conversation.exchanges().last().map(|(u, _)| u.content.clone()).unwrap_or_default()
    }

    /// Whether `answer` contains the expected text; `None` when the prompt has none.
    pub fn answer_is_expected(&self, answer: &str) -> Option<bool> {
        self.expected.as_ref().map(|e| answer.contains(e.as_str()))
    }
}

/// The share of `answers` (paired with `prompts`) that contain their prompt's expected text, over
/// the prompts that have one; `None` when none has.
pub fn expected_rate<'a>(prompts: impl IntoIterator<Item = &'a Prompt>, answers: &[String]) -> Option<f64> {
    let hits: Vec<bool> = prompts.into_iter().zip(answers).filter_map(|(p, a)| p.answer_is_expected(a)).collect();
    (!hits.is_empty()).then(|| hits.iter().filter(|&&h| h).count() as f64 / hits.len() as f64)
}

/// Reads prompts; a file with none is an error.
pub fn load_prompts(path: &Path) -> anyhow::Result<Vec<Prompt>> {
    let mut out = vec![];
    for line in llama_io::read_jsonl(path)? {
        let llama_io::JsonLine { at, line: n, value: v } = line?;
        let messages = match (v.get("prompt"), v.get("messages")) {
            (Some(serde_json::Value::String(p)), _) if !p.trim().is_empty() => vec![Message::new(Role::User, p.clone())],
            (_, Some(m)) => Conversation::from_json(&serde_json::json!({ "messages": m })).map_err(|e| anyhow::anyhow!("{at}: {e}"))?.messages,
            _ => bail!("{at}: expected a non-empty `prompt` string or `messages`"),
        };
        let conversation = Conversation { messages };
        conversation.validate().map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        // Optional fields: absent, null, or a non-empty string.
        let optional = |key: &str| match v.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(e)) if !e.is_empty() => Ok(Some(e.clone())),
            Some(other) => Err(anyhow::anyhow!("{at}: `{key}` must be a non-empty string (got {other})")),
        };
        let (expected, group) = (optional("expected")?, optional("group")?);
        out.push(Prompt { conversation, is_safety: v.get("is_safety").and_then(|b| b.as_bool()).unwrap_or(false), expected, group, line: n });
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// Refuses, before any work, a prompt of `path` that the model cannot answer in full: its tokens,
/// `max_new_tokens`, and the end-of-sequence token appended to an answer cut at that limit must
/// fit `max_seq_len`. The error names the file and line. Returns the longest such total.
pub fn check_prompt_lengths(prompts: &[Prompt], path: &Path, tokenizer: &Tokenizer, max_new_tokens: usize, max_seq_len: usize) -> anyhow::Result<usize> {
    let mut longest = 0;
    for p in prompts {
        let at = format!("{}:{}", path.display(), p.line);
        let n = p.conversation.prompt_ids(tokenizer).map_err(|e| anyhow::anyhow!("{at}: {e}"))?.len();
        let total = n + max_new_tokens + 1;
        if total > max_seq_len {
            bail!(
                "{at}: the prompt is {n} tokens; with max_new_tokens ({max_new_tokens}) and the end-of-sequence token appended to a cut answer that is {total}, more than the model's max_seq_len ({max_seq_len}): shorten or remove the prompt, or lower max_new_tokens"
            );
        }
        longest = longest.max(total);
    }
    Ok(longest)
}

/// Loads a prompt file and checks every prompt's length ([`check_prompt_lengths`]).
pub fn load_prompts_for(path: &Path, tokenizer: &Tokenizer, max_new_tokens: usize, max_seq_len: usize) -> anyhow::Result<Vec<Prompt>> {
    Ok(load_prompts_with_longest(path, tokenizer, max_new_tokens, max_seq_len)?.0)
}

/// [`load_prompts_for`], with the longest sequence a prompt and its answer can make (the prompt,
/// `max_new_tokens` and the end-of-sequence token).
pub fn load_prompts_with_longest(path: &Path, tokenizer: &Tokenizer, max_new_tokens: usize, max_seq_len: usize) -> anyhow::Result<(Vec<Prompt>, usize)> {
    let prompts = load_prompts(path)?;
    let longest = check_prompt_lengths(&prompts, path, tokenizer, max_new_tokens, max_seq_len)?;
    Ok((prompts, longest))
}
