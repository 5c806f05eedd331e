//! The tool-call markup inside assistant answers, shared by training (the loss mask) and
//! generation (where a call ends and the runtime takes over):
//!
//! `That is <call>calculator(12 * 7)</call><result>84</result> apples.`
//!
//! The model writes the call where its value belongs; the runtime runs it and writes the result,
//! so the result's characters (its markers included) carry no loss, and a reader reads the value
//! in place ([`visible_text`]). Plain text, so any tokenizer can encode it.

use std::ops::Range;

pub const CALL_OPEN: &str = "<call>";
pub const CALL_CLOSE: &str = "</call>";
pub const RESULT_OPEN: &str = "<result>";
pub const RESULT_CLOSE: &str = "</result>";

/// A completed call found in an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// What stands between the markers, e.g. `calculator(12 * 7)`.
    pub text: String,
    /// Byte offset just past `</call>`.
    pub end: usize,
}

/// The first call in `text` that opens at or after byte `from` and is closed.
pub fn find_call(text: &str, from: usize) -> Option<Call> {
    let open = from + text.get(from..)?.find(CALL_OPEN)?;
    let inner = open + CALL_OPEN.len();
    let close = inner + text[inner..].find(CALL_CLOSE)?;
    Some(Call { text: text[inner..close].to_string(), end: close + CALL_CLOSE.len() })
}

/// The result as the runtime appends it after a call.
pub fn result_text(result: &str) -> String {
    format!("{RESULT_OPEN}{result}{RESULT_CLOSE}")
}

/// Byte ranges of the results (`<result>...</result>`, markers included) that start inside
/// `within` of `text`; an unclosed result runs to the end of `within`.
pub fn result_spans(text: &str, within: Range<usize>) -> Vec<Range<usize>> {
    let mut spans = vec![];
    let mut at = within.start;
    while let Some(i) = text.get(at..within.end).and_then(|s| s.find(RESULT_OPEN)) {
        let start = at + i;
        let end = text[start..within.end].find(RESULT_CLOSE).map_or(within.end, |j| start + j + RESULT_CLOSE.len());
        spans.push(start..end);
        at = end;
    }
    spans
}

/// The answer as its reader sees it: each call removed and each result replaced by its value
/// (a call stands where its value goes, as in Toolformer: `That is <call>calculator(6 * 9)</call>
/// <result>54</result> shells.` reads `That is 54 shells.`), spaces tidied.
pub fn visible_text(answer: &str) -> String {
    let mut out = String::new();
    let mut rest = answer;
    loop {
        let next = [CALL_OPEN, RESULT_OPEN].iter().filter_map(|m| rest.find(m).map(|i| (i, *m))).min();
        let Some((i, open)) = next else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..i]);
        let close = if open == CALL_OPEN { CALL_CLOSE } else { RESULT_CLOSE };
        let inner = i + open.len();
        match rest[inner..].find(close) {
            Some(j) => {
                if open == RESULT_OPEN {
                    out.push_str(&rest[inner..inner + j]);
                }
                rest = &rest[inner + j + close.len()..];
            }
            None => break,
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether the answer holds at least one call.
pub fn has_call(answer: &str) -> bool {
    find_call(answer, 0).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_results_and_visible_text() {
        let a = "It was in 1989, <call>calculator(2026 - 1989)</call><result>37</result> years ago.";
        let call = find_call(a, 0).unwrap();
        assert_eq!(call.text, "calculator(2026 - 1989)");
        assert_eq!(&a[..call.end], "It was in 1989, <call>calculator(2026 - 1989)</call>");
        assert_eq!(find_call(a, call.end), None);
        assert_eq!(find_call("<call>calculator(1 +", 0), None, "an unclosed call is not complete");
        let spans = result_spans(a, 0..a.len());
        assert_eq!(spans.len(), 1);
        assert_eq!(&a[spans[0].clone()], "<result>37</result>");
        assert_eq!(result_spans("x <result>1", 0..11), vec![2..11]);
        assert_eq!(visible_text(a), "It was in 1989, 37 years ago.");
        assert_eq!(visible_text("That is <call>calculator(6 * 9)</call> shells."), "That is shells.", "a call with no result reads as nothing");
        assert_eq!(visible_text("no calls here"), "no calls here");
        assert_eq!(visible_text("cut <call>calculator(1"), "cut", "an unclosed call is cut");
        assert!(has_call(a) && !has_call("It was in 1989."));
    }
}
