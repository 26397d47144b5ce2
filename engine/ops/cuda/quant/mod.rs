//! CUDA 4-bit projections (`kernels/quant/*.cu`, families `w4a16`, `w4a8`, `act_quant`): the load-time weight
//! layout, the device-side [`CudaQuantLinear`], and checked wrappers of the kernels.
//!
//! - **W4A16** ([`w4a16_gemm`], m <= 64): int4 weights streamed once, dequantized in registers into the bf16
//!   tensor-core MMA, group scales applied in f32 after each group's MMAs (so the products are exact and the only
//!   roundings are f32 sums and the final bf16), split-K over 64-column chunks with a deterministic in-kernel
//!   reduction. For more rows the executor calls [`w4a16_dequant`] into a bf16 scratch and cuBLASLt: that path
//!   multiplies by the bf16-rounded weights `bf16(s * q)` (up to 2^-9 relative per weight), the decode path by the
//!   exact `s * q`. On Hopper [`w4a16_gemm_large`] (`LLAMA32_W4A16_LARGE=wgmma`, [`W4A16LargeKernel`]) does the
//!   large-m product in one kernel instead, the weights dequantized in registers to the same `bf16(s * q)`. CPU
//!   twin: [`crate::ops::cpu::linear::linear`] over [`QuantMatrix::dequantize`].
//! - **W4A8** ([`w4a8_gemm`]): torchao 8da4w on the int8 tensor cores (`mma.sync m16n8k32 s8`, or on Hopper
//!   `wgmma` with [`W4A8Kernel::Wgmma`], whose f32 rounding has its own CPU twin): int8 per-token
//!   activations from [`act_quant`] (alone or fused into RMSNorm / residual add + RMSNorm / SiLU * up), s32 sums per
//!   group of 32, scaled in f32. CPU twin: [`crate::ops::cpu::quant::w4a8_linear`]; the integer parts agree exactly,
//!   the f32 scaling differs only in summation order (the activation zero point is removed once per output through
//!   a precomputed per-row constant instead of once per group).
//! - **Activation quantization** ([`act_quant`]): bit-identical to
//!   [`crate::quant::numerics::quantize_activations`] applied to the bf16 values the unfused kernel would write.
//!
//! # Layout
//! [`layout_w4a16`] / [`layout_w4a8`] reorder a [`QuantMatrix`] into tiles of 16 rows x 64 columns, 512 bytes,
//! lane-major, in the register order of the MMA fragments (documented in `kernels/quant/common.cuh`); scales (bf16
//! for W4A16, f32 for W4A8) and zero points follow the same tiles. `k` must be a multiple of 64 and the group a
//! multiple of 32 (a group of 64 or 128, as in GPTQ/AWQ checkpoints, is stored as 2 or 4 groups of 32 with the same
//! scale: exact). W4A16 scales are stored as bf16: this engine's scales are bf16 values already; the fp16 scales
//! of Hugging Face formats are rounded to bf16 (8 significant bits) on upload.
//!
//! # Resources (ptxas, CUDA 13.0, sm_90a; no spills, no stack frame unless said)
//! Recounted in the fifteenth session, after the dequantization's mask and XOR became one LOP3
//! (`kernels/quant/common.cuh`, `dequant_bf16x2`) and the direct and stream kernels' loads became constant offsets
//! from pointers that walk the chunks (the direct kernel's main loop: 415 -> 284 instructions per four chunks at
//! m <= 8; the same results bit for bit). Symmetric / zero points:
//! `w4a16_kernel` (128 threads): 48 / 48 registers for m <= 8, 56 / 65 for m <= 16, 76 / 80 for m <= 32, 120 / 117
//! for m <= 64.
//! The pipelined kernels (128 threads, [`W4A16Kernel::Pipelined`]): `w4a16_stream_kernel` 92 / 108 registers;
//! `w4a16_staged_kernel` 131 / 162 registers and 8 KB shared memory for m <= 16, 175 / 243 and 16 KB for m <= 32,
//! 180 / 173 and 32 KB for m <= 64.
//! The bulk kernel (128 threads, [`W4A16Kernel::Bulk`], sm_90a only; it keeps the two-LOP3 form, its SASS unchanged):
//! 98 / 98 registers for m <= 8 and 128 / 128 for m <= 16 (the cap of four blocks per SM; the zero-point variant
//! spills 4 bytes), 37 / 41 KB of static shared memory.
//! `w4a8_kernel` (256 threads): 198 / 215 registers on sm_90a (symmetric / zero points; the biased MMA accumulator)
//! and 40.7 KB shared memory for the 128-token tile, 48-77 registers and 17.7-22.3 KB for the decode tiles.
//! `w4a8_wgmma_kernel` (256 threads, sm_90a only): [`W4A8Kernel::Wgmma`] 237 registers and 112 KB dynamic shared
//! memory for 128-token tiles (8 stages, one block per SM), 120 registers and 60 KB for 64-token tiles (6 stages,
//! two per SM); [`W4A8Kernel::WgmmaSerial`] 240 / 84 KB and 126 / 60 KB; [`W4A8Kernel::WgmmaRow`] 164 / 84 KB and
//! 98 / 60 KB. `w4a8_wgmma_ws_kernel` ([`W4A8Kernel::WgmmaWs`], 384 threads, one block per SM): 161 registers and
//! 84 KB (6 stages) for 128-token tiles, 98 registers and 80 KB (8 stages) for 64-token tiles.
//! `w4a8_wgmma_tma_kernel` ([`W4A8Kernel::WgmmaTma`], 256 threads): 153 registers and 85 KB (6 stages, plus 1 KB
//! to align the swizzled stages) for 128-token tiles, 89 registers and 61 KB for 64-token tiles (two per SM).
//! `w4a8_wgmma_ws_tma_kernel` ([`W4A8Kernel::WgmmaWsTma`], 384 threads): 161 / 85 KB and 99 / 81 KB (8 stages).
//! `w4a16_wgmma_kernel` (256 threads, [`w4a16_gemm_large`], sm_90a only, two blocks per SM; with split-K since the
//! fifteenth session): 116 / 117 registers and 106 KB dynamic shared memory (5 stages) for 128-token tiles,
//! 75 / 77 registers and 79 KB (6 stages) for 64-token tiles; [`W4A16LargeKernel::WgmmaRow`] 128 / 128 and
//! 80 / 85 (before split-K and the one-LOP3 dequantization: 110 / 115, 76 / 79, 127 / 127, 79 / 79).
//! With the twentieth session's weight loads before the PDL wait ([`QUANT_PREWAIT_ENV`]; sm_90a, no spills):
//! `w4a16_kernel` 46 / 55, 63 / 66, 77 / 82, 120 / 117; the direct-batched kernel 90 / 109 (m <= 8) and 134 / 144
//! (m <= 16); `w4a8_kernel` 211 / 215 (128-token tile), 58-72 (decode tiles); `w4a16_wgmma_kernel` 116 / 119,
//! 74 / 75, row 128 / 128, 80 / 85.
//! `act_quant_kernel`: 25-39 registers.
//!
//! In a build without CUDA the wrappers return `Error::Backend("built without CUDA ...")`; the host-side layout
//! functions and heuristics work everywhere.
//!
//! # Files
//! `large` (the large-m W4A16 path's switch and its Hopper kernel), `layout` (host-side tile layout), `linear` ([`CudaQuantLinear`]: upload and device buffers), `split_k` (the
//! split-K workspace and launch heuristics), `w4a16` and `w4a8` (the checked wrappers, with the int8 activations
//! in `w4a8`), `table` (int8 embedding / `lm_head` tables: [`CudaInt8Table`], [`gemv_int8`]), `launch` (the FFI
//! calls and their stubs in a build without CUDA).
//!
//! [`QuantMatrix`]: crate::quant::QuantMatrix
//! [`QuantMatrix::dequantize`]: crate::quant::QuantMatrix::dequantize

