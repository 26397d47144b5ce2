//! Token masks and log-probabilities on CUDA (`kernels/logprobs.cu`, family `logprobs`): the twins of
//! [`crate::sampling::TokenMask::apply`] and [`crate::sampling::token_logprob`], so that structured outputs and
//! logprobs need no copy of the logits to the host.
//!
//! - [`mask_logits`]: sets the disallowed tokens of chosen rows of a bf16 logits matrix to `-inf`, in place, from
//!   per-row bitsets ([`mask_words`] lays a [`TokenMask`] out as the kernel reads it).
//! - [`token_logprobs`]: per entry (row, token), the token's log-probability, rank and the `top` most likely
//!   alternatives ([`ScoredRows::entry`] turns the outputs back into [`TokenLogprob`]s).
//!
//! Numerics: the log-sum-exp sums `expf` terms in f64 where the CPU twin sums a polynomial `exp` in f32 lanes, so
//! log-probabilities agree within a few 1e-6; ranks and alternatives compare the same bf16 values and agree exactly.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::sampling::{TokenLogprob, TokenMask};
use crate::{Error, Result};

/// The most alternatives [`token_logprobs`] returns per entry (`L32_MAX_TOP_LOGPROBS`).
pub const MAX_TOP: usize = 64;

/// The largest vocabulary either kernel takes.
const MAX_VOCAB: usize = 1 << 30;

/// The most masks one [`mask_logits`] call applies (the grid's second dimension).
pub const MAX_MASKS: usize = 65535;

/// 32-bit words per mask row for a vocabulary of `vocab` tokens.
pub fn words_per_mask(vocab: usize) -> usize {
    vocab.div_ceil(32)
}

/// Appends `mask` to `out` as [`mask_logits`] reads it: [`words_per_mask`]`(vocab)` words, bit `v % 32` of word
/// `v / 32` set when token `v` is allowed. Tokens past the mask's length are disallowed.
pub fn mask_words(mask: &TokenMask, vocab: usize, out: &mut Vec<u32>) {
    let words = words_per_mask(vocab);
    let start = out.len();
    out.extend(mask.words().iter().flat_map(|&w| [w as u32, (w >> 32) as u32]).take(words));
    out.resize(start + words, 0);
    // Clear the bits of ids at or past the vocabulary (a mask longer than it).
    if !vocab.is_multiple_of(32) {
        out[start + words - 1] &= (1u32 << (vocab % 32)) - 1;
    }
}

/// Sets to `-inf`, for each mask `j`, every logit of row `rows[j]` whose token mask `j` disallows.
///
/// - `logits`: `[*, vocab]`, written in place; `rows`: `[masks]`, each a row of `logits` (the kernel skips one
///   past them), no row twice; `bits`: `[masks, words_per_mask(vocab)]` ([`mask_words`]).
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn mask_logits(
    stream: &CudaStream,
    logits: &mut impl DevicePtrMut<bf16>,
    vocab: usize,
    rows: &impl DevicePtr<u32>,
    bits: &impl DevicePtr<u32>,
) -> Result<()> {
    const OP: &str = "mask_logits";
    super::ensure_built()?;
    check_vocab(OP, logits.len(), vocab)?;
    let masks = rows.len();
    if masks > MAX_MASKS {
        return Err(Error::Backend(format!("{OP}: {masks} masks, at most {MAX_MASKS} a call")));
    }
    let words = words_per_mask(vocab);
    if bits.len() != masks * words {
        return Err(Error::Backend(format!(
            "{OP}: `bits` has {} words, expected {masks} masks of {words}",
            bits.len()
        )));
    }
    super::check_same_device(
        OP,
        stream,
        &[("logits", logits.stream()), ("rows", rows.stream()), ("bits", bits.stream())],
    )?;
    let total_rows = logits.len() / vocab;
    let (rows_ptr, _rows) = rows.device_ptr(stream);
    let (bits_ptr, _bits) = bits.device_ptr(stream);
    let (out, _out) = logits.device_ptr_mut(stream);
    launch_mask(
        OP,
        stream,
        &MaskLaunch { logits: out, rows: rows_ptr, bits: bits_ptr, total_rows, masks, vocab, words },
    )
}

/// The device outputs of [`token_logprobs`] for `n` entries with `top` alternatives each.
pub struct ScoredRows<'a> {
    /// `[n]`.
    pub logprob: &'a mut dyn DevicePtrMut<f32>,
    /// `[n]`.
    pub rank: &'a mut dyn DevicePtrMut<u32>,
    /// `[n, top]`.
    pub top_ids: &'a mut dyn DevicePtrMut<u32>,
    /// `[n, top]`.
    pub top_logprobs: &'a mut dyn DevicePtrMut<f32>,
}

