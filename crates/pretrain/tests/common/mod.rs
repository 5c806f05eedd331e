//! What the pretrain end-to-end tests share: the binary, a small corpus fixture, run configs and
//! reading the logged curves back.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use llama_data::Tokenizer;
use llama_data::prepare::{PrepareConfig, prepare};
use serde_json::Value;

pub fn pretrain(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pretrain"));
    cmd.args(args).current_dir(repo());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// A tokenizer and shards made from a slice of the shipped corpus.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new(vocab: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let corpus = std::fs::read_to_string(repo().join("data/corpus/brown.jsonl")).unwrap();
        let lines: Vec<&str> = corpus.lines().take(40).collect();
        let src = dir.path().join("corpus.jsonl");
        std::fs::write(&src, lines.join("\n")).unwrap();
        let texts: Vec<String> = lines.iter().map(|l| serde_json::from_str::<Value>(l).unwrap()["text"].as_str().unwrap().to_string()).collect();
        Tokenizer::train(texts.iter(), vocab).unwrap().save(&dir.path().join("tokenizer.json")).unwrap();
        let fixture = Self { dir };
        fixture.prepare("shards", 4);
        fixture
    }

    /// The fixture's corpus prepared with its tokenizer into `NAME/`, `row_group_docs` documents
    /// per row group; returns the directory.
    pub fn prepare(&self, name: &str, row_group_docs: usize) -> std::path::PathBuf {
        let (root, out) = (self.dir.path(), self.dir.path().join(name));
        let tok = Tokenizer::from_file(&root.join("tokenizer.json")).unwrap();
        let cfg = PrepareConfig { show_progress: false, val_fraction: 0.1, row_group_docs, ..PrepareConfig::new(vec![root.join("corpus.jsonl")], out.clone()) };
        prepare(&cfg, &tok).unwrap();
        out
    }

    pub fn path(&self, p: &str) -> String {
        self.dir.path().join(p).display().to_string()
    }

    /// Writes a run config; `extra` replaces whole sections or adds keys at the end.
    pub fn config(&self, name: &str, model: &str, train: &str, extra: &str) -> String {
        let text = format!(
            "[model]\n{model}\n\n[data]\nshards = \"{}\"\ntokenizer = \"{}\"\nseq_len = 32\n\n[optim]\nlr = 3e-3\n\n[schedule]\nwarmup_steps = 2\n\n[train]\n{train}\n\n[run]\nout_dir = \"{}\"\n\n[eval]\nprompts = [\"The jury\"]\nmax_new_tokens = 8\n{extra}\n",
            self.path("shards"),
            self.path("tokenizer.json"),
            self.path(&format!("out-{name}")),
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

#[allow(unused_imports)]
pub use llama_testkit::{repo, train_curve};

struct Values(Vec<f32>);

impl ModuleVisitor for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.extend(param.val().into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
    }
}

/// Every weight of the checkpoint of `step` in run directory `out`, in visiting order (the
/// files themselves differ between runs: they keep each run's parameter ids).
pub fn weights(out: &str, step: u64) -> Vec<f32> {
    let dir = Path::new(out).join(format!("checkpoints/step-{step:08}"));
    let (_, model) = llama_model::checkpoint::load(&dir, &Device::flex()).unwrap();
    let mut v = Values(vec![]);
    model.visit(&mut v);
    v.0
}

/// The entries of `OUT/checkpoints`, sorted by name.
pub fn checkpoint_names(out: &str) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(std::path::Path::new(out).join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}
