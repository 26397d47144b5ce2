//! Next-token selection on CUDA (`kernels/sampling.cu`, family `sampling`): the twins of
//! [`crate::sampling::argmax`] and [`crate::sampling::Sampler::sample`], one logits row per sequence.
//!
//! - [`argmax`]: greedy ids of a `[rows, vocab]` bf16 logits matrix (the lowest index wins ties, NaN never wins).
//! - [`sample`]: the whole CPU pipeline per row (penalties, greedy, temperature, min-p, top-k, top-p, inverse-CDF
//!   draw), with each row's parameters in a device array of [`SampleRow`] and its uniform `u` in `[0, 1)` drawn on
//!   the host with [`crate::sampling::Sampler::next_uniform`] (greedy rows draw none), so a seeded sequence gives
//!   the CPU's ids. After the step the host records the id with [`crate::sampling::Sampler::accept`].
//! - Penalties and the logit bias travel as per-row sorted token lists ([`PenaltyLists`] builds them on the host,
//!   [`Penalties`] names the uploaded arrays).
//!
//! Numerics: the kept set is decided exactly as on the CPU (the penalties in f32, min-p's f64 test turned into an
//! exact f32 threshold, top-k by value then id). The weights `exp((l - max) / T)` behind top-p and the draw are f32
//! on the GPU (relative error about `1e-7 * |(l - max) / T|`, summed in f64) where the CPU uses f64, so the chosen
//! id can differ from the CPU's only when `u`, or `top_p`, lies within about 1e-6 of a cumulative-probability
//! boundary.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use half::bf16;

use crate::sampling::SamplingParams;
use crate::{Error, Result};

