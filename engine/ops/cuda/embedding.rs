//! Token-embedding gather on CUDA (`kernels/embedding.cu`, family `embedding`), the twin of
//! [`crate::ops::cpu::embedding::embed`], with the same arguments after the stream.
//!
//! A bit-for-bit row copy. Ids live on the device, so this wrapper cannot check them: the caller validates ids
//! against the vocabulary before uploading them. As defence in depth the kernel never reads out of bounds: an id
//! `>= vocab` gets a zero row, and [`embed_flagged`] also raises a device flag for it.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::{Error, Result};

/// `out[i, :] = table[ids[i], :]` for each token `i`.
///
/// - `table`: `[vocab, hidden]` (`vocab = table.len() / hidden >= 1`); `ids`: `[tokens]`, each `< vocab`;
///   `out`: `[tokens, hidden]`, written. An id `>= vocab` yields a zero row (never an out-of-bounds read).
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn embed(
    stream: &CudaStream,
    table: &impl DevicePtr<bf16>,
    hidden: usize,
    ids: &impl DevicePtr<u32>,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    const OP: &str = "embed";
    super::ensure_built()?;
    let lens = Lens { table: table.len(), ids: ids.len(), out: out.len(), bad_id: None };
    let vocab = check_shapes(OP, &lens, hidden)?;
    super::check_same_device(OP, stream, &[("table", table.stream()), ("ids", ids.stream()), ("out", out.stream())])?;
    let (table, _table) = table.device_ptr(stream);
    let (ids, _ids) = ids.device_ptr(stream);
    let (out, _out) = out.device_ptr_mut(stream);
    launch(OP, stream, &EmbedLaunch { out, table, scales: None, ids, bad_id: None, tokens: lens.ids, hidden, vocab })
}

/// [`embed`] from an int8 table with one bf16 scale per row (an int8-embeddings model):
/// `out[i, c] = bf16(scales[ids[i]] * q[ids[i], c])`, the exact f32 product rounded once, so the rows are bit for bit
/// those [`embed`] gathers from the bf16 rounding of the dequantized table.
///
/// - `q`: `[vocab, hidden]` int8; `scales`: `[vocab]`; `ids`, `out` as in [`embed`].
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn embed_int8(
    stream: &CudaStream,
    (q, scales): (&impl DevicePtr<i8>, &impl DevicePtr<bf16>),
    hidden: usize,
    ids: &impl DevicePtr<u32>,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    const OP: &str = "embed_int8";
    super::ensure_built()?;
    let lens = Lens { table: q.len(), ids: ids.len(), out: out.len(), bad_id: None };
    let vocab = check_shapes(OP, &lens, hidden)?;
    if scales.len() != vocab {
        return Err(Error::Backend(format!(
            "{OP}: `scales` has {} elements, expected one per row ({vocab})",
            scales.len()
        )));
    }
    let operands = [("table", q.stream()), ("scales", scales.stream()), ("ids", ids.stream()), ("out", out.stream())];
    super::check_same_device(OP, stream, &operands)?;
    let (table, _table) = q.device_ptr(stream);
    let (scales, _scales) = scales.device_ptr(stream);
    let (ids, _ids) = ids.device_ptr(stream);
    let (out, _out) = out.device_ptr_mut(stream);
    let l = EmbedLaunch { out, table, scales: Some(scales), ids, bad_id: None, tokens: lens.ids, hidden, vocab };
    launch(OP, stream, &l)
}

/// [`embed`], and `bad_id[0] = 1` when some id is `>= vocab` (its row is zeroed).
///
/// `bad_id`: `[1]` or longer; only element 0 is written, and only to 1: zero it before the call, read it after
/// the stream has run.
pub fn embed_flagged(
    stream: &CudaStream,
    table: &impl DevicePtr<bf16>,
    hidden: usize,
    ids: &impl DevicePtr<u32>,
    out: &mut impl DevicePtrMut<bf16>,
    bad_id: &mut impl DevicePtrMut<u32>,
) -> Result<()> {
    const OP: &str = "embed_flagged";
    super::ensure_built()?;
    let lens = Lens { table: table.len(), ids: ids.len(), out: out.len(), bad_id: Some(bad_id.len()) };
    let vocab = check_shapes(OP, &lens, hidden)?;
    let operands =
        [("table", table.stream()), ("ids", ids.stream()), ("out", out.stream()), ("bad_id", bad_id.stream())];
    super::check_same_device(OP, stream, &operands)?;
    let (table, _table) = table.device_ptr(stream);
    let (ids, _ids) = ids.device_ptr(stream);
    let (out, _out) = out.device_ptr_mut(stream);
    let (bad_id, _bad_id) = bad_id.device_ptr_mut(stream);
    let l = EmbedLaunch { out, table, scales: None, ids, bad_id: Some(bad_id), tokens: lens.ids, hidden, vocab };
    launch(OP, stream, &l)
}

