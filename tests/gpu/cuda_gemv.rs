//! Twin test of the `gemv` family (the decode skinny GEMM, `kernels/gemv.cu`) against the f32 CPU twin
//! `ops::cpu::linear::linear`, on fresh random bf16 inputs widened to f32, with every output poisoned with NaN
//! before each launch, plus a throughput benchmark beside cuBLASLt; the SwiGLU-fused variant against the SiLU
//! kernel followed by the plain one, and the norm prologue against the norm kernel followed by the plain one, bit
//! for bit.
//!
//! Tolerance, per output `(i, j)`: `|got - want| <= 2^-8 |want| + 1e-3 * sqrt(k) * rms(x[i]) * rms(w[j])`. The first
//! term is the kernel's one bf16 rounding of the output (round to nearest: at most 2^-8 of the value); the second
//! is slack for the different f32 summation order (tensor-core MMA partial sums, then the warps' partials), whose
//! error grows like sqrt(k) |x| |w| 2^-24: the slack is many thousand times that, yet a wrong, missing or doubled
//! product term moves an output by about rms(x) rms(w) (and a wrong row by sqrt(k) of it), far past the slack.
//!
//! Without a CUDA build or a device, each test prints "skipped: no CUDA device" and returns.

use std::sync::Arc;

use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use llama32::ops::cpu::linear::linear;
use llama32::ops::cuda::gemv::{gemv, gemv_gate_up_silu, supports, NormPrologue};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{cuda_stream as stream, download, normal, to_f32, upload};

/// One bf16 rounding (round to nearest, 8 significant bits) moves a value by at most 2^-8 of itself.
const BF16_ROUNDING: f32 = 1.0 / 256.0;

/// (k, n) of every Linear layer of Llama 3.2 1B and 3B: qkv, o, gate_up, down and lm_head.
const LLAMA_SHAPES: [(usize, usize); 10] = [
    (2048, 3072),
    (2048, 2048),
    (2048, 16384),
    (8192, 2048),
    (2048, 128_256),
    (3072, 5120),
    (3072, 3072),
    (3072, 16384),
    (8192, 3072),
    (3072, 128_256),
];
/// Rows of x for the Llama shapes; the lm_head shapes (n = 128256) take a subset to keep the CPU twin fast.
const MS: [usize; 6] = [1, 2, 3, 5, 8, 16];
const LM_HEAD_MS: [usize; 3] = [1, 5, 16];
/// (k, n) with partial tiles (n not a multiple of 16), k past the last full step of the k loop (the tail: k / 8
/// not a multiple of 4 x warps x 4), k shorter than one warp's step, and a single output column; every m in 1..=16.
const ODD_SHAPES: [(usize, usize); 7] =
    [(2048, 7), (8, 1001), (24, 17), (1000, 1001), (2056, 33), (64, 1), (4120, 130)];

/// `rows` rows of `cols` bf16 values: uniform in (-1, 1) (or standard normal) times a per-row scale drawn
/// log-uniformly from [10^lo, 10^hi]. Uniform draws keep the 400M-element lm_head weights quick to make.
fn random_rows(rng: &mut ChaCha8Rng, rows: usize, cols: usize, (lo, hi): (f32, f32), gaussian: bool) -> Vec<bf16> {
    let mut out = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let scale = 10f32.powf(rng.random_range(lo..hi));
        if gaussian {
            out.extend((0..cols).map(|_| bf16::from_f32(scale * normal(rng))));
        } else {
            out.extend((0..cols).map(|_| bf16::from_f32(scale * rng.random_range(-1.0f32..1.0))));
        }
    }
    out
}

/// Root mean square of each row of `[rows, cols]`.
fn row_rms(v: &[f32], cols: usize) -> Vec<f32> {
    v.chunks(cols)
        .map(|r| (r.iter().map(|&a| f64::from(a) * f64::from(a)).sum::<f64>() / cols as f64).sqrt() as f32)
        .collect()
}

