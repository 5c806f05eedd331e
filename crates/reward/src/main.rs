//! `reward --config configs/reward-helpfulness-tiny.toml` (or `reward-safety-tiny.toml`): train a helpfulness or safety reward model;
//! `reward score`: score prompt/response pairs with a trained one.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use llama_data::Tokenizer;
use llama_reward::{load_reward_model, render, run};

/// Train a Llama 2 reward model: the chat model's trunk with a scalar head read at the last real
/// token, trained on preference pairs with the margin ranking loss
/// -log(sigmoid(r_chosen - r_rejected - m(rating))). `target = "helpfulness"` or `"safety"` picks
/// the model and the paper's data mixing. Defaults: 1 epoch, max LR 1e-5, cosine to 10%, warmup
/// 3% of the steps (at least 5), 512 pairs per batch, small margins.
#[derive(Parser)]
#[command(name = "reward", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The run's TOML file (e.g. configs/reward-helpfulness-tiny.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    training: llama_trainer::TrainingArgs,
    /// Override init (the SFT or pretrain run, checkpoint, native or HF directory).
    #[arg(long)]
    init: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Score JSONL lines `{prompt, response}` (or `{prompt, chosen, rejected}`): each line comes
    /// back with `reward` (or `reward_chosen`, `reward_rejected`) added.
    Score {
        /// A reward run directory or checkpoint.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        input: PathBuf,
        /// Output JSONL (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value = "flex")]
        device: String,
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
        Some(Command::Score { model, tokenizer, input, out, device }) => {
            let device = llama_model::device::parse(&device)?;
            let tokenizer = Tokenizer::from_file(&tokenizer)?;
            let (_, model) = load_reward_model(&model, &device)?;
            let mut lines = vec![];
            for line in llama_io::read_jsonl(&input)? {
                let llama_io::JsonLine { at, value: mut v, .. } = line?;
                let prompt = v.get("prompt").cloned().with_context(|| format!("{at}: missing `prompt`"))?;
                for key in ["response", "chosen", "rejected"] {
                    if let Some(text) = v.get(key).and_then(|t| t.as_str()).map(String::from) {
                        let ids = render(&prompt, &text, &tokenizer).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
                        let limit = model.trunk.max_seq_len();
                        if ids.len() > limit {
                            anyhow::bail!("{at}: prompt + {key} are {} tokens, longer than the reward model's max_seq_len ({limit})", ids.len());
                        }
                        let r = model.score(&[ids], tokenizer.eos_id())[0];
                        let name = if key == "response" { "reward".to_string() } else { format!("reward_{key}") };
                        v[name] = serde_json::json!(r);
                    }
                }
                lines.push(v.to_string());
            }
            let text = lines.join("\n") + "\n";
            match out {
                Some(path) => llama_io::write_atomic(&path, text.as_bytes())?,
                None => std::io::stdout().write_all(text.as_bytes())?,
            }
            Ok(())
        }
        None => {
            let config = cli.config.context("--config is required (or use the `score` subcommand); see --help")?;
            let overrides = cli.training.overrides(cli.init);
            run(&config, &overrides)?;
            Ok(())
        }
    }
}
