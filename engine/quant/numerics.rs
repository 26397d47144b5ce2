//! Quantization arithmetic, bit-exact with torchao 0.18 (checked against files written by torchao itself,
//! `scripts/make_golden_quant.py` -> `tests/golden/quant-torchao/`).
//!
//! # 4-bit weights ([`quantize_matrix`])
//! torchao's `Int8DynActInt4WeightQuantizer(groupsize=32, precision=torch.bfloat16)` with its default
//! `scales_precision=torch.float32`, i.e. `group_quantize_tensor_symmetric` on the bf16 weight, which is what
//! ExecuTorch's Llama export calls ("quantize in checkpoint dtype"). Per row and per group of `group` columns:
//!
//! ```text
//! m     = max(|w|) over the group                                   (exact: bf16 values)
//! scale = max(bf16_rne(m /f32 7.5), 2^-126)                          (f32 division, then rounded to bf16;
//!                                                                     2^-126 = torch.finfo(bf16).smallest_normal)
//! q     = clamp(round_half_even(w *f32 (1 /f32 scale)), -8, 7)       (zero point 0)
//! ```
//!
//! The division by 7.5 (= (7 - (-8)) / 2) is an f32 division rounded to f32 and then to bf16, as torch does
//! for a bf16 tensor; the clamp to the smallest normal only matters for an all-zero group (scale 2^-126, q = 0).
//! `q` multiplies by the f32 reciprocal of the stored scale (torch's `1.0 / scales` is `reciprocal`), not a
//! division: the two differ in about 1 value in 10^4. Every scale is a bf16 value, so storing it as bf16 is
//! lossless and `dequantize()` gives exactly the weights torchao's `linear_forward_8da4w` multiplies by.
//!
//! The variant with `scales_precision=torch.bfloat16` is *not* this one: there torch computes `1.0 / scales`
//! and `w * (1 / scale)` in bf16, rounding the product to 8 significant bits before `round()`, which changes
//! about 1 % of the integers (measured on N(0, 0.05) weights); we follow the f32 reciprocal.
//!
//! # Activations ([`quantize_activations`])
//! torchao's `per_token_dynamic_quant(x, scale_dtype=f32, zero_point_dtype=f32, eps=finfo(f32).eps)` as called
//! by `linear_forward_8da4w` (it is `choose_qparams_affine(ASYMMETRIC)` then `quantize_affine`, int8 in
//! `[-128, 127]`). Per row (token):
//!
//! ```text
//! lo    = min(min(x), 0);  hi = max(max(x), 0)
//! scale = max((hi -f32 lo) /f32 255, 2^-23)
//! zp    = clamp(-128 - round_half_even(lo /f32 scale), -128, 127)
//! q     = clamp(round_half_even(x *f32 (1 /f32 scale)) + zp, -128, 127)
//! ```
//!
//! # 8-bit rows ([`quantize_rows_int8`])
//! Per-channel (per-row) symmetric int8 for embeddings / lm_head: torchao's
//! `IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0), mapping_type=SYMMETRIC,
//! scale_dtype=torch.float32)` applied to the bf16 table, the config ExecuTorch's Llama export uses for
//! `--embedding-quantize 8,0` (there with the model's dtype as scale dtype). The same shape of formula as the
//! 4-bit weights, over a whole row, with 127.5 = (127 - (-128)) / 2:
//!
//! ```text
//! scale = max(bf16_rne(max|w| /f32 127.5), 2^-126);  q = clamp(round_half_even(w *f32 (1 /f32 scale)), -128, 127)
//! ```

use half::bf16;

use super::QuantMatrix;
use crate::{Error, Result};

/// `torch.finfo(torch.bfloat16).smallest_normal` (= f32's): the lower clamp of a symmetric weight scale.
const SMALLEST_NORMAL: f32 = f32::MIN_POSITIVE;

/// `torch.finfo(torch.float32).eps`: the lower clamp of an activation scale.
const F32_EPS: f32 = f32::EPSILON;

