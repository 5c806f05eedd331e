//! `llama`: inspect a config, convert checkpoints, generate text, chat with a model, benchmark.

mod bench_optimizer;
mod chat;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use llama_model::checkpoint::{self, Format};
use llama_model::generate::{SamplingConfig, generate};
use llama_model::gguf::{self, GgufTokenizer, GgufType};
use llama_model::recompute::MemorySaving;
use llama_model::{LlamaConfig, OptimizerPlacement, Precision, Recompute, TrainingMemory, device};

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
    Info {
        /// A TOML file with a [model] table (configs/7b.toml, a run config, a checkpoint's config.toml).
        #[arg(long)]
        config: PathBuf,
        /// Sequences per micro-batch on one device.
        #[arg(long, default_value_t = 1)]
        micro_batch: usize,
        /// Micro-batches per optimizer step on one device (train.batch_size / micro_batch_size /
        /// devices / ranks): with --optimizer host and more than one, their f32 gradient sum is
        /// kept on the device.
        #[arg(long, default_value_t = 1)]
        micro_batches: usize,
        /// Sequence length (defaults to the model's max_seq_len).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Device memory in GiB: say whether the estimate fits.
        #[arg(long)]
        device_memory_gib: Option<f64>,
        /// What the forward keeps for backward (train.recompute).
        #[arg(long, value_enum, default_value_t = Recompute::None)]
        recompute: Recompute,
        /// Where the f32 master weights and AdamW moments live (run.optimizer).
        #[arg(long, value_enum, default_value_t = OptimizerPlacement::Device)]
        optimizer: OptimizerPlacement,
        /// Positions per chunk of the output projection and loss (train.logits_chunk; default:
        /// 1024 with --recompute block, else the whole logits).
        #[arg(long)]
        logits_chunk: Option<usize>,
        /// MPI ranks of a data-parallel job (`mpirun -np N`): also print each rank's share with
        /// AdamW's moments sharded over them and the bytes each rank moves per step.
        #[arg(long, default_value_t = 1)]
        ranks: usize,
        /// Estimate for training on the CPU (flex) rather than a GPU: in f32 the fused CPU
        /// attention keeps its probabilities for backward (heads x seq per token and layer).
        #[arg(long)]
        cpu: bool,
    },
    /// Convert between a native checkpoint directory, a Hugging Face LlamaForCausalLM directory
    /// and a GGUF file (llama.cpp, Ollama, LM Studio).
    ///
    /// The input kind is detected (config.toml: native, config.json: Hugging Face, a file
    /// starting with `GGUF`); the output is GGUF when --to ends in `.gguf`, otherwise the other
    /// directory kind than the input, unless --to-format says otherwise. A GGUF file carries the
    /// tokenizer (tokenizer.json of the input, special tokens and chat template from its
    /// tokenizer_config.json, Llama 2's otherwise); converting one back writes its tokenizer.json.
    Convert {
        /// Checkpoint directory or GGUF file to read.
        #[arg(long)]
        from: PathBuf,
        /// Directory (or .gguf file) to write; files go to temporaries and are renamed.
        #[arg(long)]
        to: PathBuf,
        /// Output kind: `hf`, `native` or `gguf`.
        #[arg(long)]
        to_format: Option<String>,
        /// GGUF weight type: f32, f16 or q8_0 (norms are always f32).
        #[arg(long, default_value = "f16")]
        gguf_type: String,
        /// The tokenizer.json a GGUF output carries (default: the one in --from).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Largest Hugging Face shard in GB before splitting into model-0000x-of-0000y files.
        #[arg(long, default_value_t = 5.0)]
        shard_size_gb: f64,
        /// Write into an existing, non-empty --to directory (its checkpoint files are replaced;
        /// other files stay). Without it such a directory is refused.
        #[arg(long)]
        overwrite: bool,
    },
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
        /// Write the figures as JSON here too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Benchmark training steps (forward, backward, AdamW) and KV-cache generation on random
    /// tokens: tokens/s, time per phase, achieved GFLOP/s, peak memory.
    Bench {
        /// A TOML file with a [model] table (configs/bench-small.toml, configs/bench-medium.toml).
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Timed training steps (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Tokens generated per sequence (batch `batch`, prompts of 16 tokens); 0 skips generation.
        #[arg(long, default_value_t = 64)]
        gen_tokens: usize,
        #[arg(long, default_value = "flex")]
        device: String,
        /// Compute dtype of the training steps: f32, or bf16 / f16 mixed precision (f32 master
        /// weights and AdamW state, forward and backward in the half type, as `pretrain` does).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Write the figures as JSON here too.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run Burn's composed tensor ops instead of our fused CPU kernels (cross-entropy,
        /// attention, RoPE, SwiGLU, RMSNorm, AdamW), to measure what they buy; attention then
        /// takes the GPU path (see --burn-attention). No effect on GPUs, where the composed ops
        /// always run.
        #[arg(long)]
        unfused: bool,
        /// Attention through Burn's composed op (under autodiff: about ten tensor ops, two
        /// score-sized tensors per layer kept for backward) instead of ours (the fused CPU kernel
        /// on flex f32; elsewhere Burn's forward with the probabilities recomputed in backward),
        /// to measure what ours buys.
        #[arg(long)]
        burn_attention: bool,
        /// Keep only each block's input and re-run the block in backward (train.recompute).
        #[arg(long, value_enum, default_value_t = Recompute::None)]
        recompute: Recompute,
        /// Positions per chunk of the output projection and loss (train.logits_chunk; default:
        /// 1024 with --recompute block, else the whole logits).
        #[arg(long)]
        logits_chunk: Option<usize>,
    },
    /// Talk to a chat model in the terminal, through the Llama 2 chat template `sft` trains on.
    ///
    /// Each line typed is a user turn; the answer is printed as it is generated. `/reset` starts
    /// a new conversation, `/quit` (or Ctrl-D) ends it. The conversation is read from stdin, so it
    /// can be piped in. When the conversation and --max-new-tokens would exceed the model's
    /// context, the oldest exchanges are dropped (with a notice). Turn k samples with seed
    /// --seed + k, so a turn replays as `llama generate` with that seed.
    Chat {
        /// Checkpoint directory (native, Hugging Face, or a run directory: its newest checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        /// tokenizer.json (default: the checkpoint directory's tokenizer.json).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// System prompt, folded into the first user turn as Llama 2 does.
        #[arg(long)]
        system: Option<String>,
        /// `llama2` (the template the recipe trains) or `tokenizer` (the chat_template of the
        /// tokenizer_config.json beside the tokenizer, for a model that brings its own).
        #[arg(long, default_value = "llama2")]
        chat_template: String,
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Print each rendered prompt (what the model is given) to stderr.
        #[arg(long)]
        show_prompt: bool,
        #[command(flatten)]
        tools: ToolArgs,
    },
    /// Generate text from one or more prompts with a KV cache, batched.
    Generate {
        /// Checkpoint directory (native or Hugging Face).
        #[arg(long)]
        checkpoint: PathBuf,
        /// tokenizer.json (default: the checkpoint directory's tokenizer.json).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// A prompt; repeat the flag for a batch.
        #[arg(long, required = true)]
        prompt: Vec<String>,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        tools: ToolArgs,
    },
}

