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
    (1..=GEMV_INT8_MAX_M).contains(&m) && k > 0 && k.is_multiple_of(16) && k <= MAX_K
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

    /// `__byte_perm(x, y, s)`: byte n of the result is byte (s >> 4n) & 7 of y:x (x bytes 0-3, y bytes 4-7).
    fn byte_perm(x: u32, y: u32, s: u32) -> u32 {
        let bytes = (u64::from(y) << 32) | u64::from(x);
        (0..4).map(|n| (((bytes >> (8 * ((s >> (4 * n)) & 7))) & 0xFF) as u32) << (8 * n)).sum()
    }

    /// The kernel's `int8_pair_bf16x2` on the host: two exact bf16 (low, high half) of bytes `lo`, `lo + 1` of the
    /// biased word.
    fn pair_bf16x2(biased: u32, lo: u32) -> u32 {
        let magic = 8_388_736.0f32;
        let a = f32::from_bits(byte_perm(biased, 0x4B00_0000, 0x7440 + lo)) - magic;
        let b = f32::from_bits(byte_perm(biased, 0x4B00_0000, 0x7440 + lo + 1)) - magic;
        u32::from(half::bf16::from_f32(a).to_bits()) | (u32::from(half::bf16::from_f32(b).to_bits()) << 16)
    }

    /// The kernel's `int8x16_to_bf16`.
    fn int8x16_to_bf16(v: [u32; 4]) -> [u32; 8] {
        let mut out = [0u32; 8];
        for (i, &w) in v.iter().enumerate() {
            let biased = w ^ 0x8080_8080;
            out[2 * i] = pair_bf16x2(biased, 0);
            out[2 * i + 1] = pair_bf16x2(biased, 2);
        }
        out
    }

    fn bf16_halves(w: u32) -> (f64, f64) {
        let f = |h: u32| f64::from(half::bf16::from_bits(h as u16).to_f32());
        (f(w & 0xFFFF), f(w >> 16))
    }

    #[test]
    fn every_int8_becomes_its_exact_bf16() {
        for b in 0..=255u32 {
            let word = b | (((b + 1) & 0xFF) << 8) | (((b + 2) & 0xFF) << 16) | (((b + 3) & 0xFF) << 24);
            let out = int8x16_to_bf16([word, 0, 0, 0]);
            let want = |j: u32| f64::from(((b + j) & 0xFF) as u8 as i8);
            assert_eq!(bf16_halves(out[0]), (want(0), want(1)), "byte {b}");
            assert_eq!(bf16_halves(out[1]), (want(2), want(3)), "byte {b}");
        }
    }

    /// Emulates one warp of `gemv_int8` (one warp per block, one step of one vector per lane) on one 16-row tile
    /// and 64 columns: each lane builds its MMA fragments from its 16-byte vectors as the kernel does, the fragments
    /// go where the m16n8k16 layout puts them, and D = A B summed over the four MMAs must equal the dot products.
    #[test]
    #[allow(clippy::needless_range_loop)] // fragment coordinates read clearer as indices
    fn emulated_fragments_compute_the_dot_products() {
        let k = 64;
        let q: Vec<i8> = (0..16 * k).map(|i| ((i * 37 + i / 7) % 256) as u8 as i8).collect();
        let x: Vec<f64> = (0..8 * k).map(|i| ((i * 13 + 5) % 31) as f64 - 15.0).collect();
        let word = |row: usize, t: usize, w: usize| -> u32 {
            let base = row * k + 16 * t + 4 * w;
            u32::from_le_bytes([q[base] as u8, q[base + 1] as u8, q[base + 2] as u8, q[base + 3] as u8])
        };
        let mut d = [[0f64; 8]; 16];
        for i in 0..4 {
            let (mut a, mut b) = ([[0f64; 16]; 16], [[0f64; 8]; 16]);
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                let r0 = int8x16_to_bf16([0, 1, 2, 3].map(|w| word(g, t, w)));
                let r1 = int8x16_to_bf16([0, 1, 2, 3].map(|w| word(g + 8, t, w)));
                // a0: A[g][2t..], a1: A[g+8][2t..], a2: A[g][2t+8..], a3: A[g+8][2t+8..].
                let regs = [(g, 2 * t, r0[2 * i]), (g + 8, 2 * t, r1[2 * i]), (g, 2 * t + 8, r0[2 * i + 1])];
                for (row, col, reg) in regs.into_iter().chain([(g + 8, 2 * t + 8, r1[2 * i + 1])]) {
                    let (lo, hi) = bf16_halves(reg);
                    a[row][col] = lo;
                    a[row][col + 1] = hi;
                }
                // x words 2i, 2i+1 of token g: elements 16t + 4i .. 16t + 4i + 3; b0 = B[2t..][g], b1 = B[2t+8..][g].
                let xe = |j: usize| x[g * k + 16 * t + 4 * i + j];
                b[2 * t][g] = xe(0);
                b[2 * t + 1][g] = xe(1);
                b[2 * t + 8][g] = xe(2);
                b[2 * t + 9][g] = xe(3);
            }
            for (r, dr) in d.iter_mut().enumerate() {
                for (tok, v) in dr.iter_mut().enumerate() {
                    *v += (0..16).map(|s| a[r][s] * b[s][tok]).sum::<f64>();
                }
            }
        }
        for r in 0..16 {
            for tok in 0..8 {
                let want: f64 = (0..k).map(|c| f64::from(q[r * k + c]) * x[tok * k + c]).sum();
                assert_eq!(d[r][tok], want, "row {r} token {tok}");
            }
        }
    }

    #[test]
    fn supports_decode_rows_and_multiples_of_16() {
        assert!(gemv_int8_supports(1, 2048) && gemv_int8_supports(16, 16) && gemv_int8_supports(3, 8192));
        assert!(!gemv_int8_supports(0, 2048) && !gemv_int8_supports(17, 2048));
        assert!(!gemv_int8_supports(1, 2056) && !gemv_int8_supports(1, 0));
    }
}
