//! Criterion benches of the CUDA kernel families at Llama 3.2 1B/3B shapes, timed with CUDA events around
//! `iters` back-to-back launches (`iter_custom`), so host overhead and launch gaps count the way they would in a
//! step. Without a CUDA device every bench prints that it is skipped and measures nothing.
//!
//! Groups are named by kernel family (as `ops::cuda::<family>`): norm, embedding, rope, activation, paged_decode,
//! paged_prefill, gemv, sampling, and quant (W4A16 / W4A8 at the 1B, 11B and 90B projection shapes; compare with
//! torch's int4 tinygemm and cuBLAS bf16 from scripts/peers.py, run in the same device call), and decode_layers
//! (the persistent decode stack over all the 1B and 3B layers, in weight bytes per second).

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream};
use half::bf16;
use llama32::ops::cpu::attention::PagedLayout;
use llama32::ops::cuda as k;
use llama32::ops::cuda::switch::KernelSwitch;

struct Dev {
    stream: Arc<CudaStream>,
}

impl Dev {
    fn open() -> Option<Dev> {
        if let Err(e) = k::probe() {
            eprintln!("skipped: no CUDA device ({e})");
            return None;
        }
        let ctx = CudaContext::new(0).ok()?;
        Some(Dev { stream: ctx.new_stream().ok()? })
    }

    /// A buffer of `n` pseudo-random bf16 values in [-1, 1) (never zeros: zeros can run faster than real data).
    fn data(&self, n: usize, seed: u32) -> CudaSlice<bf16> {
        let host: Vec<bf16> = (0..n as u32)
            .map(|i| {
                let h = i.wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) >> 8;
                bf16::from_f32(h as f32 / (1u32 << 23) as f32 - 1.0)
            })
            .collect();
        self.stream.clone_htod(&host).expect("upload")
    }

    fn u32s(&self, v: &[u32]) -> CudaSlice<u32> {
        self.stream.clone_htod(v).expect("upload")
    }

    /// Device time of `iters` calls of `f`, between two events.
    fn time(&self, iters: u64, f: &mut dyn FnMut()) -> Duration {
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(timing).expect("event");
        for _ in 0..iters {
            f();
        }
        let end = self.stream.record_event(timing).expect("event");
        let ms = start.elapsed_ms(&end).expect("elapsed");
        Duration::from_secs_f64(ms as f64 / 1e3)
    }
}

fn norm(c: &mut Criterion) {
    let Some(d) = Dev::open() else { return };
    let mut g = c.benchmark_group("norm");
    for (rows, hidden) in [(1usize, 2048usize), (64, 3072), (2048, 2048)] {
        let (x, w) = (d.data(rows * hidden, 1), d.data(hidden, 2));
        let (mut res, mut out) = (d.data(rows * hidden, 3), d.data(rows * hidden, 4));
        g.throughput(Throughput::Bytes((rows * hidden * 2 * 4) as u64));
        g.bench_function(format!("add_rms_norm/{rows}x{hidden}"), |b| {
            b.iter_custom(|n| {
                d.time(n, &mut || k::norm::add_rms_norm(&d.stream, &mut res, &x, &w, 1e-5, hidden, &mut out).unwrap())
            })
        });
    }
    g.finish();
}

