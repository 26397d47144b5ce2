//! The vision encoder's self-attention on the tensor cores (`kernels/vision/encoder_attention.cu`): sequences of
//! `seq_len` consecutive rows (one image's tiles), every row attending to all rows of its own sequence, with the
//! optional flag mask of transformers' mllama (`-FLT_MAX` where both the query's and the key's flag are set).
//!
//! Its CPU twin is [`crate::vision::cuda::twins::gather_attention`] over one block per sequence (the layout the
//! CUDA-core [`super::vision::gather_attention`] serves for the head widths this kernel is not built for); the GPU
//! tests in `tests/gpu/cuda_vision.rs` compare them.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::{Error, Result};

/// Geometry of [`encoder_attention`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EncoderAttnShape {
    /// Sequences (images).
    pub num_seqs: usize,
    /// Rows per sequence.
    pub seq_len: usize,
    /// Heads (query and key/value alike).
    pub num_heads: usize,
    /// Head width: one [`encoder_attention_supports`] accepts.
    pub head_dim: usize,
    /// Elements between query rows (a multiple of 8).
    pub q_stride: usize,
    /// Elements between key (and value) rows (a multiple of 8).
    pub kv_stride: usize,
    /// Elements between output rows (even).
    pub out_stride: usize,
    /// Softmax scale.
    pub scale: f32,
}

/// The operands of [`encoder_attention`]: `[rows, stride]` bf16 views, `rows = num_seqs * seq_len`.
pub struct EncoderAttnIo<'a, B: DevicePtr<bf16>, F: DevicePtr<u8>> {
    /// Queries (`q_stride`).
    pub q: &'a B,
    /// Keys (`kv_stride`).
    pub k: &'a B,
    /// Values (`kv_stride`).
    pub v: &'a B,
    /// `[rows]` flags (padding patches / tiles), or `None` for no mask.
    pub flags: Option<&'a F>,
}

/// Whether the tensor-core kernel is built for `head_dim` (16, 32, 64, 80 and 128; the 11B / 90B encoders use 80).
pub fn encoder_attention_supports(head_dim: usize) -> bool {
    imp::supports(head_dim)
}

/// Non-causal attention within each sequence; `out`: `[rows, out_stride]`, each row's heads written.
pub fn encoder_attention<B, F>(
    stream: &CudaStream,
    s: &EncoderAttnShape,
    io: &EncoderAttnIo<'_, B, F>,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()>
where
    B: DevicePtr<bf16>,
    F: DevicePtr<u8>,
{
    const OP: &str = "encoder_attention";
    super::ensure_built()?;
    let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
    if !encoder_attention_supports(s.head_dim) {
        return fail(format!("head_dim {} is not built (16, 32, 64, 80, 128)", s.head_dim));
    }
    let width = s.num_heads * s.head_dim;
    if s.num_heads == 0 || s.num_heads > 65535 || s.num_seqs > 65535 || s.seq_len == 0 || s.seq_len > 1 << 30 {
        return fail(format!("{} heads, {} sequences of {} rows", s.num_heads, s.num_seqs, s.seq_len));
    }
    if !s.q_stride.is_multiple_of(8) || !s.kv_stride.is_multiple_of(8) || !s.out_stride.is_multiple_of(2) {
        return fail(format!("strides q {} / kv {} / out {} misaligned", s.q_stride, s.kv_stride, s.out_stride));
    }
    if s.q_stride < width || s.kv_stride < width || s.out_stride < width {
        return fail(format!("strides q {} / kv {} / out {} below {width}", s.q_stride, s.kv_stride, s.out_stride));
    }
    if !(s.scale > 0.0 && s.scale.is_finite()) {
        return fail(format!("scale {}", s.scale));
    }
    let rows = s.num_seqs * s.seq_len;
    if rows > 0 {
        let need = |stride: usize| (rows - 1) * stride + width;
        for (name, len, want) in [
            ("q", io.q.len(), need(s.q_stride)),
            ("k", io.k.len(), need(s.kv_stride)),
            ("v", io.v.len(), need(s.kv_stride)),
            ("out", out.len(), need(s.out_stride)),
        ] {
            if len < want {
                return fail(format!("`{name}` has {len} elements, needs {want}"));
            }
        }
    }
    let operands = [("q", io.q.stream()), ("k", io.k.stream()), ("v", io.v.stream()), ("out", out.stream())];
    super::check_same_device(OP, stream, &operands)?;
    let mut fl = 0;
    let _gf;
    if let Some(f) = io.flags {
        if f.len() < rows {
            return fail(format!("`flags` has {} entries, needs {rows}", f.len()));
        }
        super::check_same_device(OP, stream, &[("flags", f.stream())])?;
        let (p, g) = f.device_ptr(stream);
        fl = p;
        _gf = g;
    }
    if rows == 0 {
        return Ok(());
    }
    let (q, _a) = io.q.device_ptr(stream);
    let (k, _b) = io.k.device_ptr(stream);
    let (v, _c) = io.v.device_ptr(stream);
    let (o, _d) = out.device_ptr_mut(stream);
    if q % 16 != 0 || k % 16 != 0 || v % 16 != 0 || o % 4 != 0 {
        return fail("`q`, `k` and `v` must be 16-byte aligned, `out` 4-byte".into());
    }
    imp::launch(OP, stream, s, [o, q, k, v, fl])
}

#[cfg(llama32_cuda)]
mod imp {
    use std::ffi::c_void;

    use cudarc::driver::CudaStream;

    use super::super::ffi;
    use super::EncoderAttnShape;
    use crate::Result;

    pub(super) fn supports(head_dim: usize) -> bool {
        // SAFETY: a pure function of its argument.
        i32::try_from(head_dim).is_ok_and(|d| unsafe { ffi::l32_encoder_attention_supports(d) } != 0)
    }

    pub(super) fn launch(op: &str, stream: &CudaStream, s: &EncoderAttnShape, p: [u64; 5]) -> Result<()> {
        let [out, q, k, v, flags] = p;
        let params = ffi::l32_encoder_attention_params {
            out: out as *mut c_void,
            q: q as *const c_void,
            k: k as *const c_void,
            v: v as *const c_void,
            flags: flags as *const u8,
            q_stride: s.q_stride as i64,
            kv_stride: s.kv_stride as i64,
            out_stride: s.out_stride as i64,
            num_seqs: s.num_seqs as i64,
            seq_len: s.seq_len as i32,
            num_heads: s.num_heads as i32,
            head_dim: s.head_dim as i32,
            scale: s.scale,
        };
        let raw = super::super::raw_stream(op, stream)?;
        // SAFETY: every pointer comes from a live device buffer whose length the wrapper checked.
        let status = unsafe { ffi::l32_encoder_attention(&params, raw) };
        super::super::check_launch(op, stream, status, || format!("{op} ({s:?})"))
    }
}

#[cfg(not(llama32_cuda))]
mod imp {
    use cudarc::driver::CudaStream;

    use super::EncoderAttnShape;
    use crate::Result;

    pub(super) fn supports(_: usize) -> bool {
        false
    }

    pub(super) fn launch(_: &str, _: &CudaStream, _: &EncoderAttnShape, _: [u64; 5]) -> Result<()> {
        super::super::ensure_built()
    }
}
