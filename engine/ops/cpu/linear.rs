//! Dense projections `out = x @ w^T`, the CPU twin of the cuBLASLt GEMMs.

/// `out[rows, n] = x[rows, k] @ w[n, k]^T`, f32, multithreaded.
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
    fn matches_naive() {
        let (rows, k, n) = (5, 37, 11);
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