mod large;
mod launch;
mod layout;
mod linear;
mod split_k;
mod table;
mod w4a16;
mod w4a8;

use crate::ops::cuda::switch::KernelSwitch;
pub use large::{
    large_min_m, large_plan, large_splits, large_splits_setting, large_tile_m, large_wgmma_available,
    large_workspace_bound, large_workspace_for, set_large_splits, takes_large_path, w4a16_gemm_large, LargePlan,
    W4A16LargeKernel, LARGE_MIN_M_DEFAULT, LARGE_MIN_M_ENV, LARGE_SPLITS_ENV,
};
pub use layout::{layout_w4a16, layout_w4a16_paired, layout_w4a8, HostW4A16, HostW4A8};
pub use linear::CudaQuantLinear;
pub use split_k::w4a16_workspace_for;
pub use split_k::{
    w4a16_blocks_per_sm, w4a16_chunk_mib, w4a16_chunk_rows, w4a16_splits, w4a16_workspace, w4a8_plan, w4a8_plan_tiled,
    w4a8_workspace, w4a8_workspace_for, with_w4a16_splits, workspace_bound, SplitKWorkspace, W4A8Plan,
    BULK_BLOCKS_PER_SM, W4A16_BLOCKS_ENV, W4A16_CHUNK_ENV,
};
pub use table::{dequant_rows, gemv_int8, gemv_int8_supports, CudaInt8Table, GEMV_INT8_MAX_M};
pub use w4a16::{
    w4a16_dequant, w4a16_dequant_rows, w4a16_gemm, w4a16_gemm_silu, w4a16_gemm_silu_with, w4a16_gemm_with, W4A16Choice,
};
pub use w4a8::{
    act_quant, w4a8_gemm, w4a8_gemm_with, wgmma_available, ActSource, QuantActs, W4A8Kernel, ROW_AUTO_MIN_M,
    WGMMA_MIN_M,
};

