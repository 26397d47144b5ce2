//! W4A16 from [`large_min_m`] rows (prefill, and decode batches of 33-64): which path runs
//! ([`W4A16LargeKernel`]), and the Hopper kernel that
//! dequantizes in registers ([`w4a16_gemm_large`], `kernels/quant/w4a16_sm90.cu`). The other path, dequantize a
//! chunk of rows into a scratch and multiply it with cuBLASLt, lives with the executor's buffers
//! (`exec::cuda::quant_bufs`), since it needs the scratch and a cuBLASLt handle.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::w4a16::{check_operands, launch_gemm};
use super::{padded_n, CudaQuantLinear, SplitKWorkspace, W4A16Kernel, MAX_SPLITS, TILE_K};
use crate::ops::cuda::switch::KernelSwitch;
use crate::{Error, Result};

/// How a W4A16 projection on the large-m path ([`large_min_m`] rows and more) runs. All multiply by the same bf16
/// weights `bf16(s * (q - z))` with f32 accumulation; they differ in the order of the f32 sums. The environment
/// variable [`W4A16LargeKernel::ENV`] (`auto`, `dequant`, `wgmma`, `wgmma-row`) forces one where it runs; `auto`
/// picks by row count ([`W4A16LargeKernel::configured_for`]): the row kernel at decode sizes on Hopper, else
/// [`W4A16LargeKernel::Dequant`], which an H100 measured 4x faster than [`W4A16LargeKernel::Wgmma`] on 1B prefill
/// (2026-11-28).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum W4A16LargeKernel {
    /// A chunk of rows dequantized into a bf16 scratch ([`super::w4a16_dequant_rows`]), then cuBLASLt; every device.
    Dequant,
    /// `kernels/quant/w4a16_sm90.cu`: Hopper's wgmma with the weights dequantized in registers, no scratch
    /// (compute capability 9.x with sm_90a SASS, [`large_wgmma_available`]).
    Wgmma,
    /// [`W4A16LargeKernel::Wgmma`] with the activations copied in natural k order (four 16-byte copies per thread
    /// and chunk at 128-token tiles instead of sixteen 4-byte ones) and each lane's A fragments composed from the
    /// words of its quad's lanes. Its k16 steps hold other columns than [`W4A16LargeKernel::Wgmma`]'s, so the f32
    /// sums round differently (other bits, within the summation-order bound; H200, 2026-11-28).
    WgmmaRow,
}

impl KernelSwitch for W4A16LargeKernel {
    /// `auto` (the default), `dequant`, `wgmma` or `wgmma-row`.
    const ENV: &'static str = "LLAMA32_W4A16_LARGE";
    const WHAT: &'static str = "large-m W4A16 path";
    const KERNELS: &'static [Self] = &W4A16LargeKernel::ALL;

    fn name(self) -> &'static str {
        match self {
            W4A16LargeKernel::Dequant => "dequant",
            W4A16LargeKernel::Wgmma => "wgmma",
            W4A16LargeKernel::WgmmaRow => "wgmma-row",
        }
    }

    fn env_cell() -> &'static std::sync::OnceLock<Option<String>> {
        static VALUE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        &VALUE
    }
}

impl W4A16LargeKernel {
    /// Every path.
    pub const ALL: [W4A16LargeKernel; 3] =
        [W4A16LargeKernel::Dequant, W4A16LargeKernel::Wgmma, W4A16LargeKernel::WgmmaRow];

    /// True for the kernels of [`w4a16_gemm_large`] (every path but [`W4A16LargeKernel::Dequant`]).
    pub fn is_wgmma(self) -> bool {
        self != W4A16LargeKernel::Dequant
    }

    /// Whether the path runs on the current device.
    pub fn runs(self) -> bool {
        !self.is_wgmma() || large_wgmma_available()
    }

