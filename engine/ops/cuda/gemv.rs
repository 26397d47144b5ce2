//! The skinny GEMM of decode on CUDA (`kernels/gemv.cu`, family `gemv`): `out = x @ w^T` for 1 to 16 rows of `x`,
//! the twin of [`crate::ops::cpu::linear::linear`] with the same dimensions after the stream.
//!
//! At decode batch sizes a Linear layer is a weight-streaming problem; the kernel streams `w` once with 16-byte
//! loads and does the products on the tensor cores (bf16 in, f32 accumulate, one bf16 rounding of each output), in
//! a fixed order (no atomics). The executor calls [`supports`] first and falls back to cuBLASLt where it is false.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::{Error, Result};

/// The most rows of `x` the kernel takes.
pub const MAX_M: usize = 16;
/// The longest `k` the kernel takes.
const MAX_K: usize = 1 << 24;
/// The most output columns `n` the kernel takes.
const MAX_N: usize = i32::MAX as usize;
/// Output columns (rows of `w`) per thread block, as in `kernels/gemv.cu`.
const TILE_ROWS: usize = 16;

/// The most shared memory the norm prologue stages its normalized rows in (`L32_GEMV_NORM_MAX_SMEM`): sm_89's
/// 99 KB per block less the kernel's own static shared memory (up to 16464 bytes).
const NORM_MAX_SMEM: usize = 82 * 1024;
/// The longest row the norm prologue takes (l32_norm's in-register rows: 8 vectors of 8 for each of 512 threads).
pub(crate) const NORM_MAX_K: usize = 8 * 8 * 512;

/// The input rows of a gemv-family call ([`gemv`], [`gemv_gate_up_silu`], [`gemv_qkv_rope`]): `x` in device memory
/// (any bf16 device slice), or a [`NormPrologue`], whose normalized rows the kernel computes first.
pub trait GemvInput {
    /// Elements available as `x` (a prologue: exactly its `m * k`).
    fn input_len(&self) -> usize;
    /// Checks the input against `op`'s stream, then calls `f` with the launch's `x` pointer and the prologue (if
    /// any), holding whatever stream guards the input needs until `f` returns.
    fn with_input<R>(
        &self,
        op: &str,
        stream: &CudaStream,
        f: impl FnOnce(u64, Option<&NormPrologue>) -> Result<R>,
    ) -> Result<R>;
}

impl<T: DevicePtr<bf16>> GemvInput for T {
    fn input_len(&self) -> usize {
        self.len()
    }

    fn with_input<R>(
        &self,
        op: &str,
        stream: &CudaStream,
        f: impl FnOnce(u64, Option<&NormPrologue>) -> Result<R>,
    ) -> Result<R> {
        super::check_same_device(op, stream, &[("x", self.stream())])?;
        let (x, _x) = self.device_ptr(stream);
        f(x, None)
    }
}

/// The RMSNorm prologue of the gemv family: the kernel multiplies `rms_norm(residual + delta)` (or
/// `rms_norm(residual)` without `delta`) instead of a stored `x`, normalizing the rows into shared memory in every
/// block, bit for bit what [`super::norm::add_rms_norm`] / [`super::norm::rms_norm`] write. With `delta` it also
/// updates `residual` to `bf16(residual + delta)` as the fused add does (the last block to finish its prologue
/// writes it, after every block has read it). One kernel and one `[m, k]` round trip less per norm at decode.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
pub struct NormPrologue {
    residual: u64,
    delta: u64,
    weight: u64,
    counter: u64,
    eps: f32,
    m: usize,
    k: usize,
    ordinal: usize,
}

impl NormPrologue {
    /// True when the prologue takes `m` rows of width `k`: [`supports`], `k` at most 32768, and the normalized rows
    /// (`m * (k + 8)` bf16) within 82 KB of shared memory (with the kernel's own 16 KB, what an sm_89 block may opt
    /// into).
    pub fn fits(m: usize, k: usize) -> bool {
        supports(m, k) && k <= NORM_MAX_K && m * (k + 8) * 2 <= NORM_MAX_SMEM
    }

