//! `llama chat`: a conversation in the terminal through the Llama 2 chat template, the same
//! rendering (`llama_data::chat`) that `sft` trains on. Each user line becomes a turn, the whole
//! conversation is rendered again and the answer is streamed as it is generated. Old exchanges
//! are dropped, with a notice, when the conversation and the answer would not fit the model's
//! context. Reads stdin, so a script can pipe a conversation in. With `--tools` the calls the
//! model writes are run (`llama_tools`), their results streamed into the answer as they come.

use std::io::{IsTerminal, Write};

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use llama_data::Tokenizer;
use llama_data::chat::{Conversation, Message, Role};
use llama_model::Llama;
use llama_model::generate::{SamplingConfig, generate_streaming};
use llama_model::{checkpoint, device};

use crate::{SamplingArgs, ToolArgs};

/// Typed on a line of its own.
pub const RESET: &str = "/reset";
pub const QUIT: &[&str] = &["/quit", "/exit"];

pub struct ChatOptions {
    pub system: Option<String>,
    pub sampling: SamplingConfig,
    /// Print each rendered prompt to stderr (what the model is given).
    pub show_prompt: bool,
    /// Run the tool calls the model writes (`--tools`); the answer is streamed with its calls
    /// and results.
    pub tools: Option<llama_tools::Toolbox>,
}

/// Runs the conversation on stdin until it ends or `/quit`.
pub fn chat(model: &Llama, max_seq_len: usize, tokenizer: &Tokenizer, options: &ChatOptions) -> Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let mut stdout = std::io::stdout();
    if interactive {
        eprintln!("chat: type a message and Enter; {RESET} starts over, {} or Ctrl-D ends", QUIT.join(" or "));
    }
    let fresh = || {
        let mut messages = vec![];
        if let Some(system) = &options.system {
            messages.push(Message::new(Role::System, system.clone()));
        }
        messages
    };
    let mut messages = fresh();
    let mut turn = 0u64;
    let stdin = std::io::stdin();
    let mut stdin = stdin.lock();
    let max_line = llama_io::max_line_bytes();
    let mut line_number = 0u64;
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = llama_io::read_line_bounded(&mut stdin, max_line).context("reading stdin")? else { break };
        line_number += 1;
        // A bad line is skipped with a word, not the end of the conversation.
        let line = match line {
            llama_io::BoundedLine::Line(bytes) => match String::from_utf8(bytes) {
                Ok(line) => line,
                Err(e) => {
                    eprintln!("(stdin line {line_number} is not valid UTF-8 at byte {}: skipped)", e.utf8_error().valid_up_to());
                    continue;
                }
            },
            llama_io::BoundedLine::TooLong => {
                eprintln!("(stdin line {line_number} is longer than {max_line} bytes: skipped)");
                continue;
            }
        };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if QUIT.contains(&text) {
            break;
        }
        if text == RESET {
            messages = fresh();
            eprintln!("(conversation reset)");
            continue;
        }
        messages.push(Message::new(Role::User, text));
        let Some(prompt) = fit(&mut messages, max_seq_len, options.sampling.max_new_tokens, tokenizer, options.system.is_some())? else {
            eprintln!(
                "(this message alone does not fit the model's {max_seq_len} positions with {} new tokens: not answered)",
                options.sampling.max_new_tokens
            );
            messages.pop();
            continue;
        };
        if options.show_prompt {
            // Llama 2's rendering as text; a tokenizer's own template: the prompt's ids decoded.
            let shown = match tokenizer.chat_template() {
                Some(_) => tokenizer.inner().decode(&prompt, false).unwrap_or_default(),
                None => Conversation { messages: messages.clone() }.render_text(),
            };
            eprintln!("prompt: {shown}");
        }
        // Each turn its own seed, so a turn replays as `llama generate` with the same seed would.
        let sampling = SamplingConfig { seed: options.sampling.seed.wrapping_add(turn), ..options.sampling.clone() };
        if let Some(toolbox) = &options.tools {
            // Row 0's seed in the runtime is the seed itself, as in the streamed path.
            let mut source = llama_tools::ModelContinue { model, sampling: sampling.clone(), slots: usize::MAX };
            let chat = [Conversation { messages: messages.clone() }];
            // Streamed as the runtime settles it, the answer's leading spaces left out (the
            // answer kept is trimmed).
            let mut begun = false;
            let mut show = |_: usize, piece: &str| {
                let piece = if begun { piece } else { piece.trim_start() };
                begun |= !piece.is_empty();
                print!("{piece}");
                let _ = stdout.flush();
            };
            let reply = llama_tools::answer_streaming(
                &mut source,
                tokenizer,
                &chat,
                Some(toolbox),
                sampling.max_new_tokens,
                max_seq_len,
                sampling.seed,
                Some(&mut show),
            )?
            .remove(0);
            println!();
            messages.push(Message::new(Role::Assistant, reply.text));
            turn += 1;
            continue;
        }
        let mut answer: Vec<u32> = vec![];
        let mut printed = String::new();
        generate_streaming(model, &[prompt], &sampling, |_, token| {
            answer.push(token);
            // Printed as far as no later token changes it (byte-fallback tokens decode as a group).
            if let Ok(text) = tokenizer.decode(&answer[..tokenizer.settled_len(&answer)]) {
                print_rest(&mut stdout, &mut printed, text);
            }
        })?;
        let reply = tokenizer.decode(&answer)?;
        print_rest(&mut stdout, &mut printed, reply.clone());
        println!();
        messages.push(Message::new(Role::Assistant, reply.trim()));
        turn += 1;
    }
    Ok(())
}

