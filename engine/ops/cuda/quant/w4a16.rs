//! The W4A16 wrappers: [`w4a16_gemm`] / [`w4a16_gemm_with`] (decode, m <= 64), [`w4a16_gemm_silu`] /
//! [`w4a16_gemm_silu_with`] (the same with SwiGLU applied as the kernel writes, for a paired `[gate; up]` weight)
//! and [`w4a16_dequant`] (bf16 weights for cuBLASLt).

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::launch::{launch_dequant, launch_w4a16, GemmLaunch};
use super::split_k::w4a16_workspace_for;
use super::{w4a16_splits, CudaQuantLinear, SplitKWorkspace, W4A16Kernel, MAX_DECODE_M, TILE_K};
use crate::ops::cuda::switch::KernelSwitch;
use crate::{Error, Result};

/// The most K splits an explicit [`W4A16Choice`] may ask for (the grid's y dimension).
const MAX_SPLITS_ACCEPTED: usize = 65_535;

/// `out[m, n] = x[m, k] @ dequant(w)^T` for a W4A16 `w` and `m` in `1..=64` (see the module docs), using `ws` for
/// split-K, with the kernel [`W4A16Kernel::configured`] picks for the shape and the heuristic's split count. `x` and `w` must be
/// on `stream`'s device; `out` must not overlap `x`.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn w4a16_gemm(
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    w: &CudaQuantLinear,
    m: usize,
    ws: &mut SplitKWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    w4a16_gemm_with(stream, x, w, m, ws, out, W4A16Choice::configured(w, m)?)
}

/// How [`w4a16_gemm_with`] runs: the kernel, and a split count (`None`: the heuristic [`w4a16_splits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct W4A16Choice {
    /// The decode kernel.
    pub kernel: W4A16Kernel,
    /// K splits, `1..=k / 64` (at most 32 are worth it); `None` picks them by the heuristic.
    pub splits: Option<usize>,
}

impl W4A16Choice {
    /// The kernel [`W4A16Kernel::configured`] picks for `m` rows through `w`, with the heuristic's splits.
    pub fn configured(w: &CudaQuantLinear, m: usize) -> Result<Self> {
        Ok(W4A16Choice { kernel: W4A16Kernel::configured(m, w.n, w.k)?, splits: None })
    }
}

/// [`w4a16_gemm`] with an explicit kernel and, optionally, split count: the direct, pipelined and tiled kernels
/// give the same bits for the same split count, which is how the GPU tests check one against the other (the bulk
/// kernel's count is of blocks; it takes m <= 16, and only on a device where [`W4A16Kernel::runs`]).
pub fn w4a16_gemm_with(
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    w: &CudaQuantLinear,
    m: usize,
    ws: &mut SplitKWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    choice: W4A16Choice,
) -> Result<()> {
    gemm("w4a16_gemm", stream, (x, w, m), ws, out, choice, false)
}

/// `out[m, n / 2] = silu(gate) * up` of `x[m, k] @ dequant(w)^T` for SwiGLU's `[gate; up]` weight uploaded with
/// [`CudaQuantLinear::upload_swiglu`] ([`CudaQuantLinear::swiglu_paired`]), in one kernel: the bits of
/// [`w4a16_gemm`] followed by [`crate::ops::cuda::activation::silu_mul`], without the `[m, n]` intermediate or the
/// second launch. Otherwise as [`w4a16_gemm`].
pub fn w4a16_gemm_silu(
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    w: &CudaQuantLinear,
    m: usize,
    ws: &mut SplitKWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    w4a16_gemm_silu_with(stream, x, w, m, ws, out, W4A16Choice::configured(w, m)?)
}

/// [`w4a16_gemm_silu`] with an explicit kernel and split count, as [`w4a16_gemm_with`].
pub fn w4a16_gemm_silu_with(
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    w: &CudaQuantLinear,
    m: usize,
    ws: &mut SplitKWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    choice: W4A16Choice,
) -> Result<()> {
    gemm("w4a16_gemm_silu", stream, (x, w, m), ws, out, choice, true)
}

