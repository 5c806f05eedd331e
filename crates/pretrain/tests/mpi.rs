//! `pretrain` as an MPI job (`mpirun -np N`, built with the `mpi` feature): data parallel over
//! ranks with AdamW sharded across them must train exactly as one process does, resume at another
//! world size, and end the whole job when one rank dies.
#![cfg(feature = "mpi")]

mod common;

use std::time::{Duration, Instant};

use common::{Fixture, checkpoint_names, pretrain, weights};

// 6 micro-batches of one sequence per step: 6 in one process, 3 per rank at world 2, 2 at 3.
const MODEL: &str = "dim = 32\nn_layers = 2\nn_heads = 2\nn_kv_heads = 1\nvocab_size = 400\nmultiple_of = 16\nmax_seq_len = 64";
const TRAIN: &str =
    "max_steps = 10\nbatch_size = 6\nmicro_batch_size = 1\nlog_every = 1\neval_every = 100\neval_batches = 1\ncheckpoint_every = 5\nkeep_checkpoints = 5";

/// `mpirun -np ranks pretrain args...`.
fn mpirun(ranks: usize, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    llama_testkit::mpirun(ranks, env!("CARGO_BIN_EXE_pretrain"), args, env)
}

/// The same curve as the one-process run, and the same weights at `steps`.
fn assert_same_run(label: &str, out: &str, want_out: &str, steps: &[u64]) {
    llama_testkit::assert_same_curve(label, out, want_out, 1e-5);
    for &step in steps {
        let (g, w) = (weights(out, step), weights(want_out, step));
        let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{label}: weights of step {step} differ by up to {worst}");
    }
}

#[test]
fn world_sizes_1_2_3_train_alike_and_resume_across_world_sizes() {
    let f = Fixture::new(400);
    let one = f.config("one", MODEL, TRAIN, "");
    let (ok, _, err) = pretrain(&["--config", &one], &[]);
    assert!(ok, "{err}");
    let params = weights(&f.path("out-one"), 10).len();
    assert_ne!(params % 3, 0, "the test wants a parameter count that 3 ranks cannot split evenly");
    for ranks in [2, 3] {
        let name = format!("world{ranks}");
        let cfg = f.config(&name, MODEL, TRAIN, "");
        let (ok, out, err) = mpirun(ranks, &["--config", &cfg], &[]);
        assert!(ok, "world {ranks}: {out}\n{err}");
        assert_same_run(&name, &f.path(&format!("out-{name}")), &f.path("out-one"), &[5, 10]);
        let manifest = std::fs::read_to_string(f.path(&format!("out-{name}/checkpoints/step-00000010/optimizer/manifest.json"))).unwrap();
        assert!(manifest.contains(&format!("\"world_size\": {ranks}")), "{manifest}");
        // Each rank sends (N - 1) / N of the padded f32 vector in each of the two collectives.
        let metrics = std::fs::read_to_string(f.path(&format!("out-{name}/metrics.jsonl"))).unwrap();
        let last: serde_json::Value = serde_json::from_str(metrics.lines().rev().find(|l| l.contains("dist/comm_bytes_per_rank")).unwrap()).unwrap();
        let block = params.div_ceil(ranks);
        assert_eq!(last["dist/comm_bytes_per_rank"].as_f64().unwrap(), (2 * 4 * block * (ranks - 1)) as f64);
    }
    // Stopped at step 5 at world 2, then resumed at world 3 and in one plain process.
    for (name, resume) in [("w2to3", Some(3)), ("w2to1", None)] {
        let cfg = f.config(name, MODEL, TRAIN, "");
        let (ok, out, err) = mpirun(2, &["--config", &cfg, "--stop-after", "5"], &[]);
        assert!(ok, "{name} first part: {out}\n{err}");
        let (ok, out, err) = match resume {
            Some(ranks) => mpirun(ranks, &["--config", &cfg, "--resume"], &[]),
            None => pretrain(&["--config", &cfg, "--resume"], &[]),
        };
        assert!(ok, "{name} resumed: {out}\n{err}");
        assert_same_run(name, &f.path(&format!("out-{name}")), &f.path("out-one"), &[10]);
    }
}

#[test]
fn a_rank_killed_mid_step_ends_the_job_and_leaves_the_last_complete_checkpoint() {
    let f = Fixture::new(400);
    let cfg = f.config("killed", MODEL, TRAIN, "");
    let started = Instant::now();
    // Rank 1 kills itself with SIGKILL in step 7, before its gradients are reduced.
    let (ok, out, err) = mpirun(3, &["--config", &cfg], &[("LLAMA2_TEST_KILL_AT", "backward@7"), ("LLAMA2_TEST_KILL_RANK", "1")]);
    let took = started.elapsed();
    assert!(!ok, "the job must fail when a rank dies: {out}");
    assert!(took < Duration::from_secs(60), "the job took {took:?} to end");
    assert!(err.contains("rank 1"), "mpirun names the dead rank: {err}");
    let checkpoints: Vec<String> = std::fs::read_dir(f.path("out-killed/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(checkpoints, vec!["step-00000005".to_string()]);
    // The job resumes from it (at another world size) to the uninterrupted run's figures.
    let (ok, out, err) = mpirun(2, &["--config", &cfg, "--resume"], &[]);
    assert!(ok, "{out}\n{err}");
    let one = f.config("one", MODEL, TRAIN, "");
    let (ok, _, err) = pretrain(&["--config", &one], &[]);
    assert!(ok, "{err}");
    assert_same_run("killed then resumed", &f.path("out-killed"), &f.path("out-one"), &[10]);
}

/// SIGTERM reaching one rank of three mid-step: every rank stops after the same step, the job
/// writes a checkpoint of it and exits 0, and resuming at another world size gives the
/// uninterrupted run.
#[test]
fn a_signal_to_one_rank_stops_the_whole_job_at_one_step_with_a_checkpoint() {
    let f = Fixture::new(400);
    let cfg = f.config("signalled", MODEL, TRAIN, "");
    let (ok, out, err) = mpirun(3, &["--config", &cfg], &[("LLAMA2_TEST_SIGNAL_AT", "backward@7"), ("LLAMA2_TEST_KILL_RANK", "1")]);
    assert!(ok, "a signalled job ends with status 0: {out}\n{err}");
    assert!(out.contains("SIGTERM received: stopped after step 7"), "{out}");
    assert_eq!(checkpoint_names(&f.path("out-signalled")), vec!["step-00000005".to_string(), "step-00000007".to_string()]);
    let (ok, out, err) = mpirun(2, &["--config", &cfg, "--resume"], &[]);
    assert!(ok, "{out}\n{err}");
    let one = f.config("one", MODEL, TRAIN, "");
    let (ok, _, err) = pretrain(&["--config", &one], &[]);
    assert!(ok, "{err}");
    assert_same_run("signalled then resumed", &f.path("out-signalled"), &f.path("out-one"), &[10]);
}
