//! What the fused flex kernels ([`crate::loss`], [`crate::attention`], [`crate::swiglu`],
//! [`crate::rotary`], [`crate::rms_norm`], [`crate::adamw`]) share: the switch that turns them
//! off, and helpers.

use std::cell::Cell;

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Device};

thread_local! {
    /// Set by [`without_fused_kernels`] for the calling thread.
    static COMPOSED_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Whether an op on `device` takes its fused kernel: on the flex (CPU) backend, unless
/// [`without_fused_kernels`] turned them off on this thread. (Each op also checks its dtypes.)
pub(crate) fn enabled(device: &Device) -> bool {
    !COMPOSED_ONLY.get() && crate::device::is_flex(device)
}

/// Runs `f` with the fused CPU kernels turned off on this thread, so that every op composes
/// Burn's tensor ops as it does on a GPU: for tests that compare the two paths and benchmarks
/// that attribute a speed-up. The backward of a graph follows the path its forward took.
pub fn without_fused_kernels<R>(f: impl FnOnce() -> R) -> R {
    crate::with_setting(&COMPOSED_ONLY, true, f)
}

/// Elements per rayon task in the element-wise kernels: large enough that scheduling costs
/// nothing next to the work, small enough that both cores get many pieces of a `[rows, d]` tensor.
pub(crate) const CHUNK: usize = 1 << 14;

/// `t` in row-major order (copied only when it is a strided view), checked to hold f32.
pub(crate) fn contiguous_f32(t: FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "fused flex kernels take f32 tensors");
    t.to_contiguous()
}

/// The f32 values of a contiguous flex tensor (from its start offset, `num_elements` long).
pub(crate) fn f32_values(t: &FlexTensor) -> &[f32] {
    debug_assert!(t.is_contiguous(), "f32_values needs a contiguous tensor");
    let start = t.layout().start_offset();
    &t.storage::<f32>()[start..start + t.layout().num_elements()]
}

/// Runs `f` in code compiled for AVX2 and FMA where this CPU has them (the build targets
/// baseline x86-64, whose SSE2 loops are half as wide); elsewhere as it is. `f` and what it
/// calls must inline into it (`#[inline(always)]` helpers) to be compiled that way. Results are
/// the same either way: Rust neither reorders float sums nor fuses a multiply and an add.
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "avx2,fma")]
        fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has both features.
        return unsafe { with_avx2(f) };
    }
    f()
}

/// `exp(x)` for `x <= 0` (a logit minus its row's maximum or log-sum-exp), without branches so
/// that the loops calling it vectorise: the libm `expf` call per element was 10% of a training step.
/// `2^(x log2 e) = 2^n 2^f` with `n` the nearest integer and `|f| <= 1/2`; `2^f = e^(f ln 2)` by
/// its Taylor series to degree 7 (relative error below 2e-7 on that interval). Arguments below
/// -87 give `exp(-87)` ~ 1.6e-38 (instead of a smaller subnormal or zero), negligible next to the
/// row's largest term, 1; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    // Not `x.max(-87.0)`: that would turn NaN into -87.
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * std::f32::consts::LOG2_E;
    // Round to nearest by adding 1.5 * 2^23: the sum's low mantissa bits are then n itself (two's
    // complement), so neither a `round` nor a float-to-int conversion is needed (both keep LLVM
    // from vectorising on the baseline x86-64 target).
    const MAGIC: f32 = 12_582_912.0;
    let shifted = t + MAGIC;
    let n = shifted - MAGIC;
    let n_bits = shifted.to_bits().wrapping_sub(MAGIC.to_bits());
    // g = x - n ln 2, with ln 2 split in two (Cody-Waite) so that n ln 2 is exact for |n| <= 127.
    let g = (x - n * 0.693_359_4) + n * 2.121_944_4e-4;
    let p = 1.0 + g * (1.0 + g * (0.5 + g * (1.0 / 6.0 + g * (1.0 / 24.0 + g * (1.0 / 120.0 + g * (1.0 / 720.0 + g * (1.0 / 5040.0)))))));
    // 2^n for n in -126..=0, built from its exponent bits.
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    p * scale
}

/// Asserts that a fused op's result equals the composed reference, element by element, to
/// `tol` relative (plus `tol` absolute near zero). For the kernels' tests.
#[cfg(test)]
pub(crate) fn assert_close<const D: usize>(fused: burn::tensor::Tensor<D>, reference: burn::tensor::Tensor<D>, tol: f32) {
    let (a, b) = (fused.into_data().try_to_vec::<f32>().unwrap(), reference.into_data().try_to_vec::<f32>().unwrap());
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: fused {x} vs composed {y}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_nonpositive_matches_libm() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (ours, libm) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst = worst.max((ours - libm).abs() / libm);
        }
        assert!(worst < 1e-6, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }
}