    /// The prologue over `m` rows of width `k` of `residual`, with the norm `weight` (`[k]`) and `eps`; with
    /// `delta` (`[m, k]`), the residual add first and the residual update, which needs `counter` (one u32, zero:
    /// each launch leaves it zero again, so a CUDA graph can replay it). Errors name the operand at fault.
    ///
    /// # Safety
    /// The prologue keeps raw device pointers. Until the launch that takes it has run (in stream order), every
    /// operand must stay allocated, nothing may write `delta` or `weight`, and nothing but that launch may touch
    /// `residual` or `counter`. It is for one launch.
    #[allow(clippy::too_many_arguments)] // the operands of the fused norm
    pub unsafe fn new(
        stream: &CudaStream,
        residual: &mut impl DevicePtrMut<bf16>,
        delta: Option<&impl DevicePtr<bf16>>,
        weight: &impl DevicePtr<bf16>,
        counter: Option<&mut impl DevicePtrMut<u32>>,
        eps: f32,
        (m, k): (usize, usize),
    ) -> Result<Self> {
        const OP: &str = "gemv norm prologue";
        let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
        if !Self::fits(m, k) {
            return fail(format!(
                "{m} rows of {k}: needs m in 1..={MAX_M}, k a multiple of 8 up to {NORM_MAX_K}, and m * (k + 8) * 2 \
                 <= {NORM_MAX_SMEM} bytes"
            ));
        }
        if !(eps >= 0.0 && eps.is_finite()) {
            return fail(format!("eps is {eps}, must be finite and >= 0"));
        }
        if residual.len() < m * k {
            return fail(format!("`residual` has {} elements, needs {m} x {k}", residual.len()));
        }
        if weight.len() < k {
            return fail(format!("`weight` has {} elements, needs {k}", weight.len()));
        }
        let mut operands = vec![("residual", residual.stream()), ("weight", weight.stream())];
        if let Some(d) = delta {
            if d.len() < m * k {
                return fail(format!("`delta` has {} elements, needs {m} x {k}", d.len()));
            }
            operands.push(("delta", d.stream()));
        }
        let counter = match (delta.is_some(), counter) {
            (false, _) => None,
            (true, None) => return fail("a residual add needs a counter".into()),
            (true, Some(c)) if c.len() == 0 => return fail("`counter` is empty".into()),
            (true, Some(c)) => Some(c),
        };
        if let Some(c) = counter.as_ref() {
            operands.push(("counter", c.stream()));
        }
        super::check_same_device(OP, stream, &operands)?;
        let (residual_ptr, _r) = residual.device_ptr_mut(stream);
        let (weight_ptr, _w) = weight.device_ptr(stream);
        let delta_ptr = delta.map(|d| d.device_ptr(stream).0).unwrap_or(0);
        let counter_ptr = counter.map(|c| c.device_ptr_mut(stream).0).unwrap_or(0);
        for (name, ptr) in [("residual", residual_ptr), ("weight", weight_ptr), ("delta", delta_ptr)] {
            if ptr % 16 != 0 {
                return fail(format!("`{name}` starts at {ptr:#x}, not 16-byte aligned"));
            }
        }
        Ok(NormPrologue {
            residual: residual_ptr,
            delta: delta_ptr,
            weight: weight_ptr,
            counter: counter_ptr,
            eps,
            m,
            k,
            ordinal: stream.context().ordinal(),
        })
    }

    /// Rows of the prologue.
    pub fn rows(&self) -> usize {
        self.m
    }
}

impl GemvInput for NormPrologue {
    fn input_len(&self) -> usize {
        self.m * self.k
    }

    fn with_input<R>(
        &self,
        op: &str,
        stream: &CudaStream,
        f: impl FnOnce(u64, Option<&NormPrologue>) -> Result<R>,
    ) -> Result<R> {
        let ordinal = stream.context().ordinal();
        if self.ordinal != ordinal {
            return Err(Error::Backend(format!(
                "{op}: the norm prologue is on device {} but the stream is on device {ordinal}",
                self.ordinal
            )));
        }
        f(self.residual, Some(self))
    }
}

/// True when [`gemv`] takes `m` rows of `x` with inner dimension `k`: `m` in `1..=16` and `k` a positive multiple
/// of 8 (up to 2^24). The operands must also be 16-byte aligned, which every cudarc allocation is.
pub fn supports(m: usize, k: usize) -> bool {
    (1..=MAX_M).contains(&m) && k > 0 && k.is_multiple_of(8) && k <= MAX_K
}

