//! Twin tests of the 4-bit kernels (`kernels/quant/*.cu`, wrappers in `ops::cuda::quant`) against their CPU twins,
//! on fresh random inputs with every output poisoned before each launch, and an end-to-end check of quantized
//! golden checkpoints on CUDA against the CPU quantized reference.
//!
//! What must be exact, and what is judged by a bound:
//! - `act_quant` (alone and fused into RMSNorm, residual add + RMSNorm, SiLU * up): the bf16 values it writes
//!   equal, bit for bit, those of the unfused kernel (`l32_norm`, `l32_silu_mul`) on the same inputs, and its int8
//!   values and zero points equal `quantize_activations` on those bf16 values exactly; the scale too (the same
//!   f32 operations; the brief allows 1 ulp, the test asserts 0 and says so on failure).
//! - `w4a16_dequant`: exactly `bf16(s * (q - z))` (the f32 product is exact, one rounding).
//! - `w4a16_gemm` against `linear` over `QuantMatrix::dequantize()` in f32: per output
//!   `|got - want| <= 2^-8 |want| + 1e-3 sqrt(k) rms(x_i) rms(w_j)` (one bf16 rounding, and slack for a different
//!   f32 summation order that is thousands of times the real f32 error, while a wrong, missing or doubled product
//!   moves an output by about rms(x) rms(w)).
//! - the mma W4A8 kernel (`w4a8_gemm_with`, its plan) against `w4a8_linear` (torchao 8da4w) on the same bf16
//!   activations: the integer sums are exact on both sides, the f32 scaling differs in order only:
//!   `|got - want| <= 2^-8 |want| + 2e-5 mag`, where `mag` is the sum of the magnitudes of every scaled group term
//!   of that output (computed on the host in f64); a fragment-mapping error changes an output by a sizable
//!   fraction of `mag`.
//! - Each GEMM gives the same bits twice (the split-K reduction order is fixed), and the W4A16 decode kernels
//!   direct, pipelined and tiled give the same bits for the same split count; the bulk kernel (Hopper, m <= 16)
//!   gives the direct kernel's bits at one split when each of its warps covers whole tiles.
//!
//! Without a CUDA build or a device, each test prints "skipped: no CUDA device" and returns.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use llama32::ops::cpu::linear::linear;
use llama32::ops::cpu::quant::w4a8_linear;
use llama32::ops::cuda::quant::{
    act_quant, large_plan, large_wgmma_available, large_workspace_bound, set_w4a16_tiled_stages, w4a16_dequant,
    w4a16_dequant_rows, w4a16_gemm, w4a16_gemm_large, w4a16_gemm_silu, w4a16_gemm_silu_with, w4a16_gemm_with,
    w4a16_splits, w4a16_workspace_for, w4a8_gemm, w4a8_gemm_with, w4a8_plan, workspace_bound, ActSource,
    CudaQuantLinear, LargePlan, QuantActs, SplitKWorkspace, W4A16Choice, W4A16Kernel, W4A16LargeKernel, W4A8Kernel,
};
use llama32::ops::cuda::switch::KernelSwitch;
use llama32::ops::cuda::{activation, norm};
use llama32::quant::numerics::quantize_activations;
use llama32::quant::{QuantLinear, Scheme};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::common::{cuda_stream as stream, download, to_f32, upload};

/// One bf16 rounding moves a value by at most 2^-8 of itself.
pub(crate) const BF16_ROUNDING: f32 = 1.0 / 256.0;
/// (k, n) of every projection of Llama 3.2 1B: qkv, o, gate_up, down.
const LLAMA_1B: [(usize, usize); 4] = [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)];
/// Small and odd shapes: n not a multiple of 16 (padded tiles), one row, k of one chunk, k not a power of two.
const ODD: [(usize, usize); 6] = [(64, 1), (64, 17), (128, 40), (192, 1001), (4096, 33), (320, 130)];
/// The tests' base seed (each test derives its own).
pub(crate) const SEED: u64 = 0x5eed_4b17;

mod data;
pub(crate) use data::{
    bench_stream, poisoned_acts, random_matrix, random_rows, row_rms, same_bits, timing_weights, within_gemm_bound,
    within_order_bound,
};

