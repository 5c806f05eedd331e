//! Tool use, as the Llama 2 paper describes it (section 5.1): the model decides when to call a
//! tool by writing the call in its answer (`<call>calculator(12 * 7)</call>`, the markup of
//! [`llama_data::tool_markup`]); generation stops there, the runtime runs the tool and appends
//! its result (`<result>84</result>`), and the model goes on. Tools: [`calculator`] and a
//! simulated [`search`] over a shipped corpus. A bad call (syntax error, unknown tool, division by
//! zero, a huge number) gets an `error: ...` result for the model to read, never a crash; a cap on
//! calls per answer ends an answer that keeps calling.

pub mod calculator;
pub mod search;

use llama_data::Tokenizer;
use llama_data::chat::Conversation;
use llama_data::tool_markup::{find_call, result_text};
use llama_model::Llama;
use llama_model::generate::{SamplingConfig, generate_in_slots, row_seed};

pub use search::SearchCorpus;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ToolError(pub String);

impl From<llama_data::DataError> for ToolError {
    fn from(e: llama_data::DataError) -> Self {
        Self(e.to_string())
    }
}

impl From<llama_model::ModelError> for ToolError {
    fn from(e: llama_model::ModelError) -> Self {
        Self(e.to_string())
    }
}

/// The tools a run offers, and the cap on calls per answer.
#[derive(Debug, Clone)]
pub struct Toolbox {
    /// `None`: `search` answers that no corpus is loaded.
    pub search: Option<SearchCorpus>,
    pub max_calls: usize,
}

/// The paper gives no cap; 4 is more than any shipped answer needs (one call each).
pub const DEFAULT_MAX_CALLS: usize = 4;

impl Toolbox {
    pub fn new(search: Option<SearchCorpus>, max_calls: usize) -> Self {
        Self { search, max_calls }
    }

    /// Runs one call, `name(argument)`, and returns what the model reads back.
    pub fn run(&self, call: &str) -> String {
        let call = call.trim();
        let Some((name, rest)) = call.split_once('(') else {
            return format!("error: a call is name(argument), got `{call}`");
        };
        let Some(argument) = rest.strip_suffix(')') else {
            return "error: the call's `(` is not closed by a final `)`".into();
        };
        match name.trim() {
            "calculator" => calculator::evaluate(argument).unwrap_or_else(|e| format!("error: {e}")),
            "search" => match &self.search {
                Some(corpus) => corpus.search(argument).map_or_else(|| "no result".into(), str::to_string),
                None => "error: search is not available".into(),
            },
            other => format!("error: unknown tool `{other}` (tools: calculator, search)"),
        }
    }
}

/// A prompt the runtime can go on from after a result.
pub trait Resumable {
    /// The ids of the prompt followed by `partial`, the answer so far (its leading space
    /// included, as [`Tokenizer::decode_after`] gives it), encoded as training encodes it.
    fn ids_with(&self, tokenizer: &Tokenizer, partial: &str) -> Result<Vec<u32>, ToolError>;
}

/// A chat: the answer to its last user turn, through the chat template.
impl Resumable for Conversation {
    fn ids_with(&self, tokenizer: &Tokenizer, partial: &str) -> Result<Vec<u32>, ToolError> {
        Ok(self.prompt_ids_with_answer(tokenizer, partial)?)
    }
}

/// Plain text to continue (`llama generate`): BOS, then the text and what follows it as one string.
pub struct TextPrompt(pub String);

impl Resumable for TextPrompt {
    fn ids_with(&self, tokenizer: &Tokenizer, partial: &str) -> Result<Vec<u32>, ToolError> {
        Ok(tokenizer.encode(&format!("{}{partial}", self.0), true, false)?)
    }
}

/// A stage's `tools` table: the search corpus and the cap on calls per answer.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolsConfig {
    /// The search tool's corpus (JSONL of `key`, `value`); without it, search calls get an error.
    #[serde(default)]
    pub search_corpus: Option<std::path::PathBuf>,
    #[serde(default = "default_max_calls")]
    pub max_calls: usize,
}

/// `max_calls` when a config leaves it out (serde's `default`).
pub fn default_max_calls() -> usize {
    DEFAULT_MAX_CALLS
}

impl ToolsConfig {
    /// The toolbox, its corpus loaded; `key` names the table in errors (e.g. `rejection_sampling.tools`).
    pub fn toolbox(&self, key: &str) -> Result<Toolbox, ToolError> {
        if self.max_calls == 0 {
            return Err(ToolError(format!("{key}.max_calls must be >= 1")));
        }
        let search = match &self.search_corpus {
            Some(path) => Some(SearchCorpus::load(path).map_err(|e| ToolError(format!("{key}.search_corpus: {e}")))?),
            None => None,
        };
        Ok(Toolbox::new(search, self.max_calls))
    }
}

/// What [`answer`] gives for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolAnswer {
    /// The answer's text, calls and results included (leading and trailing spaces trimmed);
    /// [`llama_data::tool_markup::visible_text`] gives it as a reader sees it.
    pub text: String,
    /// Calls run (a call past the cap ends the answer and is not run).
    pub calls: usize,
    pub call_limit_hit: bool,
    /// Tokens the model generated (results not counted).
    pub generated: usize,
    pub stopped_on_eos: bool,
    /// The ids the model saw last, prompt and answer (results included), EOS when it stopped on it.
    pub sequence: Vec<u32>,
}

