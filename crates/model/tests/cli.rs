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

/// With block recomputation and the host optimizer, 7B and 13B at micro-batch 1 x 4096 fit one
/// 80 GiB device in bf16: the chosen settings' table says so, with a host total; without them
/// (the combination table's first line) they do not. 70B fits in no combination.
#[test]
fn info_says_7b_and_13b_fit_80_gib_with_recomputation_and_the_host_optimizer() {
    let bf16_row = |out: &str| out.lines().find(|l| l.starts_with("bf16 ")).unwrap_or_else(|| panic!("no bf16 row: {out}")).to_string();
    for file in ["configs/7b.toml", "configs/13b.toml"] {
        let args = ["info", "--config", file, "--micro-batch", "1", "--seq-len", "4096", "--recompute", "block", "--optimizer", "host", "--device-memory-gib", "80"];
        let (ok, out, err) = llama(&args);
        assert!(ok, "{err}");
        assert!(out.contains("recompute block, optimizer on the host, logits 1024"), "{out}");
        let row = bf16_row(&out);
        assert!(row.ends_with("  fits") && row.contains("0.00 GiB"), "{file}: {row}");
        let none = out.lines().find(|l| l.contains("--recompute none  --optimizer device")).unwrap();
        assert!(none.ends_with("does NOT fit"), "{file}: {none}");
        let (ok, plain, _) = llama(&["info", "--config", file, "--micro-batch", "1", "--seq-len", "4096", "--device-memory-gib", "80"]);
        assert!(ok && bf16_row(&plain).ends_with("does NOT fit"), "{file}: {plain}");
    }
    let (_, out, _) = llama(&["info", "--config", "configs/70b.toml", "--recompute", "block", "--optimizer", "host", "--device-memory-gib", "80"]);
    assert!(!out.lines().any(|l| l.ends_with("  fits")), "70B: {out}");
    let (ok, _, err) = llama(&["info", "--config", "configs/7b.toml", "--recompute", "layers"]);
    assert!(!ok && err.contains("block") && !err.contains("panicked"), "{err}");
}

/// A run config with `[model] preset = ...` is read like the preset, and `--ranks N` gives each
/// rank 1/N of AdamW's moments (8 bytes per parameter) and 2 x 4 x P x (N-1)/N bytes per step.
#[test]
fn info_reads_presets_and_shards_the_optimizer_over_ranks() {
    let (ok, out, err) = llama(&["info", "--config", "configs/7b-gpu-check.toml", "--ranks", "64"]);
    assert!(ok, "{err}");
    assert!(out.contains("6738415616"), "{out}");
    let p = 6_738_415_616f64;
    let moments = format!("AdamW moments {:.2} GiB on the host (not {:.2} GiB)", 8.0 * p / 64.0 / (1u64 << 30) as f64, 8.0 * p / (1u64 << 30) as f64);
    assert!(out.contains(&moments), "{moments}\n{out}");
    assert!(out.contains(&format!("moves {:.2} GB per optimizer step", 8.0 * p * 63.0 / 64.0 / 1e9)), "{out}");
    let (ok, _, err) = llama(&["info", "--config", "configs/7b.toml", "--ranks", "0"]);
    assert!(!ok && err.contains("--ranks"), "{err}");
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

/// `llama bench` on a tiny model: every phase is timed and reported (terminal and JSON), the
/// figures are positive and finite; a sequence longer than the model's is refused up front.
#[test]
fn bench_reports_every_phase() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tiny.toml");
    std::fs::write(&config, "[model]\ndim = 32\nn_layers = 2\nn_heads = 4\nvocab_size = 64\nmultiple_of = 16\nmax_seq_len = 32\n").unwrap();
    let json = tmp.path().join("bench.json");
    let (ok, out, err) = llama(&[
        "bench", "--config", config.to_str().unwrap(), "--batch", "2", "--seq-len", "16", "--steps", "1", "--gen-tokens", "4",
        "--json", json.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("tokens/s") && out.contains("AdamW") && out.contains("decode") && out.contains("peak RSS"), "{out}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in ["train_tokens_per_s", "forward_s", "backward_s", "optimizer_s", "train_gflops_per_s", "decode_tokens_per_s", "peak_rss_gib"] {
        let v = report[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {report}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    assert_eq!(report["fused_kernels"], serde_json::Value::Bool(true));
    // Burn's composed ops instead of the fused kernels: the same report, marked.
    let (ok, out, err) = llama(&["bench", "--config", config.to_str().unwrap(), "--batch", "2", "--seq-len", "16", "--steps", "1", "--gen-tokens", "0", "--unfused", "--json", json.to_str().unwrap()]);
    assert!(ok && out.contains("--unfused"), "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["fused_kernels"], serde_json::Value::Bool(false));
    let (ok, _, err) = llama(&["bench", "--config", config.to_str().unwrap(), "--seq-len", "64"]);
    assert!(!ok && err.contains("--seq-len 64") && err.contains("max_seq_len 32") && !err.contains("panicked"), "{err}");
    // Block recomputation with chunked logits: the same report, marked; bad sizes refused.
    let (ok, out, err) = llama(&["bench", "--config", config.to_str().unwrap(), "--batch", "2", "--seq-len", "16", "--steps", "1", "--gen-tokens", "0", "--recompute", "block", "--logits-chunk", "8", "--json", json.to_str().unwrap()]);
    assert!(ok && out.contains("block recomputation") && out.contains("chunks of 8"), "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!((report["recompute"].as_str(), report["logits_chunk"].as_u64()), (Some("block"), Some(8)));
    for bad in [["--batch", "0"], ["--logits-chunk", "0"]] {
        let (ok, _, err) = llama(&["bench", "--config", config.to_str().unwrap(), "--seq-len", "16", bad[0], bad[1]]);
        assert!(!ok && err.contains("must be > 0") && !err.contains("panicked"), "{err}");
    }
}
