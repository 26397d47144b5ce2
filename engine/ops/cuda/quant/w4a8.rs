//! The W4A8 path: int8 per-token activations ([`QuantActs`], quantized by [`act_quant`] from an [`ActSource`],
//! alone or fused) and the int8 GEMM [`w4a8_gemm`].

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, SyncOnDrop};
use half::bf16;

use super::launch::{launch_act_quant, launch_w4a8, ActQuantLaunch, GemmLaunch};
use super::{w4a8_plan, w4a8_workspace_for, CudaQuantLinear, SplitKWorkspace, W4A8Plan};
use crate::ops::cuda::switch::KernelSwitch;
use crate::{Error, Result};

/// Which W4A8 kernel [`w4a8_gemm`] runs. Both compute torchao's 8da4w product with exact s32 group sums; they
/// differ in how the f32 sum of the scaled group terms is rounded (see [`W4A8Kernel::Wgmma`]). The environment
/// variable [`W4A8Kernel::ENV`] (`auto`, `mma`, `wgmma`, `wgmma-serial`, `wgmma-row`, `wgmma-ws`, `wgmma-tma`,
/// `wgmma-ws-tma`) forces one where it
/// runs; `auto` takes [`W4A8Kernel::Mma`] up to [`WGMMA_MIN_M`] rows (its decode tiles), then where the Hopper kernels
/// run [`W4A8Kernel::WgmmaWs`] below [`ROW_AUTO_MIN_M`] rows and [`W4A8Kernel::WgmmaRow`] (64-token tiles) from
/// there (measured on an H200, 2026-11-28: `bench/results/2026-11-28-h200-fresh-kernels.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum W4A8Kernel {
    /// `mma.sync m16n8k32 s8` (`kernels/quant/w4a8.cu`), every device; decode tiles of 8, 16 or 32 tokens and a
    /// 128-token prefill tile; weights with or without zero points; two ALU ops per output and group.
    Mma,
    /// Hopper's `wgmma m64nNk32 s8` (`kernels/quant/w4a8_sm90.cu`, compute capability 9.x with sm_90a SASS,
    /// [`wgmma_available`]), symmetric weights only, 64- or 128-token tiles: one FFMA per output and group through
    /// a segmented, telescoped sum whose f32 roundings differ from the mma kernel's (about sw / 16 per group at
    /// most); CPU twin of its bits: [`crate::ops::cpu::w4a8_segmented::w4a8_segmented`]. Each group's product is
    /// two wgmma over the token halves, and one half's FFMAs run while the other half's product computes.
    Wgmma,
    /// [`W4A8Kernel::Wgmma`] with each product waited for before its FFMAs (one wgmma per group): the same bits.
    /// Measured on an H100 (2026-11-28) equal to or 0-4% faster than the overlap at m >= 256.
    WgmmaSerial,
    /// [`W4A8Kernel::WgmmaSerial`] with the activations copied in natural k order (two 16-byte copies per thread
    /// and chunk instead of eight 4-byte ones) and each lane's A fragments composed from the words of its quad's
    /// lanes: the same bits. Always 64-token tiles ([`super::w4a8_plan`]: two blocks per SM), which an H200 measured
    /// 2-12% faster than the ws kernel at m = 256 and 1024 on seven of the eight 11B / 90B rows (2026-11-28), so
    /// `auto` takes it from [`ROW_AUTO_MIN_M`] rows.
    WgmmaRow,
    /// [`W4A8Kernel::WgmmaRow`]'s products, warp-specialized: a producer warpgroup copies each chunk into an
    /// mbarrier ring and the two consumer warpgroups run without a block barrier per chunk (384 threads, one block
    /// per SM): the same bits. `auto` takes it above [`WGMMA_MIN_M`] and below [`ROW_AUTO_MIN_M`] rows: 1B W4A8 at
    /// batch 64 (m = 64) decoded in 3.10 ms a step with it against 3.49 (row), 3.66 (wgmma) and 4.40 (mma) on an
    /// H200 (2026-11-28).
    WgmmaWs,
    /// [`W4A8Kernel::WgmmaRow`]'s products fed by the TMA unit: one thread issues each chunk's activations
    /// (64-byte-swizzled rows), weights and scales as three tensor-map boxes completing on an mbarrier, instead of
    /// every thread's cp.async; the same bits. The row kernel is bound by issue slots: by the sm_90a SASS its chunk
    /// loop drops from about 210 to about 150 instructions per warp and chunk (twenty-first session; not yet run on
    /// a GPU, so `auto` never takes it).
    WgmmaTma,
    /// [`W4A8Kernel::WgmmaWs`] with [`W4A8Kernel::WgmmaTma`]'s copies: one producer thread instead of a producer
    /// warpgroup of cp.async; the same bits. Not yet run on a GPU.
    WgmmaWsTma,
}