/// A workspace big enough for every call of these tests.
fn workspace(stream: &Arc<CudaStream>) -> SplitKWorkspace {
    let sms = llama32::ops::cuda::attention::num_sms(stream).expect("SM count");
    let mut need = (0, 0);
    for (k, n) in LLAMA_1B.iter().chain(&ODD) {
        for w4a8 in [false, true] {
            let b = workspace_bound(w4a8, 512, *n, *k, sms);
            need = (need.0.max(b.0), need.1.max(b.1));
        }
    }
    // The W4A16 forced split counts of w4a16_matches_cpu: up to one split per 64-column chunk on the ODD shapes,
    // 5 on the 1B qkv shape.
    for (n, splits) in ODD.iter().map(|&(k, n)| (n, k / 64)).chain([(3072, 5)]) {
        for kernel in W4A16Kernel::ALL.into_iter().filter(|k| k.splits_k()) {
            for m in 1..=64 {
                let b = w4a16_workspace_for(kernel, m, n, splits);
                need = (need.0.max(b.0), need.1.max(b.1));
            }
        }
    }
    // The bulk kernel's forced block counts (BULK_BLOCKS), at up to 16 rows.
    for (_, n) in LLAMA_1B.iter().chain(&ODD) {
        let b = w4a16_workspace_for(W4A16Kernel::Bulk, 16, *n, *BULK_BLOCKS.iter().max().unwrap());
        need = (need.0.max(b.0), need.1.max(b.1));
    }
    SplitKWorkspace::new(stream, need.0, need.1, sms).expect("workspace")
}

/// Checks the device's int8 rows against the CPU twin applied to the bf16 values `v`.
fn check_acts(what: &str, stream: &Arc<CudaStream>, acts: &QuantActs, v: &[bf16], rows: usize, k: usize) {
    let (q, s, z) = (download(stream, &acts.q), download(stream, &acts.scales), download(stream, &acts.zeros));
    let (mut wq, mut ws, mut wz) = (vec![0i8; rows * k], vec![0f32; rows], vec![0i32; rows]);
    quantize_activations(&to_f32(v), rows, k, &mut wq, &mut ws, &mut wz);
    for r in 0..rows {
        assert_eq!(z[r], wz[r], "{what}: zero point of row {r}");
        let ulps = (s[r].to_bits() as i64 - ws[r].to_bits() as i64).abs();
        assert!(ulps <= 1, "{what}: scale of row {r} is {} vs CPU {} ({ulps} ulps)", s[r], ws[r]);
        assert_eq!(ulps, 0, "{what}: scale of row {r} is 1 ulp off the CPU twin: the f32 operations differ");
        if let Some(c) = (0..k).find(|&c| q[r * k + c] != wq[r * k + c]) {
            panic!("{what}: q[{r}, {c}] = {} vs CPU {} (value {})", q[r * k + c], wq[r * k + c], v[r * k + c]);
        }
    }
    assert!(q[rows * k..].iter().all(|&b| b == 0x55), "{what}: wrote past rows x k");
}

