//! The Llama architecture hyper-parameters: loading, validation, parameter counting (the memory
//! estimates are in `crate::memory`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// The largest value each size of a [`LlamaConfig`] may take, from any source. Each is far above
/// every released Llama-family model (405B: width 16384, 126 layers, SwiGLU 53248; vocabularies
/// up to 256k; contexts up to 10M) and low enough that nothing derived from them overflows: the
/// parameter count stays below 2^50.
pub struct Limits {
    pub dim: usize,
    pub n_layers: usize,
    pub vocab_size: usize,
    pub ffn_hidden: usize,
    pub ffn_dim_multiplier: f64,
    pub max_seq_len: usize,
}

pub const LIMITS: Limits = Limits { dim: 1 << 16, n_layers: 1 << 10, vocab_size: 1 << 22, ffn_hidden: 1 << 20, ffn_dim_multiplier: 16.0, max_seq_len: 1 << 24 };

/// Hyper-parameters of a Llama model, as found in the `[model]` table of a run's TOML file.
///
/// Defaults are those of Llama 2 (RMSNorm eps 1e-5, RoPE theta 10000, context 4096, vocab 32000,
/// untied output projection). `configs/7b.toml`, `13b.toml` and `70b.toml` are the paper's presets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub dim: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (grouped-query attention); `n_heads` when absent.
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    /// Vocabulary size (rows of the embedding and of the output projection).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// The SwiGLU hidden width is rounded up to a multiple of this.
    #[serde(default = "default_multiple_of")]
    pub multiple_of: usize,
    /// Optional factor applied to the SwiGLU hidden width before rounding (1.3 for 70B).
    #[serde(default)]
    pub ffn_dim_multiplier: Option<f64>,
    /// Explicit SwiGLU hidden width; overrides the formula (Hugging Face `intermediate_size`).
    #[serde(default)]
    pub ffn_hidden_dim: Option<usize>,
    /// RMSNorm epsilon: 1e-5 for Llama 2 (1e-6 is a known porting bug).
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Longest sequence the model is built for (RoPE table and KV cache bound).
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Share the embedding matrix with the output projection.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_vocab_size() -> usize {
    32000
}
fn default_multiple_of() -> usize {
    256
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_max_seq_len() -> usize {
    4096
}

/// What a training forward keeps for backward (`train.recompute`, `--recompute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Every block's intermediate tensors (fastest; activations grow with layers x tokens).
    #[default]
    None,
    /// Only each block's input; backward re-runs the block (about one more forward per step).
    Block,
}

/// Where the f32 master weights and AdamW's moments live (`run.optimizer`, `--optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerPlacement {
    /// On the training device, beside the model.
    #[default]
    Device,
    /// In host memory, updated on the CPU (ZeRO-Offload's split): the device keeps only the
    /// compute-dtype weights, their gradients and the activations.
    Host,
}

impl LlamaConfig {
    /// A config with the given shape and every other value at the Llama 2 default.
    pub fn new(dim: usize, n_layers: usize, n_heads: usize) -> Self {
        Self {
            dim,
            n_layers,
            n_heads,
            n_kv_heads: None,
            vocab_size: default_vocab_size(),
            multiple_of: default_multiple_of(),
            ffn_dim_multiplier: None,
            ffn_hidden_dim: None,
            norm_eps: default_norm_eps(),
            rope_theta: default_rope_theta(),
            max_seq_len: default_max_seq_len(),
            tie_word_embeddings: false,
        }
    }

    pub fn with_vocab_size(mut self, v: usize) -> Self {
        self.vocab_size = v;
        self
    }
    pub fn with_n_kv_heads(mut self, n: usize) -> Self {
        self.n_kv_heads = Some(n);
        self
    }
    pub fn with_multiple_of(mut self, m: usize) -> Self {
        self.multiple_of = m;
        self
    }
    pub fn with_max_seq_len(mut self, n: usize) -> Self {
        self.max_seq_len = n;
        self
    }
    pub fn with_tie_word_embeddings(mut self, tie: bool) -> Self {
        self.tie_word_embeddings = tie;
        self
    }

