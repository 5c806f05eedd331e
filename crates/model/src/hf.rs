//! The Hugging Face `LlamaForCausalLM` adapter: `config.json` + `model.safetensors`, or sharded
//! `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`, both ways. Linear
//! weights are `[d_out, d_in]` and q/k rows use the rotate-half RoPE layout, so q and k are
//! permuted on the way in and back on the way out (the inverse of the `permute` in
//! `transformers`' `convert_llama_weights_to_hf.py`). Every write goes through a temporary file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{DType, Device, Tensor, TensorData};
use llama_io::write_atomic;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{Value, json};

use crate::files::{HF_CONFIG, HF_INDEX, NATIVE_WEIGHTS, ckpt_err, io_err, write_safetensors};
use crate::{Llama, LlamaConfig, ModelError};

/// Reads a `transformers` `LlamaConfig` JSON object into ours, refusing what we do not implement.
pub fn config_from_hf(json: &Value, origin: &str) -> Result<LlamaConfig, ModelError> {
    let err = |m: String| ModelError::Config(format!("{origin}: {m}"));
    let get_usize = |key: &str| -> Result<usize, ModelError> {
        json.get(key).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| err(format!("key `{key}` is missing or not a non-negative integer")))
    };
    let get_f64 = |key: &str, default: f64| -> Result<f64, ModelError> {
        match json.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| err(format!("key `{key}` must be a number"))),
        }
    };
    if let Some(act) = json.get("hidden_act").and_then(Value::as_str)
        && act != "silu"
    {
        return Err(err(format!("hidden_act `{act}` is not supported (Llama uses silu)")));
    }
    for key in ["attention_bias", "mlp_bias"] {
        if json.get(key).and_then(Value::as_bool) == Some(true) {
            return Err(err(format!("`{key}: true` is not supported (Llama has no biases)")));
        }
    }
    if let Some(scaling) = json.get("rope_scaling")
        && !scaling.is_null()
    {
        return Err(err(format!("rope_scaling {scaling} is not supported")));
    }
    // transformers >= 5 writes `rope_parameters: {rope_type, rope_theta}` instead of `rope_theta`.
    let mut rope_theta = get_f64("rope_theta", 10000.0)?;
    if let Some(params) = json.get("rope_parameters").filter(|p| !p.is_null()) {
        let kind = params.get("rope_type").and_then(Value::as_str).unwrap_or("default");
        if kind != "default" {
            return Err(err(format!("rope_parameters.rope_type `{kind}` is not supported (only `default`)")));
        }
        if let Some(theta) = params.get("rope_theta") {
            rope_theta = theta.as_f64().ok_or_else(|| err("rope_parameters.rope_theta must be a number".into()))?;
        }
    }
    let n_heads = get_usize("num_attention_heads")?;
    let dim = get_usize("hidden_size")?;
    if let Some(hd) = json.get("head_dim").and_then(Value::as_u64)
        && n_heads > 0
        && (hd as usize).checked_mul(n_heads) != Some(dim)
    {
        return Err(err(format!("head_dim {hd} * num_attention_heads {n_heads} != hidden_size {dim} is not supported")));
    }
    let config = LlamaConfig {
        dim,
        n_layers: get_usize("num_hidden_layers")?,
        n_heads,
        n_kv_heads: Some(json.get("num_key_value_heads").and_then(Value::as_u64).map_or(n_heads, |v| v as usize)),
        vocab_size: get_usize("vocab_size")?,
        multiple_of: 256,
        ffn_dim_multiplier: None,
        ffn_hidden_dim: Some(get_usize("intermediate_size")?),
        norm_eps: get_f64("rms_norm_eps", 1e-6)?,
        rope_theta,
        max_seq_len: json.get("max_position_embeddings").and_then(Value::as_u64).map_or(4096, |v| v as usize),
        tie_word_embeddings: json.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
    };
    config.validate().map_err(|m| err(rename_keys(&m, HF_KEYS)))?;
    Ok(config)
}

/// Refuses a NaN or infinite weight, naming the tensor and the file (one pass, on the host).
pub(crate) fn refuse_non_finite(data: &[f32], name: &str, origin: &str) -> Result<(), ModelError> {
    match data.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(ckpt_err(format!("{origin}: tensor `{name}` holds a non-finite value ({} at index {i})", data[i]))),
        None => Ok(()),
    }
}