/// Warps per thread block (which split `k`), given `n` output columns and `sms` streaming multiprocessors.
///
/// A block owns 16 output columns. When all blocks fit on the SMs one per SM (`ceil(n / 16) <= sms`: n = 2048 on
/// an H100's 132 SMs) each gets 16 warps, so every SM keeps 64 KB of weight in flight; otherwise 8 warps, two blocks
/// fit per SM and more blocks run at once (n = 3072: all 192 at once on an H100).
pub fn warps_per_block(n: usize, sms: usize) -> usize {
    if n.div_ceil(TILE_ROWS) <= sms {
        16
    } else {
        8
    }
}

thread_local! {
    /// The warp count [`with_warps`] forces on this thread's launches, if any.
    static FORCED_WARPS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every gemv-family launch this thread makes taking `warps` warps per block (8 or 16) instead of
/// [`warps_per_block`]'s choice, then restores the choice (also when `f` panics). The warps split `k`, so the
/// bits depend on it: this is for A/B timings and for comparing against kernels that split `k` the same way (the
/// persistent decode stack, [`super::decode_layers`], runs 8-warp tiles).
pub fn with_warps<R>(warps: usize, f: impl FnOnce() -> R) -> Result<R> {
    if !matches!(warps, 8 | 16) {
        return Err(Error::request(format!("gemv warps per block is {warps}, must be 8 or 16")));
    }
    Ok(super::with_override(&FORCED_WARPS, warps, f))
}

/// The warps per block of a launch with `n` output rows: [`with_warps`]'s, else [`warps_per_block`]'s.
fn block_warps(n: usize, stream: &CudaStream) -> Result<usize> {
    match FORCED_WARPS.with(std::cell::Cell::get) {
        Some(w) => Ok(w),
        None => Ok(warps_per_block(n, num_sms(stream)?)),
    }
}

/// `out[i, j] = bf16(sum_c x[i, c] * w[j, c])` for `i < m`, `j < n`: a Linear layer with `w` in PyTorch's
/// `[out_features, in_features]` layout.
///
/// - `x`: at least `[m, k]` (the first `m * k` elements are used); `w`: at least `[n, k]`; `out`: at least `[m, n]`,
///   its first `m * n` elements written. `x` and `w` must start 16-byte aligned; `out` must not overlap either.
/// - `m` in `1..=16` and `k` a multiple of 8 ([`supports`]); `n = 0` launches nothing.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn gemv(
    stream: &CudaStream,
    x: &impl GemvInput,
    w: &impl DevicePtr<bf16>,
    m: usize,
    k: usize,
    n: usize,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    gemv_impl("gemv", stream, (x, false), w, (m, k, n), out)
}

/// SwiGLU's gate_up projection and activation in one kernel: `out[i, j] = bf16(silu(g) * u)`, where `g` and `u`
/// are the bf16 outputs [`gemv`] gives for rows `j` and `n + j` of `w` (`[2 n, k]`: gate rows, then up rows).
/// The bits are those of [`gemv`] into a `[m, 2 n]` buffer followed by [`super::activation::silu_mul`], with one
/// launch and no round trip of that buffer through memory.
///
/// `w` must hold at least `2 n * k` elements and `out` `m * n`; `n` at most 2^30 - 1; the rest is as in [`gemv`].
pub fn gemv_gate_up_silu(
    stream: &CudaStream,
    x: &impl GemvInput,
    w: &impl DevicePtr<bf16>,
    m: usize,
    k: usize,
    n: usize,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    gemv_impl("gemv_gate_up_silu", stream, (x, true), w, (m, k, n), out)
}

/// The checked launch behind [`gemv`] and [`gemv_gate_up_silu`] (`pairs`: `w` is `[2 n, k]`, gate then up).
fn gemv_impl(
    op: &str,
    stream: &CudaStream,
    (x, pairs): (&impl GemvInput, bool),
    w: &impl DevicePtr<bf16>,
    (m, k, n): (usize, usize, usize),
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    super::ensure_built()?;
    check_shapes(op, (m, k, n), (x.input_len(), w.len(), out.len()), pairs)?;
    super::check_same_device(op, stream, &[("w", w.stream()), ("out", out.stream())])?;
    x.with_input(op, stream, |x, norm| {
        check_prologue(op, norm, (m, k, n))?;
        if n == 0 {
            return Ok(());
        }
        // The warp count of the plain gemv over all 2 n rows, so the k split (and the bits) are the same.
        let rows = if pairs { 2 * n } else { n };
        let warps = block_warps(rows, stream)?;
        let (w, _w) = w.device_ptr(stream);
        for (name, ptr) in [("x", x), ("w", w)] {
            if ptr % 16 != 0 {
                return Err(Error::Backend(format!("{op}: `{name}` starts at {ptr:#x}, not 16-byte aligned")));
            }
        }
        let (out, _out) = out.device_ptr_mut(stream);
        launch(op, stream, &GemvLaunch { out, x, w, m, k, n, warps, pairs, norm: norm.copied() }, None)
    })
}

