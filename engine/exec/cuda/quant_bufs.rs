//! The device buffers of the quantized projections and the projection itself, shared by the text executor
//! ([`super::CudaOps`]) and the Llama 3.2 Vision decoder ([`crate::vision::cuda::text`]).
//!
//! - W4A16 below [`k::quant::large_min_m`] rows (by default 33 on Hopper, 65 elsewhere;
//!   `LLAMA32_W4A16_LARGE_MIN_M` sets 1 to 65, 0 for that default): the fused dequantize-and-multiply decode
//!   kernels, split-K partials in the workspace;
//! - W4A16 with more rows: the weight dequantized a chunk of rows at a time ([`k::quant::w4a16_chunk_rows`]) into
//!   a scratch, each chunk multiplied by cuBLASLt into its columns of the output while it sits in L2; or, where
//!   [`k::quant::W4A16LargeKernel::configured_for`] says so (Hopper: by default the row kernel at decode sizes,
//!   33-64 rows; or forced by `LLAMA32_W4A16_LARGE=wgmma` or `wgmma-row`), one kernel that dequantizes in registers
//!   ([`k::quant::w4a16_gemm_large`]);
//! - W4A8: the rows quantized to int8 per token (unless a norm or SiLU kernel already did, `fused`), then the
//!   int8 kernel.
//!
//! Buffers grow only outside CUDA graph capture (a captured graph keeps their addresses); each growth is reported
//! so the caller can invalidate its graphs.

use std::sync::Arc;

use crate::exec::cuda::blas::Blas;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtrMut};
use half::bf16;

use super::ops::drv;
use crate::ops::cuda as k;
use crate::{Error, Result};

/// Split-K workspace, int8 activations and the large-m W4A16 scratch.
#[derive(Default)]
pub(crate) struct QuantBuffers {
    /// Split-K partials and counters.
    pub(crate) ws: Option<k::quant::SplitKWorkspace>,
    /// Int8 activations with their scales and zero points.
    pub(crate) acts: Option<k::quant::QuantActs>,
    /// `[n, k]` bf16 scratch for W4A16 at more than 64 rows.
    pub(crate) scratch: Option<CudaSlice<bf16>>,
}

fn no_growth_in_capture(capturing: bool, what: &str) -> Result<()> {
    if capturing {
        return Err(Error::Backend(format!("{what} grew during graph capture")));
    }
    Ok(())
}

impl QuantBuffers {
    /// Makes sure the int8 activations hold `rows` x `cols` (`width`: the widest row to plan for). Returns whether
    /// the buffers moved.
    pub(crate) fn ensure_acts(
        &mut self,
        stream: &Arc<CudaStream>,
        rows: usize,
        cols: usize,
        width: usize,
        capturing: bool,
    ) -> Result<bool> {
        if self.acts.as_ref().is_some_and(|a| a.holds(rows, cols)) {
            return Ok(false);
        }
        no_growth_in_capture(capturing, "int8 activation buffers")?;
        self.acts = Some(k::quant::QuantActs::new(stream, rows.next_power_of_two(), width.max(cols))?);
        Ok(true)
    }

    /// Makes sure the split-K workspace holds `need = (partials, counters)`. Returns whether it moved.
    pub(crate) fn ensure_ws(
        &mut self,
        stream: &Arc<CudaStream>,
        need: (usize, usize),
        num_sms: usize,
        capturing: bool,
    ) -> Result<bool> {
        if self.ws.as_ref().is_some_and(|w| w.holds(need)) {
            return Ok(false);
        }
        no_growth_in_capture(capturing, "split-K workspace")?;
        let (p, c) = self.ws.as_ref().map_or((0, 0), |w| w.capacity());
        self.ws = Some(k::quant::SplitKWorkspace::new(stream, need.0.max(p), need.1.max(c), num_sms)?);
        Ok(true)
    }

    /// Makes sure the W4A16 scratch holds `len` bf16 values. Returns whether it moved.
    pub(crate) fn ensure_scratch(&mut self, stream: &Arc<CudaStream>, len: usize, capturing: bool) -> Result<bool> {
        if self.scratch.as_ref().is_some_and(|s| s.len() >= len) {
            return Ok(false);
        }
        no_growth_in_capture(capturing, "W4A16 scratch")?;
        // SAFETY: bf16 has no invalid bit patterns; the dequantization writes the n x k values before the GEMM.
        self.scratch = Some(unsafe { stream.alloc::<bf16>(len) }.map_err(drv("allocate W4A16 scratch"))?);
        Ok(true)
    }

