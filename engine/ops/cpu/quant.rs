//! CPU twins of the quantized projections: W4A16 and W4A8 (int8 per-token activations, int4 group weights).
//!
//! - **W4A16** on the CPU is the f32 GEMM of [`super::linear::linear`] over the exactly dequantized weights
//!   (`LinearWeight::dense`, each value a bf16 scale times a small integer, so exact in f32). That product is the
//!   reference the CUDA W4A16 kernels are judged against; there is no separate int4 kernel here.
//! - **W4A8** ([`w4a8_linear`], [`PreparedW4A8`]) follows torchao's `8da4w`: each row of `x` is quantized to int8
//!   with its own scale `sx` and zero point `zx` ([`crate::quant::numerics::quantize_activations`]); then for each
//!   output column and each group `g` of `group` input columns
//!
//!   `acc_g = Σ_j qx_j · qw_j` (int32), `acc_g − zx · Σ_j qw_j = Σ_j (qx_j − zx) · qw_j` (exact, int32),
//!
//!   where `qw = q − zw` (the weight zero point, 0 for this engine's symmetric format). The scales are applied
//!   in f32 in a fixed order: `out = sx · Σ_g (sw_g · (acc_g − zx · Σ qw)_g)`, groups in ascending order.
//!
//! Integer parts are exact, and each output element is computed from its own row and column only, with the same
//! operations in the same order whatever the batch: a row gives identical bits alone or among any other rows.

use std::sync::Arc;

use rayon::prelude::*;

use crate::quant::numerics::quantize_activations;
use crate::quant::{ActQuant, QuantLinear, QuantMatrix, Scheme};
use crate::weights::LinearWeight;

/// A quantized projection prepared for [`PreparedW4A8::forward`]: the per-group sums of the weight values (needed
/// to remove the activation zero point) computed once, and, for formats with weight zero points, the values with
/// the zero points folded in. Shares the [`QuantLinear`]'s buffers otherwise.
#[derive(Clone, Debug)]
pub struct PreparedW4A8 {
    w: Arc<QuantLinear>,
    /// `[n, k]` values `q − zw` (in `[-15, 15]`) when the matrix has zero points; `w.matrix.q` otherwise.
    shifted: Option<Vec<i8>>,
    /// `[n, k / group]` sums of `q − zw` per group.
    wsum: Vec<i32>,
}

impl PreparedW4A8 {
    /// Prepares `w`. Panics if its buffers disagree with its dimensions (a [`QuantMatrix`] built by the quantizer
    /// or the checkpoint reader always agrees).
    pub fn new(w: Arc<QuantLinear>) -> Self {
        let m = &w.matrix;
        assert!(
            m.group > 0 && m.k.is_multiple_of(m.group),
            "PreparedW4A8: k {} not a multiple of group {}",
            m.k,
            m.group
        );
        let groups = m.groups();
        assert_eq!(m.q.len(), m.n * m.k, "PreparedW4A8: q length");
        assert_eq!(m.scales.len(), m.n * groups, "PreparedW4A8: scales length");
        let shifted: Option<Vec<i8>> = m.zeros.as_ref().map(|z| {
            assert_eq!(z.len(), m.n * groups, "PreparedW4A8: zeros length");
            m.q.iter().enumerate().map(|(i, &q)| q.wrapping_sub(z[(i / m.k) * groups + (i % m.k) / m.group])).collect()
        });
        let qw = shifted.as_deref().unwrap_or(&m.q);
        let wsum: Vec<i32> = qw.par_chunks(m.group).map(|g| g.iter().map(|&v| v as i32).sum()).collect();
        PreparedW4A8 { w, shifted, wsum }
    }

    /// The prepared projection.
    pub fn linear(&self) -> &QuantLinear {
        &self.w
    }