/// The most rows of `x` [`w4a16_gemm`] takes (the executor uses dequantize + cuBLASLt above).
pub const MAX_DECODE_M: usize = 64;
/// Columns per tile of the layout (two groups of 32).
pub const TILE_K: usize = 64;
/// Rows per tile of the layout.
pub const TILE_N: usize = 16;
/// The group size the kernels work in.
pub const KERNEL_GROUP: usize = 32;
/// Largest `k` the kernels take.
const MAX_K: usize = 1 << 24;
/// Largest `n` the kernels take.
const MAX_N: usize = (i32::MAX as usize) - 128;
/// Most K splits the heuristics pick.
const MAX_SPLITS: usize = 32;
/// Rows of `n` per W4A16 block (4 warps x 16; the pipelined kernel doubles it at 8 < m <= 32, the tiled one at every
/// m) and per W4A8 block.
const W4A16_BLOCK_N: usize = 64;
const W4A8_BLOCK_N: usize = 128;

/// True when the kernels take a matrix with `k` columns in groups of `group`: `k` a positive multiple of 64 (up to
/// 2^24) and `group` a positive multiple of 32 that divides `k`.
pub fn supports(k: usize, group: usize) -> bool {
    k > 0
        && k.is_multiple_of(TILE_K)
        && k <= MAX_K
        && group > 0
        && group.is_multiple_of(KERNEL_GROUP)
        && k.is_multiple_of(group)
}

/// Which W4A16 decode kernel [`w4a16_gemm`] runs. All compute the same product over the same layout; direct,
/// pipelined and tiled give the same bits for the same split count, bulk wherever one warp covers a whole 16-row
/// tile. They differ in how the weight stream overlaps the arithmetic (see `kernels/quant/w4a16_pipelined.cu` and
/// `kernels/quant/w4a16_bulk.cu`). By default each call picks by shape ([`W4A16Kernel::for_shape`], from the
/// H200 and H100 measurements of 2026-11-27); the environment variable [`W4A16Kernel::ENV`] (`auto`, `direct`,
/// `pipelined`, `tiled`, `bulk` or `direct-batched`) can force one for the whole process, at the row counts and on
/// the devices where it runs ([`W4A16Kernel::runs`]). Direct, pipelined, tiled and direct-batched give the same bits
/// for the same split count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum W4A16Kernel {
    /// One 16-row tile per warp; every warp reads its activations; each chunk set is loaded, then computed.
    Direct,
    /// The next chunks in flight while the current ones are computed; for m > 8 the activations staged once per
    /// block in shared memory (two row tiles per warp, 128-row blocks, for m <= 32).
    Pipelined,
    /// For batches: 128-row blocks at every m, the activations and the weights both staged in shared memory with
    /// cp.async (double-buffered), so each activation fragment feeds both of a warp's row tiles. The default at
    /// m > 32 for the largest matrices (see [`for_shape`](Self::for_shape)) where those rows stay on the decode
    /// kernels (on Hopper, from 33 rows the large-m path takes them by default).
    Tiled,
    /// For m <= 16 on Hopper (compute capability 9.x): a persistent grid whose warps each take an equal share of the
    /// matrix's 64-column chunks, streamed through a shared-memory ring that TMA bulk copies fill (6-8 KB in flight
    /// per warp, whatever the registers), with a deterministic in-kernel sum of the tiles a warp boundary cuts.
    /// Its `splits` count blocks, not K splits.
    Bulk,
    /// The direct kernel's code (so its bits) compiled at m <= 8 for at most 128 registers and at 9-16 rows for at
    /// most 168, under which ptxas issues a warp's four chunk loads before their MMAs (92 and 134 registers) where
    /// the direct kernel has about one chunk in flight (48 registers at m <= 8); above 16 rows it is the direct
    /// kernel. The default at m <= 8 on Hopper ([`pick`](Self::pick)): on an H200 (2026-11-28) it reached
    /// 3072-3249 GB/s on the 90B projections at m = 1, against 2571-2806 for the best kernel before; at 9-16 rows
    /// it is only forced (`direct-batched`).
    DirectBatched,
}

impl crate::ops::cuda::switch::KernelSwitch for W4A16Kernel {
    /// `auto` (the default), `direct`, `pipelined`, `tiled`, `bulk` or `direct-batched`.
    const ENV: &'static str = "LLAMA32_W4A16_KERNEL";
    const WHAT: &'static str = "W4A16 kernel";
    const KERNELS: &'static [Self] = &Self::ALL;