/// Rounds an f32 to the nearest bf16 (ties to even) and back, as torch's `.to(torch.bfloat16)` does.
pub fn round_to_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// `torch.round`: round half to even.
#[inline]
fn rne(x: f32) -> f32 {
    x.round_ties_even()
}

/// The bf16 scale of a symmetric group whose largest magnitude is `amax`, for a grid of `half_range` steps
/// on each side (7.5 for int4, 127.5 for int8).
#[inline]
fn symmetric_scale(amax: f32, half_range: f32) -> f32 {
    round_to_bf16(amax / half_range).max(SMALLEST_NORMAL)
}

/// Quantizes one group (or row) symmetrically into `out`; returns its scale.
#[inline]
fn quantize_symmetric(w: &[f32], out: &mut [i8], half_range: f32, qmin: f32, qmax: f32) -> f32 {
    let amax = w.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
    let scale = symmetric_scale(amax, half_range);
    let inv = 1.0f32 / scale;
    for (o, &v) in out.iter_mut().zip(w) {
        *o = rne(v * inv).clamp(qmin, qmax) as i8;
    }
    scale
}

fn check_finite(w: &[f32], k: usize, what: &str) -> Result<()> {
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::request(format!(
            "{what}: weight at row {}, column {} is {} (quantization needs finite weights)",
            i / k.max(1),
            i % k.max(1),
            w[i]
        )));
    }
    Ok(())
}

/// Quantizes an `[n, k]` weight matrix to symmetric int4 with one bf16 scale per `group` columns (torchao 8da4w
/// numerics, see the module doc). The weights should already be bf16 values (the quantizer rounds them first).
///
/// Errors when `k` is not a multiple of `group`, `group` is 0, `w.len() != n * k`, or a weight is NaN/inf.
pub fn quantize_matrix(w: &[f32], n: usize, k: usize, group: usize) -> Result<QuantMatrix> {
    if group == 0 || !k.is_multiple_of(group) {
        return Err(Error::request(format!(
            "cannot quantize a [{n}, {k}] matrix in groups of {group}: {k} is not a multiple of {group}"
        )));
    }
    if w.len() != n * k {
        return Err(Error::request(format!("quantize_matrix: {} values for a [{n}, {k}] matrix", w.len())));
    }
    check_finite(w, k, "quantize_matrix")?;
    let groups = k / group;
    let mut q = vec![0i8; n * k];
    let mut scales = vec![0.0f32; n * groups];
    for ((wg, qg), s) in w.chunks_exact(group).zip(q.chunks_exact_mut(group)).zip(scales.iter_mut()) {
        *s = quantize_symmetric(wg, qg, 7.5, -8.0, 7.0);
    }
    Ok(QuantMatrix { n, k, group, q, scales, zeros: None })
}

/// [`quantize_matrix`] of `w` rounded to bf16 first, as the checkpoint quantizer does with every source (a
/// checkpoint's f32 / f16 values, random weights, a tensor-parallel rank's slice).
pub fn quantize_bf16_rounded(mut w: Vec<f32>, n: usize, k: usize, group: usize) -> Result<QuantMatrix> {
    w.iter_mut().for_each(|v| *v = round_to_bf16(*v));
    quantize_matrix(&w, n, k, group)
}

