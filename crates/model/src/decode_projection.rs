//! A decoding step's products on the CPU: a few rows of hidden states (8 to 64) against a
//! layer's weight or the output projection's (bench-small: 32 x 256 against 32,000 x 256, most
//! of the step's FLOPs).
//!
//! gemm packs the large operand (the weight) on every call and so reads it twice and writes it
//! once per token; at 8 to 64 rows that costs more than the arithmetic. Here each step streams
//! the weight once, in panels of [`PANEL`] output columns, while a group of rows accumulates in
//! registers:
//! - the output projection's `[vocab, dim]` weight is packed once per generation into panels
//!   (`[vocab / 32][dim][32]`, zero-padded; [`PackedVocab`]). AVX-512, 2 threads, the product
//!   alone: 8 rows 6.5 → 2.7 ms, 32 rows 9.2 → 5.1 ms, 64 rows 12.3 → 10 ms against gemm. The
//!   logits come out as `[rows, vocab]`, so the sampler reads them without a transposed copy;
//! - a Linear layer's `[d_in, d_out]` weight is read in place ([`rows_times_weight`],
//!   [`decode_linear`]): its 32 columns from `32 p` are a panel whose rows lie `d_out` apart.
//!
//! The kernels are x86-64 intrinsics (AVX-512F, or AVX2 with FMA), chosen at run time; elsewhere
//! nothing here applies and gemm runs.

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

/// Vocabulary entries per panel: two AVX-512 (four AVX2) vectors of f32.
const PANEL: usize = 32;

/// Panels per rayon task (512 vocabulary entries: 63 tasks for Llama 2's 32,000).
const PANELS_PER_TASK: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Isa {
    Avx512,
    Avx2,
}

/// The output projection's weight packed for [`PackedVocab::logits`].
#[derive(Debug, Clone)]
pub struct PackedVocab {
    panels: Vec<f32>,
    vocab: usize,
    dim: usize,
    isa: Isa,
}

impl PackedVocab {
    /// Whether this CPU has the kernels' instructions (AVX-512F, or AVX2 with FMA), so that
    /// [`PackedVocab::new`] packs.
    pub fn supported() -> bool {
        detect().is_some()
    }

    /// Packs `weight`, a row-major `[vocab, dim]` matrix (row `v` is token `v`'s output vector);
    /// None where this CPU has neither AVX-512F nor AVX2 with FMA.
    pub fn new(weight: &[f32], vocab: usize, dim: usize) -> Option<Self> {
        let isa = detect()?;
        assert_eq!(weight.len(), vocab * dim, "PackedVocab: the weight is not [vocab, dim]");
        let mut panels = vec![0f32; vocab.div_ceil(PANEL) * PANEL * dim];
        panels.par_chunks_mut(PANEL * dim).enumerate().for_each(|(p, panel)| {
            for lane in 0..PANEL.min(vocab - p * PANEL) {
                let row = &weight[(p * PANEL + lane) * dim..][..dim];
                for (k, &w) in row.iter().enumerate() {
                    panel[k * PANEL + lane] = w;
                }
            }
        });
        Some(Self { panels, vocab, dim, isa })
    }

    /// `hidden · weightᵀ`: the logits of each row, in f32.
    ///
    /// # Shapes
    /// - hidden: `[rows, dim]`, row-major
    /// - output: `[rows, vocab]`, row-major
    pub fn logits(&self, hidden: &[f32], rows: usize) -> Vec<f32> {
        let mut out = Vec::new();
        self.logits_into(hidden, rows, &mut out);
        out
    }

