//! Twin tests of the paged attention kernels (`ops::cuda::attention::{paged_prefill, paged_decode}`) against the
//! f32 CPU twin `ops::cpu::attention::paged_attention`, on fresh random inputs with the outputs poisoned (NaN).
//!
//! Each case builds a paged cache with a random, non-contiguous block table per sequence. Every slot no sequence
//! owns (the tails of last blocks, spare blocks, and the block the unused table entries point at) holds NaN, so a
//! kernel that reads past a context shows up as NaN. The CPU twin runs on the same bf16 values in f32.
//!
//! Tolerance, per output row (one token, one head): |gpu - cpu| <= 2^-7 * max|cpu row| + 1e-3. The kernels round
//! the probabilities to bf16 before P * V (each weight moves by at most 2^-8 of itself, with random sign, so the
//! row moves by far less than 2^-8 * max|v|) and the output once (2^-9 of itself); scores and sums stay in f32.
//!
//! Without a CUDA build or device each test prints "skipped: no CUDA device (...)" and returns.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use llama32::ops::cpu::attention::{paged_attention, AttentionBatch, PagedLayout};
use llama32::ops::cuda::attention::{self as attn, DecodeMeta, KvPools, PrefillKernel, PrefillMeta, QueryRows};
use llama32::ops::cuda::switch::KernelSwitch;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{cuda_stream as stream, normal, to_f32, OnDrop, Watchdog};

/// (num_heads, num_kv_heads, head_dim): 1B (4:1, d64), 3B (3:1, d128), 90B (8:1, d128), and 1:1 at both dims.
const LAYOUTS: [(usize, usize, usize); 5] = [(32, 8, 64), (24, 8, 128), (64, 8, 128), (8, 8, 64), (4, 4, 128)];
/// The default block size and an odd one.
const BLOCK_SIZES: [usize; 2] = [16, 7];

/// One step's inputs on the host: sequences given as (first new position, new tokens), each with context
/// `start + new`, their cache, and the fused qkv rows of the new tokens.
struct Step {
    layout: PagedLayout,
    q_stride: usize,
    qkv: Vec<bf16>,
    k_cache: Vec<bf16>,
    v_cache: Vec<bf16>,
    positions: Vec<u32>,
    cu_seqlens: Vec<u32>,
    seq_of_token: Vec<u32>,
    block_tables: Vec<u32>,
    max_blocks_per_seq: usize,
    max_query_len: usize,
}

