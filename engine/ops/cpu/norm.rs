//! RMSNorm and fused residual-add + RMSNorm, the CPU twins of `kernels/norm.cu`.

use rayon::prelude::*;

/// Rows per rayon task: small enough to spread a prefill over the cores, large enough to amortize scheduling.
const ROWS_PER_TASK: usize = 4;

fn rms_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let sum_sq: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let inv = 1.0 / ((sum_sq / x.len() as f64) as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv);
    }
}

/// `out[r] = weight * x[r] / sqrt(mean(x[r]^2) + eps)` for each row `r` of a row-major `[rows, hidden]` matrix.
///
/// Panics if the slice lengths disagree; callers check shapes first.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, hidden: usize, out: &mut [f32]) {
    assert_eq!(weight.len(), hidden, "rms_norm: weight length");
    assert_eq!(x.len(), out.len(), "rms_norm: x and out lengths");
    assert_eq!(x.len() % hidden, 0, "rms_norm: x is not a multiple of hidden");
    out.par_chunks_mut(hidden * ROWS_PER_TASK).zip(x.par_chunks(hidden * ROWS_PER_TASK)).for_each(|(o, xi)| {
        for (orow, xrow) in o.chunks_mut(hidden).zip(xi.chunks(hidden)) {
            rms_row(xrow, weight, eps, orow);
        }
    });
}

/// Fused residual add + RMSNorm: `residual[r] += x[r]`, then `out[r] = rms_norm(residual[r])`.
///
/// Panics if the slice lengths disagree; callers check shapes first.
pub fn add_rms_norm(residual: &mut [f32], x: &[f32], weight: &[f32], eps: f32, hidden: usize, out: &mut [f32]) {
    assert_eq!(weight.len(), hidden, "add_rms_norm: weight length");
    assert_eq!(residual.len(), x.len(), "add_rms_norm: residual and x lengths");
    assert_eq!(x.len(), out.len(), "add_rms_norm: x and out lengths");
    assert_eq!(x.len() % hidden, 0, "add_rms_norm: x is not a multiple of hidden");
    let n = hidden * ROWS_PER_TASK;
    out.par_chunks_mut(n).zip(residual.par_chunks_mut(n)).zip(x.par_chunks(n)).for_each(|((o, r), xi)| {
        for ((orow, rrow), xrow) in o.chunks_mut(hidden).zip(r.chunks_mut(hidden)).zip(xi.chunks(hidden)) {
            for (rv, &xv) in rrow.iter_mut().zip(xrow) {
                *rv += xv;
            }
            rms_row(rrow, weight, eps, orow);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rows() {
        // A row of all 2s has mean square 4, so it normalizes to ones (times the weight).
        let x = vec![2.0f32; 8];
        let w: Vec<f32> = (0..4).map(|i| i as f32).collect();
        let mut out = vec![f32::NAN; 8];
        rms_norm(&x, &w, 0.0, 4, &mut out);
        assert_eq!(out, vec![0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn add_rms_norm_updates_residual() {
        let mut r = vec![1.0f32, -1.0, 3.0, 0.0];
        let x = vec![1.0f32, -1.0, -1.0, 2.0];
        let mut out = vec![f32::NAN; 4];
        add_rms_norm(&mut r, &x, &[1.0; 4], 1e-6, 4, &mut out);
        assert_eq!(r, vec![2.0, -2.0, 2.0, 2.0]);
        for v in out {
            assert!((v.abs() - 1.0).abs() < 1e-5);
        }
    }
}