    /// Grows what `out[rows, n] = x[rows, k] @ q^T` needs (`fused`: the int8 activations are already written, and
    /// `act_width` is the widest activation row to plan their buffer for). Returns whether any buffer moved.
    pub(crate) fn prepare(
        &mut self,
        stream: &Arc<CudaStream>,
        q: &k::quant::CudaQuantLinear,
        rows: usize,
        (num_sms, fused, act_width, capturing): (usize, bool, usize, bool),
    ) -> Result<bool> {
        let (n, kdim) = (q.n(), q.k());
        let mut moved = false;
        if q.is_w4a8() {
            moved |= self.ensure_ws(stream, k::quant::w4a8_workspace(rows, n, kdim, num_sms), num_sms, capturing)?;
            if !fused {
                moved |= self.ensure_acts(stream, rows, kdim, act_width, capturing)?;
            }
        } else if !k::quant::takes_large_path(rows) {
            let kernel = k::quant::W4A16Kernel::configured(rows, n, kdim)?;
            let need = k::quant::w4a16_workspace(kernel, rows, n, kdim, num_sms);
            moved |= self.ensure_ws(stream, need, num_sms, capturing)?;
        } else {
            let large = k::quant::W4A16LargeKernel::configured_for(rows)?;
            if large.is_wgmma() {
                let plan = k::quant::large_plan(large, rows, n, kdim, num_sms);
                moved |= self.ensure_ws(stream, k::quant::large_workspace_for(plan, rows, n), num_sms, capturing)?;
            } else {
                moved |= self.ensure_scratch(stream, k::quant::w4a16_chunk_rows(n, kdim) * kdim, capturing)?;
            }
        }
        Ok(moved)
    }

