//! Int8 tables on the device ([`CudaInt8Table`]): the token embedding and `lm_head` of an int8-embeddings model
//! (Meta's 8-bit per-channel option), kept as int8 with a bf16 scale per row, half the bytes of bf16. The gather
//! is [`crate::ops::cuda::embedding::embed_int8`]; the decode product is [`gemv_int8`] (`kernels/quant/table_int8.cu`,
//! at most 16 rows); larger batches dequantize chunks of rows with [`dequant_rows`] for cuBLASLt.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::quant::Int8Table;
use crate::{Error, Result};

/// The most rows of `x` [`gemv_int8`] takes.
pub const GEMV_INT8_MAX_M: usize = 16;
/// The longest `k` the kernel takes.
const MAX_K: usize = 1 << 24;

/// An `[rows, cols]` int8 table with its `[rows]` bf16 scales on the device, and the row indices `0..rows` (the
/// ids [`dequant_rows`] gathers with).
pub struct CudaInt8Table {
    rows: usize,
    cols: usize,
    q: CudaSlice<i8>,
    scales: CudaSlice<bf16>,
    iota: CudaSlice<u32>,
}

impl CudaInt8Table {
    /// Checks `t` ([`Int8Table::check`], naming it `what`) and uploads it on `stream`.
    pub fn upload(stream: &Arc<CudaStream>, t: &Int8Table, what: &str) -> Result<Self> {
        t.check(what)?;
        if t.rows > u32::MAX as usize {
            return Err(Error::request(format!("{what}: {} rows, at most 2^32 - 1 are supported", t.rows)));
        }
        let up = |e: cudarc::driver::DriverError| Error::Backend(format!("upload {what}: {e}"));
        let scales: Vec<bf16> = t.scales.iter().map(|&s| bf16::from_f32(s)).collect();
        let iota: Vec<u32> = (0..t.rows as u32).collect();
        Ok(CudaInt8Table {
            rows: t.rows,
            cols: t.cols,
            q: stream.clone_htod(&t.q).map_err(up)?,
            scales: stream.clone_htod(&scales).map_err(up)?,
            iota: stream.clone_htod(&iota).map_err(up)?,
        })
    }

    /// Rows (vocabulary entries).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (the hidden size).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The int8 values and the scales, for [`crate::ops::cuda::embedding::embed_int8`].
    pub fn parts(&self) -> (&CudaSlice<i8>, &CudaSlice<bf16>) {
        (&self.q, &self.scales)
    }

    /// Device bytes of the table (values and scales; the row indices not counted).
    pub fn device_bytes(&self) -> usize {
        self.q.len() + 2 * self.scales.len()
    }
}

/// True when [`gemv_int8`] takes `m` rows of width `k`.
pub fn gemv_int8_supports(m: usize, k: usize) -> bool {
    (1..=GEMV_INT8_MAX_M).contains(&m) && k > 0 && k % 16 == 0 && k <= MAX_K
}

/// `out[i, j] = bf16(scales[j] * sum_c x[i, c] * q[j, c])` for `i < m`, `j <` the table's rows: the decode product
/// over an int8 table (the exact products summed in f32, the row's scale applied once).
///
/// - `x`: at least `[m, cols]`, 16-byte aligned; `out`: at least `[m, rows]`, not overlapping `x`.
/// - `m` and `cols` as [`gemv_int8_supports`] says.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn gemv_int8(
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    table: &CudaInt8Table,
    m: usize,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    const OP: &str = "gemv_int8";
    super::super::ensure_built()?;
    let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
    let (n, k) = (table.rows, table.cols);
    if !gemv_int8_supports(m, k) {
        return fail(format!("m is {m} and k {k}: needs m in 1..={GEMV_INT8_MAX_M}, k a positive multiple of 16"));
    }
    if x.len() < m * k {
        return fail(format!("`x` has {} elements, needs at least {m} x {k}", x.len()));
    }
    if out.len() < m * n {
        return fail(format!("`out` has {} elements, needs at least {m} x {n}", out.len()));
    }
    if n > i32::MAX as usize {
        return fail(format!("the table has {n} rows, at most 2^31 - 1 are supported"));
    }
    super::super::check_same_device(
        OP,
        stream,
        &[("x", x.stream()), ("out", out.stream()), ("table", table.q.stream())],
    )?;
    let warps = super::super::gemv::warps_per_block(n, super::super::attention::num_sms(stream)?);
    let (xp, _x) = x.device_ptr(stream);
    if xp % 16 != 0 {
        return fail(format!("`x` starts at {xp:#x}, not 16-byte aligned"));
    }
    let (q, _q) = table.q.device_ptr(stream);
    let (scales, _s) = table.scales.device_ptr(stream);
    let (outp, _o) = out.device_ptr_mut(stream);
    launch(OP, stream, &Int8Launch { out: outp, x: xp, q, scales, m, n, k, warps })
}

