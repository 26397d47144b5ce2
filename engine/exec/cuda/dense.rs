//! The bf16 projections of the CUDA executors (text and vision): the skinny GEMM for decode-sized batches, cuBLASLt
//! for the rest.

use crate::exec::cuda::blas::Blas;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::ops::cuda as k;
use crate::Result;

/// Above this many output columns the decode projection goes to cuBLASLt even when the skinny GEMM takes it: on the
/// vocabulary-wide `lm_head` cuBLASLt streamed the weight faster, side by side in `cuda_gemv::gemv_throughput`
/// (H200, 2026-11-27, us per call, skinny GEMM / cuBLASLt): 1B (k 2048, n 128256) 134.5 / 121.2 at m = 1 and
/// 142.6 / 124.0 at m = 8; 3B (k 3072) 199.9 / 179.7 and 193.6 / 182.8. Every other Llama projection has
/// n <= 16384.
pub const SKINNY_MAX_N: usize = 1 << 16;

/// A bf16 projection `out[rows, n] = x[rows, k] @ w[n, k]^T`: decode-sized batches stream the weight once with the
/// skinny kernel (when `skinny` is on and `n <= SKINNY_MAX_N`), cuBLASLt takes the rest.
pub(crate) fn dense_linear<I: DevicePtr<bf16>>(
    stream: &CudaStream,
    blas: &Blas,
    skinny: bool,
    x: &I,
    w: &I,
    (rows, kdim, n): (usize, usize, usize),
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    if skinny && n <= SKINNY_MAX_N && k::gemv::supports(rows, kdim) {
        return k::gemv::gemv(stream, x, w, rows, kdim, n, out);
    }
    blas.gemm(x, w, rows, kdim, n, out)
}
