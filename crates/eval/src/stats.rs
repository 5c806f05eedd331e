//! The paired statistics of a comparison: win / tie / loss, and bootstrap intervals of the win rate.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Wins, ties and losses of A against B over paired scores: a tie when |a - b| <= `tie_margin`.
pub fn win_tie_loss(a: &[f64], b: &[f64], tie_margin: f64) -> (usize, usize, usize) {
    let mut out = (0, 0, 0);
    for (x, y) in a.iter().zip(b) {
        if (x - y).abs() <= tie_margin {
            out.1 += 1;
        } else if x > y {
            out.0 += 1;
        } else {
            out.2 += 1;
        }
    }
    out
}

/// Percentile bootstrap interval (`level`, e.g. 0.95) of the win rate, resampling prompts with
/// replacement `samples` times from `seed`.
pub fn bootstrap_win_rate(a: &[f64], b: &[f64], tie_margin: f64, samples: usize, level: f64, seed: u64) -> (f64, f64) {
    let n = a.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rates: Vec<f64> = (0..samples.max(1))
        .map(|_| {
            let idx: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
            let (xa, xb): (Vec<f64>, Vec<f64>) = idx.iter().map(|&i| (a[i], b[i])).unzip();
            win_tie_loss(&xa, &xb, tie_margin).0 as f64 / n as f64
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    let pick = |q: f64| rates[((q * (rates.len() - 1) as f64).round() as usize).min(rates.len() - 1)];
    (pick((1.0 - level) / 2.0), pick(1.0 - (1.0 - level) / 2.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn win_tie_loss_by_hand() {
        let a = [1.0, 0.5, 0.0, -1.0, 2.0];
        let b = [0.0, 0.45, 0.5, -1.0, 1.0];
        // margin 0.1: win, tie (0.05), loss, tie (0), win.
        assert_eq!(win_tie_loss(&a, &b, 0.1), (2, 2, 1));
        assert_eq!(win_tie_loss(&a, &b, 0.0), (3, 1, 1));
    }

    #[test]
    fn bootstrap_intervals_are_reproducible_and_sane() {
        let a: Vec<f64> = (0..40).map(|i| if i % 4 == 0 { 0.0 } else { 1.0 }).collect();
        let b = vec![0.5; 40];
        // 30 wins, 10 losses: the point estimate 0.75 lies inside the interval.
        let (lo, hi) = bootstrap_win_rate(&a, &b, 0.0, 2000, 0.95, 7);
        assert!(lo < 0.75 && 0.75 < hi && lo > 0.5 && hi < 0.95, "{lo} {hi}");
        assert_eq!((lo, hi), bootstrap_win_rate(&a, &b, 0.0, 2000, 0.95, 7));
        // All wins: a degenerate interval.
        assert_eq!(bootstrap_win_rate(&[1.0; 5], &[0.0; 5], 0.0, 100, 0.95, 1), (1.0, 1.0));
    }
}