/// Tool use in generation (`--tools`): a call the model writes, `<call>calculator(12 * 7)</call>`,
/// is run and its result appended (`<result>84</result>`) before the model goes on.
#[derive(clap::Args)]
struct ToolArgs {
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
    fn toolbox(&self) -> Result<Option<llama_tools::Toolbox>> {
        if !self.tools {
            return Ok(None);
        }
        let search = self.search_corpus.as_deref().map(llama_tools::SearchCorpus::load).transpose().context("--search-corpus")?;
        Ok(Some(llama_tools::Toolbox::new(search, self.max_calls.get())))
    }
}

/// How `generate` and `chat` pick tokens, and where they run.
#[derive(clap::Args)]
struct SamplingArgs {
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
    fn config(&self, max_new_tokens: usize, eos_id: Option<u32>) -> Result<SamplingConfig> {
        let config = SamplingConfig { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, max_new_tokens, eos_id, seed: self.seed };
        config.validate().context("the sampling flags (--temperature, --top-k, --top-p)")?;
        Ok(config)
    }
}

/// Refuses a conversion that would write over its own input, or into an existing directory
/// holding anything unless `--overwrite` says so (it may be another model).
/// The tokenizer at `path` as a GGUF file carries it: BOS, EOS and chat template as
/// `llama_data::Tokenizer` reads them from the checkpoint's tokenizer files.
fn gguf_tokenizer(path: &Path) -> Result<GgufTokenizer> {
    let tok = llama_data::Tokenizer::from_file(path)?;
    let json = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let text = |id: u32| tok.token_text(id).unwrap_or_default();
    let chat_template = tok.declared_chat_template().unwrap_or(gguf::LLAMA2_CHAT_TEMPLATE).to_string();
    Ok(GgufTokenizer { json, bos: text(tok.bos_id()), eos: text(tok.eos_id()), chat_template })
}