/// One row's sampling parameters as the kernel reads them (`l32_sample_row` in `kernels/llama32_kernels.h`).
///
/// Build it with [`SampleRow::new`], which also computes `ln(min_p)` on the host so min-p uses the CPU's very f64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SampleRow {
    /// Below `1e-5`: greedy.
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`; `1` turns it off.
    pub top_p: f32,
    /// In `[0, 1]`; `0` turns it off.
    pub min_p: f32,
    /// `> 0`; `1` turns it off.
    pub repetition_penalty: f32,
    /// Subtracted `count` times from each generated token.
    pub frequency_penalty: f32,
    /// Subtracted once from each generated token.
    pub presence_penalty: f32,
    /// `0` (or at least the number of candidates) turns it off.
    pub top_k: i32,
    /// Always 0.
    pub reserved: i32,
    /// `ln(min_p)` in f64 when `min_p > 0` (ignored otherwise).
    pub ln_min_p: f64,
}

// SAFETY: plain old data (f32, i32, f64, no padding: 6 x 4 + 2 x 4 + 8 = 40 bytes), the C struct's layout (checked
// against the bindgen struct below), and all-zero bits are a valid value.
unsafe impl DeviceRepr for SampleRow {}
// SAFETY: as above: every field is valid as zero bits.
unsafe impl ValidAsZeroBits for SampleRow {}

#[cfg(llama32_cuda)]
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    type C = super::ffi::l32_sample_row;
    assert!(size_of::<SampleRow>() == size_of::<C>() && align_of::<SampleRow>() == align_of::<C>());
    assert!(offset_of!(SampleRow, temperature) == offset_of!(C, temperature));
    assert!(offset_of!(SampleRow, top_p) == offset_of!(C, top_p));
    assert!(offset_of!(SampleRow, min_p) == offset_of!(C, min_p));
    assert!(offset_of!(SampleRow, repetition_penalty) == offset_of!(C, repetition_penalty));
    assert!(offset_of!(SampleRow, frequency_penalty) == offset_of!(C, frequency_penalty));
    assert!(offset_of!(SampleRow, presence_penalty) == offset_of!(C, presence_penalty));
    assert!(offset_of!(SampleRow, top_k) == offset_of!(C, top_k));
    assert!(offset_of!(SampleRow, ln_min_p) == offset_of!(C, ln_min_p));
};

impl SampleRow {
    /// The kernel's view of `params` (already validated with [`SamplingParams::validate`]); `top_k` above
    /// `i32::MAX` is clamped (it exceeds any vocabulary, so it is off either way).
    pub fn new(params: &SamplingParams) -> Self {
        SampleRow {
            temperature: params.temperature,
            top_p: params.top_p,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            frequency_penalty: params.frequency_penalty,
            presence_penalty: params.presence_penalty,
            top_k: params.top_k.min(i32::MAX as usize) as i32,
            reserved: 0,
            ln_min_p: if params.min_p > 0.0 { (params.min_p as f64).ln() } else { f64::NEG_INFINITY },
        }
    }
}

/// Host-built penalty and logit-bias lists of a batch, one row per logits row (CSR): row `r` owns entries
/// `offsets[r]..offsets[r + 1]` of `ids` (strictly increasing: the tokens of the prompt and of the output so far,
/// and the tokens with a bias), `counts` (each token's occurrences in the output; 0 for a prompt-only token;
/// [`PENALTY_UNSEEN`] set for a token listed only for its bias) and `bias` (0 for none). Upload the arrays and pass
/// them to [`sample`] as [`Penalties`].
#[derive(Clone, Debug, PartialEq)]
pub struct PenaltyLists {
    offsets: Vec<u32>,
    ids: Vec<u32>,
    counts: Vec<u32>,
    bias: Vec<f32>,
}

/// Set in a [`PenaltyLists::counts`] entry whose token is listed only for its logit bias: it gets no repetition
/// penalty (`L32_PENALTY_UNSEEN`). Counts saturate below it.
pub const PENALTY_UNSEEN: u32 = 1 << 31;

impl Default for PenaltyLists {
    fn default() -> Self {
        Self::new()
    }
}

impl PenaltyLists {
    /// No rows yet.
    pub fn new() -> Self {
        PenaltyLists { offsets: vec![0], ids: Vec::new(), counts: Vec::new(), bias: Vec::new() }
    }

    /// Appends the next row: what a [`crate::sampling::Sampler`] created with `prompt` and then given every token of
    /// `output` (by `sample` or `accept`) penalizes. Errors when the batch outgrows u32 offsets.
    pub fn push_row(&mut self, prompt: &[u32], output: &[u32]) -> Result<()> {
        self.push_row_biased(prompt, output, &[])
    }

    /// [`push_row`](Self::push_row) with the row's logit bias (`(id, bias)` pairs, as
    /// [`crate::sampling::SamplingParams::logit_bias`], in any order; the biases of an id given twice add up, so
    /// `-inf` bans it whatever else it has): a biased token that is neither in the prompt nor in the output gets an
    /// entry of its own marked [`PENALTY_UNSEEN`]. A row without penalties passes an empty `prompt` and `output`, so
    /// that only its biased tokens are listed.
    pub fn push_row_biased(&mut self, prompt: &[u32], output: &[u32], bias: &[(u32, f32)]) -> Result<()> {
        let mut prompt = prompt.to_vec();
        prompt.sort_unstable();
        prompt.dedup();
        let mut output = output.to_vec();
        output.sort_unstable();
        let counts = output.chunk_by(|a, b| a == b).map(|run| (run[0], u32::try_from(run.len()).unwrap_or(u32::MAX)));
        self.push_row_sorted(&prompt, counts, bias)
    }

    /// [`push_row_biased`](Self::push_row_biased) from a history kept sorted
    /// ([`crate::sampling::Sampler::history`]): the prompt's distinct ids in increasing order and the output's
    /// `(id, occurrences)` in increasing id order. Merged, not sorted: the cost is the row's length (the bias alone
    /// is sorted).
    pub fn push_row_sorted(
        &mut self,
        prompt: &[u32],
        output: impl IntoIterator<Item = (u32, u32)>,
        bias: &[(u32, f32)],
    ) -> Result<()> {
        // The history as (id, output occurrences), every id seen.
        let mut output = output.into_iter().peekable();
        let mut history: Vec<(u32, u32)> = Vec::with_capacity(prompt.len());
        let mut p = prompt.iter().copied().peekable();
        loop {
            let next = match (p.peek(), output.peek()) {
                (Some(&a), Some(&(b, n))) if a == b => {
                    p.next();
                    output.next();
                    (a, n)
                }
                (Some(&a), Some(&(b, _))) if a < b => {
                    p.next();
                    (a, 0)
                }
                (_, Some(_)) => output.next().unwrap_or_default(),
                (Some(_), None) => (p.next().unwrap_or_default(), 0),
                (None, None) => break,
            };
            history.push(next);
        }
        let mut bias = bias.to_vec();
        bias.sort_by_key(|&(id, _)| id);
        // (id, output occurrences, seen, bias), in id order: the history and the bias merged.
        let (mut i, mut j) = (0, 0);
        let row = std::iter::from_fn(|| {
            let from_history = j == bias.len() || (i < history.len() && history[i].0 <= bias[j].0);
            if from_history {
                let &(id, n) = history.get(i)?;
                i += 1;
                Some((id, n, true, 0.0))
            } else {
                let (id, b) = bias[j];
                j += 1;
                Some((id, 0, false, b))
            }
        });
        let start = self.ids.len();
        for (id, n, seen, b) in row {
            if self.ids.len() > start && self.ids.last() == Some(&id) {
                let (Some(c), Some(last)) = (self.counts.last_mut(), self.bias.last_mut()) else { continue };
                let unseen = *c & PENALTY_UNSEEN != 0 && !seen;
                *c = ((*c & !PENALTY_UNSEEN).saturating_add(n)).min(PENALTY_UNSEEN - 1);
                if unseen {
                    *c |= PENALTY_UNSEEN;
                }
                *last += b;
            } else {
                self.ids.push(id);
                self.counts.push(n.min(PENALTY_UNSEEN - 1) | if seen { 0 } else { PENALTY_UNSEEN });
                self.bias.push(b);
            }
        }
        let end = u32::try_from(self.ids.len()).map_err(|_| {
            Error::Backend(format!("penalty lists: {} entries, at most 2^32 - 1 fit u32 offsets", self.ids.len()))
        })?;
        self.offsets.push(end);
        Ok(())
    }

    /// Number of rows pushed.
    pub fn rows(&self) -> usize {
        self.offsets.len() - 1
    }

    /// `[rows + 1]` row offsets into [`ids`](Self::ids) and [`counts`](Self::counts).
    pub fn offsets(&self) -> &[u32] {
        &self.offsets
    }

    /// Penalized token ids, strictly increasing within each row.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Occurrences of each listed token in its row's output (0: prompt only), with [`PENALTY_UNSEEN`] set for a token
    /// listed only for its bias.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    /// Each entry's logit bias (0: none).
    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// Whether any entry has a bias (else the bias array need not be uploaded).
    pub fn has_bias(&self) -> bool {
        self.bias.iter().any(|&b| b != 0.0)
    }
}

/// The device copies of a [`PenaltyLists`] (same shapes): `offsets` `[rows + 1]`, `ids` and `counts` `[entries]`.
pub struct Penalties<'a> {
    /// `[rows + 1]`, non-decreasing, the last at most `ids.len()`.
    pub offsets: &'a dyn DevicePtr<u32>,
    /// `[entries]`, strictly increasing within a row; ids `>= vocab` are ignored.
    pub ids: &'a dyn DevicePtr<u32>,
    /// `[entries]`: occurrences in the output, [`PENALTY_UNSEEN`] for a token listed only for its bias.
    pub counts: &'a dyn DevicePtr<u32>,
    /// `[entries]`: each entry's logit bias, or `None` when no row has one.
    pub bias: Option<&'a dyn DevicePtr<f32>>,
}

/// Greedy ids: `out_ids[r]` = the index of the largest logit of row `r` (lowest index on ties, NaN never wins,
/// an all-NaN row gives 0), as [`crate::sampling::argmax`].
///
/// - `logits`: `[rows, vocab]` (`rows = logits.len() / vocab`); `out_ids`: `[rows]`, written.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn argmax(
    stream: &CudaStream,
    logits: &impl DevicePtr<bf16>,
    vocab: usize,
    out_ids: &mut impl DevicePtrMut<u32>,
) -> Result<()> {
    const OP: &str = "argmax";
    super::ensure_built()?;
    let rows = check_rows(OP, logits.len(), vocab, MAX_ARGMAX_VOCAB)?;
    check_len(OP, "out_ids", out_ids.len(), rows)?;
    super::check_same_device(OP, stream, &[("logits", logits.stream()), ("out_ids", out_ids.stream())])?;
    let (logits, _logits) = logits.device_ptr(stream);
    let (out, _out) = out_ids.device_ptr_mut(stream);
    launch_argmax(OP, stream, &ArgmaxLaunch { out, logits, rows, vocab })
}

/// One sampled id per row, as [`crate::sampling::Sampler::sample`] with the same uniform (module docs).
///
/// - `logits`: `[rows, vocab]`; `params`: `[rows]`; `uniforms`: `[rows]`, each in `[0, 1)` (any value for greedy
///   rows); `penalties`: the rows' penalty lists, or `None`; `out_ids`: `[rows]`, written.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn sample(
    stream: &CudaStream,
    logits: &impl DevicePtr<bf16>,
    vocab: usize,
    params: &impl DevicePtr<SampleRow>,
    uniforms: &impl DevicePtr<f64>,
    penalties: Option<&Penalties<'_>>,
    out_ids: &mut impl DevicePtrMut<u32>,
) -> Result<()> {
    const OP: &str = "sample";
    super::ensure_built()?;
    let rows = check_rows(OP, logits.len(), vocab, MAX_SAMPLE_VOCAB)?;
    check_len(OP, "params", params.len(), rows)?;
    check_len(OP, "uniforms", uniforms.len(), rows)?;
    check_len(OP, "out_ids", out_ids.len(), rows)?;
    let mut operands = vec![
        ("logits", logits.stream()),
        ("params", params.stream()),
        ("uniforms", uniforms.stream()),
        ("out_ids", out_ids.stream()),
    ];
    if let Some(p) = penalties {
        check_len(OP, "penalties.offsets", p.offsets.len(), rows + 1)?;
        check_len(OP, "penalties.counts", p.counts.len(), p.ids.len())?;
        if let Some(b) = p.bias {
            check_len(OP, "penalties.bias", b.len(), p.ids.len())?;
            operands.push(("penalties.bias", b.stream()));
        }
        if p.ids.len() > u32::MAX as usize {
            return Err(Error::Backend(format!("{OP}: `penalties.ids` has {} entries, at most 2^32-1", p.ids.len())));
        }
        operands.extend([
            ("penalties.offsets", p.offsets.stream()),
            ("penalties.ids", p.ids.stream()),
            ("penalties.counts", p.counts.stream()),
        ]);
    }
    super::check_same_device(OP, stream, &operands)?;
    let (logits, _logits) = logits.device_ptr(stream);
    let (params, _params) = params.device_ptr(stream);
    let (uniforms, _uniforms) = uniforms.device_ptr(stream);
    let pen = penalties.map(|p| (p.offsets.device_ptr(stream), p.ids.device_ptr(stream), p.counts.device_ptr(stream)));
    let pen_ptrs = pen.as_ref().map(|(o, i, c)| (o.0, i.0, c.0));
    let bias = penalties.and_then(|p| p.bias).map(|b| b.device_ptr(stream));
    let bias_ptr = bias.as_ref().map(|b| b.0);
    let penalty_len = penalties.map_or(0, |p| p.ids.len());
    let (out, _out) = out_ids.device_ptr_mut(stream);
    launch_sample(
        OP,
        stream,
        &SampleLaunch { out, logits, params, uniforms, penalties: pen_ptrs, bias: bias_ptr, penalty_len, rows, vocab },
    )
}

/// The largest vocabulary [`argmax`] takes.
const MAX_ARGMAX_VOCAB: usize = 1 << 30;
/// The largest vocabulary [`sample`] takes (its penalty bitmap lives in shared memory).
pub const MAX_SAMPLE_VOCAB: usize = 1 << 19;

/// Checks `logits` against `vocab` and returns the row count.
fn check_rows(op: &str, logits: usize, vocab: usize, max_vocab: usize) -> Result<usize> {
    let fail = |msg: String| Err(Error::Backend(format!("{op}: {msg}")));
    if vocab == 0 || vocab > max_vocab {
        return fail(format!("vocab is {vocab}, must be in 1..={max_vocab}"));
    }
    if !logits.is_multiple_of(vocab) {
        return fail(format!("`logits` has {logits} elements, not a multiple of vocab {vocab}"));
    }
    let rows = logits / vocab;
    if rows > i32::MAX as usize {
        return fail(format!("{rows} rows, at most 2^31-1 are supported"));
    }
    Ok(rows)
}

/// Checks that operand `name` has `want` elements.
fn check_len(op: &str, name: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Backend(format!("{op}: `{name}` has {got} elements, expected {want}")));
    }
    Ok(())
}

/// One checked argmax call, as the device pointers and sizes `l32_argmax_params` carries.
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
struct ArgmaxLaunch {
    out: u64,
    logits: u64,
    rows: usize,
    vocab: usize,
}

/// One checked sample call: device pointers (penalties: offsets, ids, counts; the bias) and sizes.
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
struct SampleLaunch {
    out: u64,
    logits: u64,
    params: u64,
    uniforms: u64,
    penalties: Option<(u64, u64, u64)>,
    bias: Option<u64>,
    penalty_len: usize,
    rows: usize,
    vocab: usize,
}

#[cfg(llama32_cuda)]
fn launch_argmax(op: &str, stream: &CudaStream, l: &ArgmaxLaunch) -> Result<()> {
    use super::ffi;
    use std::ffi::c_void;
    // Both fit in i64: check_rows bounds rows by 2^31 - 1 and vocab by 2^30.
    let params = ffi::l32_argmax_params {
        out_ids: l.out as *mut u32,
        logits: l.logits as *const c_void,
        rows: l.rows as i64,
        vocab: l.vocab as i64,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: both pointers come from live device slices on this stream's device whose lengths were matched to
    // rows x vocab and rows; the caller holds the slices' stream guards until after this launch.
    let status = unsafe { ffi::l32_argmax(&params, raw) };
    super::check_launch(op, stream, status, || format!("{op} (rows {}, vocab {})", l.rows, l.vocab))
}

#[cfg(llama32_cuda)]
fn launch_sample(op: &str, stream: &CudaStream, l: &SampleLaunch) -> Result<()> {
    use super::ffi;
    use std::ffi::c_void;
    use std::ptr::null;
    let (offsets, ids, counts) = match l.penalties {
        Some((o, i, c)) => (o as *const u32, i as *const u32, c as *const u32),
        None => (null(), null(), null()),
    };
    // All fit in i64: rows <= 2^31 - 1, vocab <= 2^19, penalty_len <= 2^32 - 1 (checked by the caller).
    let params = ffi::l32_sample_params {
        out_ids: l.out as *mut u32,
        logits: l.logits as *const c_void,
        row_params: l.params as *const ffi::l32_sample_row,
        uniforms: l.uniforms as *const f64,
        penalty_offsets: offsets,
        penalty_ids: ids,
        penalty_counts: counts,
        penalty_bias: l.bias.map_or(null(), |b| b as *const f32),
        penalty_len: l.penalty_len as i64,
        rows: l.rows as i64,
        vocab: l.vocab as i64,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: every pointer comes from a live device slice on this stream's device whose length sample() matched
    // to the shapes above (SampleRow has l32_sample_row's layout, asserted at compile time); the caller holds the
    // slices' stream guards until after this launch. The kernel clamps penalty offsets into penalty_len.
    let status = unsafe { ffi::l32_sample(&params, raw) };
    super::check_launch(op, stream, status, || format!("{op} (rows {}, vocab {})", l.rows, l.vocab))
}

#[cfg(not(llama32_cuda))]
fn launch_argmax(_op: &str, _stream: &CudaStream, _launch: &ArgmaxLaunch) -> Result<()> {
    super::ensure_built()
}

#[cfg(not(llama32_cuda))]
fn launch_sample(_op: &str, _stream: &CudaStream, _launch: &SampleLaunch) -> Result<()> {
    super::ensure_built()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_matching_shapes() {
        assert_eq!(check_rows("op", 3 * 128_256, 128_256, MAX_SAMPLE_VOCAB).unwrap(), 3);
        assert_eq!(check_rows("op", 0, 7, MAX_SAMPLE_VOCAB).unwrap(), 0);
        assert!(check_len("op", "x", 4, 4).is_ok());
    }

    #[test]
    fn rejects_each_bad_operand_by_name() {
        assert!(check_rows("op", 10, 0, 100).unwrap_err().to_string().contains("vocab is 0"));
        assert!(check_rows("op", 10, 101, 100).unwrap_err().to_string().contains("vocab is 101"));
        assert!(check_rows("op", 10, 3, 100).unwrap_err().to_string().contains("`logits`"));
        assert!(check_len("op", "uniforms", 3, 4).unwrap_err().to_string().contains("`uniforms`"));
    }

    #[test]
    fn penalty_lists_merge_prompt_and_output() {
        let mut p = PenaltyLists::new();
        p.push_row(&[5, 3, 5], &[7, 3, 7, 7]).unwrap();
        p.push_row(&[], &[]).unwrap();
        p.push_row(&[1], &[]).unwrap();
        assert_eq!(p.rows(), 3);
        assert_eq!(p.offsets(), &[0, 3, 3, 4]);
        assert_eq!(p.ids(), &[3, 5, 7, 1]);
        assert_eq!(p.counts(), &[1, 0, 3, 0]);
    }

    /// A row from a sampler's sorted history is the row from the raw prompt and output: the same lists under a
    /// repetition penalty, and without one the same but for the prompt-only ids (count 0, no penalty to apply).
    #[test]
    fn penalty_rows_from_the_sampler_history_match_the_slices() {
        use rand::{RngExt, SeedableRng};
        use rand_chacha::ChaCha8Rng;

        use crate::sampling::{Sampler, SamplingParams};
        let mut rng = ChaCha8Rng::seed_from_u64(0x1234_5678_9abc_def1);
        let mut next = move |m: u64| rng.random_range(0..m);
        for case in 0..2000 {
            let prompt: Vec<u32> = (0..next(40)).map(|_| next(50) as u32).collect();
            let output: Vec<u32> = (0..next(40)).map(|_| next(60) as u32).collect();
            let mut bias: Vec<(u32, f32)> = (0..next(4)).map(|_| (next(70) as u32, next(9) as f32 - 4.0)).collect();
            bias.extend((0..next(3)).map(|_| (next(70) as u32, f32::NEG_INFINITY)));
            let repetition = if case % 2 == 0 { 1.3 } else { 1.0 };
            let params =
                SamplingParams { repetition_penalty: repetition, frequency_penalty: 0.5, ..Default::default() };
            let mut sampler = Sampler::new(&params, &prompt);
            output.iter().for_each(|&t| sampler.accept(t));
            let (sorted, counts, recorded) = sampler.history();
            assert_eq!(recorded, output.len());
            let mut from_history = PenaltyLists::new();
            from_history.push_row_sorted(sorted, counts, &bias).unwrap();
            let mut from_slices = PenaltyLists::new();
            let prompt_part: &[u32] = if repetition != 1.0 { &prompt } else { &[] };
            from_slices.push_row_biased(prompt_part, &output, &bias).unwrap();
            let row =
                |l: &PenaltyLists| (l.offsets().to_vec(), l.ids().to_vec(), l.counts().to_vec(), l.bias().to_vec());
            assert_eq!(row(&from_history), row(&from_slices), "{prompt:?} {output:?} {bias:?}");
            // And the merge is the lists' first form: every entry sorted, then runs of one id folded.
            let mut all: Vec<(u32, u32, bool, f32)> = prompt_part
                .iter()
                .map(|&t| (t, 0, true, 0.0))
                .chain(output.iter().map(|&t| (t, 1, true, 0.0)))
                .chain(bias.iter().map(|&(t, b)| (t, 0, false, b)))
                .collect();
            all.sort_by_key(|&(id, ..)| id);
            let mut want: Vec<(u32, u32, f32)> = Vec::new();
            for (id, n, seen, b) in all {
                let flag = if seen { 0 } else { PENALTY_UNSEEN };
                match want.last_mut() {
                    Some(last) if last.0 == id => {
                        let unseen = last.1 & PENALTY_UNSEEN != 0 && !seen;
                        last.1 = ((last.1 & !PENALTY_UNSEEN) + n) | if unseen { PENALTY_UNSEEN } else { 0 };
                        last.2 += b;
                    }
                    _ => want.push((id, n | flag, b)),
                }
            }
            let got: Vec<(u32, u32, f32)> = (0..from_slices.ids().len())
                .map(|k| (from_slices.ids()[k], from_slices.counts()[k], from_slices.bias()[k]))
                .collect();
            assert_eq!(got, want, "{prompt:?} {output:?} {bias:?}");
        }
    }

    #[test]
    fn penalty_lists_merge_the_logit_bias() {
        let mut p = PenaltyLists::new();
        // Token 3 is seen and biased, 9 and 1 only biased; a row without penalties lists its bias alone.
        p.push_row_biased(&[5, 3], &[3], &[(1, -2.0), (3, 1.5), (9, 100.0)]).unwrap();
        p.push_row_biased(&[], &[], &[(4, 0.5)]).unwrap();
        p.push_row(&[2], &[]).unwrap();
        assert_eq!(p.offsets(), &[0, 4, 5, 6]);
        assert_eq!(p.ids(), &[1, 3, 5, 9, 4, 2]);
        let u = PENALTY_UNSEEN;
        assert_eq!(p.counts(), &[u, 1, 0, u, u, 0]);
        assert_eq!(p.bias(), &[-2.0, 1.5, 0.0, 100.0, 0.5, 0.0]);
        assert!(p.has_bias());
        let mut q = PenaltyLists::new();
        q.push_row(&[1], &[1]).unwrap();
        assert!(!q.has_bias());
        // min_tokens adds -inf on a stop id that may also carry a user bias: the two add up to -inf, and the entry
        // stays unseen unless the history lists the id.
        let mut m = PenaltyLists::new();
        m.push_row_biased(&[], &[], &[(3, 50.0), (2, f32::NEG_INFINITY), (3, f32::NEG_INFINITY)]).unwrap();
        m.push_row_biased(&[2], &[], &[(2, f32::NEG_INFINITY)]).unwrap();
        assert_eq!(m.ids(), &[2, 3, 2]);
        assert_eq!(m.counts(), &[PENALTY_UNSEEN, PENALTY_UNSEEN, 0]);
        assert!(m.bias().iter().all(|&b| b == f32::NEG_INFINITY), "{:?}", m.bias());
    }

    #[test]
    fn sample_row_mirrors_the_request() {
        let params = SamplingParams { temperature: 0.7, top_k: usize::MAX, min_p: 0.1, ..SamplingParams::default() };
        let row = SampleRow::new(&params);
        assert_eq!(row.top_k, i32::MAX);
        assert_eq!(row.ln_min_p, (0.1f32 as f64).ln());
        assert_eq!(SampleRow::new(&SamplingParams::default()).ln_min_p, f64::NEG_INFINITY);
        assert_eq!(std::mem::size_of::<SampleRow>(), 40);
    }
}