/// `out[r - rows.start, c] = bf16(scales[r] * q[r, c])` for the table rows `rows`: a chunk of the table dequantized
/// (bit for bit the bf16 rounding of the exact f32 values), for the cuBLASLt path of large batches.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn dequant_rows(
    stream: &CudaStream,
    table: &CudaInt8Table,
    rows: std::ops::Range<usize>,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    if rows.start > rows.end || rows.end > table.rows {
        return Err(Error::Backend(format!("dequant_rows: rows {rows:?} of a table of {}", table.rows)));
    }
    if rows.is_empty() {
        return Ok(());
    }
    if out.len() < rows.len() * table.cols {
        return Err(Error::Backend(format!(
            "dequant_rows: `out` has {} elements, needs {} x {}",
            out.len(),
            rows.len(),
            table.cols
        )));
    }
    let ids = table.iota.slice(rows.clone());
    let mut out = out.slice_mut(..rows.len() * table.cols);
    super::super::embedding::embed_int8(stream, (&table.q, &table.scales), table.cols, &ids, &mut out)
}

/// One checked call, as the device pointers and sizes `l32_gemv_int8_params` carries.
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
struct Int8Launch {
    out: u64,
    x: u64,
    q: u64,
    scales: u64,
    m: usize,
    n: usize,
    k: usize,
    warps: usize,
}

#[cfg(llama32_cuda)]
fn launch(op: &str, stream: &CudaStream, l: &Int8Launch) -> Result<()> {
    use super::super::ffi;
    use std::ffi::c_void;
    // All fit: m <= 16, n < 2^31, k <= 2^24 (checked by gemv_int8).
    let params = ffi::l32_gemv_int8_params {
        out: l.out as *mut c_void,
        x: l.x as *const c_void,
        q: l.q as *const i8,
        scales: l.scales as *const c_void,
        m: l.m as i64,
        n: l.n as i64,
        k: l.k as i64,
        warps: l.warps as i32,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::super::raw_stream(op, stream)?;
    // SAFETY: every pointer comes from a live device allocation on this stream's device, sized by gemv_int8's checks
    // (x: m x k, out: m x n, q: n x k, scales: n); the guards are held until after the launch.
    let status = unsafe { ffi::l32_gemv_int8(&params, raw) };
    super::super::check_launch(op, stream, status, || format!("{op} (m {}, n {}, k {})", l.m, l.n, l.k))
}

#[cfg(not(llama32_cuda))]
fn launch(_op: &str, _stream: &CudaStream, _l: &Int8Launch) -> Result<()> {
    super::super::ensure_built()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supports_decode_rows_and_multiples_of_16() {
        assert!(gemv_int8_supports(1, 2048) && gemv_int8_supports(16, 16) && gemv_int8_supports(3, 8192));
        assert!(!gemv_int8_supports(0, 2048) && !gemv_int8_supports(17, 2048));
        assert!(!gemv_int8_supports(1, 2056) && !gemv_int8_supports(1, 0));
    }
}
