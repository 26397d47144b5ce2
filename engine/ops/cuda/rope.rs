//! Fused QKV split + llama3 RoPE + paged KV-cache write on CUDA (`kernels/rope.cu`, family `rope`).
//!
//! The CPU executor does the same in two steps: [`crate::ops::cpu::rope::rope`] over the q and k heads of each
//! fused row (one block of `num_heads + num_kv_heads` heads), then [`crate::ops::cpu::attention::write_kv`] of the
//! rotated k and the v heads. This kernel does both in one pass, and leaves the k and v parts of `qkv` unchanged
//! (only the cache receives the rotated k).
//!
//! Numerics: the angle is the f32 product `float(position) * inv_freq[j]` (as transformers computes it), cos/sin
//! are the precise `sincosf` (angles exceed 1e5 rad at 128K context), and the rotation is computed in f32 from the
//! bf16 inputs and rounded to bf16 once. HF rounds cos/sin to bf16 and the rotation's products and sum in bf16, so
//! it may differ from this kernel by a few bf16 roundings; the CPU twin, in f32, differs by at most one.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::ops::cpu::attention::PagedLayout;
use crate::{Error, Result};

/// A `slot_mapping` entry for a padding token (a padded CUDA-graph batch): its q heads are rotated, no cache slot
/// is written. (`L32_PAD_SLOT` in `kernels/llama32_kernels.h`.)
pub const PAD_SLOT: u32 = u32::MAX;

/// The geometry of one [`rope_kv_write`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeKvShape {
    /// Heads, head_dim (even, at most 512; 64 and 128 are the tuned cases) and the cache's block size.
    pub layout: PagedLayout,
    /// Elements between rows of `qkv`, at least `(num_heads + 2 * num_kv_heads) * head_dim`.
    pub qkv_stride: usize,
}

/// One layer's K and V cache pools, each `[num_blocks, block_size, num_kv_heads, head_dim]` bf16.
pub struct KvCacheMut<'a, K, V> {
    /// The K pool.
    pub k: &'a mut K,
    /// The V pool.
    pub v: &'a mut V,
}

/// For each token `t`: rotates the q heads of `qkv` row `t` in place, and writes the rotated k heads and the v heads
/// to cache slot `slot_mapping[t]` (see the module doc for the numerics).
///
/// - `qkv`: `[tokens, qkv_stride]`, each row starting with `[q (num_heads * head_dim) | k | v (num_kv_heads *
///   head_dim each)]`; the q part is rotated in place, the rest is only read.
/// - `positions`, `slot_mapping`: `[tokens]`; a slot is `< num_blocks * block_size`, or [`PAD_SLOT`] (no cache
///   write). An out-of-range slot writes nothing (defence in depth; the caller builds slots from its block tables).
/// - `inv_freq`: `[head_dim / 2]` f32, from [`crate::config::RopeConfig::inv_freq`] (llama3 scaling applied).
/// - `cache`: the layer's pools; only the slots named by `slot_mapping` are written.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn rope_kv_write(
    stream: &CudaStream,
    shape: &RopeKvShape,
    qkv: &mut impl DevicePtrMut<bf16>,
    positions: &impl DevicePtr<u32>,
    slot_mapping: &impl DevicePtr<u32>,
    inv_freq: &impl DevicePtr<f32>,
    cache: KvCacheMut<'_, impl DevicePtrMut<bf16>, impl DevicePtrMut<bf16>>,
) -> Result<()> {
    let operands = (positions, slot_mapping, inv_freq);
    with_checked(stream, "rope_kv_write", shape, qkv, operands, cache, None::<&mut Flag>, |p, tokens, slots| {
        launch("rope_kv_write", stream, shape, p, tokens, slots)
    })
}

