//! Attention of one new token per sequence over the KV cache, read in place (decoding on the CPU).
//!
//! Burn's attention first makes its key and value inputs contiguous. A decoding step's keys
//! and values are a slice of the preallocated cache, so each step copied the whole cache once per
//! layer (11% of a decoding step at batch 32). Grouped-query attention also repeated each
//! key/value head for its query heads before that. Here each (row, query head) reads its KV head
//! straight from the cache. The scores, softmax and weighted sum of values are one pass over the
//! row's visible keys. [`write_at_rows`] writes a step's new keys and values into the cache when
//! the rows sit at different positions (continuous batching).

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{Bool, DType, Tensor, TensorData};
use rayon::prelude::*;

use crate::flex_kernels::{contiguous_f32, enabled, exp_nonpositive, f32_values, wide};

/// `a · b` in eight running sums, so that it vectorises (one running sum waits on each add's
/// latency: the scores were a tenth of a decoding step at batch 32).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a_chunks, a_rest) = a.as_chunks::<8>();
    let (b_chunks, b_rest) = b.as_chunks::<8>();
    let mut sums = [0f32; 8];
    for (x, y) in a_chunks.iter().zip(b_chunks) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum::<f32>()
}

/// One query's attention into `out` (`head_dim` values, zero): `softmax(scale q kᵀ)` over the
/// keys `hidden` leaves visible, then the weighted sum of their values; `scores` is scratch.
#[inline(always)]
fn attend<'a>(
    query: &[f32],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    hidden: &[bool],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    scores.clear();
    scores.extend(hidden.iter().enumerate().map(|(j, &hide)| if hide { f32::NEG_INFINITY } else { scale * dot(query, key(j)) }));
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return; // every key hidden: a padding row, whose output nothing reads
    }
    scores.iter_mut().for_each(|s| *s = exp_nonpositive(*s - max));
    let total: f32 = scores.iter().sum();
    for (j, &w) in scores.iter().enumerate().filter(|(_, w)| **w > 0.0) {
        for (o, &x) in out.iter_mut().zip(value(j)) {
            *o += w * x;
        }
    }
    out.iter_mut().for_each(|o| *o /= total);
}

/// `softmax(q kᵀ / sqrt(head_dim), keys hidden by `mask` left out) v` for one query per row,
/// on flex f32 without autodiff; None where Burn's attention should run.
///
/// # Shapes
/// - q: `[batch, heads, 1, head_dim]`
/// - k, v: `[batch, kv_heads, keys, head_dim]` (any strides with unit-stride rows: the cache's
///   slice), `heads` a multiple of `kv_heads`
/// - mask: `[batch, 1, keys]`, `true` hides a key
/// - output: `[batch, heads, 1, head_dim]`
pub fn one_query_attention(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, mask: &Tensor<3, Bool>) -> Option<Tensor<4>> {
    let usable =
        enabled(&q.device()) && q.dims()[2] == 1 && !q.is_autodiff() && !k.is_autodiff() && [q.dtype(), k.dtype(), v.dtype()].iter().all(|&d| d == DType::F32);
    if !usable {
        return None;
    }
    let hidden: Vec<bool> = mask.clone().into_data().try_into_vec::<bool>().ok()?;
    Some(Tensor::from_dispatch(<Dispatch as DecodeAttentionBackend>::one_query_attention(
        q.clone().into_dispatch(),
        k.clone().into_dispatch(),
        v.clone().into_dispatch(),
        hidden,
    )))
}

/// Row `r` of `new` written at position `rows[r]` of `cache` (a KV cache buffer). On flex f32
/// without autodiff, one pass over the rows, in place when the buffer is held only here;
/// elsewhere a Burn `slice_assign` per row. Slots at different positions (continuous batching)
/// took that everywhere: 512 Burn ops a step at batch 64 (a key and a value per row and layer).
///
/// # Shapes
/// - cache: `[batch, kv_heads, capacity, head_dim]`
/// - new: `[batch, kv_heads, 1, head_dim]`
pub fn write_at_rows(cache: Tensor<4>, new: &Tensor<4>, rows: &[usize]) -> Tensor<4> {
    let in_place = enabled(&cache.device()) && !cache.is_autodiff() && !new.is_autodiff() && cache.dtype() == DType::F32 && new.dtype() == DType::F32;
    if in_place {
        return Tensor::from_dispatch(<Dispatch as DecodeAttentionBackend>::write_at_rows(cache.into_dispatch(), new.clone().into_dispatch(), rows.to_vec()));
    }
    let [_, h, _, d] = cache.dims();
    rows.iter().enumerate().fold(cache, |all, (r, &p)| all.slice_assign([r..r + 1, 0..h, p..p + 1, 0..d], new.clone().slice([r..r + 1, 0..h, 0..1, 0..d])))
}

/// The kernels as a Burn backend extension, implemented for `Flex` (decoding runs without autodiff).
#[backend_extension(Flex)]
pub trait DecodeAttentionBackend: Backend {
    /// See [`one_query_attention`]; `hidden` is the mask's `[batch, keys]` values.
    fn one_query_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, hidden: Vec<bool>) -> FloatTensor<Self>;
    /// See [`write_at_rows`].
    fn write_at_rows(cache: FloatTensor<Self>, new: FloatTensor<Self>, rows: Vec<usize>) -> FloatTensor<Self>;
}

/// A 4-d flex tensor's f32 storage read in place where its rows are unit-stride: (values, offset
/// of element 0, strides).
fn strided(t: FlexTensor) -> (FlexTensor, usize, [usize; 4]) {
    let in_place = t.dtype() == DType::F32 && t.layout().strides().iter().all(|&s| s >= 0) && t.layout().strides()[3] == 1;
    let t = if in_place { t } else { contiguous_f32(t) };
    let (s, offset) = (t.layout().strides(), t.layout().start_offset());
    let strides = [s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize];
    (t, offset, strides)
}