/// Runs one shape for each of `ms` (fresh x each time, one weight) and checks every output against the CPU twin.
fn check_shape(stream: &Arc<CudaStream>, rng: &mut ChaCha8Rng, k: usize, n: usize, ms: &[usize]) {
    assert!(ms.iter().all(|&m| supports(m, k)), "k {k}: a supported shape");
    let w = random_rows(rng, n, k, (-2.0, 0.0), false);
    let w32 = to_f32(&w);
    let w_rms = row_rms(&w32, k);
    let w_d = upload(stream, &w);
    for &m in ms {
        let what = format!("gemv m {m} k {k} n {n}");
        // x has 16 rows whatever m is: the wrapper takes at least m x k and must use only the first m rows.
        let x = random_rows(rng, 16, k, (-1.0, 1.0), true);
        let x32 = to_f32(&x[..m * k]);
        let x_rms = row_rms(&x32, k);
        let mut want = vec![f32::NAN; m * n];
        linear(&x32, &w32, m, k, n, &mut want);

        // 64 poisoned elements past m x n must stay untouched.
        let x_d = upload(stream, &x);
        let mut out_d = upload(stream, &vec![bf16::NAN; m * n + 64]);
        gemv(stream, &x_d, &w_d, m, k, n, &mut out_d).unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = download(stream, &out_d);
        assert!(got[m * n..].iter().all(|v| v.to_bits() == bf16::NAN.to_bits()), "{what}: wrote past m x n");

        let mut worst = 0f32;
        for i in 0..m {
            for j in 0..n {
                let (g, wv) = (got[i * n + j].to_f32(), want[i * n + j]);
                let slack = 1e-3 * (k as f32).sqrt() * x_rms[i] * w_rms[j];
                let tol = BF16_ROUNDING * wv.abs() + slack;
                let err = (g - wv).abs();
                assert!(err <= tol, "{what}: out[{i}, {j}] = {g}, want {wv} (error {err:e} > tolerance {tol:e})");
                worst = worst.max(err / tol);
            }
        }
        // The same inputs give the same bits: the reduction order is fixed (a moving result would be a race).
        let mut again_d = upload(stream, &vec![bf16::NAN; m * n]);
        gemv(stream, &x_d, &w_d, m, k, n, &mut again_d).unwrap_or_else(|e| panic!("{what}: {e}"));
        let again = download(stream, &again_d);
        assert!(
            again.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: a second run gave different bits"
        );
        eprintln!("{what}: worst error {worst:.3} of the tolerance");
    }
}

#[test]
fn gemv_matches_cpu() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (k, n) in ODD_SHAPES {
        check_shape(&stream, &mut rng, k, n, &(1..=16).collect::<Vec<_>>());
    }
    for (k, n) in LLAMA_SHAPES {
        check_shape(&stream, &mut rng, k, n, if n > 100_000 { &LM_HEAD_MS } else { &MS });
    }
}

