//! Twin tests of the element-wise CUDA families: `embedding`, `rope` (fused RoPE + paged KV-cache write) and
//! `activation` (SwiGLU), each against its f32 CPU twin in `ops::cpu`, on fresh random inputs, with every output
//! poisoned before each launch.
//!
//! The CPU twins run on the bf16 inputs widened to f32, so what is left is the kernel's one final bf16 rounding
//! (at most 2^-8 of the value, round to nearest) plus f32 noise far below it:
//! - embedding: a copy, compared bit for bit;
//! - rope: `|got - want| <= 1.01 * 2^-8 * |want| + 1e-5 * (|x[j]| + |x[j + d/2]|)`, the second term for the f32
//!   rotation (products, sincosf within 2 ulp) where the pair nearly cancels; the v heads are a copy (bit for bit),
//!   and cache slots no token names must keep their sentinel bits;
//! - silu_mul: `|got - want| <= 1.01 * 2^-8 * |want| + 1e-30` (expf, the quotient and the product agree to a few
//!   f32 ulp; the absolute term covers denormal results).
//!
//! Without a CUDA build or a device, each test prints "skipped: no CUDA device" and returns.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use llama32::config::Preset;
use llama32::ops::cpu::attention::PagedLayout;
use llama32::ops::cuda::rope::{KvCacheMut, RopeKvShape, PAD_SLOT};
use llama32::ops::{cpu, cuda};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{cuda_stream as stream, download, normal, to_f32, upload};

/// One bf16 rounding (round to nearest, 8 significant bits) moves a value by at most 2^-8 of itself.
const BF16_ROUNDING: f32 = 1.0 / 256.0;
/// Seeds: each draws its own inputs for every shape.
const SEEDS: [u64; 3] = [1, 2, 3];
/// The bits every cache slot starts with (a NaN no kernel computes), so an unwritten slot is recognisable.
const SENTINEL: u16 = 0x7fa5;

/// `rows` rows of `cols` bf16 values: standard normal times a per-row scale drawn log-uniformly from
/// [10^lo, 10^hi].
fn random_rows(rng: &mut ChaCha8Rng, rows: usize, cols: usize, (lo, hi): (f32, f32)) -> Vec<bf16> {
    let mut out = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let scale = 10f32.powf(rng.random_range(lo..hi));
        out.extend((0..cols).map(|_| bf16::from_f32(scale * normal(rng))));
    }
    out
}

/// `0..n` in a random order (Fisher-Yates).
fn shuffled(rng: &mut ChaCha8Rng, n: usize) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.random_range(0..=i));
    }
    v
}

/// The largest error relative to the bf16 rounding bound, over checks of `err <= tol` (tol = rounding term + slack).
#[derive(Default)]
struct Worst(f32);

impl Worst {
    /// Asserts `|got - want| <= 1.01 * 2^-8 * |want| + abs` and tracks the worst relative error.
    fn check(&mut self, what: &dyn Fn() -> String, got: bf16, want: f32, abs: f32) {
        let g = got.to_f32();
        let err = (g - want).abs();
        let tol = 1.01 * BF16_ROUNDING * want.abs() + abs;
        assert!(err <= tol, "{}: got {g}, want {want} (error {err:e} > tolerance {tol:e})", what());
        if want.abs() > 1e-3 {
            self.0 = self.0.max(err / want.abs());
        }
    }

    fn report(&self, what: &str) {
        eprintln!("{what}: worst relative error {:.3e} ({:.2} bf16 roundings)", self.0, self.0 / BF16_ROUNDING);
    }
}

// ------------------------------------------------------------------------------------------------------------------
// embedding

/// (vocab, hidden, tokens): the 1B/3B/11B hidden sizes, a two-block row (8192), rows that are not a multiple of 8
/// (the scalar path), a tiny row, and more tokens than one grid dimension holds (65535).
const EMBED_SHAPES: [(usize, usize, usize); 9] = [
    (1000, 2048, 1),
    (1000, 2048, 37),
    (500, 3072, 64),
    (300, 4096, 5),
    (40, 8192, 4),
    (50, 1001, 7),
    (77, 3, 9),
    (10, 8, 3),
    (5, 16, 70_000),
];