    /// [`PackedVocab::logits`] into `out`, whose allocation is reused where it is large enough
    /// (a decoding step hands back the last step's logits).
    pub fn logits_into(&self, hidden: &[f32], rows: usize, out: &mut Vec<f32>) {
        assert_eq!(hidden.len(), rows * self.dim, "PackedVocab::logits: hidden is not [rows, dim]");
        // Not zeroed first: the kernels write every value (8 MB a step at 64 rows, whose memset
        // or fresh pages cost more than a tenth of the product).
        out.clear();
        out.reserve(rows * self.vocab);
        // SAFETY: `detect` found the instructions (`new`); panel `p` is `[dim][PANEL]` at
        // `p * PANEL * dim`, zero-padded past the vocabulary.
        unsafe { panels_times(self.isa, hidden, rows, self.dim, &self.panels, PANEL * self.dim, PANEL, out.spare_capacity_mut(), self.vocab, self.vocab) };
        // SAFETY: the kernels wrote columns `0..vocab` of every row.
        unsafe { out.set_len(rows * self.vocab) };
    }
}

/// `x · w` for a few rows (a decoding step's) against a row-major `[d_in, d_out]` weight (a
/// Linear layer's, as Burn stores it), read in place: its columns `32 p..32 p + 32` are a panel
/// whose rows lie `d_out` apart. gemm packs the weight on every call, which at 8 to 64 rows costs
/// more than the product. The last `d_out % 32` columns go through a zero-padded copy. None where
/// this CPU has neither AVX-512F nor AVX2 with FMA.
///
/// # Shapes
/// - x: `[rows, d_in]`, row-major
/// - w: `[d_in, d_out]`, row-major
/// - output: `[rows, d_out]`, row-major
pub fn rows_times_weight(x: &[f32], rows: usize, w: &[f32], d_in: usize, d_out: usize) -> Option<Vec<f32>> {
    Some(rows_times_weight_on(detect()?, x, rows, w, d_in, d_out))
}

/// [`rows_times_weight`] with the kernels of `isa` (present on this CPU).
fn rows_times_weight_on(isa: Isa, x: &[f32], rows: usize, w: &[f32], d_in: usize, d_out: usize) -> Vec<f32> {
    assert!(x.len() == rows * d_in && w.len() == d_in * d_out, "rows_times_weight: x is not [rows, d_in] or w not [d_in, d_out]");
    let mut out = Vec::with_capacity(rows * d_out);
    let whole = d_out / PANEL * PANEL;
    // SAFETY: the instructions were found; panel `p` starts at column `p * PANEL` and its `d_in`
    // rows of `PANEL` values lie `d_out` apart, all inside `w` (`whole <= d_out`).
    unsafe { panels_times(isa, x, rows, d_in, w, PANEL, d_out, out.spare_capacity_mut(), d_out, whole) };
    if whole < d_out {
        let cols = d_out - whole;
        let mut tail = vec![0f32; d_in * PANEL];
        for (k, row) in tail.chunks_exact_mut(PANEL).enumerate() {
            row[..cols].copy_from_slice(&w[k * d_out + whole..][..cols]);
        }
        // SAFETY: as above, one packed panel of `d_in` rows of `PANEL`; its `cols` columns go
        // straight to columns `whole..d_out` of each row.
        unsafe { panels_times(isa, x, rows, d_in, &tail, PANEL, PANEL, &mut out.spare_capacity_mut()[whole..], d_out, cols) };
    }
    // SAFETY: the kernels wrote columns `0..whole` of every row, then `whole..d_out`.
    unsafe { out.set_len(rows * d_out) };
    out
}

/// The rows most a step sends through [`decode_linear`]: beyond them gemm's packing pays.
pub const DECODE_ROWS: usize = 64;

/// `x · w` (a Linear layer without bias) by [`rows_times_weight`], for up to [`DECODE_ROWS`]
/// rows on flex in f32 without autodiff (a decoding step); None where Burn's matmul should run.
///
/// # Shapes
/// - x: `[rows, d_in]`
/// - w: `[d_in, d_out]`
/// - output: `[rows, d_out]`
pub fn decode_linear(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    let usable = crate::flex_kernels::enabled(&x.device())
        && x.dims()[0] <= DECODE_ROWS
        && !x.is_autodiff()
        && !w.is_autodiff()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && detect().is_some();
    usable.then(|| Tensor::from_dispatch(<Dispatch as DecodeLinearBackend>::decode_linear(x.clone().into_dispatch(), w.clone().into_dispatch())))
}

