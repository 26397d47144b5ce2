//! Twin tests of the Hopper W4A16 kernels for many rows (`kernels/quant/w4a16_sm90.cu`, `w4a16_gemm_large`,
//! `W4A16LargeKernel::Wgmma` and `WgmmaRow`, which sum the same products in another order: the k16 steps of their
//! wgmma hold other columns; each launch announced to a watchdog that
//! aborts a hung test and names the launch) against the f32 GEMM over the bf16-rounded
//! dequantized weights (what the dequantize + cuBLASLt path multiplies by), on fresh random weights (with and
//! without zero points) and activations, both token tiles, one and several K splits, the paired SwiGLU layout and
//! its fused SiLU * up, with every output poisoned before each launch.
//!
//! Without a CUDA build or a device, each test prints "skipped: no CUDA device" and returns; on a device without
//! the kernel (not compute capability 9.x, or a build without sm_90a) it prints "skipped:" too, after checking that
//! the wrapper refuses with a clear error.

use half::bf16;
use llama32::ops::cpu::linear::linear;
use llama32::ops::cuda::activation;
use llama32::ops::cuda::quant::{
    large_tile_m, large_wgmma_available, large_workspace_for, w4a16_gemm_large, CudaQuantLinear, LargePlan,
    SplitKWorkspace, W4A16LargeKernel,
};
use llama32::ops::cuda::switch::KernelSwitch;
use llama32::quant::{QuantLinear, Scheme};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::common::{cuda_stream as stream, download, to_f32, upload, Watchdog};
use crate::cuda_quant::{random_matrix, random_rows, row_rms, same_bits, within_gemm_bound, within_order_bound, SEED};

/// `(k, n, zero points)`: one chunk, n not a multiple of 16 or 128, k not a power of two, then 1B qkv and down.
const SHAPES: [(usize, usize, bool); 6] =
    [(64, 17, false), (192, 1001, true), (320, 130, false), (4096, 40, true), (2048, 3072, false), (8192, 2048, false)];

/// The kernels of `w4a16_gemm_large`.
const KERNELS: [W4A16LargeKernel; 2] = [W4A16LargeKernel::Wgmma, W4A16LargeKernel::WgmmaRow];

/// The wgmma kernel (measured on an H100) against the CPU ([`large_test`]).
#[test]
fn w4a16_large_matches_cpu() {
    large_test("w4a16_large_matches_cpu", &KERNELS[..1]);
}

/// The wgmma-row kernel against the CPU and against the wgmma kernel, within the summation-order bound
/// ([`within_order_bound`]: an H200 showed, 2026-11-28, that the two do not give the same bits). Its own test, so
/// that a failure of the newer kernel leaves the other's verdict standing.
#[test]
fn w4a16_large_row_matches_cpu() {
    large_test("w4a16_large_row_matches_cpu", &KERNELS);
}

