//! `sft` as an MPI job (built with the `mpi` feature): two ranks, each taking every other chat
//! of the one shuffled sequence, train as one process does.
#![cfg(feature = "mpi")]

use llama_testkit::{assert_same_curve, mpirun, repo};

#[test]
fn two_ranks_fine_tune_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    llama_testkit::pretrain_tiny(tmp.path(), 32, 32, 2).unwrap();

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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sft")).args(["--config", &one, "--max-steps", "6"]).current_dir(repo()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ok, stdout, stderr) = mpirun(2, env!("CARGO_BIN_EXE_sft"), &["--config", &two, "--max-steps", "6"], &[]);
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(llama_testkit::train_curve(tmp.path().join("one")).len(), 6);
    assert_same_curve("two ranks", tmp.path().join("two"), tmp.path().join("one"), 1e-5);
    // One report per job: the start-up lines are printed by rank 0 only.
    assert_eq!(stdout.matches("sft: ").count(), 1, "{stdout}");
}
