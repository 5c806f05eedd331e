//! llama.cpp's quantized tensor types, read: each block dequantized to f32 exactly as llama.cpp's
//! reference dequantizers (`ggml-quants.c`) and the `gguf` Python package compute it, in the
//! same order of f32 operations (`d * q - m` as a multiply then a subtract, never fused), so the
//! values are equal bit for bit.
//!
//! Blocks of 32 values: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0. K-quants, super-blocks of 256 values with
//! 6- or 8-bit sub-block scales: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K. Every layout is read from a byte
//! slice of whole blocks; [`QuantType::bytes_for`] checks the sizes first.

use half::f16;

/// A ggml tensor type this reader takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// Values in a K-quant super-block.
const QK_K: usize = 256;

impl QuantType {
    /// From ggml's type id; None for a type this reader does not take.
    pub fn from_ggml(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// ggml's name of the type, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::Q2K => "q2_K",
            Self::Q3K => "q3_K",
            Self::Q4K => "q4_K",
            Self::Q5K => "q5_K",
            Self::Q6K => "q6_K",
        }
    }

    /// (values, bytes) of one block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (QK_K, 84),
            Self::Q3K => (QK_K, 110),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
        }
    }

    /// The bytes of a tensor whose rows have `row` values and which has `n` values in all; an
    /// error when a row is not a whole number of blocks (ggml's rule) or the size overflows.
    pub fn bytes_for(self, row: u64, n: u64) -> Result<u64, String> {
        let (values, bytes) = self.block();
        if !row.is_multiple_of(values as u64) {
            return Err(format!("its rows of {row} values are not whole {} blocks of {values}", self.name()));
        }
        (n / values as u64).checked_mul(bytes as u64).ok_or_else(|| "its size overflows".to_string())
    }

    /// Dequantizes whole blocks (`data.len()` a multiple of the block's bytes).
    pub fn dequantize(self, data: &[u8]) -> Vec<f32> {
        let (values, bytes) = self.block();
        assert!(data.len().is_multiple_of(bytes), "{}: {} bytes are not whole blocks of {bytes}", self.name(), data.len());
        let mut out = Vec::with_capacity(data.len() / bytes * values);
        for block in data.chunks_exact(bytes) {
            match self {
                Self::F32 => out.push(f32::from_le_bytes([block[0], block[1], block[2], block[3]])),
                Self::F16 => out.push(f16_at(block, 0)),
                Self::BF16 => out.push(half::bf16::from_le_bytes([block[0], block[1]]).to_f32()),
                Self::Q4_0 => q4_0(block, &mut out),
                Self::Q4_1 => q4_1(block, &mut out),
                Self::Q5_0 => q5_0(block, &mut out),
                Self::Q5_1 => q5_1(block, &mut out),
                Self::Q8_0 => q8_0(block, &mut out),
                Self::Q2K => q2_k(block, &mut out),
                Self::Q3K => q3_k(block, &mut out),
                Self::Q4K => q4_k(block, &mut out),
                Self::Q5K => q5_k(block, &mut out),
                Self::Q6K => q6_k(block, &mut out),
            }
        }
        out
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 32 values of a 4-bit block's 16 bytes: low nibbles first, then high nibbles.
fn nibbles(qs: &[u8]) -> impl Iterator<Item = u8> + '_ {
    qs.iter().map(|q| q & 0x0F).chain(qs.iter().map(|q| q >> 4))
}

/// d (f16), 16 bytes of nibbles: `d * (q - 8)`.
fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    out.extend(nibbles(&b[2..18]).map(|q| d * (q as i8 - 8) as f32));
}

/// d, m (f16), 16 bytes of nibbles: `d * q + m`.
fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    out.extend(nibbles(&b[4..20]).map(|q| d * q as f32 + m));
}

/// The 5-bit values of a block: nibbles, with bit `i` of `qh` (little-endian u32) as value i's
/// fifth bit.
fn fives(qh: &[u8], qs: &[u8]) -> impl Iterator<Item = u8> {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    nibbles(qs).collect::<Vec<_>>().into_iter().enumerate().map(move |(i, q)| q | ((((high >> i) & 1) as u8) << 4))
}

/// d (f16), qh (4 bytes), 16 bytes of nibbles: `d * (q - 16)`.
fn q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    out.extend(fives(&b[2..6], &b[6..22]).map(|q| d * (q as i8 - 16) as f32));
}

/// d, m (f16), qh, nibbles: `d * q + m`.
fn q5_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    out.extend(fives(&b[4..8], &b[8..24]).map(|q| d * q as f32 + m));
}

/// d (f16), 32 signed bytes: `q * d`.
fn q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
}