/// Every (shape, m, tile) of each of `kernels`, with one K split and with up to 3 and 7 (as many as the shape's
/// 64-column chunks allow): within the GEMM bound of the f32 product over the bf16-rounded weights, the same bits on
/// a second run (so the split counters were left zeroed), the first kernel's one-split outputs within the
/// summation-order bound of every other run's (the count of differing outputs is printed), nothing written past
/// `[m, n]`; the plan's tile (`large_tile_m`) is one of those run. Each launch is announced to a [`Watchdog`] first.
fn large_test(test: &str, kernels: &[W4A16LargeKernel]) {
    let Some(stream) = stream() else { return };
    let dog = Watchdog::start(test);
    let sms = llama32::ops::cuda::attention::num_sms(&stream).expect("SM count");
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 0x1a6);
    if !large_wgmma_available() {
        let qm = random_matrix(&mut rng, 16, 64, false);
        let w = CudaQuantLinear::upload(&stream, &QuantLinear { matrix: qm, scheme: Scheme::W4A16_G32 }).unwrap();
        let x = upload(&stream, &vec![bf16::ONE; 65 * 64]);
        let mut out = upload(&stream, &vec![bf16::NAN; 65 * 16]);
        let plan = LargePlan { kernel: W4A16LargeKernel::Wgmma, tile_m: 64, splits: 1 };
        let e = w4a16_gemm_large(&stream, (&x, &w, 65), plan, false, None, &mut out).unwrap_err().to_string();
        assert!(e.contains("no wgmma W4A16 kernel"), "{e}");
        println!("skipped: this device or build has no wgmma W4A16 kernel (compute capability 9.x with sm_90a)");
        return;
    }
    let (mut worst, mut differ, mut compared) = (0f32, 0usize, 0usize);
    for (k, n, zeros) in SHAPES {
        let qm = random_matrix(&mut rng, n, k, zeros);
        // The weights the dequantize + cuBLASLt path multiplies by: bf16(s * (q - z)).
        let w32: Vec<f32> = qm.dequantize().iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let w_rms = row_rms(&w32, k);
        let w = CudaQuantLinear::upload(&stream, &QuantLinear { matrix: qm, scheme: Scheme::W4A16_G32 }).unwrap();
        let ms: &[usize] = if n * k > 1 << 22 { &[65, 200] } else { &[1, 65, 129, 300] };
        for &m in ms {
            let xh = random_rows(&mut rng, m, k, (-1.0, 1.0), false);
            let x32 = to_f32(&xh);
            let x_rms = row_rms(&x32, k);
            let mut want = vec![f32::NAN; m * n];
            linear(&x32, &w32, m, k, n, &mut want);
            let x = upload(&stream, &xh);
            assert!([64, 128].contains(&large_tile_m(m, n, sms)));
            let mut splits = vec![1, (k / 64).min(3), (k / 64).min(7)];
            splits.dedup();
            for tile_m in [64, 128] {
                let most = LargePlan { kernel: kernels[0], tile_m, splits: *splits.last().unwrap_or(&1) };
                let need = large_workspace_for(most, m, n);
                let mut ws = SplitKWorkspace::new(&stream, need.0, need.1, sms).unwrap();
                let mut first: Option<Vec<bf16>> = None;
                for (&kernel, &splits) in kernels.iter().flat_map(|k| splits.iter().map(move |s| (k, s))) {
                    let name = kernel.name();
                    let what =
                        format!("w4a16 large {name} m {m} k {k} n {n} zeros {zeros} tile {tile_m} splits {splits}");
                    let plan = LargePlan { kernel, tile_m, splits };
                    let mut run = || {
                        let mut out = upload(&stream, &vec![bf16::NAN; m * n + 64]);
                        dog.at(format!("launch {what}"));
                        w4a16_gemm_large(&stream, (&x, &w, m), plan, false, Some(&mut ws), &mut out)
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                        let got = download(&stream, &out);
                        dog.at(format!("check {what}"));
                        got
                    };
                    let got = run();
                    let past = got[m * n..].iter().all(|v| v.to_bits() == bf16::NAN.to_bits());
                    assert!(past, "{what}: wrote past m x n");
                    worst = worst.max(within_gemm_bound(&got[..m * n], &want, (m, n, k), (&x_rms, &w_rms), &what));
                    assert!(same_bits(&run(), &got), "{what}: a second run gave different bits");
                    match &first {
                        None => first = Some(got),
                        Some(f) => {
                            let rms = (&x_rms[..], &w_rms[..]);
                            differ += within_order_bound(f, &got, (m, n, k), rms, &what);
                            compared += m * n;
                        }
                    }
                }
            }
        }
    }
    let names: Vec<&str> = kernels.iter().map(|k| k.name()).collect();
    eprintln!("w4a16 large ({}): worst error {worst:.3} of the GEMM bound", names.join(", "));
    if compared > 0 {
        eprintln!(
            "w4a16 large: {differ} of {compared} outputs differ from the first kernel's, all within the order bound"
        );
    }
}

