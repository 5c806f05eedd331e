//! The tokenizer in a GGUF file, both ways, for llama.cpp's two `tokenizer.ggml.model` kinds that
//! Llama-architecture models use:
//!
//! - `llama`: SentencePiece-style BPE (Llama 1/2, Mistral). Pieces mark a word start with `▁`,
//!   bytes fall back to `<0x00>`..`<0xFF>`, and each piece has a score: llama.cpp merges the
//!   adjacent pair whose merged piece scores highest.
//! - `gpt2`: byte-level BPE (SmolLM, Llama 3, StarCoder). Tokens are in GPT-2's byte-to-unicode
//!   alphabet, the merges are listed in rank order, and the text is first split by the regular
//!   expressions llama.cpp names by `tokenizer.ggml.pre`.
//!
//! Reading gives a `tokenizer.json` and a `tokenizer_config.json`, so that every stage reads a
//! model that came as GGUF as it reads a Hugging Face checkpoint. A file we wrote also carries
//! the original `tokenizer.json` whole (`tokenizer.huggingface.json`), which wins.

use std::collections::HashMap;

use serde_json::{Value as Json, json};

use super::Value;
use crate::ModelError;
use crate::files::ckpt_err;

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The longest `llama`-kind piece that merges are derived for (SentencePiece's own limit is 16
/// characters, at most 64 bytes).
const MAX_MERGED_PIECE_BYTES: usize = 256;

/// Llama 3's pre-tokenizer expression (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3`, written with
/// the case-insensitive group as `tokenizers` has it).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` names we read and write, the `tokenizers` pre-tokenizer each is, and
/// whether a word found whole in the vocabulary skips the merges (`ignore_merges`, Llama 3). The
/// first name of a row is the one written. Each row is llama.cpp's expression list for it:
/// GPT-2's expression alone; single digits, then GPT-2's (smollm, starcoder and refact share one
/// case in `llama-vocab.cpp`); Llama 3's.
fn known_pre_tokenizers() -> Vec<(&'static [&'static str], Json, bool)> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    vec![
        (&["gpt-2", "gpt2"], byte_level(true), false),
        (
            &["smollm", "starcoder", "refact"],
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        (
            &["llama-bpe", "llama3", "llama-v3"],
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]}),
            true,
        ),
    ]
}

/// A pre-tokenizer's JSON without the fields that change only offsets (`trim_offsets`), for
/// comparing a checkpoint's with the known ones.
fn without_offset_fields(v: &Json) -> Json {
    match v {
        Json::Object(m) => Json::Object(m.iter().filter(|(k, _)| *k != "trim_offsets").map(|(k, v)| (k.clone(), without_offset_fields(v))).collect()),
        Json::Array(a) => Json::Array(a.iter().map(without_offset_fields).collect()),
        other => other.clone(),
    }
}

/// The tokenizer as GGUF needs it: the `tokenizer.json` text, the BOS and EOS tokens, the chat
/// template, and whether llama.cpp puts BOS before a prompt (`None`: the kind's usual choice,
/// yes for `llama`, no for `gpt2`). `llama convert` takes them from `llama_data::Tokenizer`,
/// which reads the checkpoint's tokenizer files.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    pub json: String,
    pub bos: String,
    pub eos: String,
    pub chat_template: String,
    pub add_bos: Option<bool>,
}