/// [`rope_kv_write`], and `bad_slot[0] = 1` when some slot is out of range (neither `< num_slots` nor
/// [`PAD_SLOT`]); such a token's q is still rotated, but no cache slot is written.
///
/// `bad_slot`: `[1]` or longer; only element 0 is written, and only to 1: zero it before the call, read it after
/// the stream has run.
#[allow(clippy::too_many_arguments)] // the seven of rope_kv_write, plus the flag
pub fn rope_kv_write_flagged(
    stream: &CudaStream,
    shape: &RopeKvShape,
    qkv: &mut impl DevicePtrMut<bf16>,
    positions: &impl DevicePtr<u32>,
    slot_mapping: &impl DevicePtr<u32>,
    inv_freq: &impl DevicePtr<f32>,
    cache: KvCacheMut<'_, impl DevicePtrMut<bf16>, impl DevicePtrMut<bf16>>,
    bad_slot: &mut impl DevicePtrMut<u32>,
) -> Result<()> {
    const OP: &str = "rope_kv_write_flagged";
    let operands = (positions, slot_mapping, inv_freq);
    with_checked(stream, OP, shape, qkv, operands, cache, Some(bad_slot), |p, tokens, slots| {
        launch(OP, stream, shape, p, tokens, slots)
    })
}

/// The flag type named when there is no flag.
type Flag = cudarc::driver::CudaSlice<u32>;

/// The largest head_dim the kernel's shared cos/sin table holds.
const MAX_HEAD_DIM: usize = 512;
/// The longest fused row the kernel takes.
const MAX_ROW: usize = 1 << 30;

/// Checks one call's operands, takes their device pointers and runs `launch` with them, the token count and the
/// number of cache slots while the pointers' stream guards are held: the body of both entry points here and of
/// the skinny GEMM's RoPE epilogue ([`super::gemv::gemv_qkv_rope`]).
#[allow(clippy::too_many_arguments)] // the operands of rope_kv_write_flagged, plus the launch
pub(super) fn with_checked<F: DevicePtrMut<u32>>(
    stream: &CudaStream,
    op: &str,
    shape: &RopeKvShape,
    qkv: &mut impl DevicePtrMut<bf16>,
    (positions, slot_mapping, inv_freq): (&impl DevicePtr<u32>, &impl DevicePtr<u32>, &impl DevicePtr<f32>),
    cache: KvCacheMut<'_, impl DevicePtrMut<bf16>, impl DevicePtrMut<bf16>>,
    bad_slot: Option<&mut F>,
    launch: impl FnOnce(&RopePtrs, usize, usize) -> Result<()>,
) -> Result<()> {
    super::ensure_built()?;
    let lens = Lens {
        qkv: qkv.len(),
        positions: positions.len(),
        slot_mapping: slot_mapping.len(),
        inv_freq: inv_freq.len(),
        k_cache: cache.k.len(),
        v_cache: cache.v.len(),
        bad_slot: bad_slot.as_ref().map(|f| f.len()),
    };
    let num_slots = check_shapes(op, shape, &lens)?;
    let mut operands = vec![
        ("qkv", qkv.stream()),
        ("positions", positions.stream()),
        ("slot_mapping", slot_mapping.stream()),
        ("inv_freq", inv_freq.stream()),
        ("k_cache", cache.k.stream()),
        ("v_cache", cache.v.stream()),
    ];
    if let Some(f) = &bad_slot {
        operands.push(("bad_slot", f.stream()));
    }
    super::check_same_device(op, stream, &operands)?;
    let (qkv, _qkv) = qkv.device_ptr_mut(stream);
    let (positions, _positions) = positions.device_ptr(stream);
    let (slot_mapping, _slot_mapping) = slot_mapping.device_ptr(stream);
    let (inv_freq, _inv_freq) = inv_freq.device_ptr(stream);
    let (k_cache, _k_cache) = cache.k.device_ptr_mut(stream);
    let (v_cache, _v_cache) = cache.v.device_ptr_mut(stream);
    let (bad_slot, _bad_slot) = match bad_slot {
        Some(f) => {
            let (ptr, guard) = f.device_ptr_mut(stream);
            (Some(ptr), Some(guard))
        }
        None => (None, None),
    };
    let ptrs = RopePtrs { qkv, k_cache, v_cache, positions, slot_mapping, inv_freq, bad_slot };
    launch(&ptrs, lens.positions, num_slots)
}

/// Element counts of one call's operands.
struct Lens {
    qkv: usize,
    positions: usize,
    slot_mapping: usize,
    inv_freq: usize,
    k_cache: usize,
    v_cache: usize,
    bad_slot: Option<usize>,
}

