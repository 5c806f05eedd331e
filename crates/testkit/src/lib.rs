//! What the binaries' end-to-end tests share (a dev-dependency of their crates): the bad-input
//! suites' checks, launching a binary as an MPI job, reading a run's logged training curve, and
//! a small pre-trained model to start the later stages from ([`pretrain_tiny`]).
//!
//! Each suite is a table of [`Case`]s: a command line that must be refused. [`Case::refused`]
//! runs it and asserts what a user must see: a non-zero exit of the binary's own error path (not
//! a panic, not a signal), no backtrace, and a message naming what is wrong (the file and the key,
//! line or tensor: the case's `needles`); and that every file under the watched directory is still
//! there, unchanged, with nothing new outside the paths the case may write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (tests run with the crate's directory as `CARGO_MANIFEST_DIR`).
pub fn repo() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../..")
}

/// `model` with every float parameter refilled from a generator seeded by `seed` and the
/// parameter's position: uniform with mean 0 and the standard deviation its random init gave it,
/// rounded to a power of two (so that the sample's noise does not reach the values); a
/// parameter whose values are all equal (RMSNorm's ones, a zero bias) is kept, and a one-value
/// parameter (a scalar head's bias, drawn at random) becomes 0. For a test that needs the same
/// model on every run: Burn's seed is one generator for the process, which the tests running
/// beside it draw from too.
pub fn deterministic<M: burn::module::Module>(model: M, seed: u64) -> M {
    use rand::{RngExt, SeedableRng};
    struct Refill(u64, u64);
    impl burn::module::ModuleMapper for Refill {
        fn map_float<const D: usize>(&mut self, param: burn::module::Param<burn::tensor::Tensor<D>>) -> burn::module::Param<burn::tensor::Tensor<D>> {
            self.1 += 1;
            let mut rng = rand::rngs::StdRng::seed_from_u64(self.0.wrapping_mul(1_000_003).wrapping_add(self.1));
            param.map(|t| {
                let (device, dtype, shape) = (t.device(), t.dtype(), t.shape());
                let values = t.into_data().convert::<f32>().try_into_vec::<f32>().expect("float values");
                let refilled = if values.len() == 1 {
                    vec![0.0]
                } else if values.iter().all(|&v| v == values[0]) {
                    values
                } else {
                    let n = values.len() as f64;
                    let std = (values.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n).sqrt();
                    let half_width = 3f64.sqrt() * std.log2().round().exp2();
                    values.iter().map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * half_width) as f32).collect()
                };
                burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(refilled, shape), (&device, dtype))
            })
        }
    }
    model.map(&mut Refill(seed, 0))
}

/// A small pre-trained start model for the later stages' tests: `configs/tiny.toml`'s run with
/// the model at width `dim` and 2 layers, on `seq_len`-token windows of the shipped corpus, for
/// `steps` steps, written to `dir/pre` (shards prepared into `dir/shards`). Returns the run
/// directory.
pub fn pretrain_tiny(dir: &Path, dim: usize, seq_len: usize, steps: u64) -> anyhow::Result<PathBuf> {
    use llama_pretrain::{DataConfig, EvalConfig, PretrainConfig};
    use llama_trainer::config::{OptimConfig, RunConfig, ScheduleConfig, ScheduleKind, TrainConfig};
    let repo = repo();
    let model = llama_model::LlamaConfig::new(dim, 2, 4).with_n_kv_heads(2).with_vocab_size(2048).with_multiple_of(32).with_max_seq_len(256);
    let cfg = PretrainConfig {
        model: toml::Value::try_from(&model)?,
        data: DataConfig {
            shards: dir.join("shards"),
            tokenizer: repo.join("data/tokenizer.json"),
            seq_len,
            source: Some(repo.join("data/corpus/brown.jsonl")),
            shuffle: true,
        },
        optim: OptimConfig { lr: 3e-3, weight_decay: 0.1, grad_clip: 1.0, ..OptimConfig::default() },
        schedule: ScheduleConfig { kind: ScheduleKind::Cosine, warmup_steps: 30, min_lr_ratio: 0.1, ..ScheduleConfig::default() },
        train: TrainConfig {
            max_steps: Some(steps),
            batch_size: 16,
            micro_batch_size: 8,
            seed: 0,
            log_every: 10,
            eval_every: 1000,
            eval_batches: 8,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            ..TrainConfig::default()
        },
        run: RunConfig { out_dir: dir.join("pre"), device: "flex".into(), dtype: "f32".into(), ..RunConfig::default() },
        eval: EvalConfig {
            prompts: ["The jury said", "In the morning, the", "He looked at her and"].map(String::from).to_vec(),
            max_new_tokens: 32,
            temperature: 0.8,
        },
    };
    llama_pretrain::check(&cfg, &model, "pretrain_tiny")?;
    llama_pretrain::run_config(cfg, model, "pretrain_tiny", &llama_pretrain::Overrides::default())?;
    Ok(dir.join("pre"))
}