/// A prologue must cover exactly the call's rows, and a residual update needs a launch (at least one output).
fn check_prologue(op: &str, norm: Option<&NormPrologue>, (m, k, n): (usize, usize, usize)) -> Result<()> {
    match norm {
        Some(p) if (p.m, p.k) != (m, k) => Err(Error::Backend(format!(
            "{op}: the norm prologue covers {} rows of {}, the call {m} rows of {k}",
            p.m, p.k
        ))),
        Some(p) if p.delta != 0 && n == 0 => {
            Err(Error::Backend(format!("{op}: a norm prologue with a residual add needs n >= 1 to run")))
        }
        _ => Ok(()),
    }
}

/// The decode QKV projection with RoPE and the paged KV-cache write in its epilogue: what [`gemv`] into `qkv`
/// followed by [`super::rope::rope_kv_write`] gives, bit for bit, for the parts that are read afterwards. The q
/// heads of `qkv` are written rotated; the rotated k heads and the v heads go to cache slot `slot_mapping[i]` of
/// each token (none for [`super::rope::PAD_SLOT`]); the k and v parts of `qkv` are left unwritten. One launch and
/// no round trip of the fused row, for `m` decode tokens (1 to 16, `m` = `positions.len()`).
///
/// - `w`: the fused `[(num_heads + 2 num_kv_heads) head_dim, k]` projection; `shape.qkv_stride` must be that row
///   width, and `head_dim` a multiple of 16 (64 and 128 are).
/// - The other operands are those of [`super::rope::rope_kv_write`], with the same checks.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
#[allow(clippy::too_many_arguments)] // the operands of gemv and of rope_kv_write
pub fn gemv_qkv_rope(
    stream: &CudaStream,
    x: &impl GemvInput,
    w: &impl DevicePtr<bf16>,
    (m, k): (usize, usize),
    shape: &super::rope::RopeKvShape,
    qkv: &mut impl DevicePtrMut<bf16>,
    (positions, slot_mapping, inv_freq): (&impl DevicePtr<u32>, &impl DevicePtr<u32>, &impl DevicePtr<f32>),
    cache: super::rope::KvCacheMut<'_, impl DevicePtrMut<bf16>, impl DevicePtrMut<bf16>>,
) -> Result<()> {
    const OP: &str = "gemv_qkv_rope";
    super::ensure_built()?;
    let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
    let l = shape.layout;
    let n = (l.num_heads + 2 * l.num_kv_heads) * l.head_dim;
    if l.head_dim == 0 || !l.head_dim.is_multiple_of(16) {
        return fail(format!("head_dim is {}, must be a positive multiple of 16", l.head_dim));
    }
    if shape.qkv_stride != n {
        return fail(format!("qkv_stride is {}, must be the fused row width {n}", shape.qkv_stride));
    }
    if positions.len() != m {
        return fail(format!("`positions` has {} entries, expected one per row of x ({m})", positions.len()));
    }
    check_shapes(OP, (m, k, n), (x.input_len(), w.len(), qkv.len()), false)?;
    super::check_same_device(OP, stream, &[("w", w.stream())])?;
    let warps = block_warps(n, stream)?;
    x.with_input(OP, stream, |x, norm| {
        check_prologue(OP, norm, (m, k, n))?;
        let (w, _w) = w.device_ptr(stream);
        for (name, ptr) in [("x", x), ("w", w)] {
            if ptr % 16 != 0 {
                return fail(format!("`{name}` starts at {ptr:#x}, not 16-byte aligned"));
            }
        }
        let operands = (positions, slot_mapping, inv_freq);
        let no_flag = None::<&mut cudarc::driver::CudaSlice<u32>>;
        super::rope::with_checked(stream, OP, shape, qkv, operands, cache, no_flag, |p, tokens, slots| {
            let g = GemvLaunch { out: p.qkv, x, w, m, k, n, warps, pairs: false, norm: norm.copied() };
            launch(OP, stream, &g, Some((shape, p, tokens, slots)))
        })
    })
}

/// The RoPE epilogue's operands: the geometry, the checked pointers, the tokens and the cache slots.
type RopeArgs<'a> = (&'a super::rope::RopeKvShape, &'a super::rope::RopePtrs, usize, usize);