/// Checks one call's geometry and lengths and returns the number of cache slots.
fn check_shapes(op: &str, shape: &RopeKvShape, lens: &Lens) -> Result<usize> {
    let fail = |msg: String| Err(Error::Backend(format!("{op}: {msg}")));
    let PagedLayout { num_heads, num_kv_heads, head_dim, block_size } = shape.layout;
    if head_dim == 0 || head_dim % 2 != 0 || head_dim > MAX_HEAD_DIM {
        return fail(format!("head_dim is {head_dim}, must be even and in 2..={MAX_HEAD_DIM} (64 and 128 are tuned)"));
    }
    if num_kv_heads == 0 || num_heads == 0 || num_heads % num_kv_heads != 0 {
        return fail(format!("{num_heads} q heads and {num_kv_heads} kv heads: need >= 1 each, q a multiple of kv"));
    }
    if block_size == 0 {
        return fail("block_size is 0, must be >= 1".into());
    }
    let row =
        num_kv_heads.checked_mul(2).and_then(|kv| kv.checked_add(num_heads)).and_then(|h| h.checked_mul(head_dim));
    let row = match row {
        Some(row) if row <= MAX_ROW => row,
        _ => return fail(format!("the fused row of {num_heads} + 2 x {num_kv_heads} heads x {head_dim} exceeds 2^30")),
    };
    if shape.qkv_stride < row {
        return fail(format!("qkv_stride is {}, shorter than the fused q|k|v row of {row}", shape.qkv_stride));
    }
    let tokens = lens.positions;
    if tokens > i32::MAX as usize {
        return fail(format!("`positions` has {tokens} tokens, at most 2^31-1 are supported"));
    }
    if lens.slot_mapping != tokens {
        return fail(format!("`slot_mapping` has {} entries, expected one per position ({tokens})", lens.slot_mapping));
    }
    if tokens.checked_mul(shape.qkv_stride) != Some(lens.qkv) {
        return fail(format!(
            "`qkv` has {} elements, expected {tokens} tokens x qkv_stride {}",
            lens.qkv, shape.qkv_stride
        ));
    }
    if lens.inv_freq != head_dim / 2 {
        return fail(format!("`inv_freq` has {} elements, expected head_dim / 2 = {}", lens.inv_freq, head_dim / 2));
    }
    let slot_len = num_kv_heads * head_dim;
    let block_len = slot_len * block_size;
    if lens.k_cache == 0 || !lens.k_cache.is_multiple_of(block_len) {
        return fail(format!(
            "`k_cache` has {} elements, expected a positive multiple of block_size {block_size} x {num_kv_heads} kv \
             heads x head_dim {head_dim} = {block_len}",
            lens.k_cache
        ));
    }
    if lens.v_cache != lens.k_cache {
        return fail(format!(
            "`v_cache` has {} elements, expected the same as k_cache ({})",
            lens.v_cache, lens.k_cache
        ));
    }
    let num_slots = lens.k_cache / slot_len;
    if num_slots >= PAD_SLOT as usize {
        return fail(format!("the cache has {num_slots} slots, at most 2^32-2 are supported"));
    }
    if lens.bad_slot == Some(0) {
        return fail("`bad_slot` is empty, it needs 1 element".into());
    }
    Ok(num_slots)
}

/// The device pointers of one checked call.
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
pub(super) struct RopePtrs {
    pub(super) qkv: u64,
    k_cache: u64,
    v_cache: u64,
    positions: u64,
    slot_mapping: u64,
    inv_freq: u64,
    bad_slot: Option<u64>,
}

/// The C parameters of one checked call ([`with_checked`]'s pointers, tokens and slots).
#[cfg(llama32_cuda)]
pub(super) fn params(shape: &RopeKvShape, p: &RopePtrs, tokens: usize, slots: usize) -> super::ffi::l32_rope_params {
    use super::ffi;
    use std::ffi::c_void;
    let l = &shape.layout;
    // All fit: check_shapes bounds tokens by 2^31 - 1, the fused row (so every head count and head_dim) by 2^30,
    // and the slots by 2^32 - 2; qkv_stride is a stride of a live allocation.
    ffi::l32_rope_params {
        qkv: p.qkv as *mut c_void,
        k_cache: p.k_cache as *mut c_void,
        v_cache: p.v_cache as *mut c_void,
        positions: p.positions as *const u32,
        slot_mapping: p.slot_mapping as *const u32,
        inv_freq: p.inv_freq as *const f32,
        bad_slot: p.bad_slot.map_or(std::ptr::null_mut(), |f| f as *mut u32),
        tokens: tokens as i64,
        qkv_stride: shape.qkv_stride as i64,
        num_slots: slots as i64,
        num_heads: l.num_heads as i32,
        num_kv_heads: l.num_kv_heads as i32,
        head_dim: l.head_dim as i32,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    }
}