/// Writes a case's config `dir/NAME.toml` and returns its path.
pub fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// One bad input: the binary's arguments and what the error must say.
pub struct Case {
    pub name: String,
    pub args: Vec<String>,
    /// Each must appear in the standard error.
    pub needles: Vec<String>,
    /// Paths (under the watched directory) the refused command may create; none by default.
    pub may_create: Vec<PathBuf>,
    pub cwd: Option<PathBuf>,
    /// Fed to the binary's standard input (none: it reads end of file).
    pub stdin: Option<Vec<u8>>,
    pub env: Vec<(String, String)>,
    /// A hostile file's case: the binary runs with [`HOSTILE_MEMORY_BYTES`] of address space
    /// (so a size it trusts aborts it instead of passing) and must end within
    /// [`HOSTILE_SECONDS`].
    pub hostile: bool,
}

/// Address space a hostile case's binary may map (`ulimit -v`).
pub const HOSTILE_MEMORY_BYTES: u64 = 2 << 30;
/// Wall time a hostile case's binary may take to refuse its input.
pub const HOSTILE_SECONDS: u64 = 20;

impl Case {
    pub fn new(name: &str, args: &[&str], needles: &[&str]) -> Self {
        Self {
            name: name.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            needles: needles.iter().map(|n| n.to_string()).collect(),
            may_create: vec![],
            cwd: None,
            stdin: None,
            env: vec![],
            hostile: false,
        }
    }

    /// A hostile file's case (see [`Case::hostile`]).
    pub fn hostile(mut self) -> Self {
        self.hostile = true;
        self
    }

    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn may_create(mut self, path: impl Into<PathBuf>) -> Self {
        self.may_create.push(path.into());
        self
    }