/// Our config keys and the `config.json` keys they are read from.
pub(crate) const HF_KEYS: &[(&str, &str)] = &[
    ("model.dim", "hidden_size"),
    ("model.n_layers", "num_hidden_layers"),
    ("model.n_heads", "num_attention_heads"),
    ("model.n_kv_heads", "num_key_value_heads"),
    ("model.vocab_size", "vocab_size"),
    ("model.ffn_hidden_dim", "intermediate_size"),
    ("model.max_seq_len", "max_position_embeddings"),
    ("model.norm_eps", "rms_norm_eps"),
    ("model.rope_theta", "rope_theta"),
];

/// `message` with each `(ours, theirs)` key renamed, so that an error names the key of the file
/// the value came from.
pub(crate) fn rename_keys(message: &str, keys: &[(&str, &str)]) -> String {
    keys.iter().fold(message.to_string(), |m, (ours, theirs)| m.replace(ours, theirs))
}

/// Our config as a `transformers` `config.json`.
pub fn config_to_hf(config: &LlamaConfig) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden(),
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads(),
        "head_dim": config.head_dim(),
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": null,
        "rope_parameters": { "rope_type": "default", "rope_theta": config.rope_theta },
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pretraining_tp": 1,
        "use_cache": true,
        "torch_dtype": "float32"
    })
}

/// Meta (interleaved) row order -> Hugging Face (rotate-half) row order, or back with
/// `to_hf = false`, for a `[n_heads * head_dim, d_in]` row-major q or k weight.
fn permute_rope_rows(w: &[f32], n_heads: usize, head_dim: usize, d_in: usize, to_hf: bool) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    let half = head_dim / 2;
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let meta = h * head_dim + 2 * i + j;
                let hf = h * head_dim + j * half + i;
                let (src, dst) = if to_hf { (meta, hf) } else { (hf, meta) };
                out[dst * d_in..(dst + 1) * d_in].copy_from_slice(&w[src * d_in..(src + 1) * d_in]);
            }
        }
    }
    out
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = w[r * cols + c];
        }
    }
    out
}

/// One HF tensor: how it maps onto our module.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// `[d_out, d_in]` linear weight, transposed into Burn's `[d_in, d_out]`.
    Linear,
    /// Linear weight whose rows are RoPE'd heads (q: n_heads, k: n_kv_heads).
    RopeLinear(usize),
    /// Stored as is (embedding `[vocab, dim]`, norm weights).
    Plain,
}

/// The HF names of every tensor of a model with this config, with their HF shapes.
pub(crate) fn hf_layout(config: &LlamaConfig) -> Vec<(String, Vec<usize>, Kind)> {
    let (d, hd, f, v) = (config.dim, config.head_dim(), config.ffn_hidden(), config.vocab_size);
    let (h, kv) = (config.n_heads, config.n_kv_heads());
    let mut names = vec![("model.embed_tokens.weight".to_string(), vec![v, d], Kind::Plain)];
    for l in 0..config.n_layers {
        let p = format!("model.layers.{l}");
        names.push((format!("{p}.self_attn.q_proj.weight"), vec![h * hd, d], Kind::RopeLinear(h)));
        names.push((format!("{p}.self_attn.k_proj.weight"), vec![kv * hd, d], Kind::RopeLinear(kv)));
        names.push((format!("{p}.self_attn.v_proj.weight"), vec![kv * hd, d], Kind::Linear));
        names.push((format!("{p}.self_attn.o_proj.weight"), vec![d, h * hd], Kind::Linear));
        names.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d], Kind::Linear));
        names.push((format!("{p}.mlp.up_proj.weight"), vec![f, d], Kind::Linear));
        names.push((format!("{p}.mlp.down_proj.weight"), vec![d, f], Kind::Linear));
        names.push((format!("{p}.input_layernorm.weight"), vec![d], Kind::Plain));
        names.push((format!("{p}.post_attention_layernorm.weight"), vec![d], Kind::Plain));
    }
    names.push(("model.norm.weight".to_string(), vec![d], Kind::Plain));
    if !config.tie_word_embeddings {
        names.push(("lm_head.weight".to_string(), vec![v, d], Kind::Linear));
    }
    names
}

