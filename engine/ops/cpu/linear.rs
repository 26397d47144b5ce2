//! Dense projections `out = x @ w^T`, the CPU twin of the cuBLASLt GEMMs.

/// Rows per GEMM call. The `gemm` crate picks its kernels by the row count, so the same row can round
/// differently in a 1-row and a 37-row product. Running every product as whole tiles of this many rows (the last
/// one zero-padded) makes each row's result independent of the batch it is in: the CPU reference gives the same
/// logits, hence the same sampled tokens, however a step mixes sequences or cuts a prompt into chunks. With 8 rows,
/// 1B decode stays at its memory-bound speed and prefill runs at about 40% of the unpadded speed.
pub const ROW_TILE: usize = 8;

/// `out[rows, n] = x[rows, k] @ w[n, k]^T`, f32, multithreaded, batch-invariant (see [`ROW_TILE`]).
///
/// Panics if the slice lengths disagree with the dimensions; callers check shapes first.
pub fn linear(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), rows * k, "linear: x length");
    assert_eq!(w.len(), n * k, "linear: w length");
    assert_eq!(out.len(), rows * n, "linear: out length");
    if rows == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let full = rows / ROW_TILE * ROW_TILE;
    for r in (0..full).step_by(ROW_TILE) {
        gemm_rows(&x[r * k..(r + ROW_TILE) * k], w, ROW_TILE, k, n, &mut out[r * n..(r + ROW_TILE) * n]);
    }
    let rest = rows - full;
    if rest > 0 {
        let mut xp = vec![0.0f32; ROW_TILE * k];
        xp[..rest * k].copy_from_slice(&x[full * k..]);
        let mut op = vec![0.0f32; ROW_TILE * n];
        gemm_rows(&xp, w, ROW_TILE, k, n, &mut op);
        out[full * n..].copy_from_slice(&op[..rest * n]);
    }
}

/// One `gemm` call over `rows` rows (lengths checked by the caller).
fn gemm_rows(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize, out: &mut [f32]) {
    assert!(x.len() == rows * k && w.len() == n * k && out.len() == rows * n, "gemm_rows: lengths");
    // SAFETY: the three buffers were checked above to hold exactly rows*k, n*k and rows*n elements, and the
    // strides below address them in row-major order within those bounds; `out` does not alias the inputs.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (k, n) = (96, 130);
        let x: Vec<f32> = (0..40 * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 300.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729 % 997) as f32 - 498.0) / 700.0).collect();
        let mut one = vec![0.0; n];
        linear(&x[..k], &w, 1, k, n, &mut one);
        for (rows, at) in [(2, 1), (7, 6), (8, 3), (9, 8), (17, 16), (40, 21)] {
            let mut xs = x[..rows * k].to_vec();
            xs[at * k..(at + 1) * k].copy_from_slice(&x[..k]);
            let mut out = vec![f32::NAN; rows * n];
            linear(&xs, &w, rows, k, n, &mut out);
            assert_eq!(&out[at * n..(at + 1) * n], &one[..], "row {at} of {rows}");
        }
    }

    #[test]
    fn matches_naive() {
        for (rows, k, n) in [(5, 37, 11), (8, 16, 3), (19, 40, 9)] {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
            let mut out = vec![f32::NAN; rows * n];
            linear(&x, &w, rows, k, n, &mut out);
            for r in 0..rows {
                for j in 0..n {
                    let want: f32 = (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum();
                    assert!((out[r * n + j] - want).abs() <= 1e-4 * want.abs().max(1.0), "{r},{j}");
                }
            }
        }
    }
}