/// `gemv_gate_up_silu` is `gemv` over all 2 n rows followed by `silu_mul`, bit for bit: x positive, so that gate row
/// j (a constant times 1 + noise) sums to about `level[j]`, from -200 (expf overflows to inf and SiLU is -0) through
/// the range where SiLU bends; up rows random. On the 1B/3B/11B gate_up shapes at decode batch sizes (n = inter)
/// and odd ones (tail steps, partial tiles, n not a multiple of 8), every m in 1..=16 on the small shapes.
#[test]
fn gemv_gate_up_silu_equals_gemv_then_silu_mul() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let shapes = [(2048usize, 8192usize), (3072, 8192), (4096, 14336), (2048, 7), (24, 17), (2056, 33), (8, 1)];
    for (k, n) in shapes {
        // w: gate rows 0..n, then up rows n..2n.
        let mut w = Vec::with_capacity(2 * n * k);
        for j in 0..n {
            let level = if j % 7 == 0 { -200.0 } else { rng.random_range(-12.0f32..12.0) };
            w.extend((0..k).map(|_| bf16::from_f32(level / k as f32 * (1.0 + 0.1 * rng.random_range(-1.0f32..1.0)))));
        }
        w.extend(random_rows(&mut rng, n, k, (-2.0, 0.0), false));
        let w_d = upload(&stream, &w);
        let ms: Vec<usize> = if k * n > 1 << 22 { vec![1, 3, 8, 9, 16] } else { (1..=16).collect() };
        for m in ms {
            let what = format!("gemv_gate_up_silu m {m} k {k} n {n}");
            let x: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.random_range(0.5f32..1.5))).collect();
            let x_d = upload(&stream, &x);
            let mut gate_up = upload(&stream, &vec![bf16::NAN; m * 2 * n]);
            gemv(&stream, &x_d, &w_d, m, k, 2 * n, &mut gate_up).unwrap();
            let mut want = upload(&stream, &vec![bf16::NAN; m * n]);
            llama32::ops::cuda::activation::silu_mul(&stream, &gate_up, n, &mut want).unwrap();
            let mut got = upload(&stream, &vec![bf16::NAN; m * n + 64]);
            gemv_gate_up_silu(&stream, &x_d, &w_d, m, k, n, &mut got).unwrap_or_else(|e| panic!("{what}: {e}"));
            let (want, got) = (download(&stream, &want), download(&stream, &got));
            assert!(got[m * n..].iter().all(|v| v.to_bits() == bf16::NAN.to_bits()), "{what}: wrote past m x n");
            if let Some(i) = (0..m * n).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                panic!("{what}: out[{}, {}] = {} but gemv + silu_mul = {}", i / n, i % n, got[i], want[i]);
            }
            // Both sides are exercised: zeros from the overflow rows (every 7th) and nonzero outputs elsewhere.
            let zeros = want.iter().filter(|v| v.to_f32() == 0.0).count();
            assert!(zeros >= m * n.div_ceil(7) && (n < 2 || zeros < m * n), "{what}: {zeros} zeros");
        }
        eprintln!("gemv_gate_up_silu k {k} n {n}: bitwise equal to gemv + silu_mul");
    }
    // A weight shorter than 2 n x k is refused by name.
    let x = upload(&stream, &[bf16::ONE; 64]);
    let w = upload(&stream, &vec![bf16::ONE; 2 * 4 * 64 - 1]);
    let mut out = upload(&stream, &[bf16::NAN; 4]);
    let e = gemv_gate_up_silu(&stream, &x, &w, 1, 64, 4, &mut out).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("8 x 64"), "{e}");
}

