//! `sft --config configs/sft-tiny.toml`: supervised fine-tuning; `sft gatt`: Ghost Attention data.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use llama_data::chat::load_conversations;
use llama_sft::{ghost_attention, run};

/// Supervised fine-tuning of a Llama model on chat data (JSONL or Parquet, `messages` or
/// `prompt`/`response`), rendered with the Llama 2 chat template; the loss falls on answer tokens
/// (and their EOS) only. Defaults are the paper's: cosine from LR 2e-5, weight decay 0.1, 64
/// sequences per step, 2 epochs, packed sequences.
#[derive(Parser)]
#[command(name = "sft", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The run's TOML file (e.g. configs/sft-tiny.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    training: llama_trainer::TrainingArgs,
    /// Override init (a pretrain run, checkpoint, native or Hugging Face directory).
    #[arg(long)]
    init: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Turn multi-turn dialogues and a list of instructions into Ghost Attention training chats:
    /// one instruction per dialogue, kept in the first user turn only, loss on the last answer only.
    Gatt {
        /// Dialogues (.jsonl or .parquet, chat format).
        #[arg(long)]
        input: PathBuf,
        /// One instruction per line.
        #[arg(long)]
        instructions: PathBuf,
        /// Output .jsonl (chat format; earlier answers carry "train": false).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    llama_model::host_memory::keep_freed_memory();
    let cli = Cli::parse();
    // Under `mpirun` / `srun` (built with the `mpi` feature) training runs as one rank of a job.
    llama_trainer::distributed::main_with(|| run_cli(cli))
}

fn run_cli(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Gatt { input, instructions, out, seed }) => {
            let dialogues = load_conversations(&input)?;
            let text = std::fs::read_to_string(&instructions).with_context(|| format!("reading {}", instructions.display()))?;
            let list: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
            let examples = ghost_attention(&dialogues, &list, seed).with_context(|| format!("{}", instructions.display()))?;
            let mut text = String::new();
            for e in &examples {
                text.push_str(&serde_json::to_string(e)?);
                text.push('\n');
            }
            llama_io::write_atomic(&out, text.as_bytes())?;
            println!("wrote {} Ghost Attention chats to {}", examples.len(), out.display());
            Ok(())
        }
        None => {
            let config = cli.config.context("--config is required (or use the `gatt` subcommand); see --help")?;
            run(&config, &cli.training.overrides(cli.init))?;
            Ok(())
        }
    }
}
