//! The kernel launches: the checked calls as device pointers ([`GemmLaunch`], [`ActQuantLaunch`]), the FFI calls
//! of a CUDA build, and the stubs of a build without CUDA (which return the "built without CUDA" error).

use cudarc::driver::CudaStream;

#[cfg(llama32_cuda)]
use crate::ops::cuda::switch::KernelSwitch;
use crate::Result;

/// One checked GEMM or dequantization call, as device pointers (0 = NULL) and sizes.
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
pub(super) struct GemmLaunch {
    pub(super) out: u64,
    pub(super) x: u64,
    pub(super) x_scales: u64,
    pub(super) x_zeros: u64,
    pub(super) qweight: u64,
    pub(super) scales: u64,
    pub(super) zeros: u64,
    pub(super) row_corr: u64,
    pub(super) partials: u64,
    pub(super) counters: u64,
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) splits: usize,
    /// W4A8: tokens per block. W4A16: 0 for the decode kernels; nonzero runs the large-m Hopper kernel with this
    /// many tokens per block.
    pub(super) tile_m: usize,
    /// W4A16 large-m kernel (`tile_m` nonzero): the natural-order variant (`L32_W4A16_WGMMA_ROW`).
    pub(super) large_row: bool,
    /// The W4A16 decode kernel (ignored by the W4A8 GEMM, the dequantization and the large-m kernel).
    pub(super) kernel: super::W4A16Kernel,
    /// W4A16: the paired layout's half (`CudaQuantLinear::pair_half`), 0 for the plain layout.
    pub(super) pair_half: usize,
    /// W4A16 decode GEMM with a paired layout: write `silu(gate) * up` (`[m, pair_half]`).
    pub(super) silu: bool,
}

/// One checked activation quantization call (op: 0 rows, 1 rms_norm, 2 add_rms_norm, 3 silu_mul).
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
pub(super) struct ActQuantLaunch {
    pub(super) q: u64,
    pub(super) scales: u64,
    pub(super) zeros: u64,
    pub(super) out: u64,
    pub(super) x: u64,
    pub(super) residual: u64,
    pub(super) weight: u64,
    pub(super) rows: usize,
    pub(super) hidden: usize,
    pub(super) eps: f32,
    pub(super) op: u32,
}

#[cfg(llama32_cuda)]
fn ptr<T>(p: u64) -> *mut T {
    p as *mut T
}

