//! Chat data: conversations, the Llama 2 chat template with its answer-only loss mask, loading
//! from JSONL or Parquet, and packing for supervised fine-tuning.
//!
//! The template is Meta's (`generation.py`, `chat_completion`): each user/assistant exchange is
//! `<s>[INST] {user} [/INST] {answer} </s>`, with the system prompt folded into the first user
//! message as `<<SYS>>\n{system}\n<</SYS>>\n\n{user}`, and each exchange is encoded as one
//! string, as Meta does, so the ids are Meta's for any tokenizer. Loss falls on answer tokens and
//! their EOS only (and not on answers marked `"train": false`, as Ghost Attention needs).

use std::path::Path;

use serde::{Deserialize, Serialize};

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

/// Which template chats render with (`data.chat_template`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatTemplateChoice {
    /// Llama 2's `[INST]` template, what the recipe trains (the default).
    #[default]
    Llama2,
    /// The checkpoint's own: the `chat_template` of its `tokenizer_config.json`, rendered by
    /// minijinja with Python's string methods (`.strip()`...), as `transformers` renders it.
    Tokenizer,
}

/// A Hugging Face Jinja chat template, compiled once: rendered with `messages` (role, content),
/// `bos_token`, `eos_token`, `add_generation_prompt`, Python's string methods (`.strip()`...,
/// minijinja-contrib's pycompat) and `raise_exception`, as `transformers` renders it.
///
/// A template is a program from a stranger's file, so each rendering has a budget: at most
/// [`TEMPLATE_FUEL`] instructions and [`TEMPLATE_OUTPUT_BYTES`] (plus four times the messages'
/// text) of output. Past either, the error names the template's file.
#[derive(Clone)]
pub struct JinjaTemplate {
    env: std::sync::Arc<minijinja::Environment<'static>>,
    /// The file the template came from, for errors.
    origin: String,
}

impl std::fmt::Debug for JinjaTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JinjaTemplate({})", self.origin)
    }
}

const TEMPLATE_NAME: &str = "chat_template";
/// Instructions one rendering may run: about a hundred per message for the templates of real
/// checkpoints, so conversations of thousands of turns fit, and a runaway loop ends in well
/// under a second.
pub const TEMPLATE_FUEL: u64 = 20_000_000;
/// Output one rendering may write beyond four times its messages' text.
pub const TEMPLATE_OUTPUT_BYTES: usize = 1 << 20;

impl JinjaTemplate {
    /// Compiles `source`, from the file `origin`; a syntax error names both.
    pub fn compile(source: &str, origin: &str) -> Result<Self, DataError> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template_owned(TEMPLATE_NAME, source.to_string()).map_err(|e| template_error(origin, e))?;
        Ok(Self { env: std::sync::Arc::new(env), origin: origin.to_string() })
    }

    fn render(&self, messages: &[Message], tokenizer: &Tokenizer, add_generation_prompt: bool) -> Result<String, DataError> {
        let role = |r: Role| match r {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        let text_bytes: usize = messages.iter().map(|m| m.content.len()).sum();
        let mut out = CappedOutput { bytes: Vec::new(), cap: TEMPLATE_OUTPUT_BYTES.saturating_add(text_bytes.saturating_mul(4)), over: false };
        let messages: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| minijinja::Value::from_pairs([("role", minijinja::Value::from(role(m.role))), ("content", minijinja::Value::from(m.content.as_str()))]))
            .collect();
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| template_error(&self.origin, e))?;
        let rendered = template.render_captured_to(
            minijinja::context! {
                messages => minijinja::Value::from(messages),
                bos_token => tokenizer.token_text(tokenizer.bos_id()).unwrap_or_default(),
                eos_token => tokenizer.token_text(tokenizer.eos_id()).unwrap_or_default(),
                add_generation_prompt => add_generation_prompt,
            },
            &mut out,
        );
        if out.over {
            return Err(DataError::Config(format!("{}: chat_template: the rendering grew past {} bytes", self.origin, out.cap)));
        }
        rendered.map_err(|e| template_error(&self.origin, e))?;
        String::from_utf8(out.bytes).map_err(|e| DataError::Config(format!("{}: chat_template: the rendering is not UTF-8: {e}", self.origin)))
    }
}

