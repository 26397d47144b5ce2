//! Split-K: the [`SplitKWorkspace`] both GEMM kernels reduce through, and the launch heuristics that size it
//! ([`w4a16_splits`], [`w4a8_plan`], the per-call needs and [`workspace_bound`]).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::{padded_n, W4A16Kernel, W4A8Kernel, MAX_SPLITS, TILE_K, TILE_N, W4A8_BLOCK_N};
use crate::{Error, Result};

/// The split-K workspace: f32 partials and per-tile arrival counters (zeroed once; every launch leaves them zeroed).
pub struct SplitKWorkspace {
    pub(super) partials: CudaSlice<f32>,
    pub(super) counters: CudaSlice<u32>,
    pub(super) sms: usize,
}

impl SplitKWorkspace {
    /// A workspace of `partials` f32 values and `counters` counters, for a device with `sms` multiprocessors.
    pub fn new(stream: &Arc<CudaStream>, partials: usize, counters: usize, sms: usize) -> Result<Self> {
        let err = |e: cudarc::driver::DriverError| Error::Backend(format!("allocate split-K workspace: {e}"));
        Ok(SplitKWorkspace {
            partials: stream.alloc_zeros::<f32>(partials.max(1)).map_err(err)?,
            counters: stream.alloc_zeros::<u32>(counters.max(1)).map_err(err)?,
            sms: sms.max(1),
        })
    }

    /// The SM count the split heuristics use.
    pub fn sms(&self) -> usize {
        self.sms
    }

    /// `(partials, counters)` it holds.
    pub fn capacity(&self) -> (usize, usize) {
        (self.partials.len(), self.counters.len())
    }

    /// True when the workspace holds `need = (partials, counters)`.
    pub fn holds(&self, need: (usize, usize)) -> bool {
        self.partials.len() >= need.0 && self.counters.len() >= need.1
    }
}

/// The blocks per SM [`w4a16_splits`] aims for by default.
const W4A16_BLOCKS_PER_SM: usize = 4;

/// The environment variable that sets the 128-thread blocks per SM [`w4a16_splits`] aims for (1 to 16; default 4),
/// read once per process: an A/B for the m = 1 rate. On the H100 (2026-11-27) the direct kernel at m = 1 ran at
/// 42% occupancy on 11B gate_up (its whole grid resident) and at 23-55% of DRAM bandwidth with 12-20 cycles per
/// issue, latency-bound; more splits put more warps, and so more loads, in flight.
pub const W4A16_BLOCKS_ENV: &str = "LLAMA32_W4A16_BLOCKS_PER_SM";

/// [`W4A16_BLOCKS_ENV`]'s setting.
static BLOCKS_PER_SM: crate::ops::cuda::EnvCount =
    crate::ops::cuda::EnvCount::new(W4A16_BLOCKS_ENV, W4A16_BLOCKS_PER_SM, 1..=16);

/// The environment variable that sets the MiB of bf16 the large-m W4A16 path dequantizes at once (1 to 65536,
/// default 32: a chunk that fits the H100's L2; a large value dequantizes the whole matrix, as before the ninth
/// session), read once per process, for an A/B of the chunked path.
pub const W4A16_CHUNK_ENV: &str = "LLAMA32_W4A16_CHUNK_MIB";

/// [`W4A16_CHUNK_ENV`]'s setting.
static CHUNK_MIB: crate::ops::cuda::EnvCount = crate::ops::cuda::EnvCount::new(W4A16_CHUNK_ENV, 32, 1..=65536);

/// The MiB per chunk of the large-m W4A16 path in force ([`W4A16_CHUNK_ENV`], default 32); an error names a bad
/// value.
pub fn w4a16_chunk_mib() -> Result<usize> {
    CHUNK_MIB.get()
}