impl Step {
    fn new(rng: &mut ChaCha8Rng, layout: PagedLayout, seqs: &[(usize, usize)]) -> Step {
        let PagedLayout { num_heads, num_kv_heads, head_dim, block_size } = layout;
        let slot_len = layout.slot_len();
        let blocks_of = |ctx: usize| ctx.div_ceil(block_size);
        let used: usize = seqs.iter().map(|&(s, n)| blocks_of(s + n)).sum();
        // Two spare blocks, one of them the target of every unused table entry; all blocks in shuffled order.
        let num_blocks = used + 2;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.random_range(0..=i));
        }
        let poison_block = ids[used];
        let max_blocks_per_seq = seqs.iter().map(|&(s, n)| blocks_of(s + n)).max().unwrap_or(1) + 1;
        let mut block_tables = vec![poison_block; seqs.len() * max_blocks_per_seq];
        let mut k_cache = vec![bf16::NAN; num_blocks * block_size * slot_len];
        let mut v_cache = k_cache.clone();
        let mut next = 0;
        for (s, &(start, new)) in seqs.iter().enumerate() {
            let ctx = start + new;
            for b in 0..blocks_of(ctx) {
                block_tables[s * max_blocks_per_seq + b] = ids[next];
                next += 1;
            }
            for p in 0..ctx {
                let slot = block_tables[s * max_blocks_per_seq + p / block_size] as usize * block_size + p % block_size;
                for x in &mut k_cache[slot * slot_len..][..slot_len] {
                    *x = bf16::from_f32(normal(rng));
                }
                for x in &mut v_cache[slot * slot_len..][..slot_len] {
                    *x = bf16::from_f32(normal(rng));
                }
            }
        }
        let q_stride = (num_heads + 2 * num_kv_heads) * head_dim;
        let (mut positions, mut cu_seqlens, mut seq_of_token) = (Vec::new(), vec![0u32], Vec::new());
        for (s, &(start, new)) in seqs.iter().enumerate() {
            positions.extend((start..start + new).map(|p| p as u32));
            seq_of_token.extend(std::iter::repeat_n(s as u32, new));
            cu_seqlens.push(positions.len() as u32);
        }
        // Queries twice the scale of keys: scores of std ~2, so some rows are peaked and some flat.
        let qkv = (0..positions.len() * q_stride).map(|_| bf16::from_f32(2.0 * normal(rng))).collect();
        let max_query_len = seqs.iter().map(|&(_, n)| n).max().unwrap_or(1);
        Step {
            layout,
            q_stride,
            qkv,
            k_cache,
            v_cache,
            positions,
            cu_seqlens,
            seq_of_token,
            block_tables,
            max_blocks_per_seq,
            max_query_len,
        }
    }

    /// The CPU twin's output, `[tokens, num_heads * head_dim]`.
    fn reference(&self) -> Vec<f32> {
        let batch = AttentionBatch {
            seq_of_token: &self.seq_of_token,
            positions: &self.positions,
            block_tables: &self.block_tables,
            max_blocks_per_seq: self.max_blocks_per_seq,
        };
        let mut out = vec![f32::NAN; self.positions.len() * self.layout.num_heads * self.layout.head_dim];
        let (k, v) = (to_f32(&self.k_cache), to_f32(&self.v_cache));
        paged_attention(&self.layout, &to_f32(&self.qkv), self.q_stride, &batch, &k, &v, &mut out);
        out
    }
}

/// The step's operands on the device.
struct DeviceStep {
    qkv: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    positions: CudaSlice<u32>,
    cu_seqlens: CudaSlice<u32>,
    block_tables: CudaSlice<u32>,
    out: CudaSlice<bf16>,
}

impl DeviceStep {
    fn upload(stream: &Arc<CudaStream>, s: &Step) -> DeviceStep {
        let up_b = |v: &[bf16]| stream.clone_htod(v).expect("host to device copy");
        let up_u = |v: &[u32]| stream.clone_htod(v).expect("host to device copy");
        DeviceStep {
            qkv: up_b(&s.qkv),
            k: up_b(&s.k_cache),
            v: up_b(&s.v_cache),
            positions: up_u(&s.positions),
            cu_seqlens: up_u(&s.cu_seqlens),
            block_tables: up_u(&s.block_tables),
            out: up_b(&vec![bf16::NAN; s.positions.len() * s.layout.num_heads * s.layout.head_dim]),
        }
    }

    fn poison_out(&mut self, stream: &Arc<CudaStream>) {
        let n = self.out.len();
        stream.memcpy_htod(&vec![bf16::NAN; n], &mut self.out).expect("host to device copy");
    }

    fn prefill(&mut self, stream: &Arc<CudaStream>, s: &Step, kernel: PrefillKernel) -> llama32::Result<()> {
        let q = QueryRows { qkv: &self.qkv, stride: s.q_stride };
        let kv = KvPools { layout: s.layout, k: &self.k, v: &self.v };
        let meta = PrefillMeta {
            positions: &self.positions,
            cu_seqlens: &self.cu_seqlens,
            block_tables: &self.block_tables,
            max_blocks_per_seq: s.max_blocks_per_seq,
            max_query_len: s.max_query_len,
        };
        attn::paged_prefill_with(stream, kernel, &q, &kv, &meta, &mut self.out)
    }

    fn decode(
        &mut self,
        stream: &Arc<CudaStream>,
        s: &Step,
        num_splits: usize,
        workspace: &mut CudaSlice<u8>,
    ) -> llama32::Result<()> {
        let q = QueryRows { qkv: &self.qkv, stride: s.q_stride };
        let kv = KvPools { layout: s.layout, k: &self.k, v: &self.v };
        let meta = DecodeMeta {
            positions: &self.positions,
            block_tables: &self.block_tables,
            max_blocks_per_seq: s.max_blocks_per_seq,
            num_splits,
        };
        attn::paged_decode(stream, &q, &kv, &meta, workspace, &mut self.out)
    }