/// The norm prologue ([`NormPrologue`]) is `add_rms_norm` (or `rms_norm`) followed by the plain kernel, bit for bit:
/// the product, and with the residual add the updated residual, which the last block writes after every block has
/// read it (n = 3072 and 16384 give 192 and 1024 blocks racing for the counter). Hidden sizes of 1B, 3B, 11B and
/// 90B (l32_norm splits of 256, 384, 512 threads, and 2 vectors per thread at 8192), a one-warp split (k = 64),
/// and rows of 128 and 125 vectors; the SwiGLU epilogue with the prologue too. The counter is left zero.
#[test]
fn gemv_norm_prologue_equals_norm_then_gemv() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let eps = 1e-5f32;
    let mut ran = 0;
    for (k, n) in [(2048usize, 3072usize), (3072, 16384), (4096, 3072), (8192, 2048), (64, 300), (1024, 40), (1000, 33)]
    {
        let w = upload(&stream, &random_rows(&mut rng, 2 * n, k, (-1.5, -0.5), false));
        let nw = upload(&stream, &random_rows(&mut rng, 1, k, (-0.3, 0.3), true));
        // m 10 at k 2048 (8 warps) and m 16 at k 1024 (16 warps, 2 tiles): rows under 48 KB whose kernel's own
        // shared memory takes the block over it.
        for m in [1usize, 3, 8, 10, 16] {
            if !NormPrologue::fits(m, k) {
                continue;
            }
            for (add, silu) in [(true, false), (false, false), (true, true)] {
                let what = format!("norm prologue m {m} k {k} n {n} add {add} silu {silu}");
                let resid = random_rows(&mut rng, m, k, (-1.0, 1.0), true);
                let delta = upload(&stream, &random_rows(&mut rng, m, k, (-1.0, 0.5), true));
                let outs = if silu { n } else { 2 * n };
                let launch = |x: &dyn Fn(&mut CudaSlice<bf16>) -> llama32::Result<()>| {
                    let mut out = upload(&stream, &vec![bf16::NAN; m * outs]);
                    x(&mut out).unwrap_or_else(|e| panic!("{what}: {e}"));
                    download(&stream, &out)
                };
                // Unfused: the norm kernel into h, then the product of h.
                let mut r_a = upload(&stream, &resid);
                let mut h = upload(&stream, &vec![bf16::NAN; m * k]);
                if add {
                    llama32::ops::cuda::norm::add_rms_norm(&stream, &mut r_a, &delta, &nw, eps, k, &mut h).unwrap();
                } else {
                    llama32::ops::cuda::norm::rms_norm(&stream, &r_a, &nw, eps, k, &mut h).unwrap();
                }
                let want = launch(&|out| {
                    if silu {
                        gemv_gate_up_silu(&stream, &h, &w, m, k, n, out)
                    } else {
                        gemv(&stream, &h, &w, m, k, outs, out)
                    }
                });
                // Fused.
                let mut r_b = upload(&stream, &resid);
                let mut counter = upload(&stream, &[0u32]);
                // SAFETY: every operand lives past the launch below, and nothing else touches them before it.
                let pro = unsafe {
                    NormPrologue::new(&stream, &mut r_b, add.then_some(&delta), &nw, Some(&mut counter), eps, (m, k))
                }
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                let got = launch(&|out| {
                    if silu {
                        gemv_gate_up_silu(&stream, &pro, &w, m, k, n, out)
                    } else {
                        gemv(&stream, &pro, &w, m, k, outs, out)
                    }
                });
                if let Some(i) = (0..m * outs).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                    panic!("{what}: out[{}, {}] = {} fused, {} unfused", i / outs, i % outs, got[i], want[i]);
                }
                let (ra, rb) = (download(&stream, &r_a), download(&stream, &r_b));
                if let Some(i) = (0..m * k).find(|&i| ra[i].to_bits() != rb[i].to_bits()) {
                    panic!("{what}: residual[{}, {}] = {} fused, {} unfused", i / k, i % k, rb[i], ra[i]);
                }
                assert_eq!(download(&stream, &counter), vec![0u32], "{what}: the counter was not left zero");
                ran += 1;
            }
        }
        eprintln!("norm prologue k {k} n {n}: bitwise equal to the norm kernel + gemv");
    }
    assert!(ran >= 50, "only {ran} cases ran");
    // Refused by name: rows that do not fit, a residual add without a counter, a prologue for other rows.
    let mut r = upload(&stream, &vec![bf16::ONE; 16 * 4096]);
    let d = upload(&stream, &vec![bf16::ONE; 16 * 4096]);
    let nw = upload(&stream, &vec![bf16::ONE; 4096]);
    let mut c = upload(&stream, &[0u32]);
    // SAFETY (each): nothing is launched with a refused prologue; the accepted one below is refused by gemv.
    let e = unsafe { NormPrologue::new(&stream, &mut r, Some(&d), &nw, Some(&mut c), 1e-5, (16, 4096)) }.unwrap_err();
    assert!(e.to_string().contains("16 rows of 4096"), "{e}");
    let no_counter: Option<&mut CudaSlice<u32>> = None;
    let e = unsafe { NormPrologue::new(&stream, &mut r, Some(&d), &nw, no_counter, 1e-5, (2, 64)) }.unwrap_err();
    assert!(e.to_string().contains("counter"), "{e}");
    let pro = unsafe { NormPrologue::new(&stream, &mut r, Some(&d), &nw, Some(&mut c), 1e-5, (2, 64)) }.unwrap();
    let w = upload(&stream, &vec![bf16::ONE; 8 * 64]);
    let mut out = upload(&stream, &[bf16::NAN; 3 * 8]);
    let e = gemv(&stream, &pro, &w, 3, 64, 8, &mut out).unwrap_err().to_string();
    assert!(e.contains("`x`") || e.contains("covers 2 rows of 64"), "{e}");
}

