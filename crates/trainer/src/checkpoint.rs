//! Training checkpoints: `out_dir/checkpoints/step-00000100/` holding the model (burnpack, which
//! keeps parameter ids), the optimizer state, and `state.json` (step, counters, data cursor).
//!
//! A checkpoint is written into `.step-00000100.tmp/`, its files and directories fsynced, and
//! renamed into place only when every file is there, so a directory named `step-*` is always
//! complete, also after a power loss: a run killed mid-write leaves a temporary directory that
//! `--resume` ignores and the next start removes. Pruning renames an old checkpoint out of the
//! `step-*` names before deleting it, so a half-deleted one is never listed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::distributed::World;

pub const MODEL_FILE: &str = "model.bpk";
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
pub const STATE_FILE: &str = "state.json";

pub use crate::test_hooks::FAIL_AFTER_ENV;
use crate::test_hooks::{kill_point, names};

/// Counters and positions a resumed run needs besides the weights and the optimizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Steps skipped for a non-finite loss or gradient, in all and in a row.
    pub skipped: u64,
    pub consecutive_bad: u64,
    /// The stage's data position (reader cursors).
    pub data: serde_json::Value,
    /// The model config the weights belong to, as TOML text, to refuse a resume with another.
    pub model_config: String,
    pub seed: u64,
    /// The f16 loss scale (absent in f32 and bf16 runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<crate::precision::LossScale>,
}

/// The checkpoints of one run directory.
pub struct Checkpoints {
    root: PathBuf,
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

impl Checkpoints {
    pub fn new(out_dir: &Path) -> Self {
        Self { root: out_dir.join("checkpoints") }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Complete checkpoints, oldest first (the one rule: `llama_model::checkpoint::list_checkpoints`).
    pub fn list(&self) -> Vec<(u64, PathBuf)> {
        llama_model::checkpoint::list_checkpoints(&self.root)
    }

    pub fn latest(&self) -> Option<(u64, PathBuf)> {
        self.list().pop()
    }

    /// Writes checkpoint `step` through `write` (which fills the directory it is given), renames
    /// it into place, and deletes all but the newest `keep`.
    ///
    /// In a job of several ranks every rank calls it and writes its own files into the one
    /// temporary directory; rank 0 renames it only once every rank has written its part (a rank
    /// that failed or died leaves no complete-looking checkpoint).
    pub fn save(
        &self,
        step: u64,
        keep: usize,
        world: World,
        write: impl FnOnce(&Path, &dyn Fn(&str) -> anyhow::Result<()>) -> anyhow::Result<()>,
    ) -> anyhow::Result<PathBuf> {
        let name = step_name(step);
        let tmp = self.root.join(format!(".{name}.tmp"));
        let dest = self.root.join(&name);
        let fresh = || -> anyhow::Result<()> {
            std::fs::create_dir_all(&self.root).map_err(|e| anyhow::anyhow!("{}: {e}", self.root.display()))?;
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)?;
            }
            std::fs::create_dir_all(&tmp)?;
            Ok(())
        };
        let prepared = if world.is_root() { fresh() } else { Ok(()) };
        world.all_ok(prepared, || format!("rank 0 could not prepare checkpoint {}", tmp.display()))?;
        let written = move |file: &str| -> anyhow::Result<()> {
            kill_point(file, step);
            if names(FAIL_AFTER_ENV, file, step) {
                anyhow::bail!("checkpoint interrupted after writing {file} ({FAIL_AFTER_ENV} is set)");
            }
            Ok(())
        };
        let written_here =
            world.all_ok(write(&tmp, &written), || format!("another rank failed to write its part of {}; the checkpoint was not published", tmp.display()));
        if written_here.is_err() && world.is_root() {
            // A failed write (a full disk, say) leaves nothing behind; best effort.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written_here?;
        // Every rank's files are complete now: rank 0 makes them durable, then publishes.
        let published = if world.is_root() { sync_tree(&tmp).and_then(|()| self.publish(step, &tmp, &dest, keep)) } else { Ok(()) };
        world.all_ok(published, || format!("rank 0 could not publish {}", dest.display()))?;
        Ok(dest)
    }

