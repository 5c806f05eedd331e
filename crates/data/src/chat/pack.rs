//! Packing tokenized chats into fixed-length windows for supervised fine-tuning.

use serde::{Deserialize, Serialize};

/// What to do with a conversation longer than a training sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Cut it to the sequence length (counted, with a warning).
    Truncate,
    /// Leave it out (counted, with a warning).
    Skip,
}

/// A packed training sequence: `seq_len + 1` ids, the loss mask of each *target* (ids[1..]), and
/// for each position the index of the conversation it belongs to (padding is `u32::MAX`).
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
    pub segment: Vec<u32>,
}

/// Packing statistics, reported to the user.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackStats {
    pub conversations: usize,
    pub truncated: usize,
    pub skipped: usize,
    pub sequences: usize,
    pub loss_tokens: usize,
}

/// Packs tokenized conversations whole into sequences of `seq_len + 1` tokens (a conversation
/// never straddles two sequences), padding the rest of each sequence with `pad` (masked).
pub fn pack(items: &[(Vec<u32>, Vec<bool>)], seq_len: usize, pad: u32, overlong: Overlong) -> (Vec<Packed>, PackStats) {
    let len = seq_len + 1;
    let mut stats = PackStats { conversations: items.len(), ..PackStats::default() };
    let mut out = vec![];
    let mut cur = Packed { ids: vec![], loss_mask: vec![], segment: vec![] };
    let flush = |cur: &mut Packed, out: &mut Vec<Packed>| {
        if cur.ids.is_empty() {
            return;
        }
        let n = len - cur.ids.len();
        cur.ids.extend(std::iter::repeat_n(pad, n));
        cur.loss_mask.extend(std::iter::repeat_n(false, n));
        cur.segment.extend(std::iter::repeat_n(u32::MAX, n));
        out.push(std::mem::replace(cur, Packed { ids: vec![], loss_mask: vec![], segment: vec![] }));
    };
    for (index, (ids, mask)) in items.iter().enumerate() {
        let (mut ids, mut mask) = (ids.clone(), mask.clone());
        if ids.len() > len {
            match overlong {
                Overlong::Skip => {
                    stats.skipped += 1;
                    continue;
                }
                Overlong::Truncate => {
                    stats.truncated += 1;
                    ids.truncate(len);
                    mask.truncate(len);
                }
            }
        }
        if cur.ids.len() + ids.len() > len {
            flush(&mut cur, &mut out);
        }
        cur.segment.extend(std::iter::repeat_n(index as u32, ids.len()));
        cur.ids.extend(ids);
        cur.loss_mask.extend(mask);
    }
    flush(&mut cur, &mut out);
    // The mask so far is per position; the loss of position t is on target ids[t + 1].
    for p in &mut out {
        p.loss_mask.remove(0);
        stats.loss_tokens += p.loss_mask.iter().filter(|&&m| m).count();
    }
    stats.sequences = out.len();
    (out, stats)
}