impl KernelSwitch for W4A8Kernel {
    /// `auto` (the default), `mma`, `wgmma`, `wgmma-serial`, `wgmma-row`, `wgmma-ws`, `wgmma-tma` or `wgmma-ws-tma`.
    const ENV: &'static str = "LLAMA32_W4A8_KERNEL";
    const WHAT: &'static str = "W4A8 kernel";
    const KERNELS: &'static [Self] = &W4A8Kernel::ALL;

    fn name(self) -> &'static str {
        match self {
            W4A8Kernel::Mma => "mma",
            W4A8Kernel::Wgmma => "wgmma",
            W4A8Kernel::WgmmaSerial => "wgmma-serial",
            W4A8Kernel::WgmmaRow => "wgmma-row",
            W4A8Kernel::WgmmaWs => "wgmma-ws",
            W4A8Kernel::WgmmaTma => "wgmma-tma",
            W4A8Kernel::WgmmaWsTma => "wgmma-ws-tma",
        }
    }

    fn env_cell() -> &'static std::sync::OnceLock<Option<String>> {
        static VALUE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        &VALUE
    }
}

impl W4A8Kernel {
    /// Every kernel.
    pub const ALL: [W4A8Kernel; 7] = [
        W4A8Kernel::Mma,
        W4A8Kernel::Wgmma,
        W4A8Kernel::WgmmaSerial,
        W4A8Kernel::WgmmaRow,
        W4A8Kernel::WgmmaWs,
        W4A8Kernel::WgmmaTma,
        W4A8Kernel::WgmmaWsTma,
    ];

    /// True for the kernels fed by tensor-map copies ([`W4A8Kernel::WgmmaTma`], [`W4A8Kernel::WgmmaWsTma`]): not yet
    /// run on a GPU, so the benches of the other kernels leave them out.
    pub fn is_tma(self) -> bool {
        matches!(self, W4A8Kernel::WgmmaTma | W4A8Kernel::WgmmaWsTma)
    }

    /// True for the Hopper kernels (every kernel but [`W4A8Kernel::Mma`]).
    pub fn is_wgmma(self) -> bool {
        self != W4A8Kernel::Mma
    }

    /// Whether the kernel takes `w` on the current device (wgmma: symmetric weights where [`wgmma_available`]).
    pub fn runs(self, w: &CudaQuantLinear) -> bool {
        !self.is_wgmma() || (w.zeros.is_none() && wgmma_available())
    }

    /// The kernel [`w4a8_gemm`] runs for `m` rows through `w`: the forced one where it runs, else (and for
    /// `auto`) [`W4A8Kernel::auto`]. A forced wgmma kernel applies above [`WGMMA_MIN_M`] rows only: below, the mma
    /// kernel's decode tiles (8, 16, 32 tokens) stream the weights without the wgmma kernels' 64-token padding. An
    /// error names a bad value of [`W4A8Kernel::ENV`].
    pub fn configured(w: &CudaQuantLinear, m: usize) -> Result<Self> {
        let applies = |k: &W4A8Kernel| k.runs(w) && (!k.is_wgmma() || m > WGMMA_MIN_M);
        Ok(Self::forced()?.filter(applies).unwrap_or_else(|| Self::auto(w, m)))
    }

    /// The default for `m` rows through `w` where the Hopper kernels run on it: [`W4A8Kernel::Mma`] up to
    /// [`WGMMA_MIN_M`] rows, [`W4A8Kernel::WgmmaWs`] below [`ROW_AUTO_MIN_M`], [`W4A8Kernel::WgmmaRow`] from there;
    /// elsewhere [`W4A8Kernel::Mma`].
    pub fn auto(w: &CudaQuantLinear, m: usize) -> Self {
        Self::auto_for(W4A8Kernel::Wgmma.runs(w), m)
    }