    fn name(self) -> &'static str {
        match self {
            W4A16Kernel::Direct => "direct",
            W4A16Kernel::Pipelined => "pipelined",
            W4A16Kernel::Tiled => "tiled",
            W4A16Kernel::Bulk => "bulk",
            W4A16Kernel::DirectBatched => "direct-batched",
        }
    }

    fn env_cell() -> &'static std::sync::OnceLock<Option<String>> {
        static VALUE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        &VALUE
    }
}

impl W4A16Kernel {
    /// Every kernel.
    pub const ALL: [W4A16Kernel; 5] = [
        W4A16Kernel::Direct,
        W4A16Kernel::Pipelined,
        W4A16Kernel::Tiled,
        W4A16Kernel::Bulk,
        W4A16Kernel::DirectBatched,
    ];

    /// The kernel for an `m x k` by `k x n` product: the forced one where it runs at `m` on this device
    /// ([`runs`](Self::runs)), else [`for_shape`](Self::for_shape).
    pub fn configured(m: usize, n: usize, k: usize) -> crate::Result<Self> {
        let kernel = Self::forced()?.filter(|kernel| kernel.runs(m)).unwrap_or_else(|| Self::for_shape(m, n, k));
        // Under with_w4a16_splits the cut is by K splits, which the bulk kernel does not take.
        let split_k = split_k::forced_w4a16_splits().is_some();
        Ok(if split_k && !kernel.splits_k() { W4A16Kernel::Direct } else { kernel })
    }

    /// Whether the kernel takes `m` rows of x on the current device: bulk only at m <= 16 on a device that runs it
    /// ([`bulk_available`]), the others at every m of the decode path (1..=64).
    pub fn runs(self, m: usize) -> bool {
        m <= self.max_m() && (self != W4A16Kernel::Bulk || bulk_available())
    }

    /// The most rows of x the kernel takes: [`BULK_MAX_M`] for bulk, [`MAX_DECODE_M`] for the others.
    pub fn max_m(self) -> usize {
        match self {
            W4A16Kernel::Bulk => BULK_MAX_M,
            _ => MAX_DECODE_M,
        }
    }

    /// Whether `splits` counts K splits (direct, pipelined, tiled), which also fixes the bits; bulk's counts blocks.
    pub fn splits_k(self) -> bool {
        self != W4A16Kernel::Bulk
    }

    /// The faster kernel at this shape on the current device: [`pick`](Self::pick) with `hopper` where the bulk
    /// kernel runs ([`bulk_available`]: compute capability 9.x with sm_90a code), where the picks were measured.
    pub fn for_shape(m: usize, n: usize, k: usize) -> Self {
        // The device is asked only for the shapes where the answer changes the pick.
        Self::pick(m, n, k, (m <= 8 || Self::bulk_shape(m, n, k)) && bulk_available())
    }

    /// The shapes where the bulk kernel measured fastest (see [`pick`](Self::pick)): n k >= 2^27 and down-like
    /// (k >= 2 n) at 9-16 rows (at m <= 8 direct-batched beat it).
    fn bulk_shape(m: usize, n: usize, k: usize) -> bool {
        n.saturating_mul(k) >= 1 << 27 && (9..=BULK_MAX_M).contains(&m) && k >= 2 * n
    }