    fn download(&self, stream: &Arc<CudaStream>) -> Vec<bf16> {
        stream.clone_dtoh(&self.out).expect("device to host copy")
    }
}

/// Asserts the tolerance of the file comment row by row (NaN fails) and prints the worst error of the case.
fn assert_close(what: &str, got: &[bf16], want: &[f32], layout: &PagedLayout) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let d = layout.head_dim;
    let mut worst = (0.0f32, 0.0f32);
    for (r, (g_row, w_row)) in got.chunks(d).zip(want.chunks(d)).enumerate() {
        let scale = w_row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let tol = scale / 128.0 + 1e-3;
        for (c, (g, w)) in g_row.iter().map(|g| g.to_f32()).zip(w_row).enumerate() {
            let err = (g - w).abs();
            assert!(
                err <= tol,
                "{what}: token {} head {} dim {c}: got {g}, want {w} (error {err:e} > tolerance {tol:e})",
                r / layout.num_heads,
                r % layout.num_heads
            );
            if err / tol > worst.1 {
                worst = (err, err / tol);
            }
        }
    }
    eprintln!("{what}: worst error {:.3e} ({:.1}% of its tolerance)", worst.0, 100.0 * worst.1);
}

fn layout(heads: (usize, usize, usize), block_size: usize) -> PagedLayout {
    PagedLayout { num_heads: heads.0, num_kv_heads: heads.1, head_dim: heads.2, block_size }
}

/// `auto` (LLAMA32_PREFILL_KERNEL unset) picks the warp-specialized wgmma kernel exactly where it runs: compute
/// capability 9.x with the sm_90a SASS that the GPU bundle holds.
#[test]
fn prefill_auto_picks_wgmma_ws_where_it_runs() {
    let Some(stream) = stream() else { return };
    if let Some(kernel) = PrefillKernel::forced().expect("LLAMA32_PREFILL_KERNEL") {
        assert_eq!(PrefillKernel::configured(&stream).unwrap(), kernel, "a forced kernel is the one configured");
        return;
    }
    let hopper = attn::compute_capability(&stream).unwrap().0 == 9;
    assert_eq!(PrefillKernel::WgmmaWs.supported(&stream).unwrap(), hopper, "this bundle holds sm_90a SASS");
    let want = if hopper { PrefillKernel::WgmmaWs } else { PrefillKernel::Mma };
    assert_eq!(PrefillKernel::configured(&stream).unwrap(), want);
}

/// (first new position, new tokens) of the prefill twin tests: fresh prefills of 1, 17 and 300 tokens, chunked
/// prefill over an existing cache (283 + 17 = 300, 1900 + 149 = 2049) and decode-like single tokens, all in one call.
const PREFILL_SEQS: [(usize, usize); 7] = [(0, 1), (0, 17), (0, 300), (283, 17), (1900, 149), (5, 1), (63, 2)];