/// Quantizes `rows` activation rows of length `k` to int8, per token, asymmetric (torchao
/// `per_token_dynamic_quant` as used by `linear_forward_8da4w`; see the module doc). Writes `q[rows * k]`,
/// `scales[rows]` and integer zero points `zeros[rows]` (in `[-128, 127]`); the dequantized value is
/// `(q - zero) * scale`.
///
/// # Panics
/// When a slice is shorter than `rows * k` / `rows` (a caller bug: kernels size these buffers).
pub fn quantize_activations(x: &[f32], rows: usize, k: usize, q: &mut [i8], scales: &mut [f32], zeros: &mut [i32]) {
    assert!(x.len() >= rows * k && q.len() >= rows * k, "quantize_activations: buffers shorter than rows * k");
    assert!(scales.len() >= rows && zeros.len() >= rows, "quantize_activations: scale/zero buffers shorter than rows");
    for r in 0..rows {
        let xr = &x[r * k..(r + 1) * k];
        let (mut lo, mut hi) = (0.0f32, 0.0f32);
        for &v in xr {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let scale = ((hi - lo) / 255.0f32).max(F32_EPS);
        let zp = (-128.0f32 - rne(lo / scale)).clamp(-128.0, 127.0);
        let inv = 1.0f32 / scale;
        for (o, &v) in q[r * k..(r + 1) * k].iter_mut().zip(xr) {
            *o = (rne(v * inv) + zp).clamp(-128.0, 127.0) as i8;
        }
        scales[r] = scale;
        zeros[r] = zp as i32;
    }
}

/// Quantizes an `[n, k]` table to symmetric int8 with one bf16 scale per row (torchao `IntxWeightOnlyConfig`
/// int8 `PerAxis(0)`, see the module doc). Returns `(q [n * k], scales [n])`; row `r` dequantizes to
/// `q[r, c] * scales[r]`, and every scale is a bf16 value.
pub fn quantize_rows_int8(w: &[f32], n: usize, k: usize) -> Result<(Vec<i8>, Vec<f32>)> {
    if w.len() != n * k || k == 0 {
        return Err(Error::request(format!("quantize_rows_int8: {} values for a [{n}, {k}] table", w.len())));
    }
    check_finite(w, k, "quantize_rows_int8")?;
    let mut q = vec![0i8; n * k];
    let mut scales = vec![0.0f32; n];
    for ((wr, qr), s) in w.chunks_exact(k).zip(q.chunks_exact_mut(k)).zip(scales.iter_mut()) {
        *s = quantize_symmetric(wr, qr, 127.5, -128.0, 127.0);
    }
    Ok((q, scales))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_ties_round_to_even_and_clamp() {
        // max 7.5 -> scale 1.0 exactly; 2.5 -> 2, 3.5 -> 4, -7.5 -> -8, 7.5 -> 8 -> clamped to 7.
        let mut w = vec![0.0f32; 32];
        w[..6].copy_from_slice(&[7.5, 2.5, 3.5, -7.5, -0.5, 0.5]);
        let m = quantize_matrix(&w, 1, 32, 32).unwrap();
        assert_eq!(m.scales, vec![1.0]);
        assert_eq!(&m.q[..6], &[7, 2, 4, -8, 0, 0]);
    }

    #[test]
    fn zero_group_gets_smallest_normal_scale() {
        let m = quantize_matrix(&[0.0; 64], 2, 32, 32).unwrap();
        assert!(m.scales.iter().all(|&s| s == f32::MIN_POSITIVE));
        assert!(m.q.iter().all(|&q| q == 0));
    }

    #[test]
    fn rejects_bad_shapes_and_values() {
        assert!(quantize_matrix(&[0.0; 48], 1, 48, 32).unwrap_err().to_string().contains("multiple of 32"));
        let mut w = vec![0.0f32; 64];
        w[40] = f32::NAN;
        let e = quantize_matrix(&w, 2, 32, 32).unwrap_err().to_string();
        assert!(e.contains("row 1, column 8") && e.contains("NaN"), "{e}");
        assert!(quantize_rows_int8(&[f32::INFINITY], 1, 1).is_err());
    }

    #[test]
    fn activations_asymmetric() {
        let x = [-1.0f32, 0.0, 0.5, 2.0];
        let (mut q, mut s, mut z) = ([0i8; 4], [0f32; 1], [0i32; 1]);
        quantize_activations(&x, 1, 4, &mut q, &mut s, &mut z);
        assert_eq!(s[0], 3.0f32 / 255.0);
        assert_eq!(z[0], -128 - (-1.0f32 / s[0]).round_ties_even() as i32);
        assert_eq!(q[3], 127);
        assert_eq!(q[0], -128);
    }
}