#[test]
fn gemv_rejects_bad_shapes() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (m, k, n) = (4, 64, 40);
    let x_d = upload(&stream, &random_rows(&mut rng, m, k, (0.0, 0.1), true));
    let w_d = upload(&stream, &random_rows(&mut rng, n, k, (0.0, 0.1), true));
    let mut out_d = upload(&stream, &vec![bf16::NAN; m * n]);
    let bad = |r: llama32::Result<()>, what: &str| {
        let err = r.expect_err(what).to_string();
        assert!(err.contains(what), "expected an error naming {what}, got: {err}");
    };
    bad(gemv(&stream, &x_d, &w_d, 0, k, n, &mut out_d), "m is 0");
    bad(gemv(&stream, &x_d, &w_d, 17, k, n, &mut out_d), "m is 17");
    bad(gemv(&stream, &x_d, &w_d, 1, 12, n, &mut out_d), "k is 12");
    bad(gemv(&stream, &x_d, &w_d, m, 72, n, &mut out_d), "`x`");
    bad(gemv(&stream, &x_d, &w_d, m, k, n + 1, &mut out_d), "`w`");
    let mut short = upload(&stream, &vec![bf16::NAN; m * n - 1]);
    bad(gemv(&stream, &x_d, &w_d, m, k, n, &mut short), "`out`");
    // Views that start 2 bytes into their allocation are not 16-byte aligned.
    bad(gemv(&stream, &x_d.slice(1..), &w_d.slice(..), 2, k, n, &mut out_d), "`x`");
    bad(gemv(&stream, &x_d.slice(..), &w_d.slice(1..), m, k, 2, &mut out_d), "`w`");
    // Nothing was launched: the output is still poisoned.
    assert!(download(&stream, &out_d).iter().all(|v| v.is_nan()));
    // n = 0 is a no-op.
    gemv(&stream, &x_d, &w_d, m, k, 0, &mut out_d).expect("n = 0");
    assert!(download(&stream, &out_d).iter().all(|v| v.is_nan()));
}

// ------------------------------------------------------------------------------------------------------------------
// benchmark

/// Bytes of weight copies the benchmark rotates through for a weight that fits in L2 (an H100 has 50 MB).
pub(crate) const ROTATE_BYTES: usize = 200 << 20;
/// Calls per captured graph, and timed graph launches (the median is reported).
pub(crate) const CALLS: usize = 20;
const SAMPLES: usize = 25;