impl ScoredRows<'_> {
    /// Entry `j` of outputs read back to the host (`logprob`, `rank`: `[n]`; `top_ids`, `top_logprobs`:
    /// `[n, top]`), for token `id`, with its first `keep` alternatives (at most `top`; the kernel's placeholders
    /// past the row's non-NaN logits are dropped).
    pub fn entry(host: (&[f32], &[u32], &[u32], &[f32]), top: usize, j: usize, id: u32, keep: usize) -> TokenLogprob {
        let (logprob, rank, top_ids, top_lps) = host;
        let alts = (0..keep.min(top))
            .map(|r| (top_ids[j * top + r], top_lps[j * top + r]))
            .take_while(|&(t, _)| t != u32::MAX)
            .collect();
        TokenLogprob { id, logprob: logprob[j], rank: rank[j], top: alts }
    }
}

/// Scores entry `j`: token `ids[j]` under row `rows[j]` of `logits` (`[*, vocab]`), as
/// [`crate::sampling::token_logprob`] with `entry_top[j]` alternatives (`None`: `top` for every entry; at most
/// `top`, itself at most [`MAX_TOP`] and the stride of the alternatives' outputs); writes `out`. An entry whose row
/// is past `logits` gets a NaN log-probability and rank 0.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
#[allow(clippy::too_many_arguments)]
pub fn token_logprobs(
    stream: &CudaStream,
    logits: &impl DevicePtr<bf16>,
    vocab: usize,
    rows: &impl DevicePtr<u32>,
    ids: &impl DevicePtr<u32>,
    entry_top: Option<&dyn DevicePtr<i32>>,
    top: usize,
    out: &mut ScoredRows<'_>,
) -> Result<()> {
    const OP: &str = "token_logprobs";
    super::ensure_built()?;
    check_vocab(OP, logits.len(), vocab)?;
    if top > MAX_TOP {
        return Err(Error::Backend(format!("{OP}: top is {top}, at most {MAX_TOP}")));
    }
    let n = rows.len();
    if n > i32::MAX as usize {
        return Err(Error::Backend(format!("{OP}: {n} entries, at most 2^31-1")));
    }
    if let Some(t) = entry_top.filter(|t| t.len() != n) {
        return Err(Error::Backend(format!("{OP}: `entry_top` has {} elements, expected {n}", t.len())));
    }
    for (name, got, want) in [
        ("ids", ids.len(), n),
        ("out.logprob", out.logprob.len(), n),
        ("out.rank", out.rank.len(), n),
        ("out.top_ids", out.top_ids.len(), n * top),
        ("out.top_logprobs", out.top_logprobs.len(), n * top),
    ] {
        if got != want {
            return Err(Error::Backend(format!("{OP}: `{name}` has {got} elements, expected {want}")));
        }
    }
    super::check_same_device(
        OP,
        stream,
        &[
            ("logits", logits.stream()),
            ("rows", rows.stream()),
            ("ids", ids.stream()),
            ("out.logprob", out.logprob.stream()),
            ("out.rank", out.rank.stream()),
            ("out.top_ids", out.top_ids.stream()),
            ("out.top_logprobs", out.top_logprobs.stream()),
        ],
    )?;
    let (logits_ptr, _logits) = logits.device_ptr(stream);
    let (rows_ptr, _rows) = rows.device_ptr(stream);
    let (ids_ptr, _ids) = ids.device_ptr(stream);
    let tops = entry_top.map(|t| t.device_ptr(stream));
    let (lp, _lp) = out.logprob.device_ptr_mut(stream);
    let (rank, _rank) = out.rank.device_ptr_mut(stream);
    let (top_ids, _top_ids) = out.top_ids.device_ptr_mut(stream);
    let (top_lps, _top_lps) = out.top_logprobs.device_ptr_mut(stream);
    launch_logprobs(
        OP,
        stream,
        &LogprobLaunch {
            logprob: lp,
            rank,
            top_ids,
            top_lps,
            logits: logits_ptr,
            rows: rows_ptr,
            ids: ids_ptr,
            entry_top: tops.as_ref().map(|t| t.0),
            total_rows: logits.len() / vocab,
            n,
            vocab,
            top,
        },
    )
}

/// Checks `vocab` and that `logits` holds whole rows of it.
fn check_vocab(op: &str, logits: usize, vocab: usize) -> Result<()> {
    if vocab == 0 || vocab > MAX_VOCAB {
        return Err(Error::Backend(format!("{op}: vocab is {vocab}, must be in 1..={MAX_VOCAB}")));
    }
    if !logits.is_multiple_of(vocab) {
        return Err(Error::Backend(format!("{op}: `logits` has {logits} elements, not a multiple of vocab {vocab}")));
    }
    Ok(())
}

/// One checked mask call, as the device pointers and sizes `l32_mask_params` carries.
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
struct MaskLaunch {
    logits: u64,
    rows: u64,
    bits: u64,
    total_rows: usize,
    masks: usize,
    vocab: usize,
    words: usize,
}

