//! The benchmark and profiling targets of the 4-bit kernels (their own file to keep cuda_quant.rs short; the
//! ignored tests that run them keep their paths, `cuda_quant::quant_throughput` and `cuda_quant::ncu_quant_targets`,
//! as the suite and the results files name them).

use super::*;

/// W4A16 (the decode kernels; at m = 64 on Hopper also the large-m row kernel with one and with its plan's K
/// splits) at m = 1, 16, 64 on the 1B projections and the 11B / 90B gate_up and down shapes, against the bf16 path
/// the
/// executor takes for the same shape (the skinny GEMV at m = 1, cuBLASLt above) in the same process: GPU time per
/// call from CUDA graphs of 20 calls (as `cuda_gemv::gemv_throughput`: launch overhead excluded, as in the
/// executor's decode graphs), weights rotated through copies so that they stream from HBM, not L2. W4A16 GB/s count
/// int4 + bf16 scales (0.5625 n k bytes), bf16 GB/s 2 n k. The full comparison with torch tinygemm and cuBLAS is
/// bench/cuda_kernels.rs (group `quant`) beside scripts/peers.py.
pub(super) fn quant_throughput() {
    use crate::cuda_gemv::{cublaslt_gemm, time_graph, CALLS, ROTATE_BYTES};
    use cudarc::cublaslt::CudaBlasLT;
    let Some(stream) = bench_stream() else { return };
    let blas = CudaBlasLT::new(stream.clone()).expect("cuBLASLt");
    let sms = llama32::ops::cuda::attention::num_sms(&stream).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 9);
    // (name, k, n): the 1B projections (hidden 2048, inter 8192), gate_up / down of 11B (4096 / 14336) and 90B
    // (8192 / 28672).
    let shapes = [
        ("1b qkv", 2048usize, 3072usize),
        ("1b o", 2048, 2048),
        ("1b gate_up", 2048, 16384),
        ("1b down", 8192, 2048),
        ("11b gate_up", 4096, 28672),
        ("11b down", 14336, 4096),
        ("90b gate_up", 8192, 57344),
        ("90b down", 28672, 8192),
    ];
    // LLAMA32_QUANT_SHAPES (comma-separated name prefixes, e.g. "1b,90b") picks some shapes; the lines say when
    // the direct kernel's L2 prefetch is forced (LLAMA32_W4A16_PREFETCH=1 or 0; by default it depends on the shape).
    let only = std::env::var("LLAMA32_QUANT_SHAPES").unwrap_or_default();
    let picked = |name: &str| only.trim().is_empty() || only.split(',').any(|p| name.starts_with(p.trim()));
    // LLAMA32_QUANT_MS (comma-separated, from 1, 16, 64) picks some row counts.
    let ms_only = std::env::var("LLAMA32_QUANT_MS").unwrap_or_default();
    let ms: Vec<usize> = [1usize, 16, 64]
        .into_iter()
        .filter(|m| ms_only.trim().is_empty() || ms_only.split(',').any(|p| p.trim() == m.to_string()))
        .collect();
    let mut prefetch = match llama32::ops::cuda::quant::w4a16_l2_prefetch_forced().unwrap() {
        None => "".to_string(),
        Some(true) => " (L2 prefetch on)".to_string(),
        Some(false) => " (L2 prefetch off)".to_string(),
    };
    let per_sm = llama32::ops::cuda::quant::w4a16_blocks_per_sm().unwrap();
    if per_sm != 4 {
        prefetch.push_str(&format!(" ({per_sm} blocks per SM)"));
    }
    let variant = llama32::ops::cuda::quant::w4a16_bulk_variant().unwrap();
    if variant != 0 {
        prefetch.push_str(&format!(" (bulk variant {variant})"));
    }
    for (name, k, n) in shapes.into_iter().filter(|s| picked(s.0)) {
        let lin = timing_weights(n, k, Scheme::W4A16_G32);
        let qbytes = (n * k) as f64 * (0.5 + 2.0 / 32.0);
        let copies = ROTATE_BYTES.div_ceil(qbytes as usize).clamp(1, CALLS);
        let ws: Vec<CudaQuantLinear> = (0..copies).map(|_| CudaQuantLinear::upload(&stream, &lin).unwrap()).collect();
        drop(lin);
        let bf_copies = ROTATE_BYTES.div_ceil(2 * n * k).clamp(1, CALLS);
        let dense: Vec<CudaSlice<bf16>> = (0..bf_copies)
            .map(|_| {
                let mut d = stream.alloc_zeros::<bf16>(n * k).expect("alloc");
                w4a16_dequant(&stream, &ws[0], &mut d).unwrap();
                d
            })
            .collect();
        let need = workspace_bound(false, 64, n, k, sms);
        let mut wsp = SplitKWorkspace::new(&stream, need.0, need.1, sms).unwrap();
        // gate_up shapes: the same weights with the gate and up rows paired, for the fused SwiGLU lines.
        let paired: Vec<CudaQuantLinear> = if name.ends_with("gate_up") {
            let lin = timing_weights(n, k, Scheme::W4A16_G32);
            (0..copies).map(|_| CudaQuantLinear::upload_swiglu(&stream, &lin).unwrap()).collect()
        } else {
            Vec::new()
        };
        for &m in &ms {
            let x = upload(&stream, &random_rows(&mut rng, m, k, (-1.0, 0.0), false));
            let mut out = stream.alloc_zeros::<bf16>(m * n).expect("alloc");
            // Each kernel alone (PDL off), then the pipelined one with PDL.
            let was = llama32::ops::cuda::programmatic_launch();
            llama32::ops::cuda::set_programmatic_launch(false).unwrap();
            let mut ours = [0f64; W4A16Kernel::ALL.len()];
            for (t, kernel) in ours.iter_mut().zip(W4A16Kernel::ALL) {
                if !kernel.runs(m) {
                    *t = f64::NAN; // bulk above 16 rows or off Hopper: no line
                    continue;
                }
                let choice = W4A16Choice { kernel, splits: None };
                *t = time_graph(&stream, &mut |i| {
                    w4a16_gemm_with(&stream, &x, &ws[i % copies], m, &mut wsp, &mut out, choice).unwrap();
                });
            }
            // The tiled kernel with deeper rings (set_w4a16_tiled_stages; `tiled` above runs the variable's depth,
            // 2 by default): lines `tiled/3` and `tiled/4`.
            let mut deeper = [0f64; 2];
            for (t, stages) in deeper.iter_mut().zip([3, 4]) {
                set_w4a16_tiled_stages(Some(stages)).unwrap();
                let choice = W4A16Choice { kernel: W4A16Kernel::Tiled, splits: None };
                *t = time_graph(&stream, &mut |i| {
                    w4a16_gemm_with(&stream, &x, &ws[i % copies], m, &mut wsp, &mut out, choice).unwrap();
                });
            }
            set_w4a16_tiled_stages(None).unwrap();
            // At m = 64 on Hopper, the large-m row kernel (batched decode sent down the large-m path,
            // LLAMA32_W4A16_LARGE_MIN_M) with one K split and with its plan's splits: lines `row/s1`, `row/sS`.
            let mut large = Vec::new();
            if m == 64 && large_wgmma_available() {
                let plan = large_plan(W4A16LargeKernel::WgmmaRow, m, n, k, sms);
                let need = large_workspace_bound(m, n, k, sms);
                let mut lws = SplitKWorkspace::new(&stream, need.0, need.1, sms).unwrap();
                for plan in std::iter::once(LargePlan { splits: 1, ..plan }).chain((plan.splits > 1).then_some(plan)) {
                    let t = time_graph(&stream, &mut |i| {
                        let io = (&x, &ws[i % copies], m);
                        w4a16_gemm_large(&stream, io, plan, false, Some(&mut lws), &mut out).unwrap();
                    });
                    large.push((format!("row/s{}", plan.splits), t));
                }
            }
            let (theirs, path) = if llama32::ops::cuda::gemv::supports(m, k) {
                let t = time_graph(&stream, &mut |i| {
                    llama32::ops::cuda::gemv::gemv(&stream, &x, &dense[i % bf_copies], m, k, n, &mut out).unwrap();
                });
                (t, "gemv")
            } else {
                (
                    time_graph(&stream, &mut |i| cublaslt_gemm(&blas, &x, &dense[i % bf_copies], (m, k, n), &mut out)),
                    "cuBLASLt",
                )
            };
            // The pipelined kernel again under programmatic dependent launch (its first weights are prefetched
            // before it waits for the previous call).
            llama32::ops::cuda::set_programmatic_launch(true).unwrap();
            let choice = W4A16Choice { kernel: W4A16Kernel::Pipelined, splits: None };
            let pdl = time_graph(&stream, &mut |i| {
                w4a16_gemm_with(&stream, &x, &ws[i % copies], m, &mut wsp, &mut out, choice).unwrap();
            });
            // SwiGLU as the executor runs it at decode (the configured kernel, PDL on): the paired gate_up
            // projection and then the SiLU * up kernel, against the projection that applies SiLU * up as it writes.
            if !paired.is_empty() && m <= 16 {
                let half = n / 2;
                let mut gate_up = stream.alloc_zeros::<bf16>(m * n).expect("alloc");
                let mut act = stream.alloc_zeros::<bf16>(m * half).expect("alloc");
                let choice = W4A16Choice { kernel: W4A16Kernel::configured(m, n, k).unwrap(), splits: None };
                let two = time_graph(&stream, &mut |i| {
                    w4a16_gemm_with(&stream, &x, &paired[i % copies], m, &mut wsp, &mut gate_up, choice).unwrap();
                    activation::silu_mul(&stream, &gate_up, half, &mut act).unwrap();
                });
                let one = time_graph(&stream, &mut |i| {
                    w4a16_gemm_silu_with(&stream, &x, &paired[i % copies], m, &mut wsp, &mut act, choice).unwrap();
                });
                eprintln!(
                    "w4a16 swiglu    {name:<12} m {m:>2} k {k:>5} n {n:>5}: {} + silu_mul {:8.2} us | fused {:8.2} us {:6.0} GB/s | {:.2}x",
                    choice.kernel.name(),
                    two * 1e6,
                    one * 1e6,
                    qbytes / one / 1e9,
                    two / one
                );
            }
            llama32::ops::cuda::set_programmatic_launch(was).unwrap();
            let labels = W4A16Kernel::ALL.iter().map(|k| k.name()).chain(["pipe+PDL", "tiled/3", "tiled/4"]);
            let labels = labels.map(String::from).chain(large.iter().map(|(label, _)| label.clone()));
            let times = ours.into_iter().chain([pdl]).chain(deeper).chain(large.iter().map(|&(_, t)| t));
            for (ours, label) in times.zip(labels).filter(|(t, _)| !t.is_nan()) {
                eprintln!(
                    "w4a16 {label:<9} {name:<12} m {m:>2} k {k:>5} n {n:>5}: {:8.2} us {:6.0} GB/s {:6.1} TFLOP/s | bf16 {path} {:8.2} us {:6.0} GB/s | {:.2}x{prefetch}",
                    ours * 1e6,
                    qbytes / ours / 1e9,
                    2.0 * (m * n * k) as f64 / ours / 1e12,
                    theirs * 1e6,
                    2.0 * (n * k) as f64 / theirs / 1e9,
                    theirs / ours
                );
            }
        }
    }
}

