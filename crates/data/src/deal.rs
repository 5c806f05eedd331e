//! One sequence of draws dealt over the ranks of a job: the packed reader's windows and an epoch
//! sampler's indices are both drawn in the same order on every rank, and each rank keeps every
//! `world`-th draw, so the ranks together see what one process would.

/// A sequence every rank draws in the same order.
pub(crate) trait Draws {
    type Item;
    type Error;
    /// Draws made so far (all ranks').
    fn drawn(&self) -> u64;
    /// The next draw of the one sequence, or None when it ends.
    fn draw(&mut self) -> Result<Option<Self::Item>, Self::Error>;
}

/// Rank `rank` of `world` keeps draws `start + rank`, `start + rank + world`, ...; `start` is
/// where the reading began (0, or a restored cursor's position).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deal {
    pub rank: u64,
    pub world: u64,
    pub start: u64,
}

impl Deal {
    /// This rank's next draw. The rest of its round (the other ranks' draws) is passed at once,
    /// so after the same number of draws every rank's position is the same: any rank's cursor
    /// resumes the whole job, at any world size.
    pub fn next<D: Draws>(&self, draws: &mut D) -> Result<Option<D::Item>, D::Error> {
        loop {
            let at = draws.drawn() - self.start;
            let Some(item) = draws.draw()? else { return Ok(None) };
            if at % self.world == self.rank {
                while !(draws.drawn() - self.start).is_multiple_of(self.world) && draws.draw()?.is_some() {}
                return Ok(Some(item));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Count(u64, u64);

    impl Draws for Count {
        type Item = u64;
        type Error = ();
        fn drawn(&self) -> u64 {
            self.0
        }
        fn draw(&mut self) -> Result<Option<u64>, ()> {
            if self.0 == self.1 {
                return Ok(None);
            }
            self.0 += 1;
            Ok(Some(self.0 - 1))
        }
    }

    #[test]
    fn ranks_take_turns_and_end_each_round_together() {
        for (start, world) in [(0, 1), (0, 3), (4, 3)] {
            let mut all = vec![];
            for rank in 0..world {
                let deal = Deal { rank, world, start };
                let mut d = Count(start, 11);
                while let Some(i) = deal.next(&mut d).unwrap() {
                    assert_eq!((i - start) % world, rank);
                    assert!((d.drawn() - start).is_multiple_of(world) || d.drawn() == 11, "a rank stops at the end of a round (or of the sequence)");
                    all.push(i);
                }
            }
            all.sort();
            assert_eq!(all, (start..11).collect::<Vec<_>>(), "start {start}, world {world}: every draw once");
        }
    }
}