    /// The path the executor takes for a projection of `rows` rows on the large-m path: the forced one where it
    /// runs; else (and for `auto`) [`W4A16LargeKernel::WgmmaRow`] at decode sizes (at most
    /// [`MAX_DECODE_M`](super::MAX_DECODE_M) rows, from [`large_min_m`]) where it runs, and
    /// [`W4A16LargeKernel::Dequant`] above. On an H200 (2026-11-28) the row kernel with its plan's splits ran every
    /// 1B / 11B / 90B projection at m = 64 faster than the best decode kernel (1.07-2.0x; 1B W4A16 decode at batch
    /// 64: 3.35 -> 2.46 ms a step), while dequantize + cuBLASLt stays the prefill path (4x the wgmma kernel on 1B
    /// prefill, H100, and 272k against 145k tokens/s with the row kernel, H200). An error names a bad value of
    /// [`W4A16LargeKernel::ENV`].
    pub fn configured_for(rows: usize) -> Result<Self> {
        if let Some(kernel) = Self::forced()?.filter(|k| k.runs()) {
            return Ok(kernel);
        }
        let row = rows <= super::MAX_DECODE_M && W4A16LargeKernel::WgmmaRow.runs();
        Ok(if row { W4A16LargeKernel::WgmmaRow } else { W4A16LargeKernel::Dequant })
    }
}

/// The environment variable that sets the fewest rows a W4A16 projection sends down the large-m path
/// ([`W4A16LargeKernel`]) instead of a decode kernel: 1 to [`MAX_DECODE_M`](super::MAX_DECODE_M) + 1, or 0 (unset:
/// the default) for [`LARGE_MIN_M_DEFAULT`] where the large-m path is a Hopper kernel at decode sizes
/// ([`W4A16LargeKernel::configured_for`]: the row kernel by default) and 65 elsewhere, so that other GPUs keep
/// every decode size on the decode kernels (the dequantize path is unmeasured there). Read once per process. On an
/// H200 (2026-11-28) the row kernel ran every 1B / 11B / 90B projection at m = 64 faster than the best decode
/// kernel, and 1B W4A16 decode took 2.21 ms a step at batch 40 against 2.91 through the decode kernels, 2.50 at
/// batch 64 against 3.34.
pub const LARGE_MIN_M_ENV: &str = "LLAMA32_W4A16_LARGE_MIN_M";

/// The fewest rows on the large-m path by default where that path is a Hopper kernel at decode sizes: the rows
/// above the decode kernels' 32-row tiles.
pub const LARGE_MIN_M_DEFAULT: usize = 33;

/// [`LARGE_MIN_M_ENV`]'s setting (0: the default, resolved by [`resolve_min_m`]).
static LARGE_MIN_M: crate::ops::cuda::EnvCount =
    crate::ops::cuda::EnvCount::new(LARGE_MIN_M_ENV, 0, 0..=super::MAX_DECODE_M + 1);

/// The fewest rows for a setting of [`LARGE_MIN_M_ENV`]: the setting, or for 0 [`LARGE_MIN_M_DEFAULT`] where the
/// large-m path at 64 rows is a Hopper kernel, else [`MAX_DECODE_M`](super::MAX_DECODE_M) + 1.
fn resolve_min_m(setting: usize) -> usize {
    if setting != 0 {
        return setting;
    }
    let hopper = W4A16LargeKernel::configured_for(super::MAX_DECODE_M).is_ok_and(|k| k.is_wgmma());
    if hopper {
        LARGE_MIN_M_DEFAULT
    } else {
        super::MAX_DECODE_M + 1
    }
}

/// The fewest rows a W4A16 projection takes through the large-m path ([`LARGE_MIN_M_ENV`]; by default
/// [`LARGE_MIN_M_DEFAULT`] on Hopper, 65 elsewhere); an error names a bad value.
pub fn large_min_m() -> Result<usize> {
    LARGE_MIN_M.get().map(resolve_min_m)
}