/// `Blas::gemm` (a cuBLASLt plan kept per shape) against cudarc's `Matmul::matmul` (which plans every call): the
/// same bits on a shape's first call and on a later one, one plan per shape, and a too-small buffer refused by
/// name.
#[test]
fn planned_cublaslt_gemm_equals_cudarc_matmul() {
    let Some(stream) = stream() else { return };
    let reference = CudaBlasLT::new(stream.clone()).expect("cuBLASLt");
    let blas = llama32::exec::cuda::blas::Blas::new(&stream).expect("Blas");
    let mut rng = ChaCha8Rng::seed_from_u64(0xb1a5);
    // (rows, k, n): odd sizes, a 1B prefill projection, and the 1B lm_head at one row.
    let shapes = [(17, 64, 40), (300, 512, 1000), (128, 2048, 3072), (1, 2048, 128_256)];
    for (i, &(m, k, n)) in shapes.iter().enumerate() {
        let x = upload(&stream, &random_rows(&mut rng, m, k, (-1.0, 0.5), true));
        let w = upload(&stream, &random_rows(&mut rng, n, k, (-2.0, -1.0), true));
        let mut want = stream.alloc_zeros::<bf16>(m * n).expect("alloc");
        cublaslt_gemm(&reference, &x, &w, (m, k, n), &mut want);
        let want: Vec<bf16> = download(&stream, &want);
        for call in 0..2 {
            let mut got = upload(&stream, &vec![bf16::NAN; m * n]);
            blas.gemm(&x, &w, m, k, n, &mut got).expect("gemm");
            let got: Vec<bf16> = download(&stream, &got);
            if let Some(j) = (0..m * n).find(|&j| got[j].to_bits() != want[j].to_bits()) {
                panic!(
                    "[{m}, {k}] x [{n}, {k}]^T call {call}: element {j} is {} planned, {} per call",
                    got[j], want[j]
                );
            }
        }
        assert_eq!(blas.plans(), i + 1, "one plan per shape");
    }
    let (x, w) = (upload(&stream, &vec![bf16::ONE; 8 * 64]), upload(&stream, &vec![bf16::ONE; 40 * 64]));
    let mut out = stream.alloc_zeros::<bf16>(9 * 40).expect("alloc");
    let err = blas.gemm(&x, &w, 9, 64, 40, &mut out).unwrap_err().to_string();
    assert!(err.contains("too small") && err.contains("[9, 64]"), "{err}");
}

/// `out[m, n] = x @ w^T` through cuBLASLt, as the executor calls it (engine/exec/cuda/ops.rs `gemm`).
pub(crate) fn cublaslt_gemm(
    blas: &CudaBlasLT,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    dims: (usize, usize, usize),
    out: &mut CudaSlice<bf16>,
) {
    let (m, k, n) = dims;
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: k as i64,
        ldb: k as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    // SAFETY: x holds at least m x k, w n x k and out m x n elements (allocated so by the caller).
    unsafe { blas.matmul(cfg, w, x, out, None, None) }.expect("cuBLASLt matmul");
}

/// Seconds per call: `calls` (each given its call index) captured into one CUDA graph, then the median over
/// SAMPLES graph launches timed with CUDA events, divided by CALLS.
pub(crate) fn time_graph(stream: &Arc<CudaStream>, call: &mut dyn FnMut(usize)) -> f64 {
    use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
    // Warm-up outside the graph (module load, cuBLASLt's heuristic), then capture.
    for i in 0..3 {
        call(i);
    }
    stream.synchronize().expect("sync");
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).expect("begin capture");
    for i in 0..CALLS {
        call(i);
    }
    let graph = stream.end_capture(CUgraphInstantiate_flags(0)).expect("end capture").expect("a graph");
    let ctx = stream.context();
    let (start, end) = (
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event"),
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event"),
    );
    graph.launch().expect("graph launch");
    let mut ms: Vec<f32> = (0..SAMPLES)
        .map(|_| {
            start.record(stream).expect("record");
            graph.launch().expect("graph launch");
            end.record(stream).expect("record");
            end.synchronize().expect("sync");
            start.elapsed_ms(&end).expect("elapsed")
        })
        .collect();
    ms.sort_by(f32::total_cmp);
    f64::from(ms[SAMPLES / 2]) * 1e-3 / CALLS as f64
}

