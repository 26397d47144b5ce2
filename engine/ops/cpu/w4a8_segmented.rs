//! The CPU twin of the Hopper W4A8 kernel (`kernels/quant/w4a8_sm90.cu`,
//! [`W4A8Kernel::Wgmma`](crate::ops::cuda::quant::W4A8Kernel)): the f32 operations of its segmented, telescoped
//! accumulation in its order, so the GPU tests compare the kernel with [`w4a8_segmented`] bit for bit, and this
//! module's tests bound its distance from torchao's numerics ([`super::quant::w4a8_linear`]).
//!
//! Per output and K split, over the split's 64-column chunks in segments of [`SEGMENT_GROUPS`] groups of 32
//! (restarting with the split), with `s'_g` the exact s32 sum `Σ xq · 16 q` of group `g` and `sw'_g = sw_g / 16`
//! (the device scale):
//!
//! ```text
//! acc = 0
//! for each segment a..=b:
//!     acc = fma(-sw'_a, B, acc)                 B = 1.5 * 2^23
//!     D = B
//!     for g in a..=b:
//!         D += s'_g                             exact: D stays in [2^23, 2^24], where the float ulp is 1
//!         c = sw'_g - sw'_{g+1}  (g < b),  sw'_b  (g = b)
//!         acc = fma(c, D, acc)
//! ```
//!
//! which telescopes to `Σ_g sw'_g s'_g`: one FFMA per group where the exact sum takes two ALU ops. The splits'
//! partials are summed in split order from 0, and each output is `sx * fma(-zx, row_corr, acc)`; the kernel writes
//! that rounded to bf16 (round to nearest even).

use rayon::prelude::*;

use crate::quant::QuantMatrix;
use crate::{Error, Result};

/// Groups of 32 per segment (four 64-column chunks): the most whose sums keep the accumulator in its binade.
pub const SEGMENT_GROUPS: usize = 8;
/// `1.5 * 2^23`: the accumulator's start, whose float ulp is 1.
const BIAS: f32 = 12_582_912.0;

/// The kernel's output before its bf16 rounding: `out[rows, n]` from int8 activations `xq` (`[rows, k]`) with
/// per-row scales `sx` and zero points `zx` (as [`crate::quant::numerics::quantize_activations`] writes them), a
/// symmetric matrix `w` (group a multiple of 32, `k` a multiple of 64), its per-row constants `row_corr`
/// (`HostW4A8::row_corr` of [`crate::ops::cuda::quant::layout_w4a8`], at least `n` long) and `splits` K splits
/// (`1..=k / 64`, balanced as the kernels' `split_range`). Errors name what does not fit.
pub fn w4a8_segmented(
    xq: &[i8],
    sx: &[f32],
    zx: &[i32],
    rows: usize,
    w: &QuantMatrix,
    row_corr: &[f32],
    splits: usize,
) -> Result<Vec<f32>> {
    let (n, k) = (w.n, w.k);
    let bad = |msg: String| Err(Error::Request(format!("w4a8_segmented: {msg}")));
    if w.zeros.is_some() {
        return bad("the matrix has zero points; the kernel takes symmetric weights only".into());
    }
    if k == 0 || k % 64 != 0 || w.group == 0 || !w.group.is_multiple_of(32) || k % w.group != 0 {
        return bad(format!("k {k} and group {} must be multiples of 64 and 32, the group dividing k", w.group));
    }
    let chunks = k / 64;
    if splits == 0 || splits > chunks {
        return bad(format!("splits is {splits}, must be in 1..={chunks}"));
    }
    if xq.len() < rows * k || sx.len() < rows || zx.len() < rows || row_corr.len() < n {
        return bad("an input is shorter than its dimensions".into());
    }
    if w.q.len() != n * k || w.scales.len() != n * w.groups() {
        return bad("the matrix's buffers disagree with its dimensions".into());
    }
    if w.q.iter().any(|q| !(-8..=7).contains(q)) {
        return bad("a weight value is outside the int4 range [-8, 7]".into());
    }
    let groups = k / 32;
    // Column-major ([n, rows]), one output column per task; transposed at the end.
    let mut cols = vec![0f32; n * rows];
    cols.par_chunks_mut(rows.max(1)).enumerate().try_for_each(|(j, col)| -> Result<()> {
        let q = &w.q[j * k..(j + 1) * k];
        let sw: Vec<f32> = (0..groups).map(|gi| w.scales[j * w.groups() + gi * 32 / w.group] / 16.0).collect();
        let mut sums = vec![0i64; groups];
        for (i, o) in col.iter_mut().enumerate().take(rows) {
            let x = &xq[i * k..(i + 1) * k];
            for (gi, s) in sums.iter_mut().enumerate() {
                let span = gi * 32..(gi + 1) * 32;
                *s = x[span.clone()].iter().zip(&q[span]).map(|(&a, &b)| i64::from(a) * i64::from(b) * 16).sum();
            }
            let mut v = 0f32;
            for sp in 0..splits {
                v += split_sum(&sums, &sw, chunks * sp / splits, chunks * (sp + 1) / splits)?;
            }
            *o = sx[i] * (-(zx[i] as f32)).mul_add(row_corr[j], v);
        }
        Ok(())
    })?;
    let mut out = vec![0f32; rows * n];
    for j in 0..n {
        for i in 0..rows {
            out[i * n + j] = cols[j * rows + i];
        }
    }
    Ok(out)
}