/// One prefill kernel against the CPU twin on every layout and block size: the outputs' bits per (layout, block
/// size), or `None` (said on stderr) where the device lacks the kernel, which must then be refused by name before
/// any launch.
fn prefill_cases(stream: &Arc<CudaStream>, kernel: PrefillKernel, dog: &Watchdog) -> Option<Vec<Vec<u16>>> {
    let supported = kernel.supported(stream).expect("compute capability");
    let mut bits = Vec::new();
    for (i, heads) in LAYOUTS.into_iter().enumerate() {
        for bs in BLOCK_SIZES {
            let mut rng = ChaCha8Rng::seed_from_u64(1000 + 10 * i as u64 + bs as u64);
            let l = layout(heads, bs);
            let what =
                format!("paged_prefill [{}] heads {}/{} d{} block {bs}", kernel.name(), heads.0, heads.1, heads.2);
            let step = Step::new(&mut rng, l, &PREFILL_SEQS);
            let mut dev = DeviceStep::upload(stream, &step);
            dog.at(format!("launch {what}"));
            let result = dev.prefill(stream, &step, kernel);
            if !supported {
                let err = result.expect_err("an unsupported kernel must be refused").to_string();
                assert!(err.contains("compute capability 9.x"), "{what}: {err}");
                assert!(dev.download(stream).iter().all(|v| v.is_nan()), "{what}: launched anyway");
                continue;
            }
            result.unwrap_or_else(|e| panic!("{what}: {e}"));
            let got = dev.download(stream);
            dog.at(format!("check {what}"));
            assert_close(&what, &got, &step.reference(), &l);
            bits.push(got.iter().map(|v| v.to_bits()).collect());
        }
    }
    if !supported {
        // "skipped:" is what the suite's table reads: a half of a test that did not run must not count as a pass.
        eprintln!("skipped: paged_prefill [{}] needs compute capability 9.x (refused as it should be)", kernel.name());
        return None;
    }
    Some(bits)
}

/// The mma and wgmma prefill kernels against the CPU twin; a kernel the device lacks (wgmma below compute
/// capability 9.x) must be refused by name before any launch, and the test says it was skipped.
#[test]
fn paged_prefill_matches_cpu() {
    let Some(stream) = stream() else { return };
    let dog = Watchdog::start("paged_prefill_matches_cpu");
    for kernel in [PrefillKernel::Mma, PrefillKernel::Wgmma] {
        prefill_cases(&stream, kernel, &dog);
    }
}

/// A form of the wgmma prefill against the CPU twin, and bit for bit against the wgmma kernel: it does the same f32
/// operations per output in the same order.
fn prefill_form_matches_wgmma_bits(name: &str, kernel: PrefillKernel) {
    let Some(stream) = stream() else { return };
    let dog = Watchdog::start(name);
    let Some(form) = prefill_cases(&stream, kernel, &dog) else { return };
    let want = prefill_cases(&stream, PrefillKernel::Wgmma, &dog).expect("the wgmma kernel runs where its forms do");
    for (case, (got, want)) in form.iter().zip(&want).enumerate() {
        let diff = got.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "case {case}: {diff} of {} outputs differ from the wgmma kernel's", got.len());
    }
    eprintln!("paged_prefill [{}]: {} cases, bit-equal to the wgmma kernel", kernel.name(), form.len());
}

/// The warp-specialized wgmma prefill (`prefill_form_matches_wgmma_bits`). Its own test, so that a failure of the
/// default kernel leaves the other two's verdict standing.
#[test]
fn paged_prefill_ws_matches_wgmma_bits() {
    prefill_form_matches_wgmma_bits("paged_prefill_ws_matches_wgmma_bits", PrefillKernel::WgmmaWs);
}

#[test]
fn paged_decode_matches_cpu() {
    let Some(stream) = stream() else { return };
    let sms = attn::num_sms(&stream).expect("SM count");
    // Contexts 1, 17, 300, 2049 in one call, then a long context beside a short one (split-KV territory).
    let batches: [&[usize]; 2] = [&[1, 17, 300, 2049], &[16384, 33]];
    for (i, heads) in LAYOUTS.into_iter().enumerate() {
        for bs in BLOCK_SIZES {
            for (b, contexts) in batches.iter().enumerate() {
                let mut rng = ChaCha8Rng::seed_from_u64(2000 + 100 * b as u64 + 10 * i as u64 + bs as u64);
                let l = layout(heads, bs);
                let seqs: Vec<(usize, usize)> = contexts.iter().map(|&c| (c - 1, 1)).collect();
                let step = Step::new(&mut rng, l, &seqs);
                let want = step.reference();
                let mut dev = DeviceStep::upload(&stream, &step);
                let max_ctx = contexts.iter().copied().max().unwrap_or(1);
                let policy = attn::decode_num_splits(&l, seqs.len(), max_ctx, sms);
                // The policy's choice, no split, and an odd count that leaves the short contexts' later splits empty.
                for splits in [policy, 1, 7] {
                    let what = format!(
                        "paged_decode heads {}/{} d{} block {bs} contexts {contexts:?} splits {splits}",
                        heads.0, heads.1, heads.2
                    );
                    let bytes = attn::decode_workspace_bytes(&l, seqs.len(), splits).max(16);
                    let mut ws = stream.alloc_zeros::<u8>(bytes).expect("workspace");
                    dev.poison_out(&stream);
                    dev.decode(&stream, &step, splits, &mut ws).unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_close(&what, &dev.download(&stream), &want, &l);
                }
            }
        }
    }
}

