//! Chat templates: which one a run renders with, and a Hugging Face Jinja template compiled
//! once and rendered under a budget (it is a program from a stranger's file).

use serde::{Deserialize, Serialize};

use super::{Message, Role};
use crate::{DataError, Tokenizer};

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

    pub(super) fn render(&self, messages: &[Message], tokenizer: &Tokenizer, add_generation_prompt: bool) -> Result<String, DataError> {
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
