//! Twin tests of the Hopper W4A8 kernels (`kernels/quant/w4a8_sm90.cu`, `W4A8Kernel::Wgmma`, `WgmmaSerial`,
//! `WgmmaRow`, `WgmmaWs`, `WgmmaTma` and `WgmmaWsTma`, which give the same bits; one test for the measured pair and
//! one for each newer kernel, each launch announced to a watchdog that aborts a hung test and names the launch): bit
//! for bit against its CPU twin (`ops::cpu::w4a8_segmented`, the same f32 operations in the same order), within a
//! stated bound of torchao's numerics (`w4a8_linear`), deterministic, for 64- and 128-token tiles and several K
//! splits, on fresh random weights and activations with the output poisoned before each launch.
//!
//! Without a CUDA build or a device, each test prints "skipped: no CUDA device" and returns; on a device without
//! the kernel (not compute capability 9.x, or a build without sm_90a) the twin tests print "skipped:" too, after
//! checking that the wrapper refuses the kernel with a clear error.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use half::bf16;
use llama32::ops::cpu::quant::w4a8_linear;
use llama32::ops::cpu::w4a8_segmented::w4a8_segmented;
use llama32::ops::cuda::quant::{
    act_quant, layout_w4a8, w4a8_gemm_with, w4a8_plan, w4a8_workspace_for, wgmma_available, ActSource, CudaQuantLinear,
    SplitKWorkspace, W4A8Kernel, W4A8Plan,
};
use llama32::ops::cuda::switch::KernelSwitch;
use llama32::quant::numerics::quantize_activations;
use llama32::quant::{QuantLinear, Scheme};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::common::{cuda_stream as stream, download, to_f32, upload, Watchdog};
use crate::cuda_quant::{poisoned_acts, random_matrix, random_rows, same_bits, BF16_ROUNDING, SEED};

/// `(k, n)`: odd and small shapes (one chunk, n not a multiple of 16 or 128, k not a multiple of a segment), then
/// the 1B qkv and down projections.
const SHAPES: [(usize, usize); 7] =
    [(64, 1), (128, 40), (192, 1001), (320, 130), (4096, 33), (2048, 3072), (8192, 2048)];

/// The plans each (shape, m) runs, for every wgmma kernel: both token tiles, one split, the heuristic's splits,
/// 3 splits (segments cut short by the split boundaries) and, for k <= 512, one split per 64-column chunk.
fn plans(kernels: &[W4A8Kernel], m: usize, n: usize, k: usize, sms: usize) -> Vec<W4A8Plan> {
    let mut out = Vec::new();
    for &kernel in kernels {
        out.push(w4a8_plan(kernel, m, n, k, sms));
        for tile_m in [64, 128] {
            for splits in [1, 3, if k <= 512 { k / 64 } else { 1 }] {
                let plan = W4A8Plan { kernel, tile_m, splits };
                if splits <= k / 64 && !out.contains(&plan) {
                    out.push(plan);
                }
            }
        }
    }
    out
}

fn workspace_for(stream: &Arc<CudaStream>, plans: &[W4A8Plan], m: usize, n: usize, sms: usize) -> SplitKWorkspace {
    let need = plans.iter().fold((0, 0), |a, &p| {
        let b = w4a8_workspace_for(p, m, n);
        (a.0.max(b.0), a.1.max(b.1))
    });
    SplitKWorkspace::new(stream, need.0, need.1, sms).expect("workspace")
}

/// The block-barrier kernels measured on an H100 (`wgmma`, `wgmma-serial`) against the twin ([`twin_test`]).
#[test]
fn w4a8_wgmma_matches_its_cpu_twin_bit_for_bit() {
    twin_test("w4a8_wgmma_matches_its_cpu_twin_bit_for_bit", &[W4A8Kernel::Wgmma, W4A8Kernel::WgmmaSerial]);
}

/// `wgmma-row` (natural-order activation copies, A fragments composed within each quad) against the twin. Its own
/// test, as is `wgmma-ws`'s, so that a failure of a newer kernel leaves the others' verdict standing.
#[test]
fn w4a8_wgmma_row_matches_its_cpu_twin_bit_for_bit() {
    twin_test("w4a8_wgmma_row_matches_its_cpu_twin_bit_for_bit", &[W4A8Kernel::WgmmaRow]);
}

/// `wgmma-ws` (the warp-specialized kernel: producer warpgroup, mbarrier ring) against the twin. A hung ring
/// aborts the test after the watchdog's stall limit, naming the launch.
#[test]
fn w4a8_wgmma_ws_matches_its_cpu_twin_bit_for_bit() {
    twin_test("w4a8_wgmma_ws_matches_its_cpu_twin_bit_for_bit", &[W4A8Kernel::WgmmaWs]);
}