/// One launch of each quantized and skinny-GEMM kernel worth a hardware profile, for `scripts/gpu-suite.sh run
/// ncu` (Nsight Compute profiles every launch of this test): the W4A16 decode kernels at m = 1 and 16 on the 11B
/// gate_up and down shapes, the W4A8 kernels and the large-m W4A16 kernel (Hopper) at m = 256 on 11B gate_up, and
/// the bf16 skinny GEMM at m = 1 on the 1B
/// qkv, o and gate_up shapes. Each output is checked for finite values, so a broken launch fails here too.
pub(super) fn ncu_quant_targets() {
    let Some(stream) = stream() else { return };
    let sms = llama32::ops::cuda::attention::num_sms(&stream).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 0x5c);
    let weights = |n: usize, k: usize, scheme| CudaQuantLinear::upload(&stream, &timing_weights(n, k, scheme)).unwrap();
    let finite = |what: &str, out: &CudaSlice<bf16>| {
        assert!(download(&stream, out).iter().all(|v| v.is_finite()), "{what}: non-finite output");
        eprintln!("ncu target: {what}");
    };
    for (name, k, n) in [("11b gate_up", 4096usize, 28672usize), ("11b down", 14336, 4096)] {
        let w = weights(n, k, Scheme::W4A16_G32);
        let need = workspace_bound(false, 64, n, k, sms);
        let mut ws = SplitKWorkspace::new(&stream, need.0, need.1, sms).unwrap();
        for (m, kernels) in
            [(1usize, [W4A16Kernel::Direct, W4A16Kernel::Pipelined]), (16, [W4A16Kernel::Direct, W4A16Kernel::Tiled])]
        {
            let x = upload(&stream, &random_rows(&mut rng, m, k, (-1.0, 0.0), false));
            for kernel in kernels.into_iter().chain(W4A16Kernel::Bulk.runs(m).then_some(W4A16Kernel::Bulk)) {
                let mut out = stream.alloc_zeros::<bf16>(m * n).unwrap();
                let choice = W4A16Choice { kernel, splits: None };
                w4a16_gemm_with(&stream, &x, &w, m, &mut ws, &mut out, choice).unwrap();
                finite(&format!("w4a16 {} {name} m {m}", kernel.name()), &out);
            }
        }
    }
    let (k, n, m) = (4096usize, 28672usize, 256usize);
    let w = weights(n, k, Scheme::W4A8_G32);
    let need = workspace_bound(true, m, n, k, sms);
    let mut ws = SplitKWorkspace::new(&stream, need.0, need.1, sms).unwrap();
    let x = upload(&stream, &random_rows(&mut rng, m, k, (-1.0, 1.0), false));
    let mut acts = poisoned_acts(&stream, m, k);
    act_quant(&stream, ActSource::Rows(x.slice(..)), m, k, &mut acts, None).unwrap();
    // The TMA kernels have twin tests of their own (cuda_w4a8_wgmma); a fault in one here would end this test.
    for kernel in W4A8Kernel::ALL.into_iter().filter(|kernel| kernel.runs(&w) && !kernel.is_tma()) {
        let mut out = stream.alloc_zeros::<bf16>(m * n).unwrap();
        w4a8_gemm_with(&stream, &acts, &w, m, &mut ws, &mut out, w4a8_plan(kernel, m, n, k, sms)).unwrap();
        finite(&format!("w4a8 {} 11b gate_up m 256", kernel.name()), &out);
    }
    if large_wgmma_available() {
        let w = weights(n, k, Scheme::W4A16_G32);
        for kernel in W4A16LargeKernel::ALL.into_iter().filter(|k| k.is_wgmma()) {
            let plan = large_plan(kernel, m, n, k, sms);
            let mut out = stream.alloc_zeros::<bf16>(m * n).unwrap();
            w4a16_gemm_large(&stream, (&x, &w, m), plan, false, Some(&mut ws), &mut out).unwrap();
            finite(&format!("w4a16 large {} 11b gate_up m 256 tile {}", kernel.name(), plan.tile_m), &out);
        }
    }
    for (name, k, n) in [("1b qkv", 2048usize, 3072usize), ("1b o", 2048, 2048), ("1b gate_up", 2048, 16384)] {
        let w = upload(&stream, &random_rows(&mut rng, n, k, (-0.05, 0.05), false));
        let x = upload(&stream, &random_rows(&mut rng, 1, k, (-1.0, 0.0), false));
        let mut out = stream.alloc_zeros::<bf16>(n).unwrap();
        llama32::ops::cuda::gemv::gemv(&stream, &x, &w, 1, k, n, &mut out).unwrap();
        finite(&format!("gemv {name} m 1"), &out);
    }
}