    /// [`W4A8Kernel::auto`] given whether the wgmma kernel runs on `w` here.
    pub fn auto_for(wgmma_runs: bool, m: usize) -> Self {
        match m {
            _ if !wgmma_runs || m <= WGMMA_MIN_M => W4A8Kernel::Mma,
            _ if m < ROW_AUTO_MIN_M => W4A8Kernel::WgmmaWs,
            _ => W4A8Kernel::WgmmaRow,
        }
    }
}

/// Rows at and below which [`W4A8Kernel::configured`] keeps the mma kernel (its decode tiles) even when a wgmma
/// kernel is forced.
pub const WGMMA_MIN_M: usize = 32;

/// Rows from which `auto` takes [`W4A8Kernel::WgmmaRow`] instead of [`W4A8Kernel::WgmmaWs`]. Measured on an H200
/// (2026-11-28, criterion, 11B / 90B gate_up and down): at m = 256 and 1024 the row kernel with 64-token tiles beat
/// the ws kernel by 2-12% on seven of eight rows (the ws kernel won 11B down at m = 256: 114 against 139 us), and
/// both beat the mma kernel by 1.3-1.8x; at m = 64 (1B decode at batch 64) the ws kernel took 11% less time per
/// step. Between 65 and 255 rows nothing was measured.
pub const ROW_AUTO_MIN_M: usize = 256;

/// True when the current device runs the wgmma W4A8 kernels: this build holds sm_90a SASS and the device has
/// compute capability 9.x (cached per device in the library).
#[cfg(llama32_cuda)]
pub fn wgmma_available() -> bool {
    // SAFETY: no arguments; reads the current device's compute capability (cached per device).
    unsafe { super::super::ffi::l32_w4a8_wgmma_available() != 0 }
}

/// True when the current device runs the wgmma W4A8 kernels: never in a build without CUDA.
#[cfg(not(llama32_cuda))]
pub fn wgmma_available() -> bool {
    false
}

/// Int8 activations with their per-row scales and zero points, the output of [`act_quant`] and the input of
/// [`w4a8_gemm`]. Rows are `k` long and contiguous; the buffers hold up to `rows` rows of up to `k` columns.
pub struct QuantActs {
    /// `[rows, k]` int8.
    pub q: CudaSlice<i8>,
    /// `[rows]` f32 scales.
    pub scales: CudaSlice<f32>,
    /// `[rows]` i32 zero points.
    pub zeros: CudaSlice<i32>,
}

impl QuantActs {
    /// Buffers for `rows` rows of up to `k` columns.
    pub fn new(stream: &Arc<CudaStream>, rows: usize, k: usize) -> Result<Self> {
        let err = |e: cudarc::driver::DriverError| Error::Backend(format!("allocate int8 activations: {e}"));
        Ok(QuantActs {
            q: stream.alloc_zeros::<i8>((rows * k).max(1)).map_err(err)?,
            scales: stream.alloc_zeros::<f32>(rows.max(1)).map_err(err)?,
            zeros: stream.alloc_zeros::<i32>(rows.max(1)).map_err(err)?,
        })
    }

    /// True when the buffers hold `rows` rows of `k` columns.
    pub fn holds(&self, rows: usize, k: usize) -> bool {
        self.q.len() >= rows * k && self.scales.len() >= rows && self.zeros.len() >= rows
    }
}