/// The fused split merge (`set_decode_fused_merge`, `LLAMA32_DECODE_MERGE=fused`; not yet measured): the last CTA
/// of each (sequence, kv head) merges the splits, with the merge kernel's arithmetic, so its output has the merge
/// kernel's bits, on a second run too (the first must leave its counters zeroed: they are checked after every
/// launch), at every layout, both block sizes, short and long contexts, and split counts that leave later splits
/// empty. The merge goes back to the variable's at the end, also on a failure.
#[test]
fn paged_decode_fused_merge_gives_the_merge_kernel_bits() {
    let Some(stream) = stream() else { return };
    let dog = Watchdog::start("paged_decode_fused_merge_gives_the_merge_kernel_bits");
    let _reset = OnDrop(|| attn::set_decode_fused_merge(None));
    let batches: [&[usize]; 3] = [&[1, 17, 300, 2049], &[16384, 33], &[140]];
    let mut runs = 0;
    for (i, heads) in LAYOUTS.into_iter().enumerate() {
        for bs in BLOCK_SIZES {
            for (b, contexts) in batches.iter().enumerate() {
                let mut rng = ChaCha8Rng::seed_from_u64(3000 + 100 * b as u64 + 10 * i as u64 + bs as u64);
                let l = layout(heads, bs);
                let seqs: Vec<(usize, usize)> = contexts.iter().map(|&c| (c - 1, 1)).collect();
                let step = Step::new(&mut rng, l, &seqs);
                let mut dev = DeviceStep::upload(&stream, &step);
                for splits in [2, 3, 7, 64] {
                    let what = format!(
                        "paged_decode heads {}/{} d{} block {bs} contexts {contexts:?} splits {splits}",
                        heads.0, heads.1, heads.2
                    );
                    let bytes = attn::decode_workspace_bytes(&l, seqs.len(), splits);
                    let mut ws = stream.alloc_zeros::<u8>(bytes).expect("workspace");
                    attn::set_decode_fused_merge(Some(false));
                    dev.poison_out(&stream);
                    dog.at(format!("merge kernel: {what}"));
                    dev.decode(&stream, &step, splits, &mut ws).unwrap_or_else(|e| panic!("{what}: {e}"));
                    let want: Vec<u16> = dev.download(&stream).iter().map(|v| v.to_bits()).collect();
                    attn::set_decode_fused_merge(Some(true));
                    for run in 0..2 {
                        dev.poison_out(&stream);
                        dog.at(format!("fused merge run {run}: {what}"));
                        dev.decode(&stream, &step, splits, &mut ws).unwrap_or_else(|e| panic!("{what}: {e}"));
                        let got = dev.download(&stream);
                        dog.at(format!("check fused run {run}: {what}"));
                        if let Some(j) = (0..got.len()).find(|&j| got[j].to_bits() != want[j]) {
                            panic!(
                                "{what}, fused run {run}: out[{j}] = {} but the merge kernel gives {:?}",
                                got[j],
                                bf16::from_bits(want[j])
                            );
                        }
                        let tail =
                            stream.clone_dtoh(&ws).expect("workspace")[bytes - attn::DECODE_COUNTER_BYTES..].to_vec();
                        assert!(tail.iter().all(|&v| v == 0), "{what}, fused run {run}: counters left nonzero");
                        runs += 1;
                    }
                }
            }
        }
    }
    eprintln!("paged_decode fused merge: {runs} runs, bit-equal to the merge kernel, counters left zeroed");
}