/// Prints what `text` adds to what is already `printed` (nothing if it does not extend it).
fn print_rest(out: &mut std::io::Stdout, printed: &mut String, text: String) {
    if let Some(new) = text.strip_prefix(printed.as_str()) {
        print!("{new}");
        let _ = out.flush();
        *printed = text;
    }
}

/// The generation prompt of `messages` (ending with a user turn), after dropping the oldest
/// exchanges (never the system prompt or the last turn) until it and `new_tokens` fit
/// `max_seq_len`; None if the last turn alone does not fit.
fn fit(messages: &mut Vec<Message>, max_seq_len: usize, new_tokens: usize, tokenizer: &Tokenizer, has_system: bool) -> Result<Option<Vec<u32>>> {
    let first_turn = usize::from(has_system);
    loop {
        let ids = Conversation { messages: messages.clone() }.prompt_ids(tokenizer)?;
        if ids.len() + new_tokens <= max_seq_len {
            return Ok(Some(ids));
        }
        if messages.len() - first_turn <= 1 {
            return Ok(None);
        }
        messages.drain(first_turn..first_turn + 2);
        eprintln!("(the conversation is longer than the model's {max_seq_len} positions: the oldest exchange is dropped)");
    }
}

/// The `llama chat` command line.
#[derive(clap::Args)]
pub struct ChatArgs {
    /// Checkpoint directory (native, Hugging Face, or a run directory: its newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// tokenizer.json (default: the tokenizer.json of the checkpoint, which training writes into each).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// System prompt, folded into the first user turn as Llama 2 does.
    #[arg(long)]
    pub system: Option<String>,
    /// `llama2` (the template the recipe trains) or `tokenizer` (the chat_template of the
    /// tokenizer_config.json beside the tokenizer, for a model that brings its own).
    #[arg(long, default_value = "llama2")]
    pub chat_template: String,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print each rendered prompt (what the model is given) to stderr.
    #[arg(long)]
    pub show_prompt: bool,
    #[command(flatten)]
    pub tools: ToolArgs,
}

/// `llama chat`.
pub fn run(args: ChatArgs) -> Result<()> {
    let ChatArgs { checkpoint: dir, tokenizer, system, chat_template, max_new_tokens, sampling, show_prompt, tools } = args;
    let toolbox = tools.toolbox()?;
    let device = device::parse(&sampling.device)?;
    let template = match chat_template.as_str() {
        "llama2" => llama_data::chat::ChatTemplateChoice::Llama2,
        "tokenizer" => llama_data::chat::ChatTemplateChoice::Tokenizer,
        other => bail!("--chat-template `{other}`: allowed values: llama2, tokenizer"),
    };
    let (tok, tokenizer_origin) = crate::load_tokenizer(&dir, tokenizer)?;
    let tok = tok.with_chat_template(template).context("--chat-template")?;
    let sampling = sampling.config(max_new_tokens, Some(tok.eos_id()))?;
    let (config, model) = checkpoint::load(&dir, &device)?;
    config.check_vocabulary(&tokenizer_origin, tok.vocab_size())?;
    if max_new_tokens == 0 || max_new_tokens >= config.max_seq_len {
        bail!("--max-new-tokens {max_new_tokens}: must be above 0 and leave room for a prompt in the model's max_seq_len {}", config.max_seq_len);
    }
    chat(&model, config.max_seq_len, &tok, &ChatOptions { system, sampling, show_prompt, tools: toolbox })
}