/// Every Llama 3.2 1B/3B Linear shape at m = 1 and m = 8: this kernel and cuBLASLt (as the executor calls it) on
/// the same operands, each in GB/s of weight read (n x k x 2 bytes per call), the median of 25 CUDA-graph launches
/// of 20 calls, rotating through several weight copies when the weight would fit in L2; and this kernel again with
/// programmatic dependent launch on (`LLAMA32_PDL`), side by side.
#[test]
#[ignore]
fn gemv_throughput() {
    let Some(probe) = stream() else { return };
    let ctx = probe.context().clone();
    // One stream orders everything here; cudarc's per-buffer events would break graph capture.
    // SAFETY: called before this test allocates; every buffer below is used on the one stream created next.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().expect("stream");
    let blas = CudaBlasLT::new(stream.clone()).expect("cuBLASLt");
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // Random weights are tiled from one 1M-element block: the values do not matter to the timing, only that they are
    // not zeros.
    let block = random_rows(&mut rng, 1, 1 << 20, (-2.0, -1.0), false);
    for (k, n) in LLAMA_SHAPES {
        let bytes = n * k * 2;
        let copies = ROTATE_BYTES.div_ceil(bytes).clamp(1, CALLS);
        let host: Vec<bf16> = block.iter().copied().cycle().take(n * k).collect();
        let ws: Vec<CudaSlice<bf16>> = (0..copies).map(|_| upload(&stream, &host)).collect();
        drop(host);
        for m in [1, 8] {
            let x = upload(&stream, &random_rows(&mut rng, m, k, (-1.0, 1.0), true));
            let mut out = stream.alloc_zeros::<bf16>(m * n).expect("alloc");
            let was = llama32::ops::cuda::programmatic_launch();
            llama32::ops::cuda::set_programmatic_launch(false).expect("PDL off");
            let ours = time_graph(&stream, &mut |i| {
                gemv(&stream, &x, &ws[i % copies], m, k, n, &mut out).expect("gemv");
            });
            let theirs = time_graph(&stream, &mut |i| cublaslt_gemm(&blas, &x, &ws[i % copies], (m, k, n), &mut out));
            // The same graph with programmatic dependent launch: each call's launch and first weights overlap the
            // previous call's tail.
            llama32::ops::cuda::set_programmatic_launch(true).expect("PDL on");
            let pdl = time_graph(&stream, &mut |i| {
                gemv(&stream, &x, &ws[i % copies], m, k, n, &mut out).expect("gemv");
            });
            let gbs = |s: f64| bytes as f64 / s / 1e9;
            eprintln!(
                "gemv m {m:>2} k {k:>4} n {n:>6} ({copies:>2} copies): {:7.2} us {:6.0} GB/s | cuBLASLt {:7.2} us {:6.0} GB/s | {:.2}x | PDL {:7.2} us {:6.0} GB/s",
                ours * 1e6,
                gbs(ours),
                theirs * 1e6,
                gbs(theirs),
                theirs / ours,
                pdl * 1e6,
                gbs(pdl)
            );
            if n == 16_384 {
                // The 1B/3B gate_up (inter 8192): gemv + silu_mul against the fused epilogue, both under PDL.
                let inter = n / 2;
                let mut act = stream.alloc_zeros::<bf16>(m * inter).expect("alloc");
                let two = time_graph(&stream, &mut |i| {
                    gemv(&stream, &x, &ws[i % copies], m, k, n, &mut out).expect("gemv");
                    llama32::ops::cuda::activation::silu_mul(&stream, &out, inter, &mut act).expect("silu_mul");
                });
                let fused = time_graph(&stream, &mut |i| {
                    gemv_gate_up_silu(&stream, &x, &ws[i % copies], m, k, inter, &mut act).expect("fused");
                });
                eprintln!(
                    "gemv m {m:>2} k {k:>4} gate_up {n:>6}: gemv + silu_mul {:7.2} us | gemv_gate_up_silu {:7.2} us | {:.2}x",
                    two * 1e6,
                    fused * 1e6,
                    two / fused
                );
            }
            llama32::ops::cuda::set_programmatic_launch(was).expect("PDL back");
        }
    }
}
