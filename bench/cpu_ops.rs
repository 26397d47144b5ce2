//! Criterion benches of the CPU reference kernels at Llama 3.2 1B shapes (the baseline the CUDA twins replace).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llama32::ops::cpu::attention::{paged_attention, AttentionBatch, PagedLayout};
use llama32::ops::cpu::{linear, norm};

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32 - 0.5)
        .collect()
}

fn bench_linear(c: &mut Criterion) {
    // 1B gate_up projection: [rows, 2048] x [16384, 2048]^T.
    let (k, n) = (2048, 16384);
    let w = data(n * k, 1);
    let mut g = c.benchmark_group("linear");
    for rows in [1usize, 16] {
        let x = data(rows * k, 2);
        let mut out = vec![0.0; rows * n];
        g.throughput(Throughput::Bytes((n * k * 4) as u64));
        g.bench_function(format!("gate_up_rows{rows}"), |b| b.iter(|| linear::linear(&x, &w, rows, k, n, &mut out)));
    }
    g.finish();
}

fn bench_norm(c: &mut Criterion) {
    let (rows, hidden) = (64, 2048);
    let (x, w) = (data(rows * hidden, 3), data(hidden, 4));
    let mut out = vec![0.0; rows * hidden];
    c.bench_function("rms_norm/64x2048", |b| b.iter(|| norm::rms_norm(&x, &w, 1e-5, hidden, &mut out)));
}

fn bench_attention(c: &mut Criterion) {
    // Decode: 8 sequences x 1 token against 1024 cached tokens, 1B heads (32 q / 8 kv, d64).
    let layout = PagedLayout { num_heads: 32, num_kv_heads: 8, head_dim: 64, block_size: 16 };
    let (seqs, ctx) = (8usize, 1024usize);
    let blocks = seqs * ctx / 16;
    let k_cache = data(blocks * 16 * layout.slot_len(), 5);
    let v_cache = data(blocks * 16 * layout.slot_len(), 6);
    let q = data(seqs * 32 * 64, 7);
    let tables: Vec<u32> = (0..blocks as u32).collect();
    let seq_of: Vec<u32> = (0..seqs as u32).collect();
    let positions = vec![(ctx - 1) as u32; seqs];
    let batch = AttentionBatch {
        seq_of_token: &seq_of,
        positions: &positions,
        block_tables: &tables,
        max_blocks_per_seq: ctx / 16,
    };
    let mut out = vec![0.0; seqs * 32 * 64];
    c.bench_function("paged_attention/decode_b8_ctx1024_d64", |b| {
        b.iter(|| paged_attention(&layout, &q, 32 * 64, &batch, &k_cache, &v_cache, &mut out))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench_linear, bench_norm, bench_attention
}
criterion_main!(benches);