/// A checked W4A16 GEMM: a decode kernel (`l.kernel`, m <= 64, split-K), or with `l.tile_m` nonzero the Hopper
/// kernel for many rows (`L32_W4A16_WGMMA`, or `_ROW` with `l.large_row`; `l.tile_m` tokens per block, split-K).
#[cfg(llama32_cuda)]
pub(super) fn launch_w4a16(op: &str, stream: &CudaStream, l: &GemmLaunch) -> Result<()> {
    use super::super::ffi;
    let large = l.tile_m != 0;
    // All fit: m <= 64 (large: m < 2^30), n < 2^31 - 128, k <= 2^24, splits <= 65535 (checked by the callers and the
    // heuristics).
    let params = ffi::l32_w4a16_params {
        out: ptr(l.out),
        x: ptr(l.x),
        qweight: ptr(l.qweight),
        scales: ptr(l.scales),
        zeros: ptr(l.zeros),
        partials: ptr(l.partials),
        counters: ptr(l.counters),
        m: l.m as i64,
        n: l.n as i64,
        k: l.k as i64,
        splits: l.splits as i32,
        kernel: match l.kernel {
            _ if large && l.large_row => ffi::l32_w4a16_kernel::L32_W4A16_WGMMA_ROW,
            _ if large => ffi::l32_w4a16_kernel::L32_W4A16_WGMMA,
            super::W4A16Kernel::Direct => ffi::l32_w4a16_kernel::L32_W4A16_DIRECT,
            super::W4A16Kernel::Pipelined => ffi::l32_w4a16_kernel::L32_W4A16_PIPELINED,
            super::W4A16Kernel::Tiled => ffi::l32_w4a16_kernel::L32_W4A16_TILED,
            super::W4A16Kernel::Bulk => ffi::l32_w4a16_kernel::L32_W4A16_BULK,
            super::W4A16Kernel::DirectBatched => ffi::l32_w4a16_kernel::L32_W4A16_DIRECT_BATCHED,
        },
        l2_prefetch: i32::from(!large && super::w4a16_l2_prefetch_for(l.m, l.n, l.k)?),
        bulk_variant: if large { 0 } else { super::w4a16_bulk_variant()? as i32 },
        pair_half: l.pair_half as i64,
        silu: i32::from(l.silu),
        tile_m: l.tile_m as i32,
        tiled_stages: if !large && l.kernel == super::W4A16Kernel::Tiled {
            super::w4a16_tiled_stages()? as i32
        } else {
            0
        },
        prewait: i32::from(super::quant_prewait()?),
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::super::raw_stream(op, stream)?;
    // SAFETY: every pointer comes from a live device allocation on this stream's device, sized by the caller's
    // checks (x: m x k, out: m x n, the layout buffers of a CudaQuantLinear of n x k, the workspace by
    // w4a16_workspace, or large_workspace_for for the large kernel); the guards are held until after the launch.
    let status = unsafe { ffi::l32_w4a16_gemm(&params, raw) };
    super::super::check_launch(op, stream, status, || {
        let silu = if l.silu { ", SiLU * up" } else { "" };
        let kernel = match (large, l.large_row) {
            (true, true) => format!("wgmma-row kernel, tile_m {}", l.tile_m),
            (true, false) => format!("wgmma kernel, tile_m {}", l.tile_m),
            _ => format!("{} kernel", l.kernel.name()),
        };
        format!("{op} (m {}, n {}, k {}, splits {}, {kernel}{silu})", l.m, l.n, l.k, l.splits)
    })
}

#[cfg(llama32_cuda)]
pub(super) fn launch_dequant(op: &str, stream: &CudaStream, l: &GemmLaunch) -> Result<()> {
    use super::super::ffi;
    let params = ffi::l32_w4a16_dequant_params {
        out: ptr(l.out),
        qweight: ptr(l.qweight),
        scales: ptr(l.scales),
        zeros: ptr(l.zeros),
        n: l.n as i64,
        k: l.k as i64,
        pair_half: l.pair_half as i64,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::super::raw_stream(op, stream)?;
    // SAFETY: as in launch_w4a16; out holds n x k.
    let status = unsafe { ffi::l32_w4a16_dequant(&params, raw) };
    super::super::check_launch(op, stream, status, || format!("{op} (n {}, k {})", l.n, l.k))
}

#[cfg(llama32_cuda)]
pub(super) fn launch_w4a8(op: &str, stream: &CudaStream, l: &GemmLaunch, kernel: super::W4A8Kernel) -> Result<()> {
    use super::super::ffi;
    let params = ffi::l32_w4a8_params {
        out: ptr(l.out),
        xq: ptr(l.x),
        x_scales: ptr(l.x_scales),
        x_zeros: ptr(l.x_zeros),
        qweight: ptr(l.qweight),
        scales: ptr(l.scales),
        zeros: ptr(l.zeros),
        row_corr: ptr(l.row_corr),
        partials: ptr(l.partials),
        counters: ptr(l.counters),
        m: l.m as i64,
        n: l.n as i64,
        k: l.k as i64,
        splits: l.splits as i32,
        tile_m: l.tile_m as i32,
        kernel: match kernel {
            super::W4A8Kernel::Mma => ffi::l32_w4a8_kernel::L32_W4A8_MMA,
            super::W4A8Kernel::Wgmma => ffi::l32_w4a8_kernel::L32_W4A8_WGMMA,
            super::W4A8Kernel::WgmmaSerial => ffi::l32_w4a8_kernel::L32_W4A8_WGMMA_SERIAL,
            super::W4A8Kernel::WgmmaRow => ffi::l32_w4a8_kernel::L32_W4A8_WGMMA_ROW,
            super::W4A8Kernel::WgmmaWs => ffi::l32_w4a8_kernel::L32_W4A8_WGMMA_WS,
            super::W4A8Kernel::WgmmaTma => ffi::l32_w4a8_kernel::L32_W4A8_WGMMA_TMA,
            super::W4A8Kernel::WgmmaWsTma => ffi::l32_w4a8_kernel::L32_W4A8_WGMMA_WS_TMA,
        },
        prewait: i32::from(super::quant_prewait()?),
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::super::raw_stream(op, stream)?;
    // SAFETY: as in launch_w4a16; the int8 buffers hold m x k, the workspace w4a8_workspace_for(plan, m, n).
    let status = unsafe { ffi::l32_w4a8_gemm(&params, raw) };
    super::super::check_launch(op, stream, status, || {
        let name = kernel.name();
        format!("{op} ({name} kernel, m {}, n {}, k {}, tile_m {}, splits {})", l.m, l.n, l.k, l.tile_m, l.splits)
    })
}

#[cfg(llama32_cuda)]
pub(super) fn launch_act_quant(op: &str, stream: &CudaStream, l: &ActQuantLaunch) -> Result<()> {
    use super::super::ffi;
    let params = ffi::l32_act_quant_params {
        q: ptr(l.q),
        scales: ptr(l.scales),
        zeros: ptr(l.zeros),
        out: ptr(l.out),
        x: ptr(l.x),
        residual: ptr(l.residual),
        weight: ptr(l.weight),
        rows: l.rows as i64,
        hidden: l.hidden as i64,
        eps: l.eps,
        op: ffi::l32_act_quant_op(l.op),
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::super::raw_stream(op, stream)?;
    // SAFETY: act_quant checked every operand's length against rows x hidden (gate_up: 2x, weight: hidden) and
    // the int8 buffers' capacity; the guards are held until after the launch.
    let status = unsafe { ffi::l32_act_quant(&params, raw) };
    super::super::check_launch(op, stream, status, || {
        format!("{op} (op {}, rows {}, hidden {})", l.op, l.rows, l.hidden)
    })
}

#[cfg(not(llama32_cuda))]
pub(super) fn launch_w4a16(_op: &str, _stream: &CudaStream, _l: &GemmLaunch) -> Result<()> {
    super::super::ensure_built()
}

#[cfg(not(llama32_cuda))]
pub(super) fn launch_dequant(_op: &str, _stream: &CudaStream, _l: &GemmLaunch) -> Result<()> {
    super::super::ensure_built()
}

#[cfg(not(llama32_cuda))]
pub(super) fn launch_w4a8(_op: &str, _stream: &CudaStream, _l: &GemmLaunch, _kernel: super::W4A8Kernel) -> Result<()> {
    super::super::ensure_built()
}

#[cfg(not(llama32_cuda))]
pub(super) fn launch_act_quant(_op: &str, _stream: &CudaStream, _l: &ActQuantLaunch) -> Result<()> {
    super::super::ensure_built()
}
