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
        let args =
            ["info", "--config", file, "--micro-batch", "1", "--seq-len", "4096", "--recompute", "block", "--optimizer", "host", "--device-memory-gib", "80"];
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

/// `llama info --ppo` counts what the run's device keeps: on the CPU (`--cpu`) the fused
/// attention's probabilities are kept for the backward pass, so the f32 policy's share is larger
/// than on a GPU, as in the training table; bf16 rows are the same on both.
#[test]
fn info_ppo_counts_the_cpu_attention_probabilities() {
    let policy_column = |out: &str, dtype: &str| -> f64 {
        let table = &out[out.find("\nPPO on ").unwrap_or_else(|| panic!("no PPO table: {out}"))..];
        let row = table.lines().find(|l| l.starts_with(dtype)).unwrap_or_else(|| panic!("no {dtype} row: {table}"));
        row.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{row}"))
    };
    let args = ["info", "--config", "configs/7b.toml", "--ppo", "--micro-batch", "1", "--seq-len", "1024"];
    let (ok, gpu, err) = llama(&args);
    assert!(ok, "{err}");
    let (ok, cpu, err) = llama(&[&args[..], &["--cpu"]].concat());
    assert!(ok, "{err}");
    assert!(gpu.contains("PPO on one GPU") && cpu.contains("PPO on the CPU"), "{gpu}\n{cpu}");
    assert!(policy_column(&cpu, "f32 ") > policy_column(&gpu, "f32 "), "{cpu}\n{gpu}");
    assert_eq!(policy_column(&cpu, "bf16 "), policy_column(&gpu, "bf16 "));
}