/// One checked scoring call, as the device pointers and sizes `l32_logprob_params` carries.
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
struct LogprobLaunch {
    logprob: u64,
    rank: u64,
    top_ids: u64,
    top_lps: u64,
    logits: u64,
    rows: u64,
    ids: u64,
    entry_top: Option<u64>,
    total_rows: usize,
    n: usize,
    vocab: usize,
    top: usize,
}

#[cfg(llama32_cuda)]
fn launch_mask(op: &str, stream: &CudaStream, l: &MaskLaunch) -> Result<()> {
    use super::ffi;
    use std::ffi::c_void;
    // All fit in i64: masks <= 65535, vocab <= 2^30 (checked by the caller).
    let params = ffi::l32_mask_params {
        logits: l.logits as *mut c_void,
        rows: l.rows as *const u32,
        bits: l.bits as *const u32,
        total_rows: l.total_rows as i64,
        masks: l.masks as i64,
        vocab: l.vocab as i64,
        words: l.words as i64,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: the pointers come from live device slices on this stream's device whose lengths mask_logits matched
    // to masks x words and whole rows of vocab; the caller holds the slices' stream guards until after this launch.
    // The rows' bounds are the caller's contract (the executor passes rows of its own step).
    let status = unsafe { ffi::l32_mask_logits(&params, raw) };
    super::check_launch(op, stream, status, || format!("{op} (masks {}, vocab {})", l.masks, l.vocab))
}

#[cfg(llama32_cuda)]
fn launch_logprobs(op: &str, stream: &CudaStream, l: &LogprobLaunch) -> Result<()> {
    use super::ffi;
    use std::ffi::c_void;
    // All fit: n <= 2^31 - 1, vocab <= 2^30, top <= 64 (checked by the caller).
    let params = ffi::l32_logprob_params {
        out_logprob: l.logprob as *mut f32,
        out_rank: l.rank as *mut u32,
        out_top_ids: l.top_ids as *mut u32,
        out_top_logprobs: l.top_lps as *mut f32,
        logits: l.logits as *const c_void,
        rows: l.rows as *const u32,
        ids: l.ids as *const u32,
        entry_top: l.entry_top.map_or(std::ptr::null(), |t| t as *const i32),
        total_rows: l.total_rows as i64,
        n: l.n as i64,
        vocab: l.vocab as i64,
        top: l.top as i32,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: every pointer comes from a live device slice on this stream's device whose length token_logprobs
    // matched to n, n x top and whole rows of vocab; the caller holds the slices' stream guards until after this
    // launch. The rows' bounds are the caller's contract (the executor passes rows of its own step).
    let status = unsafe { ffi::l32_token_logprobs(&params, raw) };
    super::check_launch(op, stream, status, || format!("{op} (entries {}, vocab {}, top {})", l.n, l.vocab, l.top))
}

#[cfg(not(llama32_cuda))]
fn launch_mask(_op: &str, _stream: &CudaStream, _launch: &MaskLaunch) -> Result<()> {
    super::ensure_built()
}

#[cfg(not(llama32_cuda))]
fn launch_logprobs(_op: &str, _stream: &CudaStream, _launch: &LogprobLaunch) -> Result<()> {
    super::ensure_built()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_words_set_the_allowed_bits() {
        let mut m = TokenMask::new(70);
        for id in [0, 31, 32, 63, 64, 69] {
            m.allow(id);
        }
        let mut out = vec![7];
        mask_words(&m, 70, &mut out);
        assert_eq!(out.len(), 1 + words_per_mask(70));
        assert_eq!(&out[1..], &[1 | 1 << 31, 1 | 1 << 31, 1 | 1 << 5]);
        // A vocabulary beyond the mask's length: the extra tokens are disallowed.
        let mut wide = Vec::new();
        mask_words(&m, 100, &mut wide);
        assert_eq!(wide.len(), 4);
        assert_eq!(wide[3], 0);
        // A vocabulary shorter than the mask: the ids past it are cleared.
        let mut narrow = Vec::new();
        mask_words(&m, 40, &mut narrow);
        assert_eq!(narrow, vec![1 | 1 << 31, 1]);
    }

    #[test]
    fn entries_drop_the_placeholders() {
        let host = (&[-0.5f32, -1.0][..], &[1u32, 3][..], &[4u32, 2, 9, u32::MAX][..], &[-0.5f32, -1.5, -1.0, 0.0][..]);
        let e = ScoredRows::entry(host, 2, 1, 9, 2);
        assert_eq!(e, TokenLogprob { id: 9, logprob: -1.0, rank: 3, top: vec![(9, -1.0)] });
        assert_eq!(ScoredRows::entry(host, 2, 0, 4, 1).top, vec![(4, -0.5)]);
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(check_vocab("op", 10, 0).unwrap_err().to_string().contains("vocab is 0"));
        assert!(check_vocab("op", 10, 3).unwrap_err().to_string().contains("`logits`"));
        assert!(check_vocab("op", 9, 3).is_ok());
    }
}