/// The 3-stage K/V ring (`LLAMA32_DECODE_STAGES=3`) gives the 2-stage kernel's bits, with the merge kernel and the
/// fused merge, at every layout, both block sizes, contexts from one token to more than a split's worth of tiles
/// (so that the ring wraps and the last tiles are partial), one split and several. The depth goes back to the
/// variable's at the end, also on a failure.
#[test]
fn paged_decode_stages_change_no_bit() {
    let Some(stream) = stream() else { return };
    let dog = Watchdog::start("paged_decode_stages_change_no_bit");
    let _reset = OnDrop(|| {
        attn::set_decode_stages(None).expect("reset the decode stages");
        attn::set_decode_fused_merge(None);
    });
    let batches: [&[usize]; 3] = [&[1, 2, 17, 65, 300, 2049], &[16384, 33], &[140, 129]];
    let mut runs = 0;
    for (i, heads) in LAYOUTS.into_iter().enumerate() {
        for bs in BLOCK_SIZES {
            for (b, contexts) in batches.iter().enumerate() {
                let mut rng = ChaCha8Rng::seed_from_u64(4000 + 100 * b as u64 + 10 * i as u64 + bs as u64);
                let l = layout(heads, bs);
                let seqs: Vec<(usize, usize)> = contexts.iter().map(|&c| (c - 1, 1)).collect();
                let step = Step::new(&mut rng, l, &seqs);
                let mut dev = DeviceStep::upload(&stream, &step);
                for (splits, fused) in [(1, false), (3, false), (7, true), (64, false)] {
                    let what = format!(
                        "paged_decode heads {}/{} d{} block {bs} contexts {contexts:?} splits {splits} fused {fused}",
                        heads.0, heads.1, heads.2
                    );
                    let bytes = attn::decode_workspace_bytes(&l, seqs.len(), splits).max(16);
                    let mut ws = stream.alloc_zeros::<u8>(bytes).expect("workspace");
                    attn::set_decode_fused_merge(Some(fused));
                    let mut outs = Vec::new();
                    for stages in [2, 3] {
                        attn::set_decode_stages(Some(stages)).expect("decode stages");
                        dev.poison_out(&stream);
                        dog.at(format!("{stages} stages: {what}"));
                        dev.decode(&stream, &step, splits, &mut ws).unwrap_or_else(|e| panic!("{what}: {e}"));
                        outs.push(dev.download(&stream));
                        dog.at(format!("check {stages} stages: {what}"));
                    }
                    if let Some(j) = (0..outs[0].len()).find(|&j| outs[0][j].to_bits() != outs[1][j].to_bits()) {
                        panic!("{what}: out[{j}] = {} with 3 stages, {} with 2", outs[1][j], outs[0][j]);
                    }
                    runs += 1;
                }
            }
        }
    }
    eprintln!("paged_decode stages: {runs} runs, 3 stages bit-equal to 2");
}

