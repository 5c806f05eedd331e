//! Checkpoint tests: Hugging Face parity (fixtures made by tests/fixtures/make_hf_fixture.py with
//! `transformers`), export round trips, native save/load, and bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{Device, Int, Tensor, TensorData};
use llama_model::checkpoint::{self, load_hf, load_native, load_weights, save_hf, save_native};
use llama_model::{Llama, LlamaConfig};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../../tests/fixtures").join(name)
}

fn expected(dir: &Path) -> (Vec<Vec<i64>>, Vec<f32>) {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids: Vec<Vec<i64>> = serde_json::from_value(v["input_ids"].clone()).unwrap();
    let logits: Vec<Vec<Vec<f32>>> = serde_json::from_value(v["logits"].clone()).unwrap();
    (ids, logits.into_iter().flatten().flatten().collect())
}

fn logits_of(model: &Llama, ids: &[Vec<i64>], device: &Device) -> Vec<f32> {
    let flat: Vec<i64> = ids.iter().flatten().copied().collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(flat, [ids.len(), ids[0].len()]), device);
    model.forward(input).into_data().try_to_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn check_parity(name: &str) {
    let device = Device::flex();
    let dir = fixture(name);
    let (ids, want) = expected(&dir);
    let (config, model) = load_hf(&dir, &device).unwrap();
    let diff = max_abs_diff(&logits_of(&model, &ids, &device), &want);
    assert!(diff < 1e-4, "{name}: our logits differ from transformers' by {diff}");

    // Export, reload: the same logits again (single file and sharded).
    let tmp = tempfile::tempdir().unwrap();
    for (sub, shard) in [("single", u64::MAX), ("sharded", 20_000)] {
        let out = tmp.path().join(sub);
        save_hf(&model, &config, &out, shard).unwrap();
        if sub == "sharded" {
            assert!(out.join(checkpoint::HF_INDEX).is_file(), "expected an index for sharded output");
        }
        // Readable by all, like the other files, and no temporary file left behind.
        for entry in std::fs::read_dir(&out).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with('.'), "{sub}: leftover {name}");
            #[cfg(unix)]
            if name.ends_with(".safetensors") {
                use std::os::unix::fs::PermissionsExt;
                assert_eq!(entry.metadata().unwrap().permissions().mode() & 0o777, 0o644, "{sub}: {name}");
            }
        }
        let (config2, model2) = load_hf(&out, &device).unwrap();
        assert_eq!(config2.num_params(), config.num_params());
        let diff = max_abs_diff(&logits_of(&model2, &ids, &device), &want);
        assert!(diff < 1e-4, "{name} ({sub} export): {diff}");
    }
}

#[test]
fn hugging_face_gqa_parity_and_round_trip() {
    check_parity("hf-tiny-gqa");
}

#[test]
fn hugging_face_tied_embeddings_parity_and_round_trip() {
    check_parity("hf-tiny-tied");
    let (config, model) = load_hf(&fixture("hf-tiny-tied"), &Device::flex()).unwrap();
    assert!(config.tie_word_embeddings && model.output.is_none());
}

#[test]
fn native_round_trip_and_wrong_config_is_an_error() {
    let device = Device::flex();
    let (config, model) = load_hf(&fixture("hf-tiny-gqa"), &device).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("native");
    save_native(&model, &config, &dir).unwrap();
    assert_eq!(checkpoint::detect(&dir).unwrap(), checkpoint::Format::Native);
    // Readable by others, as the config beside it (Burn's store alone made it 0600).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(checkpoint::NATIVE_WEIGHTS)).unwrap().permissions().mode();
        assert_eq!(mode & 0o044, 0o044, "model.safetensors mode {mode:o}");
    }
    let (config2, model2) = load_native(&dir, &device).unwrap();
    assert_eq!(config2, config);
    let (ids, want) = expected(&fixture("hf-tiny-gqa"));
    assert!(max_abs_diff(&logits_of(&model2, &ids, &device), &want) < 1e-4);

    // The same weights into a model of another shape: an error that names a tensor.
    let other = LlamaConfig { n_kv_heads: Some(4), ..config.clone() };
    let mut wrong = other.init(&device);
    let err = load_weights(&mut wrong, &dir.join(checkpoint::NATIVE_WEIGHTS)).unwrap_err().to_string();
    assert!(err.contains("does not match") && err.contains("wk"), "{err}");
    let deeper = LlamaConfig { n_layers: 3, ..config };
    let err = load_weights(&mut deeper.init(&device), &dir.join(checkpoint::NATIVE_WEIGHTS)).unwrap_err().to_string();
    assert!(err.contains("missing tensor") && err.contains("layers.2"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn broken_hugging_face_directories_are_clear_errors() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();

    // A config whose intermediate_size disagrees with the tensors.
    let dir = tmp.path().join("shape");
    copy_dir(&fixture("hf-tiny-gqa"), &dir);
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["intermediate_size"] = Value::from(96);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = load_hf(&dir, &device).unwrap_err().to_string();
    assert!(err.contains("shape") && err.contains("mlp"), "{err}");

    // A weights file with one tensor removed.
    let dir = tmp.path().join("missing");
    copy_dir(&fixture("hf-tiny-gqa"), &dir);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors().into_iter().filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight").collect();
    safetensors::tensor::serialize_to_file(kept, None, &dir.join("model.safetensors.new")).unwrap();
    std::fs::rename(dir.join("model.safetensors.new"), dir.join("model.safetensors")).unwrap();
    let err = load_hf(&dir, &device).unwrap_err().to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("missing"), "{err}");

    // Not safetensors at all.
    let dir = tmp.path().join("garbage");
    copy_dir(&fixture("hf-tiny-gqa"), &dir);
    std::fs::write(dir.join("model.safetensors"), b"definitely not a tensor file").unwrap();
    let err = load_hf(&dir, &device).unwrap_err().to_string();
    assert!(err.contains("not a valid safetensors"), "{err}");

    // No weights, and no directory.
    let dir = tmp.path().join("noweights");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("hf-tiny-gqa").join("config.json"), dir.join("config.json")).unwrap();
    assert!(load_hf(&dir, &device).unwrap_err().to_string().contains("no model.safetensors"));
    assert!(checkpoint::load(&tmp.path().join("nowhere"), &device).unwrap_err().to_string().contains("not a checkpoint directory"));
}