/// Mutable access to our parameter that holds the HF tensor `name`.
fn param_for<'a>(model: &'a mut Llama, name: &str) -> Option<Param2or1<'a>> {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        ["model", "embed_tokens", "weight"] => Some(Param2or1::Two(&mut model.tok_embeddings.weight)),
        ["model", "norm", "weight"] => Some(Param2or1::One(&mut model.norm.gamma)),
        ["lm_head", "weight"] => model.output.as_mut().map(|o| Param2or1::Two(&mut o.weight)),
        ["model", "layers", l, group, proj, "weight"] => {
            let block = model.layers.get_mut(l.parse::<usize>().ok()?)?;
            Some(match (*group, *proj) {
                ("self_attn", "q_proj") => Param2or1::Two(&mut block.attention.wq.weight),
                ("self_attn", "k_proj") => Param2or1::Two(&mut block.attention.wk.weight),
                ("self_attn", "v_proj") => Param2or1::Two(&mut block.attention.wv.weight),
                ("self_attn", "o_proj") => Param2or1::Two(&mut block.attention.wo.weight),
                ("mlp", "gate_proj") => Param2or1::Two(&mut block.feed_forward.w1.weight),
                ("mlp", "up_proj") => Param2or1::Two(&mut block.feed_forward.w3.weight),
                ("mlp", "down_proj") => Param2or1::Two(&mut block.feed_forward.w2.weight),
                _ => return None,
            })
        }
        ["model", "layers", l, norm, "weight"] => {
            let block = model.layers.get_mut(l.parse::<usize>().ok()?)?;
            match *norm {
                "input_layernorm" => Some(Param2or1::One(&mut block.attention_norm.gamma)),
                "post_attention_layernorm" => Some(Param2or1::One(&mut block.ffn_norm.gamma)),
                _ => None,
            }
        }
        _ => None,
    }
}

enum Param2or1<'a> {
    Two(&'a mut Param<Tensor<2>>),
    One(&'a mut Param<Tensor<1>>),
}

fn view_to_f32(view: &TensorView<'_>, name: &str, file: &Path) -> Result<Vec<f32>, ModelError> {
    let bytes = view.data();
    let out = match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => {
            return Err(ckpt_err(format!("{}: tensor `{name}` has dtype {other:?}; expected F32, BF16 or F16", file.display())));
        }
    };
    Ok(out)
}

/// The weight files of an HF directory and, for each tensor name, the file that holds it.
fn hf_weight_files(dir: &Path) -> Result<(Vec<PathBuf>, HashMap<String, PathBuf>), ModelError> {
    let index_path = dir.join(HF_INDEX);
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path).map_err(|e| io_err(&index_path, e))?;
        let index: Value = serde_json::from_str(&text).map_err(|e| ckpt_err(format!("{}: invalid JSON: {e}", index_path.display())))?;
        let map = index.get("weight_map").and_then(Value::as_object).ok_or_else(|| ckpt_err(format!("{}: no `weight_map` object", index_path.display())))?;
        let mut files: Vec<PathBuf> = vec![];
        let mut owner = HashMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| ckpt_err(format!("{}: weight_map[{name}] is not a string", index_path.display())))?;
            // A plain file name inside the checkpoint directory, and a regular file: an index
            // must not lead the loader elsewhere (`../x`, `/etc/passwd`) or into a FIFO.
            let plain = Path::new(file).components().count() == 1 && matches!(Path::new(file).components().next(), Some(std::path::Component::Normal(_)));
            if !plain {
                return Err(ckpt_err(format!(
                    "{}: weight_map[{name}] = `{file}`: shard names must be plain file names in the checkpoint directory",
                    index_path.display()
                )));
            }
            let path = dir.join(file);
            if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                return Err(ckpt_err(format!("{}: weight_map[{name}] = `{file}`: {} is not a regular file", index_path.display(), path.display())));
            }
            if !files.contains(&path) {
                files.push(path.clone());
            }
            owner.insert(name.clone(), path);
        }
        Ok((files, owner))
    } else {
        let single = dir.join(NATIVE_WEIGHTS);
        if !single.is_file() {
            return Err(ckpt_err(format!("{}: no {NATIVE_WEIGHTS} and no {HF_INDEX}", dir.display())));
        }
        Ok((vec![single], HashMap::new()))
    }
}

