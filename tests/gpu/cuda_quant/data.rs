//! The shared test data of the quantized GPU tests: random activations and weights (torchao numerics), the GEMM
//! error bound, bit equality, poisoned int8 buffers, and the timing benches' stream and weights.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use half::bf16;
use llama32::ops::cuda::quant::QuantActs;
use llama32::quant::numerics::quantize_matrix;
use llama32::quant::{QuantLinear, QuantMatrix, Scheme};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use super::BF16_ROUNDING;
use crate::common::{cuda_stream as stream, normal, to_f32, upload};

/// `rows` x `cols` bf16 values: normal times a per-row scale drawn log-uniformly from [10^lo, 10^hi]; with
/// `shift`, some rows are moved to be all positive (a zero point at -128) or all negative.
pub(crate) fn random_rows(
    rng: &mut ChaCha8Rng,
    rows: usize,
    cols: usize,
    (lo, hi): (f32, f32),
    shift: bool,
) -> Vec<bf16> {
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let scale = 10f32.powf(rng.random_range(lo..hi));
        let offset = match (shift, r % 4) {
            (true, 1) => 4.0 * scale,
            (true, 2) => -4.0 * scale,
            _ => 0.0,
        };
        out.extend((0..cols).map(|_| bf16::from_f32(scale * normal(rng) + offset)));
    }
    out
}

/// A quantized `[n, k]` matrix from random bf16 weights (torchao numerics), with random zero points when asked.
pub(crate) fn random_matrix(rng: &mut ChaCha8Rng, n: usize, k: usize, zeros: bool) -> QuantMatrix {
    let w = to_f32(&random_rows(rng, n, k, (-2.0, -1.0), false));
    let mut m = quantize_matrix(&w, n, k, 32).expect("quantize_matrix");
    if zeros {
        m.zeros = Some((0..n * (k / 32)).map(|_| rng.random_range(-8i8..=7)).collect());
    }
    m
}

pub(crate) fn row_rms(v: &[f32], cols: usize) -> Vec<f32> {
    v.chunks(cols)
        .map(|r| (r.iter().map(|&a| f64::from(a) * f64::from(a)).sum::<f64>() / cols as f64).sqrt() as f32)
        .collect()
}

/// The worst error of a `[m, n]` GEMM output `got` against the f32 twin `want`, as a share of the bound
/// `2^-8 |want| + 1e-3 sqrt(k) rms(x_i) rms(w_j)` (one bf16 rounding, and summation slack; see the module docs);
/// panics past it, naming the output.
pub(crate) fn within_gemm_bound(
    got: &[bf16],
    want: &[f32],
    (m, n, k): (usize, usize, usize),
    (x_rms, w_rms): (&[f32], &[f32]),
    what: &str,
) -> f32 {
    let mut worst = 0f32;
    for i in 0..m {
        for j in 0..n {
            let (g, wv) = (got[i * n + j].to_f32(), want[i * n + j]);
            let tol = BF16_ROUNDING * wv.abs() + 1e-3 * (k as f32).sqrt() * x_rms[i] * w_rms[j];
            let err = (g - wv).abs();
            assert!(err <= tol, "{what}: out[{i}, {j}] = {g}, want {wv} (error {err:e} > {tol:e})");
            worst = worst.max(err / tol);
        }
    }
    worst
}

/// Two `[m, n]` GEMM outputs of the same bf16 products summed in f32 in different orders (as two wgmma kernels
/// that split k into their k16 steps differently): each pair of outputs may differ by one bf16 step of the larger
/// (`2^-7` of it) plus twice the summation-order slack `(k / 16) 2^-22 k rms(x_i) rms(w_j)` (k / 16 accumulations, each
/// off by at most 2^-22 of a partial sum, which is at most `k rms(x_i) rms(w_j)` by Cauchy-Schwarz; 4x the f32
/// rounding, for the tensor cores' truncation). Any fragment or index error is O(1) of the output, far past it.
/// Panics past the bound, naming the output; returns how many outputs differ at all.
pub(crate) fn within_order_bound(
    a: &[bf16],
    b: &[bf16],
    (m, n, k): (usize, usize, usize),
    (x_rms, w_rms): (&[f32], &[f32]),
    what: &str,
) -> usize {
    let mut differ = 0;
    for i in 0..m {
        for j in 0..n {
            let (x, y) = (a[i * n + j].to_f32(), b[i * n + j].to_f32());
            if x.to_bits() == y.to_bits() {
                continue;
            }
            differ += 1;
            let slack = 2.0 * (k as f32 / 16.0) * 2f32.powi(-22) * k as f32 * x_rms[i] * w_rms[j];
            let tol = 2.0 * BF16_ROUNDING * x.abs().max(y.abs()) + slack;
            assert!((x - y).abs() <= tol, "{what}: out[{i}, {j}] = {x} against {y} (more than {tol:e} apart)");
        }
    }
    differ
}

pub(crate) fn same_bits(a: &[bf16], b: &[bf16]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Poisons the int8 buffers: q = 0x55, scales NaN, zero points i32::MIN.
pub(crate) fn poisoned_acts(stream: &Arc<CudaStream>, rows: usize, k: usize) -> QuantActs {
    QuantActs {
        q: upload(stream, &vec![0x55i8; rows * k]),
        scales: upload(stream, &vec![f32::NAN; rows]),
        zeros: upload(stream, &vec![i32::MIN; rows]),
    }
}

/// A stream for the timing benches, or `None` (and "skipped") without a device. One stream orders everything there,
/// so cudarc's per-buffer events (which would break graph capture) are turned off first: call it before the bench
/// allocates, and use every buffer on this one stream.
pub(crate) fn bench_stream() -> Option<Arc<CudaStream>> {
    let ctx = stream()?.context().clone();
    // SAFETY: the caller allocates nothing before this and uses its buffers on the stream returned.
    unsafe { ctx.disable_event_tracking() };
    Some(ctx.new_stream().expect("stream"))
}

/// An `n x k` int4 matrix (group 32, symmetric) for the timing benches: hashed values in 0..8 and a constant scale,
/// since the values do not change the timing.
pub(crate) fn timing_weights(n: usize, k: usize, scheme: Scheme) -> QuantLinear {
    let q: Vec<i8> = (0..n * k).map(|i| ((i * 2_654_435_761usize) >> 7) as i8 & 7).collect();
    QuantLinear { matrix: QuantMatrix { n, k, group: 32, q, scales: vec![0.01f32; n * k / 32], zeros: None }, scheme }
}