/// What [`act_quant`] quantizes: a row as it is, or the output of the kernel it is fused into.
pub enum ActSource<'a> {
    /// `[rows, hidden]` bf16 rows.
    Rows(CudaView<'a, bf16>),
    /// `rms_norm(x)` with `weight` `[hidden]` (the values of [`super::super::norm::rms_norm`]).
    RmsNorm {
        /// `[rows, hidden]`.
        x: CudaView<'a, bf16>,
        /// `[hidden]`.
        weight: CudaView<'a, bf16>,
        /// `>= 0`.
        eps: f32,
    },
    /// `residual += delta; rms_norm(residual)` (the values of [`super::super::norm::add_rms_norm`]; `residual`
    /// updated).
    AddRmsNorm {
        /// `[rows, hidden]`, read and written.
        residual: CudaViewMut<'a, bf16>,
        /// `[rows, hidden]`.
        delta: CudaView<'a, bf16>,
        /// `[hidden]`.
        weight: CudaView<'a, bf16>,
        /// `>= 0`.
        eps: f32,
    },
    /// `silu(gate) * up` of a fused `[rows, 2 * hidden]` input (the values of [`super::super::activation::silu_mul`]).
    SiluMul(CudaView<'a, bf16>),
}

/// Quantizes `rows` rows of `hidden` values from `src` into `acts` (per-token asymmetric int8, torchao numerics;
/// bit-identical to `quantize_activations` on the bf16 values). When `out` is given, the bf16 values are also
/// written there (`[rows, hidden]`). `hidden` must be a multiple of 8.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn act_quant(
    stream: &CudaStream,
    src: ActSource<'_>,
    rows: usize,
    hidden: usize,
    acts: &mut QuantActs,
    out: Option<&mut CudaViewMut<'_, bf16>>,
) -> Result<()> {
    const OP: &str = "act_quant";
    super::super::ensure_built()?;
    let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
    if hidden == 0 || !hidden.is_multiple_of(8) || hidden > 1 << 30 {
        return fail(format!("hidden is {hidden}, must be a positive multiple of 8 up to 2^30"));
    }
    if rows > i32::MAX as usize {
        return fail(format!("{rows} rows, at most 2^31-1 are supported"));
    }
    if !acts.holds(rows, hidden) {
        return fail(format!("the int8 buffers hold fewer than {rows} rows x {hidden}"));
    }
    let len = rows * hidden;
    let need = |name: &str, have: usize, want: usize| {
        if have >= want {
            Ok(())
        } else {
            fail(format!("`{name}` has {have} elements, needs at least {want}"))
        }
    };
    if let Some(o) = &out {
        need("out", o.len(), len)?;
    }
    let (op, eps) = match &src {
        ActSource::Rows(x) => {
            need("x", x.len(), len)?;
            (0, 0.0)
        }
        ActSource::RmsNorm { x, weight, eps } => {
            need("x", x.len(), len)?;
            need("weight", weight.len(), hidden)?;
            (1, *eps)
        }
        ActSource::AddRmsNorm { residual, delta, weight, eps } => {
            need("residual", residual.len(), len)?;
            need("delta", delta.len(), len)?;
            need("weight", weight.len(), hidden)?;
            (2, *eps)
        }
        ActSource::SiluMul(gate_up) => {
            need("gate_up", gate_up.len(), 2 * len)?;
            (3, 0.0)
        }
    };
    if !(eps >= 0.0 && eps.is_finite()) {
        return fail(format!("eps is {eps}, must be finite and >= 0"));
    }
    let mut src = src;
    let (q, _q) = acts.q.device_ptr_mut(stream);
    let (scales, _s) = acts.scales.device_ptr_mut(stream);
    let (zeros, _z) = acts.zeros.device_ptr_mut(stream);
    let out_ptr = out.map(|o| o.device_ptr_mut(stream));
    // The stream guards of the inputs, held until after the launch.
    let mut guards: Vec<SyncOnDrop<'_>> = Vec::with_capacity(3);
    let mut take = |(p, g)| {
        guards.push(g);
        p
    };
    let (x, residual, weight) = match &mut src {
        ActSource::Rows(x) => (take(x.device_ptr(stream)), 0, 0),
        ActSource::RmsNorm { x, weight, .. } => (take(x.device_ptr(stream)), 0, take(weight.device_ptr(stream))),
        ActSource::AddRmsNorm { residual, delta, weight, .. } => {
            (take(delta.device_ptr(stream)), take(residual.device_ptr_mut(stream)), take(weight.device_ptr(stream)))
        }
        ActSource::SiluMul(gate_up) => (take(gate_up.device_ptr(stream)), 0, 0),
    };
    let l = ActQuantLaunch {
        q,
        scales,
        zeros,
        out: out_ptr.as_ref().map_or(0, |(p, _)| *p),
        x,
        residual,
        weight,
        rows,
        hidden,
        eps,
        op,
    };
    launch_act_quant(OP, stream, &l)
}