/// With the `[gate; up]` weight uploaded paired, for both kernels and with one and with 3 K splits, the plain
/// product is the unpaired one in matrix order (within the GEMM bound: another row position in the tile), and
/// `silu = true` gives exactly the bits of that product followed by `silu_mul`, writing nothing past `[m, n / 2]`.
/// The wrapper refuses a split count out of range and splits without a workspace, launching nothing.
#[test]
fn w4a16_large_paired_swiglu_matches_plain_then_silu_mul() {
    let Some(stream) = stream() else { return };
    if !large_wgmma_available() {
        println!("skipped: this device or build has no wgmma W4A16 kernel (compute capability 9.x with sm_90a)");
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 0x1a7);
    // k 192: three 64-wide K tiles, one per split at 3 splits (k 128 has only two).
    for (k, n, zeros) in [(192, 48, true), (2048, 16384, false)] {
        let half = n / 2;
        let qm = random_matrix(&mut rng, n, k, zeros);
        let w32: Vec<f32> = qm.dequantize().iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let w_rms = row_rms(&w32, k);
        let ql = QuantLinear { matrix: qm, scheme: Scheme::W4A16_G32 };
        let plain = CudaQuantLinear::upload(&stream, &ql).unwrap();
        let paired = CudaQuantLinear::upload_swiglu(&stream, &ql).unwrap();
        let most = LargePlan { kernel: KERNELS[0], tile_m: 64, splits: 3 };
        let need = large_workspace_for(most, 130, n);
        let mut ws = SplitKWorkspace::new(&stream, need.0, need.1, 132).unwrap();
        // The measured kernel first, at every m: a failure of the newer one comes after the older one's cases.
        let cases = KERNELS.into_iter().flat_map(|kernel| [(65, 1), (130, 1), (130, 3)].map(|c| (kernel, c)));
        for (kernel, (m, splits)) in cases {
            let xh = random_rows(&mut rng, m, k, (-1.0, 1.0), false);
            let x32 = to_f32(&xh);
            let mut want = vec![f32::NAN; m * n];
            linear(&x32, &w32, m, k, n, &mut want);
            let x = upload(&stream, &xh);
            let what = format!("w4a16 large {} paired m {m} k {k} n {n} zeros {zeros} splits {splits}", kernel.name());
            let plan = LargePlan { kernel, tile_m: 64, splits };
            let mut product = |w: &CudaQuantLinear| {
                let mut out = upload(&stream, &vec![bf16::NAN; m * n]);
                w4a16_gemm_large(&stream, (&x, w, m), plan, false, Some(&mut ws), &mut out)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                out
            };
            let got_d = product(&paired);
            let got = download(&stream, &got_d);
            within_gemm_bound(&got, &want, (m, n, k), (&row_rms(&x32, k), &w_rms), &what);
            within_gemm_bound(
                &download(&stream, &product(&plain)),
                &want,
                (m, n, k),
                (&row_rms(&x32, k), &w_rms),
                &what,
            );
            let mut act = upload(&stream, &vec![bf16::NAN; m * half]);
            activation::silu_mul(&stream, &got_d, half, &mut act).unwrap();
            let mut fused = upload(&stream, &vec![bf16::NAN; m * half + 64]);
            w4a16_gemm_large(&stream, (&x, &paired, m), plan, true, Some(&mut ws), &mut fused)
                .unwrap_or_else(|e| panic!("{what} silu: {e}"));
            let (fused, act) = (download(&stream, &fused), download(&stream, &act));
            assert!(fused[m * half..].iter().all(|v| v.to_bits() == bf16::NAN.to_bits()), "{what}: wrote past");
            if let Some(i) = (0..m * half).find(|&i| fused[i].to_bits() != act[i].to_bits()) {
                panic!("{what}: fused out[{}, {}] = {} but gemm + silu_mul = {}", i / half, i % half, fused[i], act[i]);
            }
        }
        // SiLU needs the paired upload.
        let x = upload(&stream, &vec![bf16::ONE; 65 * k]);
        let mut out = upload(&stream, &vec![bf16::NAN; 65 * n]);
        let plan = LargePlan { kernel: W4A16LargeKernel::Wgmma, tile_m: 64, splits: 1 };
        let refusal = |plan: LargePlan, silu: bool, ws: Option<&mut SplitKWorkspace>, out: &mut _| {
            w4a16_gemm_large(&stream, (&x, &plain, 65), plan, silu, ws, out).unwrap_err().to_string()
        };
        let e = refusal(plan, true, None, &mut out);
        assert!(e.contains("paired"), "{e}");
        let e = refusal(LargePlan { tile_m: 96, ..plan }, false, None, &mut out);
        assert!(e.contains("tile_m is 96"), "{e}");
        let e = refusal(LargePlan { kernel: W4A16LargeKernel::Dequant, ..plan }, false, None, &mut out);
        assert!(e.contains("dequant"), "{e}");
        for bad in [0, k / 64 + 1] {
            let e = refusal(LargePlan { splits: bad, ..plan }, false, Some(&mut ws), &mut out);
            assert!(e.contains(&format!("splits is {bad}")), "{e}");
        }
        let e = refusal(LargePlan { splits: 2, ..plan }, false, None, &mut out);
        assert!(e.contains("need a split-K workspace"), "{e}");
        let mut small = SplitKWorkspace::new(&stream, 1, 1, 132).unwrap();
        let e = refusal(LargePlan { splits: 2, ..plan }, false, Some(&mut small), &mut out);
        assert!(e.contains("workspace holds fewer"), "{e}");
        assert!(download(&stream, &out).iter().all(|v| v.is_nan()), "nothing was launched");
    }
}