#[test]
fn act_quant_matches_cpu_twin() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    for hidden in [8usize, 64, 1000, 2048, 3072, 8192, 14336] {
        for rows in [1usize, 3, 17] {
            let what = |op: &str| format!("act_quant {op} rows {rows} hidden {hidden}");
            let x = random_rows(&mut rng, rows, hidden, (-2.0, 1.0), true);
            let w = random_rows(&mut rng, 1, hidden, (-0.5, 0.0), false);
            let res = random_rows(&mut rng, rows, hidden, (-1.0, 1.0), false);
            let gate_up = random_rows(&mut rng, rows, 2 * hidden, (-1.0, 0.5), true);
            let (x_d, w_d, gu_d) = (upload(&stream, &x), upload(&stream, &w), upload(&stream, &gate_up));
            let len = rows * hidden;
            let eps = 1e-5;

            // Plain rows: the values are the input.
            let mut acts = poisoned_acts(&stream, rows + 1, hidden);
            let mut out = upload(&stream, &vec![bf16::NAN; len]);
            act_quant(&stream, ActSource::Rows(x_d.slice(..)), rows, hidden, &mut acts, Some(&mut out.slice_mut(..)))
                .unwrap_or_else(|e| panic!("{}: {e}", what("rows")));
            assert!(same_bits(&download(&stream, &out), &x), "{}: bf16 values", what("rows"));
            check_acts(&what("rows"), &stream, &acts, &x, rows, hidden);

            // RMSNorm: the values of l32_norm, bit for bit.
            let mut want = upload(&stream, &vec![bf16::NAN; len]);
            norm::rms_norm(&stream, &x_d, &w_d, eps, hidden, &mut want).unwrap();
            let want = download(&stream, &want);
            let mut acts = poisoned_acts(&stream, rows + 1, hidden);
            let mut out = upload(&stream, &vec![bf16::NAN; len]);
            let src = ActSource::RmsNorm { x: x_d.slice(..), weight: w_d.slice(..), eps };
            act_quant(&stream, src, rows, hidden, &mut acts, Some(&mut out.slice_mut(..))).unwrap();
            assert!(same_bits(&download(&stream, &out), &want), "{}: bf16 values differ from l32_norm", what("rms"));
            check_acts(&what("rms"), &stream, &acts, &want, rows, hidden);
            // Without the bf16 output (the executor's call) the int8 rows are the same.
            let mut again = poisoned_acts(&stream, rows + 1, hidden);
            let src = ActSource::RmsNorm { x: x_d.slice(..), weight: w_d.slice(..), eps };
            act_quant(&stream, src, rows, hidden, &mut again, None).unwrap();
            assert_eq!(download(&stream, &again.q), download(&stream, &acts.q), "{}: out = None", what("rms"));

            // Residual add + RMSNorm: the values and the updated residual of l32_norm with a residual.
            let (mut res_a, mut res_b) = (upload(&stream, &res), upload(&stream, &res));
            let mut want = upload(&stream, &vec![bf16::NAN; len]);
            norm::add_rms_norm(&stream, &mut res_a, &x_d, &w_d, eps, hidden, &mut want).unwrap();
            let want = download(&stream, &want);
            let mut acts = poisoned_acts(&stream, rows + 1, hidden);
            let mut out = upload(&stream, &vec![bf16::NAN; len]);
            let src = ActSource::AddRmsNorm {
                residual: res_b.slice_mut(..),
                delta: x_d.slice(..),
                weight: w_d.slice(..),
                eps,
            };
            act_quant(&stream, src, rows, hidden, &mut acts, Some(&mut out.slice_mut(..))).unwrap();
            assert!(same_bits(&download(&stream, &out), &want), "{}: bf16 values", what("add_rms"));
            assert!(same_bits(&download(&stream, &res_b), &download(&stream, &res_a)), "{}: residual", what("add_rms"));
            check_acts(&what("add_rms"), &stream, &acts, &want, rows, hidden);

            // SiLU * up: the values of l32_silu_mul.
            let mut want = upload(&stream, &vec![bf16::NAN; len]);
            activation::silu_mul(&stream, &gu_d, hidden, &mut want).unwrap();
            let want = download(&stream, &want);
            let mut acts = poisoned_acts(&stream, rows + 1, hidden);
            let mut out = upload(&stream, &vec![bf16::NAN; len]);
            act_quant(
                &stream,
                ActSource::SiluMul(gu_d.slice(..)),
                rows,
                hidden,
                &mut acts,
                Some(&mut out.slice_mut(..)),
            )
            .unwrap();
            assert!(same_bits(&download(&stream, &out), &want), "{}: bf16 values", what("silu"));
            check_acts(&what("silu"), &stream, &acts, &want, rows, hidden);
        }
    }
    // An all-zero row (scale clamps to 2^-23) and a constant row.
    let (rows, hidden) = (2, 64);
    let mut x = vec![bf16::ZERO; hidden];
    x.extend(vec![bf16::from_f32(0.75); hidden]);
    let mut acts = poisoned_acts(&stream, rows + 1, hidden);
    act_quant(&stream, ActSource::Rows(upload(&stream, &x).slice(..)), rows, hidden, &mut acts, None).unwrap();
    check_acts("act_quant zero / constant rows", &stream, &acts, &x, rows, hidden);
}

#[test]
fn act_quant_rejects_bad_shapes() {
    let Some(stream) = stream() else { return };
    let x = upload(&stream, &[bf16::ONE; 64]);
    let mut acts = poisoned_acts(&stream, 4, 16);
    let err = |r: llama32::Result<()>, what: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains(what), "expected an error naming {what}, got: {e}");
    };
    err(act_quant(&stream, ActSource::Rows(x.slice(..)), 4, 12, &mut acts, None), "hidden is 12");
    err(act_quant(&stream, ActSource::Rows(x.slice(..)), 5, 16, &mut acts, None), "int8 buffers");
    err(act_quant(&stream, ActSource::Rows(x.slice(..60)), 4, 16, &mut acts, None), "`x`");
    err(act_quant(&stream, ActSource::SiluMul(x.slice(..)), 4, 16, &mut acts, None), "`gate_up`");
    assert!(download(&stream, &acts.q).iter().all(|&b| b == 0x55), "nothing was launched");
}

/// Block counts the bulk kernel is also run at: one block (four warps), small counts that cut tiles at uneven
/// chunks, and more warps than most of the small shapes have chunks (the launcher caps them).
const BULK_BLOCKS: [usize; 5] = [1, 2, 3, 7, 64];