#[test]
fn embedding_matches_cpu() {
    let Some(stream) = stream() else { return };
    for seed in SEEDS {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (vocab, hidden, tokens) in EMBED_SHAPES {
            let what = format!("embed seed {seed} vocab {vocab} hidden {hidden} tokens {tokens}");
            let table = random_rows(&mut rng, vocab, hidden, (-2.0, 2.0));
            // Random ids, with the first and last rows of the table always among them.
            let mut ids: Vec<u32> = (0..tokens).map(|_| rng.random_range(0..vocab as u32)).collect();
            ids[0] = vocab as u32 - 1;
            if tokens > 1 {
                ids[1] = 0;
            }

            let mut want = vec![f32::NAN; tokens * hidden];
            cpu::embedding::embed(&to_f32(&table), hidden, &ids, &mut want);

            let (table_d, ids_d) = (upload(&stream, &table), upload(&stream, &ids));
            let mut out_d = upload(&stream, &vec![bf16::NAN; tokens * hidden]);
            cuda::embedding::embed(&stream, &table_d, hidden, &ids_d, &mut out_d)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let got = download(&stream, &out_d);
            // A copy: bit for bit (the twin's f32 values are exact widenings of the bf16 table).
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let w = bf16::from_f32(*w);
                assert!(
                    g.to_bits() == w.to_bits(),
                    "{what}: token {} col {}: got {g}, want {w}",
                    i / hidden,
                    i % hidden
                );
            }
            eprintln!("{what}: bit-exact");
        }
    }
}

#[test]
fn embedding_flags_and_zeroes_out_of_range_ids() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for hidden in [2048, 1001] {
        let vocab = 100;
        let table = random_rows(&mut rng, vocab, hidden, (-1.0, 1.0));
        let table_d = upload(&stream, &table);
        // In range: the flag stays 0.
        let ids = [3u32, 99, 0];
        let mut flag = upload(&stream, &[0u32]);
        let mut out_d = upload(&stream, &vec![bf16::NAN; ids.len() * hidden]);
        cuda::embedding::embed_flagged(&stream, &table_d, hidden, &upload(&stream, &ids), &mut out_d, &mut flag)
            .expect("embed_flagged, valid ids");
        assert_eq!(download(&stream, &flag), [0], "hidden {hidden}: flag raised for valid ids");
        // Out of range (vocab, and u32::MAX): zero rows and the flag; the valid rows between them are still copied.
        let ids = [vocab as u32, 5, u32::MAX, 42];
        let mut out_d = upload(&stream, &vec![bf16::NAN; ids.len() * hidden]);
        cuda::embedding::embed_flagged(&stream, &table_d, hidden, &upload(&stream, &ids), &mut out_d, &mut flag)
            .expect("embed_flagged, bad ids");
        assert_eq!(download(&stream, &flag), [1], "hidden {hidden}: flag not raised");
        let got = download(&stream, &out_d);
        for (t, &id) in ids.iter().enumerate() {
            let row = &got[t * hidden..(t + 1) * hidden];
            if (id as usize) < vocab {
                let want = &table[id as usize * hidden..(id as usize + 1) * hidden];
                assert!(row.iter().zip(want).all(|(g, w)| g.to_bits() == w.to_bits()), "hidden {hidden}: token {t}");
            } else {
                assert!(row.iter().all(|v| v.to_bits() == 0), "hidden {hidden}: token {t} (id {id}) not zeroed");
            }
        }
        // The unflagged entry point zeroes the rows the same way.
        let mut out_d = upload(&stream, &vec![bf16::NAN; ids.len() * hidden]);
        cuda::embedding::embed(&stream, &table_d, hidden, &upload(&stream, &ids), &mut out_d).expect("embed, bad ids");
        let got = download(&stream, &out_d);
        assert!(got[..hidden].iter().all(|v| v.to_bits() == 0), "hidden {hidden}: embed did not zero id {vocab}");
    }
}

#[test]
fn embedding_rejects_bad_shapes() {
    let Some(stream) = stream() else { return };
    let table = upload(&stream, &vec![bf16::ONE; 10 * 64]);
    let ids = upload(&stream, &[1u32, 2, 3]);
    let mut short_out = upload(&stream, &vec![bf16::NAN; 2 * 64]);
    let err = cuda::embedding::embed(&stream, &table, 64, &ids, &mut short_out).unwrap_err().to_string();
    assert!(err.contains("`out`"), "{err}");
    let mut out = upload(&stream, &vec![bf16::NAN; 3 * 64]);
    let err = cuda::embedding::embed(&stream, &table, 48, &ids, &mut out).unwrap_err().to_string();
    assert!(err.contains("`table`"), "{err}");
    let err = cuda::embedding::embed(&stream, &table, 0, &ids, &mut out).unwrap_err().to_string();
    assert!(err.contains("hidden"), "{err}");
    let mut flag = upload(&stream, &[0u32; 1]);
    let mut empty_flag = flag.slice_mut(0..0);
    let err = cuda::embedding::embed_flagged(&stream, &table, 64, &ids, &mut out, &mut empty_flag).unwrap_err();
    assert!(err.to_string().contains("`bad_id`"), "{err}");
    // Nothing was launched: the outputs are still poisoned.
    assert!(download(&stream, &out).iter().all(|v| v.is_nan()));
    assert!(download(&stream, &short_out).iter().all(|v| v.is_nan()));
}