/// The model config of a Hugging Face directory (its `config.json`).
pub fn hf_config(dir: &Path) -> Result<LlamaConfig, ModelError> {
    let config_path = dir.join(HF_CONFIG);
    let text = std::fs::read_to_string(&config_path).map_err(|e| io_err(&config_path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config(format!("{}: invalid JSON: {e}", config_path.display())))?;
    config_from_hf(&json, &config_path.display().to_string())
}

/// Loads a Hugging Face `LlamaForCausalLM` directory (safetensors, single or sharded).
pub fn load_hf(dir: &Path, device: &Device) -> Result<(LlamaConfig, Llama), ModelError> {
    let config_path = dir.join(HF_CONFIG);
    let config = hf_config(dir)?;
    config.check_host_memory(device, &config_path.display().to_string())?;
    let (files, _) = hf_weight_files(dir)?;
    let mut model = config.init_lazy(device);
    let layout = hf_layout(&config);
    let mut expected: BTreeMap<&str, (&Vec<usize>, Kind)> = layout.iter().map(|(n, s, k)| (n.as_str(), (s, *k))).collect();
    for file in &files {
        let handle = std::fs::File::open(file).map_err(|e| io_err(file, e))?;
        // SAFETY: the file is opened read-only and not modified while mapped.
        let mmap = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| io_err(file, e))?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| ckpt_err(format!("{}: not a valid safetensors file: {e}", file.display())))?;
        for (name, view) in st.tensors() {
            if name.ends_with("rotary_emb.inv_freq") {
                continue; // a buffer older transformers versions saved; we recompute it
            }
            if name == "lm_head.weight" && config.tie_word_embeddings {
                continue; // some tied checkpoints still store the shared matrix twice
            }
            let Some((shape, kind)) = expected.remove(name.as_str()) else {
                return Err(ckpt_err(format!("{}: unexpected tensor `{name}` for this config", file.display())));
            };
            if view.shape() != shape.as_slice() {
                return Err(ckpt_err(format!("{}: tensor `{name}` has shape {:?}, but config.json implies {:?}", file.display(), view.shape(), shape)));
            }
            let data = view_to_f32(&view, &name, file)?;
            refuse_non_finite(&data, &name, &file.display().to_string())?;
            set_from_hf(&mut model, &config, &name, shape, kind, data, device);
        }
    }
    if let Some(missing) = expected.keys().next() {
        return Err(ckpt_err(format!("{}: tensor `{missing}` is missing ({} missing in all)", dir.display(), expected.len())));
    }
    Ok((config, model))
}

fn set_from_hf(model: &mut Llama, config: &LlamaConfig, name: &str, shape: &[usize], kind: Kind, data: Vec<f32>, device: &Device) {
    let target = param_for(model, name).expect("hf_layout and param_for agree");
    match (target, kind) {
        (Param2or1::One(p), _) => Llama::set(p, Tensor::from_data(TensorData::new(data, [shape[0]]), device)),
        (Param2or1::Two(p), Kind::Plain) => Llama::set(p, Tensor::from_data(TensorData::new(data, [shape[0], shape[1]]), device)),
        (Param2or1::Two(p), Kind::Linear | Kind::RopeLinear(_)) => {
            let (rows, cols) = (shape[0], shape[1]);
            let data = match kind {
                Kind::RopeLinear(heads) => permute_rope_rows(&data, heads, config.head_dim(), cols, false),
                _ => data,
            };
            Llama::set(p, Tensor::from_data(TensorData::new(transpose(&data, rows, cols), [cols, rows]), device));
        }
    }
}

fn tensor_to_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().try_to_vec::<f32>().expect("f32 after cast")
}

/// The order of the rows of a q or k weight: Meta's interleaved RoPE pairs (ours, and
/// GGUF's) or Hugging Face's rotate-half halves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeRows {
    Meta,
    HuggingFace,
}

/// Tensor `name` of `model` (an entry of [`hf_layout`]) in HF shape (`[d_out, d_in]`,
/// row-major) as f32, with q and k rows in the order `rope`.
pub(crate) fn export_tensor(model: &mut Llama, config: &LlamaConfig, name: &str, shape: &[usize], kind: Kind, rope: RopeRows) -> Vec<f32> {
    match param_for(model, name).expect("layout matches module") {
        Param2or1::One(p) => tensor_to_f32(p.val()),
        Param2or1::Two(p) => {
            let raw = tensor_to_f32(p.val());
            match kind {
                Kind::Plain => raw,
                Kind::Linear | Kind::RopeLinear(_) => {
                    let (rows, cols) = (shape[0], shape[1]);
                    let t = transpose(&raw, cols, rows);
                    match kind {
                        Kind::RopeLinear(heads) if rope == RopeRows::HuggingFace => permute_rope_rows(&t, heads, config.head_dim(), cols, true),
                        _ => t,
                    }
                }
            }
        }
    }
}