/// True when a W4A16 projection of `rows` rows takes the large-m path ([`large_min_m`]; a bad value of
/// [`LARGE_MIN_M_ENV`], which every kernel call refuses, counts as the default).
pub fn takes_large_path(rows: usize) -> bool {
    rows >= resolve_min_m(LARGE_MIN_M.or_default())
}

/// True when the current device runs [`w4a16_gemm_large`]: this build holds sm_90a SASS and the device has
/// compute capability 9.x (cached per device in the library).
#[cfg(llama32_cuda)]
pub fn large_wgmma_available() -> bool {
    // SAFETY: no arguments; reads the current device's compute capability (cached per device).
    unsafe { super::super::ffi::l32_w4a16_wgmma_available() != 0 }
}

/// True when the current device runs [`w4a16_gemm_large`]: never in a build without CUDA.
#[cfg(not(llama32_cuda))]
pub fn large_wgmma_available() -> bool {
    false
}

/// How [`w4a16_gemm_large`] runs: which of its kernels, how many tokens per block, and how many K splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LargePlan {
    /// [`W4A16LargeKernel::Wgmma`] or [`W4A16LargeKernel::WgmmaRow`].
    pub kernel: W4A16LargeKernel,
    /// 64 or 128.
    pub tile_m: usize,
    /// K splits, 1 to `k / 64`: above 1 the blocks write f32 partials to a [`SplitKWorkspace`] of
    /// [`large_workspace_for`] and the last of each tile's splits sums them in split order.
    pub splits: usize,
}

/// The environment variable that sets the K splits of [`w4a16_gemm_large`] where [`large_splits`] considers splitting
/// (grids of fewer blocks than SMs): 0 (or unset) for the heuristic, 1 to 32 to force a count (capped at a split
/// per 64-column chunk), read once per process: the A/B of split-K at batched-decode sizes.
pub const LARGE_SPLITS_ENV: &str = "LLAMA32_W4A16_LARGE_SPLITS";

/// [`LARGE_SPLITS_ENV`]'s setting (0: the heuristic).
static LARGE_SPLITS: crate::ops::cuda::EnvCount = crate::ops::cuda::EnvCount::new(LARGE_SPLITS_ENV, 0, 0..=MAX_SPLITS);

/// The forced split count ([`LARGE_SPLITS_ENV`]; 0 for the heuristic); an error names a bad value.
pub fn large_splits_setting() -> Result<usize> {
    LARGE_SPLITS.get()
}

/// Puts a forced split count in force over [`LARGE_SPLITS_ENV`] for this process (`Some(0)`: the heuristic;
/// `None`: back to the variable's), for tests and A/Bs. A count above 32 changes nothing and returns false.
pub fn set_large_splits(splits: Option<usize>) -> bool {
    LARGE_SPLITS.set(splits)
}

/// K splits of [`w4a16_gemm_large`] with `tile_m`-token tiles for `m` x `n` x `k` on `sms` SMs: none while the grid
/// (128-row blocks by token tiles) has more than one block per two SMs; else enough for its two blocks per SM,
/// with at least four 64-column chunks per split. At 64-token tiles on 132 SMs: m = 64 on 11B down (32 blocks) 9 splits, 90B down
/// (64 blocks) 5; 1B gate_up (128 blocks) and 11B gate_up (224) none. On an H200 (2026-11-28) the splits made
/// m = 64 2.2x faster on 11B down (139 -> 62 us), 1.4x on 90B down and 1.2x on 1B qkv, but 3 splits of 1B gate_up's
/// 128 blocks made it 1.7x slower (24 -> 41 us). [`LARGE_SPLITS_ENV`] forces the count of a grid that would be
/// split (capped at a split per chunk).
pub fn large_splits(tile_m: usize, m: usize, n: usize, k: usize, sms: usize) -> usize {
    let chunks = (k / TILE_K).max(1);
    let blocks = padded_n(n).div_ceil(128).max(1) * m.div_ceil(tile_m.max(1)).max(1);
    if 2 * blocks > sms {
        return 1;
    }
    match LARGE_SPLITS.or_default() {
        0 => (2 * sms).div_ceil(blocks).clamp(1, (chunks / 4).clamp(1, MAX_SPLITS)),
        forced => forced.min(chunks),
    }
}