#[cfg(llama32_cuda)]
fn launch(op: &str, stream: &CudaStream, shape: &RopeKvShape, p: &RopePtrs, tokens: usize, slots: usize) -> Result<()> {
    let l = &shape.layout;
    let params = params(shape, p, tokens, slots);
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: every pointer comes from a live device slice on this stream's device whose length check_shapes
    // matched (qkv: tokens x qkv_stride, positions and slot_mapping: tokens, inv_freq: head_dim / 2, each cache:
    // num_slots x num_kv_heads x head_dim, bad_slot: >= 1); the kernel writes no slot at or past num_slots. The
    // callers hold the slices' stream guards until after this launch.
    let status = unsafe { super::ffi::l32_rope_kv_write(&params, raw) };
    super::check_launch(op, stream, status, || {
        format!(
            "{op} (tokens {tokens}, heads {}/{}, head_dim {}, qkv_stride {}, slots {slots})",
            l.num_heads, l.num_kv_heads, l.head_dim, shape.qkv_stride
        )
    })
}

#[cfg(not(llama32_cuda))]
fn launch(
    _op: &str,
    _stream: &CudaStream,
    _shape: &RopeKvShape,
    _p: &RopePtrs,
    _tokens: usize,
    _slots: usize,
) -> Result<()> {
    super::ensure_built()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3B-like: 24 q / 8 kv heads of 128, block size 16, two blocks; 3 tokens.
    fn shape() -> RopeKvShape {
        let layout = PagedLayout { num_heads: 24, num_kv_heads: 8, head_dim: 128, block_size: 16 };
        RopeKvShape { layout, qkv_stride: 40 * 128 }
    }

    fn lens() -> Lens {
        let cache = 2 * 16 * 8 * 128;
        Lens {
            qkv: 3 * 40 * 128,
            positions: 3,
            slot_mapping: 3,
            inv_freq: 64,
            k_cache: cache,
            v_cache: cache,
            bad_slot: None,
        }
    }

    fn err(shape: RopeKvShape, lens: Lens) -> String {
        check_shapes("op", &shape, &lens).unwrap_err().to_string()
    }

    #[test]
    fn accepts_matching_shapes() {
        assert_eq!(check_shapes("op", &shape(), &lens()).unwrap(), 32);
        let wide = RopeKvShape { qkv_stride: 40 * 128 + 8, ..shape() };
        assert_eq!(check_shapes("op", &wide, &Lens { qkv: 3 * (40 * 128 + 8), ..lens() }).unwrap(), 32);
    }

    #[test]
    fn rejects_each_bad_operand_by_name() {
        let with = |f: fn(&mut PagedLayout)| {
            let mut s = shape();
            f(&mut s.layout);
            s
        };
        assert!(err(with(|l| l.head_dim = 127), lens()).contains("head_dim"));
        assert!(err(with(|l| l.head_dim = 1024), lens()).contains("head_dim"));
        assert!(err(with(|l| l.num_kv_heads = 7), lens()).contains("kv heads"));
        assert!(err(with(|l| l.num_heads = 0), lens()).contains("q heads"));
        assert!(err(with(|l| l.block_size = 0), lens()).contains("block_size"));
        assert!(err(RopeKvShape { qkv_stride: 40 * 128 - 1, ..shape() }, lens()).contains("qkv_stride"));
        assert!(err(shape(), Lens { slot_mapping: 2, ..lens() }).contains("`slot_mapping`"));
        assert!(err(shape(), Lens { qkv: 2 * 40 * 128, ..lens() }).contains("`qkv`"));
        assert!(err(shape(), Lens { inv_freq: 128, ..lens() }).contains("`inv_freq`"));
        assert!(err(shape(), Lens { k_cache: 16 * 8 * 128 + 1, ..lens() }).contains("`k_cache`"));
        assert!(err(shape(), Lens { k_cache: 0, v_cache: 0, ..lens() }).contains("`k_cache`"));
        assert!(err(shape(), Lens { v_cache: 16 * 8 * 128, ..lens() }).contains("`v_cache`"));
        assert!(err(shape(), Lens { bad_slot: Some(0), ..lens() }).contains("`bad_slot`"));
    }
}
