//! Reading a GGUF file: its header, metadata and tensor table, every size and offset checked
//! against the file before anything is allocated for it.

use std::path::Path;

use super::{ALIGNMENT, MAGIC, Value};
use crate::ModelError;
use crate::files::{ckpt_err, io_err};
use crate::quants::QuantType;

/// One tensor of a GGUF file: its name, `ne` (contiguous dimension first), type and where its
/// bytes start, relative to the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ne: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

/// A GGUF file's metadata and tensor table, and the bytes of its data section.
#[derive(Debug)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    data: memmap2::Mmap,
    data_start: usize,
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Reads the header, metadata and tensor table of `path`; every length and offset is checked
    /// against the file's size, so a truncated or corrupt file is an error naming what is wrong.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
        // SAFETY: opened read-only, and not modified while mapped.
        let data = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
        let mut r = Reader { bytes: &data, at: 0, path, items_left: MAX_METADATA_ITEMS };
        if data.len() < 4 || &data[..4] != MAGIC {
            return Err(ckpt_err(format!("{}: not a GGUF file (it does not start with `GGUF`)", path.display())));
        }
        r.at = 4;
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(ckpt_err(format!("{}: GGUF version {version} is not supported (2 or 3)", path.display())));
        }
        // Smallest encodings: a tensor's name length, dimension count, one dimension, type and
        // offset (32 bytes); a key's length, value type and a one-byte value (13 bytes).
        let n_tensors = r.count("tensor count", 32)?;
        let n_kv = r.count("metadata count", 13)?;
        let mut metadata = Vec::with_capacity(n_kv.min(PREALLOCATED_ITEMS));
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0).map_err(|e| ckpt_err(format!("{e} (metadata `{key}`)")))?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(PREALLOCATED_ITEMS));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(ckpt_err(format!("{}: tensor `{name}` has {n_dims} dimensions (1 to 4)", path.display())));
            }
            let ne = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.push(TensorInfo { name, ne, ggml_type, offset });
        }
        let alignment = metadata.iter().find(|(k, _)| k == "general.alignment").and_then(|(_, v)| v.as_u64()).unwrap_or(ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(ckpt_err(format!("{}: general.alignment {alignment} is not a power of two", path.display())));
        }
        // Past the end of the file only when there are no tensors (each is checked to lie inside).
        let data_start = (r.at as u64).checked_next_multiple_of(alignment).and_then(|s| usize::try_from(s).ok());
        let data_start = data_start.ok_or_else(|| ckpt_err(format!("{}: general.alignment {alignment} is too large", path.display())))?;
        let gguf = Self { version, metadata, tensors, data, data_start };
        for t in &gguf.tensors {
            gguf.tensor_bytes(t, path)?;
        }
        Ok(gguf)
    }

    /// The bytes of tensor `t`, checked to lie inside the file.
    fn tensor_bytes(&self, t: &TensorInfo, path: &Path) -> Result<&[u8], ModelError> {
        let err = |m: String| ckpt_err(format!("{}: tensor `{}` {m}", path.display(), t.name));
        let ty = QuantType::from_ggml(t.ggml_type).ok_or_else(|| {
            err(format!(
                "has ggml type {}; this reader takes f32 (0), f16 (1), bf16 (30), q4_0 (2), q4_1 (3), q5_0 (6), q5_1 (7), q8_0 (8), q2_K (10), q3_K (11), q4_K (12), q5_K (13) and q6_K (14)",
                t.ggml_type
            ))
        })?;
        let n = t.ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).filter(|&n| n <= usize::MAX as u64 / 4);
        let n = n.ok_or_else(|| err(format!("has an impossible shape {:?}", t.ne)))?;
        let size = ty.bytes_for(t.ne[0], n).map_err(|m| err(format!("(ne {:?}, {}): {m}", t.ne, ty.name())))?;
        // Checked: an offset near 2^64 must not wrap around to the header's bytes.
        let start = (self.data_start as u64).checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(size)).unwrap_or(u64::MAX);
        let start = start.unwrap_or(u64::MAX);
        if end > self.data.len() as u64 {
            return Err(err(format!("needs bytes {start}..{end} but the file has {} (truncated?)", self.data.len())));
        }
        Ok(&self.data[start as usize..end as usize])
    }

    /// Tensor `t` as f32 values (dequantised as llama.cpp does), in its row-major order.
    pub fn tensor_f32(&self, t: &TensorInfo, path: &Path) -> Result<Vec<f32>, ModelError> {
        let bytes = self.tensor_bytes(t, path)?;
        Ok(QuantType::from_ggml(t.ggml_type).expect("checked by tensor_bytes").dequantize(bytes))
    }
}

/// Array items of all the metadata together (a 256k vocabulary's tokens, scores, types and merges
/// are about a million): each item is a [`Value`] of 32 bytes in memory, so the cap bounds what a
/// small file that declares huge arrays of one-byte items can make us allocate (256 MiB).
const MAX_METADATA_ITEMS: usize = 1 << 23;
/// Arrays inside arrays, at most (llama.cpp writes none).
const MAX_ARRAY_NESTING: usize = 2;
/// Items reserved ahead of reading them; past this a vector grows as items are actually read.
const PREALLOCATED_ITEMS: usize = 4096;

/// Bounds-checked little-endian reads of a GGUF header.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
    /// Array items still allowed ([`MAX_METADATA_ITEMS`]).
    items_left: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], ModelError> {
        if n > self.bytes.len() - self.at {
            return Err(ckpt_err(format!("{}: truncated GGUF header (wanted {n} bytes at byte {} of {})", self.path.display(), self.at, self.bytes.len())));
        }
        self.at += n;
        Ok(&self.bytes[self.at - n..self.at])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ModelError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A count of items of at least `min_bytes` bytes each: more than the bytes left can hold is
    /// corruption, refused before anything is allocated for them.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize, ModelError> {
        let n = self.u64()?;
        if n > ((self.bytes.len() - self.at) / min_bytes) as u64 {
            return Err(ckpt_err(format!("{}: {what} {n} is larger than the rest of the file can hold (corrupt GGUF)", self.path.display())));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, ModelError> {
        let n = self.count("string length", 1)?;
        let at = self.at;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ckpt_err(format!("{}: a string at byte {at} is not UTF-8", self.path.display())))
    }
    /// A value of type `ty`, `depth` arrays deep.
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, ModelError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(ckpt_err(format!("{}: arrays nested deeper than {MAX_ARRAY_NESTING} at byte {}", self.path.display(), self.at)));
                }
                let item = self.u32()?;
                // Smallest encoding of one item: a string's or an array's length prefix.
                let min_bytes = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => 12,
                };
                let n = self.count("array length", min_bytes)?;
                self.items_left = self.items_left.checked_sub(n).ok_or_else(|| {
                    ckpt_err(format!("{}: the metadata's arrays hold more than {MAX_METADATA_ITEMS} items in all (corrupt GGUF?)", self.path.display()))
                })?;
                let mut items = Vec::with_capacity(n.min(PREALLOCATED_ITEMS));
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(ckpt_err(format!("{}: unknown GGUF value type {other} at byte {}", self.path.display(), self.at - 4))),
        })
    }
}