impl GgufTokenizer {
    /// The `tokenizer.*` metadata: the `llama` kind for a SentencePiece-style tokenizer (`▁`
    /// pieces and byte fallback), the `gpt2` kind for byte-level BPE with a pre-tokenizer that
    /// llama.cpp knows by name.
    pub(crate) fn metadata(&self, vocab_size: usize, origin: &str) -> Result<Vec<(String, Value)>, ModelError> {
        let err = |m: String| ckpt_err(format!("{origin}: {m}"));
        let tok = tokenizers::Tokenizer::from_bytes(self.json.as_bytes()).map_err(|e| err(format!("cannot load tokenizer.json: {e}")))?;
        let raw: Json = serde_json::from_str(&self.json).map_err(|e| err(format!("tokenizer.json: {e}")))?;
        let vocab = tok.get_vocab(true);
        let id_of = |t: &str| vocab.get(t).copied().ok_or_else(|| err(format!("the tokenizer has no `{t}` token")));
        let (bos, eos) = (id_of(&self.bos)?, id_of(&self.eos)?);
        let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
        for (t, &id) in &vocab {
            let slot = tokens.get_mut(id as usize).ok_or_else(|| err(format!("token `{t}` has id {id}, outside the model's vocabulary of {vocab_size}")))?;
            *slot = Some(t.clone());
        }
        let added: HashMap<u32, bool> = tok.get_added_tokens_decoder().into_iter().map(|(id, t)| (id, t.special)).collect();
        let sentencepiece = vocab.keys().any(|t| t.starts_with('▁')) && vocab.contains_key("<0x00>");
        let (kind, mut meta) = if sentencepiece {
            ("llama", sentencepiece_metadata(&raw, &tokens, &vocab, &added))
        } else if raw["model"]["type"] == "BPE" {
            ("gpt2", byte_level_metadata(&raw, &tokens, &added).map_err(err)?)
        } else {
            return Err(err(format!(
                "GGUF export writes llama.cpp's `llama` (SentencePiece-style: `▁` pieces, byte fallback) or `gpt2` (byte-level BPE) tokenizers; this one is neither (model type {})",
                raw["model"]["type"]
            )));
        };
        let add_bos = self.add_bos.unwrap_or(kind == "llama");
        meta.extend([
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)),
            ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
            ("tokenizer.chat_template".into(), Value::Str(self.chat_template.clone())),
            ("tokenizer.huggingface.json".into(), Value::Str(self.json.clone())),
        ]);
        if let Some(&unk) = vocab.get("<unk>") {
            meta.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(unk)));
        }
        Ok(meta)
    }
}

/// `tokens` by id; an id the tokenizer does not use is written as `[PADn]` (llama.cpp needs one
/// entry per row of the embedding).
fn token_list(tokens: &[Option<String>]) -> Value {
    Value::Array(tokens.iter().enumerate().map(|(i, t)| Value::Str(t.clone().unwrap_or_else(|| format!("[PAD{i}]")))).collect())
}

