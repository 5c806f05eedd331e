//! The learning rate as a pure function of the step: nothing to save, so a resumed run follows
//! exactly the schedule of an uninterrupted one.

use crate::config::{ScheduleConfig, ScheduleKind};

/// Learning rate for every optimizer step of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    pub min_ratio: f64,
    pub kind: ScheduleKind,
}

impl Schedule {
    pub fn new(config: &ScheduleConfig, peak: f64, total: u64) -> Self {
        let warmup = match config.warmup_ratio {
            Some(r) => ((r * total as f64).ceil() as u64).max(config.min_warmup_steps),
            None => config.warmup_steps,
        };
        Self { peak, warmup: warmup.min(total), total, min_ratio: config.min_lr_ratio, kind: config.kind }
    }

    /// LR of step `step` (0-based: the first update is step 0). Warmup rises linearly to the peak
    /// at step `warmup - 1`; then cosine (or linear) decay reaches `min_ratio * peak` at the last
    /// step, `total - 1`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let min = self.peak * self.min_ratio;
        let span = self.total.saturating_sub(self.warmup + 1);
        let progress = if span == 0 { 1.0 } else { ((step - self.warmup) as f64 / span as f64).min(1.0) };
        match self.kind {
            ScheduleKind::Constant => self.peak,
            ScheduleKind::Linear => self.peak - (self.peak - min) * progress,
            ScheduleKind::Cosine => min + (self.peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(warmup: u64, total: u64) -> Schedule {
        Schedule::new(&ScheduleConfig { warmup_steps: warmup, ..ScheduleConfig::default() }, 1e-3, total)
    }

    #[test]
    fn warmup_then_cosine_to_ten_percent_by_hand() {
        let s = cosine(4, 14);
        // Warmup: 1/4, 2/4, 3/4, 4/4 of the peak.
        assert_eq!([s.lr(0), s.lr(1), s.lr(2), s.lr(3)], [2.5e-4, 5e-4, 7.5e-4, 1e-3]);
        // Cosine over steps 4..=13 (9 intervals): the midpoint 8.5 is not a step; step 4 is the
        // peak, step 13 the floor, and step 10 (progress 6/9) is 1e-4 + 9e-4 * (1 + cos(2pi/3)) / 2.
        assert!((s.lr(4) - 1e-3).abs() < 1e-15);
        assert!((s.lr(13) - 1e-4).abs() < 1e-15);
        assert!((s.lr(10) - (1e-4 + 9e-4 * 0.25)).abs() < 1e-12, "{}", s.lr(10));
        assert!((s.lr(100) - 1e-4).abs() < 1e-15, "after the end the floor holds");
    }

    #[test]
    fn warmup_ratio_has_a_floor_and_constant_stays_flat() {
        let c = ScheduleConfig { warmup_ratio: Some(0.03), min_warmup_steps: 5, kind: ScheduleKind::Constant, ..ScheduleConfig::default() };
        let s = Schedule::new(&c, 1e-5, 100);
        assert_eq!(s.warmup, 5, "3% of 100 = 3 < 5");
        assert_eq!(Schedule::new(&c, 1e-5, 1000).warmup, 30);
        assert_eq!(s.lr(50), 1e-5);
        let lin = Schedule::new(&ScheduleConfig { warmup_steps: 0, kind: ScheduleKind::Linear, min_lr_ratio: 0.0, ..ScheduleConfig::default() }, 1.0, 11);
        assert_eq!([lin.lr(0), lin.lr(5), lin.lr(10)], [1.0, 0.5, 0.0]);
    }
}