/// `llama` on bad input, as a user runs it: each case is refused with a non-zero exit, no panic,
/// a message naming the file and the key, flag or tensor, and nothing in the fixture directory
/// changed (`llama_testkit::Case::refused`): a conversion never writes over a directory it was
/// not asked to replace.
#[test]
fn llama_refuses_bad_input_and_touches_nothing_else() {
    use llama_testkit::{Case, repo};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = |name: &str| dir.join(name).display().to_string();
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write("bad.toml", "[model]\ndim = 64\nn_layers = 2\nn_heads = 4\nwidth = 3\n");
    write("broken.toml", "[model]\ndim = \n");
    write("preset.toml", "[model]\npreset = \"8b.toml\"\n");
    write("heads.toml", "[model]\ndim = 64\nn_layers = 2\nn_heads = 3\n");
    write("tiny.toml", "[model]\ndim = 32\nn_layers = 1\nn_heads = 2\nvocab_size = 64\nmultiple_of = 16\nmax_seq_len = 32\n");
    let small = llama_model::LlamaConfig::new(32, 1, 2).with_vocab_size(64).with_multiple_of(16).with_max_seq_len(32);
    llama_model::checkpoint::save_native(&small.init(&burn::tensor::Device::flex()), &small, &dir.join("small")).unwrap();
    // A GGUF file with no tokenizer.json beside it.
    std::fs::create_dir_all(dir.join("lone")).unwrap();
    llama_model::gguf::save_gguf(
        &small.init(&burn::tensor::Device::flex()),
        &small,
        None,
        "lone",
        &dir.join("lone/model.gguf"),
        llama_model::gguf::GgufType::F32,
    )
    .unwrap();
    let chat = small.clone().with_vocab_size(2048);
    llama_model::checkpoint::save_native(&chat.init(&burn::tensor::Device::flex()), &chat, &dir.join("chat")).unwrap();
    // Hugging Face directories broken in different ways, from the shipped fixture.
    let fixture = repo().join("tests/fixtures/hf-tiny-gqa");
    let hf_copy = |name: &str| {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture.join(f), dir.join(name).join(f)).unwrap();
        }
    };
    hf_copy("truncated");
    let weights = std::fs::read(fixture.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("truncated/model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    hf_copy("escape");
    std::fs::write(dir.join("escape/model.safetensors.index.json"), r#"{"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}"#).unwrap();
    std::fs::remove_file(dir.join("escape/model.safetensors")).unwrap();
    hf_copy("fifo");
    std::fs::write(dir.join("fifo/model.safetensors.index.json"), r#"{"weight_map": {"model.embed_tokens.weight": "pipe.safetensors"}}"#).unwrap();
    std::fs::remove_file(dir.join("fifo/model.safetensors")).unwrap();
    let pipe = std::ffi::CString::new(dir.join("fifo/pipe.safetensors").display().to_string()).unwrap();
    // SAFETY: mkfifo(3) on a path this test owns.
    assert_eq!(unsafe { libc::mkfifo(pipe.as_ptr(), 0o644) }, 0);
    hf_copy("noconfig");
    std::fs::write(dir.join("noconfig/config.json"), r#"{"hidden_size": 32}"#).unwrap();
    // GGUF files: a good one, then cut short, with another architecture, with a layer count that
    // does not match its tensors.
    let gguf = dir.join("model.gguf");
    llama_model::gguf::save_gguf(&small.init(&burn::tensor::Device::flex()), &small, None, "small", &gguf, llama_model::gguf::GgufType::F32).unwrap();
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(dir.join("truncated.gguf"), &bytes[..bytes.len() - 100]).unwrap();
    let patched = |key: &[u8], value: &[u8], name: &str| {
        let mut b = bytes.clone();
        let at = b.windows(key.len()).position(|w| w == key).expect("key in the header") + key.len();
        b[at..at + value.len()].copy_from_slice(value);
        std::fs::write(dir.join(name), b).unwrap();
    };
    // key, then the value's type (u32 8 = string; 4 = u32) and the value.
    patched(b"general.architecture\x08\0\0\0\x05\0\0\0\0\0\0\0", b"mamba", "mamba.gguf");
    patched(b"llama.block_count\x04\0\0\0", &2u32.to_le_bytes(), "layers.gguf");
    write("fake.gguf", "not a model");
    std::fs::create_dir_all(dir.join("occupied")).unwrap();
    write("occupied/notes.md", "mine");
    let fixture = fixture.display().to_string();
    let (tiny, small_dir, chat_dir) = (p("tiny.toml"), p("small"), p("chat"));
    let tok = repo().join("data/tokenizer.json").display().to_string();
    let generate = |name: &str, extra: &[&str], needles: &[&str]| {
        let mut args = vec!["generate", "--checkpoint", &chat_dir, "--prompt", "Hi", "--max-new-tokens", "8"];
        args.extend(extra);
        Case::new(name, &args, needles)
    };
    let cases = vec![
        Case::new("info: unknown key", &["info", "--config", &p("bad.toml")], &["bad.toml", "width"]),
        Case::new("info: malformed TOML", &["info", "--config", &p("broken.toml")], &["broken.toml"]),
        Case::new("info: unknown preset", &["info", "--config", &p("preset.toml")], &["preset.toml", "8b.toml"]),
        Case::new("info: heads that do not divide the width", &["info", "--config", &p("heads.toml")], &["heads.toml", "n_heads"]),
        Case::new("info: a missing config", &["info", "--config", &p("nothere.toml")], &["nothere.toml"]),
        Case::new("info: zero ranks", &["info", "--config", &tiny, "--ranks", "0"], &["--ranks"]),
        Case::new("info: unknown recompute", &["info", "--config", &tiny, "--recompute", "layers"], &["--recompute", "block"]),
        Case::new("bench: zero batch", &["bench", "--config", &tiny, "--batch", "0"], &["--batch", "must be > 0"]),
        Case::new("bench: zero decode batch", &["bench", "--config", &tiny, "--decode-batches", "8,0"], &["--decode-batches", "must be > 0"]),
        Case::new("bench: zero logits chunk", &["bench", "--config", &tiny, "--seq-len", "16", "--logits-chunk", "0"], &["--logits-chunk", "must be > 0"]),
        Case::new("bench: longer than the model", &["bench", "--config", &tiny, "--seq-len", "64"], &["--seq-len 64", "max_seq_len 32"]),
        Case::new("bench: unknown dtype", &["bench", "--config", &tiny, "--seq-len", "16", "--dtype", "f8"], &["--dtype", "f8"]),
        Case::new("bench: unknown device", &["bench", "--config", &tiny, "--seq-len", "16", "--device", "tpu"], &["tpu"]),
        Case::new("convert: a missing directory", &["convert", "--from", &p("nowhere"), "--to", &p("out")], &["nowhere"]),
        Case::new("convert: truncated weights", &["convert", "--from", &p("truncated"), "--to", &p("out")], &["model.safetensors"]),
        Case::new("convert: an index escaping the directory", &["convert", "--from", &p("escape"), "--to", &p("out")], &["../outside.safetensors"]),
        Case::new("convert: an index naming a FIFO", &["convert", "--from", &p("fifo"), "--to", &p("out")], &["pipe.safetensors"]),
        Case::new("convert: a config.json without the model's keys", &["convert", "--from", &p("noconfig"), "--to", &p("out")], &["config.json"]),
        Case::new("convert: unknown format", &["convert", "--from", &fixture, "--to", &p("out"), "--to-format", "onnx"], &["--to-format", "onnx"]),
        Case::new(
            "convert: unknown GGUF type",
            &["convert", "--from", &fixture, "--to", &p("out.gguf"), "--gguf-type", "q4_0"],
            &["--gguf-type", "q4_0", "q8_0"],
        ),
        Case::new("convert: over an existing GGUF file", &["convert", "--from", &fixture, "--to", &p("model.gguf")], &["model.gguf", "--overwrite"]),
        Case::new(
            "convert: a GGUF output that is a directory",
            &["convert", "--from", &fixture, "--to", &p("occupied"), "--to-format", "gguf"],
            &["occupied", "one file"],
        ),
        Case::new("convert: a truncated GGUF", &["convert", "--from", &p("truncated.gguf"), "--to", &p("out")], &["truncated.gguf", "truncated"]),
        Case::new(
            "convert: a GGUF of another architecture",
            &["convert", "--from", &p("mamba.gguf"), "--to", &p("out")],
            &["mamba.gguf", "general.architecture", "mamba"],
        ),
        Case::new(
            "convert: a GGUF whose layer count does not match its tensors",
            &["convert", "--from", &p("layers.gguf"), "--to", &p("out")],
            &["layers.gguf", "blk.1.attn_q.weight"],
        ),
        Case::new("convert: a .gguf that is not GGUF", &["convert", "--from", &p("fake.gguf"), "--to", &p("out")], &["fake.gguf"]),
        Case::new("convert: over a directory holding other files", &["convert", "--from", &fixture, "--to", &p("occupied")], &["occupied", "--overwrite"]),
        Case::new(
            "convert: onto its own input",
            &["convert", "--from", &small_dir, "--to", &small_dir, "--to-format", "native", "--overwrite"],
            &["small", "--from"],
        ),
        Case::new(
            "generate: past the model's length",
            &["generate", "--checkpoint", &chat_dir, "--tokenizer", &tok, "--prompt", "Hi", "--max-new-tokens", "500"],
            &["max_seq_len"],
        ),
        Case::new(
            "generate: a tokenizer larger than the model",
            &["generate", "--checkpoint", &small_dir, "--tokenizer", &tok, "--prompt", "Hi", "--max-new-tokens", "8"],
            &["vocabulary"],
        ),
        generate("generate: a missing tokenizer", &["--tokenizer", &p("nothere.json")], &["nothere.json"]),
        generate("generate: top-p above 1", &["--tokenizer", &tok, "--top-p", "1.5"], &["--top-p"]),
        generate("generate: negative temperature", &["--tokenizer", &tok, "--temperature=-1"], &["--temperature", "-1"]),
        generate(
            "generate: a search corpus that is not there",
            &["--tokenizer", &tok, "--tools", "--search-corpus", &p("nowhere.jsonl")],
            &["--search-corpus", "nowhere.jsonl"],
        ),
        generate("generate: a search corpus without --tools", &["--tokenizer", &tok, "--search-corpus", &p("nowhere.jsonl")], &["--tools"]),
        generate("generate: no calls allowed", &["--tokenizer", &tok, "--tools", "--max-calls", "0"], &["--max-calls", "0"]),
        Case::new(
            "generate: --tools past the model's length",
            &["generate", "--checkpoint", &chat_dir, "--tokenizer", &tok, "--prompt", "Hi", "--max-new-tokens", "500", "--tools"],
            &["max_seq_len"],
        ),
        Case::new(
            "generate: a GGUF file without a tokenizer, in its metadata or beside it",
            &["generate", "--checkpoint", &p("lone/model.gguf"), "--prompt", "Hi"],
            &["lone/model.gguf", "no tokenizer in its metadata", "--tokenizer"],
        ),
        Case::new("generate: a missing checkpoint", &["generate", "--checkpoint", &p("nowhere"), "--tokenizer", &tok, "--prompt", "Hi"], &["nowhere"]),
        Case::new(
            "chat: an answer as long as the model",
            &["chat", "--checkpoint", &chat_dir, "--tokenizer", &tok, "--max-new-tokens", "32"],
            &["--max-new-tokens", "max_seq_len 32"],
        ),
        Case::new(
            "chat: a tokenizer larger than the model",
            &["chat", "--checkpoint", &small_dir, "--tokenizer", &tok, "--max-new-tokens", "8"],
            &["vocabulary"],
        ),
        Case::new("chat: a missing tokenizer", &["chat", "--checkpoint", &chat_dir, "--tokenizer", &p("nothere.json")], &["nothere.json"]),
        Case::new(
            "chat: the tokenizer's template, which it does not have",
            &["chat", "--checkpoint", &chat_dir, "--tokenizer", &tok, "--chat-template", "tokenizer"],
            &["--chat-template", "tokenizer_config.json"],
        ),
        Case::new(
            "chat: an unknown template",
            &["chat", "--checkpoint", &chat_dir, "--tokenizer", &tok, "--chat-template", "chatml"],
            &["--chat-template", "chatml", "llama2"],
        ),
        Case::new("chat: top-p above 1", &["chat", "--checkpoint", &chat_dir, "--tokenizer", &tok, "--top-p", "1.5"], &["--top-p"]),
        Case::new("no subcommand", &[], &["Usage"]),
    ];
    llama_testkit::refuse_all(env!("CARGO_BIN_EXE_llama"), dir, &cases);
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
    let a = std::fs::read(Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../../tests/fixtures/hf-tiny-gqa/model.safetensors"))
        .unwrap();
    let b = std::fs::read(hf.join("model.safetensors")).unwrap();
    let (a, b) = (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&b).unwrap());
    for (name, view) in a.tensors() {
        assert_eq!(view.data(), b.tensor(&name).unwrap().data(), "{name} changed in the round trip");
    }
}

/// `--overwrite` replaces the checkpoint in a directory: the files of the one it replaces (the
/// other kind's config, an old single file beside new shards) are gone, so nothing mixed loads.
#[test]
fn convert_overwrite_leaves_one_checkpoint_in_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    let names = |dir: &Path| {
        let mut n: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        n.sort();
        n
    };
    let convert = |to_format: &str, extra: &[&str]| {
        let args = [&["convert", "--from", "tests/fixtures/hf-tiny-gqa", "--to", target.to_str().unwrap(), "--to-format", to_format, "--overwrite"][..], extra]
            .concat();
        let (ok, _, err) = llama(&args);
        assert!(ok, "{err}");
    };
    convert("hf", &[]);
    std::fs::write(target.join("notes.md"), "mine").unwrap();
    convert("native", &[]);
    assert_eq!(names(&target), ["config.toml", "model.safetensors", "notes.md"]);
    // Sharded HF over the native checkpoint: its config and single weights file go.
    convert("hf", &["--shard-size-gb", "0.00001"]);
    let now = names(&target);
    assert!(now.contains(&"model.safetensors.index.json".to_string()) && now.contains(&"notes.md".to_string()), "{now:?}");
    assert!(!now.contains(&"config.toml".to_string()) && !now.contains(&"model.safetensors".to_string()), "{now:?}");
    assert_eq!(weights(&target), weights(&llama_testkit::repo().join("tests/fixtures/hf-tiny-gqa")));
    // And native again: the shards and the index go too.
    convert("native", &[]);
    assert_eq!(names(&target), ["config.toml", "model.safetensors", "notes.md"]);
}

/// Every weight of a checkpoint (any kind) as f32, in visiting order.
fn weights(dir: &Path) -> Vec<f32> {
    use burn::module::{Module, ModuleVisitor, Param};
    struct Values(Vec<f32>);
    impl ModuleVisitor for Values {
        fn visit_float<const D: usize>(&mut self, param: &Param<burn::tensor::Tensor<D>>) {
            self.0.extend(param.val().into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
        }
    }
    let (_, model) = llama_model::checkpoint::load(dir, &burn::tensor::Device::flex()).unwrap();
    let mut v = Values(vec![]);
    model.visit(&mut v);
    v.0
}

/// A model imported from Hugging Face goes to GGUF and back to Hugging Face bit for bit (f32),
/// through both q/k row orders; a native model with the shipped tokenizer goes to GGUF in f32,
/// f16 and Q8_0 and back: f32 exactly, f16 as f16 rounds, Q8_0 within half a quantisation step,
/// and the tokenizer comes back byte for byte.
#[test]
fn gguf_export_then_import_gives_the_weights_back() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name).display().to_string();
    let (ok, _, err) = llama(&["convert", "--from", "tests/fixtures/hf-tiny-gqa", "--to", &t("hf.gguf"), "--gguf-type", "f32"]);
    assert!(ok, "{err}");
    let (ok, _, err) = llama(&["convert", "--from", &t("hf.gguf"), "--to", &t("hf-back"), "--to-format", "hf"]);
    assert!(ok, "{err}");
    let a = std::fs::read(Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../tests/fixtures/hf-tiny-gqa/model.safetensors")).unwrap();
    let b = std::fs::read(tmp.path().join("hf-back/model.safetensors")).unwrap();
    let (a, b) = (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&b).unwrap());
    for (name, view) in a.tensors() {
        assert_eq!(view.data(), b.tensor(&name).unwrap().data(), "{name} changed in the GGUF round trip");
    }

    // dim 64 (rows of 64: two Q8_0 blocks), GQA, tied embeddings, the shipped 2048-token tokenizer.
    let config = llama_model::LlamaConfig::new(64, 2, 4)
        .with_n_kv_heads(2)
        .with_vocab_size(2048)
        .with_multiple_of(32)
        .with_max_seq_len(64)
        .with_tie_word_embeddings(true);
    let native = tmp.path().join("native");
    llama_model::checkpoint::save_native(&config.init(&burn::tensor::Device::flex()), &config, &native).unwrap();
    std::fs::copy(Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../data/tokenizer.json"), native.join("tokenizer.json")).unwrap();
    let want = weights(&native);
    for (ty, tol) in [("f32", 0.0f32), ("f16", 1e-3), ("q8_0", 0.5 / 127.0)] {
        let (file, back) = (t(&format!("{ty}.gguf")), t(&format!("{ty}-back")));
        let (ok, _, err) = llama(&["convert", "--from", native.to_str().unwrap(), "--to", &file, "--gguf-type", ty]);
        assert!(ok, "{ty}: {err}");
        let (ok, _, err) = llama(&["convert", "--from", &file, "--to", &back]);
        assert!(ok, "{ty}: {err}");
        let got = weights(Path::new(&back));
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
        assert!(worst <= tol * scale.max(1.0), "{ty}: weights differ by up to {worst}");
        if ty == "f32" {
            assert_eq!(got, want, "f32 is exact");
        }
        assert_eq!(std::fs::read(native.join("tokenizer.json")).unwrap(), std::fs::read(Path::new(&back).join("tokenizer.json")).unwrap(), "{ty}: tokenizer");
    }
    // llama.cpp's own reader (the `gguf` package, installed by scripts/test.sh) reads every file.
    let python = std::env::var("LLAMA2_PYTHON").unwrap_or_else(|_| "python3".into());
    for ty in ["f32", "f16", "q8_0"] {
        let out = Command::new(&python)
            .args(["scripts/interop/check_gguf.py", &t(&format!("{ty}.gguf")), "--type", ty])
            .current_dir(Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../.."))
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}; run the tests with scripts/test.sh, which installs the gguf package"));
        assert!(out.status.success(), "{ty}: the gguf package rejects our file (run scripts/test.sh to install it): {}", String::from_utf8_lossy(&out.stderr));
    }
    let file = llama_model::gguf::GgufFile::open(&tmp.path().join("q8_0.gguf")).unwrap();
    let ty = |name: &str| file.tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("{name}")).ggml_type;
    assert_eq!((ty("blk.0.attn_q.weight"), ty("blk.0.attn_norm.weight"), ty("token_embd.weight")), (8, 0, 8), "Q8_0 matrices, f32 norms");
    assert!(!file.tensors.iter().any(|t| t.name == "output.weight"), "tied: no output.weight");
    let get = |k: &str| file.get(k).unwrap_or_else(|| panic!("{k}")).clone();
    use llama_model::gguf::Value;
    assert_eq!(get("general.architecture"), Value::Str("llama".into()));
    assert_eq!(get("llama.attention.head_count_kv"), Value::U32(2));
    assert_eq!(get("llama.rope.dimension_count"), Value::U32(16));
    assert_eq!(get("tokenizer.ggml.bos_token_id"), Value::U32(1));
    let Value::Array(tokens) = get("tokenizer.ggml.tokens") else { panic!("tokens") };
    assert_eq!(tokens.len(), 2048);
    assert!(get("tokenizer.chat_template").as_str().unwrap().contains("[INST]"));
}

/// `llama chat` with a conversation on stdin: two turns, the second rendered with the first (the
/// whole Llama 2 template), each answer streamed exactly as `llama generate` gives it for the
/// rendered prompt and that turn's seed; `/reset` forgets; a conversation longer than the model's
/// context drops its oldest exchange with a notice instead of failing.
#[test]
fn chat_through_stdin_sees_earlier_turns_and_streams_what_generate_gives() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let config = llama_model::LlamaConfig::new(32, 1, 2).with_vocab_size(2048).with_multiple_of(16).with_max_seq_len(96);
    llama_model::checkpoint::save_native(&config.init(&burn::tensor::Device::flex()), &config, tmp.path()).unwrap();
    let dir = tmp.path().to_str().unwrap();
    let chat_with = |input: &[u8], extra: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_llama"))
            .args(
                [&["chat", "--checkpoint", dir, "--tokenizer", "data/tokenizer.json", "--max-new-tokens", "6", "--seed", "7", "--show-prompt"][..], extra]
                    .concat(),
            )
            .current_dir(Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../.."))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let chat = |input: &str| chat_with(input.as_bytes(), &[]);
    // What `llama generate` answers to a rendered prompt with a seed (its output is prompt + text).
    let generate = |prompt: &str, seed: &str| {
        let (ok, out, err) =
            llama(&["generate", "--checkpoint", dir, "--tokenizer", "data/tokenizer.json", "--prompt", prompt, "--max-new-tokens", "6", "--seed", seed]);
        assert!(ok, "{err}");
        out.strip_prefix(prompt).unwrap().split("\n---").next().unwrap().to_string()
    };
    let (out, err) = chat("Hi there\nWhat did I say?\n/quit\nnot read\n");
    let first = generate("[INST] Hi there [/INST]", "7");
    // `generate` prints the continuation as it follows the prompt (with its leading space); chat
    // prints the answer on its own line.
    let first = first.strip_prefix(' ').unwrap_or(&first).to_string();
    assert!(out.starts_with(&format!("{first}\n")), "turn 1 streams generate's answer: {out:?} vs {first:?}");
    let second_prompt = format!("[INST] Hi there [/INST] {} </s><s>[INST] What did I say? [/INST]", first.trim());
    assert!(err.contains(&format!("prompt: <s>{second_prompt}\n")), "turn 2 sees turn 1: {err}");
    // Turn 2's rendered ids carry EOS and BOS mid-prompt, which a text prompt cannot: generate
    // from the ids through the library, with turn 2's seed (--seed + 1).
    let tok = llama_data::Tokenizer::from_file(&llama_testkit::repo().join("data/tokenizer.json")).unwrap();
    let conversation = llama_data::chat::Conversation::from_json(&serde_json::json!({"messages": [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": first.trim()}, {"role": "user", "content": "What did I say?"}]}))
    .unwrap();
    let (_, model) = llama_model::checkpoint::load(tmp.path(), &burn::tensor::Device::flex()).unwrap();
    let sampling = llama_model::generate::SamplingConfig {
        temperature: 0.8,
        top_k: None,
        top_p: None,
        max_new_tokens: 6,
        eos_id: Some(tok.eos_id()),
        seed: 8,
        logprobs: false,
    };
    let tokens = llama_model::generate::generate(&model, &[conversation.prompt_ids(&tok).unwrap()], &sampling).unwrap().tokens.remove(0);
    let second = tok.decode(&tokens).unwrap();
    assert_eq!(out, format!("{first}\n{second}\n"), "two answers as generated, and nothing after /quit");
    // With --tools (a model that writes no call) each turn gets the same answer, streamed too
    // (the runtime leaves out an answer's leading spaces, which a random model may write).
    let (tools_out, tools_err) = chat_with(b"Hi there\nWhat did I say?\n/quit\n", &["--tools", "--search-corpus", "data/tools/search.jsonl"]);
    assert_eq!(tools_out, format!("{}\n{}\n", first.trim_start(), second.trim_start()));
    assert!(tools_err.contains(&format!("prompt: <s>{second_prompt}\n")), "{tools_err}");
    // A line that is not UTF-8 is named and skipped; the conversation goes on.
    let (out, err) = chat_with(b"\xff\xfeHi\nHi there\n/quit\n", &[]);
    assert!(err.contains("stdin line 1 is not valid UTF-8"), "{err}");
    assert!(out.starts_with(&format!("{first}\n")), "the next line is answered: {out:?}");
    // After /reset the same message renders alone again.
    let (_, err) = chat("Hi there\n/reset\nHi there\n");
    assert_eq!(err.matches("prompt: <s>[INST] Hi there [/INST]\n").count(), 2, "{err}");
    // 96 positions with 6 new tokens: long turns push the oldest exchange out, with a notice.
    let long = "the jury said the county election was a quick green house ".repeat(2);
    let (_, err) = chat(&format!("{long}\n{long}\n{long}\n"));
    assert_eq!(err.matches("prompt: ").count(), 3, "every turn answered: {err}");
    assert!(err.contains("the oldest exchange is dropped"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn generate_runs_on_a_checkpoint_with_the_shipped_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let config = llama_model::LlamaConfig::new(32, 1, 2).with_vocab_size(2048).with_multiple_of(16).with_max_seq_len(64);
    let model = config.init(&burn::tensor::Device::flex());
    llama_model::checkpoint::save_native(&model, &config, tmp.path()).unwrap();
    let dir = tmp.path().to_str().unwrap();
    let (ok, out, err) = llama(&[
        "generate",
        "--checkpoint",
        dir,
        "--tokenizer",
        "data/tokenizer.json",
        "--prompt",
        "The jury",
        "--prompt",
        "He said",
        "--max-new-tokens",
        "5",
        "--seed",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(out.starts_with("The jury") && out.contains("\nHe said"), "{out}");
    // With --tools, a model that writes no call continues each prompt exactly as without.
    let args = [
        "generate",
        "--checkpoint",
        dir,
        "--tokenizer",
        "data/tokenizer.json",
        "--prompt",
        "The jury",
        "--prompt",
        "He said",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
    ];
    let (ok, plain, err) = llama(&args);
    assert!(ok, "{err}");
    let (ok, tools, err) = llama(&[&args[..], &["--tools", "--search-corpus", "data/tools/search.jsonl"]].concat());
    assert!(ok, "{err}");
    let texts = |out: &str| out.lines().filter(|l| !l.starts_with("---")).map(String::from).collect::<Vec<_>>();
    assert_eq!(texts(&tools), texts(&plain));
    assert_eq!(tools.matches("--- 0 tool calls").count(), 2, "{tools}");
}

/// `llama bench` on a tiny model: every phase is timed and reported (terminal and JSON), the
/// figures are positive and finite; a sequence longer than the model's is refused up front.
#[test]
fn bench_reports_every_phase() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tiny.toml");
    std::fs::write(&config, "[model]\ndim = 32\nn_layers = 2\nn_heads = 4\nvocab_size = 64\nmultiple_of = 16\nmax_seq_len = 32\n").unwrap();
    let json = tmp.path().join("bench.json");
    // One bench of batch 2 x 16 tokens, one step, `gen_tokens` decoded, with `extra` flags: its
    // status, output, errors and JSON report.
    let bench = |gen_tokens: &str, extra: &[&str]| {
        let mut args = vec!["bench", "--config", config.to_str().unwrap(), "--batch", "2", "--seq-len", "16", "--steps", "1", "--gen-tokens", gen_tokens];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--json", json.to_str().unwrap()]);
        let (ok, out, err) = llama(&args);
        let report: serde_json::Value = if ok { serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap() } else { serde_json::Value::Null };
        (ok, out, err, report)
    };
    let (ok, out, err, report) = bench("4", &[]);
    assert!(ok, "{err}");
    assert!(out.contains("tokens/s") && out.contains("AdamW") && out.contains("decode") && out.contains("peak RSS"), "{out}");
    assert!(err.contains("warm-up step: "), "the untimed first step is announced: {err}");
    for key in ["train_tokens_per_s", "forward_s", "backward_s", "optimizer_s", "train_gflops_per_s", "decode_tokens_per_s", "peak_rss_gib"] {
        let v = report[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {report}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    assert_eq!(report["fused_kernels"], serde_json::Value::Bool(true));
    // Decoding at several batch sizes: a line and a JSON figure for each.
    let (ok, out, err, report) = bench("4", &["--decode-batches", "1,3"]);
    assert!(ok, "{err}");
    assert!(out.contains("(1 x 4)") && out.contains("(3 x 4)") && !out.contains("(2 x 4)"), "{out}");
    for batch in ["1", "3"] {
        let v = report["decode_tokens_per_s_by_batch"][batch].as_f64().unwrap_or_else(|| panic!("batch {batch} missing: {report}"));
        assert!(v.is_finite() && v > 0.0, "batch {batch}: {v}");
    }
    // Answers of ragged lengths, in fixed batches and with continuous batching: a line and both
    // figures.
    let (ok, out, err, report) = bench("4", &["--ragged-prompts", "5"]);
    assert!(ok, "{err}");
    assert!(out.contains("ragged") && out.contains("5 prompts") && out.contains("2 rows at a time"), "{out}");
    for key in ["ragged_fixed_tokens_per_s", "ragged_continuous_tokens_per_s"] {
        let v = report[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {report}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    // Sampled decoding: its figure; a negative temperature is refused naming the flag.
    let (ok, out, err, report) = bench("4", &["--temperature", "1.2"]);
    assert!(ok && out.contains("decode") && report["decode_tokens_per_s"].as_f64().is_some_and(|v| v > 0.0), "{out}{err}");
    // Decoding only: no training line, no training figure.
    let json_arg = json.to_str().unwrap();
    let (ok, out, err) =
        llama(&["bench", "--config", config.to_str().unwrap(), "--batch", "2", "--seq-len", "16", "--steps", "0", "--gen-tokens", "4", "--json", json_arg]);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(ok && out.contains("decode") && !out.contains("train ") && report.get("train_tokens_per_s").is_none(), "{out}{err}{report}");
    let (ok, _, err, _) = bench("4", &["--temperature=-1"]);
    assert!(!ok && err.contains("--temperature") && !err.contains("panicked"), "{err}");
    // Burn's composed ops instead of the fused kernels: the same report, marked.
    let (ok, out, err, report) = bench("0", &["--unfused"]);
    assert!(ok && out.contains("--unfused"), "{out}{err}");
    assert_eq!(report["fused_kernels"], serde_json::Value::Bool(false));
    assert_eq!(report["our_attention"], serde_json::Value::Bool(true));
    // Burn's composed attention instead of ours (the A/B of the recomputed backward).
    let (ok, out, err, report) = bench("0", &["--unfused", "--burn-attention"]);
    assert!(ok && out.contains("--burn-attention"), "{out}{err}");
    assert_eq!(report["our_attention"], serde_json::Value::Bool(false));
    let (ok, _, err) = llama(&["bench", "--config", config.to_str().unwrap(), "--seq-len", "64"]);
    assert!(!ok && err.contains("--seq-len 64") && err.contains("max_seq_len 32") && !err.contains("panicked"), "{err}");
    // Block recomputation with chunked logits: the same report, marked; bad sizes refused.
    let (ok, out, err, report) = bench("0", &["--recompute", "block", "--logits-chunk", "8"]);
    assert!(ok && out.contains("block recomputation") && out.contains("chunks of 8"), "{out}{err}");
    assert_eq!((report["recompute"].as_str(), report["logits_chunk"].as_u64()), (Some("block"), Some(8)));
    for bad in [["--batch", "0"], ["--logits-chunk", "0"]] {
        let (ok, _, err) = llama(&["bench", "--config", config.to_str().unwrap(), "--seq-len", "16", bad[0], bad[1]]);
        assert!(!ok && err.contains("must be > 0") && !err.contains("panicked"), "{err}");
    }
}

/// Files a stranger hands us, built to make a reader trust a size, wrap an offset, recurse,
/// loop or load poison. Each is refused with its file and value named, within the hostile
/// bounds of `llama_testkit` (2 GiB of address space, seconds), touching nothing.
#[test]
fn llama_refuses_hostile_files_within_bounded_memory_and_time() {
    use llama_testkit::{Case, repo};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = |name: &str| dir.join(name).display().to_string();
    let flex = burn::tensor::Device::flex();
    // Hugging Face directories from the shipped fixture, with config.json edited.
    let fixture = repo().join("tests/fixtures/hf-tiny-gqa");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap()).unwrap();
    let hf_with = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::copy(fixture.join("model.safetensors"), dir.join(name).join("model.safetensors")).unwrap();
        let mut c = config.clone();
        edit(&mut c);
        std::fs::write(dir.join(name).join("config.json"), c.to_string()).unwrap();
    };
    hf_with("context-1e8", &|c| c["max_position_embeddings"] = 100_000_000u64.into());
    hf_with("context-2e40", &|c| c["max_position_embeddings"] = (1u64 << 40).into());
    hf_with("context-2e62", &|c| c["max_position_embeddings"] = (1u64 << 62).into());
    hf_with("layers-1e6", &|c| c["num_hidden_layers"] = 1_000_000u64.into());
    hf_with("huge", &|c| {
        c.as_object_mut().unwrap().remove("head_dim");
        c["hidden_size"] = 65536.into();
        c["intermediate_size"] = (1u64 << 20).into();
        c["num_hidden_layers"] = 1024.into();
    });
    // NaN in the last weight of a file (safetensors and GGUF keep the last tensor's data last).
    let poison_tail = |path: &Path| {
        let mut b = std::fs::read(path).unwrap();
        let n = b.len();
        b[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        std::fs::write(path, b).unwrap();
    };
    hf_with("nan-hf", &|_| {});
    poison_tail(&dir.join("nan-hf/model.safetensors"));
    let small = llama_model::LlamaConfig::new(32, 1, 2).with_vocab_size(2048).with_multiple_of(16).with_max_seq_len(32);
    llama_model::checkpoint::save_native(&small.init(&flex), &small, &dir.join("nan-native")).unwrap();
    poison_tail(&dir.join("nan-native/model.safetensors"));
    // GGUF files: a good one carrying the shipped tokenizer, then edited.
    let gguf = dir.join("model.gguf");
    let tokenizer = shipped_gguf_tokenizer();
    llama_model::gguf::save_gguf(&small.init(&flex), &small, Some(&tokenizer), "small", &gguf, llama_model::gguf::GgufType::F32).unwrap();
    let bytes = std::fs::read(&gguf).unwrap();
    let patched = |name: &str, after: &[u8], value: &[u8]| {
        let mut b = bytes.clone();
        let at = b.windows(after.len()).position(|w| w == after).expect("in the header") + after.len();
        b[at..at + value.len()].copy_from_slice(value);
        std::fs::write(dir.join(name), b).unwrap();
    };
    patched("context.gguf", b"llama.context_length\x04\0\0\0", &u32::MAX.to_le_bytes());
    patched("layers.gguf", b"llama.block_count\x04\0\0\0", &1_000_000u32.to_le_bytes());
    // token_embd.weight's offset (after its 2 dims, each a u64, and its type) near 2^64.
    patched("offset.gguf", b"token_embd.weight\x02\0\0\0", &[&[0u8; 20][..], &(u64::MAX - 3).to_le_bytes()].concat());
    patched("tokenizer.gguf", b"\"model\"", b"\"mode!\"");
    std::fs::copy(&gguf, dir.join("nan.gguf")).unwrap();
    poison_tail(&dir.join("nan.gguf"));
    // Headers written by hand: counts far past what the file can hold, arrays nested 10000 deep.
    let header = |n_tensors: u64, n_kv: u64, body: &[u8]| [&b"GGUF"[..], &3u32.to_le_bytes(), &n_tensors.to_le_bytes(), &n_kv.to_le_bytes(), body].concat();
    let key = |k: &str| [&(k.len() as u64).to_le_bytes()[..], k.as_bytes()].concat();
    std::fs::write(dir.join("count.gguf"), header(0, 1 << 60, &[])).unwrap();
    std::fs::write(dir.join("tensors.gguf"), header(1 << 40, 0, &[0; 64])).unwrap();
    let huge_array = [key("a"), 9u32.to_le_bytes().to_vec(), 0u32.to_le_bytes().to_vec(), (1u64 << 40).to_le_bytes().to_vec()].concat();
    std::fs::write(dir.join("array.gguf"), header(0, 1, &huge_array)).unwrap();
    let mut nested = [key("a"), 9u32.to_le_bytes().to_vec()].concat();
    for _ in 0..10_000 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    nested.extend(4u32.to_le_bytes());
    nested.extend(1u64.to_le_bytes());
    nested.extend(7u32.to_le_bytes());
    std::fs::write(dir.join("nested.gguf"), header(0, 1, &nested)).unwrap();
    // Chat templates that loop for ever or write hundreds of MB.
    let template_dir = |name: &str, template: &str| {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::copy(repo().join("data/tokenizer.json"), dir.join(name).join("tokenizer.json")).unwrap();
        std::fs::write(dir.join(name).join("tokenizer_config.json"), serde_json::json!({ "chat_template": template }).to_string()).unwrap();
        dir.join(name).join("tokenizer.json").display().to_string()
    };
    let looping = template_dir("looping", "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}");
    let bloated = template_dir("bloated", "{% for m in messages %}{{ 'x' * 90000000 }}{% endfor %}");
    llama_model::checkpoint::save_native(&small.init(&flex), &small, &dir.join("chat")).unwrap();
    let chat = |name: &str, tokenizer: &str| {
        Case::new(
            name,
            &["chat", "--checkpoint", &p("chat"), "--tokenizer", tokenizer, "--chat-template", "tokenizer", "--max-new-tokens", "8"],
            &["tokenizer_config.json", "chat_template"],
        )
        .stdin("Hi\n")
        .hostile()
    };
    let convert = |name: &str, from: &str, needles: &[&str]| Case::new(name, &["convert", "--from", &p(from), "--to", &p("out")], needles).hostile();
    let cases = vec![
        convert("a context of 1e8 positions", "context-1e8", &["config.json", "max_position_embeddings", "100000000"]),
        convert("a context of 2^40 positions", "context-2e40", &["config.json", "max_position_embeddings"]),
        convert("a context of 2^62 positions", "context-2e62", &["config.json", "max_position_embeddings"]),
        convert("a million layers", "layers-1e6", &["config.json", "num_hidden_layers", "1000000"]),
        convert("a model larger than the machine", "huge", &["config.json", "GiB", "more than this machine"]),
        convert("a NaN weight in Hugging Face safetensors", "nan-hf", &["model.safetensors", "non-finite"]),
        convert("a NaN weight in a native checkpoint", "nan-native", &["model.safetensors", "NaN"]),
        Case::new(
            "generate from a NaN weight",
            &[
                "generate",
                "--checkpoint",
                &p("nan-native"),
                "--tokenizer",
                &repo().join("data/tokenizer.json").display().to_string(),
                "--prompt",
                "Hi",
                "--max-new-tokens",
                "8",
            ],
            &["model.safetensors", "NaN"],
        )
        .hostile(),
        convert("a GGUF context of 2^32", "context.gguf", &["context.gguf", "llama.context_length", "4294967295"]),
        convert("a GGUF of a million layers", "layers.gguf", &["layers.gguf", "llama.block_count", "1000000"]),
        convert("a GGUF tensor offset near 2^64", "offset.gguf", &["offset.gguf", "token_embd.weight"]),
        convert("a GGUF NaN weight", "nan.gguf", &["nan.gguf", "non-finite"]),
        convert("a GGUF with a broken embedded tokenizer", "tokenizer.gguf", &["tokenizer.gguf", "tokenizer.huggingface.json"]),
        convert("a GGUF metadata count of 2^60", "count.gguf", &["count.gguf", "metadata count"]),
        convert("a GGUF tensor count of 2^40", "tensors.gguf", &["tensors.gguf", "tensor count"]),
        convert("a GGUF array of 2^40 items", "array.gguf", &["array.gguf", "array length"]),
        convert("GGUF arrays nested 10000 deep", "nested.gguf", &["nested.gguf", "nested"]),
        chat("a chat template that loops 10^10 times", &looping),
        chat("a chat template that writes 90 MB", &bloated),
    ];
    llama_testkit::refuse_all(env!("CARGO_BIN_EXE_llama"), dir, &cases);
}

/// A context length above the tabulated RoPE positions loads and runs: the angles are computed
/// for the positions in use, so `max_position_embeddings` sizes nothing.
#[test]
fn a_long_context_config_loads_without_allocating_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = llama_testkit::repo().join("tests/fixtures/hf-tiny-gqa");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = 10_000_000.into();
    std::fs::copy(fixture.join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    let (_, model) = llama_model::checkpoint::load(tmp.path(), &burn::tensor::Device::flex()).unwrap();
    assert_eq!((model.max_seq_len(), model.rope.cos.dims()[0]), (10_000_000, llama_model::model::ROPE_TABLE_POSITIONS));
    let tokens =
        burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(vec![1i64, 5, 9, 3], [1, 4]), &burn::tensor::Device::flex());
    assert_eq!(model.forward(tokens).dims(), [1, 4, 96]);
}

/// Model files quantized by llama.cpp's quantizer (the `gguf` package's, through
/// `scripts/interop/gguf_requantize.py`) convert to a checkpoint whose weights are the f32 model's within
/// each type's rounding, its norms (kept f32) exactly; a type the reader does not take is named.
#[test]
fn quantized_gguf_models_load_within_their_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name).display().to_string();
    let config = llama_model::LlamaConfig::new(64, 2, 4)
        .with_n_kv_heads(2)
        .with_vocab_size(2048)
        .with_multiple_of(32)
        .with_max_seq_len(64)
        .with_tie_word_embeddings(true);
    let model = config.init(&burn::tensor::Device::flex());
    llama_model::checkpoint::save_native(&model, &config, &tmp.path().join("f32")).unwrap();
    let tokenizer = shipped_gguf_tokenizer();
    llama_model::gguf::save_gguf(&model, &config, Some(&tokenizer), "q", &tmp.path().join("f32.gguf"), llama_model::gguf::GgufType::F32).unwrap();
    let want = weights(&tmp.path().join("f32"));
    let python = std::env::var("LLAMA2_PYTHON").unwrap_or_else(|_| "python3".into());
    // (type, the largest error allowed relative to the largest weight)
    for (ty, tolerance) in [("q4_0", 0.15), ("q4_1", 0.08), ("q5_0", 0.07), ("q5_1", 0.04), ("q8_0", 0.005)] {
        let file = t(&format!("{ty}.gguf"));
        let out =
            Command::new(&python).args(["scripts/interop/gguf_requantize.py", &t("f32.gguf"), &file, ty]).current_dir(llama_testkit::repo()).output().unwrap();
        assert!(out.status.success(), "{ty}: the gguf package is needed (scripts/test.sh installs it): {}", String::from_utf8_lossy(&out.stderr));
        let (ok, _, err) = llama(&["convert", "--from", &file, "--to", &t(ty)]);
        assert!(ok, "{ty}: {err}");
        let got = weights(&tmp.path().join(ty));
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= tolerance * scale, "{ty}: weights differ by up to {worst} (largest weight {scale})");
        assert!(got != want, "{ty}: nothing was quantized");
        // Tied embeddings: the final norm is the last parameter visited.
        let norms = |w: &[f32]| w[w.len() - 64..].to_vec();
        assert_eq!(norms(&got), norms(&want), "{ty}: the final norm, kept f32, is exact");
    }
    // token_embd.weight's ggml type (after its 2 dims) set to 16, IQ2_XXS, which is not read.
    let mut bytes = std::fs::read(t("q4_0.gguf")).unwrap();
    let name = b"token_embd.weight\x02\0\0\0";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 16;
    bytes[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(t("iq2.gguf"), bytes).unwrap();
    let (ok, _, err) = llama(&["convert", "--from", &t("iq2.gguf"), "--to", &t("iq2")]);
    assert!(!ok && err.contains("token_embd.weight") && err.contains("ggml type 16") && !err.contains("panicked"), "{err}");
}

/// A GGUF file serves wherever a model directory does: `llama generate --checkpoint model.gguf`
/// from our f32 export decodes what the native checkpoint decodes (`init = "model.gguf"` in a
/// stage goes through the same loader), and without `--tokenizer` or a tokenizer.json beside it
/// takes the tokenizer its metadata holds.
#[test]
fn a_gguf_file_is_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let config = llama_model::LlamaConfig::new(32, 1, 2).with_vocab_size(2048).with_multiple_of(16).with_max_seq_len(64);
    let model = config.init(&burn::tensor::Device::flex());
    llama_model::checkpoint::save_native(&model, &config, &tmp.path().join("native")).unwrap();
    let gguf = tmp.path().join("model.gguf");
    llama_model::gguf::save_gguf(&model, &config, None, "m", &gguf, llama_model::gguf::GgufType::F32).unwrap();
    std::fs::create_dir_all(tmp.path().join("alone")).unwrap();
    let with_tokenizer = tmp.path().join("alone/model.gguf");
    llama_model::gguf::save_gguf(&model, &config, Some(&shipped_gguf_tokenizer()), "m", &with_tokenizer, llama_model::gguf::GgufType::F32).unwrap();
    let generate = |checkpoint: &Path, tokenizer: &[&str]| {
        let args =
            [&["generate", "--checkpoint", checkpoint.to_str().unwrap()], tokenizer, &["--prompt", "The jury", "--max-new-tokens", "12", "--temperature", "0"]]
                .concat();
        let (ok, out, err) = llama(&args);
        assert!(ok, "{err}");
        out
    };
    let shipped = ["--tokenizer", "data/tokenizer.json"];
    let want = generate(&tmp.path().join("native"), &shipped);
    assert_eq!(generate(&gguf, &shipped), want);
    assert_eq!(generate(&with_tokenizer, &[]), want, "the tokenizer from the GGUF metadata");
    // GGUF to GGUF carries the tokenizer across.
    let again = tmp.path().join("again.gguf");
    let (ok, _, err) = llama(&["convert", "--from", with_tokenizer.to_str().unwrap(), "--to", again.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(!err.contains("has no tokenizer"), "{err}");
    assert_eq!(generate(&again, &[]), want, "the tokenizer carried from GGUF to GGUF");
    let (_, loaded) = llama_model::checkpoint::load(&gguf, &burn::tensor::Device::flex()).unwrap();
    assert_eq!(loaded.vocab_size(), 2048);
}

/// The shipped tokenizer as a GGUF file carries it (Llama 2's special tokens and template).
fn shipped_gguf_tokenizer() -> llama_model::gguf::GgufTokenizer {
    llama_model::gguf::GgufTokenizer {
        json: std::fs::read_to_string(llama_testkit::repo().join("data/tokenizer.json")).unwrap(),
        bos: "<s>".into(),
        eos: "</s>".into(),
        chat_template: llama_model::gguf::LLAMA2_CHAT_TEMPLATE.into(),
        add_bos: None,
    }
}

/// `llama device-check` (phase 1 of the GPU check) runs both checks and passes on the CPU, where
/// they compare the fused kernels with Burn's composed ops; a device this build lacks is a clear
/// error and exit 1.
#[test]
fn device_check_passes_on_flex_and_refuses_a_missing_device() {
    let (ok, out, err) = llama(&["device-check", "--device", "flex"]);
    assert!(ok, "{err}");
    assert!(out.contains("attention gradients on flex") && out.contains("block recomputation on flex"), "{out}");
    assert!(out.contains("recomputed gradient of parameter") && out.contains("all") && out.contains("checks passed"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
    let (ok, _, err) = llama(&["device-check", "--device", "tpu"]);
    assert!(!ok && err.contains("tpu") && !err.contains("panicked"), "{err}");
}