    /// `out[rows, n] = dequant(quant_int8(x[rows, k])) @ w^T`, see the module docs. Multithreaded over output
    /// columns; batch-invariant. Panics if the slice lengths disagree with the dimensions (callers check shapes).
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let m = &self.w.matrix;
        let (n, k, group) = (m.n, m.k, m.group);
        let qw = self.shifted.as_deref().unwrap_or(&m.q);
        assert_eq!(x.len(), rows * k, "w4a8_linear: x length");
        assert_eq!(out.len(), rows * n, "w4a8_linear: out length");
        if rows == 0 || n == 0 {
            return;
        }
        let mut qx = vec![0i8; rows * k];
        let mut sx = vec![0.0f32; rows];
        let mut zx = vec![0i32; rows];
        quantize_activations(x, rows, k, &mut qx, &mut sx, &mut zx);
        let groups = k / group;
        // Column-major result ([n, rows]) so that each task owns a contiguous block; transposed at the end.
        let mut t = vec![0.0f32; n * rows];
        let cols_per_task = (4096 / rows.max(1)).clamp(1, 64);
        let cx = ColumnInputs { qx: &qx, sx: &sx, zx: &zx, k, group, groups };
        t.par_chunks_mut(rows * cols_per_task).enumerate().for_each(|(task, block)| {
            for (c, col_out) in block.chunks_mut(rows).enumerate() {
                let j = task * cols_per_task + c;
                let w = ColumnWeights {
                    q: &qw[j * k..(j + 1) * k],
                    wsum: &self.wsum[j * groups..(j + 1) * groups],
                    scales: &m.scales[j * groups..(j + 1) * groups],
                };
                column(&cx, &w, col_out);
            }
        });
        for j in 0..n {
            for r in 0..rows {
                out[r * n + j] = t[j * rows + r];
            }
        }
    }
}

/// `out[rows, n] = x @ w^T` with torchao `8da4w` numerics (int8 per-token activations); see the module docs.
/// Prepares `w` on every call: hold a [`PreparedW4A8`] to run the same matrix repeatedly.
pub fn w4a8_linear(x: &[f32], rows: usize, w: &QuantMatrix, out: &mut [f32]) {
    let scheme = Scheme { group: w.group, act: ActQuant::Int8PerToken };
    PreparedW4A8::new(Arc::new(QuantLinear { matrix: w.clone(), scheme })).forward(x, rows, out)
}

/// `out[rows, n] = x[rows, k] @ w^T` for a projection in the CPU layout: the W4A8 kernel when `w` is quantized with
/// int8 activations, the batch-invariant f32 GEMM over `w.dense` otherwise (W4A16's reference: `dense` holds the
/// exactly dequantized values, or is computed for the call when it was left out). Prepares the W4A8 weight sums on every call; the text executor keeps a prepared
/// form instead.
pub fn linear_weight(x: &[f32], w: &LinearWeight, rows: usize, k: usize, n: usize, out: &mut [f32]) {
    match &w.quant {
        Some(q) if q.scheme.act == ActQuant::Int8PerToken => PreparedW4A8::new(Arc::clone(q)).forward(x, rows, out),
        // A weight loaded for a device without its dense copy: dequantize for this call.
        Some(q) if w.dense.is_empty() => crate::ops::cpu::linear::linear(x, &q.matrix.dequantize(), rows, k, n, out),
        _ => crate::ops::cpu::linear::linear(x, &w.dense, rows, k, n, out),
    }
}

/// The quantized activations of one call.
struct ColumnInputs<'a> {
    qx: &'a [i8],
    sx: &'a [f32],
    zx: &'a [i32],
    k: usize,
    group: usize,
    groups: usize,
}

/// One output column's weights.
struct ColumnWeights<'a> {
    q: &'a [i8],
    wsum: &'a [i32],
    scales: &'a [f32],
}