#[test]
fn attention_wrappers_reject_bad_shapes_before_launch() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let l = layout((32, 8, 64), 16);
    let step = Step::new(&mut rng, l, &[(0, 3), (9, 2)]);
    let mut dev = DeviceStep::upload(&stream, &step);

    let bad = |r: llama32::Result<()>, needle: &str| {
        let err = r.expect_err("a malformed call must fail").to_string();
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
    };
    // Unsupported head_dim: the pools are reinterpreted as head_dim 96 (wrong for the kernel, caught first).
    let kv96 = KvPools { layout: PagedLayout { head_dim: 96, ..l }, k: &dev.k, v: &dev.v };
    let q = QueryRows { qkv: &dev.qkv, stride: step.q_stride };
    let meta = PrefillMeta {
        positions: &dev.positions,
        cu_seqlens: &dev.cu_seqlens,
        block_tables: &dev.block_tables,
        max_blocks_per_seq: step.max_blocks_per_seq,
        max_query_len: step.max_query_len,
    };
    bad(attn::paged_prefill(&stream, &q, &kv96, &meta, &mut dev.out), "head_dim 96");
    // A GQA ratio that does not divide.
    let kv5 = KvPools { layout: PagedLayout { num_kv_heads: 5, ..l }, k: &dev.k, v: &dev.v };
    bad(attn::paged_prefill(&stream, &q, &kv5, &meta, &mut dev.out), "num_kv_heads");
    let kv = KvPools { layout: l, k: &dev.k, v: &dev.v };
    // A q stride that is not a multiple of 8 elements.
    let q_odd = QueryRows { qkv: &dev.qkv, stride: step.q_stride - 1 };
    bad(attn::paged_prefill(&stream, &q_odd, &kv, &meta, &mut dev.out), "q stride");
    // max_query_len past the step's tokens.
    let meta_long = PrefillMeta { max_query_len: 99, ..meta };
    bad(attn::paged_prefill(&stream, &q, &kv, &meta_long, &mut dev.out), "max_query_len");
    // A block table shorter than seqs x max_blocks_per_seq.
    let meta_tables = PrefillMeta { max_blocks_per_seq: step.max_blocks_per_seq + 1, ..meta };
    bad(attn::paged_prefill(&stream, &q, &kv, &meta_tables, &mut dev.out), "`block_tables`");
    // An output one row short.
    let mut short = stream.alloc_zeros::<bf16>(dev.out.len() - 64).expect("alloc");
    bad(attn::paged_prefill(&stream, &q, &kv, &meta, &mut short), "`out`");

    // Decode: 5 positions means 5 sequences, but the block table holds 2.
    let mut ws = stream.alloc_zeros::<u8>(16).expect("workspace");
    let dmeta = DecodeMeta {
        positions: &dev.positions,
        block_tables: &dev.block_tables,
        max_blocks_per_seq: step.max_blocks_per_seq,
        num_splits: 1,
    };
    bad(attn::paged_decode(&stream, &q, &kv, &dmeta, &mut ws, &mut dev.out), "`block_tables`");
    // Split counts out of range, and a workspace too small for the splits.
    let two = stream.clone_htod(&[4u32, 10]).expect("upload");
    let dmeta = DecodeMeta { positions: &two, num_splits: 0, ..dmeta };
    let mut out2 = stream.clone_htod(&vec![bf16::NAN; 2 * 2048]).expect("upload");
    bad(attn::paged_decode(&stream, &q, &kv, &dmeta, &mut ws, &mut out2), "num_splits");
    let dmeta = DecodeMeta { num_splits: 4, ..dmeta };
    bad(attn::paged_decode(&stream, &q, &kv, &dmeta, &mut ws, &mut out2), "`workspace`");
    // Nothing was launched: the outputs are still poisoned.
    assert!(dev.download(&stream).iter().all(|v| v.is_nan()));
    assert!(stream.clone_dtoh(&out2).expect("download").iter().all(|v| v.is_nan()));
}