/// Generates the continuation of a batch of prompts: the model, or a script in tests.
pub trait Continue {
    /// Continues row `i` from `prompts[i]` with at most `budgets[i]` tokens, sampling from an RNG
    /// seeded by `seeds[i]`, until EOS, the budget, or `stop(i, tokens so far)`. Returns each
    /// row's tokens and whether it stopped on EOS.
    fn continue_rows(
        &mut self,
        prompts: &[Vec<u32>],
        budgets: &[usize],
        seeds: &[u64],
        stop: &mut dyn FnMut(usize, &[u32]) -> bool,
    ) -> Result<Vec<(Vec<u32>, bool)>, ToolError>;
}

/// [`Continue`] with a model and its sampling settings (`max_new_tokens` and `seed` are set per
/// call from the budgets and seeds).
pub struct ModelContinue<'a> {
    pub model: &'a Llama,
    pub sampling: SamplingConfig,
    /// Rows decoded at once, a finished row's slot taken by the next waiting one
    /// ([`llama_model::generate::generate_in_slots`]; `usize::MAX`: every row in one batch).
    pub slots: usize,
}

impl Continue for ModelContinue<'_> {
    fn continue_rows(
        &mut self,
        prompts: &[Vec<u32>],
        budgets: &[usize],
        seeds: &[u64],
        stop: &mut dyn FnMut(usize, &[u32]) -> bool,
    ) -> Result<Vec<(Vec<u32>, bool)>, ToolError> {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let room = self.model.max_seq_len().saturating_sub(longest);
        let max_new = budgets.iter().copied().max().unwrap_or(0).min(room);
        if max_new == 0 {
            return Ok(vec![(vec![], false); prompts.len()]);
        }
        let config = SamplingConfig { max_new_tokens: max_new, ..self.sampling.clone() };
        let out =
            generate_in_slots(self.model, prompts, &config, seeds, self.slots, |_, _| {}, |row, tokens| tokens.len() >= budgets[row] || stop(row, tokens))?;
        Ok(out.tokens.into_iter().zip(out.stopped_on_eos).collect())
    }
}

/// Answers each prompt (the last user turn of a chat, or text to continue), running the tools the
/// answers call when `tools` is given (without: plain generation, the model writing any results
/// itself).
///
/// Each row's answer is generated in segments: a segment stops at a completed call, the tool's
/// result is appended, and the prompt with the answer so far is encoded again as one string
/// ([`Resumable::ids_with`]: for a chat, the ids training saw) for the next segment. Rows
/// are batched, and a row's tokens depend only on its own prompt, the seed and its index: row
/// `r` samples segment `k` with `row_seed(seed, r)` mixed with `k`, so segment 0 is what
/// [`llama_model::generate::generate`] gives, and a batch gives each row what it gets alone
/// (greedy), as long as its context does not fill. `max_new_tokens` counts generated tokens over
/// all segments; results do not count, but must fit `max_seq_len` with them.
pub fn answer<P: Resumable>(
    source: &mut dyn Continue,
    tokenizer: &Tokenizer,
    prompts: &[P],
    tools: Option<&Toolbox>,
    max_new_tokens: usize,
    max_seq_len: usize,
    seed: u64,
) -> Result<Vec<ToolAnswer>, ToolError> {
    answer_streaming(source, tokenizer, prompts, tools, max_new_tokens, max_seq_len, seed, None)
}

/// Where [`answer_streaming`] hands text: `(row, piece)`.
pub type TextSink<'a> = dyn FnMut(usize, &str) + 'a;

/// A segment's text up to the end of its first call, where the segment ends (all of it without
/// tools or a call).
fn through_call<'t>(text: &'t str, tools: Option<&Toolbox>) -> &'t str {
    tools.and(find_call(text, 0)).map_or(text, |call| &text[..call.end])
}

/// Hands `on_text` what `text` adds to `streamed` (nothing if it does not extend it: a later
/// token changed how earlier ones decode).
fn stream_rest(on_text: &mut TextSink, row: usize, streamed: &mut String, text: &str) {
    if let Some(new) = text.strip_prefix(streamed.as_str()).filter(|new| !new.is_empty()) {
        on_text(row, new);
        *streamed = text.to_string();
    }
}