// ------------------------------------------------------------------------------------------------------------------
// rope

/// One rope case: the head geometry, the padding after the fused row, and the batch as (cached tokens before the
/// chunk, chunk length, position offset) per sequence.
struct RopeCase {
    name: &'static str,
    heads: (usize, usize, usize),
    block_size: usize,
    stride_pad: usize,
    seqs: &'static [(usize, usize, u32)],
}

/// Prefill chunks, prefix reuse (cached tokens before the chunk), decode batches; positions up to 131000 (128K
/// context) for the f32 angle; block sizes 16 and 5; strides padded by 8 (still vectorized) and by 3 (scalar path).
const ROPE_CASES: [RopeCase; 11] = [
    RopeCase { name: "1B prefill", heads: (32, 8, 64), block_size: 16, stride_pad: 0, seqs: &[(0, 37, 0), (0, 5, 0)] },
    RopeCase {
        name: "1B decode, far positions",
        heads: (32, 8, 64),
        block_size: 16,
        stride_pad: 0,
        seqs: &[(12, 1, 100_000), (40, 1, 0), (3, 1, 131_000), (0, 1, 7), (17, 1, 65_536)],
    },
    RopeCase {
        name: "3B chunk",
        heads: (24, 8, 128),
        block_size: 16,
        stride_pad: 0,
        seqs: &[(20, 33, 99_980), (0, 9, 0)],
    },
    RopeCase {
        name: "3B block 5",
        heads: (24, 8, 128),
        block_size: 5,
        stride_pad: 8,
        seqs: &[(3, 11, 0), (7, 2, 123_456)],
    },
    RopeCase { name: "3B scalar stride", heads: (24, 8, 128), block_size: 5, stride_pad: 3, seqs: &[(0, 6, 100_000)] },
    RopeCase {
        name: "90B heads",
        heads: (64, 8, 128),
        block_size: 16,
        stride_pad: 0,
        seqs: &[(30, 4, 0), (0, 3, 131_000)],
    },
    RopeCase { name: "MHA d128", heads: (8, 8, 128), block_size: 16, stride_pad: 0, seqs: &[(0, 18, 0)] },
    RopeCase { name: "GQA 3 d80", heads: (6, 2, 80), block_size: 5, stride_pad: 0, seqs: &[(4, 9, 100_003)] },
    RopeCase { name: "odd d6", heads: (3, 1, 6), block_size: 5, stride_pad: 1, seqs: &[(0, 7, 0), (2, 3, 100_000)] },
    // Few heads (a small n, which the skinny GEMM runs one tile per block with 16 warps), three decode tokens.
    RopeCase {
        name: "small GQA decode",
        heads: (4, 2, 64),
        block_size: 16,
        stride_pad: 0,
        seqs: &[(5, 1, 0), (0, 1, 9), (16, 1, 3)],
    },
    // One token (in the fused test, a padding row 0 that writes no slot).
    RopeCase { name: "one token", heads: (4, 2, 128), block_size: 16, stride_pad: 0, seqs: &[(7, 1, 0)] },
];

/// One drawn batch: the host inputs of a rope_kv_write call.
struct RopeBatch {
    layout: PagedLayout,
    stride: usize,
    qkv: Vec<bf16>,
    positions: Vec<u32>,
    slots: Vec<u32>,
    num_slots: usize,
    inv_freq: Vec<f32>,
}

