//! The generic attention over gathered keys (`kernels/vision/attention.cu`, f32 on the CUDA cores): any head_dim
//! that is a multiple of 8 up to [`MAX_GATHER_HEAD_DIM`], paged or one block per sequence, with an optional additive
//! flag mask. The vision encoder uses it for the head widths the tensor-core
//! [`super::encoder_attention`] is not built for. Its CPU twin is
//! [`crate::vision::cuda::twins::gather_attention`]; the GPU tests in `tests/gpu/cuda_vision.rs` compare them.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::vision::{fail, want_len};
use crate::Result;

/// The largest head_dim [`gather_attention`] takes.
pub const MAX_GATHER_HEAD_DIM: usize = 256;

/// Geometry and layout of one [`gather_attention`] call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GatherAttnShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (`num_heads` is a multiple).
    pub num_kv_heads: usize,
    /// Head width, a multiple of 8 up to [`MAX_GATHER_HEAD_DIM`].
    pub head_dim: usize,
    /// Keys per block of the tables.
    pub block_size: usize,
    /// Entries per block-table row.
    pub max_blocks_per_seq: usize,
    /// Elements between query rows (a multiple of 8).
    pub q_stride: usize,
    /// Elements between output rows.
    pub out_stride: usize,
    /// Elements between key (and value) slots (a multiple of 8).
    pub kv_stride: usize,
    /// Softmax scale.
    pub scale: f32,
}

/// The operands of [`gather_attention`].
pub struct GatherAttnIo<'a, B: DevicePtr<bf16>, U: DevicePtr<u32>, F: DevicePtr<u8>> {
    /// `[tokens, q_stride]`.
    pub q: &'a B,
    /// Key slots (`k.len() / kv_stride` of them, rounded down).
    pub k: &'a B,
    /// Value slots, as many as `k`.
    pub v: &'a B,
    /// `[tokens]`: the sequence (block-table row) of each query.
    pub seq_of_query: &'a U,
    /// `[tokens]`: query `i` attends keys `0..=positions[i]`.
    pub positions: &'a U,
    /// `[seqs, max_blocks_per_seq]`.
    pub block_tables: &'a U,
    /// `(query_flags [tokens], key_flags [slots])`: `-FLT_MAX` where both are set; or `None`.
    pub flags: Option<(&'a F, &'a F)>,
}

