//! Epochs over an in-memory training set (SFT chats, preference pairs): a fresh shuffle per
//! epoch from the seed, and a cursor that checkpoints save and restore exactly. In an MPI job each
//! rank takes every `world`-th draw of the one sequence of draws ([`crate::deal`], as the packed
//! reader does with windows), so the ranks together see what one process would.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::deal::{Deal, Draws};

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
    rank: usize,
    world: usize,
    /// The draw the rounds of `world` draws are counted from (0, or the restored cursor's).
    round_start: u64,
}

impl EpochSampler {
    pub fn new(len: usize, epochs: u64, seed: u64) -> Self {
        let mut s = Self { len, epochs, seed, cursor: EpochCursor::default(), order: vec![], rank: 0, world: 1, round_start: 0 };
        s.shuffle();
        s
    }

    /// The same draws dealt over the ranks of a job: this rank's share.
    pub fn for_rank(mut self, rank: usize, world: usize) -> Self {
        assert!(rank < world, "rank {rank} of {world}");
        (self.rank, self.world) = (rank, world);
        self
    }

    /// Draws made so far, all ranks' (every epoch has `len`).
    fn position(&self) -> u64 {
        self.cursor.epoch * self.len as u64 + self.cursor.index as u64
    }

    fn shuffle(&mut self) {
        self.order = (0..self.len).collect();
        self.order.shuffle(&mut StdRng::seed_from_u64(self.seed ^ self.cursor.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    }

    /// This rank's next index, or None once the epochs are done (or the set is empty); dealt as
    /// [`Deal::next`] says, so every rank's cursor is the same after the same number of indices.
    pub fn next_index(&mut self) -> Option<usize> {
        let deal = Deal { rank: self.rank as u64, world: self.world as u64, start: self.round_start };
        let Ok(next) = deal.next(self);
        next
    }
}

impl Draws for EpochSampler {
    type Item = usize;
    type Error = std::convert::Infallible;

    fn drawn(&self) -> u64 {
        self.position()
    }

    /// The next index of the one sequence of draws.
    fn draw(&mut self) -> Result<Option<usize>, Self::Error> {
        if self.len == 0 || self.cursor.epoch >= self.epochs {
            return Ok(None);
        }
        let i = self.order[self.cursor.index];
        self.cursor.index += 1;
        if self.cursor.index == self.len {
            self.cursor = EpochCursor { epoch: self.cursor.epoch + 1, index: 0 };
            self.shuffle();
        }
        Ok(Some(i))
    }
}

impl EpochSampler {
    pub fn cursor(&self) -> &EpochCursor {
        &self.cursor
    }

    pub fn restore(&mut self, cursor: EpochCursor) -> anyhow::Result<()> {
        if cursor.index >= self.len.max(1) {
            anyhow::bail!("data cursor index {} is past the {} items: the data changed since the checkpoint", cursor.index, self.len);
        }
        self.cursor = cursor;
        self.round_start = self.position();
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

    /// Three ranks together draw what one sampler draws, round by round, and any rank's cursor
    /// resumes the job at another world size.
    #[test]
    fn ranks_share_the_draws_and_their_cursors_agree() {
        let all: Vec<usize> = std::iter::from_fn({
            let mut s = EpochSampler::new(7, 2, 3);
            move || s.next_index()
        })
        .collect();
        let mut ranks: Vec<EpochSampler> = (0..3).map(|r| EpochSampler::new(7, 2, 3).for_rank(r, 3)).collect();
        let mut dealt = vec![];
        for _ in 0..2 {
            for r in ranks.iter_mut() {
                dealt.push(r.next_index().unwrap());
            }
        }
        assert_eq!(dealt, all[..6]);
        assert!(ranks.iter().all(|r| r.cursor() == ranks[0].cursor()), "cursors agree after equal draws");
        // Resumed by two ranks from rank 2's cursor: the next draws continue the same sequence.
        let mut two: Vec<EpochSampler> = (0..2).map(|r| EpochSampler::new(7, 2, 3).for_rank(r, 2)).collect();
        let mut next = vec![];
        for s in two.iter_mut() {
            s.restore(ranks[2].cursor().clone()).unwrap();
        }
        for _ in 0..2 {
            for s in two.iter_mut() {
                next.push(s.next_index().unwrap());
            }
        }
        assert_eq!(next, all[6..10]);
    }
}