    /// The faster kernel at this shape, as measured on an H200 (2026-11-27 and 2026-11-28,
    /// `cuda_quant::quant_throughput`, the 1B / 11B / 90B projections at m = 1, 16, 64) and on an H100 (2026-11-27,
    /// seventh and eighth sessions, the same shapes with the tiled and bulk kernels;
    /// `bench/results/2026-11-27-h100-targets-prefill-w4a16.md` and `bench/results/2026-11-27-h100-w4a16-bulk.md`),
    /// with `hopper` saying whether this is a Hopper GPU with sm_90a code (where the bulk kernel runs):
    /// - on Hopper, direct-batched at m <= 8 (one 8-token tile, the same kernel for every m there): at m = 1 on an H200
    ///   (2026-11-28, nineteenth session) it beat the kernel picked before on six of the eight projections, us per
    ///   call: 90B gate_up 99.8 (bulk) -> 86.0, 90B down 54.2 (bulk) -> 40.7, 11B down 15.6 (pipelined) -> 14.0,
    ///   1B down 9.34 (pipelined) -> 7.08, 1B qkv 6.04 -> 5.36, 1B o 5.14 -> 4.47; 11B gate_up tied (26.5 /
    ///   26.6) and 1B gate_up lost 3% (11.44 -> 11.82). At 9-16 rows it lost up to 1.25x (11B gate_up), so it
    ///   stays at m <= 8. Elsewhere (unmeasured there) the picks before it stand;
    /// - on Hopper, bulk on the largest matrices (n k >= 2^27: the 90B gate_up and down) at 9-16 rows for the
    ///   down-like ones (k >= 2 n): H100, us per call, best other -> bulk: 90B down m = 16 87.6 -> 74.3 (H200
    ///   2026-11-28: 68.9, direct-batched 68.7, direct 91.4); it lost on 90B gate_up at m = 16 (128.6 -> 133.6),
    ///   on the 11B matrices (1.02-1.11x slower) and on every 1B one (1.2-2x slower);
    /// - off Hopper, pipelined at m <= 8 when k >= 2 n (the down projections), as measured before direct-batched:
    ///   1B 10.05 -> 9.62 us, 11B 22.9 -> 19.7 us, 90B 71.4 -> 55.0 us (H200, 2026-11-27);
    /// - tiled at m > 32 for the largest matrices (n k >= 2^27, the 90B gate_up and down) and the other wide, large
    ///   ones (n >= 4 k and n k >= 2^26, 11B gate_up): at m = 64 on the H100, 90B gate_up 475 -> 394 us, 90B down
    ///   265 -> 242 us and 11B gate_up 167 -> 155 us (the next best -> tiled), where it lost 1.3-1.7x on the 1B
    ///   matrices and 11B down;
    /// - direct everywhere else, and at 8 < m <= 32 in particular, where the pipelined kernel lost 1.2-2.3x (H200)
    ///   and the tiled one 1.1-2.3x (H100).
    pub fn pick(m: usize, n: usize, k: usize, hopper: bool) -> Self {
        let weights = n.saturating_mul(k);
        let down_like = m <= 8 && k >= 2 * n;
        let large = m > 32 && (weights >= 1 << 27 || (n >= 4 * k && weights >= 1 << 26));
        if hopper && m <= 8 {
            W4A16Kernel::DirectBatched
        } else if hopper && Self::bulk_shape(m, n, k) {
            W4A16Kernel::Bulk
        } else if large {
            W4A16Kernel::Tiled
        } else if down_like {
            W4A16Kernel::Pipelined
        } else {
            W4A16Kernel::Direct
        }
    }

    /// Output rows per block at `m` rows of x, which is also the rows per split-K counter.
    pub fn block_rows(self, m: usize) -> usize {
        match self {
            W4A16Kernel::Pipelined if (9..=32).contains(&m) => 2 * W4A16_BLOCK_N,
            W4A16Kernel::Tiled => 2 * W4A16_BLOCK_N,
            _ => W4A16_BLOCK_N,
        }
    }
}

/// The environment variable that forces the direct W4A16 kernel's L2 prefetch of the next chunk set on (`1`, `on`,
/// `true`) or off (`0`, `off`, `false`); unset, empty or `auto`, each call decides by shape
/// ([`w4a16_l2_prefetch_for`]). The product and its bits are the same either way. Read once per process.
pub const W4A16_PREFETCH_ENV: &str = "LLAMA32_W4A16_PREFETCH";

/// The prefetch forced by [`W4A16_PREFETCH_ENV`], or `None` for `auto`; a value it does not know is an error naming
/// the variable.
pub fn w4a16_l2_prefetch_forced() -> crate::Result<Option<bool>> {
    static VALUE: std::sync::OnceLock<std::result::Result<Option<bool>, String>> = std::sync::OnceLock::new();
    VALUE
        .get_or_init(|| {
            let value = std::env::var(W4A16_PREFETCH_ENV).unwrap_or_default();
            let value = value.trim().to_ascii_lowercase();
            match crate::ops::cuda::on_off(&value) {
                Some(on) => Ok(Some(on)),
                None if value.is_empty() || value == "auto" => Ok(None),
                None => Err(format!("{W4A16_PREFETCH_ENV}: unknown value {value:?} (expected auto, 1 or 0)")),
            }
        })
        .clone()
        .map_err(crate::Error::Request)
}

/// The setting's name for reports: `auto`, `on` or `off`.
pub fn w4a16_l2_prefetch_setting() -> crate::Result<&'static str> {
    Ok(match w4a16_l2_prefetch_forced()? {
        None => "auto",
        Some(true) => "on",
        Some(false) => "off",
    })
}

/// Whether the direct W4A16 kernel asks L2 for its next chunk set ahead, for an `m x k` by `k x n` product: the
/// forced setting, else on except for m > 8 on the largest matrices (n k >= 2^27). Measured on an H100 (2026-11-27,
/// seventh session, `quant_throughput`, direct kernel, us per call with / without): at m = 1 it moved the 1B and
/// 90B shapes by -4% to +12% (90B down 65.3 / 74.4, 1B gate_up 13.8 / 13.2); at m = 16 it won 1-8% on the 1B shapes
/// and cost 1.4-1.5x on the 90B ones (gate_up 185 / 128, down 123 / 89); at m = 64 it was even on the 1B shapes and
/// cost up to 1.7x on the 90B ones (down 441 / 265). End to end, 1B W4A16 decode at batch 16 took 1.358 ms/step
/// with it and 1.435 without.
pub fn w4a16_l2_prefetch_for(m: usize, n: usize, k: usize) -> crate::Result<bool> {
    Ok(w4a16_l2_prefetch_forced()?.unwrap_or(m <= 8 || n.saturating_mul(k) < 1 << 27))
}

