//! Chat data: conversations, the Llama 2 chat template with its answer-only loss mask, loading
//! from JSONL or Parquet, and packing for supervised fine-tuning.
//!
//! The template is Meta's (`generation.py`, `chat_completion`): each user/assistant exchange is
//! `<s>[INST] {user} [/INST] {answer} </s>`, with the system prompt folded into the first user
//! message as `<<SYS>>\n{system}\n<</SYS>>\n\n{user}`, and each exchange is encoded as one
//! string, as Meta does, so the ids are Meta's for any tokenizer. Loss falls on answer tokens and
//! their EOS only (and not on answers marked `"train": false`, as Ghost Attention needs).
//!
//! By job: this file holds the conversation and its rendering and tokenization; [`template`]
//! the template choice and Jinja templates, [`load`] the files, [`pack`] the packing.

mod load;
mod pack;
mod template;

use serde::{Deserialize, Serialize};

pub use load::{load_conversations, load_training_conversations};
pub use pack::{Overlong, PackStats, Packed, pack};
pub use template::{ChatTemplateChoice, JinjaTemplate, TEMPLATE_FUEL, TEMPLATE_OUTPUT_BYTES};

use crate::{DataError, Tokenizer, tool_markup};

pub const B_INST: &str = "[INST]";
pub const E_INST: &str = "[/INST]";
pub const B_SYS: &str = "<<SYS>>\n";
pub const E_SYS: &str = "\n<</SYS>>\n\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// For assistant messages: whether the answer is trained on (default true).
    #[serde(default = "trained_by_default", skip_serializing_if = "is_true")]
    pub train: bool,
}

fn trained_by_default() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), train: true }
    }
}

/// One user/assistant exchange rendered with the template ([`Conversation::render_exchanges`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedExchange {
    pub text: String,
    /// Byte offset in `text` where the answer begins (its leading space), if it has one.
    pub answer_at: Option<usize>,
    /// Whether the answer carries loss.
    pub trained: bool,
}

/// A validated conversation: an optional system message, then user/assistant turns alternating,
/// starting with a user turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

impl Conversation {
    /// For `overlong = "truncate"`: this conversation cut to the text its first `tokens` tokens
    /// can come from, so that a huge chat is not tokenized whole only to be truncated (None: it
    /// is short enough already). A token covers at most `max_token_bytes` bytes of text, so the
    /// first `tokens` tokens lie in the first `tokens * max_token_bytes` bytes; twice that plus
    /// 4 KiB is kept, so a word cut at the end is far past them. Messages after the cut go.
    pub fn cut_for(&self, tokens: usize, max_token_bytes: usize) -> Option<Conversation> {
        let budget = tokens.saturating_mul(max_token_bytes.max(1)).saturating_mul(2).saturating_add(4096);
        if self.messages.iter().map(|m| m.content.len()).sum::<usize>() <= budget {
            return None;
        }
        let (mut messages, mut left) = (vec![], budget);
        for m in &self.messages {
            if m.content.len() <= left {
                left -= m.content.len();
                messages.push(m.clone());
                continue;
            }
            let mut at = left;
            while !m.content.is_char_boundary(at) {
                at -= 1;
            }
            messages.push(Message { content: m.content[..at].to_string(), ..m.clone() });
            break;
        }
        Some(Conversation { messages })
    }

