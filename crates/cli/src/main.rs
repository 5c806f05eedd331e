//! `llama`: inspect a config, convert checkpoints, generate text, chat with a model, benchmark.
//!
//! One module per subcommand: its arguments (`XArgs`) and its `run`; this file is the command
//! line and the dispatch.

mod bench;
mod bench_optimizer;
mod chat;
mod convert;
mod generate;
mod info;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use llama_model::generate::SamplingConfig;

#[derive(Parser)]
#[command(
    name = "llama",
    version,
    about = "Llama 2 model tools: size a config, convert checkpoints (native, Hugging Face, GGUF), generate text, chat, benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the parameter count and the memory a training run needs, before you launch it.
    ///
    /// Device memory = weights + gradients (in the compute dtype) + activations of one
    /// micro-batch (less with --recompute block and --logits-chunk), + AdamW moments (f32) and
    /// an f32 master copy (when the dtype is not f32) unless --optimizer host keeps those in
    /// host memory. The last table tries every combination in bf16.
    Info(info::InfoArgs),
    /// Convert between a native checkpoint directory, a Hugging Face LlamaForCausalLM directory
    /// and a GGUF file (llama.cpp, Ollama, LM Studio).
    ///
    /// The input kind is detected (config.toml: native, config.json: Hugging Face, a file
    /// starting with `GGUF`); the output is GGUF when --to ends in `.gguf`, otherwise the other
    /// directory kind than the input, unless --to-format says otherwise. A GGUF file carries the
    /// tokenizer (tokenizer.json of the input, special tokens and chat template from its
    /// tokenizer_config.json, Llama 2's otherwise); converting one back writes its tokenizer.json.
    Convert(convert::ConvertArgs),
    /// Benchmark the host optimizer step (`run.optimizer = "host"`: global norm, clip, AdamW and
    /// the bf16 copy in one pass over the flat f32 master) against the machine's memory
    /// bandwidth, measured in the same run by a parallel copy.
    BenchOptimizer {
        /// Parameters, in billions (the run holds 18 bytes per parameter).
        #[arg(long, default_value_t = 0.5)]
        params: f64,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Time the trainer's own step instead (global norm, gradients streamed, the in-place
        /// update and its bf16 copy, through Burn modules) on a Llama model of about --params,
        /// the CPU as its device.
        #[arg(long)]
        trainer: bool,
        /// Write the figures as JSON here too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Check that a device computes what the CPU computes, on small problems: our attention's
    /// gradients (one backward block and several) against Burn's composed attention on the CPU,
    /// and block recomputation with chunked logits against the plain pass (loss and every
    /// parameter's gradient). Prints each deviation and its tolerance; exit 1 if one fails.
    /// On flex it compares the fused CPU kernels the same way.
    DeviceCheck {
        /// flex (CPU), or vulkan / wgpu / cuda[:N] when built with that feature.
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Benchmark training steps (forward, backward, AdamW) and KV-cache generation on random
    /// tokens: tokens/s, time per phase, achieved GFLOP/s, peak memory.
    Bench(bench::BenchArgs),
    /// Talk to a chat model in the terminal, through the Llama 2 chat template `sft` trains on.
    ///
    /// Each line typed is a user turn; the answer is printed as it is generated. `/reset` starts
    /// a new conversation, `/quit` (or Ctrl-D) ends it. The conversation is read from stdin, so it
    /// can be piped in. When the conversation and --max-new-tokens would exceed the model's
    /// context, the oldest exchanges are dropped (with a notice). Turn k samples with seed
    /// --seed + k, so a turn replays as `llama generate` with that seed.
    Chat(chat::ChatArgs),
    /// Generate text from one or more prompts with a KV cache, batched.
    Generate(generate::GenerateArgs),
}

/// Tool use in generation (`--tools`): a call the model writes, `<call>calculator(12 * 7)</call>`,
/// is run and its result appended (`<result>84</result>`) before the model goes on.
#[derive(clap::Args)]
pub(crate) struct ToolArgs {
    /// Run the calculator and search calls the model writes.
    #[arg(long)]
    tools: bool,
    /// The search tool's corpus (JSONL of `key`, `value`; e.g. data/tools/search.jsonl).
    #[arg(long, requires = "tools")]
    search_corpus: Option<PathBuf>,
    /// Calls per answer (at least 1); a call past it ends the answer.
    #[arg(long, default_value_t = std::num::NonZeroUsize::new(llama_tools::DEFAULT_MAX_CALLS).unwrap(), requires = "tools")]
    max_calls: std::num::NonZeroUsize,
}

impl ToolArgs {
    pub(crate) fn toolbox(&self) -> Result<Option<llama_tools::Toolbox>> {
        if !self.tools {
            return Ok(None);
        }
        let search = self.search_corpus.as_deref().map(llama_tools::SearchCorpus::load).transpose().context("--search-corpus")?;
        Ok(Some(llama_tools::Toolbox::new(search, self.max_calls.get())))
    }
}

/// How `generate` and `chat` pick tokens, and where they run.
#[derive(clap::Args)]
pub(crate) struct SamplingArgs {
    /// 0 for greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the k most likely tokens only (0 or unset: all of them).
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities sum to p, in (0, 1].
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// flex (CPU), or vulkan / wgpu / cuda[:N] when built with that feature.
    #[arg(long, default_value = "flex")]
    device: String,
}

impl SamplingArgs {
    /// The sampling config, validated (the error names the flags).
    pub(crate) fn config(&self, max_new_tokens: usize, eos_id: Option<u32>) -> Result<SamplingConfig> {
        let config =
            SamplingConfig { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, max_new_tokens, eos_id, seed: self.seed, logprobs: false };
        config.validate().context("the sampling flags (--temperature, --top-k, --top-p)")?;
        Ok(config)
    }
}

/// The tokenizer for `checkpoint`, and where it came from (for messages): `explicit` (the
/// `--tokenizer` flag) when given; for a GGUF file, the `tokenizer.json` beside it, else the
/// tokenizer its metadata holds; for a directory, its (or its newest checkpoint's)
/// `tokenizer.json`.
pub(crate) fn load_tokenizer(checkpoint: &std::path::Path, explicit: Option<PathBuf>) -> anyhow::Result<(llama_data::Tokenizer, String)> {
    let path = match explicit {
        Some(path) => path,
        None if llama_model::gguf::is_gguf(checkpoint) => {
            let beside = checkpoint.with_file_name("tokenizer.json");
            if beside.is_file() {
                beside
            } else {
                let metadata = llama_model::gguf::GgufFile::open(checkpoint)?.metadata;
                let Some(files) = llama_model::gguf::tokenizer_files(&metadata, &metadata_origin(checkpoint))? else {
                    anyhow::bail!("{}: no tokenizer in its metadata and no tokenizer.json beside it; pass --tokenizer", checkpoint.display());
                };
                return metadata_tokenizer(checkpoint, &files);
            }
        }
        None => {
            let resolved = llama_model::checkpoint::resolve(checkpoint).join("tokenizer.json");
            if resolved.is_file() { resolved } else { checkpoint.join("tokenizer.json") }
        }
    };
    Ok((llama_data::Tokenizer::from_file(&path)?, path.display().to_string()))
}

/// How messages name the tokenizer held in GGUF file `gguf`'s metadata.
fn metadata_origin(gguf: &std::path::Path) -> String {
    format!("{} (its metadata)", gguf.display())
}

/// The tokenizer that GGUF file `gguf`'s metadata holds (`files`, from
/// `llama_model::gguf::tokenizer_files`), and how messages name it.
pub(crate) fn metadata_tokenizer(gguf: &std::path::Path, files: &llama_model::gguf::TokenizerFiles) -> anyhow::Result<(llama_data::Tokenizer, String)> {
    let origin = metadata_origin(gguf);
    Ok((llama_data::Tokenizer::from_json(&files.tokenizer, &files.config, &origin)?, origin))
}

fn main() -> ExitCode {
    llama_model::host_memory::keep_freed_memory();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info(args) => info::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchOptimizer { params, steps, trainer, json } => bench_optimizer::run(params, steps, trainer, json),
        Command::DeviceCheck { device } => device_check(&device),
        Command::Chat(args) => chat::run(args),
        Command::Generate(args) => generate::run(args),
    }
}

/// `llama device-check`: both checks of `llama_model::device_check` on `device`, each deviation
/// printed as it is measured.
fn device_check(device: &str) -> Result<()> {
    use llama_model::device_check::{attention_gradients, block_recomputation};
    let started = std::time::Instant::now();
    let mut failed = 0;
    let mut total = 0;
    for (name, check) in [("attention gradients", attention_gradients as fn(&str) -> _), ("block recomputation", block_recomputation)] {
        let t = std::time::Instant::now();
        let deviations = check(device)?;
        println!("{name} on {device} ({:.1} s):", t.elapsed().as_secs_f64());
        for d in &deviations {
            println!("  {d}");
        }
        failed += deviations.iter().filter(|d| !d.passed()).count();
        total += deviations.len();
    }
    if failed > 0 {
        anyhow::bail!("device {device}: {failed} of {total} checks failed");
    }
    println!("device {device}: all {total} checks passed in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
