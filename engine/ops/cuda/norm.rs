//! RMSNorm and fused residual-add + RMSNorm on CUDA (`kernels/norm.cu`, family `norm`), the twins of
//! [`crate::ops::cpu::norm`], with the same arguments after the stream.
//!
//! Numerics (HF `LlamaRMSNorm` in bf16): the sum of squares is accumulated in fp32, the residual stream is rounded
//! to bf16 after the add, and the normalized row is rounded to bf16 before the weight multiply. The f32 CPU twin
//! rounds none of these, so a comparison allows two bf16 roundings per output (three after the fused add).

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::{Error, Result};

/// `out[r] = weight * x[r] / sqrt(mean(x[r]^2) + eps)` for each row `r` of a row-major `[rows, hidden]` matrix.
///
/// - `x`: `[rows, hidden]`, `rows >= 0`; `weight`: `[hidden]`; `out`: `[rows, hidden]`, written.
/// - `eps >= 0` (Llama 3.2: `1e-5`).
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn rms_norm(
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    weight: &impl DevicePtr<bf16>,
    eps: f32,
    hidden: usize,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    const OP: &str = "rms_norm";
    super::ensure_built()?;
    let rows =
        check_shapes(OP, &Lens { x: x.len(), residual: None, weight: weight.len(), out: out.len() }, hidden, eps)?;
    super::check_same_device(OP, stream, &[("x", x.stream()), ("weight", weight.stream()), ("out", out.stream())])?;
    let (x, _x) = x.device_ptr(stream);
    let (weight, _weight) = weight.device_ptr(stream);
    let (out, _out) = out.device_ptr_mut(stream);
    launch(OP, stream, &NormLaunch { out, x, residual: None, weight, rows, hidden, eps })
}

/// Fused residual add + RMSNorm: `residual[r] = bf16(residual[r] + x[r])` in place, then
/// `out[r] = rms_norm(residual[r])`.
///
/// - `residual`: `[rows, hidden]`, read and written; `x`: `[rows, hidden]`; `weight`: `[hidden]`;
///   `out`: `[rows, hidden]`, written. `eps >= 0`.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn add_rms_norm(
    stream: &CudaStream,
    residual: &mut impl DevicePtrMut<bf16>,
    x: &impl DevicePtr<bf16>,
    weight: &impl DevicePtr<bf16>,
    eps: f32,
    hidden: usize,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    const OP: &str = "add_rms_norm";
    super::ensure_built()?;
    let lens = Lens { x: x.len(), residual: Some(residual.len()), weight: weight.len(), out: out.len() };
    let rows = check_shapes(OP, &lens, hidden, eps)?;
    let operands =
        [("residual", residual.stream()), ("x", x.stream()), ("weight", weight.stream()), ("out", out.stream())];
    super::check_same_device(OP, stream, &operands)?;
    let (residual, _residual) = residual.device_ptr_mut(stream);
    let (x, _x) = x.device_ptr(stream);
    let (weight, _weight) = weight.device_ptr(stream);
    let (out, _out) = out.device_ptr_mut(stream);
    launch(OP, stream, &NormLaunch { out, x, residual: Some(residual), weight, rows, hidden, eps })
}

/// The longest row `kernels/norm.cu` takes.
const MAX_HIDDEN: usize = 1 << 30;

/// Element counts of one call's operands.
struct Lens {
    x: usize,
    residual: Option<usize>,
    weight: usize,
    out: usize,
}