/// `(partials, counters)` [`w4a16_gemm_large`] needs with `plan` at `m` rows of `n`: none without splits, else
/// `splits * m * n_pad` f32 partials and a counter per (token tile, 128-row block).
pub fn large_workspace_for(plan: LargePlan, m: usize, n: usize) -> (usize, usize) {
    if plan.splits <= 1 {
        return (0, 0);
    }
    (plan.splits * m * padded_n(n), padded_n(n).div_ceil(128) * m.div_ceil(plan.tile_m))
}

/// The largest `(partials, counters)` the plans of [`W4A16LargeKernel`]'s kernels need at up to `max_m` rows of an
/// `n` x `k` projection. The plan depends on `m` only through its tile count and tile: the largest `m` of each
/// count of 64-token tiles bounds the need, and from the count whose blocks fill the SMs on, no split is taken.
pub fn large_workspace_bound(max_m: usize, n: usize, k: usize, sms: usize) -> (usize, usize) {
    let mut need = (0, 0);
    let mut tiles = 1;
    loop {
        let m = (64 * tiles).min(max_m.max(1));
        for kernel in [W4A16LargeKernel::Wgmma, W4A16LargeKernel::WgmmaRow] {
            let (p, c) = large_workspace_for(large_plan(kernel, m, n, k, sms), m, n);
            need = (need.0.max(p), need.1.max(c));
        }
        if m >= max_m || padded_n(n).div_ceil(128) * tiles >= sms {
            return need;
        }
        tiles += 1;
    }
}

/// Tokens per block of [`w4a16_gemm_large`] for `m` x `n` on `sms` SMs: 128 when those tiles make two blocks per
/// SM (the kernel's residency), else 64.
pub fn large_tile_m(m: usize, n: usize, sms: usize) -> usize {
    let row_blocks = padded_n(n).div_ceil(128).max(1);
    if row_blocks * m.div_ceil(128) >= 2 * sms {
        128
    } else {
        64
    }
}

/// The plan of `kernel` for `m` x `n` x `k` on `sms` SMs: its tile from [`large_tile_m`], its splits from
/// [`large_splits`].
pub fn large_plan(kernel: W4A16LargeKernel, m: usize, n: usize, k: usize, sms: usize) -> LargePlan {
    let tile_m = large_tile_m(m, n, sms);
    LargePlan { kernel, tile_m, splits: large_splits(tile_m, m, n, k, sms) }
}