fn elementwise(c: &mut Criterion) {
    let Some(d) = Dev::open() else { return };
    let mut g = c.benchmark_group("activation");
    for (rows, inter) in [(1usize, 8192usize), (2048, 8192)] {
        let gu = d.data(rows * 2 * inter, 5);
        let mut out = d.data(rows * inter, 6);
        g.throughput(Throughput::Bytes((rows * inter * 2 * 3) as u64));
        g.bench_function(format!("silu_mul/{rows}x{inter}"), |b| {
            b.iter_custom(|n| d.time(n, &mut || k::activation::silu_mul(&d.stream, &gu, inter, &mut out).unwrap()))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("embedding");
    let (vocab, hidden) = (128_256usize, 2048usize);
    let table = d.data(vocab * hidden, 7);
    for tokens in [1usize, 2048] {
        let ids = d.u32s(&(0..tokens as u32).map(|i| i * 7919 % vocab as u32).collect::<Vec<_>>());
        let mut out = d.data(tokens * hidden, 8);
        g.throughput(Throughput::Bytes((tokens * hidden * 4) as u64));
        g.bench_function(format!("embed/{tokens}x{hidden}"), |b| {
            b.iter_custom(|n| {
                d.time(n, &mut || k::embedding::embed(&d.stream, &table, hidden, &ids, &mut out).unwrap())
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("rope");
    let layout = PagedLayout { num_heads: 32, num_kv_heads: 8, head_dim: 64, block_size: 16 };
    let stride = (32 + 2 * 8) * 64;
    let inv_freq: CudaSlice<f32> = d.stream.clone_htod(&vec![0.01f32; 32]).expect("upload");
    for tokens in [1usize, 2048] {
        let mut qkv = d.data(tokens * stride, 9);
        let positions = d.u32s(&(0..tokens as u32).collect::<Vec<_>>());
        let slots = d.u32s(&(0..tokens as u32).collect::<Vec<_>>());
        let pool = tokens.div_ceil(16) * 16 * layout.slot_len();
        let (mut kc, mut vc) = (d.data(pool, 10), d.data(pool, 11));
        let shape = k::rope::RopeKvShape { layout, qkv_stride: stride };
        g.throughput(Throughput::Bytes((tokens * stride * 2 * 2) as u64));
        g.bench_function(format!("rope_kv_write/{tokens}"), |b| {
            b.iter_custom(|n| {
                d.time(n, &mut || {
                    let cache = k::rope::KvCacheMut { k: &mut kc, v: &mut vc };
                    k::rope::rope_kv_write(&d.stream, &shape, &mut qkv, &positions, &slots, &inv_freq, cache).unwrap()
                })
            })
        });
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let Some(d) = Dev::open() else { return };
    let sms = k::attention::num_sms(&d.stream).expect("SM count");
    let mut g = c.benchmark_group("paged_decode");
    for (heads, kv, dim) in [(32usize, 8usize, 64usize), (24, 8, 128)] {
        let layout = PagedLayout { num_heads: heads, num_kv_heads: kv, head_dim: dim, block_size: 16 };
        let (seqs, ctx) = (64usize, 2048usize);
        let blocks = seqs * ctx / 16;
        let (kc, vc) = (d.data(blocks * 16 * layout.slot_len(), 12), d.data(blocks * 16 * layout.slot_len(), 13));
        let stride = (heads + 2 * kv) * dim;
        let q = d.data(seqs * stride, 14);
        let positions = d.u32s(&vec![(ctx - 1) as u32; seqs]);
        let tables = d.u32s(&(0..blocks as u32).collect::<Vec<_>>());
        let splits = k::attention::decode_num_splits(&layout, seqs, ctx, sms);
        let mut ws: CudaSlice<u8> = d
            .stream
            .alloc_zeros(k::attention::decode_workspace_bytes(&layout, seqs, splits).max(16))
            .expect("workspace");
        let mut out = d.data(seqs * heads * dim, 15);
        g.throughput(Throughput::Bytes((seqs * ctx * layout.slot_len() * 2 * 2) as u64));
        g.bench_function(format!("b{seqs}_ctx{ctx}_{heads}q{kv}kv_d{dim}"), |b| {
            b.iter_custom(|n| {
                d.time(n, &mut || {
                    let qr = k::attention::QueryRows { qkv: &q, stride };
                    let kvp = k::attention::KvPools { layout, k: &kc, v: &vc };
                    let meta = k::attention::DecodeMeta {
                        positions: &positions,
                        block_tables: &tables,
                        max_blocks_per_seq: ctx / 16,
                        num_splits: splits,
                    };
                    k::attention::paged_decode(&d.stream, &qr, &kvp, &meta, &mut ws, &mut out).unwrap()
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("paged_prefill");
    let layout = PagedLayout { num_heads: 24, num_kv_heads: 8, head_dim: 128, block_size: 16 };
    let (seqs, len) = (4usize, 4096usize);
    let blocks = seqs * len / 16;
    let (kc, vc) = (d.data(blocks * 16 * layout.slot_len(), 16), d.data(blocks * 16 * layout.slot_len(), 17));
    let stride = (24 + 16) * 128;
    let q = d.data(seqs * len * stride, 18);
    let positions = d.u32s(&(0..seqs * len).map(|i| (i % len) as u32).collect::<Vec<_>>());
    let cu = d.u32s(&(0..=seqs).map(|s| (s * len) as u32).collect::<Vec<_>>());
    let tables = d.u32s(&(0..blocks as u32).collect::<Vec<_>>());
    let mut out = d.data(seqs * len * 24 * 128, 19);
    g.throughput(Throughput::Elements((seqs * 24 * 128 * 4) as u64 * (len * (len + 1) / 2) as u64));
    for kernel in k::attention::PrefillKernel::ALL {
        if !kernel.supported(&d.stream).unwrap() {
            continue;
        }
        let name = format!("4x4096_causal_24q8kv_d128_{} (elements = FLOPs)", kernel.name());
        g.bench_function(name, |b| {
            b.iter_custom(|n| {
                d.time(n, &mut || {
                    let qr = k::attention::QueryRows { qkv: &q, stride };
                    let kvp = k::attention::KvPools { layout, k: &kc, v: &vc };
                    let meta = k::attention::PrefillMeta {
                        positions: &positions,
                        cu_seqlens: &cu,
                        block_tables: &tables,
                        max_blocks_per_seq: len / 16,
                        max_query_len: len,
                    };
                    k::attention::paged_prefill_with(&d.stream, kernel, &qr, &kvp, &meta, &mut out).unwrap()
                })
            })
        });
    }
    g.finish();
}

fn gemv_and_sampling(c: &mut Criterion) {
    let Some(d) = Dev::open() else { return };
    let mut g = c.benchmark_group("gemv");
    for (kdim, n) in [(2048usize, 16384usize), (8192, 2048), (2048, 128_256)] {
        let w = d.data(n * kdim, 20);
        let x = d.data(kdim, 21);
        let mut out = d.data(n, 22);
        g.throughput(Throughput::Bytes((n * kdim * 2) as u64));
        g.bench_function(format!("m1_k{kdim}_n{n}"), |b| {
            b.iter_custom(|iters| {
                d.time(iters, &mut || k::gemv::gemv(&d.stream, &x, &w, 1, kdim, n, &mut out).unwrap())
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("sampling");
    let vocab = 128_256usize;
    for rows in [1usize, 64] {
        let logits = d.data(rows * vocab, 23);
        let mut ids: CudaSlice<u32> = d.stream.alloc_zeros(rows).expect("ids");
        g.throughput(Throughput::Bytes((rows * vocab * 2) as u64));
        g.bench_function(format!("argmax/{rows}x{vocab}"), |b| {
            b.iter_custom(|n| d.time(n, &mut || k::sampling::argmax(&d.stream, &logits, vocab, &mut ids).unwrap()))
        });
    }
    g.finish();
}

/// (name, k, n) of the projection shapes the quantized kernels are judged on: gate_up and down of 1B (hidden 2048,
/// inter 8192), 11B (4096, 14336) and 90B (8192, 28672) text models.
const QUANT_SHAPES: [(&str, usize, usize); 6] = [
    ("1b_gate_up", 2048, 16384),
    ("1b_down", 8192, 2048),
    ("11b_gate_up", 4096, 28672),
    ("11b_down", 14336, 4096),
    ("90b_gate_up", 8192, 57344),
    ("90b_down", 28672, 8192),
];

/// W4A16 at m = 1, 16, 64 (throughput = bytes of int4 weights + bf16 scales: criterion's GB/s is the effective
/// weight bandwidth), the large-m W4A16 kernels (Hopper) at m = 64, 256, 1024 and W4A8 at m = 256, 1024 or the m
/// values of `LLAMA32_BENCH_W4A8_M` (throughput elements = FLOPs:
/// criterion's "Gelem/s" reads as GFLOP/s; divide by 1000 for TFLOP/s; the TMA kernels only with
/// `LLAMA32_BENCH_W4A8_TMA=1`). One weight per shape; the 90B weights (up
/// to 264 MB) exceed L2, the 1B ones (up to 19 MB) fit in an H100's 50 MB L2, so the 1B figures are an upper bound
/// of the streaming rate.
fn quant(c: &mut Criterion) {
    use llama32::quant::{QuantLinear, Scheme};
    let Some(d) = Dev::open() else { return };
    let sms = k::attention::num_sms(&d.stream).expect("SM count");
    let mut g = c.benchmark_group("quant");
    g.measurement_time(Duration::from_secs(1));
    // W4A8 rows: LLAMA32_BENCH_W4A8_M (comma-separated m values) or 256 and 1024.
    let w4a8_ms: Vec<usize> = match std::env::var("LLAMA32_BENCH_W4A8_M") {
        Ok(list) => list.split(',').map(|m| m.trim().parse().expect("LLAMA32_BENCH_W4A8_M: m values")).collect(),
        Err(_) => vec![256, 1024],
    };
    for (name, kdim, n) in QUANT_SHAPES {
        let qm = pattern_matrix(n, kdim, 0);
        let weight_bytes = (n * kdim / 2 + n * kdim / 32 * 2) as u64;
        // The large-m W4A16 kernels (Hopper) at the W4A8 rows and at m = 64 (batched decode through the large-m
        // path, LLAMA32_W4A16_LARGE_MIN_M), against cuBLAS bf16 at the same shapes (peers.py).
        if k::quant::large_wgmma_available() {
            let lin = QuantLinear { matrix: qm.clone(), scheme: Scheme::W4A16_G32 };
            let w = k::quant::CudaQuantLinear::upload(&d.stream, &lin).expect("upload");
            let need = k::quant::large_workspace_bound(1024, n, kdim, sms);
            let mut ws = k::quant::SplitKWorkspace::new(&d.stream, need.0, need.1, sms).expect("workspace");
            for m in [64usize, 256, 1024] {
                let x = d.data(m * kdim, 26);
                let mut out = d.data(m * n, 27);
                g.throughput(Throughput::Elements(2 * (m * n * kdim) as u64));
                // The wgmma kernel keeps the name earlier runs recorded, for one split; a plan with K splits adds
                // `_split{S}` beside it.
                for kernel in k::quant::W4A16LargeKernel::ALL.into_iter().filter(|k| k.is_wgmma()) {
                    let plan = k::quant::large_plan(kernel, m, n, kdim, sms);
                    let tag = if kernel == k::quant::W4A16LargeKernel::Wgmma { "" } else { "_row" };
                    let whole = k::quant::LargePlan { splits: 1, ..plan };
                    for plan in std::iter::once(whole).chain((plan.splits > 1).then_some(plan)) {
                        let split = if plan.splits > 1 { format!("_split{}", plan.splits) } else { String::new() };
                        let id = format!("w4a16_large{tag}{split}_m{m}_{name}_k{kdim}_n{n} (elements = FLOPs)");
                        g.bench_function(id, |b| {
                            b.iter_custom(|iters| {
                                d.time(iters, &mut || {
                                    let io = (&x, &w, m);
                                    k::quant::w4a16_gemm_large(&d.stream, io, plan, false, Some(&mut ws), &mut out)
                                        .unwrap()
                                })
                            })
                        });
                    }
                }
            }
        }
        for (scheme, ms) in [(Scheme::W4A16_G32, &[1usize, 16, 64][..]), (Scheme::W4A8_G32, &w4a8_ms[..])] {
            let lin = QuantLinear { matrix: qm.clone(), scheme };
            let w = k::quant::CudaQuantLinear::upload(&d.stream, &lin).expect("upload");
            let w4a8 = scheme == Scheme::W4A8_G32;
            let max_m = *ms.iter().max().unwrap_or(&1);
            let need = k::quant::workspace_bound(w4a8, max_m, n, kdim, sms);
            let mut ws = k::quant::SplitKWorkspace::new(&d.stream, need.0, need.1, sms).expect("workspace");
            for &m in ms {
                let x = d.data(m * kdim, 24);
                let mut out = d.data(m * n, 25);
                if w4a8 {
                    let mut acts = k::quant::QuantActs::new(&d.stream, m, kdim).expect("int8 buffers");
                    let src = k::quant::ActSource::Rows(x.slice(..));
                    k::quant::act_quant(&d.stream, src, m, kdim, &mut acts, None).expect("act_quant");
                    g.throughput(Throughput::Elements(2 * (m * n * kdim) as u64));
                    // Each kernel that runs here with its heuristic plan; mma keeps the name earlier runs recorded.
                    // wgmma-ws also with 64-token tiles where its plan takes 128 (the row kernel's plan takes 64
                    // tiles always: measured faster, 2026-11-28).
                    // The TMA kernels (not yet run on a GPU) only with LLAMA32_BENCH_W4A8_TMA=1 (the suite's `tma`
                    // stage), so that a fault in one cannot end the other kernels' lines.
                    let tma = std::env::var("LLAMA32_BENCH_W4A8_TMA").is_ok_and(|v| v == "1");
                    let mut plans: Vec<(k::quant::W4A8Plan, String)> = k::quant::W4A8Kernel::ALL
                        .into_iter()
                        .filter(|kernel| kernel.runs(&w) && (tma || !kernel.is_tma()))
                        .map(|kernel| {
                            let tag = match kernel {
                                k::quant::W4A8Kernel::Mma => String::new(),
                                other => format!("_{}", other.name()),
                            };
                            (k::quant::w4a8_plan(kernel, m, n, kdim, sms), tag)
                        })
                        .collect();
                    let ws128 =
                        plans.iter().find(|(p, _)| p.kernel == k::quant::W4A8Kernel::WgmmaWs && p.tile_m == 128);
                    if let Some(&(ws128, _)) = ws128 {
                        let t64 = k::quant::w4a8_plan_tiled(ws128.kernel, 64, m, n, kdim, sms);
                        plans.push((t64, "_wgmma-ws-t64".into()));
                    }
                    let need = plans.iter().fold((0, 0), |a, (p, _)| {
                        let b = k::quant::w4a8_workspace_for(*p, m, n);
                        (a.0.max(b.0), a.1.max(b.1))
                    });
                    if !ws.holds(need) {
                        ws = k::quant::SplitKWorkspace::new(&d.stream, need.0, need.1, sms).expect("workspace");
                    }
                    for (plan, tag) in plans {
                        g.bench_function(format!("w4a8{tag}_m{m}_{name}_k{kdim}_n{n} (elements = FLOPs)"), |b| {
                            b.iter_custom(|iters| {
                                d.time(iters, &mut || {
                                    k::quant::w4a8_gemm_with(&d.stream, &acts, &w, m, &mut ws, &mut out, plan).unwrap()
                                })
                            })
                        });
                    }
                } else {
                    g.throughput(Throughput::Bytes(weight_bytes));
                    for kernel in k::quant::W4A16Kernel::ALL.into_iter().filter(|kernel| kernel.runs(m)) {
                        let choice = k::quant::W4A16Choice { kernel, splits: None };
                        // The direct kernel keeps the name earlier runs recorded.
                        let tag = match kernel {
                            k::quant::W4A16Kernel::Direct => String::new(),
                            other => format!("_{}", other.name()),
                        };
                        g.bench_function(format!("w4a16{tag}_m{m}_{name}_k{kdim}_n{n}"), |b| {
                            b.iter_custom(|iters| {
                                d.time(iters, &mut || {
                                    k::quant::w4a16_gemm_with(&d.stream, &x, &w, m, &mut ws, &mut out, choice).unwrap()
                                })
                            })
                        });
                    }
                }
            }
        }
    }
    g.finish();
}

/// A symmetric group-32 `[n, k]` int4 matrix of pseudo-random values (a multiplicative hash of the index, shifted
/// by `seed`) with every scale 0.0125.
fn pattern_matrix(n: usize, kdim: usize, seed: usize) -> llama32::quant::QuantMatrix {
    let q: Vec<i8> = (0..n * kdim).map(|i| (((i + seed).wrapping_mul(2_654_435_761) >> 9) % 16) as i8 - 8).collect();
    llama32::quant::QuantMatrix { n, k: kdim, group: 32, q, scales: vec![0.0125; n * kdim / 32], zeros: None }
}

/// A random W4A16 `[n, k]` projection on the device (`paired`: uploaded as SwiGLU's gate_up).
fn w4a16_random(d: &Dev, n: usize, kdim: usize, seed: usize, paired: bool) -> k::quant::CudaQuantLinear {
    use llama32::quant::{QuantLinear, Scheme};
    let lin = QuantLinear { matrix: pattern_matrix(n, kdim, seed), scheme: Scheme::W4A16_G32 };
    let up = if paired { k::quant::CudaQuantLinear::upload_swiglu } else { k::quant::CudaQuantLinear::upload };
    up(&d.stream, &lin).expect("upload")
}

/// The persistent decode stack (`decode_layers`): every layer of the 1B (16) and 3B (28) models at their real
/// widths, random weights (bf16, and W4A16 as `w4a16_`), 1 and 8 sequences at a 512-token context. Throughput counts
/// the layers' weight bytes (W4A16: int4 and scales), so the figure compares straight with the copy rate (issue 3:
/// the 1B step at >= 86% of the HBM roofline).
fn decode_stack(c: &mut Criterion) {
    let Some(d) = Dev::open() else { return };
    let sms = k::attention::num_sms(&d.stream).expect("SM count");
    let mut g = c.benchmark_group("decode_layers");
    for ((name, hidden, inter, heads, dim, layers), quant) in
        [("1b", 2048usize, 8192usize, 32usize, 64usize, 16usize), ("3b", 3072, 8192, 24, 128, 28)]
            .into_iter()
            .flat_map(|shape| [(shape, false), (shape, true)])
    {
        let layout = PagedLayout { num_heads: heads, num_kv_heads: 8, head_dim: dim, block_size: 16 };
        let (ctx, max_m) = (512usize, k::decode_layers::MAX_M);
        let per_seq = ctx / 16 + 1;
        let num_slots = max_m * per_seq * 16;
        let qkv = (heads + 16) * dim;
        let q_dim = heads * dim;
        // Per layer: attn_norm, mlp_norm and the caches; then the projections, bf16 or W4A16 (the other empty).
        let tensors: Vec<[CudaSlice<bf16>; 4]> = (0..layers as u32)
            .map(|l| {
                [
                    d.data(hidden, 100 * l + 1),
                    d.data(hidden, 100 * l + 4),
                    d.data(num_slots * layout.slot_len(), 100 * l + 7),
                    d.data(num_slots * layout.slot_len(), 100 * l + 8),
                ]
            })
            .collect();
        let dense: Vec<[CudaSlice<bf16>; 4]> = (0..layers as u32)
            .filter(|_| !quant)
            .map(|l| {
                [
                    d.data(qkv * hidden, 100 * l + 2),
                    d.data(hidden * q_dim, 100 * l + 3),
                    d.data(2 * inter * hidden, 100 * l + 5),
                    d.data(hidden * inter, 100 * l + 6),
                ]
            })
            .collect();
        let quant_weights: Vec<[k::quant::CudaQuantLinear; 4]> = (0..layers)
            .filter(|_| quant)
            .map(|l| {
                [
                    w4a16_random(&d, qkv, hidden, 10 * l + 1, false),
                    w4a16_random(&d, hidden, q_dim, 10 * l + 2, false),
                    w4a16_random(&d, 2 * inter, hidden, 10 * l + 3, true),
                    w4a16_random(&d, hidden, inter, 10 * l + 4, false),
                ]
            })
            .collect();
        let stack_layers: Vec<_> = tensors
            .iter()
            .enumerate()
            .map(|(l, [attn_norm, mlp_norm, k_cache, v_cache])| {
                let weights = match (dense.get(l), quant_weights.get(l)) {
                    (Some([qkv, o, gate_up, down]), _) => {
                        k::decode_layers::StackWeights::Bf16 { qkv, o, gate_up, down }
                    }
                    (None, Some([qkv, o, gate_up, down])) => {
                        k::decode_layers::StackWeights::W4A16 { qkv, o, gate_up, down }
                    }
                    (None, None) => unreachable!("layer {l} has neither bf16 nor W4A16 projections"),
                };
                k::decode_layers::StackLayer { attn_norm, mlp_norm, weights, k_cache, v_cache }
            })
            .collect();
        let shape = k::decode_layers::StackShape { layout, hidden, inter, eps: 1e-5, num_slots };
        // SAFETY: the tensors and projections outlive every launch with the table (all live until the end of this loop
        // body), and nothing else uses the caches.
        let table = unsafe { k::decode_layers::LayerTable::new(&d.stream, shape, &stack_layers) }.expect("table");
        let mut scratch = k::decode_layers::StackScratch::new(&d.stream, 8).expect("scratch");
        let params = layers * (qkv * hidden + hidden * q_dim + 3 * inter * hidden);
        // W4A16: half a byte per weight and a bf16 scale per 32.
        let weight_bytes = if quant { params / 2 + params / 16 } else { 2 * params };
        let tag = if quant { "w4a16_" } else { "" };
        let inv_freq = d.stream.clone_htod(&(0..dim / 2).map(|j| 1.0 / (j as f32 + 1.0)).collect::<Vec<f32>>());
        let inv_freq = inv_freq.expect("upload");
        for m in [1usize, max_m] {
            let positions = d.u32s(&vec![(ctx - 1) as u32; m]);
            let tables = d.u32s(&(0..(m * per_seq) as u32).collect::<Vec<_>>());
            let slots: Vec<u32> = (0..m).map(|s| ((s * per_seq) * 16 + ctx - 1) as u32).collect();
            let slots = d.u32s(&slots);
            let splits = k::attention::decode_num_splits(&layout, m, ctx, sms);
            let mut ws: CudaSlice<u8> = d
                .stream
                .alloc_zeros(k::attention::decode_workspace_bytes(&layout, m, splits).max(16))
                .expect("workspace");
            let (mut x, mut delta) = (d.data(m * hidden, 20), d.data(m * hidden, 21));
            let (mut qkv_buf, mut attn, mut act) = (d.data(m * qkv, 22), d.data(m * q_dim, 23), d.data(m * inter, 24));
            g.throughput(Throughput::Bytes(weight_bytes as u64));
            g.bench_function(format!("{tag}{name}_{layers}l_m{m}_ctx{ctx}"), |b| {
                b.iter_custom(|n| {
                    d.time(n, &mut || {
                        let io = llama32::model::LayerBufs {
                            x: &mut x,
                            delta: &mut delta,
                            qkv: &mut qkv_buf,
                            attn: &mut attn,
                            act: &mut act,
                        };
                        let meta = k::decode_layers::StackMeta {
                            positions: &positions,
                            slot_mapping: &slots,
                            inv_freq: &inv_freq,
                            block_tables: &tables,
                            max_blocks_per_seq: per_seq,
                            num_splits: splits,
                        };
                        k::decode_layers::decode_layers(&d.stream, &table, m, io, &meta, &mut ws, &mut scratch).unwrap()
                    })
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(300));
    targets = norm, elementwise, attention, gemv_and_sampling, quant, decode_stack
}
criterion_main!(benches);