/// Throughput on the device (ignored by default; `--ignored` runs it): decode at batch 64 x 2048 context for the
/// 1B and 3B layouts in GB/s of K/V read, and a 4 x 4096-token causal prefill of the 3B layout in TFLOP/s.
#[test]
#[ignore]
fn paged_attention_throughput() {
    let Some(stream) = stream() else { return };
    let sms = attn::num_sms(&stream).expect("SM count");
    // GPU time per call: CUDA events around 10 back-to-back calls, the median of 7 such samples (a single host-timed
    // run of 50 calls once read 204 us for a kernel Nsight Compute timed at 183 us).
    let time = |f: &mut dyn FnMut()| {
        use cudarc::driver::sys::CUevent_flags;
        for _ in 0..5 {
            f();
        }
        let ctx = stream.context();
        let (start, end) = (
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event"),
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event"),
        );
        let iters = 10;
        let mut ms: Vec<f32> = (0..7)
            .map(|_| {
                start.record(&stream).expect("record");
                for _ in 0..iters {
                    f();
                }
                end.record(&stream).expect("record");
                end.synchronize().expect("sync");
                start.elapsed_ms(&end).expect("elapsed")
            })
            .collect();
        ms.sort_by(f32::total_cmp);
        f64::from(ms[3]) * 1e-3 / iters as f64
    };
    for heads in [(32, 8, 64), (24, 8, 128)] {
        let l = layout(heads, 16);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (seqs, ctx) = (64, 2048);
        let step = Step::new(&mut rng, l, &vec![(ctx - 1, 1); seqs]);
        let mut dev = DeviceStep::upload(&stream, &step);
        let splits = attn::decode_num_splits(&l, seqs, ctx, sms);
        let mut ws = stream.alloc_zeros::<u8>(attn::decode_workspace_bytes(&l, seqs, splits).max(16)).expect("ws");
        let bytes = (seqs * ctx * l.slot_len() * 2 * 2) as f64;
        // The default ring first (the line earlier runs recorded), then the 3-stage one (LLAMA32_DECODE_STAGES).
        let _reset = OnDrop(|| attn::set_decode_stages(None).expect("reset the decode stages"));
        for (stages, tag) in [(None, ""), (Some(3), " stages 3")] {
            attn::set_decode_stages(stages).expect("decode stages");
            let secs = time(&mut || dev.decode(&stream, &step, splits, &mut ws).expect("decode"));
            eprintln!(
                "paged_decode {}/{} d{} batch {seqs} ctx {ctx} splits {splits}{tag}: {:.1} us, {:.0} GB/s",
                heads.0,
                heads.1,
                heads.2,
                secs * 1e6,
                bytes / secs / 1e9
            );
        }
    }
    for heads in [(24, 8, 128), (32, 8, 64)] {
        let l = layout(heads, 16);
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let (seqs, len) = (4, 4096);
        let step = Step::new(&mut rng, l, &vec![(0, len); seqs]);
        let mut dev = DeviceStep::upload(&stream, &step);
        for kernel in PrefillKernel::ALL {
            if !kernel.supported(&stream).expect("compute capability") {
                eprintln!("paged_prefill [{}]: not on this device", kernel.name());
                continue;
            }
            let secs = time(&mut || dev.prefill(&stream, &step, kernel).expect("prefill"));
            let flops = (seqs * heads.0 * heads.2 * 4) as f64 * (len * (len + 1) / 2) as f64;
            eprintln!(
                "paged_prefill [{}] {}/{} d{} {seqs} x {len} causal: {:.1} us, {:.0} TFLOP/s",
                kernel.name(),
                heads.0,
                heads.1,
                heads.2,
                secs * 1e6,
                flops / secs / 1e12
            );
        }
    }
}

/// One launch of each attention kernel worth a hardware profile, for `scripts/gpu-suite.sh run ncu` (Nsight Compute
/// profiles every launch of this test): paged decode at batch 64 and 2048 context (d128, 24/8 heads) and both
/// prefill kernels (where the device runs them) on 4 x 4096 causal tokens (d128, 24/8 heads).
#[test]
#[ignore]
fn ncu_attention_targets() {
    let Some(stream) = stream() else { return };
    let sms = attn::num_sms(&stream).expect("SM count");
    let l = layout((24, 8, 128), 16);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (seqs, ctx) = (64, 2048);
    let step = Step::new(&mut rng, l, &vec![(ctx - 1, 1); seqs]);
    let mut dev = DeviceStep::upload(&stream, &step);
    let splits = attn::decode_num_splits(&l, seqs, ctx, sms);
    let mut ws = stream.alloc_zeros::<u8>(attn::decode_workspace_bytes(&l, seqs, splits).max(16)).expect("ws");
    dev.decode(&stream, &step, splits, &mut ws).expect("decode");
    stream.synchronize().expect("sync");
    eprintln!("ncu target: paged_decode 24/8 d128 batch {seqs} ctx {ctx} splits {splits}");
    let step = Step::new(&mut rng, l, &[(0, 4096); 4]);
    let mut dev = DeviceStep::upload(&stream, &step);
    for kernel in PrefillKernel::ALL {
        if kernel.supported(&stream).expect("compute capability") {
            dev.prefill(&stream, &step, kernel).expect("prefill");
            stream.synchronize().expect("sync");
            eprintln!("ncu target: paged_prefill [{}] 24/8 d128 4 x 4096 causal", kernel.name());
        }
    }
}