/// Rows of an `[n, k]` W4A16 weight per chunk of the large-m path (above 64 rows: dequantized to bf16 a chunk at a
/// time, each chunk multiplied by cuBLASLt): whole 16-row tiles within [`w4a16_chunk_mib`] MiB of bf16, at least
/// one tile, at most `n`. The default 32 MiB, instead of the whole matrix (940 MB for 90B's gate_up), is rewritten
/// by every chunk and fits the H100's 50 MB L2, so the GEMM should read it from L2 and HBM see mostly the int4
/// weights, where the whole-matrix path wrote and read back 2 bytes per weight. The price is one read of the
/// activations per chunk (29 chunks for 90B gate_up: about 0.9 GB at 2048 rows, against 1.9 GB of scratch traffic
/// saved).
pub fn w4a16_chunk_rows(n: usize, k: usize) -> usize {
    ((CHUNK_MIB.or_default() << 20) / (2 * k.max(1)) / 16 * 16).max(16).min(n)
}

/// The blocks per SM in force ([`W4A16_BLOCKS_ENV`], default 4); an error names a bad value.
pub fn w4a16_blocks_per_sm() -> Result<usize> {
    BLOCKS_PER_SM.get()
}

/// K splits of the W4A16 decode `kernel` for `m` x `n` x `k` on `sms` SMs: enough 128-thread blocks for about 4
/// per SM ([`W4A16_BLOCKS_ENV`]), with at least two 64-column chunks per split. Direct kernel (and the pipelined one
/// outside 8 < m <= 32), 132 SMs: 1B qkv 11, o 16, gate_up 3, down 17; 11B gate_up 2; 90B gate_up 1, down 5.
///
/// For [`W4A16Kernel::Bulk`] the count is of persistent blocks instead: the same blocks per SM, at most
/// [`BULK_BLOCKS_PER_SM`] (what its shared memory lets stay resident), and no more than one warp per 64-column
/// chunk of the matrix (132 SMs: 528 blocks on every 1B, 11B and 90B projection).
pub fn w4a16_splits(kernel: W4A16Kernel, m: usize, n: usize, k: usize, sms: usize) -> usize {
    let per_sm = BLOCKS_PER_SM.or_default();
    let chunks = (k / TILE_K).max(1);
    if let Some(forced) = forced_w4a16_splits().filter(|_| kernel.splits_k()) {
        return forced.min(chunks);
    }
    if kernel == W4A16Kernel::Bulk {
        let units = padded_n(n) / TILE_N * chunks;
        return (per_sm.min(BULK_BLOCKS_PER_SM) * sms).min(units / BULK_WARPS).clamp(1, MAX_BULK_BLOCKS);
    }
    let blocks = padded_n(n).div_ceil(kernel.block_rows(m)).max(1);
    let cap = (chunks / 2).clamp(1, MAX_SPLITS);
    (per_sm * sms).div_ceil(blocks).clamp(1, cap)
}

thread_local! {
    /// The K split count [`with_w4a16_splits`] forces on this thread's W4A16 decode launches, if any.
    static FORCED_SPLITS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with this thread's W4A16 decode launches at `splits` K splits (`k / 64` where a matrix has fewer
/// chunks) on the direct, pipelined or tiled kernel (where [`W4A16Kernel::configured`] would pick the bulk kernel,
/// whose cut differs, it picks the direct one), then restores the heuristic (also when `f` panics). The split count
/// fixes the bits: this is for comparing against kernels that cut K the same way (the persistent decode stack,
/// [`crate::ops::cuda::decode_layers`], runs `min(8, k / 64)` splits) and for A/B timings.
pub fn with_w4a16_splits<R>(splits: usize, f: impl FnOnce() -> R) -> Result<R> {
    if !(1..=MAX_SPLITS).contains(&splits) {
        return Err(Error::request(format!("W4A16 K splits is {splits}, must be in 1..={MAX_SPLITS}")));
    }
    Ok(crate::ops::cuda::with_override(&FORCED_SPLITS, splits, f))
}

/// The split count [`with_w4a16_splits`] forces on this thread, if any.
pub(crate) fn forced_w4a16_splits() -> Option<usize> {
    FORCED_SPLITS.with(std::cell::Cell::get)
}

/// Warps per block of the bulk kernel.
const BULK_WARPS: usize = 4;
/// The most bulk blocks per SM [`w4a16_splits`] asks for: 37-41 KB of shared memory each.
pub const BULK_BLOCKS_PER_SM: usize = 5;
/// The most bulk blocks a launch takes (the grid's x dimension as the C entry accepts it).
pub const MAX_BULK_BLOCKS: usize = 65_535;

/// `(partials, counters)` the W4A16 decode `kernel` needs at `m` rows with `splits` K splits (bulk: `splits`
/// blocks, two 16-row partial tiles per warp and one counter per 16-row tile, needed at every count).
pub fn w4a16_workspace_for(kernel: W4A16Kernel, m: usize, n: usize, splits: usize) -> (usize, usize) {
    if kernel == W4A16Kernel::Bulk {
        return (2 * BULK_WARPS * splits * TILE_N * m, padded_n(n) / TILE_N);
    }
    if splits <= 1 {
        return (0, 0);
    }
    (splits * m * padded_n(n), padded_n(n).div_ceil(kernel.block_rows(m)))
}

/// `(partials, counters)` the W4A16 decode `kernel` needs at `m` rows with the heuristic's splits.
pub fn w4a16_workspace(kernel: W4A16Kernel, m: usize, n: usize, k: usize, sms: usize) -> (usize, usize) {
    w4a16_workspace_for(kernel, m, n, w4a16_splits(kernel, m, n, k, sms))
}

/// The W4A8 launch shape: kernel, tokens per block and K splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct W4A8Plan {
    /// The kernel.
    pub kernel: W4A8Kernel,
    /// Tokens per block: 8, 16, 32 (decode tiles) or 128 for the mma kernel, 64 or 128 for the wgmma kernel.
    pub tile_m: usize,
    /// K splits.
    pub splits: usize,
}

