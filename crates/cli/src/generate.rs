//! `llama generate`: text from prompts with a KV cache, batched; optionally with tools.

use std::path::PathBuf;

use anyhow::{Result, bail};
use llama_model::checkpoint;
use llama_model::device;
use llama_model::generate::generate;

use crate::{SamplingArgs, ToolArgs};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (native or Hugging Face).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// tokenizer.json (default: the tokenizer.json of the checkpoint, which training writes into each).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A prompt; repeat the flag for a batch.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub tools: ToolArgs,
    /// After each answer, print one JSON line of the prompt's token ids and the generated ones
    /// (`{"prompt_ids": [...], "new_ids": [...]}`), to compare with other tools token for token.
    #[arg(long, conflicts_with = "tools")]
    pub print_ids: bool,
}

/// `llama generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let GenerateArgs { checkpoint: dir, tokenizer, prompt, max_new_tokens, sampling, tools, print_ids } = args;
    let device = device::parse(&sampling.device)?;
    let (tok, _) = crate::load_tokenizer(&dir, tokenizer)?;
    if let Some(toolbox) = tools.toolbox()? {
        let sampling = sampling.config(max_new_tokens, Some(tok.eos_id()))?;
        let (config, model) = checkpoint::load(&dir, &device)?;
        let prompts: Vec<llama_tools::TextPrompt> = prompt.iter().map(|p| llama_tools::TextPrompt(p.clone())).collect();
        for (i, p) in prompt.iter().enumerate() {
            let n = tok.encode(p, true, false)?.len();
            if n + max_new_tokens > config.max_seq_len {
                bail!("--prompt {}: {n} tokens + --max-new-tokens {max_new_tokens} exceed the model's max_seq_len {}", i + 1, config.max_seq_len);
            }
        }
        let mut source = llama_tools::ModelContinue { model: &model, sampling: sampling.clone(), slots: usize::MAX };
        let answers = llama_tools::answer(&mut source, &tok, &prompts, Some(&toolbox), max_new_tokens, config.max_seq_len, sampling.seed)?;
        for (p, a) in prompt.iter().zip(&answers) {
            // The answer with its leading space, as it follows the prompt.
            let head = tok.decode(&tok.encode(p, true, false)?)?;
            let whole = tok.decode(&a.sequence)?;
            println!("{p}{}", whole.strip_prefix(head.as_str()).map_or_else(|| format!(" {}", a.text), str::to_string));
            println!("--- {} tool call{}{}", a.calls, if a.calls == 1 { "" } else { "s" }, if a.call_limit_hit { " (limit reached)" } else { "" });
        }
        return Ok(());
    }
    // Through our tokenizer: BOS and EOS are the ones the checkpoint's tokenizer declares.
    let sampling = sampling.config(max_new_tokens, Some(tok.eos_id()))?;
    let (_, model) = checkpoint::load(&dir, &device)?;
    let prompts = prompt.iter().map(|p| tok.encode(p, true, false)).collect::<Result<Vec<_>, _>>()?;
    let out = generate(&model, &prompts, &sampling)?;
    for ((p, ids), tokens) in prompt.iter().zip(&prompts).zip(&out.tokens) {
        println!("{p}{}", tok.decode_after(ids, tokens)?);
        if print_ids {
            println!("{}", serde_json::json!({"prompt_ids": ids, "new_ids": tokens}));
        }
        println!("---");
    }
    Ok(())
}
