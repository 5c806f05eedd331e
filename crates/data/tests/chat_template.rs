//! The chat template's ids equal Meta's `chat_completion` for a tokenizer built like Llama 2's
//! `tokenizer.json` (normalizer `Prepend("▁")` + `Replace(" ", "▁")`, no pre-tokenizer, BPE with
//! byte fallback): each exchange is encoded as one string, so an answer starts `▁word`, not `▁`
//! then `▁word` as it would if the template's pieces were encoded one by one.

use llama_data::Tokenizer;
use llama_data::chat::Conversation;
use serde_json::json;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::{Prepend, Replace, Sequence};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, TokenizerBuilder};

const TEXTS: &[&str] = &[
    "[INST] What is my name? [/INST] Your name is Alice. ",
    "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello. How can I help? ",
    "[INST] Thanks for the help [/INST] You are welcome. Bye. ",
    "the name of the city is a name; hello and welcome, brief answers help",
];

/// A tokenizer with Llama 2's normalizer and no pre-tokenizer. It is trained with words split
/// at `▁` (as SentencePiece's pieces are), so that no token spans two words, as in Llama 2's
/// vocabulary; the saved tokenizer then encodes whole strings with merges only.
fn llama2_style_tokenizer(dir: &std::path::Path) -> (Tokenizer, tokenizers::Tokenizer) {
    let normalizer = || NormalizerWrapper::Sequence(Sequence::new(vec![Prepend::new("▁".into()).into(), Replace::new(" ", "▁").unwrap().into()]));
    let specials: Vec<AddedToken> = ["<unk>", "<s>", "</s>"]
        .into_iter()
        .map(|t| AddedToken::from(t, true))
        .chain((0..=255u8).map(|b| AddedToken::from(format!("<0x{b:02X}>"), true)))
        .collect();
    let mut trainer = BpeTrainerBuilder::new().vocab_size(400).min_frequency(1).special_tokens(specials).show_progress(false).build();
    let bpe = BPE::builder().byte_fallback(true).unk_token("<unk>".into()).build().unwrap();
    let mut training = TokenizerBuilder::new()
        .with_model(bpe)
        .with_normalizer(Some(normalizer()))
        .with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(Metaspace::new('▁', PrependScheme::Never, true))))
        .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
        .with_decoder(None::<tokenizers::DecoderWrapper>)
        .build()
        .unwrap();
    training.train(&mut trainer, TEXTS.iter()).unwrap();
    let mut inner = tokenizers::Tokenizer::new(training.get_model().clone());
    inner.with_normalizer(Some(normalizer())).unwrap();
    inner.add_special_tokens([AddedToken::from("<unk>", true), AddedToken::from("<s>", true), AddedToken::from("</s>", true)]).unwrap();
    let path = dir.join("tokenizer.json");
    inner.save(&path, false).unwrap();
    (Tokenizer::from_file(&path).unwrap(), inner)
}

fn encode(inner: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
    inner.encode(text, false).unwrap().get_ids().to_vec()
}