    /// Reads the `[model]` table of a TOML file (its keys, or `preset = "7b.toml"` plus keys that
    /// override the preset's) and validates it. Errors name the file and the key.
    pub fn from_toml_file(path: &Path) -> Result<Self, ModelError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io(format!("cannot read {origin}: {e}")))?;
        let table: toml::Table = toml::from_str(llama_io::without_bom(&text)).map_err(|e| ModelError::Config(format!("{origin}: invalid TOML: {e}")))?;
        let model = table.get("model").ok_or_else(|| ModelError::Config(format!("{origin}: missing table [model]")))?;
        Self::from_model_table(model, path)
    }

    /// A config from the `[model]` table of the TOML file at `config_path`: either the keys
    /// themselves, or `preset = "7b.toml"` (relative to that file) whose `[model]` table is loaded
    /// and then overridden by the other keys.
    pub fn from_model_table(value: &toml::Value, config_path: &Path) -> Result<Self, ModelError> {
        let origin = config_path.display().to_string();
        let config = |msg: String| ModelError::Config(msg);
        let mut table = value.as_table().cloned().ok_or_else(|| config(format!("{origin}: [model] must be a table")))?;
        if let Some(preset) = table.remove("preset") {
            let preset = preset.as_str().ok_or_else(|| config(format!("{origin}: model.preset must be a path string")))?;
            let path = config_path.parent().unwrap_or(Path::new(".")).join(preset);
            let text = std::fs::read_to_string(&path).map_err(|e| config(format!("{origin}: model.preset {}: {e}", path.display())))?;
            let base: toml::Table = toml::from_str(llama_io::without_bom(&text)).map_err(|e| config(format!("{}: {e}", path.display())))?;
            let mut merged =
                base.get("model").and_then(|m| m.as_table()).cloned().ok_or_else(|| config(format!("{}: missing table [model]", path.display())))?;
            merged.extend(table);
            table = merged;
        }
        let mut wrapper = toml::Table::new();
        wrapper.insert("model".into(), toml::Value::Table(table));
        let text = toml::to_string(&wrapper).map_err(|e| config(format!("{origin}: {e}")))?;
        Self::from_toml_str(&text, &origin)
    }

    /// Parses TOML text holding a `[model]` table; `origin` names the source in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ModelError> {
        #[derive(Deserialize)]
        struct Wrapper {
            model: toml::Value,
        }
        let value: toml::Table = toml::from_str(text).map_err(|e| ModelError::Config(format!("{origin}: invalid TOML: {e}")))?;
        let model = if value.contains_key("model") {
            let w: Wrapper = toml::Value::Table(value).try_into().map_err(|e| ModelError::Config(format!("{origin}: {e}")))?;
            w.model
        } else {
            return Err(ModelError::Config(format!("{origin}: missing table [model]")));
        };
        let cfg: LlamaConfig = model.try_into().map_err(|e| ModelError::Config(format!("{origin}: in [model]: {e}")))?;
        cfg.validate().map_err(|e| ModelError::Config(format!("{origin}: {e}")))?;
        Ok(cfg)
    }

    /// Checks every relation the architecture needs and that every size is in a sane range; the
    /// message names the offending key. Every source of a config (TOML, `config.json`, GGUF
    /// metadata) passes here before anything is allocated, so a size read from a stranger's
    /// file cannot allocate, overflow or wrap (see [`LIMITS`]).
    pub fn validate(&self) -> Result<(), String> {
        let sizes = [
            ("model.dim", self.dim, LIMITS.dim),
            ("model.n_layers", self.n_layers, LIMITS.n_layers),
            ("model.n_heads", self.n_heads, LIMITS.dim),
            ("model.vocab_size", self.vocab_size, LIMITS.vocab_size),
            ("model.multiple_of", self.multiple_of, LIMITS.dim),
            ("model.max_seq_len", self.max_seq_len, LIMITS.max_seq_len),
        ];
        for (key, v, max) in sizes {
            if v == 0 || v > max {
                return Err(format!("{key} must be in 1..={max}, got {v}"));
            }
        }
        if let Some(m) = self.ffn_dim_multiplier
            && !(m.is_finite() && m > 0.0 && m <= LIMITS.ffn_dim_multiplier)
        {
            return Err(format!("model.ffn_dim_multiplier must be in (0, {}], got {m}", LIMITS.ffn_dim_multiplier));
        }
        if let Some(h) = self.ffn_hidden_dim
            && (h == 0 || h > LIMITS.ffn_hidden)
        {
            return Err(format!("model.ffn_hidden_dim must be in 1..={}, got {h}", LIMITS.ffn_hidden));
        }
        if self.ffn_hidden() > LIMITS.ffn_hidden {
            return Err(format!("the SwiGLU width {} (from model.dim and model.ffn_dim_multiplier) is above {}", self.ffn_hidden(), LIMITS.ffn_hidden));
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            return Err(format!("model.dim ({}) must be divisible by model.n_heads ({})", self.dim, self.n_heads));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("model.dim / model.n_heads = {} must be even (RoPE rotates pairs)", self.head_dim()));
        }
        let kv = self.n_kv_heads();
        if kv == 0 || !self.n_heads.is_multiple_of(kv) {
            return Err(format!("model.n_kv_heads ({kv}) must be > 0 and divide model.n_heads ({})", self.n_heads));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(format!("model.norm_eps must be > 0, got {}", self.norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("model.rope_theta must be > 0, got {}", self.rope_theta));
        }
        Ok(())
    }

    /// The one vocabulary rule: a tokenizer of `tokenizer_ids` ids may only produce ids this
    /// model has an embedding for. `origin` names the file or flag that chose the tokenizer.
    pub fn check_vocabulary(&self, origin: &str, tokenizer_ids: usize) -> Result<(), ModelError> {
        if tokenizer_ids > self.vocab_size {
            return Err(ModelError::Config(format!("{origin}: the tokenizer has {tokenizer_ids} ids but the model's vocabulary is {}", self.vocab_size)));
        }
        Ok(())
    }

    /// Refuses, before anything is allocated, a model whose weights alone (f32, as every loader
    /// builds them) exceed this machine's memory when they are to live on the CPU. `origin`
    /// names the file the config came from. Unknown memory (not Linux) or a GPU device: no check
    /// here (a training run's launch check compares its whole estimate with the device).
    pub fn check_host_memory(&self, device: &burn::tensor::Device, origin: &str) -> Result<(), ModelError> {
        let Some(total) = crate::host_memory::total_bytes().filter(|_| crate::device::is_flex(device)) else { return Ok(()) };
        let weights = self.num_params() * 4;
        if weights > total {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return Err(ModelError::Config(format!(
                "{origin}: this model has {} parameters: {:.1} GiB of f32 weights, more than this machine's {:.1} GiB of memory",
                self.num_params(),
                gib(weights),
                gib(total)
            )));
        }
        Ok(())
    }

    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// SwiGLU hidden width, as Meta's reference computes it:
    /// `int(2 * 4d / 3)`, times the multiplier if set, rounded up to `multiple_of`.
    pub fn ffn_hidden(&self) -> usize {
        if let Some(h) = self.ffn_hidden_dim {
            return h;
        }
        let mut hidden = 2 * 4 * self.dim / 3;
        if let Some(m) = self.ffn_dim_multiplier {
            hidden = (m * hidden as f64) as usize;
        }
        hidden.div_ceil(self.multiple_of) * self.multiple_of
    }

    /// Exact number of parameters, computed without allocating weights.
    pub fn num_params(&self) -> u64 {
        let d = self.dim as u64;
        let hd = self.head_dim() as u64;
        let q = self.n_heads as u64 * hd;
        let kv = self.n_kv_heads() as u64 * hd;
        let f = self.ffn_hidden() as u64;
        let v = self.vocab_size as u64;
        let attention = d * q + 2 * d * kv + q * d;
        let ffn = 3 * d * f;
        let norms = 2 * d;
        let per_layer = attention + ffn + norms;
        let embeddings = v * d;
        let output = if self.tie_word_embeddings { 0 } else { v * d };
        embeddings + self.n_layers as u64 * per_layer + d + output
    }

    /// Forward+backward FLOPs per token for training at sequence length `seq_len`:
    /// `6 * N_matmul + 12 * n_layers * dim * seq_len` (PaLM appendix B; embedding lookups excluded).
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        // The input embedding is a lookup, not a matmul; when tied, the shared matrix is counted
        // once, as the output projection. Norm weights are elementwise.
        let embedding = if self.tie_word_embeddings { 0 } else { (self.vocab_size * self.dim) as u64 };
        let norms = (2 * self.n_layers as u64 + 1) * self.dim as u64;
        let n = self.num_params() - embedding - norms;
        6.0 * n as f64 + 12.0 * (self.n_layers * self.dim * seq_len) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(name: &str) -> LlamaConfig {
        let path = Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../../configs").join(name);
        LlamaConfig::from_toml_file(&path).unwrap()
    }

    #[test]
    fn parameter_counts_match_released_checkpoints() {
        assert_eq!(preset("7b.toml").num_params(), 6_738_415_616);
        assert_eq!(preset("13b.toml").num_params(), 13_015_864_320);
        assert_eq!(preset("70b.toml").num_params(), 68_976_648_192);
    }

    #[test]
    fn ffn_hidden_follows_meta_formula() {
        assert_eq!(preset("7b.toml").ffn_hidden(), 11008);
        assert_eq!(preset("13b.toml").ffn_hidden(), 13824);
        assert_eq!(preset("70b.toml").ffn_hidden(), 28672);
    }

    #[test]
    fn unknown_and_missing_keys_are_named() {
        let err = LlamaConfig::from_toml_str("[model]\ndim = 64\nn_layers = 2\nn_heads = 4\nfoo = 1\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("x.toml") && err.contains("foo"), "{err}");
        let err = LlamaConfig::from_toml_str("[model]\ndim = 64\nn_heads = 4\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("n_layers"), "{err}");
        let err = LlamaConfig::from_toml_str("[model]\ndim = \"big\"\nn_layers = 2\nn_heads = 4\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("dim"), "{err}");
        let err = LlamaConfig::from_toml_str("dim = 64", "x.toml").unwrap_err().to_string();
        assert!(err.contains("[model]"), "{err}");
    }

    #[test]
    fn invalid_relations_are_rejected_with_the_key() {
        let err = LlamaConfig::from_toml_str("[model]\ndim = 66\nn_layers = 2\nn_heads = 4\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("model.dim"), "{err}");
        let err = LlamaConfig::from_toml_str("[model]\ndim = 64\nn_layers = 2\nn_heads = 4\nn_kv_heads = 3\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("model.n_kv_heads"), "{err}");
        let err = LlamaConfig::from_toml_str("[model]\ndim = 64\nn_layers = 2\nn_heads = 4\nnorm_eps = -1.0\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("model.norm_eps"), "{err}");
    }
}
