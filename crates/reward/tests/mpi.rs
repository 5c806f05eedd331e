//! `reward` as an MPI job (built with the `mpi` feature): two ranks, each taking every other
//! preference pair of the one shuffled sequence, train as one process does.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../..")
}

/// (loss, grad_norm) of every logged step.
fn curve(out: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v.get("train/loss")?.as_f64()?, v["train/grad_norm"].as_f64()?)))
        .collect()
}

fn check(out: Output) {
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn two_ranks_train_a_reward_model_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let start = llama_pretrain::pretrain_tiny(&repo(), tmp.path(), 32, 32, 2).unwrap();
    let config = |name: &str| {
        let path = tmp.path().join(format!("{name}.toml"));
        let text = std::fs::read_to_string(repo().join("configs/reward-safety-tiny.toml"))
            .unwrap()
            .replace("init = \"runs/sft-tiny\"", &format!("init = \"{}\"", start.display()))
            .replace("out_dir = \"runs/reward-safety-tiny\"", &format!("out_dir = \"{}\"", tmp.path().join(name).display()))
            .replace("micro_batch_size = 16", "micro_batch_size = 2")
            .replace("\nbatch_size = 16", "\nbatch_size = 4")
            .replace("log_every = 10", "log_every = 1")
            .replace("eval_every = 100", "eval_every = 1000");
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (one, two) = (config("one"), config("two"));
    check(Command::new(env!("CARGO_BIN_EXE_reward")).args(["--config", &one, "--max-steps", "5"]).current_dir(repo()).output().unwrap());
    check(
        Command::new("mpirun")
            .args(["--oversubscribe", "--allow-run-as-root", "-np", "2", "-x", "RAYON_NUM_THREADS=1", env!("CARGO_BIN_EXE_reward"), "--config", &two, "--max-steps", "5"])
            .current_dir(repo())
            .output()
            .unwrap(),
    );
    let (want, got) = (curve(&tmp.path().join("one")), curve(&tmp.path().join("two")));
    assert_eq!(want.len(), 5, "{want:?}");
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g.0 - w.0).abs() <= 1e-5 * w.0.abs().max(1.0) && (g.1 - w.1).abs() <= 1e-5 * w.1.abs().max(1.0), "step {}: {g:?} vs {w:?}", step + 1);
    }
}