/// `wgmma-tma` (the row kernel's products fed by tensor-map copies into 64-byte-swizzled stages) against the twin:
/// tokens past m and weight tiles past n come from the copies' zero fill, the scales of the chunk after the last
/// too.
#[test]
fn w4a8_wgmma_tma_matches_its_cpu_twin_bit_for_bit() {
    twin_test("w4a8_wgmma_tma_matches_its_cpu_twin_bit_for_bit", &[W4A8Kernel::WgmmaTma]);
}

/// `wgmma-ws-tma` (the ws kernel with one producer thread issuing the tensor-map copies) against the twin.
#[test]
fn w4a8_wgmma_ws_tma_matches_its_cpu_twin_bit_for_bit() {
    twin_test("w4a8_wgmma_ws_tma_matches_its_cpu_twin_bit_for_bit", &[W4A8Kernel::WgmmaWsTma]);
}

/// Every (shape, m, plan) of `kernels`: the kernel's bits are the bf16 rounding of the twin's values, a second run
/// gives the same bits, and the result is within the segmented sum's bound of torchao's numerics (one bf16
/// rounding, the exact path's f32 slack, and 4 sx sum_g sw_g / 16 for the segmented sum, as the twin's own test
/// states). Each launch is announced to a [`Watchdog`] first.
fn twin_test(test: &str, kernels: &[W4A8Kernel]) {
    let Some(stream) = stream() else { return };
    let dog = Watchdog::start(test);
    let sms = llama32::ops::cuda::attention::num_sms(&stream).expect("SM count");
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 0x4a8);
    if !wgmma_available() {
        // The wrapper refuses the kernel here, naming why.
        let qm = random_matrix(&mut rng, 16, 64, false);
        let w = CudaQuantLinear::upload(&stream, &QuantLinear { matrix: qm, scheme: Scheme::W4A8_G32 }).unwrap();
        let acts = poisoned_acts(&stream, 1, 64);
        let mut ws = SplitKWorkspace::new(&stream, 0, 0, sms).unwrap();
        let mut out = upload(&stream, &[bf16::NAN; 16]);
        let plan = W4A8Plan { kernel: W4A8Kernel::Wgmma, tile_m: 64, splits: 1 };
        let e = w4a8_gemm_with(&stream, &acts, &w, 1, &mut ws, &mut out, plan).unwrap_err().to_string();
        assert!(e.contains("wgmma kernel does not run here"), "{e}");
        println!("skipped: this device or build has no wgmma W4A8 kernel (compute capability 9.x with sm_90a)");
        return;
    }
    let mut worst = 0f32;
    for (k, n) in SHAPES {
        let qm = random_matrix(&mut rng, n, k, false);
        let w =
            CudaQuantLinear::upload(&stream, &QuantLinear { matrix: qm.clone(), scheme: Scheme::W4A8_G32 }).unwrap();
        let corr = layout_w4a8(&qm).unwrap().row_corr;
        let ms: &[usize] = if n * k > 1 << 20 { &[64, 129] } else { &[1, 7, 64, 65, 129, 200] };
        for &m in ms {
            let x = random_rows(&mut rng, m, k, (-1.0, 1.0), true);
            let x32 = to_f32(&x);
            let (mut xq, mut sx, mut zx) = (vec![0i8; m * k], vec![0f32; m], vec![0i32; m]);
            quantize_activations(&x32, m, k, &mut xq, &mut sx, &mut zx);
            let mut exact = vec![0f32; m * n];
            w4a8_linear(&x32, m, &qm, &mut exact);
            let x_d = upload(&stream, &x);
            let mut acts = poisoned_acts(&stream, m, k);
            act_quant(&stream, ActSource::Rows(x_d.slice(..)), m, k, &mut acts, None).unwrap();
            let plans = plans(kernels, m, n, k, sms);
            let mut ws = workspace_for(&stream, &plans, m, n, sms);
            let tol = segmented_bound(&exact, &xq, &sx, &qm, m);
            // The twin's bits depend on the split count only (not on the token tile).
            let mut twins: Vec<(usize, Vec<bf16>)> = Vec::new();
            for plan in plans {
                let (tile, splits, name) = (plan.tile_m, plan.splits, plan.kernel.name());
                let what = format!("w4a8 {name} m {m} k {k} n {n} tile_m {tile} splits {splits}");
                if !twins.iter().any(|(s, _)| *s == plan.splits) {
                    let twin = w4a8_segmented(&xq, &sx, &zx, m, &qm, &corr, plan.splits).unwrap();
                    twins.push((plan.splits, twin.iter().map(|&v| bf16::from_f32(v)).collect()));
                }
                let want = &twins.iter().find(|(s, _)| *s == plan.splits).expect("computed above").1;
                let mut out = upload(&stream, &vec![bf16::NAN; m * n + 64]);
                dog.at(format!("launch {what}"));
                w4a8_gemm_with(&stream, &acts, &w, m, &mut ws, &mut out, plan)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let got = download(&stream, &out);
                dog.at(format!("check {what}"));
                assert!(got[m * n..].iter().all(|v| v.to_bits() == bf16::NAN.to_bits()), "{what}: wrote past m x n");
                if let Some(i) = (0..m * n).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                    panic!("{what}: out[{}, {}] = {} but the twin gives {}", i / n, i % n, got[i], want[i]);
                }
                let mut again = upload(&stream, &vec![bf16::NAN; m * n]);
                dog.at(format!("second launch {what}"));
                w4a8_gemm_with(&stream, &acts, &w, m, &mut ws, &mut again, plan).unwrap();
                assert!(same_bits(&download(&stream, &again), &got[..m * n]), "{what}: a second run differs");
                for (i, ((g, wv), t)) in got.iter().zip(&exact).zip(&tol).enumerate() {
                    let err = (g.to_f32() - wv).abs();
                    assert!(
                        err <= *t,
                        "{what}: out[{}, {}] = {g}, torchao numerics give {wv} (error {err:e} > {t:e})",
                        i / n,
                        i % n
                    );
                    worst = worst.max(err / t);
                }
            }
        }
    }
    let names: Vec<&str> = kernels.iter().map(|k| k.name()).collect();
    eprintln!(
        "w4a8 {}: bit-equal to the twin everywhere; worst error {worst:.3} of the bound to torchao numerics",
        names.join(", ")
    );
}

