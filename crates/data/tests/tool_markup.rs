//! Tool calls and results in the chat template: the rendering (golden strings), the loss mask
//! (the call is trained, the result the runtime writes is not) with Llama 2's template and with
//! a tokenizer's own, and the ids generation goes on from after a result.

use std::path::PathBuf;

use llama_data::Tokenizer;
use llama_data::chat::{ChatTemplateChoice, Conversation};
use llama_data::tool_markup::{RESULT_CLOSE, RESULT_OPEN};
use serde_json::json;

fn shipped_tokenizer() -> Tokenizer {
    Tokenizer::from_file(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/tokenizer.json")).unwrap()
}

const ANSWER: &str = "It was in 1989, <call>calculator(2026 - 1989)</call><result>37</result> years ago.";

fn dated_chat() -> Conversation {
    Conversation::from_json(&json!({"messages": [
        {"role": "system", "content": "Today is 2 December 2026. Your knowledge cut-off is 2024."},
        {"role": "user", "content": "How long ago was the fall of the Berlin Wall?"},
        {"role": "assistant", "content": ANSWER}]}))
    .unwrap()
}

/// The text of the ids whose mask is `want`, in order.
fn text_where(tok: &Tokenizer, ids: &[u32], mask: &[bool], want: bool) -> String {
    let picked: Vec<u32> = ids.iter().zip(mask).filter(|&(_, &m)| m == want).map(|(&i, _)| i).collect();
    tok.decode(&picked).unwrap()
}

#[test]
fn calls_render_inside_the_answer_and_results_carry_no_loss() {
    let tok = shipped_tokenizer();
    let c = dated_chat();
    assert_eq!(
        c.render_text(),
        format!(
            "<s>[INST] <<SYS>>\nToday is 2 December 2026. Your knowledge cut-off is 2024.\n<</SYS>>\n\nHow long ago was the fall of the Berlin Wall? [/INST] {ANSWER} </s>"
        )
    );
    let (ids, mask) = c.tokenize(&tok).unwrap();
    // Trained: the answer with its call, without the result, and the template's space after it;
    // then EOS (dropped by decode).
    assert_eq!(text_where(&tok, &ids, &mask, true), "It was in 1989, <call>calculator(2026 - 1989)</call> years ago. ");
    assert!(*mask.last().unwrap(), "the answer's EOS is trained");
    // The result's tokens, markers included, are exactly the untrained ones inside the answer.
    let (_, offsets) = tok.encode_with_offsets(&c.render_exchanges()[0].text).unwrap();
    let at = c.render_exchanges()[0].answer_at.unwrap();
    let untrained_in_answer: Vec<u32> =
        ids[1..1 + offsets.len()].iter().zip(&mask[1..]).zip(&offsets).filter(|&((_, &m), &(start, _))| start >= at && !m).map(|((&i, _), _)| i).collect();
    assert_eq!(tok.decode(&untrained_in_answer).unwrap(), format!("{RESULT_OPEN}37{RESULT_CLOSE}"));
    // Without the markup the same answer would be trained in full.
    let plain = Conversation::from_json(&json!({"prompt": "Q", "response": "It was in 1989, 37 years ago."})).unwrap();
    let (ids, mask) = plain.tokenize(&tok).unwrap();
    assert_eq!(text_where(&tok, &ids, &mask, true), "It was in 1989, 37 years ago. ");
}

/// Byte-level BPE (SmolLM's, Llama 3's) joins the call's end and the result's start into one
/// token `><`, which the model must write for the runtime to see `</call>`: it is trained; the
/// tokens made of the result only are not. (Here `><` is an added token of the shipped
/// tokenizer, so that it is one token as in SmolLM2's vocabulary.)
#[test]
fn a_token_joining_the_calls_end_and_the_results_start_is_trained() {
    let mut inner = shipped_tokenizer().inner().clone();
    inner.add_tokens([tokenizers::AddedToken::from("><", false)]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    inner.save(tmp.path().join("tokenizer.json"), false).unwrap();
    let tok = Tokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap();
    let joined = tok.token_to_id("><").unwrap();
    let (ids, mask) = dated_chat().tokenize(&tok).unwrap();
    let at = ids.iter().position(|&i| i == joined).expect("`><` is one token");
    assert!(mask[at], "`><` carries the call's `>`: trained");
    assert_eq!(text_where(&tok, &ids, &mask, true), "It was in 1989, <call>calculator(2026 - 1989)</call>< years ago. ");
    let untrained_after: Vec<u32> = ids[at + 1..].iter().zip(&mask[at + 1..]).take_while(|&(_, &m)| !m).map(|(&i, _)| i).collect();
    assert_eq!(tok.decode(&untrained_after).unwrap(), format!("{}37{RESULT_CLOSE}", &RESULT_OPEN[1..]));
}

#[test]
fn generation_goes_on_after_a_result_from_the_ids_training_saw() {
    let tok = shipped_tokenizer();
    let c = dated_chat();
    let (ids, _) = c.tokenize(&tok).unwrap();
    let head = c.prompt_ids(&tok).unwrap();
    let upto = ANSWER.find(" years").unwrap();
    let resumed = c.prompt_ids_with_answer(&tok, &format!(" {}", &ANSWER[..upto])).unwrap();
    assert_eq!(&resumed[..head.len()], head.as_slice(), "the prompt's ids come first");
    assert_eq!(resumed.as_slice(), &ids[..resumed.len()], "a prefix of the training ids");
    assert_eq!(tok.decode_after(&head, &resumed[head.len()..]).unwrap(), format!(" {}", &ANSWER[..upto]));
    assert_eq!(c.prompt_ids_with_answer(&tok, "").unwrap(), head);
}

#[test]
fn a_tokenizers_own_template_masks_results_too() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
    let template = "{% for m in messages %}{{ '<s>' + m['role'] + ': ' + m['content'].strip() + '</s>' }}{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}";
    std::fs::write(tmp.path().join("tokenizer_config.json"), json!({"chat_template": template}).to_string()).unwrap();
    let tok = Tokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap().with_chat_template(ChatTemplateChoice::Tokenizer).unwrap();
    let c = dated_chat();
    let (ids, mask) = c.tokenize(&tok).unwrap();
    assert_eq!(text_where(&tok, &ids, &mask, true), "It was in 1989, <call>calculator(2026 - 1989)</call> years ago.");
    let upto = ANSWER.find(" years").unwrap();
    let resumed = c.prompt_ids_with_answer(&tok, &ANSWER[..upto]).unwrap();
    assert_eq!(resumed.as_slice(), &ids[..resumed.len()]);
}