/// [`decode_linear`] as a Burn backend extension, implemented for `Flex` (decoding runs without
/// autodiff).
#[backend_extension(Flex)]
pub trait DecodeLinearBackend: Backend {
    /// See [`decode_linear`].
    fn decode_linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl DecodeLinearBackend for Flex {
    fn decode_linear(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        use crate::flex_kernels::{contiguous_f32, f32_values};
        // The weight is contiguous as a model holds it (a transposed view would be copied here).
        let (x, w) = (contiguous_f32(x), contiguous_f32(w));
        let ([rows, d_in], [w_in, d_out]) = (dims2(&x), dims2(&w));
        assert_eq!(d_in, w_in, "decode_linear: x [{rows}, {d_in}] against w [{w_in}, {d_out}]");
        let out = rows_times_weight(f32_values(&x), rows, f32_values(&w), d_in, d_out).expect("decode_linear checked the instructions");
        FlexTensor::from_data(TensorData::new(out, [rows, d_out]))
    }
}

fn dims2(t: &FlexTensor) -> [usize; 2] {
    let s = t.layout().shape();
    [s[0], s[1]]
}

/// Columns `0..cols` of `out` (rows `out_stride` apart, the last one may end at column `cols`;
/// written without being read, so it may be uninitialised) = `x · W`, where W's columns come in panels of [`PANEL`]: panel `p` starts at
/// `w[p * panel_step]`, and its row `k` (the `PANEL` values of input `k`) at `k * row_stride`
/// further. Panels are dealt to rayon tasks.
///
/// # Safety
/// `isa`'s instructions are present; every panel that starts below column `cols` has `d_in` rows
/// of `PANEL` readable values inside `w`.
#[allow(clippy::too_many_arguments)]
unsafe fn panels_times(
    isa: Isa,
    x: &[f32],
    rows: usize,
    d_in: usize,
    w: &[f32],
    panel_step: usize,
    row_stride: usize,
    out: &mut [std::mem::MaybeUninit<f32>],
    out_stride: usize,
    cols: usize,
) {
    assert!(x.len() >= rows * d_in && (rows == 0 || out.len() >= (rows - 1) * out_stride + cols) && cols <= out_stride);
    let out_at = SharedOut(out.as_mut_ptr().cast::<f32>());
    let panels = cols.div_ceil(PANEL);
    // A few panels per task, but at least about eight tasks (a layer of 256 outputs has 8 panels).
    let per_task = PANELS_PER_TASK.min(panels.div_ceil(8)).max(1);
    (0..panels.div_ceil(per_task)).into_par_iter().for_each(|task| {
        let out_at = &out_at;
        for p in task * per_task..((task + 1) * per_task).min(panels) {
            let panel = &w[p * panel_step..];
            let width = PANEL.min(cols - p * PANEL);
            // SAFETY: the caller vouches for the instructions and the panel's rows; each task
            // writes columns `p * PANEL..+width` of every row of `out`, which no other task writes.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                match isa {
                    Isa::Avx512 => avx512::panel(x, rows, d_in, panel, row_stride, out_at.0.add(p * PANEL), out_stride, width),
                    Isa::Avx2 => avx2::panel(x, rows, d_in, panel, row_stride, out_at.0.add(p * PANEL), out_stride, width),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (panel, width, out_at, isa, row_stride);
                unreachable!("the kernels are built on x86-64 only");
            }
        }
    });
}

/// The output buffer shared by the tasks, each writing its own columns.
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint columns (see `logits`).
unsafe impl Sync for SharedOut {}

