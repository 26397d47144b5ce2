//! SwiGLU on CUDA (`kernels/activation.cu`, family `activation`), the twin of
//! [`crate::ops::cpu::activation::silu_mul`], with the same arguments after the stream.
//!
//! Numerics: `silu(gate) * up` is computed in f32 from the bf16 inputs and rounded to bf16 once. HF rounds silu to
//! bf16 and then the product again (two roundings), so it can differ from this kernel by one more bf16 rounding.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::{Error, Result};

/// `out[r, j] = silu(gate_up[r, j]) * gate_up[r, inter + j]` for each row `r` of a fused `[rows, 2 * inter]` input.
///
/// - `gate_up`: `[rows, 2 * inter]` (the gate half, then the up half); `out`: `[rows, inter]`, written.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn silu_mul(
    stream: &CudaStream,
    gate_up: &impl DevicePtr<bf16>,
    inter: usize,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    const OP: &str = "silu_mul";
    super::ensure_built()?;
    let rows = check_shapes(OP, gate_up.len(), inter, out.len())?;
    super::check_same_device(OP, stream, &[("gate_up", gate_up.stream()), ("out", out.stream())])?;
    let (gate_up, _gate_up) = gate_up.device_ptr(stream);
    let (out, _out) = out.device_ptr_mut(stream);
    launch(OP, stream, &SiluMulLaunch { out, gate_up, rows, inter })
}

/// The longest `inter` `kernels/activation.cu` takes.
const MAX_INTER: usize = 1 << 30;

/// Checks one call's lengths against `inter` and returns the row count.
fn check_shapes(op: &str, gate_up: usize, inter: usize, out: usize) -> Result<usize> {
    let fail = |msg: String| Err(Error::Backend(format!("{op}: {msg}")));
    if inter == 0 || inter > MAX_INTER {
        return fail(format!("inter is {inter}, must be in 1..=2^30"));
    }
    if !gate_up.is_multiple_of(2 * inter) {
        return fail(format!("`gate_up` has {gate_up} elements, not a multiple of 2 x inter = {}", 2 * inter));
    }
    let rows = gate_up / (2 * inter);
    if rows > i32::MAX as usize {
        return fail(format!("{rows} rows, at most 2^31-1 are supported"));
    }
    if out != rows * inter {
        return fail(format!("`out` has {out} elements, expected {rows} rows x inter {inter} = {}", rows * inter));
    }
    Ok(rows)
}

/// One checked call, as the device pointers and sizes `l32_activation_params` carries.
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
struct SiluMulLaunch {
    out: u64,
    gate_up: u64,
    rows: usize,
    inter: usize,
}

#[cfg(llama32_cuda)]
fn launch(op: &str, stream: &CudaStream, l: &SiluMulLaunch) -> Result<()> {
    use super::ffi;
    use std::ffi::c_void;
    // Both fit in i64: check_shapes bounds rows by 2^31 - 1 and inter by 2^30.
    let params = ffi::l32_activation_params {
        out: l.out as *mut c_void,
        gate_up: l.gate_up as *const c_void,
        rows: l.rows as i64,
        inter: l.inter as i64,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: both pointers come from live device slices on this stream's device whose lengths check_shapes matched
    // to rows x 2 inter and rows x inter; the caller holds the slices' stream guards until after this launch.
    let status = unsafe { ffi::l32_silu_mul(&params, raw) };
    super::check_launch(op, stream, status, || format!("{op} (rows {}, inter {})", l.rows, l.inter))
}

#[cfg(not(llama32_cuda))]
fn launch(_op: &str, _stream: &CudaStream, _launch: &SiluMulLaunch) -> Result<()> {
    super::ensure_built()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_matching_shapes() {
        assert_eq!(check_shapes("op", 3 * 16, 8, 24).unwrap(), 3);
        assert_eq!(check_shapes("op", 0, 8, 0).unwrap(), 0);
    }

    #[test]
    fn rejects_each_bad_operand_by_name() {
        assert!(check_shapes("op", 48, 0, 24).unwrap_err().to_string().contains("inter is 0"));
        assert!(check_shapes("op", 40, 8, 20).unwrap_err().to_string().contains("`gate_up`"));
        assert!(check_shapes("op", 48, 8, 16).unwrap_err().to_string().contains("`out`"));
    }
}
