//! Writing a GGUF file: the `llama` architecture's metadata, the tokenizer (`super::vocab`), and
//! the tensors in f32, f16 or Q8_0.

use std::io::Write;
use std::path::Path;

use super::{ALIGNMENT, GgufTokenizer, MAGIC, TensorInfo, VERSION, Value, gguf_name};

/// Values per Q8_0 block, and its bytes (an f16 scale and 32 i8).
const Q8_0_BLOCK: usize = 32;
const Q8_0_BYTES: usize = 2 + Q8_0_BLOCK;
use crate::hf::{self, RopeRows};
use crate::{Llama, LlamaConfig, ModelError};

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

pub(crate) fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

pub(crate) fn put_value(out: &mut Vec<u8>, v: &Value) {
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