/// Draws a batch: each sequence gets random, non-contiguous blocks (a few blocks stay unused), its chunk's tokens
/// the slots of their positions within the sequence, and positions shifted by the sequence's offset. (The kernel
/// takes positions and slots as given; the offset exercises large angles without a 100000-token cache.)
fn draw_batch(rng: &mut ChaCha8Rng, case: &RopeCase) -> RopeBatch {
    let (num_heads, num_kv_heads, head_dim) = case.heads;
    let layout = PagedLayout { num_heads, num_kv_heads, head_dim, block_size: case.block_size };
    let bs = case.block_size;
    let needed: usize = case.seqs.iter().map(|&(cached, chunk, _)| (cached + chunk).div_ceil(bs)).sum();
    let num_blocks = needed + 3;
    let mut free = shuffled(rng, num_blocks).into_iter();
    let (mut positions, mut slots) = (Vec::new(), Vec::new());
    for &(cached, chunk, offset) in case.seqs {
        let table: Vec<u32> = free.by_ref().take((cached + chunk).div_ceil(bs)).collect();
        for p in cached..cached + chunk {
            positions.push(offset + p as u32);
            slots.push(table[p / bs] * bs as u32 + (p % bs) as u32);
        }
    }
    let stride = (num_heads + 2 * num_kv_heads) * head_dim + case.stride_pad;
    let qkv = random_rows(rng, positions.len(), stride, (-1.0, 1.0));
    let inv_freq = Preset::Llama32_1B.config().rope.inv_freq(head_dim);
    RopeBatch { layout, stride, qkv, positions, slots, num_slots: num_blocks * bs, inv_freq }
}

/// The device result of one batch: (qkv, k_cache, v_cache), the caches poisoned with SENTINEL beforehand.
fn run_rope_kv_write(stream: &Arc<CudaStream>, b: &RopeBatch) -> (Vec<bf16>, Vec<bf16>, Vec<bf16>) {
    let cache = vec![bf16::from_bits(SENTINEL); b.num_slots * b.layout.slot_len()];
    let (mut k_d, mut v_d) = (upload(stream, &cache), upload(stream, &cache));
    let mut qkv_d = upload(stream, &b.qkv);
    let shape = RopeKvShape { layout: b.layout, qkv_stride: b.stride };
    let (pos_d, slots_d, freq_d) =
        (upload(stream, &b.positions), upload(stream, &b.slots), upload(stream, &b.inv_freq));
    cuda::rope::rope_kv_write(
        stream,
        &shape,
        &mut qkv_d,
        &pos_d,
        &slots_d,
        &freq_d,
        KvCacheMut { k: &mut k_d, v: &mut v_d },
    )
    .unwrap_or_else(|e| panic!("rope_kv_write: {e}"));
    (download(stream, &qkv_d), download(stream, &k_d), download(stream, &v_d))
}

/// Checks a device result against the CPU composition the executor uses: `rope` over the q and k heads as one
/// block, then `write_kv` per cached token (tokens whose slot is PAD_SLOT are rotated but not cached).
fn check_rope(what: &str, b: &RopeBatch, (qkv, k_cache, v_cache): (Vec<bf16>, Vec<bf16>, Vec<bf16>)) {
    let PagedLayout { num_heads, num_kv_heads, head_dim: d, .. } = b.layout;
    let (q_len, kv_len, half, stride) = (num_heads * d, num_kv_heads * d, d / 2, b.stride);
    let input = to_f32(&b.qkv);
    let mut want = input.clone();
    cpu::rope::rope(&mut want, stride, num_heads + num_kv_heads, d, &b.positions, &b.inv_freq);
    let slot_len = b.layout.slot_len();
    let (mut kc, mut vc) = (vec![f32::NAN; b.num_slots * slot_len], vec![f32::NAN; b.num_slots * slot_len]);
    let mut written = vec![false; b.num_slots];
    for (t, &slot) in b.slots.iter().enumerate().filter(|(_, &s)| s != PAD_SLOT) {
        let row = t * stride;
        cpu::attention::write_kv(
            &b.layout,
            &want[row + q_len..],
            &want[row + q_len + kv_len..],
            stride,
            &[slot],
            &mut kc,
            &mut vc,
        );
        written[slot as usize] = true;
    }
    // |x[j]| + |x[j +- d/2]| of the input, for element `i` at column `j` of its head: the f32 rotation's error
    // scales with it.
    let pair_mag = |i: usize, j: usize| {
        let partner = if j < half { i + half } else { i - half };
        input[i].abs() + input[partner].abs()
    };
    let mut worst = Worst::default();
    for t in 0..b.positions.len() {
        let row = t * stride;
        for c in 0..stride {
            let i = row + c;
            if c < q_len {
                let at = || format!("{what}: token {t} (position {}) q head {} dim {}", b.positions[t], c / d, c % d);
                worst.check(&at, qkv[i], want[i], 1e-5 * pair_mag(i, c % d));
            } else {
                // k, v and the stride padding of qkv are only read.
                assert!(qkv[i].to_bits() == b.qkv[i].to_bits(), "{what}: token {t} col {c} of qkv was written");
            }
        }
        let slot = b.slots[t];
        if slot == PAD_SLOT {
            continue;
        }
        for c in 0..slot_len {
            let i = slot as usize * slot_len + c;
            let at = || {
                format!("{what}: token {t} (position {}) slot {slot} k head {} dim {}", b.positions[t], c / d, c % d)
            };
            worst.check(&at, k_cache[i], kc[i], 1e-5 * pair_mag(row + q_len + c, c % d));
            let v = b.qkv[row + q_len + kv_len + c];
            assert!(v_cache[i].to_bits() == v.to_bits(), "{what}: token {t} slot {slot} v col {c}: not a copy");
        }
    }
    for (slot, _) in written.iter().enumerate().filter(|(_, &w)| !w) {
        let range = slot * slot_len..(slot + 1) * slot_len;
        assert!(k_cache[range.clone()].iter().all(|v| v.to_bits() == SENTINEL), "{what}: k slot {slot} was written");
        assert!(v_cache[range].iter().all(|v| v.to_bits() == SENTINEL), "{what}: v slot {slot} was written");
    }
    worst.report(what);
}