#[cfg(target_arch = "x86_64")]
fn detect() -> Option<Isa> {
    if std::arch::is_x86_feature_detected!("avx512f") {
        Some(Isa::Avx512)
    } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        Some(Isa::Avx2)
    } else {
        None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Option<Isa> {
    None
}

/// Stores `cols` of a row's `PANEL` accumulated values at `out` (all of them but in the last,
/// ragged panel).
///
/// # Safety
/// `out` is valid for `cols` writes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store(out: *mut f32, values: &[f32; PANEL], cols: usize) {
    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), out, cols) }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{PANEL, store};
    use std::arch::x86_64::*;

    /// Every row of `x` against one panel (row `k` at `panel[k * row_stride..]`), `G` rows at a
    /// time (12 rows: 24 accumulators), the last few rows in one smaller group.
    ///
    /// # Safety
    /// AVX-512F is present; the panel has `d_in` rows of `PANEL` values; `out` (row stride
    /// `out_stride`) is valid for `cols` writes in each of `rows` rows.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn panel(x: &[f32], rows: usize, d_in: usize, panel: &[f32], row_stride: usize, out: *mut f32, out_stride: usize, cols: usize) {
        let mut r = 0;
        unsafe {
            let at = |r: usize| (&x[r * d_in..], out.add(r * out_stride));
            while r + 12 <= rows {
                let (x, out) = at(r);
                rows_of::<12>(x, d_in, panel, row_stride, out, out_stride, cols);
                r += 12;
            }
            let (x, out) = at(r);
            match rows - r {
                0 => {}
                1 => rows_of::<1>(x, d_in, panel, row_stride, out, out_stride, cols),
                2 => rows_of::<2>(x, d_in, panel, row_stride, out, out_stride, cols),
                3 => rows_of::<3>(x, d_in, panel, row_stride, out, out_stride, cols),
                4 => rows_of::<4>(x, d_in, panel, row_stride, out, out_stride, cols),
                5 => rows_of::<5>(x, d_in, panel, row_stride, out, out_stride, cols),
                6 => rows_of::<6>(x, d_in, panel, row_stride, out, out_stride, cols),
                7 => rows_of::<7>(x, d_in, panel, row_stride, out, out_stride, cols),
                8 => rows_of::<8>(x, d_in, panel, row_stride, out, out_stride, cols),
                9 => rows_of::<9>(x, d_in, panel, row_stride, out, out_stride, cols),
                10 => rows_of::<10>(x, d_in, panel, row_stride, out, out_stride, cols),
                _ => rows_of::<11>(x, d_in, panel, row_stride, out, out_stride, cols),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows_of<const G: usize>(x: &[f32], d_in: usize, panel: &[f32], row_stride: usize, out: *mut f32, out_stride: usize, cols: usize) {
        assert!(x.len() >= G * d_in && panel.len() >= d_in.saturating_sub(1) * row_stride + PANEL);
        let (h, w) = (x.as_ptr(), panel.as_ptr());
        let mut lo = [_mm512_setzero_ps(); G];
        let mut hi = [_mm512_setzero_ps(); G];
        for k in 0..d_in {
            // SAFETY: k < d_in, so both loads are inside the panel and each h read inside G rows.
            unsafe {
                let (w_lo, w_hi) = (_mm512_loadu_ps(w.add(k * row_stride)), _mm512_loadu_ps(w.add(k * row_stride + 16)));
                for j in 0..G {
                    let x = _mm512_set1_ps(*h.add(j * d_in + k));
                    lo[j] = _mm512_fmadd_ps(x, w_lo, lo[j]);
                    hi[j] = _mm512_fmadd_ps(x, w_hi, hi[j]);
                }
            }
        }
        for j in 0..G {
            // SAFETY: `values` holds 32 f32; the caller vouches for `cols` values at each row of
            // `out` (a whole panel's are stored straight, without a copy call per row).
            unsafe {
                if cols == PANEL {
                    _mm512_storeu_ps(out.add(j * out_stride), lo[j]);
                    _mm512_storeu_ps(out.add(j * out_stride + 16), hi[j]);
                } else {
                    let mut values = [0f32; PANEL];
                    _mm512_storeu_ps(values.as_mut_ptr(), lo[j]);
                    _mm512_storeu_ps(values.as_mut_ptr().add(16), hi[j]);
                    store(out.add(j * out_stride), &values, cols);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{PANEL, store};
    use std::arch::x86_64::*;

    /// Every row of `x` against one panel (row `k` at `panel[k * row_stride..]`), by halves of
    /// 16 columns, `G` rows at a time (6 rows: 12 accumulators of the 16 registers), the last few
    /// rows in one smaller group (a lone row's two accumulators would wait on the FMA latency).
    ///
    /// # Safety
    /// AVX2 and FMA are present; the panel has `d_in` rows of `PANEL` values; `out` (row stride
    /// `out_stride`) is valid for `cols` writes in each of `rows` rows.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn panel(x: &[f32], rows: usize, d_in: usize, panel: &[f32], row_stride: usize, out: *mut f32, out_stride: usize, cols: usize) {
        let mut r = 0;
        unsafe {
            let at = |r: usize| (&x[r * d_in..], out.add(r * out_stride));
            while r + 6 <= rows {
                let (x, out) = at(r);
                rows_of::<6>(x, d_in, panel, row_stride, out, out_stride, cols);
                r += 6;
            }
            let (x, out) = at(r);
            match rows - r {
                0 => {}
                1 => rows_of::<1>(x, d_in, panel, row_stride, out, out_stride, cols),
                2 => rows_of::<2>(x, d_in, panel, row_stride, out, out_stride, cols),
                3 => rows_of::<3>(x, d_in, panel, row_stride, out, out_stride, cols),
                4 => rows_of::<4>(x, d_in, panel, row_stride, out, out_stride, cols),
                _ => rows_of::<5>(x, d_in, panel, row_stride, out, out_stride, cols),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn rows_of<const G: usize>(x: &[f32], d_in: usize, panel: &[f32], row_stride: usize, out: *mut f32, out_stride: usize, cols: usize) {
        assert!(x.len() >= G * d_in && panel.len() >= d_in.saturating_sub(1) * row_stride + PANEL);
        let (h, w) = (x.as_ptr(), panel.as_ptr());
        for half in [0, 16] {
            let mut lo = [_mm256_setzero_ps(); G];
            let mut hi = [_mm256_setzero_ps(); G];
            for k in 0..d_in {
                // SAFETY: k < d_in and half + 8 + 8 <= PANEL: inside the panel and the G rows.
                unsafe {
                    let (w_lo, w_hi) = (_mm256_loadu_ps(w.add(k * row_stride + half)), _mm256_loadu_ps(w.add(k * row_stride + half + 8)));
                    for j in 0..G {
                        let x = _mm256_set1_ps(*h.add(j * d_in + k));
                        lo[j] = _mm256_fmadd_ps(x, w_lo, lo[j]);
                        hi[j] = _mm256_fmadd_ps(x, w_hi, hi[j]);
                    }
                }
            }
            for j in 0..G {
                // SAFETY: the caller vouches for `cols` values at each row of `out`: a whole
                // half is stored straight, the valid part of a ragged one through a copy.
                unsafe {
                    let out = out.add(j * out_stride + half);
                    if cols >= half + 16 {
                        _mm256_storeu_ps(out, lo[j]);
                        _mm256_storeu_ps(out.add(8), hi[j]);
                    } else if cols > half {
                        let mut values = [0f32; PANEL];
                        _mm256_storeu_ps(values.as_mut_ptr(), lo[j]);
                        _mm256_storeu_ps(values.as_mut_ptr().add(8), hi[j]);
                        store(out, &values, cols - half);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packed logits equal the plain product (to f32 rounding of 70-term sums) for row counts
    /// that take every group size and a vocabulary that ends in a ragged panel, on each kernel
    /// this CPU has.
    #[test]
    fn packed_logits_are_the_product() {
        let (vocab, dim) = (1000, 70);
        let value = |i: usize, k: f32| ((i as f32 * 0.377 + k).sin()) * 0.5;
        let weight: Vec<f32> = (0..vocab * dim).map(|i| value(i, 0.0)).collect();
        let Some(packed) = PackedVocab::new(&weight, vocab, dim) else {
            eprintln!("no AVX-512 or AVX2 + FMA here: nothing to check");
            return;
        };
        let mut kernels = vec![packed.clone()];
        if packed.isa == Isa::Avx512 && detect_avx2() {
            kernels.push(PackedVocab { isa: Isa::Avx2, ..packed });
        }
        for packed in kernels {
            for rows in (1..=13).chain([17, 32]) {
                let hidden: Vec<f32> = (0..rows * dim).map(|i| value(i, 1.0)).collect();
                let got = packed.logits(&hidden, rows);
                assert_eq!(got.len(), rows * vocab);
                for r in 0..rows {
                    for v in 0..vocab {
                        let want: f64 = (0..dim).map(|k| hidden[r * dim + k] as f64 * weight[v * dim + k] as f64).sum();
                        let g = got[r * vocab + v] as f64;
                        assert!((g - want).abs() <= 1e-5 * (1.0 + want.abs()), "{:?}, {rows} rows: logit ({r}, {v}) {g} vs {want}", packed.isa);
                    }
                }
            }
        }
    }

    /// A Linear weight read in place equals the plain product, for every group size of both
    /// kernels, output widths with and without a ragged last panel (and one that is all tail),
    /// on each kernel this CPU has.
    #[test]
    fn rows_times_weight_is_the_product() {
        let Some(isa) = detect() else {
            eprintln!("no AVX-512 or AVX2 + FMA here: nothing to check");
            return;
        };
        let mut isas = vec![isa];
        if isa == Isa::Avx512 && detect_avx2() {
            isas.push(Isa::Avx2);
        }
        let value = |i: usize, k: f32| ((i as f32 * 0.377 + k).sin()) * 0.5;
        let d_in = 70;
        for isa in isas {
            for d_out in [64, 100, 16] {
                let w: Vec<f32> = (0..d_in * d_out).map(|i| value(i, 0.0)).collect();
                for rows in (1..=25).chain([32, 64]) {
                    let x: Vec<f32> = (0..rows * d_in).map(|i| value(i, 1.0)).collect();
                    let got = rows_times_weight_on(isa, &x, rows, &w, d_in, d_out);
                    assert_eq!(got.len(), rows * d_out);
                    for r in 0..rows {
                        for c in 0..d_out {
                            let want: f64 = (0..d_in).map(|k| x[r * d_in + k] as f64 * w[k * d_out + c] as f64).sum();
                            let g = got[r * d_out + c] as f64;
                            assert!((g - want).abs() <= 1e-5 * (1.0 + want.abs()), "{isa:?}, {rows} x {d_out}: ({r}, {c}) {g} vs {want}");
                        }
                    }
                }
            }
        }
    }

    /// Through the model's path: a decoding step's product on flex equals Burn's matmul, and
    /// more rows than [`DECODE_ROWS`] or an autodiff input leave it to Burn.
    #[test]
    fn decode_linear_equals_burns_matmul() {
        use burn::tensor::{Device, Distribution};
        let device = Device::flex();
        device.seed(3);
        let w = Tensor::<2>::random([48, 80], Distribution::Normal(0.0, 1.0), &device);
        let x = Tensor::<2>::random([9, 48], Distribution::Normal(0.0, 1.0), &device);
        if !PackedVocab::supported() {
            assert!(decode_linear(&x, &w).is_none());
            return;
        }
        let got = decode_linear(&x, &w).expect("flex f32, 9 rows");
        crate::flex_kernels::assert_close(got, x.matmul(w.clone()), 1e-5);
        let many = Tensor::<2>::random([DECODE_ROWS + 1, 48], Distribution::Normal(0.0, 1.0), &device);
        assert!(decode_linear(&many, &w).is_none());
        let tracked = Tensor::<2>::random([4, 48], Distribution::Normal(0.0, 1.0), &device.clone().autodiff());
        assert!(decode_linear(&tracked, &w).is_none());
    }

    fn detect_avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}