#[test]
fn template_ids_are_metas_whole_turn_encoding_for_a_llama2_style_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, inner) = llama2_style_tokenizer(tmp.path());
    let (bos, eos) = (tok.bos_id(), tok.eos_id());
    let space = inner.token_to_id("▁").expect("a lone ▁ token, as Llama 2 has (29871)");

    // (conversation, its exchanges as (user text inside [INST], answer)).
    let cases = [
        (json!({"prompt": "What is my name?", "response": "Your name is Alice."}), vec![("What is my name?", Some("Your name is Alice."))]),
        (
            json!({"system": "Be brief.", "prompt": "Hi there", "response": "Hello. How can I help?"}),
            vec![("<<SYS>>\nBe brief.\n<</SYS>>\n\nHi there", Some("Hello. How can I help?"))],
        ),
        (
            json!({"messages": [
                {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Thanks for the help"}, {"role": "assistant", "content": "You are welcome. Bye."}]}),
            vec![("Hi there", Some("Hello.")), ("Thanks for the help", Some("You are welcome. Bye."))],
        ),
        (
            json!({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "What is my name?"}]}),
            vec![("<<SYS>>\nBe brief.\n<</SYS>>\n\nHi there", Some("Hello.")), ("What is my name?", None)],
        ),
    ];
    for (value, exchanges) in cases {
        let conversation = Conversation::from_json(&value).unwrap();
        let (ids, mask) = conversation.tokenize(&tok).unwrap();
        let (mut want_ids, mut want_mask) = (vec![], vec![]);
        for (user, answer) in exchanges {
            let prompt = format!("[INST] {user} [/INST]");
            let prompt_ids = encode(&inner, &prompt);
            want_ids.push(bos);
            want_mask.push(false);
            match answer {
                // Meta: tokenizer.encode(f"{B_INST} {user} {E_INST} {answer} ", bos=True, eos=True).
                Some(answer) => {
                    let whole = encode(&inner, &format!("{prompt} {answer} "));
                    assert_eq!(whole[..prompt_ids.len()], prompt_ids[..], "no token spans the prompt and the answer");
                    let answer_ids = whole[prompt_ids.len()..].to_vec();
                    assert_ne!(answer_ids[0], space, "{answer}: the answer's first word keeps its ▁");
                    // What encoding the answer on its own gives: an extra lone ▁ first.
                    let alone = encode(&inner, &format!(" {answer} "));
                    assert_eq!(alone[0], space);
                    assert_eq!(alone[1..], answer_ids[..]);
                    want_ids.extend(whole);
                    want_mask.extend(std::iter::repeat_n(false, prompt_ids.len()));
                    want_mask.extend(std::iter::repeat_n(true, answer_ids.len() + 1));
                    want_ids.push(eos);
                }
                // Meta: tokenizer.encode(f"{B_INST} {user} {E_INST}", bos=True, eos=False).
                None => {
                    want_ids.extend(&prompt_ids);
                    want_mask.extend(std::iter::repeat_n(false, prompt_ids.len()));
                }
            }
        }
        assert_eq!(ids, want_ids, "{value}");
        assert_eq!(mask, want_mask, "{value}: the loss mask covers exactly the answers and their EOS");
    }
}

/// An answer marked `"train": false` (Ghost Attention's earlier turns) carries no loss, and the
/// generation prompt is the rendering up to the last `[/INST]`.
#[test]
fn untrained_answers_and_generation_prompts_follow_the_same_encoding() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, inner) = llama2_style_tokenizer(tmp.path());
    let c = Conversation::from_json(&json!({"messages": [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello.", "train": false},
        {"role": "user", "content": "What is my name?"}, {"role": "assistant", "content": "Your name is Alice."}]}))
    .unwrap();
    let (ids, mask) = c.tokenize(&tok).unwrap();
    let first = encode(&inner, "[INST] Hi there [/INST] Hello. ");
    assert!(mask[..first.len() + 2].iter().all(|m| !m), "the untrained answer and its EOS carry no loss");
    let second_prompt = encode(&inner, "[INST] What is my name? [/INST]");
    let second = encode(&inner, "[INST] What is my name? [/INST] Your name is Alice. ");
    assert_eq!(mask.iter().filter(|&&m| m).count(), second.len() - second_prompt.len() + 1);
    let prompt = c.prompt_ids(&tok).unwrap();
    assert_eq!(prompt, [vec![tok.bos_id()], first, vec![tok.eos_id(), tok.bos_id()], second_prompt].concat());
    assert_eq!(ids[..prompt.len()], prompt[..]);
}