#[test]
fn rope_kv_write_matches_cpu() {
    let Some(stream) = stream() else { return };
    for seed in SEEDS {
        let mut rng = ChaCha8Rng::seed_from_u64(200 + seed);
        for case in &ROPE_CASES {
            let what = format!("rope_kv_write seed {seed} {}", case.name);
            let b = draw_batch(&mut rng, case);
            let got = run_rope_kv_write(&stream, &b);
            check_rope(&what, &b, got);
        }
    }
}

/// The q rows and both caches after one QKV projection with RoPE and the cache write.
struct QkvOut {
    q: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
}

/// One QKV projection of `x` (rows in device memory or a norm prologue) into fresh caches filled with `cache`, run
/// either way: `gemv` then `rope_kv_write`, or `gemv_qkv_rope` when `fused`; the output poisoned beforehand.
#[allow(clippy::too_many_arguments)] // the operands of gemv and of rope_kv_write
fn project_qkv(
    stream: &Arc<CudaStream>,
    x: &impl cuda::gemv::GemvInput,
    w: &CudaSlice<bf16>,
    (m, k, n): (usize, usize, usize),
    shape: &RopeKvShape,
    cache: &[bf16],
    (pos, slots, freq): (&CudaSlice<u32>, &CudaSlice<u32>, &CudaSlice<f32>),
    fused: bool,
) -> llama32::Result<QkvOut> {
    let (mut kc, mut vc) = (upload(stream, cache), upload(stream, cache));
    let mut qkv = upload(stream, &vec![bf16::NAN; m * n]);
    let caches = KvCacheMut { k: &mut kc, v: &mut vc };
    if fused {
        cuda::gemv::gemv_qkv_rope(stream, x, w, (m, k), shape, &mut qkv, (pos, slots, freq), caches)?;
    } else {
        cuda::gemv::gemv(stream, x, w, m, k, n, &mut qkv)?;
        cuda::rope::rope_kv_write(stream, shape, &mut qkv, pos, slots, freq, caches)?;
    }
    Ok(QkvOut { q: download(stream, &qkv), k: download(stream, &kc), v: download(stream, &vc) })
}

/// The q part of every row and both caches of the two runs are bitwise equal (the k and v parts of the fused
/// output are never read, so not compared).
fn assert_same_qkv(what: &str, (m, n, q_dim): (usize, usize, usize), unfused: &QkvOut, fused: &QkvOut) {
    for i in 0..m {
        let (ra, rb) = (&unfused.q[i * n..i * n + q_dim], &fused.q[i * n..i * n + q_dim]);
        if let Some(j) = (0..q_dim).find(|&j| ra[j].to_bits() != rb[j].to_bits()) {
            panic!("{what}: q[{i}, {j}] = {} fused, {} unfused", rb[j], ra[j]);
        }
    }
    for (name, a, b) in [("k", &unfused.k, &fused.k), ("v", &unfused.v, &fused.v)] {
        if let Some(j) = (0..a.len()).find(|&j| a[j].to_bits() != b[j].to_bits()) {
            panic!("{what}: {name}_cache[{j}] = {} fused, {} unfused", b[j], a[j]);
        }
    }
}