    /// Renames the written `tmp` to `dest` and prunes all but the newest `keep`.
    fn publish(&self, step: u64, tmp: &Path, dest: &Path, keep: usize) -> anyhow::Result<()> {
        kill_point("synced", step);
        if dest.exists() {
            std::fs::remove_dir_all(dest)?;
        }
        std::fs::rename(tmp, dest).map_err(|e| anyhow::anyhow!("{}: {e}", dest.display()))?;
        sync_dir(&self.root)?;
        kill_point("published", step);
        let all = self.list();
        for (old_step, old) in all.iter().take(all.len().saturating_sub(keep)) {
            // Out of the listed names first: an interrupted delete leaves only a leftover.
            let doomed = self.root.join(format!(".{}.old", step_name(*old_step)));
            std::fs::rename(old, &doomed).map_err(|e| anyhow::anyhow!("{}: {e}", old.display()))?;
            kill_point("pruning", step);
            std::fs::remove_dir_all(&doomed).map_err(|e| anyhow::anyhow!("{}: {e}", doomed.display()))?;
        }
        Ok(())
    }

    /// Removes what a killed run left in the checkpoint folder: temporary directories of
    /// unfinished checkpoints and half-pruned old ones (never a complete checkpoint). Called by
    /// the run that owns the directory (it holds the run lock), before its first save.
    pub fn remove_leftovers(&self) -> anyhow::Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Ok(()) };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".step-") && (name.ends_with(".tmp") || name.ends_with(".old")) {
                std::fs::remove_dir_all(entry.path()).map_err(|e| anyhow::anyhow!("{}: {e}", entry.path().display()))?;
            }
        }
        Ok(())
    }

    pub fn load_state(dir: &Path) -> anyhow::Result<TrainState> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: invalid checkpoint state: {e}", path.display()))
    }
}

/// fsyncs every file below `dir` and the directories themselves, so that what a rename publishes
/// is on disk.
fn sync_tree(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(|e| anyhow::anyhow!("{}: fsync: {e}", path.display()))?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| anyhow::anyhow!("{}: fsync: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_saves_are_never_listed_and_old_ones_are_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = Checkpoints::new(tmp.path());
        let write_all = |dir: &Path, done: &dyn Fn(&str) -> anyhow::Result<()>| -> anyhow::Result<()> {
            std::fs::write(dir.join(MODEL_FILE), b"m")?;
            done(MODEL_FILE)?;
            std::fs::write(dir.join(STATE_FILE), b"{}")?;
            done(STATE_FILE)
        };
        for step in [10, 20, 30] {
            ck.save(step, 2, World::single(), write_all).unwrap();
        }
        assert_eq!(ck.list().iter().map(|c| c.0).collect::<Vec<_>>(), vec![20, 30]);
        // A failure between files leaves the newest complete checkpoint in charge.
        let err = ck
            .save(40, 2, World::single(), |dir, _done| {
                std::fs::write(dir.join(MODEL_FILE), b"half")?;
                anyhow::bail!("killed")
            })
            .unwrap_err();
        assert!(err.to_string().contains("killed"));
        assert_eq!(ck.latest().unwrap().0, 30);
        // A failed save removes its temporary directory.
        assert!(!ck.root().join(".step-00000040.tmp").exists());
        ck.save(40, 2, World::single(), write_all).unwrap();
        assert_eq!(ck.latest().unwrap().0, 40);
        assert_eq!(ck.list().iter().map(|c| c.0).collect::<Vec<_>>(), vec![30, 40]);
    }

    /// What a killed process leaves (an unfinished checkpoint, a half-pruned old one) is never
    /// listed and is removed at the next start; complete checkpoints stay.
    #[test]
    fn a_killed_run_s_leftovers_are_ignored_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = Checkpoints::new(tmp.path());
        ck.save(10, 2, World::single(), |dir, _| Ok(std::fs::write(dir.join(STATE_FILE), b"{}")?)).unwrap();
        for leftover in [".step-00000020.tmp", ".step-00000005.old"] {
            std::fs::create_dir_all(ck.root().join(leftover)).unwrap();
            std::fs::write(ck.root().join(leftover).join(STATE_FILE), b"{}").unwrap();
        }
        assert_eq!(ck.list().iter().map(|c| c.0).collect::<Vec<_>>(), vec![10]);
        ck.remove_leftovers().unwrap();
        let names: Vec<String> = std::fs::read_dir(ck.root()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["step-00000010".to_string()]);
    }
}

