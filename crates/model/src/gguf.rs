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
//! The tokenizer goes in as llama.cpp's SentencePiece-style `llama` tokenizer (pieces with `▁`,
//! byte-fallback tokens, a score per piece from the BPE merge order), together with the whole
//! `tokenizer.json` under `tokenizer.huggingface.json`, which is what reading a file back uses.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use burn::tensor::Device;
use serde_json::json;

use crate::checkpoint::{ckpt_err, io_err};
use crate::hf::{self, RopeRows};
use crate::quants::QuantType;
use crate::{Llama, LlamaConfig, ModelError};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
const ALIGNMENT: u64 = 32;
/// Values per Q8_0 block, and its bytes (an f16 scale and 32 i8).
const Q8_0_BLOCK: usize = 32;
const Q8_0_BYTES: usize = 2 + Q8_0_BLOCK;

/// Meta's Llama 2 chat template as `transformers` ships it: what `sft` trains on, for llama.cpp's
/// chat mode when the tokenizer brings none.
pub const LLAMA2_CHAT_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/// How the weight matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Q8_0,
}

impl GgufType {
    pub const ALLOWED: &str = "f32, f16, q8_0";

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "q8_0" => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// ggml's type id.
    fn ggml(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 8,
        }
    }

    fn from_ggml(id: u32) -> Option<Self> {
        match id {
            0 => Some(Self::F32),
            1 => Some(Self::F16),
            8 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_ALL_F32`, `MOSTLY_F16`, `MOSTLY_Q8_0`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
        }
    }

    /// Bytes of `n` values (`n` a multiple of 32 for Q8_0).
    fn bytes(self, n: usize) -> usize {
        match self {
            Self::F32 => 4 * n,
            Self::F16 => 2 * n,
            Self::Q8_0 => n / Q8_0_BLOCK * Q8_0_BYTES,
        }
    }
}

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
    fn type_id(&self) -> u32 {
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

/// One tensor of a GGUF file: its name, `ne` (contiguous dimension first), type and where its
/// bytes start, relative to the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ne: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

/// A GGUF file's metadata and tensor table, and the bytes of its data section.
#[derive(Debug)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    data: memmap2::Mmap,
    data_start: usize,
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Reads the header, metadata and tensor table of `path`; every length and offset is checked
    /// against the file's size, so a truncated or corrupt file is an error naming what is wrong.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
        // SAFETY: opened read-only, and not modified while mapped.
        let data = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
        let mut r = Reader { bytes: &data, at: 0, path, items_left: MAX_METADATA_ITEMS };
        if data.len() < 4 || &data[..4] != MAGIC {
            return Err(ckpt_err(format!("{}: not a GGUF file (it does not start with `GGUF`)", path.display())));
        }
        r.at = 4;
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(ckpt_err(format!("{}: GGUF version {version} is not supported (2 or 3)", path.display())));
        }
        // Smallest encodings: a tensor's name length, dimension count, one dimension, type and
        // offset (32 bytes); a key's length, value type and a one-byte value (13 bytes).
        let n_tensors = r.count("tensor count", 32)?;
        let n_kv = r.count("metadata count", 13)?;
        let mut metadata = Vec::with_capacity(n_kv.min(PREALLOCATED_ITEMS));
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0).map_err(|e| ckpt_err(format!("{e} (metadata `{key}`)")))?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(PREALLOCATED_ITEMS));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(ckpt_err(format!("{}: tensor `{name}` has {n_dims} dimensions (1 to 4)", path.display())));
            }
            let ne = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.push(TensorInfo { name, ne, ggml_type, offset });
        }
        let alignment = metadata.iter().find(|(k, _)| k == "general.alignment").and_then(|(_, v)| v.as_u64()).unwrap_or(ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(ckpt_err(format!("{}: general.alignment {alignment} is not a power of two", path.display())));
        }
        // Past the end of the file only when there are no tensors (each is checked to lie inside).
        let data_start = (r.at as u64).checked_next_multiple_of(alignment).and_then(|s| usize::try_from(s).ok());
        let data_start = data_start.ok_or_else(|| ckpt_err(format!("{}: general.alignment {alignment} is too large", path.display())))?;
        let gguf = Self { version, metadata, tensors, data, data_start };
        for t in &gguf.tensors {
            gguf.tensor_bytes(t, path)?;
        }
        Ok(gguf)
    }

    /// The bytes of tensor `t`, checked to lie inside the file.
    fn tensor_bytes(&self, t: &TensorInfo, path: &Path) -> Result<&[u8], ModelError> {
        let err = |m: String| ckpt_err(format!("{}: tensor `{}` {m}", path.display(), t.name));
        let ty = QuantType::from_ggml(t.ggml_type).ok_or_else(|| {
            err(format!(
                "has ggml type {}; this reader takes f32 (0), f16 (1), bf16 (30), q4_0 (2), q4_1 (3), q5_0 (6), q5_1 (7), q8_0 (8), q2_K (10), q3_K (11), q4_K (12), q5_K (13) and q6_K (14)",
                t.ggml_type
            ))
        })?;
        let n = t.ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).filter(|&n| n <= usize::MAX as u64 / 4);
        let n = n.ok_or_else(|| err(format!("has an impossible shape {:?}", t.ne)))?;
        let size = ty.bytes_for(t.ne[0], n).map_err(|m| err(format!("(ne {:?}, {}): {m}", t.ne, ty.name())))?;
        // Checked: an offset near 2^64 must not wrap around to the header's bytes.
        let start = (self.data_start as u64).checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(size)).unwrap_or(u64::MAX);
        let start = start.unwrap_or(u64::MAX);
        if end > self.data.len() as u64 {
            return Err(err(format!("needs bytes {start}..{end} but the file has {} (truncated?)", self.data.len())));
        }
        Ok(&self.data[start as usize..end as usize])
    }

    /// Tensor `t` as f32 values (dequantised as llama.cpp does), in its row-major order.
    pub fn tensor_f32(&self, t: &TensorInfo, path: &Path) -> Result<Vec<f32>, ModelError> {
        let bytes = self.tensor_bytes(t, path)?;
        Ok(QuantType::from_ggml(t.ggml_type).expect("checked by tensor_bytes").dequantize(bytes))
    }
}

/// Array items of all the metadata together (a 256k vocabulary's tokens, scores, types and merges
/// are about a million): each item is a [`Value`] of 32 bytes in memory, so the cap bounds what a
/// small file that declares huge arrays of one-byte items can make us allocate (256 MiB).
const MAX_METADATA_ITEMS: usize = 1 << 23;
/// Arrays inside arrays, at most (llama.cpp writes none).
const MAX_ARRAY_NESTING: usize = 2;
/// Items reserved ahead of reading them; past this a vector grows as items are actually read.
const PREALLOCATED_ITEMS: usize = 4096;

/// Bounds-checked little-endian reads of a GGUF header.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
    /// Array items still allowed ([`MAX_METADATA_ITEMS`]).
    items_left: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], ModelError> {
        if n > self.bytes.len() - self.at {
            return Err(ckpt_err(format!("{}: truncated GGUF header (wanted {n} bytes at byte {} of {})", self.path.display(), self.at, self.bytes.len())));
        }
        self.at += n;
        Ok(&self.bytes[self.at - n..self.at])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ModelError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A count of items of at least `min_bytes` bytes each: more than the bytes left can hold is
    /// corruption, refused before anything is allocated for them.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize, ModelError> {
        let n = self.u64()?;
        if n > ((self.bytes.len() - self.at) / min_bytes) as u64 {
            return Err(ckpt_err(format!("{}: {what} {n} is larger than the rest of the file can hold (corrupt GGUF)", self.path.display())));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, ModelError> {
        let n = self.count("string length", 1)?;
        let at = self.at;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ckpt_err(format!("{}: a string at byte {at} is not UTF-8", self.path.display())))
    }
    /// A value of type `ty`, `depth` arrays deep.
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, ModelError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(ckpt_err(format!("{}: arrays nested deeper than {MAX_ARRAY_NESTING} at byte {}", self.path.display(), self.at)));
                }
                let item = self.u32()?;
                // Smallest encoding of one item: a string's or an array's length prefix.
                let min_bytes = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => 12,
                };
                let n = self.count("array length", min_bytes)?;
                self.items_left = self.items_left.checked_sub(n).ok_or_else(|| {
                    ckpt_err(format!("{}: the metadata's arrays hold more than {MAX_METADATA_ITEMS} items in all (corrupt GGUF?)", self.path.display()))
                })?;
                let mut items = Vec::with_capacity(n.min(PREALLOCATED_ITEMS));
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(ckpt_err(format!("{}: unknown GGUF value type {other} at byte {}", self.path.display(), self.at - 4))),
        })
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::Str(s) => put_string(out, s),
        Value::Array(items) => {
            // GGUF arrays are of one type; an empty one is written as an array of u32.
            out.extend(items.first().map_or(4, Value::type_id).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
    }
}

/// llama.cpp's `quantize_row_q8_0_ref`: per block of 32, scale `d = max|x| / 127` (stored as
/// f16) and `q = round(x / d)`.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / Q8_0_BLOCK * Q8_0_BYTES);
    for block in x.chunks_exact(Q8_0_BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// Our Hugging Face tensor name -> llama.cpp's.
fn gguf_name(hf: &str) -> String {
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

/// The tokenizer as GGUF needs it: the `tokenizer.json` text, the BOS and EOS tokens and the chat
/// template (`llama convert` takes them from `llama_data::Tokenizer`, which reads the
/// checkpoint's tokenizer files; [`LLAMA2_CHAT_TEMPLATE`] when it declares none).
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    pub json: String,
    pub bos: String,
    pub eos: String,
    pub chat_template: String,
}

impl GgufTokenizer {
    /// The `tokenizer.*` metadata of llama.cpp's `llama` (SentencePiece-style) tokenizer.
    fn metadata(&self, vocab_size: usize, origin: &str) -> Result<Vec<(String, Value)>, ModelError> {
        let err = |m: String| ckpt_err(format!("{origin}: {m}"));
        let tok = tokenizers::Tokenizer::from_bytes(self.json.as_bytes()).map_err(|e| err(format!("cannot load tokenizer.json: {e}")))?;
        let vocab = tok.get_vocab(true);
        if !vocab.keys().any(|t| t.starts_with('▁')) || !vocab.contains_key("<0x00>") {
            return Err(err("GGUF export writes llama.cpp's SentencePiece-style tokenizer (pieces marked `▁`, byte-fallback tokens <0x00>..<0xFF>), as Llama 2's; this tokenizer is not one".into()));
        }
        let id_of = |t: &str| vocab.get(t).copied().ok_or_else(|| err(format!("the tokenizer has no `{t}` token")));
        let (bos, eos) = (id_of(&self.bos)?, id_of(&self.eos)?);
        let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
        for (t, &id) in &vocab {
            let slot = tokens.get_mut(id as usize).ok_or_else(|| err(format!("token `{t}` has id {id}, outside the model's vocabulary of {vocab_size}")))?;
            *slot = Some(t.clone());
        }
        // SentencePiece merges the adjacent pair whose piece scores highest: the BPE merge order.
        let raw: serde_json::Value = serde_json::from_str(&self.json).map_err(|e| err(format!("tokenizer.json: {e}")))?;
        let mut scores = vec![0f32; vocab_size];
        for (rank, merge) in raw["model"]["merges"].as_array().into_iter().flatten().enumerate() {
            let merged = match merge {
                serde_json::Value::String(s) => s.split_once(' ').map(|(a, b)| format!("{a}{b}")),
                serde_json::Value::Array(p) => Some(p.iter().filter_map(|x| x.as_str()).collect()),
                _ => None,
            };
            if let Some(&id) = merged.as_ref().and_then(|m| vocab.get(m)) {
                scores[id as usize] = -(rank as f32) - 1.0;
            }
        }
        let specials: HashMap<u32, bool> = tok.get_added_tokens_decoder().into_iter().map(|(id, t)| (id, t.special)).collect();
        let unk = vocab.get("<unk>").copied();
        let types: Vec<Value> = (0..vocab_size as u32)
            .map(|id| {
                let text = tokens[id as usize].as_deref().unwrap_or("");
                Value::I32(if Some(id) == unk {
                    2 // unknown
                } else if tokens[id as usize].is_none() {
                    5 // unused
                } else if specials.get(&id) == Some(&true) {
                    3 // control
                } else if text.len() == 6 && text.starts_with("<0x") && text.ends_with('>') {
                    6 // byte
                } else {
                    1 // normal
                })
            })
            .collect();
        let tokens = tokens.into_iter().enumerate().map(|(i, t)| Value::Str(t.unwrap_or_else(|| format!("[PAD{i}]")))).collect();
        let mut meta = vec![
            ("tokenizer.ggml.model".into(), Value::Str("llama".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
            ("tokenizer.ggml.scores".into(), Value::Array(scores.into_iter().map(Value::F32).collect())),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
            ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
            ("tokenizer.chat_template".into(), Value::Str(self.chat_template.clone())),
            ("tokenizer.huggingface.json".into(), Value::Str(self.json.clone())),
        ];
        if let Some(unk) = unk {
            meta.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(unk)));
        }
        Ok(meta)
    }
}

/// The `general.*` and `llama.*` metadata of a model with this config.
fn model_metadata(config: &LlamaConfig, name: &str, ty: GgufType) -> Vec<(String, Value)> {
    let u32v = |v: usize| Value::U32(v as u32);
    vec![
        ("general.architecture".into(), Value::Str("llama".into())),
        ("general.name".into(), Value::Str(name.into())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.alignment".into(), Value::U32(ALIGNMENT as u32)),
        ("llama.vocab_size".into(), u32v(config.vocab_size)),
        ("llama.context_length".into(), u32v(config.max_seq_len)),
        ("llama.embedding_length".into(), u32v(config.dim)),
        ("llama.block_count".into(), u32v(config.n_layers)),
        ("llama.feed_forward_length".into(), u32v(config.ffn_hidden())),
        ("llama.attention.head_count".into(), u32v(config.n_heads)),
        ("llama.attention.head_count_kv".into(), u32v(config.n_kv_heads())),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(config.norm_eps as f32)),
        ("llama.rope.freq_base".into(), Value::F32(config.rope_theta as f32)),
        ("llama.rope.dimension_count".into(), u32v(config.head_dim())),
    ]
}

/// Writes `model` to the GGUF file `path` (through a temporary sibling and a rename): weight
/// matrices in `ty` (Q8_0 falls back to f16 for a matrix whose rows are not a multiple of 32),
/// norms in f32, the tokenizer's metadata when one is given. A tied model has no `output.weight`
/// (llama.cpp then reads `token_embd.weight`, as tied Llama checkpoints do).
pub fn save_gguf(model: &Llama, config: &LlamaConfig, tokenizer: Option<&GgufTokenizer>, name: &str, path: &Path, ty: GgufType) -> Result<(), ModelError> {
    let mut metadata = model_metadata(config, name, ty);
    if let Some(t) = tokenizer {
        metadata.extend(t.metadata(config.vocab_size, &path.display().to_string())?);
    }
    // Sizes follow from shapes and types, so the header is written first and each tensor is
    // converted as it is written: one tensor at a time in memory besides the model.
    let layout = hf::hf_layout(config);
    let mut infos: Vec<TensorInfo> = vec![];
    let mut offset = 0u64;
    for (hf_name, shape, _) in &layout {
        let rows_of_32 = shape.last().is_some_and(|&c| c % Q8_0_BLOCK == 0);
        let tensor_ty = match ty {
            _ if shape.len() == 1 => GgufType::F32,
            GgufType::Q8_0 if !rows_of_32 => GgufType::F16,
            other => other,
        };
        infos.push(TensorInfo { name: gguf_name(hf_name), ne: shape.iter().rev().map(|&d| d as u64).collect(), ggml_type: tensor_ty.ggml(), offset });
        offset = (offset + tensor_ty.bytes(shape.iter().product()) as u64).next_multiple_of(ALIGNMENT);
    }
    let mut header = vec![];
    header.extend(MAGIC);
    header.extend(VERSION.to_le_bytes());
    header.extend((infos.len() as u64).to_le_bytes());
    header.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in &metadata {
        put_string(&mut header, key);
        header.extend(value.type_id().to_le_bytes());
        put_value(&mut header, value);
    }
    for t in &infos {
        put_string(&mut header, &t.name);
        header.extend((t.ne.len() as u32).to_le_bytes());
        for d in &t.ne {
            header.extend(d.to_le_bytes());
        }
        header.extend(t.ggml_type.to_le_bytes());
        header.extend(t.offset.to_le_bytes());
    }
    header.resize((header.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);
    let mut model = model.clone();
    llama_io::write_atomic_with(path, |w| {
        w.write_all(&header)?;
        for ((hf_name, shape, kind), info) in layout.iter().zip(&infos) {
            let data = hf::export_tensor(&mut model, config, hf_name, shape, *kind, RopeRows::Meta);
            let bytes: Vec<u8> = match GgufType::from_ggml(info.ggml_type).expect("chosen above") {
                GgufType::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                GgufType::F16 => data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
                GgufType::Q8_0 => quantize_q8_0(&data),
            };
            w.write_all(&bytes)?;
            let pad = (bytes.len() as u64).next_multiple_of(ALIGNMENT) - bytes.len() as u64;
            w.write_all(&vec![0; pad as usize])?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Reads a GGUF file of the `llama` architecture (its tensors dequantized to f32 by
/// `crate::quants`) into our model, and the `tokenizer.json` it carries, if any. The config comes from the `llama.*` metadata and is
/// checked against every tensor's shape.
pub fn load_gguf(path: &Path, device: &Device) -> Result<(LlamaConfig, Llama, Option<String>), ModelError> {
    let file = GgufFile::open(path)?;
    let origin = path.display().to_string();
    let err = |m: String| ckpt_err(format!("{origin}: {m}"));
    match file.get("general.architecture").and_then(Value::as_str) {
        Some("llama") => {}
        Some(other) => return Err(err(format!("general.architecture is `{other}`; this reader takes `llama`"))),
        None => return Err(err("no general.architecture".into())),
    }
    let tokenizer = file.get("tokenizer.huggingface.json").and_then(Value::as_str).map(String::from);
    // Parsed first, so that a broken one is refused here, not written out to fail at its next use.
    if let Some(json) = &tokenizer {
        tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| err(format!("metadata `tokenizer.huggingface.json` is not a valid tokenizer.json: {e}")))?;
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
    let config = hf::config_from_hf(&hf_config, &origin).map_err(|e| ModelError::Config(hf::rename_keys(&e.to_string(), GGUF_KEYS)))?;
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
    Ok((config, model, tokenizer))
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
    use super::*;

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