/// `gemv_qkv_rope` (the decode QKV projection with RoPE and the cache write in its epilogue) equals `gemv` then
/// `rope_kv_write`, bit for bit: the q part of every row and both caches (poisoned alike beforehand), on the cases
/// whose head_dim is a multiple of 16 and whose rows are unpadded, cut to at most 16 tokens, with one padding
/// token, for k = 64 and 2056 (a tail step); the k and v parts of the fused output are never read, so not compared.
#[test]
fn gemv_qkv_rope_equals_gemv_then_rope_kv_write() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let mut ran = 0;
    for case in ROPE_CASES.iter().filter(|c| c.heads.2 % 16 == 0 && c.stride_pad == 0) {
        let mut b = draw_batch(&mut rng, case);
        let m = b.positions.len().min(16);
        b.positions.truncate(m);
        b.slots.truncate(m);
        b.slots[m / 2] = PAD_SLOT;
        let n = b.stride;
        let q_dim = b.layout.num_heads * b.layout.head_dim;
        for k in [64usize, 2056] {
            let what = format!("gemv_qkv_rope {} m {m} k {k}", case.name);
            let x = upload(&stream, &random_rows(&mut rng, m, k, (-1.0, 0.0)));
            let w = upload(&stream, &random_rows(&mut rng, n, k, (-1.5, -0.5)));
            let cache = vec![bf16::from_bits(SENTINEL); b.num_slots * b.layout.slot_len()];
            let shape = RopeKvShape { layout: b.layout, qkv_stride: n };
            let (pos_d, slots_d, freq_d) =
                (upload(&stream, &b.positions), upload(&stream, &b.slots), upload(&stream, &b.inv_freq));
            // Unfused (the projection, then RoPE and the cache write) against fused.
            let operands = (&pos_d, &slots_d, &freq_d);
            let dims = (m, k, n);
            let run = |x: &_, fused| {
                project_qkv(&stream, x, &w, dims, &shape, &cache, operands, fused)
                    .unwrap_or_else(|e| panic!("{what} (fused {fused}): {e}"))
            };
            let (a, fused) = (run(&x, false), run(&x, true));
            assert_same_qkv(&what, (m, n, q_dim), &a, &fused);
            for (name, c) in [("k", &a.k), ("v", &a.v)] {
                let written = c.iter().filter(|v| v.to_bits() != SENTINEL).count();
                assert_eq!(written, (m - 1) * b.layout.slot_len(), "{what}: {name} slots written (one padding token)");
            }
            // With the norm prologue: x is rms_norm(resid), unfused by the norm kernel, fused in the prologue.
            let resid = upload(&stream, &random_rows(&mut rng, m, k, (-1.0, 1.0)));
            let nw = upload(&stream, &random_rows(&mut rng, 1, k, (-0.3, 0.3)));
            let mut h = upload(&stream, &vec![bf16::NAN; m * k]);
            cuda::norm::rms_norm(&stream, &resid, &nw, 1e-5, k, &mut h).unwrap();
            let mut resid_b = upload(&stream, &download(&stream, &resid));
            let none: Option<&CudaSlice<bf16>> = None;
            let no_counter: Option<&mut CudaSlice<u32>> = None;
            // SAFETY: the operands live past the launch below, and nothing else touches them before it.
            let pro =
                unsafe { cuda::gemv::NormPrologue::new(&stream, &mut resid_b, none, &nw, no_counter, 1e-5, (m, k)) }
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            let c = run(&h, false);
            let d = project_qkv(&stream, &pro, &w, dims, &shape, &cache, operands, true)
                .unwrap_or_else(|e| panic!("{what} with the norm prologue: {e}"));
            assert_same_qkv(&format!("{what}: norm prologue"), (m, n, q_dim), &c, &d);
            assert_eq!(download(&stream, &resid_b), download(&stream, &resid), "{what}: no add, no residual write");
            ran += 1;
        }
        eprintln!(
            "gemv_qkv_rope {}: q rows and caches bitwise equal to gemv + rope_kv_write, also with the norm prologue",
            case.name
        );
    }
    assert!(ran >= 8, "only {ran} cases ran");
    // Refused by name: a head_dim that is not a multiple of 16, a padded row.
    let b = draw_batch(&mut rng, &ROPE_CASES[0]);
    let m = 1;
    let n = b.stride;
    let x = upload(&stream, &vec![bf16::ONE; m * 64]);
    let w = upload(&stream, &vec![bf16::ONE; n * 64]);
    let (pos_d, slots_d, freq_d) =
        (upload(&stream, &b.positions[..m]), upload(&stream, &b.slots[..m]), upload(&stream, &b.inv_freq));
    let cache = vec![bf16::ZERO; b.num_slots * b.layout.slot_len()];
    let (mut kc, mut vc) = (upload(&stream, &cache), upload(&stream, &cache));
    let mut qkv = upload(&stream, &vec![bf16::ZERO; m * (n + 8)]);
    let mut refusal = |shape: &RopeKvShape| {
        let caches = KvCacheMut { k: &mut kc, v: &mut vc };
        let operands = (&pos_d, &slots_d, &freq_d);
        cuda::gemv::gemv_qkv_rope(&stream, &x, &w, (m, 64), shape, &mut qkv, operands, caches).unwrap_err().to_string()
    };
    let e = refusal(&RopeKvShape { layout: b.layout, qkv_stride: n + 8 });
    assert!(e.contains("qkv_stride"), "{e}");
    let e = refusal(&RopeKvShape { layout: PagedLayout { head_dim: 8, ..b.layout }, qkv_stride: n });
    assert!(e.contains("head_dim is 8"), "{e}");
}