/// The operand checks every W4A16 GEMM makes: `w` is W4A16 (and paired for `silu`), `x` holds `m x k` values and
/// `out` `m x n` (`m x n / 2` with `silu`), all on the stream's device. Errors start with `op`.
pub(super) fn check_operands(
    op: &str,
    stream: &CudaStream,
    (x, w, m): (&impl DevicePtr<bf16>, &CudaQuantLinear, usize),
    out: &impl DevicePtrMut<bf16>,
    silu: bool,
) -> Result<()> {
    let fail = |msg: String| Err(Error::Backend(format!("{op}: {msg}")));
    if w.is_w4a8() {
        return fail("the weight is W4A8 (use w4a8_gemm)".into());
    }
    if silu && !w.swiglu_paired() {
        return fail("the weight was not uploaded with its gate and up rows paired (upload_swiglu)".into());
    }
    let (n, k) = (w.n, w.k);
    let out_cols = if silu { n / 2 } else { n };
    if x.len() < m * k {
        return fail(format!("`x` has {} elements, needs at least {m} x {k}", x.len()));
    }
    if out.len() < m * out_cols {
        return fail(format!("`out` has {} elements, needs at least {m} x {out_cols}", out.len()));
    }
    super::super::check_same_device(op, stream, &[("x", x.stream()), ("out", out.stream()), ("w", w.qweight.stream())])
}

/// The checked launch of [`w4a16_gemm_with`] (`silu` false) and [`w4a16_gemm_silu_with`] (true).
fn gemm(
    op: &str,
    stream: &CudaStream,
    (x, w, m): (&impl DevicePtr<bf16>, &CudaQuantLinear, usize),
    ws: &mut SplitKWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    choice: W4A16Choice,
    silu: bool,
) -> Result<()> {
    super::super::ensure_built()?;
    let fail = |msg: String| Err(Error::Backend(format!("{op}: {msg}")));
    check_operands(op, stream, (x, w, m), out, silu)?;
    let (n, k) = (w.n, w.k);
    if !(1..=MAX_DECODE_M).contains(&m) {
        return fail(format!("m is {m}, must be in 1..={MAX_DECODE_M} (dequantize + GEMM above)"));
    }
    if n == 0 {
        return Ok(());
    }
    if m > choice.kernel.max_m() {
        return fail(format!("m is {m}; the {} kernel takes m <= {}", choice.kernel.name(), choice.kernel.max_m()));
    }
    // Bulk counts blocks (any number the grid takes), the others K splits (at most one per 64-column chunk).
    let most = if choice.kernel.splits_k() { (k / TILE_K).min(MAX_SPLITS_ACCEPTED) } else { MAX_SPLITS_ACCEPTED };
    let splits = match choice.splits {
        None => w4a16_splits(choice.kernel, m, n, k, ws.sms),
        Some(s) if (1..=most).contains(&s) => s,
        Some(s) => return fail(format!("splits is {s}, must be in 1..={most}")),
    };
    let need = w4a16_workspace_for(choice.kernel, m, n, splits);
    if !ws.holds(need) {
        return fail(format!("the split-K workspace holds fewer than {} partials / {} counters", need.0, need.1));
    }
    launch_gemm(op, stream, (x, w, m), Some(ws), out, (choice.kernel, splits, None), silu)
}

/// Launches a checked W4A16 GEMM: refuses an `x` that is not 16-byte aligned, then takes the device pointers of
/// `x`, `w`, `out` and the split-K workspace `ws` (`None` for one split of the large-m kernel) for
/// [`launch_w4a16`]. `(kernel, splits, large)`: the decode kernel and its K splits, or with `large` the large-m
/// kernel's plan (`kernel` is then ignored; `splits` is the plan's).
pub(super) fn launch_gemm(
    op: &str,
    stream: &CudaStream,
    (x, w, m): (&impl DevicePtr<bf16>, &CudaQuantLinear, usize),
    ws: Option<&mut SplitKWorkspace>,
    out: &mut impl DevicePtrMut<bf16>,
    (kernel, splits, large): (W4A16Kernel, usize, Option<super::LargePlan>),
    silu: bool,
) -> Result<()> {
    let (xp, _x) = x.device_ptr(stream);
    if xp % 16 != 0 {
        return Err(Error::Backend(format!("{op}: `x` starts at {xp:#x}, not 16-byte aligned")));
    }
    let (qweight, _q) = w.qweight.device_ptr(stream);
    let (scales, _s) = w.scales.device_ptr(stream);
    let zeros = w.zeros.as_ref().map(|z| z.device_ptr(stream));
    let workspace = ws.map(|ws| (ws.partials.device_ptr_mut(stream), ws.counters.device_ptr_mut(stream)));
    let (outp, _o) = out.device_ptr_mut(stream);
    let l = GemmLaunch {
        out: outp,
        x: xp,
        x_scales: 0,
        x_zeros: 0,
        qweight,
        scales,
        zeros: zeros.as_ref().map_or(0, |(p, _)| *p),
        row_corr: 0,
        partials: workspace.as_ref().map_or(0, |((p, _), _)| *p),
        counters: workspace.as_ref().map_or(0, |(_, (c, _))| *c),
        m,
        n: w.n,
        k: w.k,
        splits,
        tile_m: large.map_or(0, |plan| plan.tile_m),
        large_row: large.is_some_and(|plan| plan.kernel == super::W4A16LargeKernel::WgmmaRow),
        kernel,
        pair_half: w.pair_half,
        silu,
    };
    launch_w4a16(op, stream, &l)
}