/// What a stage's `init` path holds, as [`init_config`] and [`init_model`] read it.
enum InitSource {
    /// A GGUF file, or a directory `llama_model::checkpoint` reads (native or Hugging Face).
    Model(PathBuf),
    /// A training checkpoint from before config.toml was written beside the weights: its
    /// directory and the model config, which only its `state.json` holds.
    Legacy(PathBuf, llama_model::LlamaConfig),
}

fn init_source(path: &Path) -> anyhow::Result<InitSource> {
    if llama_model::gguf::is_gguf(path) {
        return Ok(InitSource::Model(path.to_path_buf()));
    }
    let dir = llama_model::checkpoint::resolve(path);
    if !dir.exists() {
        anyhow::bail!("{}: no such run, checkpoint or model directory", dir.display());
    }
    if !dir.join(llama_model::checkpoint::NATIVE_CONFIG).is_file() && dir.join(STATE_FILE).is_file() && dir.join(MODEL_FILE).is_file() {
        let text = Checkpoints::load_state(&dir)?.model_config;
        let config = llama_model::LlamaConfig::from_toml_str(&text, &dir.join(STATE_FILE).display().to_string())?;
        return Ok(InitSource::Legacy(dir, config));
    }
    Ok(InitSource::Model(dir))
}

/// The config of the model [`init_model`] would load from `path`, read without its weights.
pub fn init_config(path: &Path) -> anyhow::Result<llama_model::LlamaConfig> {
    Ok(match init_source(path)? {
        InitSource::Model(source) => llama_model::checkpoint::load_config(&source)?,
        InitSource::Legacy(_, config) => config,
    })
}

/// Loads a model to start a stage from: a run directory (its newest checkpoint), a training
/// checkpoint directory (`model.bpk` + `state.json`), a native checkpoint, a Hugging Face
/// directory or a GGUF file. Returns the config and the model on `device`.
pub fn init_model(path: &Path, device: &burn::tensor::Device) -> anyhow::Result<(llama_model::LlamaConfig, llama_model::Llama)> {
    match init_source(path)? {
        InitSource::Model(source) => Ok(llama_model::checkpoint::load(&source, device)?),
        InitSource::Legacy(dir, config) => {
            let mut model = config.init(device);
            llama_model::checkpoint::load_weights(&mut model, &dir.join(MODEL_FILE))?;
            Ok((config, model))
        }
    }
}

/// An exclusive lock on a run directory (`OUT/.lock`), held while a process writes the run: a
/// second writer on the same directory is refused instead of interleaving checkpoints and
/// metrics. It is an OS file lock (flock), so a killed process releases it; the file itself
/// staying behind means nothing.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    pub const FILE: &'static str = ".lock";

    /// Locks `out_dir` (created if needed), or says which directory another process is writing.
    pub fn acquire(out_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(out_dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", out_dir.display()))?;
        let path = out_dir.join(Self::FILE);
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "{} is being written by another run (it holds {}); wait for it to finish, or choose another --out",
                out_dir.display(),
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => anyhow::bail!("{}: cannot lock: {e}", path.display()),
        }
    }
}

#[cfg(test)]
mod lock_tests {
    use super::RunLock;

    /// A second writer is refused while the first holds the lock; once it is released (a process
    /// that ends, killed or not, releases its flock) the lock file left behind does not block.
    #[test]
    fn a_run_directory_has_one_writer_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(tmp.path()).unwrap();
        let err = RunLock::acquire(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("another run") && err.contains(".lock"), "{err}");
        drop(first);
        assert!(tmp.path().join(RunLock::FILE).exists());
        let _again = RunLock::acquire(tmp.path()).unwrap();
    }
}