/// `out[m, n] = x[m, k] @ bf16(s * (q - z))^T` for any `m` on Hopper with `plan` (its kernel, 64 or 128 tokens
/// per block, and K splits): the weights dequantized in registers (no scratch), f32 accumulation over all of `k`
/// (with splits: over each split's columns, then the splits' partials summed in split order), one bf16 rounding
/// per output; the two kernels group the products into wgmma's k16 steps differently, so their f32 roundings (not
/// their products) differ. `ws` holds the partials and counters of a plan with splits ([`large_workspace_for`];
/// `None` for one split).
/// A weight uploaded paired ([`CudaQuantLinear::upload_swiglu`]) writes its output in matrix row order, or with
/// `silu` the `[m, n / 2]` output `silu(gate) * up` (the bits of the plain output followed by the SiLU * up
/// kernel). Errors name the operand at fault, and a device or build without the kernel.
///
/// Enqueued on `stream`; returns without waiting.
pub fn w4a16_gemm_large(
    stream: &CudaStream,
    (x, w, m): (&impl DevicePtr<bf16>, &CudaQuantLinear, usize),
    plan: LargePlan,
    silu: bool,
    ws: Option<&mut SplitKWorkspace>,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    const OP: &str = "w4a16_gemm_large";
    super::super::ensure_built()?;
    let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
    check_operands(OP, stream, (x, w, m), out, silu)?;
    if !large_wgmma_available() {
        return fail("this device or build has no wgmma W4A16 kernel (compute capability 9.x with sm_90a)".into());
    }
    if !plan.kernel.is_wgmma() {
        return fail(format!("the {} path is not a kernel of this call", plan.kernel.name()));
    }
    if plan.tile_m != 64 && plan.tile_m != 128 {
        return fail(format!("tile_m is {}, must be 64 or 128", plan.tile_m));
    }
    if m == 0 || m >= 1 << 30 {
        return fail(format!("m is {m}, must be in 1..2^30"));
    }
    if plan.splits == 0 || plan.splits > w.k / TILE_K || plan.splits > MAX_SPLITS {
        let most = (w.k / TILE_K).min(MAX_SPLITS);
        return fail(format!("splits is {}, must be in 1..={most} (k {})", plan.splits, w.k));
    }
    let ws = match ws {
        _ if plan.splits == 1 => None,
        Some(ws) => {
            let need = large_workspace_for(plan, m, w.n);
            if !ws.holds(need) {
                let msg = format!("the split-K workspace holds fewer than {} partials / {} counters", need.0, need.1);
                return fail(msg);
            }
            Some(ws)
        }
        None => return fail(format!("{} splits need a split-K workspace", plan.splits)),
    };
    if w.n == 0 {
        return Ok(());
    }
    launch_gemm(OP, stream, (x, w, m), ws, out, (W4A16Kernel::Direct, plan.splits, Some(plan)), silu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_tiles_fill_two_blocks_per_sm() {
        let sms = 132;
        // 1B prefill of 512 tokens: qkv 3072 rows = 24 row blocks x 4 = 96 < 264 -> 64-token tiles.
        assert_eq!(large_tile_m(512, 3072, sms), 64);
        // 90B gate_up at 1024 tokens: 448 x 8 blocks.
        assert_eq!(large_tile_m(1024, 57344, sms), 128);
        assert_eq!(large_tile_m(65, 1, sms), 64);
    }

    /// The split heuristic, the workspace bound and the forced count in one test: [`set_large_splits`] is
    /// process-wide, so nothing else here may read the plan while it is set.
    #[test]
    fn large_splits_fill_two_blocks_per_sm() {
        let sms = 132;
        let splits = |m, n, k| large_plan(W4A16LargeKernel::WgmmaRow, m, n, k, sms).splits;
        // m = 64: 11B down 32 blocks -> 9; 90B down 64 -> 5; 11B gate_up 224 -> none; 1B qkv 24 blocks, capped
        // at 32 chunks / 4 = 8.
        assert_eq!(splits(64, 4096, 14336), 9);
        assert_eq!(splits(64, 8192, 28672), 5);
        assert_eq!(splits(64, 28672, 4096), 1);
        assert_eq!(splits(64, 3072, 2048), 8);
        assert_eq!(splits(64, 2048, 2048), 8);
        assert_eq!(splits(64, 16384, 2048), 1, "128 blocks: more than one per two SMs");
        assert_eq!(splits(64, 2048, 8192), 17);
        // m = 256 on 11B down: 4 x 32 = 128 blocks -> none; prefill sizes never split.
        assert_eq!(splits(256, 4096, 14336), 1);
        assert_eq!(splits(128, 4096, 14336), 5, "64 blocks");
        assert_eq!(splits(8192, 2048, 8192), 1);
        // A single chunk cannot split; tiny k keeps at least four chunks per split.
        assert_eq!(splits(64, 128, 64), 1);
        assert_eq!(splits(64, 128, 512), 2);
        for (n, k) in [(3072, 2048), (4096, 14336), (40, 128), (8192, 28672)] {
            let bound = large_workspace_bound(700, n, k, sms);
            for m in 1..=700 {
                for kernel in [W4A16LargeKernel::Wgmma, W4A16LargeKernel::WgmmaRow] {
                    let plan = large_plan(kernel, m, n, k, sms);
                    assert!(plan.splits >= 1 && plan.splits <= (k / 64).clamp(1, MAX_SPLITS), "{plan:?}");
                    let need = large_workspace_for(plan, m, n);
                    assert!(need.0 <= bound.0 && need.1 <= bound.1, "{kernel:?} {n}x{k} m {m}: {need:?} > {bound:?}");
                }
            }
        }
        assert_eq!(
            large_workspace_for(LargePlan { kernel: W4A16LargeKernel::Wgmma, tile_m: 64, splits: 1 }, 64, 40),
            (0, 0)
        );
        let plan = LargePlan { kernel: W4A16LargeKernel::WgmmaRow, tile_m: 64, splits: 9 };
        assert_eq!(large_workspace_for(plan, 100, 4096), (9 * 100 * 4096, 32 * 2));
        // A forced count applies where the heuristic would split, capped at a split per chunk; 0 is the heuristic.
        if std::env::var(LARGE_SPLITS_ENV).is_err() {
            assert!(set_large_splits(Some(2)));
            assert_eq!(splits(64, 4096, 14336), 2);
            assert_eq!(splits(64, 28672, 4096), 1, "a full grid is not split");
            assert!(set_large_splits(Some(32)));
            assert_eq!(splits(64, 128, 128), 2, "capped at the chunks");
            assert!(!set_large_splits(Some(33)), "out of range");
            assert!(set_large_splits(Some(0)));
            assert_eq!(splits(64, 4096, 14336), 9);
            assert!(set_large_splits(None));
            assert_eq!(large_splits_setting().unwrap(), 0);
        }
    }

    #[test]
    fn decode_batches_past_32_rows_take_the_large_path_by_default() {
        // The default (the variables are not set in the test environment): on Hopper with sm_90a code up to 32
        // rows the decode kernels, from 33 on the large-m path; elsewhere every decode size on the decode kernels.
        if std::env::var(LARGE_MIN_M_ENV).is_err() && std::env::var(W4A16LargeKernel::ENV).is_err() {
            let want = if large_wgmma_available() { 33 } else { 65 };
            assert_eq!(large_min_m().unwrap(), want);
            assert!(!takes_large_path(want - 1));
            assert!(takes_large_path(want) && takes_large_path(65));
        }
        assert_eq!(resolve_min_m(1), 1);
        assert_eq!(resolve_min_m(65), 65);
        // Without a forced kind: the row kernel at decode sizes where it runs, dequantize + cuBLASLt above.
        if std::env::var(W4A16LargeKernel::ENV).is_err() {
            let decode = W4A16LargeKernel::configured_for(super::super::MAX_DECODE_M).unwrap();
            let want = if large_wgmma_available() { W4A16LargeKernel::WgmmaRow } else { W4A16LargeKernel::Dequant };
            assert_eq!(decode, want);
            assert_eq!(W4A16LargeKernel::configured_for(65).unwrap(), W4A16LargeKernel::Dequant);
        }
    }

    #[test]
    fn large_kernel_names_round_trip() {
        for k in W4A16LargeKernel::ALL {
            assert_eq!(W4A16LargeKernel::parse(k.name()).unwrap(), Some(k));
            assert_eq!(k.is_wgmma(), k != W4A16LargeKernel::Dequant);
        }
        let e = W4A16LargeKernel::parse("cublas").unwrap_err().to_string();
        assert!(e.contains(W4A16LargeKernel::ENV) && e.contains("cublas"), "{e}");
        // Dequant runs everywhere; so the configured path is never one that cannot run.
        assert!(W4A16LargeKernel::Dequant.runs());
    }
}