    /// `out[rows, n] = x[rows, k] @ q^T` for a quantized projection whose buffers were [`prepare`](Self::prepare)d;
    /// with `fused` the W4A8 input is the int8 activations already in the buffers and `x` is not read. `num_sms`:
    /// the device's SM count, for the large-m kernel's tile.
    pub(crate) fn project(
        &mut self,
        stream: &Arc<CudaStream>,
        (blas, num_sms): (&Blas, usize),
        q: &k::quant::CudaQuantLinear,
        (x, rows, fused): (&CudaView<'_, bf16>, usize, bool),
        out: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let (n, kdim) = (q.n(), q.k());
        let missing = || Error::Backend("quantized projection buffers missing".into());
        if q.is_w4a8() {
            let acts = self.acts.as_mut().ok_or_else(missing)?;
            if !fused {
                let src = k::quant::ActSource::Rows(x.slice(..rows * kdim));
                k::quant::act_quant(stream, src, rows, kdim, acts, None)?;
            }
            let ws = self.ws.as_mut().ok_or_else(missing)?;
            return k::quant::w4a8_gemm(stream, acts, q, rows, ws, out);
        }
        if !k::quant::takes_large_path(rows) {
            let ws = self.ws.as_mut().ok_or_else(missing)?;
            return k::quant::w4a16_gemm(stream, x, q, rows, ws, out);
        }
        let large = k::quant::W4A16LargeKernel::configured_for(rows)?;
        if large.is_wgmma() {
            let plan = k::quant::large_plan(large, rows, n, kdim, num_sms);
            return k::quant::w4a16_gemm_large(stream, (x, q, rows), plan, false, self.ws.as_mut(), out);
        }
        // Prefill-sized W4A16: a chunk of rows at a time, dequantized into the scratch, then the bf16 GEMM into the
        // chunk's columns of `out` (a paired gate_up chunk holds gate rows then their up rows: two column blocks).
        if out.len() < rows * n {
            return Err(Error::Backend(format!(
                "W4A16 projection: `out` has {} elements, needs {rows} x {n}",
                out.len()
            )));
        }
        let scratch = self.scratch.as_mut().ok_or_else(missing)?;
        let chunk = k::quant::w4a16_chunk_rows(n, kdim);
        let paired = q.swiglu_paired();
        chunked_product(blas, (x, rows, kdim, n), (chunk, paired), scratch, out, |r, scratch| {
            k::quant::w4a16_dequant_rows(stream, q, r, scratch)
        })
    }

    /// True when [`project_silu`](Self::project_silu) takes `rows` rows through `q`: a W4A16 `[gate; up]` weight
    /// uploaded with its rows paired ([`DeviceLinear::upload_gate_up`]), at decode sizes or where the large-m path
    /// is a Hopper kernel ([`k::quant::W4A16LargeKernel::configured_for`]; the dequantize path has no SiLU epilogue).
    pub(crate) fn silu_fusable(q: &k::quant::CudaQuantLinear, rows: usize) -> bool {
        !q.is_w4a8()
            && q.swiglu_paired()
            && rows >= 1
            && (!k::quant::takes_large_path(rows) || Self::large_kernel(rows).is_some())
    }

    /// The large-m W4A16 kernel in force at `rows` rows when it is a Hopper kernel (not the dequantize path).
    fn large_kernel(rows: usize) -> Option<k::quant::W4A16LargeKernel> {
        k::quant::W4A16LargeKernel::configured_for(rows).ok().filter(|kernel| kernel.is_wgmma())
    }

    /// `out[rows, n / 2] = silu(gate) * up` of `x[rows, k] @ q^T` in one kernel, for a `q` and `rows` that
    /// [`silu_fusable`](Self::silu_fusable) admits and whose buffers were [`prepare`](Self::prepare)d: the bits of
    /// [`project`](Self::project) followed by the SiLU * up kernel.
    pub(crate) fn project_silu(
        &mut self,
        stream: &Arc<CudaStream>,
        (q, num_sms): (&k::quant::CudaQuantLinear, usize),
        (x, rows): (&CudaView<'_, bf16>, usize),
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        if !Self::silu_fusable(q, rows) {
            return Err(Error::Backend(format!(
                "fused SwiGLU projection: {rows} rows through a [{}, {}] weight it does not take",
                q.n(),
                q.k()
            )));
        }
        if k::quant::takes_large_path(rows) {
            let large = Self::large_kernel(rows).ok_or_else(|| Error::Backend("no large-m W4A16 kernel".into()))?;
            let plan = k::quant::large_plan(large, rows, q.n(), q.k(), num_sms);
            return k::quant::w4a16_gemm_large(stream, (x, q, rows), plan, true, self.ws.as_mut(), out);
        }
        let ws = self.ws.as_mut().ok_or_else(|| Error::Backend("quantized projection buffers missing".into()))?;
        k::quant::w4a16_gemm_silu(stream, x, q, rows, ws, out)
    }
}

/// A projection on the device: bf16 `[n, k]`, or 4-bit in the quantized kernels' layout.
pub(crate) enum DeviceLinear {
    /// Row-major bf16 `[n, k]`.
    Dense(CudaSlice<bf16>),
    /// W4A16 or W4A8 (`ops::cuda::quant`).
    Quant(Box<k::quant::CudaQuantLinear>),
}

impl DeviceLinear {
    /// Uploads a CPU-layout projection of `numel` values (`what` names it in errors): its quantized form when it
    /// has one, else bf16.
    pub(crate) fn upload(
        stream: &Arc<CudaStream>,
        what: &str,
        w: &crate::weights::LinearWeight,
        numel: usize,
    ) -> Result<Self> {
        Self::upload_with(stream, what, w, numel, false)
    }

    /// [`upload`](Self::upload) for SwiGLU's fused `[gate; up]` projection: a W4A16 weight goes up with its gate
    /// and up rows paired ([`k::quant::CudaQuantLinear::upload_swiglu`]), so that
    /// [`QuantBuffers::project_silu`] can apply SiLU * up in the projection's kernel.
    pub(crate) fn upload_gate_up(
        stream: &Arc<CudaStream>,
        what: &str,
        w: &crate::weights::LinearWeight,
        numel: usize,
    ) -> Result<Self> {
        Self::upload_with(stream, what, w, numel, true)
    }

    fn upload_with(
        stream: &Arc<CudaStream>,
        what: &str,
        w: &crate::weights::LinearWeight,
        numel: usize,
        gate_up: bool,
    ) -> Result<Self> {
        if w.numel() != numel {
            return Err(Error::Backend(format!("{what}: {} values, expected {numel}", w.numel())));
        }
        match &w.quant {
            Some(q) => {
                let d = if gate_up {
                    k::quant::CudaQuantLinear::upload_swiglu(stream, q)
                } else {
                    k::quant::CudaQuantLinear::upload(stream, q)
                }
                .map_err(|e| Error::Backend(format!("{what}: {e}")))?;
                Ok(DeviceLinear::Quant(Box::new(d)))
            }
            None => Ok(DeviceLinear::Dense(crate::vision::cuda::upload_bf16(stream, &w.dense)?)),
        }
    }

    /// The W4A8 weight, if this is one.
    pub(crate) fn w4a8(&self) -> Option<&k::quant::CudaQuantLinear> {
        match self {
            DeviceLinear::Quant(q) if q.is_w4a8() => Some(q),
            _ => None,
        }
    }

    /// Device bytes of the weight.
    pub(crate) fn device_bytes(&self) -> usize {
        match self {
            DeviceLinear::Dense(d) => d.len() * 2,
            DeviceLinear::Quant(q) => q.device_bytes(),
        }
    }
}

/// `out[rows, n] = x[rows, k] @ w^T` for a bf16 weight through [`super::dense::dense_linear`], or a quantized one
/// through `bufs` (grown here, which graph capture refuses: run a shape eagerly first). Returns whether a buffer
/// moved.
pub(crate) fn project(
    stream: &Arc<CudaStream>,
    blas: &Blas,
    (skinny, num_sms, capturing): (bool, usize, bool),
    (w, bufs): (&DeviceLinear, &mut QuantBuffers),
    (x, rows, kdim, n): (&CudaView<'_, bf16>, usize, usize, usize),
    out: &mut CudaViewMut<'_, bf16>,
) -> Result<bool> {
    match w {
        DeviceLinear::Dense(d) => {
            super::dense::dense_linear(stream, blas, skinny, x, &d.slice(..), (rows, kdim, n), out)?;
            Ok(false)
        }
        DeviceLinear::Quant(q) => {
            if q.n() != n || q.k() != kdim {
                return Err(Error::Backend(format!(
                    "quantized weight is [{}, {}], expected [{n}, {kdim}]",
                    q.n(),
                    q.k()
                )));
            }
            let moved = bufs.prepare(stream, q, rows, (num_sms, false, kdim, capturing))?;
            bufs.project(stream, (blas, num_sms), q, (x, rows, false), out)?;
            Ok(moved)
        }
    }
}

/// `out[rows, n / 2] = silu(gate) * up` of `x[rows, k] @ w^T` in one kernel, for a W4A16 `[gate; up]` weight that
/// [`QuantBuffers::silu_fusable`] admits at `rows` (its buffers grown here, as [`project`] does). Returns whether a
/// buffer moved.
pub(crate) fn project_silu(
    stream: &Arc<CudaStream>,
    (num_sms, capturing): (usize, bool),
    (w, bufs): (&DeviceLinear, &mut QuantBuffers),
    (x, rows, kdim, n): (&CudaView<'_, bf16>, usize, usize, usize),
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<bool> {
    let DeviceLinear::Quant(q) = w else {
        return Err(Error::Backend("fused SwiGLU projection: the weight is bf16, not W4A16".into()));
    };
    if q.n() != n || q.k() != kdim {
        return Err(Error::Backend(format!("quantized weight is [{}, {}], expected [{n}, {kdim}]", q.n(), q.k())));
    }
    let moved = bufs.prepare(stream, q, rows, (num_sms, false, kdim, capturing))?;
    bufs.project_silu(stream, (q, num_sms), (x, rows), out)?;
    Ok(moved)
}

/// The bf16 scratch of an int8 table's cuBLASLt path (above 16 rows): at most 32 MiB, which stays in L2 between the
/// dequantization and the GEMM that reads it, and at most an eighth of the table's rows (so the scratch costs at
/// most a quarter of the bytes the int8 table saves).
const TABLE_CHUNK_BYTES: usize = 32 << 20;

/// The token embedding or `lm_head` on the device: bf16, or int8 per row with the scratch of its large-batch path.
pub(crate) enum DeviceTable {
    /// `[rows, cols]` bf16.
    Bf16(CudaSlice<bf16>),
    /// An int8-embeddings model's table.
    Int8(Box<Int8Lm>),
}

/// An int8 table and the bf16 scratch its large-batch product dequantizes chunks of rows into.
pub(crate) struct Int8Lm {
    table: k::quant::CudaInt8Table,
    scratch: CudaSlice<bf16>,
    chunk_rows: usize,
}

impl DeviceTable {
    /// Uploads a table of `rows` x `cols` f32 `values` (`what` names it in errors): its int8 form when it has one
    /// (with the scratch of its cuBLASLt path), else bf16.
    pub(crate) fn upload(
        stream: &Arc<CudaStream>,
        what: &str,
        (values, int8): (&[f32], Option<&crate::quant::Int8Table>),
        (rows, cols): (usize, usize),
    ) -> Result<Self> {
        if values.len() != rows * cols {
            return Err(Error::Backend(format!("{what}: {} values, expected {rows} x {cols}", values.len())));
        }
        let Some(t) = int8 else {
            return Ok(DeviceTable::Bf16(crate::vision::cuda::upload_bf16(stream, values)?));
        };
        if (t.rows, t.cols) != (rows, cols) {
            return Err(Error::Backend(format!(
                "{what}: int8 table is [{}, {}], expected [{rows}, {cols}]",
                t.rows, t.cols
            )));
        }
        let table = k::quant::CudaInt8Table::upload(stream, t, what)?;
        let chunk_rows = (TABLE_CHUNK_BYTES / (2 * cols.max(1))).min(rows.div_ceil(8)).max(16).min(rows.max(1));
        // SAFETY: bf16 has no invalid bit patterns; each chunk is written by the dequantization before its GEMM.
        let scratch = unsafe { stream.alloc::<bf16>(chunk_rows * cols) }.map_err(drv("allocate int8 table scratch"))?;
        Ok(DeviceTable::Int8(Box::new(Int8Lm { table, scratch, chunk_rows })))
    }

    /// Device bytes of the table (an int8 table's scratch included).
    pub(crate) fn device_bytes(&self) -> usize {
        match self {
            DeviceTable::Bf16(d) => 2 * d.len(),
            DeviceTable::Int8(t) => t.table.device_bytes() + 2 * t.scratch.len(),
        }
    }

    /// Gathers the rows `ids` (`[tokens]`, each below the table's rows) into `out` (`[tokens, cols]`), as bf16.
    pub(crate) fn embed(
        &self,
        stream: &CudaStream,
        cols: usize,
        ids: &impl cudarc::driver::DevicePtr<u32>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        match self {
            DeviceTable::Bf16(t) => k::embedding::embed(stream, t, cols, ids, out),
            DeviceTable::Int8(t) => k::embedding::embed_int8(stream, t.table.parts(), cols, ids, out),
        }
    }
}

impl Int8Lm {
    /// Output columns: the table's rows.
    pub(crate) fn rows(&self) -> usize {
        self.table.rows()
    }

    /// Input columns: the table's columns.
    pub(crate) fn cols(&self) -> usize {
        self.table.cols()
    }

    /// Device bytes of the int8 values and scales (what one product reads).
    pub(crate) fn table_bytes(&self) -> usize {
        self.table.device_bytes()
    }

    /// `out[rows, n] = x[rows, k] @ table^T` (n the table's rows, k its columns): the int8 skinny GEMM at decode
    /// sizes, else the table dequantized a chunk of rows at a time into the scratch and multiplied by cuBLASLt into
    /// its column block of `out`.
    pub(crate) fn product(
        &mut self,
        stream: &CudaStream,
        blas: &Blas,
        (x, rows): (&CudaView<'_, bf16>, usize),
        out: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        let (n, kdim) = (self.table.rows(), self.table.cols());
        if rows == 0 {
            return Ok(());
        }
        if out.len() < rows * n {
            return Err(Error::Backend(format!(
                "lm_head (int8): `out` has {} elements, needs {rows} x {n}",
                out.len()
            )));
        }
        if k::quant::gemv_int8_supports(rows, kdim) {
            return k::quant::gemv_int8(stream, x, &self.table, rows, out);
        }
        let table = &self.table;
        chunked_product(blas, (x, rows, kdim, n), (self.chunk_rows, false), &mut self.scratch, out, |r, scratch| {
            k::quant::dequant_rows(stream, table, r, scratch)
        })
    }
}

/// `out[rows, n] = x[rows, k] @ W^T` for a weight `W` that `dequant(r0..r1, scratch)` writes into `scratch` as bf16
/// rows, `chunk` rows at a time: each chunk is multiplied by cuBLASLt into its column block of `out` right after its
/// dequantization, while it is still in L2. With `paired` (a W4A16 `[gate; up]` weight uploaded paired) a chunk's
/// first half is gate rows `r0 / 2 ..` and its second half the matching up rows, two column blocks.
fn chunked_product(
    blas: &Blas,
    (x, rows, kdim, n): (&CudaView<'_, bf16>, usize, usize, usize),
    (chunk, paired): (usize, bool),
    scratch: &mut CudaSlice<bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    mut dequant: impl FnMut(std::ops::Range<usize>, &mut CudaSlice<bf16>) -> Result<()>,
) -> Result<()> {
    let mut r0 = 0;
    while r0 < n {
        let r1 = (r0 + chunk).min(n);
        dequant(r0..r1, scratch)?;
        // (first scratch row, first output column, columns) of each block.
        let (h, j0) = ((r1 - r0) / 2, r0 / 2);
        let blocks: &[(usize, usize, usize)] =
            if paired { &[(0, j0, h), (h, n / 2 + j0, h)] } else { &[(0, r0, r1 - r0)] };
        for &(first, col, cols) in blocks {
            let w = scratch.slice(first * kdim..(first + cols) * kdim);
            let mut block = out.slice_mut(col..rows * n);
            blas.gemm_strided(x, &w, (rows, kdim, cols), &mut block, n)?;
        }
        r0 = r1;
    }
    Ok(())
}