/// One W4A16 shape: every m of `ms`, with each kernel that runs at m and the heuristic's splits, against the f32 CPU
/// twin, twice for determinism; then the pipelined and tiled kernels at the direct kernel's split count (and at each
/// of `forced` splits) must give the direct kernel's bits exactly. The bulk kernel (m <= 16, Hopper) also runs at
/// each of BULK_BLOCKS blocks against the twin, and with one block on a matrix of a multiple of 4 tiles (each warp
/// then covers whole tiles) must give the bits of the direct kernel at one split.
fn check_w4a16(
    stream: &Arc<CudaStream>,
    rng: &mut ChaCha8Rng,
    ws: &mut SplitKWorkspace,
    shape: (usize, usize, bool),
    ms: &[usize],
    forced: &[usize],
) {
    let (k, n, zeros) = shape;
    let qm = random_matrix(rng, n, k, zeros);
    let w32 = qm.dequantize();
    let w_rms = row_rms(&w32, k);
    let w = CudaQuantLinear::upload(stream, &QuantLinear { matrix: qm.clone(), scheme: Scheme::W4A16_G32 }).unwrap();

    // The dequantized bf16 matrix, exactly.
    let mut deq = upload(stream, &vec![bf16::NAN; n * k]);
    w4a16_dequant(stream, &w, &mut deq).unwrap();
    let deq = download(stream, &deq);
    if let Some(i) = (0..n * k).find(|&i| deq[i].to_bits() != bf16::from_f32(w32[i]).to_bits()) {
        panic!("w4a16_dequant k {k} n {n}: element [{}, {}] = {} vs {}", i / k, i % k, deq[i], w32[i]);
    }

    let run = |ws: &mut SplitKWorkspace, x_d: &CudaSlice<bf16>, m: usize, choice: W4A16Choice, what: &str| {
        let mut out = upload(stream, &vec![bf16::NAN; m * n + 64]);
        w4a16_gemm_with(stream, x_d, &w, m, ws, &mut out, choice).unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = download(stream, &out);
        assert!(got[m * n..].iter().all(|v| v.to_bits() == bf16::NAN.to_bits()), "{what}: wrote past m x n");
        got[..m * n].to_vec()
    };
    for &m in ms {
        let x = random_rows(rng, 64, k, (-1.0, 1.0), false);
        let x32 = to_f32(&x[..m * k]);
        let x_rms = row_rms(&x32, k);
        let mut want = vec![f32::NAN; m * n];
        linear(&x32, &w32, m, k, n, &mut want);
        let x_d = upload(stream, &x);
        let close = |got: &[bf16], what: &str| within_gemm_bound(got, &want, (m, n, k), (&x_rms, &w_rms), what);
        let mut direct = Vec::new();
        for kernel in W4A16Kernel::ALL {
            if !kernel.runs(m) {
                eprintln!("w4a16 {} m {m}: skipped (the kernel does not run at this m on this device)", kernel.name());
                continue;
            }
            let splits = w4a16_splits(kernel, m, n, k, ws.sms());
            let what = format!("w4a16 {} m {m} k {k} n {n} zeros {zeros} (splits {splits})", kernel.name());
            let got = run(ws, &x_d, m, W4A16Choice { kernel, splits: None }, &what);
            let worst = close(&got, &what);
            let again = run(ws, &x_d, m, W4A16Choice { kernel, splits: None }, &what);
            assert!(same_bits(&again, &got), "{what}: a second run gave different bits");
            eprintln!("{what}: worst error {worst:.3} of the tolerance");
            if kernel == W4A16Kernel::Direct {
                direct = got;
            }
        }
        if W4A16Kernel::Bulk.runs(m) {
            for blocks in BULK_BLOCKS {
                let what = format!("w4a16 bulk m {m} k {k} n {n} zeros {zeros} at {blocks} blocks");
                let choice = W4A16Choice { kernel: W4A16Kernel::Bulk, splits: Some(blocks) };
                let got = run(ws, &x_d, m, choice, &what);
                let worst = close(&got, &what);
                assert!(same_bits(&run(ws, &x_d, m, choice, &what), &got), "{what}: a second run gave different bits");
                eprintln!("{what}: worst error {worst:.3} of the tolerance");
                if blocks == 1 && n.div_ceil(16) % 4 == 0 {
                    let one = W4A16Choice { kernel: W4A16Kernel::Direct, splits: Some(1) };
                    let want_bits = run(ws, &x_d, m, one, &what);
                    if let Some(i) = (0..m * n).find(|&i| got[i].to_bits() != want_bits[i].to_bits()) {
                        panic!(
                            "{what}: out[{}, {}] = {} but direct at 1 split = {}",
                            i / n,
                            i % n,
                            got[i],
                            want_bits[i]
                        );
                    }
                }
            }
        }
        let direct_splits = w4a16_splits(W4A16Kernel::Direct, m, n, k, ws.sms());
        for splits in std::iter::once(direct_splits).chain(forced.iter().copied()) {
            let what = format!("w4a16 m {m} k {k} n {n} zeros {zeros} at {splits} splits");
            let want_bits = if splits == direct_splits {
                direct.clone()
            } else {
                run(ws, &x_d, m, W4A16Choice { kernel: W4A16Kernel::Direct, splits: Some(splits) }, &what)
            };
            for kernel in W4A16Kernel::ALL.into_iter().filter(|&k| k != W4A16Kernel::Direct && k.splits_k()) {
                let got = run(ws, &x_d, m, W4A16Choice { kernel, splits: Some(splits) }, &what);
                if let Some(i) = (0..m * n).find(|&i| got[i].to_bits() != want_bits[i].to_bits()) {
                    let name = kernel.name();
                    panic!("{what}: {name} out[{}, {}] = {} but direct = {}", i / n, i % n, got[i], want_bits[i]);
                }
            }
        }
    }
}