/// The `llama` kind: pieces, a score per piece from the BPE merge order (SentencePiece merges the
/// adjacent pair whose piece scores highest), and token types.
fn sentencepiece_metadata(raw: &Json, tokens: &[Option<String>], vocab: &HashMap<String, u32>, added: &HashMap<u32, bool>) -> Vec<(String, Value)> {
    let mut scores = vec![0f32; tokens.len()];
    for (rank, merge) in raw["model"]["merges"].as_array().into_iter().flatten().enumerate() {
        let merged = match merge {
            Json::String(s) => s.split_once(' ').map(|(a, b)| format!("{a}{b}")),
            Json::Array(p) => Some(p.iter().filter_map(|x| x.as_str()).collect()),
            _ => None,
        };
        if let Some(&id) = merged.as_ref().and_then(|m| vocab.get(m)) {
            scores[id as usize] = -(rank as f32) - 1.0;
        }
    }
    let unk = vocab.get("<unk>").copied();
    let types = (0..tokens.len() as u32)
        .map(|id| {
            let text = tokens[id as usize].as_deref().unwrap_or("");
            Value::I32(if Some(id) == unk {
                UNKNOWN
            } else if tokens[id as usize].is_none() {
                UNUSED
            } else if added.get(&id) == Some(&true) {
                CONTROL
            } else if text.len() == 6 && text.starts_with("<0x") && text.ends_with('>') {
                BYTE
            } else {
                NORMAL
            })
        })
        .collect();
    vec![
        ("tokenizer.ggml.model".into(), Value::Str("llama".into())),
        ("tokenizer.ggml.tokens".into(), token_list(tokens)),
        ("tokenizer.ggml.scores".into(), Value::Array(scores.into_iter().map(Value::F32).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
    ]
}

/// The `gpt2` kind: tokens, merges as `"a b"`, token types (added tokens are control when
/// special, user-defined otherwise), and the `pre` llama.cpp knows the pre-tokenizer by.
fn byte_level_metadata(raw: &Json, tokens: &[Option<String>], added: &HashMap<u32, bool>) -> Result<Vec<(String, Value)>, String> {
    let pre = without_offset_fields(&raw["pre_tokenizer"]);
    let ignore_merges = raw["model"]["ignore_merges"].as_bool().unwrap_or(false);
    let name = known_pre_tokenizers()
        .into_iter()
        .find(|(_, known, ignores)| without_offset_fields(known) == pre && *ignores == ignore_merges)
        .map(|(names, _, _)| names[0])
        .ok_or_else(|| {
            format!(
                "byte-level BPE tokenizer with a pre-tokenizer llama.cpp has no name for here (we write `gpt-2`, `smollm` and `llama-bpe`): {} (ignore_merges {ignore_merges})",
                raw["pre_tokenizer"]
            )
        })?;
    if raw["normalizer"] != Json::Null {
        return Err(format!("byte-level BPE tokenizer with a normalizer ({}), which llama.cpp's `gpt2` kind does not apply", raw["normalizer"]));
    }
    let mut merges = vec![];
    for merge in raw["model"]["merges"].as_array().into_iter().flatten() {
        let pair = match merge {
            Json::String(s) => s.clone(),
            Json::Array(p) if p.len() == 2 => format!("{} {}", p[0].as_str().unwrap_or_default(), p[1].as_str().unwrap_or_default()),
            other => return Err(format!("merge {other} is not a pair")),
        };
        merges.push(Value::Str(pair));
    }
    let types = (0..tokens.len() as u32)
        .map(|id| {
            Value::I32(match (tokens[id as usize].is_some(), added.get(&id)) {
                (false, _) => UNUSED,
                (true, Some(true)) => CONTROL,
                (true, Some(false)) => USER_DEFINED,
                (true, None) => NORMAL,
            })
        })
        .collect();
    Ok(vec![
        ("tokenizer.ggml.model".into(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::Str(name.into())),
        ("tokenizer.ggml.tokens".into(), token_list(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ])
}

/// The Hugging Face tokenizer files a GGUF file's metadata describes.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    /// `tokenizer.json`.
    pub tokenizer: String,
    /// `tokenizer_config.json`: BOS, EOS, unknown and padding tokens, whether BOS is added, and
    /// the chat template.
    pub config: String,
}

/// The tokenizer files of a GGUF file's metadata, or `None` when it has no tokenizer. The
/// embedded `tokenizer.huggingface.json` wins; otherwise one is built from `tokenizer.ggml.*`.
/// Every one is parsed here, so a broken file is refused on reading, not at its next use.
pub fn tokenizer_files(meta: &[(String, Value)], origin: &str) -> Result<Option<TokenizerFiles>, ModelError> {
    let err = |m: String| ckpt_err(format!("{origin}: {m}"));
    let get = |key: &str| meta.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let model = get("tokenizer.ggml.model").map(|v| v.as_str().ok_or_else(|| err("metadata `tokenizer.ggml.model` is not a string".into()))).transpose()?;
    let embedded = get("tokenizer.huggingface.json").and_then(Value::as_str);
    if model.is_none() && embedded.is_none() {
        return Ok(None);
    }
    let strings = |key: &str| -> Result<Vec<String>, ModelError> {
        match get(key) {
            Some(Value::Array(items)) => {
                items.iter().map(|v| v.as_str().map(String::from).ok_or_else(|| err(format!("metadata `{key}` holds a non-string")))).collect()
            }
            Some(_) => Err(err(format!("metadata `{key}` is not an array"))),
            None => Err(err(format!("metadata `{key}` is missing"))),
        }
    };
    let tokens = if model.is_some() { strings("tokenizer.ggml.tokens")? } else { vec![] };
    let number_array = |key: &str, n: usize| -> Result<Option<Vec<f64>>, ModelError> {
        let Some(v) = get(key) else { return Ok(None) };
        let Value::Array(items) = v else { return Err(err(format!("metadata `{key}` is not an array"))) };
        if items.len() != n {
            return Err(err(format!("metadata `{key}` has {} entries for {n} tokens", items.len())));
        }
        items.iter().map(|v| v.as_f64().ok_or_else(|| err(format!("metadata `{key}` holds a non-number")))).collect::<Result<Vec<_>, _>>().map(Some)
    };
    let types: Vec<i32> =
        number_array("tokenizer.ggml.token_type", tokens.len())?.map_or_else(|| vec![NORMAL; tokens.len()], |t| t.into_iter().map(|x| x as i32).collect());
    let flag = |key: &str| get(key).and_then(|v| if let Value::Bool(b) = v { Some(*b) } else { None });
    let token_of = |key: &str| -> Result<Option<String>, ModelError> {
        let Some(v) = get(key) else { return Ok(None) };
        let id = v.as_u64().ok_or_else(|| err(format!("metadata `{key}` is not a token id")))?;
        if model.is_none() {
            return Ok(None);
        }
        tokens.get(id as usize).cloned().map(Some).ok_or_else(|| err(format!("metadata `{key}` is {id}, outside the {} tokens", tokens.len())))
    };
    let tokenizer = match (embedded, model) {
        (Some(json), _) => json.to_string(),
        (None, Some("llama")) => {
            let scores = number_array("tokenizer.ggml.scores", tokens.len())?.ok_or_else(|| err("metadata `tokenizer.ggml.scores` is missing".into()))?;
            let unk = token_of("tokenizer.ggml.unknown_token_id")?;
            sentencepiece_json(&tokens, &scores, &types, flag("tokenizer.ggml.add_space_prefix").unwrap_or(true), unk.as_deref())
        }
        (None, Some("gpt2")) => {
            let pre = get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
            let known = known_pre_tokenizers();
            let (_, pre_tokenizer, ignore_merges) = known.iter().find(|(names, _, _)| names.contains(&pre)).ok_or_else(|| {
                let names: Vec<&str> = known.iter().flat_map(|(n, _, _)| n.iter().copied()).collect();
                err(format!("tokenizer.ggml.pre `{pre}` is not one this reader knows ({}); its pre-tokenizer would be a guess", names.join(", ")))
            })?;
            byte_level_json(&tokens, &types, &strings("tokenizer.ggml.merges")?, pre_tokenizer, *ignore_merges).map_err(err)?
        }
        (None, Some(other)) => return Err(err(format!("tokenizer.ggml.model `{other}` is not supported (this reader takes `llama` and `gpt2`)"))),
        (None, None) => unreachable!("returned above"),
    };
    let source = if embedded.is_some() { "metadata `tokenizer.huggingface.json`" } else { "the tokenizer built from its `tokenizer.ggml.*` metadata" };
    tokenizers::Tokenizer::from_bytes(tokenizer.as_bytes()).map_err(|e| err(format!("{source} is not a valid tokenizer.json: {e}")))?;
    let mut config = serde_json::Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(token) = token_of(key)? {
            config.insert(name.into(), json!(token));
        }
    }
    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(model != Some("gpt2"));
    config.insert("add_bos_token".into(), json!(add_bos));
    config.insert("add_eos_token".into(), json!(flag("tokenizer.ggml.add_eos_token").unwrap_or(false)));
    if let Some(template) = get("tokenizer.chat_template") {
        let template = template.as_str().ok_or_else(|| err("metadata `tokenizer.chat_template` is not a string".into()))?;
        config.insert("chat_template".into(), json!(template));
    }
    let config = serde_json::to_string_pretty(&Json::Object(config)).expect("JSON values serialize");
    Ok(Some(TokenizerFiles { tokenizer, config }))
}

/// The token -> id map of `tokens` (the first id of a repeated token), and the added tokens:
/// control and unknown tokens as special, user-defined ones as plain added tokens.
fn vocab_and_added(tokens: &[String], types: &[i32]) -> (serde_json::Map<String, Json>, Vec<Json>) {
    let mut vocab = serde_json::Map::new();
    let mut added = vec![];
    for (id, (token, &ty)) in tokens.iter().zip(types).enumerate() {
        if !vocab.contains_key(token) {
            vocab.insert(token.clone(), json!(id));
        }
        if matches!(ty, CONTROL | UNKNOWN | USER_DEFINED) {
            added.push(
                json!({"id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": ty != USER_DEFINED}),
            );
        }
    }
    (vocab, added)
}

/// A `tokenizer.json` that tokenizes as llama.cpp's SentencePiece-style tokenizer: spaces become
/// `▁` (one put first when `add_space_prefix`), the whole text is merged pair by pair, highest
/// score first, and what no piece covers falls back to bytes. The merges are derived from the
/// scores as `transformers` derives them from a SentencePiece model: every split of a normal
/// piece into two pieces, ranked by the piece's score.
fn sentencepiece_json(tokens: &[String], scores: &[f64], types: &[i32], add_space_prefix: bool, unk: Option<&str>) -> String {
    let (vocab, added) = vocab_and_added(tokens, types);
    let id: HashMap<&str, usize> = tokens.iter().enumerate().rev().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = vec![];
    for (piece_id, piece) in tokens.iter().enumerate() {
        // Each split hashes both halves: quadratic in a piece's length, so a stranger's file with
        // a megabyte-long piece must not reach here (real pieces are a few dozen bytes).
        if types[piece_id] != NORMAL || id[piece.as_str()] != piece_id || piece.len() > MAX_MERGED_PIECE_BYTES {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (id.get(&piece[..at]), id.get(&piece[at..])) {
                merges.push((scores[piece_id], piece_id, l, r));
            }
        }
    }
    // Highest score first; within a score, the order `transformers` gives (piece, then parts).
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3))));
    let merges: Vec<Json> = merges.iter().map(|&(_, _, l, r)| json!([tokens[l], tokens[r]])).collect();
    let mut normalizers = vec![];
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    let mut decoders = vec![json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}), json!({"type": "ByteFallback"}), json!({"type": "Fuse"})];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges},
    })
    .to_string()
}