/// Sets our parameter that holds the Hugging Face tensor `name` (an entry of [`hf_layout`], q and
/// k rows in the order `rope`).
pub(crate) fn set_tensor(model: &mut Llama, config: &LlamaConfig, name: &str, shape: &[usize], kind: Kind, data: Vec<f32>, rope: RopeRows, device: &Device) {
    let kind = match kind {
        Kind::RopeLinear(_) if rope == RopeRows::Meta => Kind::Linear,
        k => k,
    };
    set_from_hf(model, config, name, shape, kind, data, device);
}

/// Writes `model` as a Hugging Face `LlamaForCausalLM` directory (f32). Weights above
/// `max_shard_bytes` are split into `model-0000x-of-0000y.safetensors` with an index.
pub fn save_hf(model: &Llama, config: &LlamaConfig, dir: &Path, max_shard_bytes: u64) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let mut model = model.clone();
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = hf_layout(config)
        .into_iter()
        .map(|(name, shape, kind)| {
            let data = export_tensor(&mut model, config, &name, &shape, kind, RopeRows::HuggingFace);
            (name, shape, data)
        })
        .collect();
    // Group into shards in layout order.
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0u64;
    for (i, (_, _, data)) in tensors.iter().enumerate() {
        let bytes = 4 * data.len() as u64;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().unwrap().push(i);
        size += bytes;
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let total: u64 = tensors.iter().map(|t| 4 * t.2.len() as u64).sum();
    for (s, members) in shards.iter().enumerate() {
        let file_name = if n == 1 { NATIVE_WEIGHTS.to_string() } else { format!("model-{:05}-of-{:05}.safetensors", s + 1, n) };
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = members
            .iter()
            .map(|&i| {
                let (name, shape, data) = &tensors[i];
                (name.clone(), shape.clone(), data.iter().flat_map(|x| x.to_le_bytes()).collect())
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> =
            bytes.iter().map(|(name, shape, b)| (name.clone(), TensorView::new(Dtype::F32, shape.clone(), b).expect("sizes agree"))).collect();
        for (name, _) in &views {
            weight_map.insert(name.clone(), Value::String(file_name.clone()));
        }
        write_safetensors(views, metadata.clone(), &dir.join(&file_name))?;
    }
    if n > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write_atomic(&dir.join(HF_INDEX), serde_json::to_string_pretty(&index).unwrap().as_bytes())?;
    } else {
        let stale = dir.join(HF_INDEX);
        if stale.exists() {
            std::fs::remove_file(&stale).map_err(|e| io_err(&stale, e))?;
        }
    }
    let cfg = serde_json::to_string_pretty(&config_to_hf(config)).unwrap();
    Ok(write_atomic(&dir.join(HF_CONFIG), cfg.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_permutation_round_trips_and_matches_transformers() {
        // One head of width 4, d_in 1: Meta rows [a0 b0 a1 b1] (pairs interleaved) are HF rows
        // [a0 a1 b0 b1] (first halves, then second halves).
        let meta = [10.0, 11.0, 20.0, 21.0];
        let hf = permute_rope_rows(&meta, 1, 4, 1, true);
        assert_eq!(hf, vec![10.0, 20.0, 11.0, 21.0]);
        assert_eq!(permute_rope_rows(&hf, 1, 4, 1, false), meta.to_vec());
        let w: Vec<f32> = (0..2 * 8 * 3).map(|x| x as f32).collect();
        let back = permute_rope_rows(&permute_rope_rows(&w, 2, 8, 3, true), 2, 8, 3, false);
        assert_eq!(back, w);
    }

    #[test]
    fn hf_config_round_trips() {
        let c = LlamaConfig::new(64, 2, 4).with_n_kv_heads(2).with_vocab_size(100).with_multiple_of(32);
        let back = config_from_hf(&config_to_hf(&c), "x").unwrap();
        assert_eq!(back.num_params(), c.num_params());
        assert_eq!(back.ffn_hidden(), c.ffn_hidden());
        assert_eq!(back.n_kv_heads(), 2);
    }

    #[test]
    fn hf_config_rejects_what_we_do_not_implement() {
        let mut j = config_to_hf(&LlamaConfig::new(64, 2, 4));
        j["hidden_act"] = json!("gelu");
        assert!(config_from_hf(&j, "c.json").unwrap_err().to_string().contains("hidden_act"));
        let mut j = config_to_hf(&LlamaConfig::new(64, 2, 4));
        j.as_object_mut().unwrap().remove("hidden_size");
        assert!(config_from_hf(&j, "c.json").unwrap_err().to_string().contains("hidden_size"));
    }
}