#[test]
fn w4a16_matches_cpu() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 1);
    let mut ws = workspace(&stream);
    let all: Vec<usize> = vec![1, 2, 3, 5, 8, 9, 16, 17, 31, 33, 47, 64];
    for (k, n) in ODD {
        // Forced splits: one chunk per split (every split boundary), and an odd count that leaves uneven ranges.
        let forced = [k / 64, 3.min(k / 64)];
        check_w4a16(&stream, &mut rng, &mut ws, (k, n, false), &all, &forced);
        check_w4a16(&stream, &mut rng, &mut ws, (k, n, true), &[1, 9, 64], &forced);
    }
    for (k, n) in LLAMA_1B {
        check_w4a16(&stream, &mut rng, &mut ws, (k, n, false), &[1, 7, 16, 33, 64], &[1]);
    }
    check_w4a16(&stream, &mut rng, &mut ws, (2048, 3072, true), &[1, 16], &[1, 5]);
}

/// SwiGLU's `[gate; up]` weight uploaded with its rows paired (`CudaQuantLinear::upload_swiglu`): for every kernel
/// that runs at each m, the plain product equals that of the unpaired upload (the same bits for the split-K kernels,
/// whose per-output order does not depend on a row's tile; within one bf16 step for the bulk kernel, whose
/// stream-K cuts fall elsewhere), its dequantization is the same matrix bit for bit, and `w4a16_gemm_silu` gives
/// exactly the bits of the paired plain product followed by `silu_mul`, writing nothing past `[m, n / 2]`.
#[test]
fn w4a16_paired_swiglu_matches_plain_then_silu_mul() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 4);
    let mut ws = workspace(&stream);
    for (k, n, zeros) in [(64, 16, false), (128, 48, true), (4096, 32, false), (320, 128, false), (2048, 16384, false)]
    {
        let half = n / 2;
        let qm = random_matrix(&mut rng, n, k, zeros);
        let w_rms = row_rms(&qm.dequantize(), k);
        let ql = QuantLinear { matrix: qm, scheme: Scheme::W4A16_G32 };
        let plain = CudaQuantLinear::upload(&stream, &ql).unwrap();
        let paired = CudaQuantLinear::upload_swiglu(&stream, &ql).unwrap();
        assert!(paired.swiglu_paired() && !plain.swiglu_paired());
        let deq = |w: &CudaQuantLinear| {
            let mut d = upload(&stream, &vec![bf16::NAN; n * k]);
            w4a16_dequant(&stream, w, &mut d).unwrap();
            download(&stream, &d)
        };
        assert!(same_bits(&deq(&plain), &deq(&paired)), "k {k} n {n}: the paired dequantization differs");
        for m in [1, 3, 8, 9, 16, 17, 33, 64] {
            let xh = random_rows(&mut rng, m, k, (-1.0, 1.0), false);
            let x_rms = row_rms(&to_f32(&xh), k);
            let x = upload(&stream, &xh);
            for kernel in W4A16Kernel::ALL.into_iter().filter(|kernel| kernel.runs(m)) {
                let what = format!("w4a16 paired {} m {m} k {k} n {n} zeros {zeros}", kernel.name());
                let choice = W4A16Choice { kernel, splits: None };
                let product = |ws: &mut SplitKWorkspace, w: &CudaQuantLinear| {
                    let mut out = upload(&stream, &vec![bf16::NAN; m * n]);
                    w4a16_gemm_with(&stream, &x, w, m, ws, &mut out, choice).unwrap_or_else(|e| panic!("{what}: {e}"));
                    out
                };
                let want = download(&stream, &product(&mut ws, &plain));
                let got_d = product(&mut ws, &paired);
                let got = download(&stream, &got_d);
                for i in 0..m * n {
                    let (a, b) = (got[i].to_f32(), want[i].to_f32());
                    let ok = if kernel.splits_k() {
                        a.to_bits() == b.to_bits()
                    } else {
                        // Another f32 cut of the same sums: within one bf16 step, or the summation slack of
                        // check_w4a16 near zero.
                        let slack = 1e-3 * (k as f32).sqrt() * x_rms[i / n] * w_rms[i % n];
                        (a - b).abs() <= BF16_ROUNDING * (a.abs() + b.abs()) + slack
                    };
                    assert!(ok, "{what}: out[{}, {}] = {a}, unpaired {b}", i / n, i % n);
                }
                let mut act = upload(&stream, &vec![bf16::NAN; m * half]);
                activation::silu_mul(&stream, &got_d, half, &mut act).unwrap();
                let mut fused = upload(&stream, &vec![bf16::NAN; m * half + 64]);
                w4a16_gemm_silu_with(&stream, &x, &paired, m, &mut ws, &mut fused, choice)
                    .unwrap_or_else(|e| panic!("{what} silu: {e}"));
                let (fused, act) = (download(&stream, &fused), download(&stream, &act));
                assert!(
                    fused[m * half..].iter().all(|v| v.to_bits() == bf16::NAN.to_bits()),
                    "{what}: wrote past m x n / 2"
                );
                if let Some(i) = (0..m * half).find(|&i| fused[i].to_bits() != act[i].to_bits()) {
                    panic!(
                        "{what}: fused out[{}, {}] = {} but gemm + silu_mul = {}",
                        i / half,
                        i % half,
                        fused[i],
                        act[i]
                    );
                }
            }
        }
        // SiLU needs the paired upload, and W4A16.
        let x = upload(&stream, &vec![bf16::ONE; k]);
        let mut out = upload(&stream, &vec![bf16::NAN; n]);
        let e = w4a16_gemm_silu(&stream, &x, &plain, 1, &mut ws, &mut out).unwrap_err().to_string();
        assert!(e.contains("paired"), "{e}");
    }
    // A [gate; up] weight whose half is not a multiple of 8 goes up unpaired, and the fused call says why not.
    let ql = QuantLinear { matrix: random_matrix(&mut rng, 24, 64, false), scheme: Scheme::W4A16_G32 };
    assert!(!CudaQuantLinear::upload_swiglu(&stream, &ql).unwrap().swiglu_paired());
    let ql8 = QuantLinear { matrix: random_matrix(&mut rng, 32, 64, false), scheme: Scheme::W4A8_G32 };
    let w8 = CudaQuantLinear::upload_swiglu(&stream, &ql8).unwrap();
    let (x, mut out) = (upload(&stream, &[bf16::ONE; 64]), upload(&stream, &[bf16::NAN; 32]));
    let e = w4a16_gemm_silu(&stream, &x, &w8, 1, &mut ws, &mut out).unwrap_err().to_string();
    assert!(e.contains("W4A8"), "{e}");
}