/// [`answer`], with the answer's text handed to `on_text(row, piece)` as it is written (for
/// `llama chat --tools`; `None`: [`answer`]): the model's text token by token, as far as no later
/// token changes it ([`Tokenizer::settled_len`]; a call is cut at its `</call>`), and each result
/// when it is appended. The pieces of a row joined, trimmed, are its [`ToolAnswer::text`].
#[allow(clippy::too_many_arguments)]
pub fn answer_streaming<P: Resumable>(
    source: &mut dyn Continue,
    tokenizer: &Tokenizer,
    prompts: &[P],
    tools: Option<&Toolbox>,
    max_new_tokens: usize,
    max_seq_len: usize,
    seed: u64,
    mut on_text: Option<&mut TextSink>,
) -> Result<Vec<ToolAnswer>, ToolError> {
    struct Row {
        ids: Vec<u32>,
        partial: String,
        answer: ToolAnswer,
        done: bool,
    }
    let mut rows = prompts
        .iter()
        .map(|p| {
            let ids = p.ids_with(tokenizer, "")?;
            Ok(Row {
                answer: ToolAnswer { text: String::new(), calls: 0, call_limit_hit: false, generated: 0, stopped_on_eos: false, sequence: ids.clone() },
                ids,
                partial: String::new(),
                done: false,
            })
        })
        .collect::<Result<Vec<_>, ToolError>>()?;
    for segment in 0u64.. {
        let (mut active, mut budgets) = (vec![], vec![]);
        for (r, row) in rows.iter_mut().enumerate().filter(|(_, row)| !row.done) {
            // What is left of the answer's tokens, and of the context.
            let budget = max_new_tokens.saturating_sub(row.answer.generated).min(max_seq_len.saturating_sub(row.ids.len()));
            if budget == 0 {
                row.done = true;
            } else {
                active.push(r);
                budgets.push(budget);
            }
        }
        if active.is_empty() {
            break;
        }
        let batch: Vec<Vec<u32>> = active.iter().map(|&r| rows[r].ids.clone()).collect();
        let seeds: Vec<u64> = active.iter().map(|&r| row_seed(seed, r as u64) ^ segment.wrapping_mul(0xD1B5_4A32_D192_ED03)).collect();
        // What each active row's segment has handed `on_text` so far.
        let mut streamed = vec![String::new(); active.len()];
        // A row stops at the first complete call in what it generated in this segment.
        let mut stop = |i: usize, tokens: &[u32]| {
            if let Some(emit) = on_text.as_deref_mut()
                && let Ok(text) = tokenizer.decode_after(&batch[i], &tokens[..tokenizer.settled_len(tokens)])
            {
                stream_rest(emit, active[i], &mut streamed[i], through_call(&text, tools));
            }
            tools.is_some() && tokenizer.decode(tokens).is_ok_and(|t| find_call(&t, 0).is_some())
        };
        let outs = source.continue_rows(&batch, &budgets, &seeds, &mut stop)?;
        for ((i, &r), (tokens, eos)) in active.iter().enumerate().zip(outs) {
            let row = &mut rows[r];
            let text = tokenizer.decode_after(&row.ids, &tokens)?;
            if let Some(emit) = on_text.as_deref_mut() {
                // The segment's last tokens (`stop` is not asked after EOS or a spent budget).
                stream_rest(emit, r, &mut streamed[i], through_call(&text, tools));
            }
            row.answer.generated += tokens.len();
            row.answer.sequence = [row.ids.as_slice(), &tokens].concat();
            match (tools, find_call(&text, 0)) {
                (Some(toolbox), Some(call)) => {
                    // The call ends the segment; a token that ran past its `</call>` is cut.
                    row.partial.push_str(&text[..call.end]);
                    if row.answer.calls >= toolbox.max_calls {
                        row.answer.call_limit_hit = true;
                        row.done = true;
                    } else {
                        row.answer.calls += 1;
                        let result = result_text(&toolbox.run(&call.text));
                        if let Some(emit) = on_text.as_deref_mut() {
                            emit(r, &result);
                        }
                        row.partial.push_str(&result);
                        row.ids = prompts[r].ids_with(tokenizer, &row.partial)?;
                        row.answer.sequence = row.ids.clone();
                    }
                }
                _ => {
                    row.partial.push_str(&text);
                    row.answer.stopped_on_eos = eos;
                    row.done = true;
                }
            }
        }
    }
    Ok(rows.into_iter().map(|r| ToolAnswer { text: r.partial.trim().to_string(), ..r.answer }).collect())
}

#[cfg(test)]
mod tests {
    use super::Toolbox;
    use crate::SearchCorpus;

    #[test]
    fn calls_run_and_bad_calls_are_error_results() {
        let mut corpus = SearchCorpus::default();
        corpus.insert("capital of Veltria", "Morvan");
        let tools = Toolbox::new(Some(corpus), 4);
        assert_eq!(tools.run("calculator(12 * 7)"), "84");
        assert_eq!(tools.run(" calculator( 2026 - 1989 ) "), "37");
        assert_eq!(tools.run("search(capital of Veltria)"), "Morvan");
        assert_eq!(tools.run("search(capital of Nowhere)"), "no result");
        assert_eq!(tools.run("calculator(1 / 0)"), "error: division by zero");
        assert!(tools.run("calculator(99999999 * 99999999)").starts_with("error: number too large"));
        assert!(tools.run("weather(Paris)").starts_with("error: unknown tool `weather`"));
        assert!(tools.run("calculator 12 * 7").starts_with("error: a call is name(argument)"));
        assert!(tools.run("calculator(1 + (2").starts_with("error:"));
        assert_eq!(Toolbox::new(None, 4).run("search(x)"), "error: search is not available");
    }
}
