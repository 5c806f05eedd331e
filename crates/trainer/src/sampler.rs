//! Epochs over an in-memory training set (SFT chats, preference pairs): a fresh shuffle per
//! epoch from the seed, and a cursor that checkpoints save and restore exactly.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// Position in the epochs: epoch and index into that epoch's order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochCursor {
    pub epoch: u64,
    pub index: usize,
}

/// Hands out indices `0..len`, each once per epoch, for `epochs` epochs.
#[derive(Debug, Clone)]
pub struct EpochSampler {
    len: usize,
    epochs: u64,
    seed: u64,
    cursor: EpochCursor,
    order: Vec<usize>,
}

impl EpochSampler {
    pub fn new(len: usize, epochs: u64, seed: u64) -> Self {
        let mut s = Self { len, epochs, seed, cursor: EpochCursor::default(), order: vec![] };
        s.shuffle();
        s
    }

    fn shuffle(&mut self) {
        self.order = (0..self.len).collect();
        self.order.shuffle(&mut StdRng::seed_from_u64(self.seed ^ self.cursor.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    }

    /// The next index, or None once the epochs are done (or the set is empty).
    pub fn next_index(&mut self) -> Option<usize> {
        if self.len == 0 || self.cursor.epoch >= self.epochs {
            return None;
        }
        let i = self.order[self.cursor.index];
        self.cursor.index += 1;
        if self.cursor.index == self.len {
            self.cursor = EpochCursor { epoch: self.cursor.epoch + 1, index: 0 };
            self.shuffle();
        }
        Some(i)
    }

    pub fn cursor(&self) -> &EpochCursor {
        &self.cursor
    }

    pub fn restore(&mut self, cursor: EpochCursor) -> anyhow::Result<()> {
        if cursor.index >= self.len.max(1) {
            anyhow::bail!("data cursor index {} is past the {} items: the data changed since the checkpoint", cursor.index, self.len);
        }
        self.cursor = cursor;
        self.shuffle();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_once_per_epoch_and_resume_is_exact() {
        let mut s = EpochSampler::new(5, 3, 9);
        let all: Vec<usize> = std::iter::from_fn(|| s.next_index()).collect();
        assert_eq!(all.len(), 15);
        for epoch in all.chunks(5) {
            let mut e = epoch.to_vec();
            e.sort();
            assert_eq!(e, vec![0, 1, 2, 3, 4]);
        }
        assert_ne!(all[..5], all[5..10], "a new order each epoch");
        let mut first = EpochSampler::new(5, 3, 9);
        let head: Vec<usize> = (0..7).map(|_| first.next_index().unwrap()).collect();
        let mut resumed = EpochSampler::new(5, 3, 9);
        resumed.restore(first.cursor().clone()).unwrap();
        let tail: Vec<usize> = std::iter::from_fn(|| resumed.next_index()).collect();
        assert_eq!([head, tail].concat(), all);
    }
}