/// The longest row `kernels/embedding.cu` takes.
const MAX_HIDDEN: usize = 1 << 30;

/// Element counts of one call's operands.
struct Lens {
    table: usize,
    ids: usize,
    out: usize,
    bad_id: Option<usize>,
}

/// Checks one call's lengths against `hidden` and returns the vocabulary size.
fn check_shapes(op: &str, lens: &Lens, hidden: usize) -> Result<usize> {
    let fail = |msg: String| Err(Error::Backend(format!("{op}: {msg}")));
    if hidden == 0 || hidden > MAX_HIDDEN {
        return fail(format!("hidden is {hidden}, must be in 1..=2^30"));
    }
    if lens.table == 0 || !lens.table.is_multiple_of(hidden) {
        return fail(format!("`table` has {} elements, expected a positive multiple of hidden = {hidden}", lens.table));
    }
    if lens.ids > i32::MAX as usize {
        return fail(format!("`ids` has {} tokens, at most 2^31-1 are supported", lens.ids));
    }
    let want = lens.ids.checked_mul(hidden).filter(|&n| n == lens.out);
    if want.is_none() {
        return fail(format!("`out` has {} elements, expected {} ids x hidden {hidden}", lens.out, lens.ids));
    }
    if lens.bad_id == Some(0) {
        return fail("`bad_id` is empty, it needs 1 element".into());
    }
    Ok(lens.table / hidden)
}

/// One checked call, as the device pointers and sizes `l32_embedding_params` carries.
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
struct EmbedLaunch {
    out: u64,
    table: u64,
    /// An int8 table's per-row scales.
    scales: Option<u64>,
    ids: u64,
    bad_id: Option<u64>,
    tokens: usize,
    hidden: usize,
    vocab: usize,
}

#[cfg(llama32_cuda)]
fn launch(op: &str, stream: &CudaStream, l: &EmbedLaunch) -> Result<()> {
    use super::ffi;
    use std::ffi::c_void;
    // All fit in i64: check_shapes bounds tokens by 2^31 - 1 and hidden by 2^30; vocab is a slice length / hidden.
    let params = ffi::l32_embedding_params {
        out: l.out as *mut c_void,
        table: l.table as *const c_void,
        scales: l.scales.map_or(std::ptr::null(), |p| p as *const c_void),
        ids: l.ids as *const u32,
        bad_id: l.bad_id.map_or(std::ptr::null_mut(), |p| p as *mut u32),
        tokens: l.tokens as i64,
        hidden: l.hidden as i64,
        vocab: l.vocab as i64,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: every pointer comes from a live device slice on this stream's device whose length check_shapes
    // matched (table: vocab x hidden, scales: vocab, ids: tokens, out: tokens x hidden, bad_id: >= 1); the kernel
    // reads no table row at or past vocab. The callers hold the slices' stream guards until after this launch.
    let status = unsafe { ffi::l32_embedding(&params, raw) };
    super::check_launch(op, stream, status, || {
        format!("{op} (tokens {}, hidden {}, vocab {})", l.tokens, l.hidden, l.vocab)
    })
}

#[cfg(not(llama32_cuda))]
fn launch(_op: &str, _stream: &CudaStream, _launch: &EmbedLaunch) -> Result<()> {
    super::ensure_built()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(table: usize, ids: usize, out: usize, bad_id: Option<usize>) -> Lens {
        Lens { table, ids, out, bad_id }
    }

    fn err(l: Lens, hidden: usize) -> String {
        check_shapes("op", &l, hidden).unwrap_err().to_string()
    }

    #[test]
    fn accepts_matching_shapes() {
        assert_eq!(check_shapes("op", &lens(10 * 8, 3, 24, None), 8).unwrap(), 10);
        assert_eq!(check_shapes("op", &lens(8, 0, 0, Some(1)), 8).unwrap(), 1);
    }

    #[test]
    fn rejects_each_bad_operand_by_name() {
        assert!(err(lens(80, 3, 24, None), 0).contains("hidden is 0"));
        assert!(err(lens(81, 3, 24, None), 8).contains("`table`"));
        assert!(err(lens(0, 3, 24, None), 8).contains("`table`"));
        assert!(err(lens(80, 3, 16, None), 8).contains("`out`"));
        assert!(err(lens(80, 3, 24, Some(0)), 8).contains("`bad_id`"));
    }
}
