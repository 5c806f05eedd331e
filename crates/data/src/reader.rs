//! The streaming packed reader every token-training stage reads from.
//!
//! Documents are streamed row group by row group (never a whole shard set in memory), each
//! emitted as `[BOS] doc [EOS]`, concatenated, and cut into disjoint windows of `seq_len + 1`
//! tokens (inputs are `window[..seq_len]`, targets `window[1..]`). The unit of shuffling is the
//! row group: their order is permuted per epoch from the seed, and documents are permuted within
//! each. Window `k` of the global stream belongs to rank `k % world_size`, so across ranks one
//! epoch yields every packed token exactly once (the final partial window is dropped).
//!
//! [`Cursor`] is the whole position in that stream; it serialises, and a reader restored from a
//! saved cursor yields exactly the windows an uninterrupted reader would have.

use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::deal::{Deal, Draws};
use crate::shards::{Manifest, ShardFile, Split, split_files};

/// Position in the packed stream, taken between windows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    /// Index into this epoch's row-group order.
    pub unit: usize,
    /// Index into the current row group's document order.
    pub doc: usize,
    /// Tokens of the current `[BOS] doc [EOS]` already emitted.
    pub offset: usize,
    /// Windows of the global stream produced so far (all ranks).
    pub window: u64,
    /// The shards this position is in (absent in cursors saved before it was recorded): a
    /// restore into other shards is refused, saying what changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<Vec<ShardSummary>>,
}

/// One shard file as a cursor records it: enough to tell that the shard set a run resumes on
/// is not the one it saved its position in (prepared again with other row groups, a shard
/// added, removed or rewritten).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSummary {
    pub file: String,
    pub bytes: u64,
    pub row_groups: usize,
    pub documents: usize,
}

impl ShardSummary {
    fn of(file: &ShardFile) -> Self {
        Self {
            file: file.path.file_name().map_or_else(|| file.path.display().to_string(), |n| n.to_string_lossy().into_owned()),
            bytes: std::fs::metadata(&file.path).map_or(0, |m| m.len()),
            row_groups: file.row_groups.len(),
            documents: file.documents(),
        }
    }
}

/// What differs between the shard set a cursor was saved in and the one now, in words.
fn shard_changes(then: &[ShardSummary], now: &[ShardSummary]) -> String {
    let describe = |s: &ShardSummary| format!("{} bytes, {} row groups, {} documents", s.bytes, s.row_groups, s.documents);
    for s in then {
        match now.iter().find(|n| n.file == s.file) {
            None => return format!("{} is gone", s.file),
            Some(n) if n != s => return format!("{} had {} and now has {}", s.file, describe(s), describe(n)),
            _ => {}
        }
    }
    match now.iter().find(|n| !then.iter().any(|s| s.file == n.file)) {
        Some(n) => format!("{} is new", n.file),
        None => "the shards are in another order".into(),
    }
}

/// How to read: window length, sharding across ranks, shuffling, epochs.
#[derive(Debug, Clone, PartialEq)]
pub struct ReaderConfig {
    pub seq_len: usize,
    pub rank: usize,
    pub world_size: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Stop after this many epochs (None: cycle forever, for step-budgeted training).
    pub epochs: Option<u64>,
    /// Emit BOS before each document (Llama does).
    pub add_bos: bool,
}

impl ReaderConfig {
    pub fn new(seq_len: usize) -> Self {
        Self { seq_len, rank: 0, world_size: 1, seed: 0, shuffle: true, epochs: None, add_bos: true }
    }
}

/// Streams packed windows from a split of a shard directory.
pub struct PackedReader {
    /// `DIR (split)`, for errors.
    origin: String,
    files: Vec<ShardFile>,
    /// (file, row group) of every non-empty row group.
    units: Vec<(usize, usize)>,
    vocab_size: usize,
    bos: u32,
    eos: u32,
    config: ReaderConfig,
    cursor: Cursor,
    /// The global window the rounds of `world_size` windows are counted from.
    round_start: u64,
    order: Option<(u64, Vec<usize>)>,
    loaded: Option<(u64, usize, Vec<Vec<u32>>)>,
}

