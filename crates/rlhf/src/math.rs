//! The arithmetic of Llama 2's RLHF, on host numbers so that each piece can be checked by hand:
//! whitening, the per-token KL penalty, and generalized advantage estimation (the reward
//! combination with the safety gate and its logit are `llama_reward::scoring`'s).

use serde::{Deserialize, Serialize};

/// Running mean and variance (Welford) of the scores seen so far, checkpointed with the PPO
/// state; `whiten` centres and scales by them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Whitener {
    pub count: u64,
    pub mean: f64,
    pub m2: f64,
}

impl Whitener {
    pub fn update(&mut self, values: &[f64]) {
        for &x in values {
            self.count += 1;
            let d = x - self.mean;
            self.mean += d / self.count as f64;
            self.m2 += d * (x - self.mean);
        }
    }

    pub fn std(&self) -> f64 {
        if self.count < 2 { 1.0 } else { (self.m2 / (self.count - 1) as f64).sqrt().max(1e-8) }
    }

    pub fn whiten(&self, x: f64) -> f64 {
        (x - self.mean) / self.std()
    }
}

/// Per-token KL estimate `k1 = log pi(a) - log pi_ref(a)` (its sum over a response is an
/// unbiased estimate of KL(pi || pi_ref) for samples from pi; single values may be negative).
pub fn kl_k1(logp: &[f32], ref_logp: &[f32]) -> Vec<f64> {
    logp.iter().zip(ref_logp).map(|(a, b)| (*a - *b) as f64).collect()
}

/// Per-token rewards of one response: `-beta * kl_t`, plus the whitened score on the last token.
pub fn token_rewards(kl: &[f64], beta: f64, score: f64) -> Vec<f64> {
    let mut r: Vec<f64> = kl.iter().map(|k| -beta * k).collect();
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

/// Generalized advantage estimation over one response (the value after the last token is 0):
/// `delta_t = r_t + gamma V_{t+1} - V_t`, `A_t = delta_t + gamma lambda A_{t+1}`; returns
/// (advantages, returns = A + V).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lambda: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut next_adv = 0.0;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_value - values[t];
        next_adv = delta + gamma * lambda * next_adv;
        adv[t] = next_adv;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// Centres and scales advantages over a batch (all tokens together).
pub fn whiten_advantages(adv: &mut [Vec<f64>]) {
    let all: Vec<f64> = adv.iter().flatten().copied().collect();
    if all.len() < 2 {
        return;
    }
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (all.len() - 1) as f64;
    let std = var.sqrt().max(1e-8);
    adv.iter_mut().flatten().for_each(|x| *x = (*x - mean) / std);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitening_uses_running_statistics() {
        let mut w = Whitener::default();
        w.update(&[1.0, 2.0, 3.0, 4.0]);
        // mean 2.5, sample variance 5/3.
        assert!((w.mean - 2.5).abs() < 1e-12);
        assert!((w.std() - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((w.whiten(4.0) - 1.5 / (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        w.update(&[5.0]);
        assert!((w.mean - 3.0).abs() < 1e-12 && (w.std() - 2.5f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn kl_penalty_and_gae_by_hand() {
        let kl = kl_k1(&[-1.0, -2.0, -0.5], &[-1.5, -1.0, -0.5]);
        assert_eq!(kl, vec![0.5, -1.0, 0.0]);
        let r = token_rewards(&kl, 0.1, 2.0);
        assert_eq!(r, vec![-0.05, 0.1, 2.0]);
        // gamma 1, lambda 0.5, values 0.5, 1.0, 1.5:
        // delta2 = 2.0 - 1.5 = 0.5;          A2 = 0.5
        // delta1 = 0.1 + 1.5 - 1.0 = 0.6;    A1 = 0.6 + 0.5 * 0.5 = 0.85
        // delta0 = -0.05 + 1.0 - 0.5 = 0.45; A0 = 0.45 + 0.5 * 0.85 = 0.875
        let (adv, ret) = gae(&r, &[0.5, 1.0, 1.5], 1.0, 0.5);
        for (a, b) in adv.iter().zip([0.875, 0.85, 0.5]) {
            assert!((a - b).abs() < 1e-12, "{adv:?}");
        }
        for (a, b) in ret.iter().zip([1.375, 1.85, 2.0]) {
            assert!((a - b).abs() < 1e-12, "{ret:?}");
        }
        // gamma 0.9, lambda 1: A2 = 0.5; A1 = 0.1 + 0.9*1.5 - 1.0 + 0.9*0.5 = 0.9; A0 = -0.05 + 0.9 - 0.5 + 0.81 = 1.16
        let (adv, _) = gae(&r, &[0.5, 1.0, 1.5], 0.9, 1.0);
        for (a, b) in adv.iter().zip([1.16, 0.9, 0.5]) {
            assert!((a - b).abs() < 1e-12, "{adv:?}");
        }
    }
}