/// An index whose shard names leave the checkpoint directory (`../`, absolute paths) or name
/// something that is not a regular file (a FIFO would hang the loader) is refused, naming the
/// entry; nothing outside the directory is opened.
#[test]
fn index_shard_names_stay_inside_the_checkpoint_directory() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::copy(fixture("hf-tiny-gqa").join("model.safetensors"), outside.join("x.safetensors")).unwrap();
    let dir = tmp.path().join("ckpt");
    copy_dir(&fixture("hf-tiny-gqa"), &dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let fifo = dir.join("pipe.safetensors");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let absolute = outside.join("x.safetensors").display().to_string();
    for (file, says) in [
        ("../outside/x.safetensors", "plain file names"),
        (absolute.as_str(), "plain file names"),
        ("/etc/passwd", "plain file names"),
        ("pipe.safetensors", "not a regular file"),
        ("absent.safetensors", "not a regular file"),
    ] {
        let index = serde_json::json!({ "weight_map": { "model.embed_tokens.weight": file } });
        std::fs::write(dir.join(checkpoint::HF_INDEX), index.to_string()).unwrap();
        let err = load_hf(&dir, &device).unwrap_err().to_string();
        assert!(err.contains(says) && err.contains("model.embed_tokens.weight"), "{file}: {err}");
    }
}

/// Every quantized type the GGUF reader takes decodes to the values the `gguf` Python package
/// (llama.cpp's own) computes, bit for bit: blocks made by its quantizer (Q4_0, Q4_1, Q5_0, Q5_1,
/// Q8_0) or random with finite scales (the K-quants, which it cannot quantize), by
/// `scripts/interop/gguf_quants.py`.
#[test]
fn gguf_quantized_types_dequantize_as_the_gguf_package_does() {
    use llama_model::quants::QuantType;
    let tmp = tempfile::tempdir().unwrap();
    let python = std::env::var("LLAMA2_PYTHON").unwrap_or_else(|_| "python3".into());
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new(&python).arg(repo.join("scripts/interop/gguf_quants.py")).arg(tmp.path()).output().unwrap();
    assert!(out.status.success(), "the gguf package is needed (scripts/test.sh installs it): {}", String::from_utf8_lossy(&out.stderr));
    let types = [
        ("Q4_0", QuantType::Q4_0),
        ("Q4_1", QuantType::Q4_1),
        ("Q5_0", QuantType::Q5_0),
        ("Q5_1", QuantType::Q5_1),
        ("Q8_0", QuantType::Q8_0),
        ("Q2_K", QuantType::Q2K),
        ("Q3_K", QuantType::Q3K),
        ("Q4_K", QuantType::Q4K),
        ("Q5_K", QuantType::Q5K),
        ("Q6_K", QuantType::Q6K),
        ("BF16", QuantType::BF16),
    ];
    for (name, ty) in types {
        let blocks = std::fs::read(tmp.path().join(format!("{name}.blocks"))).unwrap();
        let want: Vec<u32> =
            std::fs::read(tmp.path().join(format!("{name}.f32"))).unwrap().chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let got: Vec<u32> = ty.dequantize(&blocks).iter().map(|v| v.to_bits()).collect();
        assert_eq!(got.len(), want.len(), "{name}: value count");
        let differ = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(
            differ.is_none(),
            "{name}: value {} is {} here, {} in gguf",
            differ.unwrap(),
            f32::from_bits(got[differ.unwrap()]),
            f32::from_bits(want[differ.unwrap()])
        );
    }
}