/// `out[r]` for every row `r`, for one output column: runs the AVX2 build of [`column_body`] where the CPU has
/// AVX2, the baseline build otherwise. Both builds perform the same integer and f32 operations in the same order
/// (no FMA contraction is enabled), so their results are identical.
fn column(cx: &ColumnInputs<'_>, w: &ColumnWeights<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), the only requirement of `column_avx2`.
            unsafe { column_avx2(cx, w, out) };
            return;
        }
    }
    column_body(cx, w, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn column_avx2(cx: &ColumnInputs<'_>, w: &ColumnWeights<'_>, out: &mut [f32]) {
    column_body(cx, w, out)
}

#[inline(always)]
fn column_body(cx: &ColumnInputs<'_>, w: &ColumnWeights<'_>, out: &mut [f32]) {
    let (k, group) = (cx.k, cx.group);
    let mut r = 0;
    // Four rows at a time share each weight group's loads (group 32); a row's arithmetic is the same either way.
    if group == 32 {
        while r + 4 <= out.len() {
            let x: [&[i8]; 4] = std::array::from_fn(|i| &cx.qx[(r + i) * k..(r + i + 1) * k]);
            let zx: [i32; 4] = std::array::from_fn(|i| cx.zx[r + i]);
            let mut acc = [0.0f32; 4];
            for g in 0..cx.groups {
                let span = g * 32..(g + 1) * 32;
                let d = dot32x4(&x, span.clone(), &w.q[span]);
                for i in 0..4 {
                    acc[i] += w.scales[g] * (d[i] - zx[i] * w.wsum[g]) as f32;
                }
            }
            for i in 0..4 {
                out[r + i] = cx.sx[r + i] * acc[i];
            }
            r += 4;
        }
    }
    for (r, o) in out.iter_mut().enumerate().skip(r) {
        let xrow = &cx.qx[r * k..(r + 1) * k];
        let zx = cx.zx[r];
        let mut acc = 0.0f32;
        if group == 32 {
            for (((xg, wg), &ws), &sw) in
                xrow.chunks_exact(32).zip(w.q.chunks_exact(32)).zip(w.wsum).zip(w.scales).take(cx.groups)
            {
                acc += sw * (dot32(xg, wg) - zx * ws) as f32;
            }
        } else {
            for (((xg, wg), &ws), &sw) in
                xrow.chunks_exact(group).zip(w.q.chunks_exact(group)).zip(w.wsum).zip(w.scales).take(cx.groups)
            {
                acc += sw * (dot_i8(xg, wg) - zx * ws) as f32;
            }
        }
        *o = cx.sx[r] * acc;
    }
}

/// Four [`dot32`]s of the rows `x[i][span]` with the same 32 weights.
#[inline(always)]
fn dot32x4(x: &[&[i8]; 4], span: std::ops::Range<usize>, w: &[i8]) -> [i32; 4] {
    let w = &w[..32];
    let x: [&[i8]; 4] = std::array::from_fn(|i| &x[i][span.clone()][..32]);
    let mut s = [0i32; 4];
    for j in 0..32 {
        let wj = w[j] as i32;
        for i in 0..4 {
            s[i] += x[i][j] as i32 * wj;
        }
    }
    s
}

/// Σ a_i · b_i in i32 over 32 int8 values (one group): a fixed-length loop the compiler unrolls into widening
/// multiply-adds.
#[inline(always)]
fn dot32(a: &[i8], b: &[i8]) -> i32 {
    let (a, b) = (&a[..32], &b[..32]);
    let mut s = 0i32;
    for i in 0..32 {
        s += a[i] as i32 * b[i] as i32;
    }
    s
}

/// Σ a_i · b_i in i32 over int8 slices of equal length (any group size). Exact: every partial sum fits in i32 for
/// any realistic length.
#[inline(always)]
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::numerics::quantize_matrix;

    fn data(len: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 - 1001.0) / 1001.0 * scale).collect()
    }

    /// The W4A8 formula in f64 from the same quantized activations: Σ_j sx·(qx_j − zx) · sw_g·(q_j − zw_g).
    fn naive(x: &[f32], rows: usize, w: &QuantMatrix) -> Vec<f64> {
        let k = w.k;
        let mut qx = vec![0i8; rows * k];
        let mut sx = vec![0.0f32; rows];
        let mut zx = vec![0i32; rows];
        quantize_activations(x, rows, k, &mut qx, &mut sx, &mut zx);
        let g = w.groups();
        let mut out = vec![0.0f64; rows * w.n];
        for r in 0..rows {
            for j in 0..w.n {
                let mut s = 0.0f64;
                for c in 0..k {
                    let gi = j * g + c / w.group;
                    let zw = w.zeros.as_ref().map_or(0, |z| z[gi]) as f64;
                    let xv = sx[r] as f64 * (qx[r * k + c] as f64 - zx[r] as f64);
                    s += xv * w.scales[gi] as f64 * (w.q[j * k + c] as f64 - zw);
                }
                out[r * w.n + j] = s;
            }
        }
        out
    }

    /// Tolerance: the f32 kernel sums `groups` products of exact integers with f32 scales, so its error is a few
    /// ulps of the sum of magnitudes; 1e-5 of the largest output (≈ 80 f32 ulps) bounds it with room to spare, and
    /// any integer mistake (one unit of one product moves an output by ≥ sx·sw ≈ 1e-3 of the largest output here)
    /// is far outside it.
    fn assert_close(got: &[f32], want: &[f64]) {
        let max = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - w).abs() <= 1e-5 * max, "element {i}: {g} vs {w} (max {max})");
        }
    }

    #[test]
    fn matches_the_f64_formula() {
        for (rows, n, k, group) in [(1, 5, 32, 32), (3, 17, 96, 32), (9, 40, 256, 32), (2, 7, 64, 16)] {
            let w = quantize_matrix(&data(n * k, 1, 0.05), n, k, group).expect("quantize");
            let x = data(rows * k, 2, 3.0);
            let mut out = vec![f32::NAN; rows * n];
            w4a8_linear(&x, rows, &w, &mut out);
            assert_close(&out, &naive(&x, rows, &w));
        }
    }

    #[test]
    fn weight_zero_points_are_subtracted() {
        let (rows, n, k, group) = (4, 9, 64, 32);
        let mut w = quantize_matrix(&data(n * k, 3, 0.05), n, k, group).expect("quantize");
        let zeros: Vec<i8> = (0..n * w.groups()).map(|i| (i % 7) as i8 - 3).collect();
        w.zeros = Some(zeros);
        let x = data(rows * k, 4, 1.0);
        let mut out = vec![f32::NAN; rows * n];
        w4a8_linear(&x, rows, &w, &mut out);
        let want = naive(&x, rows, &w);
        assert_close(&out, &want);
        // And the zero points matter: without them the result is clearly different.
        let mut w0 = w.clone();
        w0.zeros = None;
        let mut out0 = vec![0.0; rows * n];
        w4a8_linear(&x, rows, &w0, &mut out0);
        assert!(out0.iter().zip(&out).any(|(a, b)| (a - b).abs() > 1e-3));
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (n, k) = (70, 128);
        let m = quantize_matrix(&data(n * k, 5, 0.05), n, k, 32).expect("quantize");
        let w = PreparedW4A8::new(Arc::new(QuantLinear { matrix: m, scheme: Scheme::W4A8_G32 }));
        let x = data(40 * k, 6, 2.0);
        let mut one = vec![0.0; n];
        w.forward(&x[..k], 1, &mut one);
        for (rows, at) in [(2, 1), (9, 8), (17, 3), (40, 39)] {
            let mut xs = x[..rows * k].to_vec();
            xs[at * k..(at + 1) * k].copy_from_slice(&x[..k]);
            let mut out = vec![f32::NAN; rows * n];
            w.forward(&xs, rows, &mut out);
            let got: Vec<u32> = out[at * n..(at + 1) * n].iter().map(|v| v.to_bits()).collect();
            let want: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "row {at} of {rows}");
        }
    }

    #[test]
    fn dot_is_exact() {
        let a: Vec<i8> = (0..100).map(|i| (i * 37 % 256) as u8 as i8).collect();
        let b: Vec<i8> = (0..100).map(|i| (i * 11 % 16) as i8 - 8).collect();
        let want: i32 = a.iter().zip(&b).map(|(&x, &y)| x as i32 * y as i32).sum();
        assert_eq!(dot_i8(&a, &b), want);
        assert_eq!(dot_i8(&[-128; 64], &[-8; 64]), 64 * 1024);
        assert_eq!(dot32(&a[..32], &b[..32]), dot_i8(&a[..32], &b[..32]));
    }

    /// Timing at the 1B `down_proj` shape against the f32 GEMM: `cargo test --release --lib w4a8_speed -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "timing only"]
    fn w4a8_speed() {
        let (n, k) = (2048, 8192);
        let m = quantize_matrix(&data(n * k, 7, 0.02), n, k, 32).expect("quantize");
        let dense = m.dequantize();
        let p = PreparedW4A8::new(Arc::new(QuantLinear { matrix: m, scheme: Scheme::W4A8_G32 }));
        for rows in [1, 8, 32] {
            let x = data(rows * k, 8, 1.0);
            let mut out = vec![0.0; rows * n];
            let t = std::time::Instant::now();
            for _ in 0..5 {
                p.forward(&x, rows, &mut out);
            }
            let q = t.elapsed().as_secs_f64() / 5.0;
            let t = std::time::Instant::now();
            for _ in 0..5 {
                crate::ops::cpu::linear::linear(&x, &dense, rows, k, n, &mut out);
            }
            let f = t.elapsed().as_secs_f64() / 5.0;
            let gops = |s: f64| (2 * rows * n * k) as f64 / s / 1e9;
            eprintln!(
                "rows {rows}: w4a8 {:.2} ms ({:.1} GOP/s), f32 {:.2} ms ({:.1} GFLOP/s)",
                q * 1e3,
                gops(q),
                f * 1e3,
                gops(f)
            );
        }
    }
}