/// Streaming multiprocessors of the stream's device.
fn num_sms(stream: &CudaStream) -> Result<usize> {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
    let n = stream
        .context()
        .attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| Error::Backend(format!("gemv: querying the SM count: {e}")))?;
    Ok(n.max(1) as usize)
}

/// Checks the dimensions `(m, k, n)` and the operand lengths `(x, w, out)`; with `pairs`, w is `[2 n, k]`.
fn check_shapes(
    op: &str,
    (m, k, n): (usize, usize, usize),
    (x, w, out): (usize, usize, usize),
    pairs: bool,
) -> Result<()> {
    let fail = |msg: String| Err(Error::Backend(format!("{op}: {msg}")));
    if !(1..=MAX_M).contains(&m) {
        return fail(format!("m is {m}, must be in 1..={MAX_M} (use the GEMM for more rows)"));
    }
    if k == 0 || k % 8 != 0 || k > MAX_K {
        return fail(format!("k is {k}, must be a positive multiple of 8 up to 2^24"));
    }
    let max_n = if pairs { MAX_N / 2 } else { MAX_N };
    if n > max_n {
        return fail(format!("n is {n}, at most {max_n} is supported"));
    }
    let need = |name: &str, have: usize, rows: usize, cols: usize| match rows.checked_mul(cols) {
        Some(len) if have >= len => Ok(()),
        _ => fail(format!("`{name}` has {have} elements, needs at least {rows} x {cols}")),
    };
    need("x", x, m, k)?;
    need("w", w, if pairs { 2 * n } else { n }, k)?;
    need("out", out, m, n)
}

/// One checked call, as the device pointers and sizes `l32_gemv_params` carries.
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
struct GemvLaunch {
    out: u64,
    x: u64,
    w: u64,
    m: usize,
    k: usize,
    n: usize,
    warps: usize,
    pairs: bool,
    norm: Option<NormPrologue>,
}