/// The environment variable that switches off (`0`, `off`, `false`) or on (`1`, `on`, `true`; unset or empty: on)
/// the weight loads that quantized kernels issue before they wait for the previous kernel: the direct W4A16 kernels
/// ask L2 for each warp's first two chunk sets (4 KB of weights, and their scales and zero points), and the W4A8 mma
/// kernel and the large-m W4A16 kernels (`wgmma`, and `wgmma-row`, Hopper's default at 33-64 rows) copy their first
/// two stages' weights, scales and zero points into shared memory.
/// Under programmatic dependent launch those bytes arrive while the previous kernel finishes, as the first bytes of
/// the bf16 skinny GEMM and the pipelined, tiled and bulk W4A16 kernels do. The kernels' checked entries drop it
/// where PDL does not apply (switched off, or not Hopper), where it could only cost. No kernel of a step writes weights, so the bits
/// are the same either way. Added in the twentieth session without a GPU: not yet timed (the `prewait` stage of
/// `scripts/gpu-suite.sh` runs the A/B). Read once per process.
pub const QUANT_PREWAIT_ENV: &str = "LLAMA32_QUANT_PREWAIT";

/// Whether the quantized kernels issue their first weight loads before waiting ([`QUANT_PREWAIT_ENV`],
/// default on); a value it does not know is an error naming the variable.
pub fn quant_prewait() -> crate::Result<bool> {
    static VALUE: std::sync::OnceLock<std::result::Result<bool, String>> = std::sync::OnceLock::new();
    // Nothing to apply in the kernels library: each launch passes the setting in its parameters.
    let expected = "1, on, true, 0, off or false";
    super::switch_from_env(&VALUE, QUANT_PREWAIT_ENV, expected, super::on_unless_off, |_| {})
}

/// The environment variable that runs the bulk W4A16 kernel in a measurement variant (0 to 3; default 0, the
/// product): bit 0 streams the weights through its ring without arithmetic and writes no output (the copy path's
/// rate alone; results are garbage), bit 1 drops its copies' L2 evict-first hint (same bits). Read once per process.
pub const W4A16_BULK_VARIANT_ENV: &str = "LLAMA32_W4A16_BULK_VARIANT";

/// [`W4A16_BULK_VARIANT_ENV`]'s value (default 0); an error names a bad value.
pub fn w4a16_bulk_variant() -> crate::Result<usize> {
    static VARIANT: crate::ops::cuda::EnvCount = crate::ops::cuda::EnvCount::new(W4A16_BULK_VARIANT_ENV, 0, 0..=3);
    VARIANT.get()
}

/// The environment variable that sets the tiled W4A16 kernel's ring of shared-memory stage buffers: 2 (the
/// default, the kernel as measured: one stage in flight while the other is computed), 3 or 4 (two or three in
/// flight, one barrier per stage). At m = 64 on the 90B shapes the tiled kernel keeps only 8 KB of weights in
/// flight per block (two blocks per SM), which bounds it to about 0.7 TB/s at a microsecond or two of loaded
/// latency; a deeper ring was the A/B for that, and it bought nothing: on an H200 (2026-11-28) 3 and 4 stages were
/// within 1% of 2 at m = 64 and 1-24% slower at m = 1 and 16, so the limit is elsewhere. The kernel lowers it to
/// what fits the device's shared memory per block. The same bits at every depth. Read once per process.
pub const W4A16_TILED_STAGES_ENV: &str = "LLAMA32_W4A16_TILED_STAGES";

/// The tiled W4A16 kernel's ring depth ([`W4A16_TILED_STAGES_ENV`], default 2; [`set_w4a16_tiled_stages`]).
static TILED_STAGES: crate::ops::cuda::EnvCount = crate::ops::cuda::EnvCount::new(W4A16_TILED_STAGES_ENV, 2, 2..=4);

/// The tiled W4A16 kernel's ring depth in force: [`set_w4a16_tiled_stages`]'s, else [`W4A16_TILED_STAGES_ENV`]'s
/// (default 2); an error names a bad value of the variable.
pub fn w4a16_tiled_stages() -> crate::Result<usize> {
    TILED_STAGES.get()
}