/// A checkpoint's tokenizer that names its own special tokens (Llama 3 style, no `<s>`): BOS and
/// EOS come from `tokenizer_config.json`, or `special_tokens_map.json` (`{"content": ...}` form);
/// without either the missing `<s>` is a clear error, and a named token the tokenizer lacks too.
#[test]
fn special_tokens_come_from_the_checkpoints_tokenizer_config() {
    use tokenizers::models::wordlevel::WordLevel;
    let tmp = tempfile::tempdir().unwrap();
    let vocab = [("<|begin_of_text|>", 0), ("<|end_of_text|>", 1), ("<unk>", 2), ("hello", 3)].into_iter().map(|(t, i)| (t.to_string(), i)).collect();
    let model = WordLevel::builder().vocab(vocab).unk_token("<unk>".into()).build().unwrap();
    let mut inner = tokenizers::Tokenizer::new(model);
    inner.add_special_tokens([AddedToken::from("<|begin_of_text|>", true), AddedToken::from("<|end_of_text|>", true)]).unwrap();
    let path = tmp.path().join("tokenizer.json");
    inner.save(&path, false).unwrap();
    let err = Tokenizer::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("`<s>` (BOS)") && err.contains("tokenizer_config.json"), "{err}");

    std::fs::write(tmp.path().join("special_tokens_map.json"), r#"{"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|end_of_text|>"}"#).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id()), (0, 1));
    // tokenizer_config.json comes first.
    std::fs::write(tmp.path().join("tokenizer_config.json"), r#"{"bos_token": "<|end_of_text|>", "eos_token": "<|begin_of_text|>"}"#).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id()), (1, 0));
    std::fs::write(tmp.path().join("tokenizer_config.json"), r#"{"bos_token": "<|start|>"}"#).unwrap();
    let err = Tokenizer::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json names `<|start|>` as bos_token"), "{err}");
}

/// A model that brings its own chat template (ChatML, as SmolLM's): with
/// `chat_template = "tokenizer"` the chat renders through the tokenizer_config.json's Jinja
/// template, the ids are the tokenizer's encoding of that rendering, and the loss mask covers
/// exactly each answer and its end-of-turn text; the generation prompt ends with the template's
/// assistant header.
#[test]
fn a_tokenizers_own_chat_template_renders_and_masks_exactly_the_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut inner) = llama2_style_tokenizer(tmp.path());
    inner.add_special_tokens([AddedToken::from("<|im_start|>", true), AddedToken::from("<|im_end|>", true)]).unwrap();
    let path = tmp.path().join("tokenizer.json");
    inner.save(&path, false).unwrap();
    let chatml = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let config = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": chatml});
    std::fs::write(tmp.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let plain = Tokenizer::from_file(&path).unwrap();
    assert_eq!(plain.eos_id(), inner.token_to_id("<|im_end|>").unwrap());
    let tok = plain.clone().with_chat_template(llama_data::chat::ChatTemplateChoice::Tokenizer).unwrap();

    let c = Conversation::from_json(&json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello. "},
        {"role": "user", "content": "Thanks for the help"}, {"role": "assistant", "content": "You are welcome."}]}))
    .unwrap();
    let whole = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nThanks for the help<|im_end|>\n<|im_start|>assistant\nYou are welcome.<|im_end|>\n";
    let (ids, mask) = c.tokenize(&tok).unwrap();
    let encoding = inner.encode(whole, false).unwrap();
    assert_eq!(ids, encoding.get_ids(), "the ids are the encoding of the template's rendering");
    // The answers' text (with their end of turn) in the rendering, and the tokens overlapping it.
    let span = |text: &str| {
        let at = whole.find(text).unwrap();
        at..at + text.len()
    };
    let answers = [span("Hello.<|im_end|>\n"), span("You are welcome.<|im_end|>\n")];
    let overlapping = |spans: &[std::ops::Range<usize>]| -> Vec<bool> {
        encoding.get_offsets().iter().map(|&(a, b)| spans.iter().any(|s| a < s.end && (b > s.start || (a == b && a >= s.start)))).collect()
    };
    assert_eq!(mask, overlapping(&answers), "the mask covers exactly the tokens of the answers and their end of turn");
    let im_end = inner.token_to_id("<|im_end|>").unwrap();
    assert_eq!(ids.iter().zip(&mask).filter(|&(&id, &m)| id == im_end && m).count(), 2, "each answer's <|im_end|> is trained");
    assert_eq!(ids.iter().zip(&mask).filter(|&(&id, &m)| id == im_end && !m).count(), 3, "the system's and users' are not");
    // Llama 2's template is still the default, and what `plain` renders with.
    assert_ne!(c.tokenize(&plain).unwrap().0, ids);
    // The generation prompt: everything but the last answer, then the assistant header.
    let prompt = c.prompt_ids(&tok).unwrap();
    let head = &whole[..whole.find("You are welcome.").unwrap()];
    assert!(head.ends_with("<|im_start|>assistant\n"));
    assert_eq!(prompt, inner.encode(head, false).unwrap().get_ids());
    // An untrained answer carries no loss.
    let mut quiet = c.clone();
    quiet.messages[2].train = false;
    let (_, mask) = quiet.tokenize(&tok).unwrap();
    assert_eq!(mask, overlapping(&answers[1..]));
    // The declared template is used only when asked for; asking a tokenizer without one fails.
    assert!(plain.chat_template().is_none());
    std::fs::write(tmp.path().join("tokenizer_config.json"), r#"{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}"#).unwrap();
    let err = Tokenizer::from_file(&path).unwrap().with_chat_template(llama_data::chat::ChatTemplateChoice::Tokenizer).unwrap_err().to_string();
    assert!(err.contains("no chat_template"), "{err}");
    // transformers 5 saves the template as chat_template.jinja beside tokenizer_config.json: read
    // there, and it wins over one inside tokenizer_config.json.
    std::fs::write(tmp.path().join("chat_template.jinja"), chatml).unwrap();
    let from_file = Tokenizer::from_file(&path).unwrap().with_chat_template(llama_data::chat::ChatTemplateChoice::Tokenizer).unwrap();
    assert_eq!(c.tokenize(&from_file).unwrap(), (ids.clone(), c.tokenize(&tok).unwrap().1));
    let other = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": "{{ 'other' }}"});
    std::fs::write(tmp.path().join("tokenizer_config.json"), other.to_string()).unwrap();
    let both = Tokenizer::from_file(&path).unwrap();
    assert_eq!(both.declared_chat_template(), Some(chatml));
    assert_eq!(c.tokenize(&both.with_chat_template(llama_data::chat::ChatTemplateChoice::Tokenizer).unwrap()).unwrap().0, ids);
}
