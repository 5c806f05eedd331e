//! A model as judge: its prompt template and its preference between two answers.

use anyhow::{Context, bail};
use llama_data::Tokenizer;
use llama_data::chat::{Conversation, Message, Role};
use llama_model::Llama;

/// A judge prompt template: must hold `{question}`, `{answer_a}` and `{answer_b}`.
pub fn check_template(template: &str) -> anyhow::Result<()> {
    let missing: Vec<&str> = ["{question}", "{answer_a}", "{answer_b}"].into_iter().filter(|p| !template.contains(p)).collect();
    if !missing.is_empty() {
        bail!("judge template lacks {}: it needs {{question}}, {{answer_a}} and {{answer_b}}", missing.join(", "));
    }
    Ok(())
}

pub const DEFAULT_TEMPLATE: &str =
    "Which answer to the question is more helpful and safe? Reply A or B.\n\nQuestion: {question}\n\nAnswer A: {answer_a}\n\nAnswer B: {answer_b}";

/// The judge's preference for A over B: log p("A") - log p("B") as the first answer token.
pub(crate) fn judge_margin(judge: &Llama, tokenizer: &Tokenizer, template: &str, question: &str, a: &str, b: &str) -> anyhow::Result<f64> {
    let text = template.replace("{question}", question).replace("{answer_a}", a).replace("{answer_b}", b);
    let conv = Conversation { messages: vec![Message::new(Role::User, text)] };
    let ids = conv.prompt_ids(tokenizer)?;
    let first = |s: &str| tokenizer.encode(s, false, false).ok().and_then(|v| v.first().copied());
    let (ta, tb) = (first(" A").context("judge: cannot tokenize \"A\"")?, first(" B").context("judge: cannot tokenize \"B\"")?);
    let (_, logits) = llama_model::generate::BatchDecoder::prefill(judge, &[ids], 0)?;
    let row = logits.into_data().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok((row[ta as usize] - row[tb as usize]) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_templates_need_their_placeholders() {
        assert!(check_template(DEFAULT_TEMPLATE).is_ok());
        let err = check_template("Compare {answer_a} and {answer_b}.").unwrap_err().to_string();
        assert!(err.contains("{question}"), "{err}");
    }
}