/// Generic attention over gathered keys (see the header); `out`: `[tokens, out_stride]` bf16, each query's heads
/// written. Block-table entries are trusted (a slot past the buffers is skipped by the kernel).
pub fn gather_attention<B, U, F>(
    stream: &CudaStream,
    s: &GatherAttnShape,
    io: &GatherAttnIo<'_, B, U, F>,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()>
where
    B: DevicePtr<bf16>,
    U: DevicePtr<u32>,
    F: DevicePtr<u8>,
{
    const OP: &str = "gather_attention";
    super::ensure_built()?;
    let hd = s.head_dim;
    if hd == 0 || !hd.is_multiple_of(8) || hd > MAX_GATHER_HEAD_DIM {
        return fail(OP, format!("head_dim {hd} unsupported (a multiple of 8 up to {MAX_GATHER_HEAD_DIM})"));
    }
    if s.num_kv_heads == 0 || !s.num_heads.is_multiple_of(s.num_kv_heads) || s.num_heads == 0 {
        return fail(OP, format!("{} heads / {} kv heads", s.num_heads, s.num_kv_heads));
    }
    if s.block_size == 0 || s.block_size > i32::MAX as usize || s.max_blocks_per_seq == 0 {
        return fail(OP, format!("block_size {} / max_blocks_per_seq {}", s.block_size, s.max_blocks_per_seq));
    }
    if !s.q_stride.is_multiple_of(8) || s.q_stride < s.num_heads * hd || s.out_stride < s.num_heads * hd {
        return fail(OP, format!("q stride {} / out stride {} too short or misaligned", s.q_stride, s.out_stride));
    }
    if !s.kv_stride.is_multiple_of(8) || s.kv_stride < s.num_kv_heads * hd {
        return fail(OP, format!("kv stride {} too short or not a multiple of 8", s.kv_stride));
    }
    if !(s.scale > 0.0 && s.scale.is_finite()) {
        return fail(OP, format!("scale {}", s.scale));
    }
    let tokens = io.positions.len();
    if tokens * s.num_heads > i32::MAX as usize {
        return fail(OP, format!("{tokens} tokens x {} heads is too many", s.num_heads));
    }
    want_len(OP, "seq_of_query", io.seq_of_query.len(), tokens)?;
    if tokens > 0 {
        want_len(OP, "q", io.q.len(), (tokens - 1) * s.q_stride + s.num_heads * hd)?;
        want_len(OP, "out", out.len(), (tokens - 1) * s.out_stride + s.num_heads * hd)?;
    }
    if io.block_tables.len() < s.max_blocks_per_seq || io.block_tables.len() % s.max_blocks_per_seq != 0 {
        return fail(OP, format!("`block_tables` has {} entries", io.block_tables.len()));
    }
    if io.v.len() != io.k.len() {
        return fail(OP, format!("`v` has {} elements, `k` {}", io.v.len(), io.k.len()));
    }
    // Slots whose whole kv-head row lies inside the buffers.
    let slots = (io.k.len() + s.kv_stride - s.num_kv_heads * hd) / s.kv_stride;
    let operands = [
        ("q", io.q.stream()),
        ("k", io.k.stream()),
        ("v", io.v.stream()),
        ("seq_of_query", io.seq_of_query.stream()),
        ("positions", io.positions.stream()),
        ("block_tables", io.block_tables.stream()),
        ("out", out.stream()),
    ];
    super::check_same_device(OP, stream, &operands)?;
    let (mut qf, mut kf) = (0, 0);
    let (_gq, _gk);
    if let Some((qflags, kflags)) = io.flags {
        want_len(OP, "query_flags", qflags.len(), tokens)?;
        want_len(OP, "key_flags", kflags.len(), slots)?;
        super::check_same_device(OP, stream, &[("query_flags", qflags.stream()), ("key_flags", kflags.stream())])?;
        let (p, g) = qflags.device_ptr(stream);
        qf = p;
        _gq = g;
        let (p, g) = kflags.device_ptr(stream);
        kf = p;
        _gk = g;
    }
    if tokens == 0 {
        return Ok(());
    }
    let (q, _a) = io.q.device_ptr(stream);
    let (k, _b) = io.k.device_ptr(stream);
    let (v, _c) = io.v.device_ptr(stream);
    let (sq, _d) = io.seq_of_query.device_ptr(stream);
    let (pos, _e) = io.positions.device_ptr(stream);
    let (bt, _f) = io.block_tables.device_ptr(stream);
    let (o, _g) = out.device_ptr_mut(stream);
    if k % 16 != 0 || v % 16 != 0 {
        return fail(OP, "`k` and `v` must be 16-byte aligned".into());
    }
    imp::gather_attention(OP, stream, s, [o, q, k, v, sq, pos, bt, kf, qf], tokens, slots)
}

#[cfg(llama32_cuda)]
mod imp {
    use std::ffi::c_void;

    use cudarc::driver::CudaStream;

    use super::super::ffi;
    use super::GatherAttnShape;
    use crate::Result;

    pub(super) fn gather_attention(
        op: &str,
        stream: &CudaStream,
        s: &GatherAttnShape,
        p: [u64; 9],
        tokens: usize,
        slots: usize,
    ) -> Result<()> {
        let [out, q, k, v, sq, pos, bt, kf, qf] = p;
        let params = ffi::l32_gather_attention_params {
            out: out as *mut c_void,
            q: q as *const c_void,
            k: k as *const c_void,
            v: v as *const c_void,
            seq_of_query: sq as *const u32,
            positions: pos as *const u32,
            block_tables: bt as *const u32,
            key_flags: kf as *const u8,
            query_flags: qf as *const u8,
            tokens: tokens as i64,
            q_stride: s.q_stride as i64,
            out_stride: s.out_stride as i64,
            kv_stride: s.kv_stride as i64,
            num_slots: slots as i64,
            max_blocks_per_seq: s.max_blocks_per_seq as i64,
            num_heads: s.num_heads as i32,
            num_kv_heads: s.num_kv_heads as i32,
            head_dim: s.head_dim as i32,
            block_size: s.block_size as i32,
            scale: s.scale,
        };
        let raw = super::super::raw_stream(op, stream)?;
        // SAFETY: every pointer comes from a live device buffer whose length the wrapper checked; slots past the
        // buffers are skipped by the kernel.
        let status = unsafe { ffi::l32_gather_attention(&params, raw) };
        super::super::check_launch(op, stream, status, || format!("{op} ({tokens} tokens, {s:?})"))
    }
}

#[cfg(not(llama32_cuda))]
mod imp {
    use cudarc::driver::CudaStream;

    use super::GatherAttnShape;
    use crate::Result;

    pub(super) fn gather_attention(
        _: &str,
        _: &CudaStream,
        _: &GatherAttnShape,
        _: [u64; 9],
        _: usize,
        _: usize,
    ) -> Result<()> {
        super::super::ensure_built()
    }
}