#[test]
fn rope_kv_write_skips_padding_and_flags_bad_slots() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(300);
    let case = &ROPE_CASES[2];
    // Padding tokens (a padded CUDA-graph batch): q rotated, nothing cached, no flag.
    let mut b = draw_batch(&mut rng, case);
    b.slots[1] = PAD_SLOT;
    b.slots[7] = PAD_SLOT;
    let got = run_rope_kv_write(&stream, &b);
    check_rope("rope_kv_write padding", &b, got);

    // An out-of-range slot: q still rotated, no cache write, flag raised; a valid batch leaves the flag at 0.
    let shape = RopeKvShape { layout: b.layout, qkv_stride: b.stride };
    let cache = vec![bf16::from_bits(SENTINEL); b.num_slots * b.layout.slot_len()];
    let (pos_d, freq_d) = (upload(&stream, &b.positions), upload(&stream, &b.inv_freq));
    for (bad, want_flag) in [(None, 0u32), (Some(b.num_slots as u32), 1), (Some(PAD_SLOT - 1), 1)] {
        // Token 1 gets the tested slot (None: the batch as drawn, token 1 padding); the others keep theirs.
        let mut slots = b.slots.clone();
        slots[1] = bad.unwrap_or(PAD_SLOT);
        let (mut k_d, mut v_d) = (upload(&stream, &cache), upload(&stream, &cache));
        let mut qkv_d = upload(&stream, &b.qkv);
        let mut flag = upload(&stream, &[0u32]);
        cuda::rope::rope_kv_write_flagged(
            &stream,
            &shape,
            &mut qkv_d,
            &pos_d,
            &upload(&stream, &slots),
            &freq_d,
            KvCacheMut { k: &mut k_d, v: &mut v_d },
            &mut flag,
        )
        .expect("rope_kv_write_flagged");
        assert_eq!(download(&stream, &flag), [want_flag], "slot {bad:?}");
        // Token 1 behaves as padding in every case: the same result as the batch with PAD_SLOT there.
        let got = (download(&stream, &qkv_d), download(&stream, &k_d), download(&stream, &v_d));
        check_rope(&format!("rope_kv_write bad slot {bad:?}"), &copy_of(&b), got);
    }
}

/// A copy of a batch's inputs.
fn copy_of(b: &RopeBatch) -> RopeBatch {
    RopeBatch {
        layout: b.layout,
        stride: b.stride,
        qkv: b.qkv.clone(),
        positions: b.positions.clone(),
        slots: b.slots.clone(),
        num_slots: b.num_slots,
        inv_freq: b.inv_freq.clone(),
    }
}

