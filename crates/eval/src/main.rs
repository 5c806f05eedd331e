//! `eval`: perplexity of a checkpoint, or a reward-model comparison of chat models.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use llama_data::Split;

/// Evaluate models as the Llama 2 paper does automatically: perplexity on held-out shards, and for
/// chat models the reward models' verdicts on held-out helpfulness and safety prompts (mean
/// reward, safety-violation rate, win/tie/loss against a baseline with 95% bootstrap intervals),
/// optionally a model as judge. Writes report.json, TensorBoard scalars and chart.svg.
#[derive(Parser)]
#[command(name = "eval", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Perplexity of a checkpoint on the validation split of a shard directory.
    Perplexity {
        /// A run directory, checkpoint, native or Hugging Face directory.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        shards: PathBuf,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        #[arg(long, default_value_t = 256)]
        max_windows: usize,
        /// Use the train split instead of val.
        #[arg(long)]
        train_split: bool,
        /// The model's tokenizer, checked against the one the shards were made with (default:
        /// the model directory's tokenizer.json, when it has one).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Compare chat models on prompt sets with the reward models (configs/eval-tiny.toml).
    Compare {
        #[arg(long)]
        config: PathBuf,
        /// Override out_dir.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override the path of a model the config lists: NAME=PATH (repeat for several).
        #[arg(long = "model", value_name = "NAME=PATH", value_parser = name_and_path)]
        models: Vec<(String, PathBuf)>,
        /// Override helpfulness_model.
        #[arg(long)]
        helpfulness_model: Option<PathBuf>,
        /// Override safety_model.
        #[arg(long)]
        safety_model: Option<PathBuf>,
        /// Override judge.model.
        #[arg(long)]
        judge_model: Option<PathBuf>,
    },
}

fn name_and_path(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.to_string(), PathBuf::from(path))),
        _ => Err(format!("`{s}`: expected NAME=PATH, e.g. sft=runs/pipeline/sft")),
    }
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Perplexity { model, shards, seq_len, max_windows, train_split, tokenizer } => {
            // Shards of another tokenizer give a number that means nothing: refuse them.
            let tokenizer = tokenizer
                .or_else(|| [model.join("tokenizer.json"), llama_model::checkpoint::resolve(&model).join("tokenizer.json")].into_iter().find(|p| p.is_file()));
            let manifest = shards.join(llama_data::shards::MANIFEST);
            match (&tokenizer, manifest.is_file()) {
                (Some(path), true) => {
                    let tok = llama_data::Tokenizer::from_file(path)?;
                    llama_data::Manifest::load(&shards)?.check_tokenizer(tok.fingerprint(), tok.vocab_size(), &shards)?;
                }
                (None, true) => {
                    eprintln!("note: {} has no tokenizer.json: the shards' tokenizer is not checked against the model's (pass --tokenizer)", model.display())
                }
                (_, false) => eprintln!("note: {} has no manifest: the shards' tokenizer cannot be checked", shards.display()),
            }
            let device = burn::tensor::Device::flex();
            let (_, m) = llama_trainer::checkpoint::init_model(&model, &device)?;
            let split = if train_split { Split::Train } else { Split::Val };
            let (ppl, tokens) = llama_eval::perplexity(&m, &shards, split, seq_len, max_windows, 8)?;
            println!("{}", serde_json::json!({ "model": model, "split": split.name(), "tokens": tokens, "perplexity": ppl, "loss": ppl.ln() }));
            Ok(())
        }
        Command::Compare { config, out, models, helpfulness_model, safety_model, judge_model } => {
            let paths = llama_eval::Paths { out, helpfulness_model, safety_model, judge_model, models };
            let report = llama_eval::compare_with(&config, &paths)?;
            for (model, sets) in &report.models {
                for (set, r) in sets {
                    let vs = match (r.win_rate, r.tie_rate, r.loss_rate, r.win_rate_ci95) {
                        (Some(w), Some(t), Some(l), Some((lo, hi))) => {
                            format!(" | vs {}: win {w:.2} [{lo:.2}, {hi:.2}] tie {t:.2} loss {l:.2}", report.baseline)
                        }
                        _ => String::new(),
                    };
                    println!(
                        "{model:>8} {set:<12} reward {:.3} (helpfulness {:.3}, safety {:.3}) | violations {:.2}{vs}",
                        r.mean_combined, r.mean_helpfulness, r.mean_safety, r.safety_violation_rate
                    );
                }
            }
            Ok(())
        }
    }
}