/// A rendering's output, refused past `cap` bytes.
struct CappedOutput {
    bytes: Vec<u8>,
    cap: usize,
    over: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.cap {
            self.over = true;
            return Err(std::io::Error::other("chat template output over its cap"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn template_error(origin: &str, e: minijinja::Error) -> DataError {
    let hint = if e.kind() == minijinja::ErrorKind::OutOfFuel { format!(" (the template ran more than {TEMPLATE_FUEL} instructions)") } else { String::new() };
    DataError::Config(format!("{origin}: chat_template: {e}{hint}"))
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

/// Reads conversations from `.jsonl` (one object per line) or `.parquet` (a `messages` column of
/// `list<struct<role, content>>`, or `prompt`/`response` string columns). Errors name the file
/// and line (or row).
pub fn load_conversations(path: &Path) -> Result<Vec<Conversation>, DataError> {
    load_checked(path, |_| Ok(()))
}

/// [`load_conversations`] for fine-tuning data: a conversation with no answer to learn from (only
/// a user turn, or every answer marked `"train": false`) is refused, naming the file and line,
/// since it would be read, packed and trained on without adding one token of loss.
pub fn load_training_conversations(path: &Path) -> Result<Vec<Conversation>, DataError> {
    load_checked(path, |c| {
        if c.exchanges().iter().any(|(_, answer)| answer.is_some_and(|a| a.train)) {
            Ok(())
        } else {
            Err("no assistant answer to train on (a fine-tuning chat needs at least one assistant turn that is not `\"train\": false`)".into())
        }
    })
}

/// Loads conversations and applies `check` to each; errors name the file and line (or row).
fn load_checked(path: &Path, check: impl Fn(&Conversation) -> Result<(), String>) -> Result<Vec<Conversation>, DataError> {
    let parse = |value: &serde_json::Value| Conversation::from_json(value).and_then(|c| check(&c).map(|()| c));
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "json") => llama_io::read_jsonl(path)?
            .map(|line| {
                let line = line?;
                parse(&line.value).map_err(|e| DataError::Input(format!("{}: {e}", line.at)))
            })
            .collect(),
        Some("parquet") => load_parquet(path, parse),
        _ => Err(DataError::Config(format!("{}: unsupported chat file; expected .jsonl or .parquet", path.display()))),
    }
}

fn load_parquet(path: &Path, parse: impl Fn(&serde_json::Value) -> Result<Conversation, String>) -> Result<Vec<Conversation>, DataError> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let err = |m: String| DataError::Input(format!("{}: {m}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| DataError::Io(format!("{}: {e}", path.display())))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| err(format!("not a readable Parquet file: {e}")))?
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut out = vec![];
    for batch in reader {
        let batch = batch.map_err(|e| err(e.to_string()))?;
        // Each row becomes the JSON form, so one parser validates both formats.
        for value in arrow_rows_to_json(&batch).map_err(err)? {
            let row = out.len();
            out.push(parse(&value).map_err(|e| err(format!("row {row}: {e}")))?);
        }
    }
    Ok(out)
}

/// Turns the `messages` / `prompt` / `response` / `system` columns of a batch into JSON rows.
fn arrow_rows_to_json(batch: &arrow_array::RecordBatch) -> Result<Vec<serde_json::Value>, String> {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_schema::DataType;
    let string_at = |col: &dyn Array, i: usize| -> Option<String> {
        match col.data_type() {
            DataType::Utf8 => Some(col.as_string::<i32>().value(i).to_string()),
            DataType::LargeUtf8 => Some(col.as_string::<i64>().value(i).to_string()),
            DataType::Utf8View => Some(col.as_string_view().value(i).to_string()),
            _ => None,
        }
    };
    let schema = batch.schema();
    let mut rows = vec![serde_json::Map::new(); batch.num_rows()];
    for (field, col) in schema.fields().iter().zip(batch.columns()) {
        match field.name().as_str() {
            "prompt" | "response" | "system" => {
                for (i, row) in rows.iter_mut().enumerate() {
                    if col.is_null(i) {
                        continue;
                    }
                    let s = string_at(col.as_ref(), i).ok_or(format!("column `{}` is not a string column", field.name()))?;
                    row.insert(field.name().clone(), s.into());
                }
            }
            "messages" => {
                let list = match col.data_type() {
                    DataType::List(_) => col.as_list::<i32>(),
                    other => return Err(format!("column `messages` has type {other}; expected list<struct<role, content>>")),
                };
                for (i, row) in rows.iter_mut().enumerate() {
                    let items = list.value(i);
                    let s = items.as_struct_opt().ok_or("`messages` items are not structs with role and content")?;
                    let role = s.column_by_name("role").ok_or("`messages` items have no `role`")?;
                    let content = s.column_by_name("content").ok_or("`messages` items have no `content`")?;
                    let msgs: Vec<serde_json::Value> =
                        (0..s.len()).map(|j| serde_json::json!({ "role": string_at(role.as_ref(), j), "content": string_at(content.as_ref(), j) })).collect();
                    row.insert("messages".into(), msgs.into());
                }
            }
            _ => {}
        }
    }
    Ok(rows.into_iter().map(serde_json::Value::Object).collect())
}

/// What to do with a conversation longer than a training sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Cut it to the sequence length (counted, with a warning).
    Truncate,
    /// Leave it out (counted, with a warning).
    Skip,
}

/// A packed training sequence: `seq_len + 1` ids, the loss mask of each *target* (ids[1..]), and
/// for each position the index of the conversation it belongs to (padding is `u32::MAX`).
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
    pub segment: Vec<u32>,
}

/// Packing statistics, reported to the user.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackStats {
    pub conversations: usize,
    pub truncated: usize,
    pub skipped: usize,
    pub sequences: usize,
    pub loss_tokens: usize,
}

/// Packs tokenized conversations whole into sequences of `seq_len + 1` tokens (a conversation
/// never straddles two sequences), padding the rest of each sequence with `pad` (masked).
pub fn pack(items: &[(Vec<u32>, Vec<bool>)], seq_len: usize, pad: u32, overlong: Overlong) -> (Vec<Packed>, PackStats) {
    let len = seq_len + 1;
    let mut stats = PackStats { conversations: items.len(), ..PackStats::default() };
    let mut out = vec![];
    let mut cur = Packed { ids: vec![], loss_mask: vec![], segment: vec![] };
    let flush = |cur: &mut Packed, out: &mut Vec<Packed>| {
        if cur.ids.is_empty() {
            return;
        }
        let n = len - cur.ids.len();
        cur.ids.extend(std::iter::repeat_n(pad, n));
        cur.loss_mask.extend(std::iter::repeat_n(false, n));
        cur.segment.extend(std::iter::repeat_n(u32::MAX, n));
        out.push(std::mem::replace(cur, Packed { ids: vec![], loss_mask: vec![], segment: vec![] }));
    };
    for (index, (ids, mask)) in items.iter().enumerate() {
        let (mut ids, mut mask) = (ids.clone(), mask.clone());
        if ids.len() > len {
            match overlong {
                Overlong::Skip => {
                    stats.skipped += 1;
                    continue;
                }
                Overlong::Truncate => {
                    stats.truncated += 1;
                    ids.truncate(len);
                    mask.truncate(len);
                }
            }
        }
        if cur.ids.len() + ids.len() > len {
            flush(&mut cur, &mut out);
        }
        cur.segment.extend(std::iter::repeat_n(index as u32, ids.len()));
        cur.ids.extend(ids);
        cur.loss_mask.extend(mask);
    }
    flush(&mut cur, &mut out);
    // The mask so far is per position; the loss of position t is on target ids[t + 1].
    for p in &mut out {
        p.loss_mask.remove(0);
        stats.loss_tokens += p.loss_mask.iter().filter(|&&m| m).count();
    }
    stats.sequences = out.len();
    (out, stats)
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