/// Rows `rows` of the W4A16 weight dequantized into `out[rows.len(), k]` (a chunk of the large-m path, which then
/// multiplies it by cuBLASLt while it sits in L2): `rows` must start on a 16-row tile and end on one or at `n`. For a
/// weight uploaded paired ([`CudaQuantLinear::upload_swiglu`]) the chunk's tiles hold gate rows `rows.start / 2 ..`
/// and the matching up rows: `out` gets the chunk's `rows.len() / 2` gate rows, then its up rows.
///
/// Enqueued on `stream`; returns without waiting.
pub fn w4a16_dequant_rows(
    stream: &CudaStream,
    w: &CudaQuantLinear,
    rows: std::ops::Range<usize>,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    dequant("w4a16_dequant_rows", stream, w, rows, out)
}

/// `out[n, k] = bf16(s * (q - z))`: the W4A16 weight dequantized whole, in matrix row order.
///
/// Enqueued on `stream`; returns without waiting.
pub fn w4a16_dequant(stream: &CudaStream, w: &CudaQuantLinear, out: &mut impl DevicePtrMut<bf16>) -> Result<()> {
    dequant("w4a16_dequant", stream, w, 0..w.n, out)
}

/// The checked launch of [`w4a16_dequant_rows`] and [`w4a16_dequant`] (`rows` = `0..n`, which may be empty).
fn dequant(
    op: &str,
    stream: &CudaStream,
    w: &CudaQuantLinear,
    rows: std::ops::Range<usize>,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    super::super::ensure_built()?;
    let fail = |msg: String| Err(Error::Backend(format!("{op}: {msg}")));
    if w.is_w4a8() {
        return fail("the weight is W4A8".into());
    }
    let on_tile = |r: usize| r.is_multiple_of(16);
    let whole = rows == (0..w.n);
    if (rows.is_empty() && !whole) || rows.end > w.n || !on_tile(rows.start) || !(on_tile(rows.end) || rows.end == w.n)
    {
        return fail(format!("rows {rows:?} of {}: a chunk starts and ends on a 16-row tile (or at n)", w.n));
    }
    if out.len() < rows.len() * w.k {
        return fail(format!("`out` has {} elements, needs at least {} x {}", out.len(), rows.len(), w.k));
    }
    super::super::check_same_device(op, stream, &[("out", out.stream()), ("w", w.qweight.stream())])?;
    // The layout stores each 16-row tile whole (k / 64 chunks of 512 bytes of weights, 64 of scales or zeros), so
    // a chunk is the same layout starting `rows.start / 16` tiles in.
    let tiles = (rows.start / 16) as u64;
    let kc = (w.k / TILE_K) as u64;
    let (qweight, _q) = w.qweight.device_ptr(stream);
    let (scales, _s) = w.scales.device_ptr(stream);
    let zeros = w.zeros.as_ref().map(|z| z.device_ptr(stream));
    let (outp, _o) = out.device_ptr_mut(stream);
    if outp % 16 != 0 {
        return fail(format!("`out` starts at {outp:#x}, not 16-byte aligned"));
    }
    let l = GemmLaunch {
        out: outp,
        x: 0,
        x_scales: 0,
        x_zeros: 0,
        qweight: qweight + tiles * kc * 512,
        scales: scales + tiles * kc * 64,
        zeros: zeros.as_ref().map_or(0, |(p, _)| *p + tiles * kc * 64),
        row_corr: 0,
        partials: 0,
        counters: 0,
        m: 0,
        n: rows.len(),
        k: w.k,
        splits: 1,
        tile_m: 0,
        large_row: false,
        kernel: W4A16Kernel::Direct,
        // A paired chunk is paired within itself: its gate rows, then its up rows (the whole: w.pair_half).
        pair_half: if w.pair_half > 0 { rows.len() / 2 } else { 0 },
        silu: false,
    };
    launch_dequant(op, stream, &l)
}