/// A `tokenizer.json` of byte-level BPE: the pre-tokenizer `pre` names, the merges in their rank
/// order (each `"a b"` split at its first space after the first byte, as llama.cpp splits it).
fn byte_level_json(tokens: &[String], types: &[i32], merges: &[String], pre_tokenizer: &Json, ignore_merges: bool) -> Result<String, String> {
    let (vocab, added) = vocab_and_added(tokens, types);
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.char_indices().skip(1).find(|&(_, c)| c == ' ') {
            Some((at, _)) => Ok(json!([&m[..at], &m[at + 1..]])),
            None => Err(format!("merge {i} `{m}` is not two tokens separated by a space")),
        })
        .collect::<Result<Vec<Json>, String>>()?;
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": pre_tokenizer, "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder};

    use super::*;

    /// Strings a tokenizer gets wrong first: whitespace runs, digits, punctuation, accents,
    /// emoji, code, special tokens inside text.
    const STRINGS: [&str; 30] = [
        "Hello world",
        " leading space",
        "two  spaces and   three",
        "tabs\tand\nnewlines\n\n\nruns",
        "trailing spaces   ",
        "1234567890",
        "3.14159 and 2,718,281",
        "year 1999, 2024; 10:45pm",
        "Don't! Won't? I'll've.",
        "He said: \"quote\" (parens) [brackets] {braces}",
        "naïve café résumé Ångström",
        "Straße, Ærø, Łódź",
        "日本語のテキスト",
        "Привет, мир",
        "emoji 😀🎉 and 👩‍👩‍👧",
        "fn main() { println!(\"{}\", x + 1); }",
        "def f(x):\n    return x ** 2  # square",
        "not at <s>the start</s>",
        "a<|im_start|>b<|im_end|>c",
        "CamelCaseIdentifiersLikeThis",
        "snake_case_and-kebab-case",
        "https://example.com/path?query=1&b=2",
        "email@example.org",
        "$100.00 + 15% = €115",
        "ALL CAPS SENTENCE",
        "'s 't 're 've 'm 'll 'd",
        "\u{a0}non-breaking\u{2003}em space",
        "mixed 12abc34 digits",
        "",
        "    ",
    ];

    fn shipped() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/tokenizer.json")).unwrap()
    }

    /// A byte-level BPE tokenizer with `pre` as its pre-tokenizer (SmolLM's, GPT-2's or Llama
    /// 3's), trained on the shipped corpus, with two special tokens and one plain added token.
    fn byte_level(pre: &Json, ignore_merges: bool) -> String {
        let corpus = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/corpus/brown.jsonl")).unwrap();
        let texts: Vec<String> = corpus.lines().take(300).map(|l| serde_json::from_str::<Json>(l).unwrap()["text"].as_str().unwrap().to_string()).collect();
        let specials = vec![AddedToken::from("<|endoftext|>", true), AddedToken::from("<|im_start|>", true), AddedToken::from("<|im_end|>", true)];
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(1200)
            .min_frequency(2)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .show_progress(false)
            .build();
        let pre: PreTokenizerWrapper = serde_json::from_value(pre.clone()).unwrap();
        let mut trainable = TokenizerBuilder::new()
            .with_model(BPE::builder().ignore_merges(ignore_merges).build().unwrap())
            .with_normalizer(None::<NormalizerWrapper>)
            .with_pre_tokenizer(Some(pre))
            .with_post_processor(None::<PostProcessorWrapper>)
            .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())))
            .build()
            .unwrap();
        trainable.train(&mut trainer, texts.iter()).unwrap();
        let mut tok: tokenizers::Tokenizer = trainable.into();
        tok.add_tokens([AddedToken::from("<tool>", false)]).unwrap();
        tok.to_string(false).unwrap()
    }

    /// `json` exported as GGUF metadata without the embedded copy, then read back.
    fn through_ggml_metadata(json: &str, bos: &str, eos: &str) -> (TokenizerFiles, Vec<(String, Value)>) {
        let tok = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
        let gguf = GgufTokenizer { json: json.into(), bos: bos.into(), eos: eos.into(), chat_template: "{{ messages }}".into(), add_bos: None };
        let mut meta = gguf.metadata(tok.get_vocab_size(true), "test").unwrap();
        meta.retain(|(k, _)| k != "tokenizer.huggingface.json");
        (tokenizer_files(&meta, "test.gguf").unwrap().unwrap(), meta)
    }

    /// Asserts that `rebuilt` tokenizes and decodes the test strings as `original` does, except
    /// that a string starting with whitespace gets one more `▁` piece first when
    /// `space_prefix_always` (see the SentencePiece test).
    fn assert_tokenize_alike(original: &str, rebuilt: &str, space_prefix_always: bool) {
        let (a, b) = (tokenizers::Tokenizer::from_bytes(original.as_bytes()).unwrap(), tokenizers::Tokenizer::from_bytes(rebuilt.as_bytes()).unwrap());
        let mut differ = vec![];
        for s in STRINGS {
            let (ea, eb) = (a.encode(s, false).unwrap(), b.encode(s, false).unwrap());
            let (mut want, mut decoded_alike) = (ea.get_ids().to_vec(), true);
            if space_prefix_always && s.starts_with(' ') {
                want.insert(0, a.token_to_id("▁").unwrap());
                decoded_alike = false;
            }
            if space_prefix_always && s.contains("<s>") {
                continue; // a text after a special token is a text start too: asserted apart
            }
            if want != eb.get_ids() || (decoded_alike && a.decode(ea.get_ids(), false).unwrap() != b.decode(eb.get_ids(), false).unwrap()) {
                differ.push(format!("{s:?}: {:?} vs {:?}", ea.get_tokens(), eb.get_tokens()));
            }
        }
        assert!(differ.is_empty(), "{}", differ.join("\n"));
    }

    #[test]
    fn a_sentencepiece_tokenizer_comes_back_from_the_llama_kind_metadata() {
        let json = shipped();
        let (files, meta) = through_ggml_metadata(&json, "<s>", "</s>");
        assert_eq!(meta.iter().find(|(k, _)| k == "tokenizer.ggml.model").unwrap().1, Value::Str("llama".into()));
        // llama.cpp puts a space before every text (and after a special token), as
        // SentencePiece and Llama 2's own tokenizer do; the shipped tokenizer puts `▁` only
        // before a first word that has none. The rebuilt tokenizer is llama.cpp's.
        assert_tokenize_alike(&json, &files.tokenizer, true);
        let rebuilt = tokenizers::Tokenizer::from_bytes(files.tokenizer.as_bytes()).unwrap();
        assert_eq!(rebuilt.encode("<s>not", false).unwrap().get_tokens(), ["<s>", "▁not"]);
        let config: Json = serde_json::from_str(&files.config).unwrap();
        assert_eq!((config["bos_token"].as_str(), config["eos_token"].as_str(), config["unk_token"].as_str()), (Some("<s>"), Some("</s>"), Some("<unk>")));
        assert_eq!((config["add_bos_token"].as_bool(), config["chat_template"].as_str()), (Some(true), Some("{{ messages }}")));
    }

    #[test]
    fn byte_level_tokenizers_come_back_from_the_gpt2_kind_metadata_for_each_known_pre() {
        for (names, pre, ignore_merges) in known_pre_tokenizers() {
            let json = byte_level(&pre, ignore_merges);
            let (files, meta) = through_ggml_metadata(&json, "<|im_start|>", "<|im_end|>");
            let get = |key: &str| meta.iter().find(|(k, _)| k == key).unwrap().1.clone();
            assert_eq!((get("tokenizer.ggml.model"), get("tokenizer.ggml.pre")), (Value::Str("gpt2".into()), Value::Str(names[0].into())));
            let Value::Array(types) = get("tokenizer.ggml.token_type") else { panic!() };
            let count = |ty: i32| types.iter().filter(|t| **t == Value::I32(ty)).count();
            assert_eq!((count(CONTROL), count(USER_DEFINED)), (3, 1), "{names:?}");
            assert_tokenize_alike(&json, &files.tokenizer, false);
            let config: Json = serde_json::from_str(&files.config).unwrap();
            assert_eq!((config["bos_token"].as_str(), config["add_bos_token"].as_bool()), (Some("<|im_start|>"), Some(false)));
        }
    }

    #[test]
    fn unknown_kinds_and_pre_tokenizers_are_named_not_guessed() {
        let (_, meta) = through_ggml_metadata(&byte_level(&known_pre_tokenizers()[1].1, false), "<|im_start|>", "<|im_end|>");
        let with = |key: &str, value: Value| {
            let mut m = meta.clone();
            m.retain(|(k, _)| k != key);
            m.push((key.into(), value));
            tokenizer_files(&m, "x.gguf").unwrap_err().to_string()
        };
        let e = with("tokenizer.ggml.pre", Value::Str("deepseek-coder".into()));
        assert!(e.contains("x.gguf") && e.contains("`deepseek-coder`") && e.contains("smollm"), "{e}");
        let e = with("tokenizer.ggml.model", Value::Str("bert".into()));
        assert!(e.contains("`bert`") && e.contains("`gpt2`"), "{e}");
        let e = with("tokenizer.ggml.merges", Value::Array(vec![Value::Str("nospace".into())]));
        assert!(e.contains("`nospace`"), "{e}");
        let e = with("tokenizer.ggml.bos_token_id", Value::U32(1 << 30));
        assert!(e.contains("tokenizer.ggml.bos_token_id"), "{e}");
        let e = with("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1)]));
        assert!(e.contains("1 entries"), "{e}");
        // Exporting a byte-level tokenizer whose pre-tokenizer llama.cpp has no name for.
        let odd = byte_level(&json!({"type": "Whitespace"}), false);
        let gguf = GgufTokenizer { json: odd, bos: "<|im_start|>".into(), eos: "<|im_end|>".into(), chat_template: String::new(), add_bos: None };
        let e = gguf.metadata(1201, "out.gguf").unwrap_err().to_string();
        assert!(e.contains("out.gguf") && e.contains("Whitespace"), "{e}");
    }
}