/// Per output, the bound of the segmented kernel's distance from torchao's numerics `exact` (see the test).
fn segmented_bound(exact: &[f32], xq: &[i8], sx: &[f32], qm: &llama32::quant::QuantMatrix, m: usize) -> Vec<f32> {
    let (n, k, groups) = (qm.n, qm.k, qm.k / 32);
    let mut tol = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut sw_sum, mut mag) = (0f32, 0f32);
            for g in 0..groups {
                let s = qm.scales[j * groups + g];
                let dot: i32 =
                    (g * 32..(g + 1) * 32).map(|c| i32::from(xq[i * k + c]) * i32::from(qm.q[j * k + c])).sum();
                sw_sum += s / 16.0;
                mag += s * dot.abs() as f32;
            }
            tol[i * n + j] =
                BF16_ROUNDING * exact[i * n + j].abs() + sx[i] * (4.0 * sw_sum + 2e-5 * mag) + f32::MIN_POSITIVE;
        }
    }
    tol
}

/// The wrapper refuses what the wgmma kernel cannot take, naming it: weights with zero points, a token tile other
/// than 64 or 128, and a split count past k / 64; nothing is written.
#[test]
fn w4a8_wgmma_refuses_what_it_cannot_take() {
    let Some(stream) = stream() else { return };
    let sms = llama32::ops::cuda::attention::num_sms(&stream).expect("SM count");
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 0x4a9);
    let upload_w = |zeros: bool, rng: &mut ChaCha8Rng| {
        let qm = random_matrix(rng, 32, 128, zeros);
        CudaQuantLinear::upload(&stream, &QuantLinear { matrix: qm, scheme: Scheme::W4A8_G32 }).unwrap()
    };
    let (sym, asym) = (upload_w(false, &mut rng), upload_w(true, &mut rng));
    let acts = poisoned_acts(&stream, 4, 128);
    let mut ws = SplitKWorkspace::new(&stream, 1 << 16, 1 << 10, sms).unwrap();
    let mut out = upload(&stream, &vec![bf16::NAN; 4 * 32]);
    let plan = |tile_m, splits| W4A8Plan { kernel: W4A8Kernel::Wgmma, tile_m, splits };
    let e = w4a8_gemm_with(&stream, &acts, &asym, 4, &mut ws, &mut out, plan(64, 1)).unwrap_err().to_string();
    assert!(e.contains("zero points") || e.contains("lacks it"), "{e}");
    if wgmma_available() {
        let e = w4a8_gemm_with(&stream, &acts, &sym, 4, &mut ws, &mut out, plan(32, 1)).unwrap_err().to_string();
        assert!(e.contains("tile_m is 32"), "{e}");
        let e = w4a8_gemm_with(&stream, &acts, &sym, 4, &mut ws, &mut out, plan(64, 3)).unwrap_err().to_string();
        assert!(e.contains("splits is 3"), "{e}");
    }
    assert!(download(&stream, &out).iter().all(|v| v.is_nan()), "nothing was launched");
}