/// `w4a16_dequant_rows` over 16-row-tile chunks gives the rows of the whole dequantization (a paired gate_up
/// chunk: its gate rows, then the matching up rows), with and without zero points, the last chunk ending at an `n`
/// that is not a multiple of 16; a chunk off the tiles is refused.
#[test]
fn w4a16_dequant_rows_are_the_rows_of_the_whole() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 7);
    for (n, k, zeros, paired) in [(96, 128, false, false), (90, 64, true, false), (96, 192, true, true)] {
        let ql = QuantLinear { matrix: random_matrix(&mut rng, n, k, zeros), scheme: Scheme::W4A16_G32 };
        let w =
            if paired { CudaQuantLinear::upload_swiglu(&stream, &ql) } else { CudaQuantLinear::upload(&stream, &ql) };
        let w = w.unwrap();
        assert_eq!(w.swiglu_paired(), paired);
        let mut whole = upload(&stream, &vec![bf16::NAN; n * k]);
        w4a16_dequant(&stream, &w, &mut whole).unwrap();
        let whole = download(&stream, &whole);
        let row = |r: usize| &whole[r * k..(r + 1) * k];
        for chunk in [16, 32, 48] {
            let mut r0 = 0;
            while r0 < n {
                let r1 = (r0 + chunk).min(n);
                let mut out = upload(&stream, &vec![bf16::NAN; (r1 - r0) * k + 8]);
                w4a16_dequant_rows(&stream, &w, r0..r1, &mut out).unwrap();
                let got = download(&stream, &out);
                let want: Vec<usize> = if paired {
                    let (h, j0) = ((r1 - r0) / 2, r0 / 2);
                    (j0..j0 + h).chain(n / 2 + j0..n / 2 + j0 + h).collect()
                } else {
                    (r0..r1).collect()
                };
                for (i, &r) in want.iter().enumerate() {
                    assert!(
                        same_bits(&got[i * k..(i + 1) * k], row(r)),
                        "n {n} k {k} rows {r0}..{r1}: row {i} is not {r}"
                    );
                }
                assert!(got[(r1 - r0) * k..].iter().all(|v| v.is_nan()), "wrote past the chunk");
                r0 = r1;
            }
        }
        let mut out = upload(&stream, &vec![bf16::NAN; 32 * k]);
        let e = w4a16_dequant_rows(&stream, &w, 8..24, &mut out).unwrap_err().to_string();
        assert!(e.contains("16-row tile"), "{e}");
    }
}