/// `out[m, n]` = the W4A8 product of the int8 rows in `acts` (from [`act_quant`]) and `w` (see the module docs),
/// using `ws` for split-K.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn w4a8_gemm(
    stream: &CudaStream,
    acts: &QuantActs,
    w: &CudaQuantLinear,
    m: usize,
    ws: &mut SplitKWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    let plan = w4a8_plan(W4A8Kernel::configured(w, m)?, m, w.n, w.k, ws.sms);
    w4a8_gemm_with(stream, acts, w, m, ws, out, plan)
}

/// [`w4a8_gemm`] with an explicit launch plan (kernel, token tile, K splits), as the GPU tests and benches choose
/// it: the mma kernel takes tiles of 8, 16, 32 or 128 tokens, the wgmma kernel 64 or 128 (and only where
/// [`W4A8Kernel::runs`]); splits are `1..=k / 64`, and `ws` must hold [`w4a8_workspace_for`] of the plan.
pub fn w4a8_gemm_with(
    stream: &CudaStream,
    acts: &QuantActs,
    w: &CudaQuantLinear,
    m: usize,
    ws: &mut SplitKWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    plan: W4A8Plan,
) -> Result<()> {
    const OP: &str = "w4a8_gemm";
    super::super::ensure_built()?;
    let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
    if !w.is_w4a8() {
        return fail("the weight is W4A16 (use w4a16_gemm)".into());
    }
    let (n, k) = (w.n, w.k);
    if m > (1 << 30) - 1 {
        return fail(format!("m is {m}, at most 2^30 - 1"));
    }
    if !acts.holds(m, k) {
        return fail(format!("the int8 activations hold fewer than {m} rows x {k}"));
    }
    if out.len() < m * n {
        return fail(format!("`out` has {} elements, needs at least {m} x {n}", out.len()));
    }
    super::super::check_same_device(
        OP,
        stream,
        &[("acts", acts.q.stream()), ("out", out.stream()), ("w", w.qweight.stream())],
    )?;
    if !plan.kernel.runs(w) {
        let why = if w.zeros.is_some() { "the weight has zero points" } else { "this device or build lacks it" };
        return fail(format!("the {} kernel does not run here: {why}", plan.kernel.name()));
    }
    let tiles: &[usize] = if plan.kernel.is_wgmma() { &[64, 128] } else { &[8, 16, 32, 128] };
    if !tiles.contains(&plan.tile_m) {
        return fail(format!("tile_m is {}; the {} kernel takes {tiles:?}", plan.tile_m, plan.kernel.name()));
    }
    if plan.splits == 0 || plan.splits > k / 64 {
        return fail(format!("splits is {}, must be in 1..={}", plan.splits, k / 64));
    }
    if n == 0 || m == 0 {
        return Ok(());
    }
    let need = w4a8_workspace_for(plan, m, n);
    if !ws.holds(need) {
        return fail(format!("the split-K workspace holds fewer than {} partials / {} counters", need.0, need.1));
    }
    let row_corr = w.row_corr.as_ref().ok_or_else(|| Error::Backend(format!("{OP}: no row constants")))?;
    let (xq, _x) = acts.q.device_ptr(stream);
    let (x_scales, _xs) = acts.scales.device_ptr(stream);
    let (x_zeros, _xz) = acts.zeros.device_ptr(stream);
    let (qweight, _q) = w.qweight.device_ptr(stream);
    let (scales, _s) = w.scales.device_ptr(stream);
    let zeros = w.zeros.as_ref().map(|z| z.device_ptr(stream));
    let (row_corr, _r) = row_corr.device_ptr(stream);
    let (partials, _p) = ws.partials.device_ptr_mut(stream);
    let (counters, _c) = ws.counters.device_ptr_mut(stream);
    let (outp, _o) = out.device_ptr_mut(stream);
    let l = GemmLaunch {
        out: outp,
        x: xq,
        x_scales,
        x_zeros,
        qweight,
        scales,
        zeros: zeros.as_ref().map_or(0, |(p, _)| *p),
        row_corr,
        partials,
        counters,
        m,
        n,
        k,
        splits: plan.splits,
        tile_m: plan.tile_m,
        large_row: false,
        kernel: super::W4A16Kernel::Direct,
        pair_half: 0,
        silu: false,
    };
    launch_w4a8(OP, stream, &l, plan.kernel)
}
