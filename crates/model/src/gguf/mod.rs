//! GGUF, the one-file format of llama.cpp (read by Ollama and LM Studio too): the model's
//! hyper-parameters and tokenizer as metadata, then its tensors, for llama.cpp's `llama`
//! architecture. Written in f32, f16 or Q8_0 (norms stay f32, as llama.cpp's converter keeps
//! them); read from those and from bf16 and llama.cpp's quantized types (`crate::quants`).
//!
//! Layout (GGUF version 3, little-endian): magic `GGUF`, version, tensor count, metadata count;
//! metadata `key, type, value`; per tensor `name, n_dims, ne[..], ggml type, offset`; padding to
//! `general.alignment` (32); the tensor data, each tensor at an aligned offset. `ne[0]` is the
//! contiguous dimension, so a Hugging Face `[d_out, d_in]` weight has `ne = [d_in, d_out]`. q and
//! k rows are in Meta's interleaved RoPE order (our own order; llama.cpp's `llama` rope), not the
//! Hugging Face rotate-half order. Q8_0 stores blocks of 32 values as an f16 scale `max|x| / 127`
//! and 32 signed bytes `round(x / scale)`, as llama.cpp's reference quantizer does.
//!
//! The tokenizer goes in as llama.cpp's `llama` (SentencePiece-style) or `gpt2` (byte-level BPE)
//! tokenizer, together with the whole `tokenizer.json` under `tokenizer.huggingface.json`; reading
//! takes that one when present and otherwise builds one from the `tokenizer.ggml.*` metadata
//! (`vocab`).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::Device;
use serde_json::json;

mod file;
mod vocab;
mod write;

pub use file::{GgufFile, TensorInfo};
pub use vocab::{GgufTokenizer, TokenizerFiles, tokenizer_files};
pub use write::{GgufType, LLAMA2_CHAT_TEMPLATE, quantize_q8_0, save_gguf};

use crate::files::ckpt_err;
use crate::hf::{self, RopeRows};
use crate::{Llama, LlamaConfig, ModelError};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
const ALIGNMENT: u64 = 32;

/// A metadata value (every GGUF value type, so that any file's metadata can be read).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub(crate) fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// An unsigned integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    /// A number; an f32 as the shortest decimal that reads back as it (1e-5 stored as f32
    /// gives 1e-5, not 9.99999974e-6), since our configs hold the decimal.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.to_string().parse().unwrap_or(v.into())),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Our Hugging Face tensor name -> llama.cpp's.
pub(crate) fn gguf_name(hf: &str) -> String {
    let parts: Vec<&str> = hf.split('.').collect();
    match parts.as_slice() {
        ["model", "embed_tokens", "weight"] => "token_embd.weight".into(),
        ["model", "norm", "weight"] => "output_norm.weight".into(),
        ["lm_head", "weight"] => "output.weight".into(),
        ["model", "layers", l, .., part, "weight"] => {
            let short = match *part {
                "q_proj" => "attn_q",
                "k_proj" => "attn_k",
                "v_proj" => "attn_v",
                "o_proj" => "attn_output",
                "gate_proj" => "ffn_gate",
                "up_proj" => "ffn_up",
                "down_proj" => "ffn_down",
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                other => unreachable!("hf layout has no `{other}`"),
            };
            format!("blk.{l}.{short}.weight")
        }
        _ => unreachable!("hf layout has no `{hf}`"),
    }
}

/// Reads a GGUF file of the `llama` architecture (its tensors dequantized to f32 by
/// `crate::quants`) into our model, and returns its metadata beside it, from which
/// [`tokenizer_files`] builds the tokenizer for a caller that writes one (building it costs a
/// parse of the whole vocabulary, which loading a model for training or generation does not
/// need). The config comes from the `llama.*` metadata and is checked against every tensor's
/// shape.
pub fn load_gguf(path: &Path, device: &Device) -> Result<(LlamaConfig, Llama, Vec<(String, Value)>), ModelError> {
    let file = GgufFile::open(path)?;
    let origin = path.display().to_string();
    let err = |m: String| ckpt_err(format!("{origin}: {m}"));
    let config = config_of(&file, &origin)?;
    config.check_host_memory(device, &origin)?;
    let mut model = config.init_lazy(device);
    let mut by_name: HashMap<&str, &TensorInfo> = file.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for (hf_name, shape, kind) in hf::hf_layout(&config) {
        let name = gguf_name(&hf_name);
        let t = by_name.remove(name.as_str()).ok_or_else(|| err(format!("tensor `{name}` is missing")))?;
        let want: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        if t.ne != want {
            return Err(err(format!("tensor `{name}` has ne {:?}, but the metadata implies {want:?}", t.ne)));
        }
        let data = file.tensor_f32(t, path)?;
        hf::refuse_non_finite(&data, &name, &origin)?;
        hf::set_tensor(&mut model, &config, &hf_name, &shape, kind, data, RopeRows::Meta, device);
    }
    if let Some(extra) = by_name.keys().next() {
        return Err(err(format!("unexpected tensor `{extra}` for a llama model")));
    }
    Ok((config, model, file.metadata))
}

/// The model config a GGUF file's `llama.*` metadata describes, read without its tensors' data.
pub fn gguf_config(path: &Path) -> Result<LlamaConfig, ModelError> {
    config_of(&GgufFile::open(path)?, &path.display().to_string())
}