#[cfg(llama32_cuda)]
fn launch(op: &str, stream: &CudaStream, l: &GemvLaunch, rope: Option<RopeArgs<'_>>) -> Result<()> {
    use super::ffi;
    use std::ffi::c_void;
    let rope_params = match rope {
        Some((shape, p, tokens, slots)) => super::rope::params(shape, p, tokens, slots),
        // SAFETY: l32_rope_params is plain C data (pointers, integers, and a dtype enum whose 0 is BF16); all zeros
        // is a valid value, and the kernel reads none of it without rope_on.
        None => unsafe { std::mem::zeroed() },
    };
    // All fit in their C types: check_shapes bounds m by 16, k by 2^24 and n by 2^31 - 1 (2^30 - 1 with pairs);
    // warps is 8 or 16.
    let params = ffi::l32_gemv_params {
        out: l.out as *mut c_void,
        x: l.x as *const c_void,
        w: l.w as *const c_void,
        m: l.m as i64,
        k: l.k as i64,
        n: l.n as i64,
        warps: l.warps as i32,
        silu_pairs: i32::from(l.pairs),
        rope_on: i32::from(rope.is_some()),
        rope: rope_params,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
        norm: match &l.norm {
            Some(n) => ffi::l32_gemv_norm {
                weight: n.weight as *const c_void,
                delta: n.delta as *const c_void,
                counter: n.counter as *mut u32,
                eps: n.eps,
            },
            None => ffi::l32_gemv_norm {
                weight: std::ptr::null(),
                delta: std::ptr::null(),
                counter: std::ptr::null_mut(),
                eps: 0.0,
            },
        },
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: the three pointers come from live device slices on this stream's device whose lengths check_shapes
    // matched to at least m x k, n x k (2 n x k with pairs) and m x n; x and w were checked 16-byte aligned; with
    // RoPE, rope::with_checked checked its operands (the kernel writes no cache slot at or past num_slots). The
    // callers hold the slices' stream guards until after this launch. A norm prologue's pointers were checked by
    // NormPrologue::new, whose caller keeps them valid and unshared until this launch (its safety contract).
    let status = unsafe { ffi::l32_gemv(&params, raw) };
    super::check_launch(op, stream, status, || format!("{op} (m {}, k {}, n {})", l.m, l.k, l.n))
}

#[cfg(not(llama32_cuda))]
fn launch(_op: &str, _stream: &CudaStream, _launch: &GemvLaunch, _rope: Option<RopeArgs<'_>>) -> Result<()> {
    super::ensure_built()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_warps_forces_the_count_on_this_thread_only_and_restores_it() {
        assert!(with_warps(12, || ()).is_err());
        let seen = with_warps(8, || {
            let inner = with_warps(16, || FORCED_WARPS.with(std::cell::Cell::get)).unwrap();
            let other = std::thread::spawn(|| FORCED_WARPS.with(std::cell::Cell::get)).join().unwrap();
            (FORCED_WARPS.with(std::cell::Cell::get), inner, other)
        })
        .unwrap();
        assert_eq!(seen, (Some(8), Some(16), None));
        assert_eq!(FORCED_WARPS.with(std::cell::Cell::get), None);
        let caught = std::panic::catch_unwind(|| with_warps(8, || panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(FORCED_WARPS.with(std::cell::Cell::get), None);
    }

    #[test]
    fn supports_the_decode_shapes_only() {
        for m in 1..=16 {
            for k in [8, 2048, 3072, 8192] {
                assert!(supports(m, k), "m {m} k {k}");
            }
        }
        assert!(!supports(0, 2048));
        assert!(!supports(17, 2048));
        assert!(!supports(1, 0));
        assert!(!supports(1, 12));
        assert!(!supports(1, 2049));
        assert!(!supports(1, (1 << 24) + 8));
    }

    #[test]
    fn norm_prologue_fits_the_decode_rows_of_every_llama_width() {
        // 1B / 3B / 11B / 90B hidden sizes at decode batch sizes, within 82 KB of shared memory.
        assert!(NormPrologue::fits(16, 2048));
        assert!(NormPrologue::fits(13, 3072) && !NormPrologue::fits(14, 3072));
        assert!(NormPrologue::fits(10, 4096) && !NormPrologue::fits(11, 4096));
        assert!(NormPrologue::fits(5, 8192) && !NormPrologue::fits(6, 8192));
        // l32_norm's in-register rows end at 32768; the gemv's own limits still apply.
        assert!(NormPrologue::fits(1, 32768) && !NormPrologue::fits(1, 32776));
        assert!(!NormPrologue::fits(0, 64) && !NormPrologue::fits(17, 64) && !NormPrologue::fits(1, 12));
    }

    #[test]
    fn picks_16_warps_only_when_every_block_has_its_own_sm() {
        assert_eq!(warps_per_block(2048, 132), 16);
        assert_eq!(warps_per_block(2112, 132), 16);
        assert_eq!(warps_per_block(2113, 132), 8);
        assert_eq!(warps_per_block(3072, 132), 8);
        assert_eq!(warps_per_block(128_256, 132), 8);
        assert_eq!(warps_per_block(7, 1), 16);
    }

    #[test]
    fn accepts_matching_or_longer_operands() {
        assert!(check_shapes("op", (3, 16, 5), (48, 80, 15), false).is_ok());
        assert!(check_shapes("op", (3, 16, 5), (100, 100, 100), false).is_ok());
        assert!(check_shapes("op", (16, 8, 0), (128, 0, 0), false).is_ok());
        // SwiGLU pairs: w holds 2 n rows.
        assert!(check_shapes("op", (3, 16, 5), (48, 160, 15), true).is_ok());
    }

    #[test]
    fn rejects_each_bad_operand_by_name() {
        let err = |dims, lens| check_shapes("op", dims, lens, false).unwrap_err().to_string();
        assert!(err((0, 16, 5), (0, 80, 0)).contains("m is 0"));
        assert!(err((17, 16, 5), (272, 80, 85)).contains("m is 17"));
        assert!(err((1, 12, 5), (12, 60, 5)).contains("k is 12"));
        assert!(err((1, 0, 5), (0, 0, 5)).contains("k is 0"));
        assert!(err((3, 16, 5), (47, 80, 15)).contains("`x`"));
        assert!(err((3, 16, 5), (48, 79, 15)).contains("`w`"));
        assert!(err((3, 16, 5), (48, 80, 14)).contains("`out`"));
        let e = check_shapes("op", (3, 16, 5), (48, 159, 15), true).unwrap_err().to_string();
        assert!(e.contains("`w` has 159 elements, needs at least 10 x 16"), "{e}");
        let e = check_shapes("op", (1, 16, 1 << 30), (16, usize::MAX, usize::MAX), true).unwrap_err().to_string();
        assert!(e.contains("n is 1073741824, at most 1073741823"), "{e}");
    }
}