/// One W4A8 shape through the mma kernel (whatever `auto` picks: the wgmma kernels round differently and have
/// their own twin test, tests/gpu/cuda_w4a8_wgmma.rs): every m of `ms` against `w4a8_linear` on the same bf16
/// activations, twice for determinism.
fn check_w4a8(
    stream: &Arc<CudaStream>,
    rng: &mut ChaCha8Rng,
    ws: &mut SplitKWorkspace,
    shape: (usize, usize, bool),
    ms: &[usize],
) {
    let (k, n, zeros) = shape;
    let sms = llama32::ops::cuda::attention::num_sms(stream).expect("SM count");
    let qm = random_matrix(rng, n, k, zeros);
    let w = CudaQuantLinear::upload(stream, &QuantLinear { matrix: qm.clone(), scheme: Scheme::W4A8_G32 }).unwrap();
    let groups = k / 32;
    for &m in ms {
        let what = format!("w4a8 m {m} k {k} n {n} zeros {zeros}");
        let x = random_rows(rng, m, k, (-1.0, 1.0), true);
        let x32 = to_f32(&x);
        let mut want = vec![f32::NAN; m * n];
        w4a8_linear(&x32, m, &qm, &mut want);
        // The magnitude of each output's scaled group terms, for the f32-order slack.
        let (mut xq, mut sx, mut zx) = (vec![0i8; m * k], vec![0f32; m], vec![0i32; m]);
        quantize_activations(&x32, m, k, &mut xq, &mut sx, &mut zx);

        let x_d = upload(stream, &x);
        let mut acts = poisoned_acts(stream, m, k);
        act_quant(stream, ActSource::Rows(x_d.slice(..)), m, k, &mut acts, None).unwrap();
        let mut out = upload(stream, &vec![bf16::NAN; m * n + 64]);
        let plan = w4a8_plan(W4A8Kernel::Mma, m, n, k, sms);
        w4a8_gemm_with(stream, &acts, &w, m, ws, &mut out, plan).unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = download(stream, &out);
        assert!(got[m * n..].iter().all(|v| v.to_bits() == bf16::NAN.to_bits()), "{what}: wrote past m x n");
        let mut worst = 0f32;
        for i in 0..m {
            for j in 0..n {
                let mut mag = 0f64;
                for g in 0..groups {
                    let z = qm.zeros.as_ref().map_or(0, |z| z[j * groups + g]) as i64;
                    let (mut dot, mut wsum) = (0i64, 0i64);
                    for c in g * 32..(g + 1) * 32 {
                        let qw = qm.q[j * k + c] as i64 - z;
                        dot += xq[i * k + c] as i64 * qw;
                        wsum += qw;
                    }
                    mag += qm.scales[j * groups + g] as f64 * (dot.abs() + (zx[i] as i64 * wsum).abs()) as f64;
                }
                let mag = (sx[i] as f64 * mag) as f32;
                let (g, wv) = (got[i * n + j].to_f32(), want[i * n + j]);
                let tol = BF16_ROUNDING * wv.abs() + 2e-5 * mag + f32::MIN_POSITIVE;
                let err = (g - wv).abs();
                assert!(err <= tol, "{what}: out[{i}, {j}] = {g}, want {wv} (error {err:e} > {tol:e})");
                worst = worst.max(err / tol);
            }
        }
        let mut again = upload(stream, &vec![bf16::NAN; m * n]);
        w4a8_gemm_with(stream, &acts, &w, m, ws, &mut again, plan).unwrap();
        assert!(same_bits(&download(stream, &again), &got[..m * n]), "{what}: a second run gave different bits");
        eprintln!("{what}: worst error {worst:.3} of the tolerance");
    }
}