/// One split's accumulator over the chunks `c0..c1` (see the module docs). The accumulator never leaves its binade
/// for int8 activations and int4 weights (|s'_g| <= 2^19, 8 groups per segment); the check makes that claim
/// tested rather than assumed.
fn split_sum(sums: &[i64], sw: &[f32], c0: usize, c1: usize) -> Result<f32> {
    let seg_chunks = SEGMENT_GROUPS / 2;
    let mut acc = 0f32;
    let mut d = 0i64;
    for c in c0..c1 {
        let rel = c - c0;
        let seg_end = rel % seg_chunks == seg_chunks - 1 || c + 1 == c1;
        if rel.is_multiple_of(seg_chunks) {
            acc = (-sw[2 * c]).mul_add(BIAS, acc);
            d = 0;
        }
        for g in [2 * c, 2 * c + 1] {
            d += sums[g];
            if d.abs() > 1 << 22 {
                return Err(Error::Backend(format!("w4a8_segmented: the segment sum {d} leaves [-2^22, 2^22]")));
            }
            // Exact: B + d is an integer in [2^23, 2^24].
            let dv = BIAS + d as f32;
            let coef = if g == 2 * c + 1 && seg_end { sw[g] } else { sw[g] - sw[g + 1] };
            acc = coef.mul_add(dv, acc);
        }
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::quant::w4a8_linear;
    use crate::ops::cuda::quant::layout_w4a8;
    use crate::quant::numerics::{quantize_activations, quantize_matrix};

    /// Deterministic pseudo-random values in [-scale, scale].
    fn data(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn quantized_acts(x: &[f32], rows: usize, k: usize) -> (Vec<i8>, Vec<f32>, Vec<i32>) {
        let (mut xq, mut sx, mut zx) = (vec![0i8; rows * k], vec![0f32; rows], vec![0i32; rows]);
        quantize_activations(x, rows, k, &mut xq, &mut sx, &mut zx);
        (xq, sx, zx)
    }

    /// The segmented sum stays within its bound of torchao's numerics (`w4a8_linear`, exact integer parts and an
    /// f32 sum of the scaled group terms): each FFMA rounds a value below ~2^25 sw', so each group adds at most
    /// ~2 sw' (times sx); the test allows 4 sx Σ sw' plus the exact path's own f32 slack, and reports the typical
    /// error, which the kernel's file comment quotes.
    #[test]
    fn segmented_sum_is_within_its_bound_of_torchao_numerics() {
        let mut worst_rel = 0f64;
        let (mut err2, mut ref2) = (0f64, 0f64);
        for (seed, (rows, n, k)) in [(3, 40, 256), (5, 24, 1024), (9, 33, 2880), (11, 17, 64)].into_iter().enumerate() {
            let w = quantize_matrix(&data(n * k, seed as u64 + 1, 0.05), n, k, 32).expect("quantize");
            let x = data(rows * k, seed as u64 + 100, 3.0);
            let (xq, sx, zx) = quantized_acts(&x, rows, k);
            let corr = layout_w4a8(&w).expect("layout").row_corr;
            let mut want = vec![0f32; rows * n];
            w4a8_linear(&x, rows, &w, &mut want);
            for splits in [1, 2, 3, k / 64].into_iter().filter(|&s| s <= k / 64) {
                let got = w4a8_segmented(&xq, &sx, &zx, rows, &w, &corr, splits).expect("twin");
                for i in 0..rows {
                    for j in 0..n {
                        let sw_sum: f32 = (0..k / 32).map(|g| w.scales[j * (k / 32) + g] / 16.0).sum();
                        let mag: f32 = (0..k / 32)
                            .map(|g| {
                                let s: i32 = (g * 32..(g + 1) * 32)
                                    .map(|c| i32::from(xq[i * k + c]) * i32::from(w.q[j * k + c]))
                                    .sum();
                                w.scales[j * (k / 32) + g] * s.abs() as f32
                            })
                            .sum();
                        let (g, r) = (got[i * n + j], want[i * n + j]);
                        let tol = sx[i] * (4.0 * sw_sum + 1e-5 * mag);
                        assert!((g - r).abs() <= tol, "rows {rows} n {n} k {k} splits {splits} [{i}, {j}]: {g} vs {r}");
                        worst_rel = worst_rel.max(f64::from((g - r).abs() / tol));
                        err2 += f64::from(g - r).powi(2);
                        ref2 += f64::from(r).powi(2);
                    }
                }
            }
        }
        let rms = (err2 / ref2).sqrt();
        eprintln!("segmented W4A8: worst error {worst_rel:.3} of the bound, RMS error {rms:.2e} of the RMS output");
        // Far below the bf16 output's rounding (2^-9 relative).
        assert!(rms < 2e-4, "RMS relative error {rms:e}");
    }

    /// Activations and weights at their extremes (every product 128 * 128 in one sign) keep the accumulator in its
    /// binade over a whole segment (split_sum checks it), and still agree with the exact sum.
    #[test]
    fn extreme_values_stay_in_the_binade() {
        let (rows, n, k) = (2, 3, 1024);
        let mut w = quantize_matrix(&vec![1.0; n * k], n, k, 32).expect("quantize");
        w.q.iter_mut().for_each(|q| *q = -8);
        for x in [-1.0f32, 1.0] {
            // A row of one negative (positive) value quantizes to -128 (127) everywhere; with the weights at -8
            // every product is 128 * 128 (-127 * 128): 2^19 per group, 2^22 per segment, the binade's edge.
            let xs = vec![x; rows * k];
            let (xq, sx, zx) = quantized_acts(&xs, rows, k);
            assert!(xq.iter().all(|&q| q == if x < 0.0 { -128 } else { 127 }), "{:?}", &xq[..4]);
            let corr = layout_w4a8(&w).expect("layout").row_corr;
            let got = w4a8_segmented(&xq, &sx, &zx, rows, &w, &corr, 1).expect("twin");
            let mut want = vec![0f32; rows * n];
            w4a8_linear(&xs, rows, &w, &mut want);
            for (g, r) in got.iter().zip(&want) {
                assert!((g - r).abs() <= 1e-3 * r.abs().max(1.0), "{g} vs {r}");
            }
        }
        // The extreme group sum itself: 32 products of -128 * -128.
        let xq = vec![-128i8; 64];
        let wq = QuantMatrix { n: 1, k: 64, group: 32, q: vec![-8; 64], scales: vec![1.0; 2], zeros: None };
        let got = w4a8_segmented(&xq, &[1.0], &[0], 1, &wq, &[0.0], 1).expect("twin");
        assert_eq!(got[0], 2.0 * 32.0 * 128.0 * 128.0 / 16.0);
    }

    #[test]
    fn bad_inputs_are_named() {
        let w = quantize_matrix(&data(4 * 64, 1, 1.0), 4, 64, 32).expect("quantize");
        let xq = vec![0i8; 64];
        let e = w4a8_segmented(&xq, &[1.0], &[0], 1, &w, &[0.0; 4], 2).unwrap_err().to_string();
        assert!(e.contains("splits is 2"), "{e}");
        let e = w4a8_segmented(&xq, &[1.0], &[0], 2, &w, &[0.0; 4], 1).unwrap_err().to_string();
        assert!(e.contains("shorter"), "{e}");
        let mut z = w.clone();
        z.zeros = Some(vec![0; 8]);
        let e = w4a8_segmented(&xq, &[1.0], &[0], 1, &z, &[0.0; 4], 1).unwrap_err().to_string();
        assert!(e.contains("zero points"), "{e}");
    }
}
