//! `reward` as an MPI job (built with the `mpi` feature): two ranks, each taking every other
//! preference pair of the one shuffled sequence, train as one process does.
#![cfg(feature = "mpi")]

use llama_testkit::{assert_same_curve, mpirun, repo};

#[test]
fn two_ranks_train_a_reward_model_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let start = llama_testkit::pretrain_tiny(tmp.path(), 32, 32, 2).unwrap();
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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reward")).args(["--config", &one, "--max-steps", "5"]).current_dir(repo()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ok, stdout, stderr) = mpirun(2, env!("CARGO_BIN_EXE_reward"), &["--config", &two, "--max-steps", "5"], &[]);
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(llama_testkit::train_curve(tmp.path().join("one")).len(), 5);
    assert_same_curve("two ranks", tmp.path().join("two"), tmp.path().join("one"), 1e-5);
    // One report per job: the start-up line is printed by rank 0 only.
    assert_eq!(stdout.matches("reward (").count(), 1, "{stdout}");
}