/// Sets the tiled W4A16 kernel's ring depth (2 to 4) for every later launch, process-wide, over the variable's;
/// `None` goes back to the variable's. Launches already captured in a CUDA graph keep theirs.
pub fn set_w4a16_tiled_stages(stages: Option<usize>) -> crate::Result<()> {
    if TILED_STAGES.set(stages) {
        return Ok(());
    }
    // Only a depth outside the range is refused.
    let s = stages.unwrap_or_default();
    Err(crate::Error::Request(format!("tiled W4A16 stages: {s} is not in 2..=4")))
}

/// The most rows of x the bulk kernel takes.
pub const BULK_MAX_M: usize = 16;

/// True when the current device runs the bulk W4A16 kernel: this build holds sm_90a SASS and the device has compute
/// capability 9.x (cached per device in the library).
#[cfg(llama32_cuda)]
pub fn bulk_available() -> bool {
    // SAFETY: no arguments; reads the current device's compute capability (cached per device).
    unsafe { super::ffi::l32_w4a16_bulk_available() != 0 }
}

/// True when the current device runs the bulk W4A16 kernel: never in a build without CUDA.
#[cfg(not(llama32_cuda))]
pub fn bulk_available() -> bool {
    false
}

/// Rows padded to a multiple of 16.
pub fn padded_n(n: usize) -> usize {
    n.div_ceil(TILE_N) * TILE_N
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w4a16_kernel_for_shape_follows_the_measurements() {
        use W4A16Kernel::{Bulk, Direct, DirectBatched, Pipelined, Tiled};
        // (m, n, k, kernel) off Hopper: the measured winners of 2026-11-27 (H200, then H100), at the 1B / 11B / 90B
        // projections, before direct-batched.
        let cases = [
            (1, 2048, 8192, Pipelined),  // 1B down
            (1, 4096, 14336, Pipelined), // 11B down
            (1, 8192, 28672, Pipelined), // 90B down
            (8, 8192, 28672, Pipelined), // the same 8-token tile
            (1, 57344, 8192, Direct),    // 90B gate_up
            (1, 16384, 2048, Direct),    // 1B gate_up
            (1, 3072, 2048, Direct),     // 1B qkv
            (9, 8192, 28672, Direct),    // 8 < m <= 32: direct
            (16, 8192, 28672, Direct),   //
            (32, 57344, 8192, Direct),   //
            (64, 57344, 8192, Tiled),    // 90B gate_up
            (33, 8192, 28672, Tiled),    // 90B down
            (64, 28672, 4096, Tiled),    // 11B gate_up
            (64, 16384, 2048, Direct),   // 1B gate_up: too small
            (64, 4096, 14336, Direct),   // 11B down
        ];
        for (m, n, k, want) in cases {
            assert_eq!(W4A16Kernel::pick(m, n, k, false), want, "m {m} n {n} k {k}");
        }
        // On Hopper: the H100 winners of 2026-11-27 (eighth session) and the H200 ones of 2026-11-28.
        let hopper = [
            (1, 2048, 8192, DirectBatched),  // 1B down
            (1, 3072, 2048, DirectBatched),  // 1B qkv
            (8, 8192, 28672, DirectBatched), // the same 8-token tile
            (1, 57344, 8192, DirectBatched), // 90B gate_up: direct-batched beat bulk at m <= 8 (H200, -28)
            (8, 57344, 8192, DirectBatched), //
            (9, 57344, 8192, Direct),        // not down-like: no bulk
            (16, 57344, 8192, Direct),       // 90B gate_up at m = 16: direct
            (1, 8192, 28672, DirectBatched), // 90B down
            (16, 8192, 28672, Bulk),         //
            (17, 8192, 28672, Direct),       // past the bulk kernel's rows
            (64, 8192, 28672, Tiled),        //
            (1, 28672, 4096, DirectBatched), // 11B gate_up
            (12, 28672, 4096, Direct),       // 11B gate_up: too small for bulk
            (1, 4096, 14336, DirectBatched), // 11B down
            (1, 16384, 2048, DirectBatched), // 1B gate_up
        ];
        for (m, n, k, want) in hopper {
            assert_eq!(W4A16Kernel::pick(m, n, k, true), want, "hopper: m {m} n {n} k {k}");
        }
    }

    #[test]
    fn w4a16_tiled_stages_are_set_and_checked() {
        if std::env::var_os(W4A16_TILED_STAGES_ENV).is_some() {
            eprintln!("skipped: {W4A16_TILED_STAGES_ENV} is set");
            return;
        }
        // Only this test sets the depth (the GPU test resets it after itself, in its own binary).
        assert_eq!(w4a16_tiled_stages().unwrap(), 2, "the measured default");
        for bad in [0, 1, 5] {
            let e = set_w4a16_tiled_stages(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("tiled W4A16 stages") && e.contains(&bad.to_string()), "{e}");
            assert_eq!(w4a16_tiled_stages().unwrap(), 2, "a refused depth changes nothing");
        }
        for depth in [3, 4, 2] {
            set_w4a16_tiled_stages(Some(depth)).unwrap();
            assert_eq!(w4a16_tiled_stages().unwrap(), depth);
        }
        set_w4a16_tiled_stages(Some(4)).unwrap();
        set_w4a16_tiled_stages(None).unwrap();
        assert_eq!(w4a16_tiled_stages().unwrap(), 2, "None goes back to the variable's");
    }

    #[test]
    fn quant_prewait_is_on_unless_switched_off() {
        match std::env::var(QUANT_PREWAIT_ENV) {
            Ok(v) if !v.trim().is_empty() => eprintln!("skipped: {QUANT_PREWAIT_ENV} is set"),
            _ => assert!(quant_prewait().unwrap(), "on by default"),
        }
    }

    #[test]
    fn w4a16_prefetch_follows_the_measurements() {
        if w4a16_l2_prefetch_forced().unwrap().is_some() {
            eprintln!("skipped: {W4A16_PREFETCH_ENV} is set");
            return;
        }
        // (m, n, k, prefetch): the faster choice per shape on the H100 (2026-11-27).
        let cases = [
            (1, 3072, 2048, true),    // 1B qkv
            (1, 8192, 28672, true),   // 90B down
            (1, 57344, 8192, true),   // 90B gate_up (even)
            (8, 57344, 8192, true),   // the same 8-token tile
            (16, 3072, 2048, true),   // 1B qkv
            (16, 2048, 8192, true),   // 1B down
            (16, 28672, 4096, true),  // 11B gate_up (end to end: batch 16 decode)
            (16, 57344, 8192, false), // 90B gate_up
            (9, 8192, 28672, false),  // 90B down
            (64, 8192, 28672, false), // 90B down
        ];
        for (m, n, k, want) in cases {
            assert_eq!(w4a16_l2_prefetch_for(m, n, k).unwrap(), want, "m {m} n {n} k {k}");
        }
    }

    #[test]
    fn w4a16_kernel_names_round_trip_and_bad_names_are_refused() {
        for kernel in W4A16Kernel::ALL {
            assert_eq!(W4A16Kernel::parse(kernel.name()).unwrap(), Some(kernel));
        }
        assert_eq!(W4A16Kernel::parse(" pipelined\n").unwrap(), Some(W4A16Kernel::Pipelined));
        assert_eq!(W4A16Kernel::parse("auto").unwrap(), None);
        let e = W4A16Kernel::parse("marlin").unwrap_err().to_string();
        assert!(e.contains(W4A16Kernel::ENV) && e.contains("marlin"), "{e}");
        // Block rows: 64, except the pipelined kernel's two-tile warps at 8 < m <= 32 and the tiled kernel's.
        for m in [1, 8, 9, 32, 33, 64] {
            assert_eq!(W4A16Kernel::Direct.block_rows(m), 64);
            let want = if (9..=32).contains(&m) { 128 } else { 64 };
            assert_eq!(W4A16Kernel::Pipelined.block_rows(m), want, "m {m}");
            assert_eq!(W4A16Kernel::Tiled.block_rows(m), 128, "m {m}");
        }
    }

    #[test]
    fn w4a8_kernel_names_round_trip_and_bad_names_are_refused() {
        for kernel in W4A8Kernel::ALL {
            assert_eq!(W4A8Kernel::parse(kernel.name()).unwrap(), Some(kernel));
            assert_eq!(kernel.is_wgmma(), kernel != W4A8Kernel::Mma);
        }
        assert_eq!(W4A8Kernel::parse(" wgmma-serial ").unwrap(), Some(W4A8Kernel::WgmmaSerial));
        assert_eq!(W4A8Kernel::parse("auto").unwrap(), None);
        let e = W4A8Kernel::parse("wgmma2").unwrap_err().to_string();
        assert!(e.contains(W4A8Kernel::ENV) && e.contains("wgmma2") && e.contains("`wgmma-serial`"), "{e}");
    }

    #[test]
    fn w4a8_auto_takes_the_kernel_measured_fastest_at_each_m() {
        let cases = [(1, W4A8Kernel::Mma), (8, W4A8Kernel::Mma), (16, W4A8Kernel::Mma), (32, W4A8Kernel::Mma)]
            .into_iter()
            .chain([33, 48, 64, 65, 128, 255].map(|m| (m, W4A8Kernel::WgmmaWs)))
            .chain([256, 1024, 8192].map(|m| (m, W4A8Kernel::WgmmaRow)));
        for (m, want) in cases {
            assert_eq!(W4A8Kernel::auto_for(true, m), want, "m {m}");
            // Where the wgmma kernel cannot run (another device, or weights with zero points): always mma.
            assert_eq!(W4A8Kernel::auto_for(false, m), W4A8Kernel::Mma, "m {m}");
        }
    }
}
