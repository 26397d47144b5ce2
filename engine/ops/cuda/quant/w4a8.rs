//! The W4A8 path: int8 per-token activations ([`QuantActs`], quantized by [`act_quant`] from an [`ActSource`],
//! alone or fused) and the int8 GEMM [`w4a8_gemm`].

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, SyncOnDrop};
use half::bf16;

use super::launch::{launch_act_quant, launch_w4a8, ActQuantLaunch, GemmLaunch};
use super::{w4a8_plan, w4a8_workspace, CudaQuantLinear, SplitKWorkspace};
use crate::{Error, Result};

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
    if hidden == 0 || hidden % 8 != 0 || hidden > 1 << 30 {
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
    if n == 0 || m == 0 {
        return Ok(());
    }
    let plan = w4a8_plan(m, n, k, ws.sms);
    let need = w4a8_workspace(m, n, k, ws.sms);
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
        kernel: super::W4A16Kernel::Direct,
        pair_half: 0,
        silu: false,
    };
    launch_w4a8(OP, stream, &l)
}
