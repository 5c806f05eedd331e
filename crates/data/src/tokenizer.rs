//! A Llama-style tokenizer over the Hugging Face `tokenizers` crate.
//!
//! Loads any `tokenizer.json` (the Llama 2 one included: SentencePiece-style BPE with byte
//! fallback, `<unk>`=0, `<s>`=1, `</s>`=2, no pad token), and trains one offline from text with the
//! same conventions, so the shipped default needs no download.

use std::path::Path;

use sha2::{Digest, Sha256};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, TokenizerBuilder};

use crate::DataError;

pub const UNK: &str = "<unk>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";

/// A loaded tokenizer and the ids the pipeline needs. There is deliberately no pad id: padding
/// positions are masked, never trained as EOS.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    unk: Option<u32>,
    fingerprint: String,
    /// The `chat_template` of the checkpoint's `tokenizer_config.json`, if it has one.
    /// And the file it came from.
    declared_template: Option<(String, String)>,
    /// `add_bos_token` of the checkpoint's `tokenizer_config.json`, if it says.
    declared_add_bos: Option<bool>,
    /// `declared_template` compiled, when chats render with it instead of Llama 2's template.
    chat_template: Option<crate::chat::JinjaTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// The BOS / EOS tokens a checkpoint's tokenizer files name: (token, the file naming it).
/// The largest `chat_template.jinja` read (real ones are a few KB).
const MAX_TEMPLATE_BYTES: u64 = 1 << 20;

#[derive(Debug, Default)]
struct DeclaredSpecials {
    bos: Option<(String, String)>,
    eos: Option<(String, String)>,
    /// The template and the file it came from.
    chat_template: Option<(String, String)>,
    /// `add_bos_token`: whether the tokenizer's users put BOS before a text.
    add_bos: Option<bool>,
}

impl DeclaredSpecials {
    /// From `tokenizer_config.json`, else `special_tokens_map.json`, beside `tokenizer.json`: each
    /// token a string or `{"content": ...}`; a missing or null entry names none.
    ///
    /// The chat template: `chat_template.jinja` beside them (where `transformers` 5 saves it)
    /// wins over a `chat_template` inside `tokenizer_config.json`.
    fn beside(tokenizer_json: &Path) -> Result<Self, DataError> {
        let mut out = Self::default();
        let jinja = tokenizer_json.with_file_name("chat_template.jinja");
        if jinja.is_file() {
            let read = |e: String| DataError::Tokenizer(format!("{}: {e}", jinja.display()));
            let size = std::fs::metadata(&jinja).map_err(|e| read(e.to_string()))?.len();
            if size > MAX_TEMPLATE_BYTES {
                return Err(read(format!("{size} bytes; a chat template is at most {MAX_TEMPLATE_BYTES}")));
            }
            let text = std::fs::read_to_string(&jinja).map_err(|e| read(e.to_string()))?;
            out.chat_template = Some((llama_io::without_bom(&text).to_string(), jinja.display().to_string()));
        }
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = tokenizer_json.with_file_name(file);
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            out.add_config(&text, &path.display().to_string())?;
        }
        Ok(out)
    }

    /// Takes what the config JSON `text` (from `origin`) names and `self` does not have yet.
    fn add_config(&mut self, text: &str, origin: &str) -> Result<(), DataError> {
        let json: serde_json::Value =
            serde_json::from_str(llama_io::without_bom(text)).map_err(|e| DataError::Tokenizer(format!("{origin}: invalid JSON: {e}")))?;
        let named = |key: &str| {
            let v = &json[key];
            v.as_str().or_else(|| v["content"].as_str()).map(|t| (t.to_string(), origin.to_string()))
        };
        self.bos = self.bos.take().or_else(|| named("bos_token"));
        self.eos = self.eos.take().or_else(|| named("eos_token"));
        self.add_bos = self.add_bos.or(json["add_bos_token"].as_bool());
        // A string, or (newer files) a list of {name, template}: the one named "default".
        let template = match &json["chat_template"] {
            serde_json::Value::String(t) => Some(t.clone()),
            serde_json::Value::Array(list) => list.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()).map(String::from),
            _ => None,
        };
        let template = template.map(|t| (t, origin.to_string()));
        self.chat_template = self.chat_template.take().or(template);
        Ok(())
    }
}

/// Token ids and, for each, the byte range of the text it comes from.
pub type IdsWithOffsets = (Vec<u32>, Vec<(usize, usize)>);