/// The launch shape of `kernel` for `m` x `n` x `k` on `sms` SMs.
/// - mma: the smallest token tile that covers m <= 32, else 128; K splits only while the grid is smaller than the
///   SM count (about two 256-thread blocks per SM then), with at least two 64-column chunks per split.
/// - wgmma, wgmma-serial, wgmma-ws and wgmma-ws-tma: 128-token tiles (one block per SM: ~200 registers x 256
///   threads) when they make at least one block per SM, else 64-token tiles (two per SM; one for the ws kernels,
///   whose blocks have 384 threads);
/// - wgmma-row and wgmma-tma (the row kernel's products with TMA copies): 64-token tiles always (98 and 89
///   registers: two blocks per SM), which an H200 measured 10-18% faster than 128-token tiles for wgmma-row at
///   m = 256 and 1024 on every 11B / 90B row where the rule above takes 128 (2026-11-28);
/// - then K splits (every wgmma variant) up to two blocks per SM (one for 128 and for the ws kernels), with at
///   least one whole 4-chunk segment per split.
pub fn w4a8_plan(kernel: W4A8Kernel, m: usize, n: usize, k: usize, sms: usize) -> W4A8Plan {
    let row_blocks = padded_n(n).div_ceil(W4A8_BLOCK_N).max(1);
    let tile_m = match kernel {
        W4A8Kernel::Mma => match m {
            0..=8 => 8,
            9..=16 => 16,
            17..=32 => 32,
            _ => 128,
        },
        W4A8Kernel::WgmmaRow | W4A8Kernel::WgmmaTma => 64,
        _ if row_blocks * m.div_ceil(128) >= sms => 128,
        _ => 64,
    };
    w4a8_plan_tiled(kernel, tile_m, m, n, k, sms)
}

/// [`w4a8_plan`] with the token tile given (`tile_m` one that `kernel` takes): its K splits, by the same rule.
pub fn w4a8_plan_tiled(kernel: W4A8Kernel, tile_m: usize, m: usize, n: usize, k: usize, sms: usize) -> W4A8Plan {
    let row_blocks = padded_n(n).div_ceil(W4A8_BLOCK_N).max(1);
    let chunks = (k / TILE_K).max(1);
    // Blocks per SM the kernel keeps resident, and the fewest 64-column chunks per split.
    let (per_sm, min_chunks) = match kernel {
        W4A8Kernel::Mma => (2, 2),
        W4A8Kernel::WgmmaWs | W4A8Kernel::WgmmaWsTma => (1, 4), // 384 threads: one block per SM at either tile
        _ if tile_m == 128 => (1, 4),
        _ => (2, 4),
    };
    let blocks = row_blocks * m.div_ceil(tile_m).max(1);
    let cap = (chunks / min_chunks).clamp(1, MAX_SPLITS);
    let splits = if blocks >= sms { 1 } else { (per_sm * sms).div_ceil(blocks).clamp(1, cap) };
    W4A8Plan { kernel, tile_m, splits }
}