/// Checks one call's lengths against `hidden` and returns the row count.
fn check_shapes(op: &str, lens: &Lens, hidden: usize, eps: f32) -> Result<usize> {
    let fail = |msg: String| Err(Error::Backend(format!("{op}: {msg}")));
    if hidden == 0 || hidden > MAX_HIDDEN {
        return fail(format!("hidden is {hidden}, must be in 1..=2^30"));
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        return fail(format!("eps is {eps}, must be finite and >= 0"));
    }
    if lens.weight != hidden {
        return fail(format!("`weight` has {} elements, expected hidden = {hidden}", lens.weight));
    }
    if !lens.x.is_multiple_of(hidden) {
        return fail(format!("`x` has {} elements, not a multiple of hidden = {hidden}", lens.x));
    }
    let rows = lens.x / hidden;
    if rows > i32::MAX as usize {
        return fail(format!("{rows} rows, at most 2^31-1 are supported"));
    }
    if lens.out != lens.x {
        return fail(format!("`out` has {} elements, expected {rows} rows x {hidden} = {}", lens.out, lens.x));
    }
    if let Some(r) = lens.residual.filter(|&r| r != lens.x) {
        return fail(format!("`residual` has {r} elements, expected {rows} rows x {hidden} = {}", lens.x));
    }
    Ok(rows)
}

/// One checked call, as the device pointers and sizes `l32_norm_params` carries (contiguous rows).
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
struct NormLaunch {
    out: u64,
    x: u64,
    residual: Option<u64>,
    weight: u64,
    rows: usize,
    hidden: usize,
    eps: f32,
}

#[cfg(llama32_cuda)]
fn launch(op: &str, stream: &CudaStream, l: &NormLaunch) -> Result<()> {
    use super::ffi;
    use std::ffi::c_void;
    // Both fit in i64: check_shapes bounds rows by 2^31 - 1 and hidden by 2^30.
    let (rows, hidden) = (l.rows as i64, l.hidden as i64);
    let params = ffi::l32_norm_params {
        out: l.out as *mut c_void,
        x: l.x as *const c_void,
        residual: l.residual.map_or(std::ptr::null_mut(), |r| r as *mut c_void),
        weight: l.weight as *const c_void,
        rows,
        hidden,
        x_stride: hidden,
        residual_stride: hidden,
        out_stride: hidden,
        eps: l.eps,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: every pointer comes from a live device slice on this stream's device whose length check_shapes matched
    // to rows x hidden (weight: hidden); the callers hold the slices' stream guards until after this launch.
    let status = unsafe { ffi::l32_norm(&params, raw) };
    super::check_launch(op, stream, status, || format!("{op} (rows {}, hidden {})", l.rows, l.hidden))
}

#[cfg(not(llama32_cuda))]
fn launch(_op: &str, _stream: &CudaStream, _launch: &NormLaunch) -> Result<()> {
    super::ensure_built()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(x: usize, residual: Option<usize>, weight: usize, out: usize) -> Lens {
        Lens { x, residual, weight, out }
    }

    fn err(l: Lens, hidden: usize, eps: f32) -> String {
        check_shapes("op", &l, hidden, eps).unwrap_err().to_string()
    }

    #[test]
    fn accepts_matching_shapes() {
        assert_eq!(check_shapes("op", &lens(3 * 8, None, 8, 24), 8, 1e-5).unwrap(), 3);
        assert_eq!(check_shapes("op", &lens(3 * 8, Some(24), 8, 24), 8, 0.0).unwrap(), 3);
        assert_eq!(check_shapes("op", &lens(0, Some(0), 8, 0), 8, 1e-5).unwrap(), 0);
    }

    #[test]
    fn rejects_each_bad_operand_by_name() {
        assert!(err(lens(24, None, 8, 24), 0, 1e-5).contains("hidden is 0"));
        assert!(err(lens(24, None, 7, 24), 8, 1e-5).contains("`weight`"));
        assert!(err(lens(25, None, 8, 25), 8, 1e-5).contains("`x`"));
        assert!(err(lens(24, None, 8, 16), 8, 1e-5).contains("`out`"));
        assert!(err(lens(24, Some(16), 8, 24), 8, 1e-5).contains("`residual`"));
        assert!(err(lens(24, None, 8, 24), 8, -1.0).contains("eps"));
        assert!(err(lens(24, None, 8, 24), 8, f32::NAN).contains("eps"));
    }
}
