//! Scoring answers as Llama 2's RLHF and evaluation do: both reward models, the safety gate that
//! picks one of their scores per answer, and the logit of the result (the scale PPO whitens and
//! `eval compare` reports). One path for rejection sampling, PPO and `eval compare`.

use llama_data::prompts::Prompt;

use crate::RewardModel;

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `ln(p / (1 - p))`, with p kept inside (eps, 1 - eps).
pub fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-6, 1.0 - 1e-6);
    (p / (1.0 - p)).ln()
}

/// The paper's combination: the safety score when the prompt is tagged unsafe or the safety
/// reward model's probability is below `threshold` (0.15), else the helpfulness score. Both raw
/// head outputs are read as probabilities through a sigmoid. Returns (Rc in (0, 1), whether the
/// safety score was used).
pub fn combine(helpfulness: f64, safety: f64, is_safety: bool, threshold: f64) -> (f64, bool) {
    let (rh, rs) = (sigmoid(helpfulness), sigmoid(safety));
    if is_safety || rs < threshold { (rs, true) } else { (rh, false) }
}

/// The frozen models that score: both reward models and the tokenizer's pad.
pub struct Scorers {
    pub helpfulness: RewardModel,
    pub safety: RewardModel,
    pub threshold: f64,
    pub pad: u32,
}

/// Scores of one response.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scores {
    pub helpfulness: f64,
    pub safety: f64,
    /// Rc in (0, 1) after the safety gate.
    pub combined: f64,
}

impl Scorers {
    pub fn score(&self, sequences: &[Vec<u32>], prompts: &[&Prompt]) -> Vec<Scores> {
        let h = self.helpfulness.score(sequences, self.pad);
        let s = self.safety.score(sequences, self.pad);
        h.iter()
            .zip(&s)
            .zip(prompts)
            .map(|((&h, &s), p)| Scores { helpfulness: h as f64, safety: s as f64, combined: combine(h as f64, s as f64, p.is_safety, self.threshold).0 })
            .collect()
    }
}

/// Prompt + response as scored and trained on: the response closed with EOS if it was cut.
pub fn full_sequence(prompt: &[u32], response: &[u32], eos: u32) -> Vec<u32> {
    let mut s = prompt.to_vec();
    s.extend_from_slice(response);
    if response.last() != Some(&eos) {
        s.push(eos);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combination_follows_the_safety_gate() {
        // sigmoid(2) = 0.8808, sigmoid(-1) = 0.2689, sigmoid(-2) = 0.1192 (< 0.15).
        let (rc, safety) = combine(2.0, -1.0, false, 0.15);
        assert!(!safety && (rc - 0.880797).abs() < 1e-6);
        let (rc, safety) = combine(2.0, -1.0, true, 0.15);
        assert!(safety && (rc - 0.268941).abs() < 1e-6, "tagged unsafe: the safety score");
        let (rc, safety) = combine(2.0, -2.0, false, 0.15);
        assert!(safety && (rc - 0.119203).abs() < 1e-6, "below the gate: the safety score");
    }

    #[test]
    fn logit_inverts_sigmoid() {
        assert!((logit(sigmoid(1.3)) - 1.3).abs() < 1e-9);
        assert!((logit(0.5)).abs() < 1e-12);
    }
}
