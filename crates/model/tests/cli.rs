//! The `llama` binary as a user runs it.

use std::path::Path;
use std::process::Command;

fn llama(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llama"))
        .args(args)
        .current_dir(Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../.."))
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn info_prints_exact_parameter_counts_and_memory() {
    for (file, count) in [("configs/7b.toml", "6738415616"), ("configs/13b.toml", "13015864320"), ("configs/70b.toml", "68976648192")] {
        let (ok, out, err) = llama(&["info", "--config", file, "--micro-batch", "1", "--seq-len", "4096", "--device-memory-gib", "80"]);
        assert!(ok, "{err}");
        assert!(out.contains(count), "{out}");
        assert!(out.contains("bf16") && out.contains("AdamW"), "{out}");
    }
    let (_, out, _) = llama(&["info", "--config", "configs/70b.toml", "--device-memory-gib", "80"]);
    assert!(out.contains("does NOT fit"), "70B cannot train on one 80 GiB device: {out}");
}

#[test]
fn bad_config_is_a_clear_error_without_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[model]\ndim = 64\nn_layers = 2\nn_heads = 4\nwidth = 3\n").unwrap();
    let (ok, _, err) = llama(&["info", "--config", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("bad.toml") && err.contains("width"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn convert_round_trips_hf_native_hf() {
    let tmp = tempfile::tempdir().unwrap();
    let native = tmp.path().join("native");
    let hf = tmp.path().join("hf");
    let (ok, _, err) = llama(&["convert", "--from", "tests/fixtures/hf-tiny-gqa", "--to", native.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(native.join("config.toml").is_file());
    let (ok, _, err) = llama(&["convert", "--from", native.to_str().unwrap(), "--to", hf.to_str().unwrap()]);
    assert!(ok, "{err}");
    let a = std::fs::read(Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../../tests/fixtures/hf-tiny-gqa/model.safetensors")).unwrap();
    let b = std::fs::read(hf.join("model.safetensors")).unwrap();
    let (a, b) = (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&b).unwrap());
    for (name, view) in a.tensors() {
        assert_eq!(view.data(), b.tensor(&name).unwrap().data(), "{name} changed in the round trip");
    }
}

#[test]
fn generate_runs_on_a_checkpoint_with_the_shipped_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let config = llama_model::LlamaConfig::new(32, 1, 2).with_vocab_size(2048).with_multiple_of(16).with_max_seq_len(64);
    let model = config.init(&burn::tensor::Device::flex());
    llama_model::checkpoint::save_native(&model, &config, tmp.path()).unwrap();
    let dir = tmp.path().to_str().unwrap();
    let (ok, out, err) = llama(&["generate", "--checkpoint", dir, "--tokenizer", "data/tokenizer.json", "--prompt", "The jury", "--prompt", "He said", "--max-new-tokens", "5", "--seed", "1"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("The jury") && out.contains("\nHe said"), "{out}");
    let (ok, _, err) = llama(&["generate", "--checkpoint", dir, "--tokenizer", "data/tokenizer.json", "--prompt", "x", "--max-new-tokens", "500"]);
    assert!(!ok && err.contains("max_seq_len") && !err.contains("panicked"), "{err}");
}