impl Tokenizer {
    /// Loads a `tokenizer.json`. Its BOS and EOS are the tokens that the `tokenizer_config.json`
    /// (or else `special_tokens_map.json`) beside it names as `bos_token` / `eos_token`, as
    /// Hugging Face checkpoints declare them (Llama 3 style `<|begin_of_text|>`, SmolLM's
    /// `<|im_start|>`...), and Llama 2's `<s>` / `</s>` where none is named.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer(format!("{}: cannot load tokenizer: {e}", path.display())))?;
        let declared = DeclaredSpecials::beside(path)?;
        Self::from_inner(inner, &path.display().to_string(), &declared)
    }

    /// A tokenizer from the text of its `tokenizer.json` and `tokenizer_config.json` (as
    /// `llama_model::gguf::tokenizer_files` builds them from a GGUF file's metadata); `origin`
    /// names where they came from in errors.
    pub fn from_json(tokenizer_json: &str, config_json: &str, origin: &str) -> Result<Self, DataError> {
        let inner: tokenizers::Tokenizer = tokenizer_json.parse().map_err(|e| DataError::Tokenizer(format!("{origin}: cannot load tokenizer: {e}")))?;
        let mut declared = DeclaredSpecials::default();
        declared.add_config(config_json, origin)?;
        Self::from_inner(inner, origin, &declared)
    }

    fn from_inner(inner: tokenizers::Tokenizer, origin: &str, declared: &DeclaredSpecials) -> Result<Self, DataError> {
        let special = |role: &str, name: &Option<(String, String)>, default: &str| match name {
            Some((token, file)) => inner
                .token_to_id(token)
                .ok_or_else(|| DataError::Tokenizer(format!("{origin}: {file} names `{token}` as {role}_token, but the tokenizer has no such token"))),
            None => inner.token_to_id(default).ok_or_else(|| {
                DataError::Tokenizer(format!(
                    "{origin}: no `{default}` ({}) token, and no tokenizer_config.json or special_tokens_map.json beside it names a {role}_token",
                    role.to_uppercase()
                ))
            }),
        };
        let bos = special("bos", &declared.bos, BOS)?;
        let eos = special("eos", &declared.eos, EOS)?;
        let json = inner.to_string(false).map_err(|e| DataError::Tokenizer(format!("{origin}: {e}")))?;
        let fingerprint = format!("sha256:{:x}", Sha256::digest(json.as_bytes()));
        Ok(Self {
            unk: inner.token_to_id(UNK),
            inner,
            bos,
            eos,
            fingerprint,
            declared_template: declared.chat_template.clone(),
            declared_add_bos: declared.add_bos,
            chat_template: None,
        })
    }

    /// Trains a BPE tokenizer with byte fallback on `texts`, Llama-style: `<unk>`=0, `<s>`=1,
    /// `</s>`=2, then the 256 byte tokens `<0x00>`..`<0xFF>`, then merges; words are split on
    /// spaces (marked `▁`, as SentencePiece does) and digits are split one by one.
    pub fn train<I, S>(texts: I, vocab_size: usize) -> Result<Self, DataError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab_size < 3 + 256 + 1 {
            return Err(DataError::Tokenizer(format!("vocab_size {vocab_size} is too small: it needs 259 reserved tokens and some merges")));
        }
        let bpe = BPE::builder().byte_fallback(true).unk_token(UNK.into()).build().map_err(|e| DataError::Tokenizer(e.to_string()))?;
        let mut specials: Vec<AddedToken> = [UNK, BOS, EOS].iter().map(|t| AddedToken::from(*t, true)).collect();
        specials.extend((0..=255u8).map(|b| AddedToken::from(format!("<0x{b:02X}>"), true)));
        let mut trainer = BpeTrainerBuilder::new().vocab_size(vocab_size).min_frequency(2).special_tokens(specials).show_progress(false).build();
        let pre: Vec<PreTokenizerWrapper> = vec![Metaspace::new('▁', PrependScheme::First, true).into(), Digits::new(true).into()];
        // Llama's own decoder chain: ▁ -> space, bytes, fuse, drop the one leading space.
        let replace = Replace::new("▁", " ").map_err(|e| DataError::Tokenizer(e.to_string()))?;
        let decoder: Vec<DecoderWrapper> = vec![replace.into(), ByteFallback::new().into(), Fuse::new().into(), Strip::new(' ', 1, 0).into()];
        let mut trainable = TokenizerBuilder::new()
            .with_model(bpe)
            .with_normalizer(None::<tokenizers::NormalizerWrapper>)
            .with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSequence::new(pre))))
            .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
            .with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(decoder))))
            .build()
            .map_err(|e| DataError::Tokenizer(e.to_string()))?;
        trainable.train(&mut trainer, texts).map_err(|e| DataError::Tokenizer(format!("training failed: {e}")))?;
        // Rebuild with only <unk>/<s>/</s> as special added tokens: byte tokens stay ordinary
        // vocabulary so that decoding with `skip_special_tokens` keeps byte-fallback text.
        let mut inner = tokenizers::Tokenizer::new(trainable.get_model().clone());
        inner.with_pre_tokenizer(trainable.get_pre_tokenizer().cloned());
        inner.with_decoder(trainable.get_decoder().cloned());
        inner
            .add_special_tokens([AddedToken::from(UNK, true), AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
            .map_err(|e| DataError::Tokenizer(e.to_string()))?;
        let tok = Self::from_inner(inner, "trained tokenizer", &DeclaredSpecials::default())?;
        debug_assert_eq!((tok.unk, tok.bos, tok.eos), (Some(0), 1, 2));
        Ok(tok)
    }

    /// Chats render with `choice`: Llama 2's template (what the recipe trains), or the
    /// `chat_template` of the checkpoint's `tokenizer_config.json` (an error if it has none).
    pub fn with_chat_template(mut self, choice: crate::chat::ChatTemplateChoice) -> Result<Self, DataError> {
        use crate::chat::{ChatTemplateChoice, JinjaTemplate};
        self.chat_template = match (choice, &self.declared_template) {
            (ChatTemplateChoice::Llama2, _) => None,
            (ChatTemplateChoice::Tokenizer, Some((source, origin))) => Some(JinjaTemplate::compile(source, origin)?),
            (ChatTemplateChoice::Tokenizer, None) => {
                return Err(DataError::Config(
                    "chat_template = \"tokenizer\": the tokenizer_config.json beside the tokenizer has no chat_template (use \"llama2\")".into(),
                ));
            }
        };
        Ok(self)
    }

    /// The `add_bos_token` the checkpoint's `tokenizer_config.json` declares, if any.
    pub fn declared_add_bos(&self) -> Option<bool> {
        self.declared_add_bos
    }

    /// The `chat_template` the checkpoint's `tokenizer_config.json` declares, whether or not
    /// chats render with it.
    pub fn declared_chat_template(&self) -> Option<&str> {
        self.declared_template.as_ref().map(|(source, _)| source.as_str())
    }

    /// The compiled Jinja template chats render with, when it is the tokenizer's own.
    pub fn chat_template(&self) -> Option<&crate::chat::JinjaTemplate> {
        self.chat_template.as_ref()
    }

    /// The text of token `id`.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a byte-fallback token (`<0x41>`): such tokens decode as a group (a
    /// character may take several, and a group that is not UTF-8 becomes U+FFFD throughout), so
    /// text streamed as it is generated is settled only up to the last token that is not one.
    pub fn is_byte_token(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some_and(|t| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>'))
    }

    /// How many of `tokens` no later token changes the decoding of: all up to the last that is
    /// not a byte-fallback token ([`Tokenizer::is_byte_token`]).
    pub fn settled_len(&self, tokens: &[u32]) -> usize {
        tokens.iter().rposition(|&t| !self.is_byte_token(t)).map_or(0, |i| i + 1)
    }

    /// Writes `tokenizer.json` (through a temporary file and a rename).
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let json = self.inner.to_string(true).map_err(|e| DataError::Tokenizer(e.to_string()))?;
        Ok(llama_io::write_atomic(path, json.as_bytes())?)
    }

    /// Token ids of `text`, with EOS after when asked, and BOS before when asked unless the
    /// checkpoint's `tokenizer_config.json` says `add_bos_token: false` (SmolLM, whose "BOS" is
    /// `<|im_start|>`: as `transformers` and llama.cpp, a text then starts with its own first
    /// token).
    pub fn encode(&self, text: &str, bos: bool, eos: bool) -> Result<Vec<u32>, DataError> {
        let enc = self.inner.encode(text, false).map_err(|e| DataError::Tokenizer(format!("cannot encode: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        if bos && self.declared_add_bos != Some(false) {
            ids.push(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        if eos {
            ids.push(self.eos);
        }
        Ok(ids)
    }

    /// Token ids of `text` (no BOS/EOS) and, for each, the byte range of `text` it comes from.
    pub fn encode_with_offsets(&self, text: &str) -> Result<IdsWithOffsets, DataError> {
        let enc = self.inner.encode(text, false).map_err(|e| DataError::Tokenizer(format!("cannot encode: {e}")))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Encodes many texts in parallel (rayon, inside `tokenizers`), without BOS/EOS.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, DataError> {
        let encs = self.inner.encode_batch(texts.to_vec(), false).map_err(|e| DataError::Tokenizer(format!("cannot encode: {e}")))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Text of `ids`; special tokens (BOS, EOS, unk) are dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner.decode(ids, true).map_err(|e| DataError::Tokenizer(format!("cannot decode: {e}")))
    }

    /// The text that `new` adds after `context`: decoded alone, `new` would lose its leading
    /// space (a SentencePiece-style decoder strips the text's first one).
    pub fn decode_after(&self, context: &[u32], new: &[u32]) -> Result<String, DataError> {
        let (head, whole) = (self.decode(context)?, self.decode(&[context, new].concat())?);
        match whole.strip_prefix(head.as_str()) {
            Some(tail) => Ok(tail.to_string()),
            None => self.decode(new),
        }
    }

    /// The longest token's text, in bytes (an upper bound on the text one token covers).
    pub fn max_token_bytes(&self) -> usize {
        self.inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1)
    }

    /// Number of ids, added tokens included: every id the tokenizer can produce is below it.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }
    pub fn eos_id(&self) -> u32 {
        self.eos
    }
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }
    /// Llama 2 has no pad token, and neither do we: pads are masked, not aliased to EOS.
    pub fn pad_id(&self) -> Option<u32> {
        None
    }

    /// `sha256:` of the canonical JSON; shard manifests record it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let base = "The quick brown fox jumps over the lazy dog. In 1961 the jury said 42 things about the election.";
        (0..50).map(|i| format!("{base} Sentence number {i} talks about the fox and the dog.")).collect()
    }

    #[test]
    fn trained_tokenizer_has_llama_ids_and_round_trips() {
        let tok = Tokenizer::train(corpus().iter(), 400).unwrap();
        assert_eq!((tok.unk_id(), tok.bos_id(), tok.eos_id(), tok.pad_id()), (Some(0), 1, 2, None));
        assert_eq!(tok.token_to_id("<0x41>"), Some(3 + 0x41));
        assert!(tok.vocab_size() <= 400);
        let text = "The lazy fox said 1961 things.";
        let ids = tok.encode(text, true, true).unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(*ids.last().unwrap(), 2);
        assert_eq!(tok.decode(&ids).unwrap(), text);
        // Digits are split one by one.
        let digits = tok.encode("1961", false, false).unwrap();
        assert!(digits.len() >= 4, "{digits:?}");
        // Characters never seen in training fall back to bytes and come back intact.
        let odd = "naïve – 漢字";
        assert_eq!(tok.decode(&tok.encode(odd, false, false).unwrap()).unwrap(), odd);
        assert!(!tok.encode(odd, false, false).unwrap().contains(&0), "no <unk> with byte fallback");
    }

    #[test]
    fn save_and_load_preserve_fingerprint_and_ids() {
        let tok = Tokenizer::train(corpus().iter(), 320).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let back = Tokenizer::from_file(&path).unwrap();
        assert_eq!(back.fingerprint(), tok.fingerprint());
        let text = "the jury and the fox";
        assert_eq!(back.encode(text, true, false).unwrap(), tok.encode(text, true, false).unwrap());
        std::fs::write(&path, "{not json").unwrap();
        assert!(Tokenizer::from_file(&path).unwrap_err().to_string().contains("tokenizer.json"));
    }

    #[test]
    fn add_bos_token_false_keeps_bos_off_a_text_start() {
        let tok = Tokenizer::train(corpus().iter(), 320).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let text = "the jury";
        for (config, bos_first) in [(r#"{"add_bos_token": true}"#, true), (r#"{"add_bos_token": false}"#, false), ("{}", true)] {
            std::fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
            let back = Tokenizer::from_file(&path).unwrap();
            let ids = back.encode(text, true, true).unwrap();
            assert_eq!(ids[0] == back.bos_id(), bos_first, "{config}");
            assert_eq!((ids.len(), *ids.last().unwrap()), (tok.encode(text, false, false).unwrap().len() + 1 + bos_first as usize, back.eos_id()), "{config}");
        }
    }
}
