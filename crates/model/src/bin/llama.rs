//! `llama`: inspect a config, convert checkpoints, generate text.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use llama_model::checkpoint::{self, Format};
use llama_model::generate::{SamplingConfig, generate};
use llama_model::{LlamaConfig, Precision, device};

#[derive(Parser)]
#[command(name = "llama", version, about = "Llama 2 model tools: size a config, convert checkpoints, generate text")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the parameter count and the memory a training run needs, before you launch it.
    ///
    /// Memory = weights + gradients (in --dtype) + AdamW moments (f32) + an f32 master copy
    /// (when --dtype is not f32) + activations for one micro-batch, without recomputation.
    Info {
        /// A TOML file with a [model] table (configs/7b.toml, a run config, a checkpoint's config.toml).
        #[arg(long)]
        config: PathBuf,
        /// Sequences per micro-batch on one device.
        #[arg(long, default_value_t = 1)]
        micro_batch: usize,
        /// Sequence length (defaults to the model's max_seq_len).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Device memory in GiB: say whether the estimate fits.
        #[arg(long)]
        device_memory_gib: Option<f64>,
    },
    /// Convert between a native checkpoint directory and a Hugging Face LlamaForCausalLM directory.
    ///
    /// The input kind is detected (config.toml: native, config.json: Hugging Face); the output is
    /// the other kind unless --to-format says otherwise.
    Convert {
        /// Checkpoint directory to read.
        #[arg(long)]
        from: PathBuf,
        /// Directory to write (created; files are written to temporaries and renamed).
        #[arg(long)]
        to: PathBuf,
        /// Output kind: `hf` or `native` (default: the other kind than the input).
        #[arg(long)]
        to_format: Option<String>,
        /// Largest Hugging Face shard in GB before splitting into model-0000x-of-0000y files.
        #[arg(long, default_value_t = 5.0)]
        shard_size_gb: f64,
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
        /// 0 for greedy decoding.
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// flex (CPU), or vulkan / wgpu / cuda[:N] when built with that feature.
        #[arg(long, default_value = "flex")]
        device: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { config, micro_batch, seq_len, device_memory_gib } => {
            let c = LlamaConfig::from_toml_file(&config)?;
            let seq = seq_len.unwrap_or(c.max_seq_len);
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
            println!("\ntraining memory per device, micro-batch {micro_batch} x seq {seq} (AdamW, no recomputation):");
            println!("{:<6} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}", "dtype", "weights", "master f32", "grads", "AdamW", "activations", "total");
            for (name, p) in [("f32", Precision::F32), ("bf16", Precision::Bf16)] {
                let m = c.memory_estimate(micro_batch, seq, p);
                let fits = match device_memory_gib {
                    Some(g) if (m.total() as f64) <= g * (1u64 << 30) as f64 => "  fits",
                    Some(_) => "  does NOT fit",
                    None => "",
                };
                println!(
                    "{name:<6} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}{fits}",
                    gib(m.weights),
                    gib(m.master_weights),
                    gib(m.gradients),
                    gib(m.optimizer),
                    gib(m.activations),
                    gib(m.total())
                );
            }
            Ok(())
        }
        Command::Convert { from, to, to_format, shard_size_gb } => {
            let device = device::parse("flex")?;
            let input = checkpoint::detect(&from)?;
            let target = match to_format.as_deref() {
                Some("hf") => Format::HuggingFace,
                Some("native") => Format::Native,
                Some(other) => bail!("--to-format `{other}`: expected `hf` or `native`"),
                None if input == Format::Native => Format::HuggingFace,
                None => Format::Native,
            };
            let (config, model) = checkpoint::load(&from, &device)?;
            match target {
                Format::HuggingFace => checkpoint::save_hf(&model, &config, &to, (shard_size_gb * 1e9) as u64)?,
                Format::Native => checkpoint::save_native(&model, &config, &to)?,
            }
            for extra in ["tokenizer.json", "tokenizer_config.json"] {
                let src = from.join(extra);
                if src.is_file() {
                    std::fs::copy(&src, to.join(extra)).with_context(|| format!("copying {}", src.display()))?;
                }
            }
            println!("wrote {:?} checkpoint to {} ({} parameters)", target, to.display(), config.num_params());
            Ok(())
        }
        Command::Generate { checkpoint: dir, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, device } => {
            let device = device::parse(&device)?;
            let tokenizer_path = tokenizer.unwrap_or_else(|| dir.join("tokenizer.json"));
            let tok = tokenizers::Tokenizer::from_file(&tokenizer_path)
                .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", tokenizer_path.display()))?;
            let (_, model) = checkpoint::load(&dir, &device)?;
            let bos = tok.token_to_id("<s>");
            let eos = tok.token_to_id("</s>");
            let prompts = prompt
                .iter()
                .map(|p| {
                    let enc = tok.encode(p.as_str(), false).map_err(|e| anyhow::anyhow!("cannot tokenize prompt: {e}"))?;
                    Ok(bos.into_iter().chain(enc.get_ids().iter().copied()).collect::<Vec<u32>>())
                })
                .collect::<Result<Vec<_>>>()?;
            let sampling = SamplingConfig { temperature, top_k, top_p, max_new_tokens, eos_id: eos, seed };
            let out = generate(&model, &prompts, &sampling)?;
            for (p, tokens) in prompt.iter().zip(&out.tokens) {
                let text = tok.decode(tokens, true).map_err(|e| anyhow::anyhow!("cannot decode: {e}"))?;
                println!("{p}{text}");
                println!("---");
            }
            Ok(())
        }
    }
}
