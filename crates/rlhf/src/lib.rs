//! RLHF: rejection sampling, then PPO against the helpfulness and safety reward models.
//!
//! - Rejection sampling ([`rejection_sampling`]): K samples per prompt from the policy, scored by
//!   the combined reward, the best kept in a pool across rounds (so each round picks from the best
//!   of all rounds), then SFT on the pool.
//! - PPO ([`ppo`]): per iteration, rollouts from the policy (no autodiff), rewards
//!   `whiten(logit(Rc)) - beta * KL` per token, GAE, then one clipped policy + clipped value
//!   gradient step per minibatch. Policy, value model, both optimizers, whitening statistics and
//!   the prompt cursor are checkpointed; a resumed run continues exactly.
//!
//! Modules by job: [`config`] (the run file and its validation), [`scoring`] (answers scored by
//! `llama_reward::scoring`, held-out evaluation), [`math`] (the arithmetic, by hand),
//! [`rejection_sampling`], [`rollout`] and [`ppo`]; this file wires them ([`run`]). Prompt sets are
//! `llama_data::prompts`, shared with `eval compare`.

pub mod config;
pub mod math;
pub mod ppo;
pub mod rejection_sampling;
pub mod rollout;
pub mod scoring;

pub use config::*;
pub use ppo::*;
pub use rejection_sampling::*;
pub use rollout::*;
pub use scoring::*;

use std::path::{Path, PathBuf};

use llama_data::prompts::load_prompts;
use llama_trainer::config::load_toml;

/// How an `rlhf` run goes beyond its config: the command line's flags.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The config's paths replaced.
    pub paths: Paths,
    /// Continue where the run stopped: rejection sampling after its newest completed round,
    /// then PPO from its newest checkpoint.
    pub resume: bool,
    /// Stop PPO after this iteration, with a checkpoint.
    pub stop_after: Option<u64>,
    /// Go straight to PPO.
    pub skip_rejection_sampling: bool,
}

impl RunOptions {
    /// No flag but `--out`.
    pub fn with_out(out: PathBuf) -> Self {
        Self { paths: Paths { out: Some(out), ..Paths::default() }, ..Self::default() }
    }
}

/// Command-line replacements of the config's paths.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    pub out: Option<PathBuf>,
    pub policy: Option<PathBuf>,
    pub helpfulness_model: Option<PathBuf>,
    pub safety_model: Option<PathBuf>,
}

/// The whole `rlhf --config` run: rejection sampling (if rounds > 0), then PPO (if iterations > 0).
pub fn run(config_path: &Path, options: &RunOptions) -> anyhow::Result<()> {
    let paths = &options.paths;
    let mut cfg: RlhfConfig = load_toml(config_path)?;
    if let Some(o) = &paths.out {
        cfg.run.out_dir = o.clone();
    }
    if let Some(p) = &paths.policy {
        cfg.policy = p.clone();
    }
    if let Some(p) = &paths.helpfulness_model {
        cfg.helpfulness_model = p.clone();
    }
    if let Some(p) = &paths.safety_model {
        cfg.safety_model = p.clone();
    }
    let origin = config_path.display().to_string();
    validate(&cfg, &origin)?;
    check_world(&cfg, &origin, llama_trainer::distributed::world().size())?;
    load_prompts(&cfg.data.prompts)?;
    load_prompts(&cfg.data.eval_prompts)?;
    let skip_rs = options.skip_rejection_sampling;
    let rs_dir = if skip_rs { None } else { rejection_sampling(&cfg, &origin, options.resume)? };
    if cfg.ppo.iterations > 0 {
        let existing_rs = cfg.run.out_dir.join("rejection-sampling").join(format!("round-{}", cfg.rejection_sampling.rounds));
        let start = match (cfg.ppo.from_rejection_sampling, rs_dir) {
            (true, Some(dir)) => dir,
            (true, None) if skip_rs && existing_rs.join("checkpoints").is_dir() => existing_rs,
            _ => cfg.policy.clone(),
        };
        let result = ppo(&cfg, &start, options.resume, options.stop_after, &origin)?;
        llama_trainer::distributed::world().say(format_args!("PPO done: held-out reward {:.3}, KL to the starting policy {:.3}", result.reward, result.kl));
    }
    Ok(())
}

/// What an MPI job of `ranks` processes can run: batches that split evenly over the ranks
/// (rejection sampling's fine-tuning batches, PPO's minibatches).
pub fn check_world(cfg: &RlhfConfig, origin: &str, ranks: usize) -> anyhow::Result<()> {
    if ranks <= 1 {
        return Ok(());
    }
    let (rs, ppo) = (&cfg.rejection_sampling, &cfg.ppo);
    for (active, key, value) in
        [(rs.rounds > 0, "rejection_sampling.batch_size", rs.batch_size), (ppo.iterations > 0, "ppo.minibatch_size", ppo.minibatch_size)]
    {
        if active && !value.is_multiple_of(ranks) {
            anyhow::bail!("{origin}: {key} = {value} must be a multiple of the {ranks} MPI ranks: each rank trains its share of every batch");
        }
    }
    Ok(())
}