/// What `convert` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Dir(Format),
    Gguf,
}

fn check_convert_target(from: &Path, to: &Path, overwrite: bool, file: bool) -> Result<()> {
    if !to.exists() {
        return Ok(());
    }
    if from.canonicalize().ok() == Some(to.canonicalize()?) {
        bail!("--to {} is the --from checkpoint: write the conversion elsewhere", to.display());
    }
    if file {
        if to.is_dir() {
            bail!("--to {} is a directory; a GGUF output is one file (e.g. model.gguf)", to.display());
        }
        if !overwrite {
            bail!("--to {} exists; pass --overwrite to replace it, or choose another file", to.display());
        }
        return Ok(());
    }
    let occupied = std::fs::read_dir(to).with_context(|| format!("--to {}", to.display()))?.next().is_some();
    if occupied && !overwrite {
        bail!("--to {} exists and is not empty; pass --overwrite to replace the checkpoint files in it, or choose another directory", to.display());
    }
    Ok(())
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

/// A clap value's name as typed on the command line.
fn name(value: impl clap::ValueEnum) -> String {
    value.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string())
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { config, micro_batch, micro_batches, seq_len, device_memory_gib, recompute, optimizer, logits_chunk, ranks, cpu } => {
            let c = LlamaConfig::from_toml_file(&config)?;
            if ranks == 0 || micro_batches == 0 {
                bail!("--ranks and --micro-batches must be >= 1");
            }
            let seq = seq_len.unwrap_or(c.max_seq_len);
            if logits_chunk == Some(0) {
                bail!("--logits-chunk must be > 0 (positions per chunk)");
            }
            let chunk_for = |r: Recompute| MemorySaving::new(r, logits_chunk).logits_chunk;
            println!("config           {}", config.display());
            println!(
                "shape            dim {} | layers {} | heads {} | kv heads {} | head dim {} | ffn {} | vocab {}",
                c.dim,
                c.n_layers,
                c.n_heads,
                c.n_kv_heads(),
                c.head_dim(),
                c.ffn_hidden(),
                c.vocab_size
            );
            println!("parameters       {} ({:.3} B)", c.num_params(), c.num_params() as f64 / 1e9);
            println!("train FLOPs/tok  {:.3e} at seq {seq}", c.train_flops_per_token(seq));
            let fits = |m: &llama_model::MemoryEstimate| match device_memory_gib {
                Some(g) if (m.expected_peak() as f64) <= g * (1u64 << 30) as f64 => "  fits",
                Some(_) => "  does NOT fit",
                None => "",
            };
            let chunk_name = |c: Option<usize>| c.map_or("whole".to_string(), |c| c.to_string());
            println!(
                "\ntraining memory on {}, micro-batch {micro_batch} x seq {seq} ({micro_batches} a step), recompute {}, optimizer on the {}, logits {}:",
                if cpu { "the CPU" } else { "a GPU" },
                name(recompute),
                name(optimizer),
                chunk_name(chunk_for(recompute))
            );
            println!(
                "{:<6} {:>11} {:>11} {:>11} {:>11} {:>12} {:>12} {:>14} {:>11}",
                "dtype", "weights", "master f32", "grads", "AdamW", "activations", "device", "expected peak", "host"
            );
            for (dtype, p) in [("f32", Precision::F32), ("bf16", Precision::Bf16)] {
                let keeps_attention_probs = TrainingMemory::attention_keeps_probs(p, cpu);
                let plan =
                    TrainingMemory { recompute, optimizer, logits_chunk: chunk_for(recompute), keeps_attention_probs, micro_batches, ..TrainingMemory::new(p) };
                let m = c.memory_estimate(micro_batch, seq, &plan);
                println!(
                    "{dtype:<6} {:>11} {:>11} {:>11} {:>11} {:>12} {:>12} {:>14} {:>11}{}",
                    gib(m.weights),
                    gib(m.master_weights),
                    gib(m.gradients),
                    gib(m.optimizer),
                    gib(m.activations),
                    gib(m.total()),
                    gib(m.expected_peak()),
                    gib(m.host_total()),
                    fits(&m)
                );
            }
            println!("\nbf16, every combination (device expected peak | host):");
            for r in [Recompute::None, Recompute::Block] {
                for o in [OptimizerPlacement::Device, OptimizerPlacement::Host] {
                    let m = c.memory_estimate(
                        micro_batch,
                        seq,
                        &TrainingMemory { recompute: r, optimizer: o, logits_chunk: chunk_for(r), micro_batches, ..TrainingMemory::new(Precision::Bf16) },
                    );
                    println!(
                        "  --recompute {:<5} --optimizer {:<6} {:>12} | {:>11}{}",
                        name(r),
                        name(o),
                        gib(m.expected_peak()),
                        gib(m.host_total()),
                        fits(&m)
                    );
                }
            }
            println!(
                "\nexpected peak = device total x {} (peak device memory measured on an H100 over this estimate); host = f32 master weights, AdamW moments and f32 gradients",
                llama_model::config::MEASURED_OVERHEAD
            );
            if ranks > 1 {
                // trainer::sharded: flat f32 blocks, reduce-scattered gradients, all-gathered weights.
                let p = c.num_params() as u64;
                let moved = 2.0 * 4.0 * p as f64 * (ranks - 1) as f64 / ranks as f64;
                println!(
                    "
with {ranks} MPI ranks (AdamW sharded, ZeRO-1): per rank, AdamW moments {} on the host (not {}); each rank keeps the f32 master and f32 gradients ({} each) and moves {:.2} GB per optimizer step (reduce-scatter of f32 gradients + all-gather of f32 weights)",
                    gib(8 * p / ranks as u64),
                    gib(8 * p),
                    gib(4 * p),
                    moved / 1e9
                );
            }
            Ok(())
        }
        Command::Convert { from, to, to_format, gguf_type, tokenizer, shard_size_gb, overwrite } => {
            let gguf_type = GgufType::parse(&gguf_type).ok_or_else(|| anyhow::anyhow!("--gguf-type `{gguf_type}`: allowed values: {}", GgufType::ALLOWED))?;
            let from_gguf = gguf::is_gguf(&from);
            let target = match to_format.as_deref() {
                Some("hf") => Target::Dir(Format::HuggingFace),
                Some("native") => Target::Dir(Format::Native),
                Some("gguf") => Target::Gguf,
                Some(other) => bail!("--to-format `{other}`: expected `hf`, `native` or `gguf`"),
                None if to.extension().is_some_and(|e| e == "gguf") => Target::Gguf,
                None if from_gguf => Target::Dir(Format::Native),
                None if checkpoint::detect(&checkpoint::resolve(&from))? == Format::Native => Target::Dir(Format::HuggingFace),
                None => Target::Dir(Format::Native),
            };
            check_convert_target(&from, &to, overwrite, target == Target::Gguf)?;
            let device = device::parse("flex")?;
            let (config, model, tokenizer_json) = if from_gguf {
                gguf::load_gguf(&from, &device)?
            } else {
                let (config, model) = checkpoint::load(&from, &device)?;
                (config, model, None)
            };
            match target {
                Target::Gguf => {
                    let tokenizer = match tokenizer {
                        Some(path) => Some(gguf_tokenizer(&path).context("--tokenizer")?),
                        None if from.join("tokenizer.json").is_file() => Some(gguf_tokenizer(&from.join("tokenizer.json"))?),
                        None => {
                            eprintln!(
                                "warning: {} has no tokenizer.json and no --tokenizer was given: the GGUF file has no tokenizer, which llama.cpp needs",
                                from.display()
                            );
                            None
                        }
                    };
                    let name = from.file_name().map_or_else(|| "llama".into(), |n| n.to_string_lossy().into_owned());
                    gguf::save_gguf(&model, &config, tokenizer.as_ref(), &name, &to, gguf_type)?;
                }
                Target::Dir(format) => {
                    match format {
                        Format::HuggingFace => checkpoint::save_hf(&model, &config, &to, (shard_size_gb * 1e9) as u64)?,
                        Format::Native => checkpoint::save_native(&model, &config, &to)?,
                    }
                    if let Some(json) = tokenizer_json {
                        llama_io::write_atomic(&to.join("tokenizer.json"), json.as_bytes())?;
                    }
                    for extra in ["tokenizer.json", "tokenizer_config.json"] {
                        let src = from.join(extra);
                        if src.is_file() {
                            std::fs::copy(&src, to.join(extra)).with_context(|| format!("copying {}", src.display()))?;
                        }
                    }
                }
            }
            println!("wrote {target:?} to {} ({} parameters)", to.display(), config.num_params());
            Ok(())
        }
        Command::Bench { config, batch, seq_len, steps, gen_tokens, device, dtype, json, unfused, burn_attention, recompute, logits_chunk } => {
            let precision = Precision::parse(&dtype).ok_or_else(|| anyhow::anyhow!("--dtype `{dtype}`: allowed values: {}", Precision::ALLOWED))?;
            if batch == 0 || seq_len == 0 || logits_chunk == Some(0) {
                bail!("--batch, --seq-len and --logits-chunk must be > 0");
            }
            let saving = MemorySaving::new(recompute, logits_chunk);
            let ops = BenchOps { fused: !unfused, our_attention: !burn_attention };
            let run = || bench(&config, batch, seq_len, steps, gen_tokens, &device, precision, json, ops, saving);
            // The switches are per thread; every op of the benchmark runs on this one.
            let run = || if unfused { llama_model::without_fused_kernels(run) } else { run() };
            if burn_attention { llama_model::attention::with_burn_attention(run) } else { run() }
        }
        Command::BenchOptimizer { params, steps, json } => bench_optimizer::run(params, steps, json),
        Command::Chat { checkpoint: dir, tokenizer, system, chat_template, max_new_tokens, sampling, show_prompt, tools } => {
            let toolbox = tools.toolbox()?;
            let device = device::parse(&sampling.device)?;
            let template = match chat_template.as_str() {
                "llama2" => llama_data::chat::ChatTemplateChoice::Llama2,
                "tokenizer" => llama_data::chat::ChatTemplateChoice::Tokenizer,
                other => bail!("--chat-template `{other}`: allowed values: llama2, tokenizer"),
            };
            let tokenizer_path = tokenizer.unwrap_or_else(|| dir.join("tokenizer.json"));
            let tok = llama_data::Tokenizer::from_file(&tokenizer_path)?.with_chat_template(template).context("--chat-template")?;
            let sampling = sampling.config(max_new_tokens, Some(tok.eos_id()))?;
            let (config, model) = checkpoint::load(&dir, &device)?;
            if tok.vocab_size() > config.vocab_size {
                bail!("{}: the tokenizer has {} ids but the model's vocabulary is {}", tokenizer_path.display(), tok.vocab_size(), config.vocab_size);
            }
            if max_new_tokens == 0 || max_new_tokens >= config.max_seq_len {
                bail!("--max-new-tokens {max_new_tokens}: must be above 0 and leave room for a prompt in the model's max_seq_len {}", config.max_seq_len);
            }
            chat::chat(&model, config.max_seq_len, &tok, &chat::ChatOptions { system, sampling, show_prompt, tools: toolbox })
        }
        Command::Generate { checkpoint: dir, tokenizer, prompt, max_new_tokens, sampling, tools } => {
            let device = device::parse(&sampling.device)?;
            let tokenizer_path = tokenizer.unwrap_or_else(|| dir.join("tokenizer.json"));
            if let Some(toolbox) = tools.toolbox()? {
                let tok = llama_data::Tokenizer::from_file(&tokenizer_path)?;
                let sampling = sampling.config(max_new_tokens, Some(tok.eos_id()))?;
                let (config, model) = checkpoint::load(&dir, &device)?;
                let prompts: Vec<llama_tools::TextPrompt> = prompt.iter().map(|p| llama_tools::TextPrompt(p.clone())).collect();
                for (i, p) in prompt.iter().enumerate() {
                    let n = tok.encode(p, true, false)?.len();
                    if n + max_new_tokens > config.max_seq_len {
                        bail!("--prompt {}: {n} tokens + --max-new-tokens {max_new_tokens} exceed the model's max_seq_len {}", i + 1, config.max_seq_len);
                    }
                }
                let mut source = llama_tools::ModelContinue { model: &model, sampling: sampling.clone() };
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
            let tok = llama_data::Tokenizer::from_file(&tokenizer_path)?;
            let sampling = sampling.config(max_new_tokens, Some(tok.eos_id()))?;
            let (_, model) = checkpoint::load(&dir, &device)?;
            let prompts = prompt.iter().map(|p| tok.encode(p, true, false)).collect::<Result<Vec<_>, _>>()?;
            let out = generate(&model, &prompts, &sampling)?;
            for ((p, ids), tokens) in prompt.iter().zip(&prompts).zip(&out.tokens) {
                println!("{p}{}", tok.decode_after(ids, tokens)?);
                println!("---");
            }
            Ok(())
        }
    }
}