    /// Parses `{"messages": [...]}` or `{"prompt": ..., "response": ..., "system"?: ...}`.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, String> {
        let messages = if let Some(list) = value.get("messages") {
            let list = list.as_array().ok_or("`messages` is not a list")?;
            list.iter()
                .enumerate()
                .map(|(i, m)| {
                    let role = m.get("role").and_then(|r| r.as_str()).ok_or(format!("message {i} has no `role`"))?;
                    let role = match role {
                        "system" => Role::System,
                        "user" => Role::User,
                        "assistant" => Role::Assistant,
                        other => return Err(format!("message {i} has unknown role `{other}` (expected system, user or assistant)")),
                    };
                    let content = m.get("content").and_then(|c| c.as_str()).ok_or(format!("message {i} has no string `content`"))?;
                    let train = m.get("train").and_then(|t| t.as_bool()).unwrap_or(true);
                    Ok(Message { role, content: content.to_string(), train })
                })
                .collect::<Result<Vec<_>, String>>()?
        } else if let (Some(p), Some(r)) = (value.get("prompt"), value.get("response")) {
            let p = p.as_str().ok_or("`prompt` is not a string")?;
            let r = r.as_str().ok_or("`response` is not a string")?;
            let mut m = vec![];
            if let Some(s) = value.get("system").and_then(|s| s.as_str()) {
                m.push(Message::new(Role::System, s));
            }
            m.push(Message::new(Role::User, p));
            m.push(Message::new(Role::Assistant, r));
            m
        } else {
            return Err("expected `messages`, or `prompt` and `response`".into());
        };
        let c = Self { messages };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        let turns = self.turns_start();
        if self.messages.len() <= turns {
            return Err("empty conversation (no user turn)".into());
        }
        for (i, m) in self.messages.iter().enumerate().skip(turns) {
            let want = if (i - turns).is_multiple_of(2) { Role::User } else { Role::Assistant };
            if m.role == Role::System {
                return Err(format!("message {i}: a system message may only come first"));
            }
            if m.role != want {
                return Err(format!("message {i} is {:?} but {:?} was expected (turns must alternate, starting with the user)", m.role, want));
            }
        }
        Ok(())
    }

    fn turns_start(&self) -> usize {
        usize::from(self.messages.first().is_some_and(|m| m.role == Role::System))
    }

    pub fn system(&self) -> Option<&str> {
        (self.turns_start() == 1).then(|| self.messages[0].content.as_str())
    }

    /// (user, assistant) exchanges; the last may have no answer (a prompt to complete).
    pub fn exchanges(&self) -> Vec<(&Message, Option<&Message>)> {
        let turns = &self.messages[self.turns_start()..];
        turns.chunks(2).map(|c| (&c[0], c.get(1))).collect()
    }

    /// Each exchange as the one string Meta's `chat_completion` encodes:
    /// `[INST] {user} [/INST] {answer} ` (without the answer for a last, unanswered turn). BOS
    /// goes before each and EOS after each answered one, as ids.
    pub fn render_exchanges(&self) -> Vec<RenderedExchange> {
        self.exchanges()
            .into_iter()
            .enumerate()
            .map(|(i, (user, answer))| {
                let user_text = match (i, self.system()) {
                    (0, Some(system)) => format!("{B_SYS}{}{E_SYS}{}", system.trim(), user.content.trim()),
                    _ => user.content.trim().to_string(),
                };
                let prompt = format!("{B_INST} {user_text} {E_INST}");
                match answer {
                    Some(a) => RenderedExchange { answer_at: Some(prompt.len()), text: format!("{prompt} {} ", a.content.trim()), trained: a.train },
                    None => RenderedExchange { text: prompt, answer_at: None, trained: false },
                }
            })
            .collect()
    }

    /// The whole rendered text, `<s>` and `</s>` included (for display and golden tests).
    pub fn render_text(&self) -> String {
        self.render_exchanges().into_iter().map(|e| format!("<s>{}{}", e.text, if e.answer_at.is_some() { "</s>" } else { "" })).collect()
    }

    /// Token ids and, per id, whether it is an answer token that carries loss.
    ///
    /// Each exchange is encoded as one string (so a tokenizer that prepends `▁` does it once per
    /// exchange, as SentencePiece does in Meta's code, and the answer's first word keeps its `▁`);
    /// the answer's tokens are those that start at or after the space before the answer, by the
    /// tokenizer's offsets. The answer's EOS carries loss too; a token that carries any character
    /// of a tool result only (`<result>...</result>`, which the runtime writes) carries none.
    pub fn tokenize(&self, tokenizer: &Tokenizer) -> Result<(Vec<u32>, Vec<bool>), DataError> {
        if let Some(template) = tokenizer.chat_template() {
            return self.tokenize_jinja(template, tokenizer);
        }
        self.tokenize_llama2(tokenizer, None)
    }

    /// Llama 2's encoding; `partial` is text the last, unanswered exchange's answer begins with
    /// (its leading space included, as it follows `[/INST]`), for generation to go on from.
    fn tokenize_llama2(&self, tokenizer: &Tokenizer, partial: Option<&str>) -> Result<(Vec<u32>, Vec<bool>), DataError> {
        let (mut ids, mut mask) = (vec![], vec![]);
        for mut exchange in self.render_exchanges() {
            ids.push(tokenizer.bos_id());
            mask.push(false);
            if let (None, Some(partial)) = (exchange.answer_at, partial) {
                exchange.text.push_str(partial);
            }
            let (piece, offsets) = tokenizer.encode_with_offsets(&exchange.text)?;
            let results = exchange.answer_at.map_or(vec![], |at| tool_markup::result_spans(&exchange.text, at..exchange.text.len()));
            let in_answer = |(start, end): (usize, usize)| {
                exchange.trained && exchange.answer_at.is_some_and(|at| start >= at) && !results.iter().any(|r| within((start, end), r))
            };
            mask.extend(offsets.iter().map(|&o| in_answer(o)));
            ids.extend(piece);
            if exchange.answer_at.is_some() {
                ids.push(tokenizer.eos_id());
                mask.push(exchange.trained);
            }
        }
        Ok((ids, mask))
    }

    /// [`Conversation::tokenize`] with the tokenizer's own Jinja template. The whole chat is
    /// rendered and encoded once; answer `i` is the text that rendering the messages up to it
    /// adds to rendering those before it with the generation prompt (so its end-of-turn tokens
    /// are the answer's, as Llama 2's EOS is), and its tokens are those whose offsets overlap it.
    fn tokenize_jinja(&self, template: &JinjaTemplate, tokenizer: &Tokenizer) -> Result<(Vec<u32>, Vec<bool>), DataError> {
        let whole = template.render(&self.messages, tokenizer, false)?;
        let (mut spans, mut results) = (vec![], vec![]);
        for (i, m) in self.messages.iter().enumerate() {
            if m.role != Role::Assistant || !m.train {
                continue;
            }
            let before = template.render(&self.messages[..i], tokenizer, true)?;
            let through = template.render(&self.messages[..=i], tokenizer, false)?;
            if !through.starts_with(&before) || !whole.starts_with(&through) {
                return Err(DataError::Config(
                    "chat_template: rendering a conversation does not extend the rendering of its beginning, so the answer tokens cannot be found (use chat_template = \"llama2\")".into(),
                ));
            }
            results.extend(tool_markup::result_spans(&whole, before.len()..through.len()));
            spans.push(before.len()..through.len());
        }
        let (ids, offsets) = tokenizer.encode_with_offsets(&whole)?;
        // A token that carries any of an answer's text is trained (one may also carry the end
        // of the header before it, e.g. `\nH`, where the tokenizer merges across the boundary),
        // unless it is made of a tool result's text only.
        let mask = offsets.iter().map(|&o| spans.iter().any(|s| overlaps(o, s)) && !results.iter().any(|r| within(o, r))).collect();
        Ok((ids, mask))
    }

    /// The prompt to generate an answer for the last user turn: every exchange rendered, the
    /// last without its answer (with the tokenizer's template: its generation prompt).
    pub fn prompt_ids(&self, tokenizer: &Tokenizer) -> Result<Vec<u32>, DataError> {
        self.prompt_ids_with_answer(tokenizer, "")
    }

    /// [`Conversation::prompt_ids`] with the answer begun: `partial` is the text that follows
    /// the generation prompt (its leading space included, as [`Tokenizer::decode_after`] gives
    /// it), encoded with the prompt as one string, as training encodes the whole answer, so that
    /// generation goes on (after a tool result, say) from the ids training saw.
    pub fn prompt_ids_with_answer(&self, tokenizer: &Tokenizer, partial: &str) -> Result<Vec<u32>, DataError> {
        let mut c = self.clone();
        if c.messages.last().is_some_and(|m| m.role == Role::Assistant) {
            c.messages.pop();
        }
        if let Some(template) = tokenizer.chat_template() {
            let text = template.render(&c.messages, tokenizer, true)? + partial;
            return Ok(tokenizer.encode_with_offsets(&text)?.0);
        }
        Ok(c.tokenize_llama2(tokenizer, Some(partial))?.0)
    }
}

