//! `sft` as an MPI job (built with the `mpi` feature): two ranks, each taking every other chat
//! of the one shuffled sequence, train as one process does.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::Command;

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

#[test]
fn two_ranks_fine_tune_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    llama_pretrain::pretrain_tiny(&repo(), tmp.path(), 32, 32, 2).unwrap();

    let config = |name: &str| {
        let path = tmp.path().join(format!("{name}.toml"));
        let text = std::fs::read_to_string(repo().join("configs/sft-tiny.toml"))
            .unwrap()
            .replace("init = \"runs/tiny\"", &format!("init = \"{}\"", tmp.path().join("pre").display()))
            .replace("out_dir = \"runs/sft-tiny\"", &format!("out_dir = \"{}\"", tmp.path().join(name).display()))
            .replace("seq_len = 128", "seq_len = 64")
            .replace("micro_batch_size = 8", "micro_batch_size = 1")
            .replace("\nbatch_size = 8", "\nbatch_size = 4")
            .replace("log_every = 10", "log_every = 1")
            .replace("eval_every = 100", "eval_every = 1000")
            .replace("success_samples = 100", "success_samples = 2")
            .replace("text_samples = 4", "text_samples = 1")
            .replace("max_new_tokens = 16", "max_new_tokens = 4");
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (one, two) = (config("one"), config("two"));
    let out = Command::new(env!("CARGO_BIN_EXE_sft")).args(["--config", &one, "--max-steps", "6"]).current_dir(repo()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("mpirun")
        .args(["--oversubscribe", "--allow-run-as-root", "-np", "2", "-x", "RAYON_NUM_THREADS=1", env!("CARGO_BIN_EXE_sft"), "--config", &two, "--max-steps", "6"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let (want, got) = (curve(&tmp.path().join("one")), curve(&tmp.path().join("two")));
    assert_eq!(want.len(), 6, "{want:?}");
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g.0 - w.0).abs() <= 1e-5 * w.0.abs().max(1.0) && (g.1 - w.1).abs() <= 1e-5 * w.1.abs().max(1.0), "step {}: {g:?} vs {w:?}", step + 1);
    }
}