/// Q4_K and Q5_K's eight 6-bit (scale, min) pairs, packed in 12 bytes.
fn scale_min_k4(scales: &[u8]) -> [(u8, u8); 8] {
    std::array::from_fn(|j| {
        if j < 4 {
            (scales[j] & 63, scales[j + 4] & 63)
        } else {
            ((scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
        }
    })
}

/// scales (16 bytes: 4-bit scale, 4-bit min), qs (64 bytes of 2-bit values), d, dmin (f16):
/// `d * scale * q - dmin * min` per 16 values.
fn q2_k(b: &[u8], out: &mut Vec<f32>) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for v in 0..QK_K {
        let (half, shift, l) = (v / 128, (v % 128) / 32, v % 32);
        let q = (qs[32 * half + l] >> (2 * shift)) & 3;
        let sc = scales[v / 16];
        let (dl, ml) = (d * (sc & 0x0F) as f32, dmin * (sc >> 4) as f32);
        out.push(dl * q as f32 - ml);
    }
}

/// hmask (32 bytes), qs (64 bytes of 2-bit values), scales (12 bytes: sixteen 6-bit scales), d
/// (f16): `d * (scale - 32) * (q - 4 unless the value's hmask bit is set)` per 16 values.
fn q3_k(b: &[u8], out: &mut Vec<f32>) {
    let (hmask, qs, packed) = (&b[..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    let scales: [i8; 16] = std::array::from_fn(|i| {
        let low = (packed[i % 8] >> (4 * (i / 8))) & 0x0F;
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        (low | (high << 4)) as i8 - 32
    });
    for v in 0..QK_K {
        let (half, shift, l) = (v / 128, (v % 128) / 32, v % 32);
        let low = ((qs[32 * half + l] >> (2 * shift)) & 3) as i8;
        let high_set = (hmask[l] >> (v / 32)) & 1 == 1;
        let q = low - if high_set { 0 } else { 4 };
        let dl = d * scales[v / 16] as f32;
        out.push(dl * q as f32);
    }
}

/// d, dmin (f16), scales (12 bytes), qs (128 bytes of nibbles): `d * scale * q - dmin * min` per
/// 32 values, the low nibbles of 32 bytes then their high nibbles.
fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let pairs = scale_min_k4(&b[4..16]);
    let qs = &b[16..144];
    for (sub, &(sc, m)) in pairs.iter().enumerate() {
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let bytes = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        let shift = 4 * (sub % 2);
        out.extend(bytes.iter().map(|q| d1 * ((q >> shift) & 0x0F) as f32 - m1));
    }
}

/// Q4_K's layout with a fifth bit per value in qh (32 bytes): sub-block i takes bit i.
fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let pairs = scale_min_k4(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (sub, &(sc, m)) in pairs.iter().enumerate() {
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let bytes = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        let shift = 4 * (sub % 2);
        out.extend(bytes.iter().zip(qh).map(|(q, h)| d1 * (((q >> shift) & 0x0F) | (((h >> sub) & 1) << 4)) as f32 - m1));
    }
}

/// ql (128 bytes of nibbles), qh (64 bytes of 2-bit high parts), scales (16 signed bytes), d
/// (f16): `d * scale * (q - 32)` per 16 values.
fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for v in 0..QK_K {
        let (half, chunk, l) = (v / 128, (v % 128) / 32, v % 32);
        // Chunks 0, 1: low nibbles of ql[64 half..][0..32], [32..64]; chunks 2, 3: high nibbles.
        let low = (ql[64 * half + 32 * (chunk % 2) + l] >> (4 * (chunk / 2))) & 0x0F;
        let high = (qh[32 * half + l] >> (2 * chunk)) & 0x03;
        let q = (low | (high << 4)) as i8 - 32;
        let dl = d * scales[v / 16] as i8 as f32;
        out.push(dl * q as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed blocks: the layouts as llama.cpp documents them.
    #[test]
    fn blocks_of_32_decode_by_hand() {
        // Q4_0, d = 0.5: byte j holds value j (low nibble) and value j + 16 (high nibble).
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2] = 0x9F; // value 0: 15 - 8 = 7; value 16: 9 - 8 = 1
        let y = QuantType::Q4_0.dequantize(&b);
        assert_eq!((y.len(), y[0], y[16], y[1]), (32, 3.5, 0.5, -4.0));
        // Q5_0: value 1's fifth bit from qh bit 1 and value 17's from bit 17.
        let mut b = vec![0u8; 22];
        b[..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        b[2..6].copy_from_slice(&((1u32 << 1) | (1 << 17)).to_le_bytes());
        b[6 + 1] = 0x21; // value 1: 1 | 16 = 17 -> 1; value 17: 2 | 16 = 18 -> 2
        let y = QuantType::Q5_0.dequantize(&b);
        assert_eq!((y[1], y[17], y[0]), (1.0, 2.0, -16.0));
        // Q4_1: d * q + m.
        let mut b = vec![0u8; 20];
        b[..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b[4] = 0x31;
        let y = QuantType::Q4_1.dequantize(&b);
        assert_eq!((y[0], y[16], y[2]), (1.0, 5.0, -1.0));
    }

    #[test]
    fn sizes_are_checked_by_rows_of_whole_blocks() {
        assert_eq!(QuantType::Q4K.bytes_for(512, 1024), Ok(4 * 144));
        assert!(QuantType::Q4K.bytes_for(32, 64).unwrap_err().contains("q4_K blocks of 256"));
        assert!(QuantType::Q8_0.bytes_for(32, u64::MAX / 32 * 32).is_err());
        assert_eq!(QuantType::from_ggml(99), None);
    }
}