/// Whether a token's byte range meets `span` (a zero-width token: whether it sits inside it).
fn overlaps((start, end): (usize, usize), span: &std::ops::Range<usize>) -> bool {
    start < span.end && (end > span.start || (start == end && start >= span.start))
}

/// Whether the token at byte range `(start, end)` is made of `span`'s text only: a tool result's
/// token carries no loss, but one that also carries the model's own text is trained (byte-level
/// BPE joins `</call>` and `<result>` into `... call`, `><`, `result ...`: the model must write
/// that `><`, and the runtime cuts it at `</call>`).
fn within((start, end): (usize, usize), span: &std::ops::Range<usize>) -> bool {
    span.start <= start && end <= span.end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(json: &str) -> Result<Conversation, String> {
        Conversation::from_json(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn template_strings_are_meta_s() {
        let single = conv(r#"{"prompt": "Hi there", "response": "Hello!"}"#).unwrap();
        assert_eq!(single.render_text(), "<s>[INST] Hi there [/INST] Hello! </s>");
        let sys = conv(
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#,
        )
        .unwrap();
        assert_eq!(sys.render_text(), "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s>");
        let multi = conv(
            r#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]}"#,
        )
        .unwrap();
        assert_eq!(multi.render_text(), "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nA [/INST] B </s><s>[INST] C [/INST] D </s>");
    }

    #[test]
    fn bad_conversations_are_named() {
        assert!(conv(r#"{"messages": [{"role": "robot", "content": "x"}]}"#).unwrap_err().contains("unknown role `robot`"));
        assert!(conv(r#"{"messages": [{"role": "assistant", "content": "x"}]}"#).unwrap_err().contains("expected"));
        assert!(conv(r#"{"messages": []}"#).unwrap_err().contains("empty"));
        assert!(conv(r#"{"messages": [{"role": "system", "content": "x"}]}"#).unwrap_err().contains("empty"));
        assert!(conv(r#"{"text": "x"}"#).unwrap_err().contains("messages"));
    }

    #[test]
    fn packing_keeps_conversations_whole_and_shifts_the_mask_to_targets() {
        let items = vec![
            (vec![1, 10, 11, 2], vec![false, false, true, true]),
            (vec![1, 20, 21, 22, 2], vec![false, false, false, true, true]),
            (vec![1; 9], vec![true; 9]),
        ];
        let (packed, stats) = pack(&items, 7, 0, Overlong::Skip);
        assert_eq!(stats.skipped, 1);
        assert_eq!(packed.len(), 2, "4 + 5 tokens do not fit in one window of 8");
        assert_eq!(packed[0].ids, vec![1, 10, 11, 2, 0, 0, 0, 0]);
        assert_eq!(packed[0].loss_mask, vec![false, true, true, false, false, false, false]);
        assert_eq!(packed[0].segment, vec![0, 0, 0, 0, u32::MAX, u32::MAX, u32::MAX, u32::MAX]);
        assert_eq!(stats.loss_tokens, 2 + 2);
        let (packed, stats) = pack(&items, 7, 0, Overlong::Truncate);
        assert_eq!((stats.truncated, packed.len()), (1, 3));
        assert_eq!(packed[2].ids.len(), 8);
    }
}