#[test]
fn w4a8_matches_cpu() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 2);
    let mut ws = workspace(&stream);
    for (k, n) in ODD {
        check_w4a8(&stream, &mut rng, &mut ws, (k, n, false), &[1, 5, 8, 9, 16, 17, 32, 33, 129]);
        check_w4a8(&stream, &mut rng, &mut ws, (k, n, true), &[1, 17, 130]);
    }
    for (k, n) in LLAMA_1B {
        check_w4a8(&stream, &mut rng, &mut ws, (k, n, false), &[1, 16, 31, 200]);
    }
    check_w4a8(&stream, &mut rng, &mut ws, (2048, 2048, true), &[3, 256]);
}

#[test]
fn quant_gemms_reject_bad_operands() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 3);
    let mut ws = workspace(&stream);
    let qm = random_matrix(&mut rng, 40, 128, false);
    let w16 = CudaQuantLinear::upload(&stream, &QuantLinear { matrix: qm.clone(), scheme: Scheme::W4A16_G32 }).unwrap();
    let w8 = CudaQuantLinear::upload(&stream, &QuantLinear { matrix: qm, scheme: Scheme::W4A8_G32 }).unwrap();
    let x: CudaSlice<bf16> = upload(&stream, &vec![bf16::ONE; 65 * 128]);
    let mut out = upload(&stream, &vec![bf16::NAN; 65 * 40]);
    let err = |r: llama32::Result<()>, what: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains(what), "expected an error naming {what}, got: {e}");
    };
    err(w4a16_gemm(&stream, &x, &w16, 0, &mut ws, &mut out), "m is 0");
    err(w4a16_gemm(&stream, &x, &w16, 65, &mut ws, &mut out), "m is 65");
    err(w4a16_gemm(&stream, &x, &w8, 1, &mut ws, &mut out), "W4A8");
    err(w4a16_gemm(&stream, &x.slice(..100), &w16, 1, &mut ws, &mut out), "`x`");
    for splits in [0, 3] {
        let choice = W4A16Choice { kernel: W4A16Kernel::Pipelined, splits: Some(splits) };
        err(w4a16_gemm_with(&stream, &x, &w16, 1, &mut ws, &mut out, choice), &format!("splits is {splits}"));
    }
    let bulk = W4A16Choice { kernel: W4A16Kernel::Bulk, splits: None };
    err(w4a16_gemm_with(&stream, &x, &w16, 17, &mut ws, &mut out, bulk), "m is 17; the bulk kernel takes m <= 16");
    let acts = poisoned_acts(&stream, 2, 128);
    err(w4a8_gemm(&stream, &acts, &w8, 3, &mut ws, &mut out), "int8 activations");
    err(w4a8_gemm(&stream, &acts, &w16, 1, &mut ws, &mut out), "W4A16");
    assert!(download(&stream, &out).iter().all(|v| v.is_nan()), "nothing was launched");
    // k not a multiple of 64 is refused at upload, with the reason.
    let bad = random_matrix(&mut rng, 8, 96, false);
    let e = CudaQuantLinear::upload(&stream, &QuantLinear { matrix: bad, scheme: Scheme::W4A16_G32 }).err().unwrap();
    assert!(e.to_string().contains("multiple of 64"), "{e}");
}

// ------------------------------------------------------------------------------------------------------------------
// end to end

mod e2e;

// the tiled kernel's ring depths

mod tiled;

// ------------------------------------------------------------------------------------------------------------------
// benchmark and profiling targets (cuda_quant/bench.rs)

mod bench;

/// Times the W4A16 kernels against the bf16 path at the decode sizes ([`bench::quant_throughput`]).
#[test]
#[ignore]
fn quant_throughput() {
    bench::quant_throughput();
}

/// One launch of each quantized and skinny-GEMM kernel worth a hardware profile ([`bench::ncu_quant_targets`]).
#[test]
#[ignore]
fn ncu_quant_targets() {
    bench::ncu_quant_targets();
}