fn peak_rss_gib() -> f64 {
    llama_model::host_memory::peak_rss_bytes().map_or(0.0, |b| b as f64 / (1u64 << 30) as f64)
}

/// Which of our own ops `llama bench` runs (both by default).
#[derive(Clone, Copy)]
struct BenchOps {
    /// The fused CPU kernels (off: `--unfused`).
    fused: bool,
    /// Our attention ops (off: `--burn-attention`).
    our_attention: bool,
}

#[allow(clippy::too_many_arguments)]
fn bench(
    config: &std::path::Path,
    batch: usize,
    seq_len: usize,
    steps: usize,
    gen_tokens: usize,
    device: &str,
    precision: Precision,
    json: Option<PathBuf>,
    ops: BenchOps,
    saving: MemorySaving,
) -> Result<()> {
    use burn::module::Module;
    use burn::optim::{GradientsParams, ModuleOptimizer};
    use burn::tensor::{Int, Tensor, TensorData};
    use llama_model::adamw::FusedAdamW;
    use std::time::Instant;
    let c = LlamaConfig::from_toml_file(config)?;
    if seq_len > c.max_seq_len {
        bail!("--seq-len {seq_len} exceeds model.max_seq_len {}", c.max_seq_len);
    }
    let device_spec = device;
    let device = device::parse(device_spec)?.autodiff();
    precision.check_device(&device, device_spec).map_err(anyhow::Error::msg)?;
    device.seed(0);
    let mut model = c.init(&device);
    let mut optim = ModuleOptimizer::from(FusedAdamW::new(0.9, 0.95, 1e-5, 0.1));
    let mut rng = 12345u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % c.vocab_size as u64) as i64
    };
    let tokens: Vec<i64> = (0..batch * (seq_len + 1)).map(|_| next()).collect();
    let inputs: Vec<i64> = tokens.chunks(seq_len + 1).flat_map(|w| w[..seq_len].to_vec()).collect();
    let targets: Vec<i64> = tokens.chunks(seq_len + 1).flat_map(|w| w[1..].to_vec()).collect();
    let inputs = Tensor::<2, Int>::from_data(TensorData::new(inputs, [batch, seq_len]), &device);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [batch * seq_len]), &device);
    let (mut fwd, mut bwd, mut opt) = (0.0, 0.0, 0.0);
    for step in 0..=steps {
        let t0 = Instant::now();
        let loss = llama_model::recompute::with_memory_saving(saving, || {
            let compute = precision.compute_copy(&model);
            compute.token_nll(compute.forward_hidden(inputs.clone(), None), targets.clone()).mean()
        });
        let loss_value = loss.clone().into_scalar::<f32>();
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        // Materialise the gradients before stopping the clock (backends may be lazy).
        let _ = model.norm.gamma.val().sum().into_scalar::<f32>();
        let t2 = Instant::now();
        model = optim.step(1e-4, model, grads);
        let _ = model.norm.gamma.val().sum().into_scalar::<f32>();
        let t3 = Instant::now();
        if step > 0 {
            fwd += (t1 - t0).as_secs_f64();
            bwd += (t2 - t1).as_secs_f64();
            opt += (t3 - t2).as_secs_f64();
        }
        if !loss_value.is_finite() {
            bail!("non-finite loss in the benchmark");
        }
    }
    let n = steps.max(1) as f64;
    let step_s = (fwd + bwd + opt) / n;
    let train_tok_s = (batch * seq_len) as f64 / step_s;
    let gflops = train_tok_s * c.train_flops_per_token(seq_len) / 1e9;
    let mut report = serde_json::json!({
        "config": config.display().to_string(), "dtype": precision.name(), "params": c.num_params(), "batch": batch, "seq_len": seq_len, "steps": steps,
        "train_tokens_per_s": train_tok_s, "forward_s": fwd / n, "backward_s": bwd / n, "optimizer_s": opt / n,
        "train_gflops_per_s": gflops, "fused_kernels": ops.fused, "our_attention": ops.our_attention,
        "recompute": if saving.recompute_blocks { "block" } else { "none" }, "logits_chunk": saving.logits_chunk,
    });
    let attention = if ops.our_attention { "" } else { ", Burn's attention (--burn-attention)" };
    let ops = if ops.fused { "" } else { ", Burn's composed ops (--unfused)" };
    let recompute = if saving.recompute_blocks { ", block recomputation" } else { "" };
    let chunks = saving.logits_chunk.map_or(String::new(), |c| format!(", logits in chunks of {c}"));
    println!(
        "model {} ({} parameters), batch {batch} x seq {seq_len}, {}{ops}{attention}{recompute}{chunks}",
        config.display(),
        c.num_params(),
        precision.name()
    );
    println!(
        "train  {train_tok_s:>10.1} tokens/s | step {:.3} s = forward {:.3} + backward {:.3} + AdamW {:.3} | {gflops:.1} GFLOP/s",
        step_s,
        fwd / n,
        bwd / n,
        opt / n
    );
    if gen_tokens > 0 {
        let plain = model.valid();
        let prompts: Vec<Vec<u32>> = (0..batch).map(|_| (0..16).map(|_| next() as u32).collect()).collect();
        let sampling = SamplingConfig { eos_id: None, ..SamplingConfig::greedy(gen_tokens) };
        let _ = generate(&plain, &prompts, &SamplingConfig { max_new_tokens: 2, ..sampling.clone() })?;
        let t = Instant::now();
        let out = generate(&plain, &prompts, &sampling)?;
        let secs = t.elapsed().as_secs_f64();
        let produced: usize = out.tokens.iter().map(Vec::len).sum();
        println!("decode {:>10.1} tokens/s | {produced} tokens ({batch} x {gen_tokens}) in {secs:.3} s, KV cache", produced as f64 / secs);
        report["decode_tokens_per_s"] = serde_json::json!(produced as f64 / secs);
    }
    let peak = peak_rss_gib();
    println!("peak RSS {peak:.3} GiB");
    report["peak_rss_gib"] = serde_json::json!(peak);
    if let Some(pool) = device.memory_pool_usage() {
        let gib = pool.bytes_reserved as f64 / (1u64 << 30) as f64;
        println!("device memory reserved by Burn's pool {gib:.3} GiB");
        report["device_reserved_gib"] = serde_json::json!(gib);
    }
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