#[test]
fn rope_kv_write_rejects_bad_shapes() {
    let Some(stream) = stream() else { return };
    let layout = PagedLayout { num_heads: 32, num_kv_heads: 8, head_dim: 64, block_size: 16 };
    let stride = 48 * 64;
    let qkv_host = vec![bf16::ONE; 2 * stride];
    let mut qkv = upload(&stream, &qkv_host);
    let (pos, slots, freq) = (upload(&stream, &[0u32, 1]), upload(&stream, &[0u32, 1]), upload(&stream, &[1f32; 32]));
    let cache = vec![bf16::from_bits(SENTINEL); 16 * 8 * 64];
    let (mut k, mut v) = (upload(&stream, &cache), upload(&stream, &cache));
    let mut call = |shape: RopeKvShape, freq: &CudaSlice<f32>, slots: &CudaSlice<u32>| {
        cuda::rope::rope_kv_write(&stream, &shape, &mut qkv, &pos, slots, freq, KvCacheMut { k: &mut k, v: &mut v })
            .unwrap_err()
            .to_string()
    };
    let ok = RopeKvShape { layout, qkv_stride: stride };
    let err = call(RopeKvShape { qkv_stride: stride - 1, ..ok }, &freq, &slots);
    assert!(err.contains("qkv_stride"), "{err}");
    let err = call(RopeKvShape { qkv_stride: stride + 8, ..ok }, &freq, &slots);
    assert!(err.contains("`qkv`"), "{err}");
    let err = call(RopeKvShape { layout: PagedLayout { head_dim: 63, ..layout }, ..ok }, &freq, &slots);
    assert!(err.contains("head_dim"), "{err}");
    let err = call(RopeKvShape { layout: PagedLayout { num_kv_heads: 5, ..layout }, ..ok }, &freq, &slots);
    assert!(err.contains("kv heads"), "{err}");
    let err = call(RopeKvShape { layout: PagedLayout { block_size: 32, ..layout }, ..ok }, &freq, &slots);
    assert!(err.contains("`k_cache`"), "{err}");
    let err = call(ok, &upload(&stream, &[1f32; 64]), &slots);
    assert!(err.contains("`inv_freq`"), "{err}");
    let err = call(ok, &freq, &upload(&stream, &[0u32]));
    assert!(err.contains("`slot_mapping`"), "{err}");
    let mut short_v = upload(&stream, &cache[..cache.len() / 2]);
    let err = cuda::rope::rope_kv_write(
        &stream,
        &ok,
        &mut qkv,
        &pos,
        &slots,
        &freq,
        KvCacheMut { k: &mut k, v: &mut short_v },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`v_cache`"), "{err}");
    // Nothing was launched: qkv and the caches are as uploaded.
    assert!(download(&stream, &qkv).iter().zip(&qkv_host).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(download(&stream, &k).iter().all(|v| v.to_bits() == SENTINEL));
    assert!(download(&stream, &v).iter().all(|v| v.to_bits() == SENTINEL));
}

// ------------------------------------------------------------------------------------------------------------------
// activation

/// (rows, inter): the 1B/3B, 11B and 90B intermediate sizes at decode and prefill row counts, rows that are not a
/// multiple of 8 (the scalar path), a single element, and more rows than one grid dimension holds (65535).
const SILU_SHAPES: [(usize, usize); 10] =
    [(1, 8192), (7, 8192), (64, 8192), (3, 14336), (2, 28672), (5, 1000), (3, 1001), (9, 7), (1, 1), (70_000, 16)];

#[test]
fn silu_mul_matches_cpu() {
    let Some(stream) = stream() else { return };
    for seed in SEEDS {
        let mut rng = ChaCha8Rng::seed_from_u64(400 + seed);
        for (rows, inter) in SILU_SHAPES {
            let what = format!("silu_mul seed {seed} rows {rows} inter {inter}");
            // Row scales up to 10^1.5: gates reach beyond +-88, where exp(-g) overflows (silu -> 0 or g).
            let gate_up = random_rows(&mut rng, rows, 2 * inter, (-2.0, 1.5));
            let mut want = vec![f32::NAN; rows * inter];
            cpu::activation::silu_mul(&to_f32(&gate_up), inter, &mut want);

            let gu_d = upload(&stream, &gate_up);
            let mut out_d = upload(&stream, &vec![bf16::NAN; rows * inter]);
            cuda::activation::silu_mul(&stream, &gu_d, inter, &mut out_d).unwrap_or_else(|e| panic!("{what}: {e}"));
            let got = download(&stream, &out_d);
            // One rounding of the f32 result; HF (silu rounded to bf16, then a bf16 product) would need two.
            let mut worst = Worst::default();
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                worst.check(&|| format!("{what}: row {} col {}", i / inter, i % inter), g, w, 1e-30);
            }
            worst.report(&what);
        }
    }
}

#[test]
fn silu_mul_rejects_bad_shapes() {
    let Some(stream) = stream() else { return };
    let gu = upload(&stream, &vec![bf16::ONE; 3 * 2 * 64]);
    let mut short_out = upload(&stream, &vec![bf16::NAN; 2 * 64]);
    let err = cuda::activation::silu_mul(&stream, &gu, 64, &mut short_out).unwrap_err().to_string();
    assert!(err.contains("`out`"), "{err}");
    let mut out = upload(&stream, &vec![bf16::NAN; 3 * 64]);
    let err = cuda::activation::silu_mul(&stream, &gu, 100, &mut out).unwrap_err().to_string();
    assert!(err.contains("`gate_up`"), "{err}");
    let err = cuda::activation::silu_mul(&stream, &gu, 0, &mut out).unwrap_err().to_string();
    assert!(err.contains("inter"), "{err}");
    // Nothing was launched: the outputs are still poisoned.
    assert!(download(&stream, &out).iter().all(|v| v.is_nan()));
    assert!(download(&stream, &short_out).iter().all(|v| v.is_nan()));
}