    pub fn in_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Runs `binary` with the case's arguments and asserts that it is refused cleanly and that
    /// nothing under `watch` changed (see the crate doc). Returns the standard error.
    pub fn refused(&self, binary: &str, watch: &Path) -> String {
        let before = Tree::of(watch);
        let mut command = Command::new(binary);
        command.args(&self.args).current_dir(self.cwd.clone().unwrap_or_else(repo)).env_remove("RUST_BACKTRACE");
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        if self.hostile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; it only lowers this child's own limit.
            unsafe {
                command.pre_exec(|| {
                    let limit = libc::rlimit { rlim_cur: HOSTILE_MEMORY_BYTES, rlim_max: HOSTILE_MEMORY_BYTES };
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        command.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let started = std::time::Instant::now();
        let mut child = command.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        let bytes = self.stdin.clone().unwrap_or_default();
        // Written from a thread: a binary that refuses before reading must not block the writer.
        let feeder = std::thread::spawn(move || {
            use std::io::Write;
            let _ = input.write_all(&bytes);
        });
        let out = child.wait_with_output().unwrap();
        let _ = feeder.join();
        let elapsed = started.elapsed();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let what = format!("case `{}` ({} {})", self.name, binary.rsplit('/').next().unwrap_or(binary), self.args.join(" "));
        if self.hostile {
            assert!(elapsed.as_secs() < HOSTILE_SECONDS, "{what}: took {elapsed:?} to refuse a hostile file (at most {HOSTILE_SECONDS} s)\n{err}");
        }
        assert!(!out.status.success(), "{what}: should have been refused; stdout:\n{}", String::from_utf8_lossy(&out.stdout));
        // 1: the binary's `error: ...` path; 2: clap's usage errors. 101 is a panic; none, a signal.
        assert!(matches!(out.status.code(), Some(1 | 2)), "{what}: exit status {:?} (a panic or a crash), stderr:\n{err}", out.status);
        assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{what}: panicked:\n{err}");
        for needle in &self.needles {
            assert!(err.contains(needle.as_str()), "{what}: the message should name `{needle}`:\n{err}");
        }
        before.assert_kept(watch, &self.may_create, &what);
        err
    }
}

/// Runs every case ([`Case::refused`]) and fails once at the end, listing each case that was not
/// refused as it should be (so one run shows them all).
pub fn refuse_all(binary: &str, watch: &Path, cases: &[Case]) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case.refused(binary, watch))).err().map(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| format!("case `{}` failed", case.name))
            })
        })
        .collect();
    assert!(failures.is_empty(), "{} of {} bad inputs were not refused as they should be:\n\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}

/// Every file and directory under a root, with file contents.
pub struct Tree(BTreeMap<PathBuf, Option<Vec<u8>>>);

impl Tree {
    pub fn of(root: &Path) -> Self {
        let mut entries = BTreeMap::new();
        fn walk(dir: &Path, entries: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
            let Ok(read) = std::fs::read_dir(dir) else { return };
            for entry in read.filter_map(|e| e.ok()) {
                let path = entry.path();
                let Ok(kind) = entry.file_type() else { continue };
                if kind.is_dir() {
                    entries.insert(path.clone(), None);
                    walk(&path, entries);
                } else if kind.is_file() {
                    entries.insert(path.clone(), std::fs::read(&path).ok());
                } else {
                    // FIFOs, sockets, symlinks: their presence is what counts.
                    entries.insert(path, Some(vec![]));
                }
            }
        }
        walk(root, &mut entries);
        Self(entries)
    }

    /// Asserts that every entry of `self` is still under `root` with the same contents, and that
    /// nothing new appeared outside `may_create`.
    pub fn assert_kept(&self, root: &Path, may_create: &[PathBuf], what: &str) {
        let now = Self::of(root);
        for (path, contents) in &self.0 {
            match now.0.get(path) {
                None => panic!("{what}: {} was removed", path.display()),
                Some(c) if c != contents => panic!("{what}: {} was changed", path.display()),
                _ => {}
            }
        }
        for path in now.0.keys().filter(|p| !self.0.contains_key(*p)) {
            assert!(may_create.iter().any(|allowed| path.starts_with(allowed)), "{what}: {} was created", path.display());
        }
    }
}

/// `mpirun -np RANKS BINARY ARGS...` from the workspace root, one thread per rank (allowed as
/// root, where the tests run as root); each `env` pair is exported to every rank. Returns
/// (succeeded, stdout, stderr).
///
/// Each launch gets its own `TMPDIR`: Open MPI makes its session directory there, and two
/// launches at once (the tests of one binary run in parallel) race to create the same
/// `/tmp/ompi.HOST.UID`, the loser failing in `orte_init` with "File exists".
pub fn mpirun(ranks: usize, binary: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    static LAUNCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let launch = LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let session = std::env::temp_dir().join(format!("llama2-mpirun-{}-{launch}", std::process::id()));
    std::fs::create_dir_all(&session).unwrap_or_else(|e| panic!("{}: {e}", session.display()));
    let mut cmd = Command::new("mpirun");
    cmd.env("TMPDIR", &session);
    cmd.args(["--oversubscribe", "--allow-run-as-root", "-np", &ranks.to_string(), "-x", "RAYON_NUM_THREADS=1"]);
    for (k, v) in env {
        cmd.args(["-x", &format!("{k}={v}")]);
    }
    cmd.arg(binary).args(args).current_dir(repo());
    let out = cmd.output().expect("mpirun (apt-get install openmpi-bin libopenmpi-dev)");
    let _ = std::fs::remove_dir_all(&session);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// (step, loss, grad_norm) of every logged training step in the run directory `out`.
pub fn train_curve(out: impl AsRef<Path>) -> Vec<(u64, f64, f64)> {
    let path = out.as_ref().join("metrics.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("train/loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["train/loss"].as_f64().unwrap(), v["train/grad_norm"].as_f64().unwrap()))
        .collect()
}

/// Asserts that two runs logged the same training steps with losses and gradient norms equal
/// within the relative tolerance `tol` (absolute below 1).
pub fn assert_same_curve(label: &str, got: impl AsRef<Path>, want: impl AsRef<Path>, tol: f64) {
    let (got, want) = (train_curve(got), train_curve(want));
    let steps = |c: &[(u64, f64, f64)]| c.iter().map(|r| r.0).collect::<Vec<_>>();
    assert_eq!(steps(&got), steps(&want), "{label}: logged steps");
    let close = |g: f64, w: f64| (g - w).abs() <= tol * w.abs().max(1.0);
    for (g, w) in got.iter().zip(&want) {
        assert!(close(g.1, w.1) && close(g.2, w.2), "{label}, step {}: (loss, grad norm) {:?} vs {:?}", g.0, (g.1, g.2), (w.1, w.2));
    }
}

#[cfg(test)]
mod tests {
    use super::Tree;

    fn fails(f: impl FnOnce()) -> String {
        let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err("should fail");
        e.downcast_ref::<String>().cloned().unwrap_or_default()
    }

    /// The tree check sees a removed, a changed and a created file, and allows what a case may
    /// create.
    #[test]
    fn the_tree_check_sees_every_change_outside_the_allowed_paths() {
        let dir = std::env::temp_dir().join(format!("llama-testkit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/a.txt"), "a").unwrap();
        std::fs::write(dir.join("b.txt"), "b").unwrap();
        let before = Tree::of(&dir);
        before.assert_kept(&dir, &[], "untouched");
        std::fs::write(dir.join("out.txt"), "new").unwrap();
        assert!(fails(|| before.assert_kept(&dir, &[], "created")).contains("out.txt was created"));
        before.assert_kept(&dir, &[dir.join("out.txt")], "allowed");
        std::fs::write(dir.join("b.txt"), "B").unwrap();
        assert!(fails(|| before.assert_kept(&dir, &[dir.join("out.txt")], "changed")).contains("b.txt was changed"));
        std::fs::write(dir.join("b.txt"), "b").unwrap();
        std::fs::remove_dir_all(dir.join("sub")).unwrap();
        assert!(fails(|| before.assert_kept(&dir, &[dir.join("out.txt")], "removed")).contains("was removed"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