impl DecodeAttentionBackend for Flex {
    fn one_query_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, hidden: Vec<bool>) -> FlexTensor {
        let q = contiguous_f32(q);
        let qs = q.layout().shape();
        let (batch, heads, d) = (qs[0], qs[1], qs[3]);
        let ks = k.layout().shape();
        let (kv_heads, keys) = (ks[1], ks[2]);
        assert!(
            ks[0] == batch && ks[3] == d && heads % kv_heads == 0 && hidden.len() == batch * keys,
            "one_query_attention: q {qs:?}, k {ks:?}, mask {}",
            hidden.len()
        );
        let group = heads / kv_heads;
        let ((k, k0, kst), (v, v0, vst)) = (strided(k), strided(v));
        let (kd, vd, qd) = (k.storage::<f32>(), v.storage::<f32>(), f32_values(&q));
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; batch * heads * d];
        // Each thread keeps one buffer of scores for all its (row, head) pairs.
        out.par_chunks_mut(d).enumerate().for_each_init(Vec::new, |scores, (bh, out)| {
            let (b, h) = (bh / heads, bh % heads);
            let query = &qd[bh * d..][..d];
            let hidden = &hidden[b * keys..][..keys];
            let key = |j: usize| &kd[k0 + b * kst[0] + (h / group) * kst[1] + j * kst[2]..][..d];
            let value = |j: usize| &vd[v0 + b * vst[0] + (h / group) * vst[1] + j * vst[2]..][..d];
            wide(|| attend(query, key, value, hidden, scale, scores, out));
        });
        FlexTensor::from_data(TensorData::new(out, [batch, heads, 1, d]))
    }

    fn write_at_rows(cache: FlexTensor, new: FlexTensor, rows: Vec<usize>) -> FlexTensor {
        // Contiguous as the cache allocates it; `storage_mut` copies only if the buffer is shared.
        let (mut cache, new) = (contiguous_f32(cache), contiguous_f32(new));
        let s = cache.layout().shape();
        let (batch, heads, capacity, d) = (s[0], s[1], s[2], s[3]);
        let ns = new.layout().shape();
        assert!(
            ns[0] == batch && ns[1] == heads && ns[2] == 1 && ns[3] == d && rows.len() == batch && rows.iter().all(|&p| p < capacity),
            "write_at_rows: cache {s:?}, new {ns:?}, positions {rows:?}"
        );
        let start = cache.layout().start_offset();
        let values = f32_values(&new);
        let all = &mut cache.storage_mut::<f32>()[start..];
        for (r, &p) in rows.iter().enumerate() {
            for h in 0..heads {
                let row = r * heads + h;
                all[(row * capacity + p) * d..][..d].copy_from_slice(&values[row * d..][..d]);
            }
        }
        cache
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flex_kernels::assert_close;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, Distribution};

    /// Each row's new key written at its own position equals Burn's `slice_assign` row by row,
    /// and leaves every other position as it was.
    #[test]
    fn writing_at_rows_equals_slice_assign() {
        let device = Device::flex();
        device.seed(5);
        let (b, h, cap, d) = (3, 2, 6, 4);
        let cache = Tensor::<4>::random([b, h, cap, d], Distribution::Normal(0.0, 1.0), &device);
        let new = Tensor::<4>::random([b, h, 1, d], Distribution::Normal(0.0, 1.0), &device);
        let rows = [4, 0, 5];
        let want = rows
            .iter()
            .enumerate()
            .fold(cache.clone(), |all, (r, &p)| all.slice_assign([r..r + 1, 0..h, p..p + 1, 0..d], new.clone().slice([r..r + 1, 0..h, 0..1, 0..d])));
        let got = write_at_rows(cache.clone(), &new, &rows);
        assert_eq!(got.into_data().try_to_vec::<f32>().unwrap(), want.into_data().try_to_vec::<f32>().unwrap());
    }

    /// One query per row against a slice of a larger cache buffer, 4 query heads over 2 KV heads,
    /// each row with its own hidden keys: equal to Burn's attention over the repeated heads.
    #[test]
    fn one_query_over_the_cache_equals_burns_attention() {
        let device = Device::flex();
        device.seed(11);
        let (b, h, kv, keys, d) = (3, 4, 2, 7, 8);
        let normal = |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let q = normal([b, h, 1, d]);
        let (k_cache, v_cache) = (normal([b, kv, 10, d]), normal([b, kv, 10, d]));
        let (k, v) = (k_cache.slice([0..b, 0..kv, 0..keys, 0..d]), v_cache.slice([0..b, 0..kv, 0..keys, 0..d]));
        // Row 0 sees every key, row 1 its keys 2..=6 (left padding), row 2 keys 0..=3 (a slot
        // behind the others).
        let hidden: Vec<bool> = (0..b).flat_map(|r| (0..keys).map(move |j| (r == 1 && j < 2) || (r == 2 && j > 3))).collect();
        let mask = Tensor::<3, Bool>::from_data(TensorData::new(hidden, [b, 1, keys]), &device);
        let got = one_query_attention(&q, &k, &v, &mask).expect("flex f32");
        let repeat = |x: Tensor<4>| x.unsqueeze_dim::<5>(2).expand([b, kv, h / kv, keys, d]).reshape([b, h, keys, d]);
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
        let want = attention(q, repeat(k), repeat(v), Some(mask.unsqueeze_dim::<4>(1).expand([b, h, 1, keys])), None, options);
        assert_close(got, want, 1e-5);
    }
}