fn config_of(file: &GgufFile, origin: &str) -> Result<LlamaConfig, ModelError> {
    let err = |m: String| ckpt_err(format!("{origin}: {m}"));
    match file.get("general.architecture").and_then(Value::as_str) {
        Some("llama") => {}
        Some(other) => return Err(err(format!("general.architecture is `{other}`; this reader takes `llama`"))),
        None => return Err(err("no general.architecture".into())),
    }
    let int = |key: &str| file.get(key).and_then(Value::as_u64).ok_or_else(|| err(format!("metadata `{key}` is missing or not an integer")));
    let embedding = file.tensors.iter().find(|t| t.name == "token_embd.weight").ok_or_else(|| err("no tensor `token_embd.weight`".into()))?;
    let vocab_size = match file.get("llama.vocab_size") {
        Some(v) => v.as_u64().ok_or_else(|| err("llama.vocab_size is not an integer".into()))?,
        None => embedding.ne.get(1).copied().unwrap_or(0),
    };
    let float = |key: &str, default: f64| file.get(key).map_or(Some(default), Value::as_f64).ok_or_else(|| err(format!("metadata `{key}` is not a number")));
    let hf_config = json!({
        "hidden_size": int("llama.embedding_length")?,
        "num_hidden_layers": int("llama.block_count")?,
        "num_attention_heads": int("llama.attention.head_count")?,
        "num_key_value_heads": int(if file.get("llama.attention.head_count_kv").is_some() { "llama.attention.head_count_kv" } else { "llama.attention.head_count" })?,
        "intermediate_size": int("llama.feed_forward_length")?,
        "vocab_size": vocab_size,
        "max_position_embeddings": int("llama.context_length")?,
        "rms_norm_eps": float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
        "rope_theta": float("llama.rope.freq_base", 10000.0)?,
        "tie_word_embeddings": !file.tensors.iter().any(|t| t.name == "output.weight"),
    });
    // Errors name the GGUF key the value came from, not config.json's.
    hf::config_from_hf(&hf_config, origin).map_err(|e| ModelError::Config(hf::rename_keys(&e.to_string(), GGUF_KEYS)))
}

/// The `config.json` keys [`load_gguf`] passes the metadata as, and the GGUF keys they came from.
const GGUF_KEYS: &[(&str, &str)] = &[
    ("hidden_size", "llama.embedding_length"),
    ("num_hidden_layers", "llama.block_count"),
    ("num_attention_heads", "llama.attention.head_count"),
    ("num_key_value_heads", "llama.attention.head_count_kv"),
    ("vocab_size", "llama.vocab_size"),
    ("intermediate_size", "llama.feed_forward_length"),
    ("max_position_embeddings", "llama.context_length"),
    ("rms_norm_eps", "llama.attention.layer_norm_rms_epsilon"),
    ("rope_theta", "llama.rope.freq_base"),
];

/// Whether `path` is a GGUF file (by its first bytes).
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.is_file() && std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok() && &magic == MAGIC
}

#[cfg(test)]
mod tests {
    use super::write::{put_string, put_value};
    use super::*;
    use crate::quants::QuantType;

    #[test]
    fn q8_0_matches_llama_cpp_reference_on_a_hand_computed_block() {
        // max |x| = 127 -> scale 1.0: the values round to themselves; halves round away from 0.
        let mut x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        x[0] = -127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        let q = quantize_q8_0(&x);
        assert_eq!(q.len(), 34);
        assert_eq!(half::f16::from_le_bytes([q[0], q[1]]).to_f32(), 1.0);
        assert_eq!(q[2] as i8, -127);
        assert_eq!((q[3] as i8, q[4] as i8), (3, -3));
        let back = QuantType::Q8_0.dequantize(&q);
        assert_eq!(back[3..], x[3..], "integers at scale 1 decode exactly");
        // A zero block has scale 0 and decodes to zeros.
        assert_eq!(QuantType::Q8_0.dequantize(&quantize_q8_0(&[0.0; 32])), vec![0.0; 32]);
        // Error at most half a step per value.
        let y: Vec<f32> = (0..64).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let back = QuantType::Q8_0.dequantize(&quantize_q8_0(&y));
        for (block, got) in y.chunks(32).zip(back.chunks(32)) {
            let step = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in block.iter().zip(got) {
                assert!((a - b).abs() <= 0.5 * step * 1.01, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn metadata_values_round_trip() {
        let values = vec![
            ("a".to_string(), Value::U32(7)),
            ("b".to_string(), Value::F32(1e-5)),
            ("c".to_string(), Value::Str("llama".into())),
            ("d".to_string(), Value::Array(vec![Value::Str("▁a".into()), Value::Str("<0x00>".into())])),
            ("e".to_string(), Value::Bool(true)),
            ("f".to_string(), Value::Array(vec![Value::I32(-1), Value::I32(3)])),
        ];
        let mut bytes = vec![];
        bytes.extend(MAGIC);
        bytes.extend(VERSION.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes.extend((values.len() as u64).to_le_bytes());
        for (k, v) in &values {
            put_string(&mut bytes, k);
            bytes.extend(v.type_id().to_le_bytes());
            put_value(&mut bytes, v);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.metadata, values);
        // Every truncation of it is an error, never a panic.
        for cut in 0..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(GgufFile::open(&path).is_err(), "cut at {cut}");
        }
    }
}