/// `(partials, counters)` a W4A8 launch with `plan` needs at `m` rows.
pub fn w4a8_workspace_for(plan: W4A8Plan, m: usize, n: usize) -> (usize, usize) {
    if plan.splits == 1 {
        return (0, 0);
    }
    (plan.splits * m * padded_n(n), padded_n(n).div_ceil(W4A8_BLOCK_N) * m.div_ceil(plan.tile_m))
}

/// `(partials, counters)` the W4A8 GEMM needs at `m` rows with the heuristic plan of either kernel (so that either
/// may run: [`W4A8Kernel::configured`] depends on the environment and the weight).
pub fn w4a8_workspace(m: usize, n: usize, k: usize, sms: usize) -> (usize, usize) {
    W4A8Kernel::ALL.iter().fold((0, 0), |need, &kernel| {
        let (p, c) = w4a8_workspace_for(w4a8_plan(kernel, m, n, k, sms), m, n);
        (need.0.max(p), need.1.max(c))
    })
}

/// The largest `(partials, counters)` a `n` x `k` projection needs at up to `max_m` rows: any W4A16 decode
/// kernel at up to 64 rows and, where the large-m path takes some of those rows ([`super::large_min_m`]) and is a
/// Hopper kernel at some of them ([`super::W4A16LargeKernel::configured_for`]), its split plans; or W4A8 at any
/// row count up to `max_m`.
pub fn workspace_bound(w4a8: bool, max_m: usize, n: usize, k: usize, sms: usize) -> (usize, usize) {
    let mut need = (0, 0);
    let mut take = |(p, c): (usize, usize)| need = (need.0.max(p), need.1.max(c));
    if !w4a8 {
        // Either kernel may run (W4A16Kernel::configured); splits depend on m through the block rows.
        for kernel in W4A16Kernel::ALL {
            for m in 1..=max_m.clamp(1, kernel.max_m()) {
                take(w4a16_workspace(kernel, m, n, k, sms));
            }
        }
        // The large-m kernel at the fewest rows that take it, or at the most (the default picks by row count).
        let wgmma = |rows| super::W4A16LargeKernel::configured_for(rows).is_ok_and(|kernel| kernel.is_wgmma());
        let fewest = super::large_min_m().unwrap_or(super::MAX_DECODE_M + 1);
        if super::takes_large_path(max_m) && (wgmma(fewest) || wgmma(max_m)) {
            take(super::large_workspace_bound(max_m, n, k, sms));
        }
        return need;
    }
    // Splits depend on m only through ceil(m / tile_m) (tiles of 8, 16, 32, 64 and 128 tokens) and the tile
    // choice: the largest m of each tile count bounds the need, so m up to 32, then every multiple of 64 and max_m.
    for m in 1..=max_m.min(32) {
        take(w4a8_workspace(m, n, k, sms));
    }
    let mut m = 64;
    while m < max_m + 64 {
        take(w4a8_workspace(m.min(max_m.max(1)), n, k, sms));
        m += 64;
    }
    need
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_w4a16_splits_hold_on_this_thread_only_and_cap_at_the_chunks() {
        assert!(with_w4a16_splits(0, || ()).is_err() && with_w4a16_splits(MAX_SPLITS + 1, || ()).is_err());
        let heuristic = w4a16_splits(W4A16Kernel::Direct, 1, 3072, 2048, 132);
        let seen = with_w4a16_splits(8, || {
            let other = std::thread::spawn(forced_w4a16_splits).join().unwrap();
            (
                // 1B qkv (32 chunks), a 3-chunk matrix, the pipelined kernel, and bulk's block count untouched.
                w4a16_splits(W4A16Kernel::Direct, 1, 3072, 2048, 132),
                w4a16_splits(W4A16Kernel::Direct, 1, 64, 192, 132),
                w4a16_splits(W4A16Kernel::Pipelined, 1, 2048, 8192, 132),
                w4a16_splits(W4A16Kernel::Bulk, 1, 57_344, 8192, 132) != 8,
                // Where the bulk kernel would run, the configured kernel cuts by K splits instead.
                W4A16Kernel::configured(1, 57_344, 8192).unwrap().splits_k(),
                other,
            )
        })
        .unwrap();
        assert_eq!(seen, (8, 3, 8, true, true, None));
        assert_eq!(forced_w4a16_splits(), None);
        assert_eq!(w4a16_splits(W4A16Kernel::Direct, 1, 3072, 2048, 132), heuristic);
        let caught = std::panic::catch_unwind(|| with_w4a16_splits(8, || panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(forced_w4a16_splits(), None);
    }

    #[test]
    fn large_m_chunks_are_whole_tiles_of_32_mib() {
        // 90B gate_up: 2048 rows of 8192 (32 MiB), 29 chunks; 1B gate_up: 8192 rows of 2048; a small matrix whole.
        assert_eq!(w4a16_chunk_rows(57_344, 8192), 2048);
        assert_eq!(w4a16_chunk_rows(16_384, 2048), 8192);
        assert_eq!(w4a16_chunk_rows(3072, 2048), 3072);
        // Never less than one tile, however long the rows.
        assert_eq!(w4a16_chunk_rows(1 << 20, 1 << 24), 16);
        assert_eq!(w4a16_chunk_rows(40, 1 << 24), 16);
        assert_eq!(w4a16_chunk_rows(40, 64), 40, "at most n");
    }

    #[test]
    fn split_heuristics_fill_an_h100() {
        let sms = 132;
        let direct = |n, k| w4a16_splits(W4A16Kernel::Direct, 1, n, k, sms);
        assert_eq!(direct(3072, 2048), 11);
        assert_eq!(direct(2048, 2048), 16);
        assert_eq!(direct(16384, 2048), 3);
        assert_eq!(direct(57344, 8192), 1);
        assert_eq!(direct(8192, 28672), 5);
        assert_eq!(direct(40, 64), 1);
        // The pipelined kernel matches the direct one except at 8 < m <= 32, where its blocks hold 128 rows.
        for m in [1, 8, 33, 64] {
            assert_eq!(w4a16_splits(W4A16Kernel::Pipelined, m, 16384, 2048, sms), 3, "m {m}");
        }
        assert_eq!(w4a16_splits(W4A16Kernel::Pipelined, 16, 16384, 2048, sms), 5);
        assert_eq!(w4a16_splits(W4A16Kernel::Pipelined, 32, 28672, 4096, sms), 3);
        for kernel in W4A16Kernel::ALL.into_iter().filter(|k| k.splits_k()) {
            for (n, k) in [(3072, 2048), (2048, 8192), (57344, 8192), (17, 64)] {
                for m in [1, 9, 32, 64] {
                    let s = w4a16_splits(kernel, m, n, k, sms);
                    assert!(s >= 1 && s <= (k / 64).max(1), "{kernel:?} m {m} {n}x{k}: {s}");
                }
            }
        }
        // Bulk: 4 blocks per SM on every model projection, fewer where the matrix has fewer than 4 chunks per warp's
        // share, and one block for a single tile.
        let bulk = |n, k| w4a16_splits(W4A16Kernel::Bulk, 1, n, k, sms);
        for (n, k) in [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (57344, 8192), (8192, 28672)] {
            assert_eq!(bulk(n, k), 4 * sms, "{n}x{k}");
        }
        assert_eq!(bulk(64, 1024), 16);
        assert_eq!(bulk(17, 64), 1);
        assert_eq!(w4a16_workspace_for(W4A16Kernel::Bulk, 16, 57344, 528), (2 * 4 * 528 * 16 * 16, 3584));
        let mma = |m, n, k| w4a8_plan(W4A8Kernel::Mma, m, n, k, sms);
        let plan = |kernel, tile_m, splits| W4A8Plan { kernel, tile_m, splits };
        assert_eq!(mma(1, 3072, 2048), plan(W4A8Kernel::Mma, 8, 11));
        assert_eq!(mma(20, 2048, 2048).tile_m, 32);
        assert_eq!(mma(1024, 57344, 8192), plan(W4A8Kernel::Mma, 128, 1));
        assert_eq!(mma(256, 6144, 4096), plan(W4A8Kernel::Mma, 128, 3));
    }

    #[test]
    fn wgmma_w4a8_plans_fill_an_h100() {
        let sms = 132;
        let wgmma = |m, n, k| w4a8_plan(W4A8Kernel::Wgmma, m, n, k, sms);
        let plan = |tile_m, splits| W4A8Plan { kernel: W4A8Kernel::Wgmma, tile_m, splits };
        // 11B / 90B gate_up at m = 256: 224 / 448 blocks of 128 rows x 128 tokens, one per SM.
        assert_eq!(wgmma(256, 28672, 4096), plan(128, 1));
        assert_eq!(wgmma(1024, 57344, 8192), plan(128, 1));
        // 11B down at m = 256: 32 x 2 = 64 blocks of 128 tokens are too few; 32 x 4 of 64 tokens, split in 3
        // (2 x 132 blocks wanted); 90B down: 64 x 2 = 128 blocks of 128 tokens are too few, 64 x 4 = 256 of 64
        // tokens about fill the two per SM, no split.
        assert_eq!(wgmma(256, 4096, 14336), plan(64, 3));
        assert_eq!(wgmma(256, 8192, 28672), plan(64, 1));
        // m = 1024: 32 x 8 = 256 blocks of 128 tokens.
        assert_eq!(wgmma(1024, 4096, 14336), plan(128, 1));
        // Splits keep a whole 4-chunk segment each: k = 256 is 4 chunks, one split.
        assert_eq!(wgmma(64, 128, 256), plan(64, 1));
        assert_eq!(wgmma(64, 128, 512), plan(64, 2));
        // The workspace covers either kernel's plan.
        let both = w4a8_workspace(256, 4096, 14336, sms);
        for kernel in W4A8Kernel::ALL {
            let need = w4a8_workspace_for(w4a8_plan(kernel, 256, 4096, 14336, sms), 256, 4096);
            assert!(need.0 <= both.0 && need.1 <= both.1, "{kernel:?}");
        }
        // A given tile gets the heuristic's splits for that tile: each plan is its own tile's plan, and 90B
        // gate_up at m = 256 with 64-token tiles (448 x 4 blocks, two per SM) needs no split.
        for kernel in W4A8Kernel::ALL {
            for (m, n, k) in [(1, 3072, 2048), (64, 2048, 8192), (256, 4096, 14336), (1024, 57344, 8192)] {
                let p = w4a8_plan(kernel, m, n, k, sms);
                assert_eq!(w4a8_plan_tiled(kernel, p.tile_m, m, n, k, sms), p, "{kernel:?} m {m} n {n} k {k}");
            }
        }
        let row64 = w4a8_plan_tiled(W4A8Kernel::WgmmaRow, 64, 256, 57344, 8192, sms);
        assert_eq!(row64, W4A8Plan { kernel: W4A8Kernel::WgmmaRow, tile_m: 64, splits: 1 });
        // The row kernel's plan takes 64-token tiles where the others take 128.
        for (m, n, k) in [(256, 28672, 4096), (1024, 57344, 8192), (1024, 4096, 14336), (8192, 16384, 2048)] {
            assert_eq!(w4a8_plan(W4A8Kernel::Wgmma, m, n, k, sms).tile_m, 128, "m {m} n {n} k {k}");
            assert_eq!(w4a8_plan(W4A8Kernel::WgmmaRow, m, n, k, sms).tile_m, 64, "m {m} n {n} k {k}");
        }
    }

    #[test]
    fn workspace_bound_covers_every_row_count() {
        let sms = 132;
        for (n, k) in [(3072, 2048), (2048, 8192), (6144, 4096), (40, 128)] {
            let bound = workspace_bound(true, 700, n, k, sms);
            for m in 1..=700 {
                let need = w4a8_workspace(m, n, k, sms);
                assert!(need.0 <= bound.0 && need.1 <= bound.1, "w4a8 {n}x{k} m {m}");
            }
            let bound = workspace_bound(false, 700, n, k, sms);
            for kernel in W4A16Kernel::ALL {
                for m in 1..=kernel.max_m() {
                    let need = w4a16_workspace(kernel, m, n, k, sms);
                    assert!(need.0 <= bound.0 && need.1 <= bound.1, "w4a16 {kernel:?} {n}x{k} m {m}");
                }
            }
        }
    }
}