fn mix(a: u64, b: u64) -> u64 {
    // splitmix64 of a combination: decorrelates seeds for epochs and row groups.
    let mut z = a.wrapping_add(b.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl PackedReader {
    /// Opens `split` of `dir`. With a manifest, its vocab size and special ids are used and
    /// checked against `vocab_size`; without one (shards written by others), `bos`/`eos` are
    /// Llama's 1 and 2.
    pub fn open(dir: &Path, split: Split, vocab_size: usize, config: ReaderConfig) -> Result<Self, DataError> {
        if config.seq_len == 0 {
            return Err(DataError::Config("seq_len must be > 0".into()));
        }
        if config.world_size == 0 || config.rank >= config.world_size {
            return Err(DataError::Config(format!("rank {} is not in 0..world_size {}", config.rank, config.world_size)));
        }
        let (bos, eos) = if dir.join(crate::shards::MANIFEST).is_file() {
            let m = Manifest::load(dir)?;
            if m.vocab_size > vocab_size {
                return Err(DataError::Shard(format!(
                    "{}: shards use a vocabulary of {} ids, larger than the model's {vocab_size}",
                    dir.join(crate::shards::MANIFEST).display(),
                    m.vocab_size
                )));
            }
            (m.bos_id, m.eos_id)
        } else {
            (1, 2)
        };
        let paths = split_files(dir, split)?;
        let files = paths.iter().map(|p| ShardFile::open(p)).collect::<Result<Vec<_>, _>>()?;
        let units: Vec<(usize, usize)> =
            files.iter().enumerate().flat_map(|(f, file)| file.row_groups.iter().enumerate().filter(|(_, n)| **n > 0).map(move |(rg, _)| (f, rg))).collect();
        if units.is_empty() {
            return Err(DataError::Empty(format!("{}: the {} split has no documents", dir.display(), split.name())));
        }
        let cursor = Cursor { shards: Some(files.iter().map(ShardSummary::of).collect()), ..Cursor::default() };
        let origin = format!("{} ({} split)", dir.display(), split.name());
        Ok(Self { origin, files, units, vocab_size, bos, eos, config, cursor, round_start: 0, order: None, loaded: None })
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Continues from a saved cursor; refused if it was saved in other shards than these.
    pub fn restore(&mut self, cursor: Cursor) -> Result<(), DataError> {
        let now = self.cursor.shards.clone().unwrap_or_default();
        if let Some(then) = &cursor.shards
            && *then != now
        {
            return Err(DataError::Config(format!(
                "{}: the shards changed since the data position was saved ({}); resuming would read other data than the run saw: restore those shards, or start a fresh run",
                self.origin,
                shard_changes(then, &now)
            )));
        }
        if cursor.unit >= self.units.len() {
            return Err(DataError::Config(format!(
                "{}: the data cursor points at row group {} of {}: the shards changed since it was saved",
                self.origin,
                cursor.unit,
                self.units.len()
            )));
        }
        let cursor = Cursor { shards: Some(now), ..cursor };
        self.round_start = cursor.window;
        self.cursor = cursor;
        Ok(())
    }

    pub fn documents(&self) -> usize {
        self.files.iter().map(ShardFile::documents).sum()
    }

    /// The next window of `seq_len + 1` tokens for this rank, or None when the epochs are done.
    ///
    /// Windows are dealt in rounds of `world_size` from where the reader started (window 0, or
    /// the restored cursor; see [`Deal::next`]), so any rank's cursor resumes the whole job, at
    /// any world size.
    pub fn next_window(&mut self) -> Result<Option<Vec<u32>>, DataError> {
        Deal { rank: self.config.rank as u64, world: self.config.world_size as u64, start: self.round_start }.next(self)
    }

    /// `batch` windows, or None if the stream ends before the batch is full.
    pub fn next_batch(&mut self, batch: usize) -> Result<Option<Vec<Vec<u32>>>, DataError> {
        let mut out = Vec::with_capacity(batch);
        for _ in 0..batch {
            match self.next_window()? {
                Some(w) => out.push(w),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    /// The next window of the global stream (every rank's).
    fn next_global_window(&mut self) -> Result<Option<Vec<u32>>, DataError> {
        let len = self.config.seq_len + 1;
        let mut out = Vec::with_capacity(len);
        let mut c = self.cursor.clone();
        while out.len() < len {
            if self.config.epochs.is_some_and(|e| c.epoch >= e) {
                return Ok(None); // the partial window is dropped; the cursor stays put
            }
            self.load(c.epoch, c.unit)?;
            let docs = &self.loaded.as_ref().expect("loaded above").2;
            let n_docs = docs.len();
            let bos = usize::from(self.config.add_bos);
            // Only a cursor saved in other shards (before cursors recorded them) points past these.
            let Some(doc) = docs.get(c.doc).filter(|d| c.offset < bos + d.len() + 1) else {
                return Err(DataError::Config(format!(
                    "{}: the data cursor points at token {} of document {} of a row group of {n_docs}: the shards changed since it was saved",
                    self.origin, c.offset, c.doc
                )));
            };
            let seq_len = bos + doc.len() + 1;
            let take = (len - out.len()).min(seq_len - c.offset);
            for i in c.offset..c.offset + take {
                out.push(if i < bos {
                    self.bos
                } else if i == seq_len - 1 {
                    self.eos
                } else {
                    doc[i - bos]
                });
            }
            c.offset += take;
            if c.offset == seq_len {
                c.offset = 0;
                c.doc += 1;
                if c.doc == n_docs {
                    c.doc = 0;
                    c.unit += 1;
                    if c.unit == self.units.len() {
                        c.unit = 0;
                        c.epoch += 1;
                    }
                }
            }
        }
        c.window += 1;
        self.cursor = c;
        Ok(Some(out))
    }

    fn unit_order(&mut self, epoch: u64) -> &[usize] {
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.units.len()).collect();
            if self.config.shuffle {
                order.shuffle(&mut StdRng::seed_from_u64(mix(self.config.seed, epoch)));
            }
            self.order = Some((epoch, order));
        }
        &self.order.as_ref().expect("set above").1
    }

    fn load(&mut self, epoch: u64, unit_pos: usize) -> Result<&Vec<Vec<u32>>, DataError> {
        let fresh = self.loaded.as_ref().is_some_and(|(e, u, _)| *e == epoch && *u == unit_pos);
        if !fresh {
            let unit = self.unit_order(epoch)[unit_pos];
            let (f, rg) = self.units[unit];
            let mut docs = self.files[f].read_row_group(rg, self.vocab_size)?;
            if self.config.shuffle {
                docs.shuffle(&mut StdRng::seed_from_u64(mix(mix(self.config.seed, epoch), unit as u64 + 1)));
            }
            self.loaded = Some((epoch, unit_pos, docs));
        }
        Ok(&self.loaded.as_ref().expect("loaded above").2)
    }
}

impl Draws for PackedReader {
    type Item = Vec<u32>;
    type Error = DataError;

    fn drawn(&self) -> u64 {
        self.cursor.window
    }

    fn draw(&mut self) -> Result<Option<Vec<u32>>, DataError> {
        self.next_global_window()
    }
}
