//! Sampling, token masks and scoring on the device ([`DeviceSampler`], shared by the one-GPU text executor and the
//! vision executor): `step_greedy`, `step_sample` and `step_scored` leave the logits where they are and bring back
//! the picked ids (and, for scored rows, a log-probability, a rank and the alternatives per entry) instead of every
//! row's logits.
//!
//! A scored step, in stream order after the forward:
//! 1. the entries with a given token (prompt rows) are scored on the raw logits;
//! 2. the sampled rows that are masked and also scored by their pick are copied aside (scoring wants the model's
//!    logits, and the masks write `-inf` in place);
//! 3. the masks go up as bitsets and are applied in place;
//! 4. each run of consecutive sampled rows is sampled by one launch, and the ids come back;
//! 5. the entries scored by their pick are scored (masked rows from their copies), and every entry's results come
//!    back.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::bf16;

use super::ops::drv;
use crate::exec::scored::{check_scored, ScoreRow};
use crate::exec::SampleSeq;
use crate::ops::cuda as k;
use crate::sampling::{TokenLogprob, TokenMask};
use crate::{Error, Result};

/// A step's host-side sampling inputs, made before the step runs: each row's parameters, one uniform per sampled
/// (non-greedy) row from the sequence's own stream, exactly as the CPU sampler would draw it, and the penalty lists.
struct SamplingInputs {
    params: Vec<k::sampling::SampleRow>,
    uniforms: Vec<f64>,
    /// `None` when no row has a penalty, a logit bias or a banned token.
    lists: Option<k::sampling::PenaltyLists>,
}

impl SamplingInputs {
    /// Draws the uniforms from `seqs`' streams and builds the lists.
    fn new(seqs: &mut [SampleSeq<'_>]) -> Result<Self> {
        let params = seqs.iter().map(|r| k::sampling::SampleRow::new(r.params)).collect();
        let uniforms =
            seqs.iter_mut().map(|r| if r.params.is_greedy() { 0.0 } else { r.sampler.next_uniform() }).collect();
        // Penalties and logit bias: a row lists its prompt and output only when it has a penalty on, and its biased
        // tokens, with a bias of -inf on the stop ids while `min_tokens` holds them back.
        let biased = |r: &SampleSeq<'_>| !r.params.logit_bias.is_empty() || !r.sampler.banned_now().is_empty();
        let lists = if seqs.iter().any(|r| r.params.has_penalties() || biased(r)) {
            let mut lists = k::sampling::PenaltyLists::new();
            for r in seqs.iter() {
                let banned = r.sampler.banned_now().iter().map(|&id| (id, f32::NEG_INFINITY));
                let bias: Vec<(u32, f32)> = r.params.logit_bias.iter().copied().chain(banned).collect();
                // The sampler's history is kept sorted as the tokens come; it stands for the slices when it has
                // recorded exactly this output (always, for the scheduler's and generate's sequences).
                let (prompt, counts, recorded) = r.sampler.history();
                if !r.params.has_penalties() {
                    lists.push_row_sorted(&[], [], &bias)?;
                } else if recorded == r.output.len() {
                    lists.push_row_sorted(prompt, counts, &bias)?;
                } else {
                    lists.push_row_biased(r.prompt, r.output, &bias)?;
                }
            }
            // Rows whose penalties list nothing yet (a frequency penalty before any output): no lists, and no
            // empty device allocation, which some drivers refuse.
            (!lists.ids().is_empty()).then_some(lists)
        } else {
            None
        };
        Ok(SamplingInputs { params, uniforms, lists })
    }
}

/// The runs of consecutive rows in `rows`: `(first index, first row, length)`.
fn runs(rows: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    for (i, &r) in rows.iter().enumerate() {
        match out.last_mut() {
            Some((_, first, len)) if *first + *len == r => *len += 1,
            _ => out.push((i, r, 1)),
        }
    }
    out
}

/// Checks that a logits buffer holds `rows` rows of `vocab` (a short one would be a bug of the executor's plan).
fn check_holds(logits: &CudaSlice<bf16>, rows: usize, vocab: usize) -> Result<()> {
    if logits.len() < rows * vocab {
        return Err(Error::Backend(format!(
            "the logits buffer holds {} values, not {rows} rows of {vocab}",
            logits.len()
        )));
    }
    Ok(())
}

/// `v` as u32 device indices (rows and ids of this crate fit: steps hold at most 2^31 rows, vocabularies 2^30).
fn as_u32(v: impl Iterator<Item = usize>) -> Vec<u32> {
    v.map(|x| x as u32).collect()
}

/// The device outputs of one scoring launch group: `n` entries of `top` alternatives.
struct ScoreBufs {
    logprob: CudaSlice<f32>,
    rank: CudaSlice<u32>,
    top_ids: CudaSlice<u32>,
    top_lps: CudaSlice<f32>,
    top: usize,
}

impl ScoreBufs {
    fn new(stream: &Arc<CudaStream>, n: usize, top: usize) -> Result<Self> {
        let e = drv("allocate scores");
        // At least one element each: an empty allocation is refused by some drivers.
        let (n1, nt) = (n.max(1), (n * top).max(1));
        Ok(ScoreBufs {
            logprob: stream.alloc_zeros::<f32>(n1).map_err(&e)?,
            rank: stream.alloc_zeros::<u32>(n1).map_err(&e)?,
            top_ids: stream.alloc_zeros::<u32>(nt).map_err(&e)?,
            top_lps: stream.alloc_zeros::<f32>(nt).map_err(&e)?,
            top,
        })
    }

    /// Scores `entries` (row, token, alternatives) of `logits` into outputs `at..at + entries.len()`.
    fn score(
        &mut self,
        stream: &Arc<CudaStream>,
        logits: &impl DevicePtr<bf16>,
        vocab: usize,
        entries: &[(usize, u32, usize)],
        at: usize,
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let (n, top) = (entries.len(), self.top);
        let up = drv("upload scored rows");
        let rows = stream.clone_htod(&as_u32(entries.iter().map(|e| e.0))).map_err(&up)?;
        let ids = stream.clone_htod(&entries.iter().map(|e| e.1).collect::<Vec<u32>>()).map_err(&up)?;
        let tops = stream.clone_htod(&entries.iter().map(|e| e.2 as i32).collect::<Vec<i32>>()).map_err(&up)?;
        let mut out = k::logprobs::ScoredRows {
            logprob: &mut self.logprob.slice_mut(at..at + n),
            rank: &mut self.rank.slice_mut(at..at + n),
            top_ids: &mut self.top_ids.slice_mut(at * top..(at + n) * top),
            top_logprobs: &mut self.top_lps.slice_mut(at * top..(at + n) * top),
        };
        k::logprobs::token_logprobs(stream, logits, vocab, &rows, &ids, Some(&tops), top, &mut out)
    }
}

/// Whether [`DeviceSampler::scored`] takes a scored step of `total` logits rows: a vocabulary the sampler takes,
/// and alternatives and masks (at most one per sampled row) within the kernels' limits (images are the caller's
/// executor's to judge). `Ok(false)`: the host path. When it does, the step's shape is checked here, before the
/// step runs, so that a bad call changes no cache (the masks, which come after the forward, are checked with the
/// picks).
pub(crate) fn scores_on_device(
    vocab: usize,
    total: usize,
    seqs: usize,
    sample_rows: &[usize],
    scores: &[ScoreRow],
) -> Result<bool> {
    let fits = vocab <= k::sampling::MAX_SAMPLE_VOCAB
        && scores.iter().all(|s| s.top <= k::logprobs::MAX_TOP)
        && sample_rows.len() <= k::logprobs::MAX_MASKS;
    if fits {
        check_scored(total, seqs, sample_rows, &[], scores)?;
    }
    Ok(fits)
}

/// The picking end of a CUDA executor's step, over the `[rows, vocab]` bf16 logits its forward left on the device:
/// greedy ids, sampled ids and scored steps, each bringing back only its results. Owns the device buffer the
/// picked ids land in.
pub(crate) struct DeviceSampler {
    ids: CudaSlice<u32>,
}

impl DeviceSampler {
    /// A sampler with room for 256 ids (it grows on demand, outside graph capture).
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        Ok(DeviceSampler { ids: stream.alloc_zeros::<u32>(256).map_err(drv("allocate ids"))? })
    }

    fn ensure_ids(&mut self, stream: &Arc<CudaStream>, n: usize) -> Result<()> {
        if self.ids.len() < n {
            self.ids = stream.alloc_zeros::<u32>(n.next_power_of_two()).map_err(drv("allocate ids"))?;
        }
        Ok(())
    }

    /// The argmax of each of the first `rows` rows of `logits`.
    pub(crate) fn greedy(
        &mut self,
        stream: &Arc<CudaStream>,
        logits: &CudaSlice<bf16>,
        rows: usize,
        vocab: usize,
    ) -> Result<Vec<u32>> {
        if rows == 0 {
            return Ok(Vec::new());
        }
        check_holds(logits, rows, vocab)?;
        self.ensure_ids(stream, rows)?;
        k::sampling::argmax(stream, &logits.slice(..rows * vocab), vocab, &mut self.ids.slice_mut(..rows))?;
        stream.clone_dtoh(&self.ids.slice(..rows)).map_err(drv("read sampled ids"))
    }

    /// Samples sequence `i` from row `rows[i]` of `logits` (one launch per run of consecutive rows), reads the ids
    /// back and records them in the samplers. `seqs`' uniforms are drawn here.
    pub(crate) fn sample(
        &mut self,
        stream: &Arc<CudaStream>,
        logits: &CudaSlice<bf16>,
        vocab: usize,
        rows: &[usize],
        seqs: &mut [SampleSeq<'_>],
    ) -> Result<Vec<u32>> {
        let n = rows.len();
        if n != seqs.len() {
            return Err(Error::Backend(format!("sample: {} sequences for {n} rows", seqs.len())));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        check_holds(logits, rows.iter().max().map_or(0, |&r| r + 1), vocab)?;
        let inputs = SamplingInputs::new(seqs)?;
        let up_err = drv("upload sampling inputs");
        let d_params = stream.clone_htod(&inputs.params).map_err(&up_err)?;
        let d_uniforms = stream.clone_htod(&inputs.uniforms).map_err(&up_err)?;
        let d_lists = match &inputs.lists {
            Some(lists) => Some((
                stream.clone_htod(lists.offsets()).map_err(&up_err)?,
                stream.clone_htod(lists.ids()).map_err(&up_err)?,
                stream.clone_htod(lists.counts()).map_err(&up_err)?,
                if lists.has_bias() { Some(stream.clone_htod(lists.bias()).map_err(&up_err)?) } else { None },
            )),
            None => None,
        };
        self.ensure_ids(stream, n)?;
        for (i, first, len) in runs(rows) {
            // A run's offsets are a window of the lists' offsets: they index the whole id, count and bias arrays.
            let offsets = d_lists.as_ref().map(|l| l.0.slice(i..i + len + 1));
            let penalties = d_lists.as_ref().zip(offsets.as_ref()).map(|((_, ids, counts, bias), offsets)| {
                k::sampling::Penalties {
                    offsets,
                    ids,
                    counts,
                    bias: bias.as_ref().map(|b| b as &dyn cudarc::driver::DevicePtr<f32>),
                }
            });
            k::sampling::sample(
                stream,
                &logits.slice(first * vocab..(first + len) * vocab),
                vocab,
                &d_params.slice(i..i + len),
                &d_uniforms.slice(i..i + len),
                penalties.as_ref(),
                &mut self.ids.slice_mut(i..i + len),
            )?;
        }
        let ids = stream.clone_dtoh(&self.ids.slice(..n)).map_err(drv("read sampled ids"))?;
        for (r, &id) in seqs.iter_mut().zip(&ids) {
            r.sampler.accept(id);
        }
        Ok(ids)
    }

    /// [`crate::exec::Executor::step_scored`]'s picking end (module docs) over the step's `total` rows of `logits`
    /// (the masks write into them), for a step [`scores_on_device`] accepts.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn scored(
        &mut self,
        stream: &Arc<CudaStream>,
        logits: &mut CudaSlice<bf16>,
        total: usize,
        vocab: usize,
        seqs: &mut [SampleSeq<'_>],
        sample_rows: &[usize],
        masks: &[Option<TokenMask>],
        scores: &[ScoreRow],
    ) -> Result<(Vec<u32>, Vec<TokenLogprob>)> {
        let index = check_scored(total, seqs.len(), sample_rows, masks, scores)?;
        if total == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        check_holds(logits, total, vocab)?;
        let masked = |i: usize| masks.get(i).is_some_and(Option::is_some);
        // Output order: the given tokens, then the picks from unmasked rows, then the picks from masked rows.
        let given: Vec<usize> = (0..scores.len()).filter(|&j| scores[j].id.is_some()).collect();
        let (picks_masked, picks_plain): (Vec<usize>, Vec<usize>) =
            (0..scores.len()).filter(|&j| scores[j].id.is_none()).partition(|&j| masked(index[&scores[j].row]));
        let order: Vec<usize> = given.iter().chain(&picks_plain).chain(&picks_masked).copied().collect();
        let top = scores.iter().map(|s| s.top).max().unwrap_or(0);
        // Nothing to score (a step with masks only, or with images): no output buffers.
        let mut out = if scores.is_empty() { None } else { Some(ScoreBufs::new(stream, scores.len(), top)?) };
        let rows = total * vocab;
        // 1. Given tokens, on the raw logits.
        let entries: Vec<(usize, u32, usize)> =
            given.iter().map(|&j| (scores[j].row, scores[j].id.unwrap_or_default(), scores[j].top)).collect();
        if let Some(o) = out.as_mut() {
            o.score(stream, &logits.slice(..rows), vocab, &entries, 0)?;
        }
        // 2. Copies of the masked rows scored by their pick (one per distinct row).
        let mut copy_of: HashMap<usize, usize> = HashMap::new();
        for &j in &picks_masked {
            let next = copy_of.len();
            copy_of.entry(scores[j].row).or_insert(next);
        }
        let copies = if copy_of.is_empty() {
            None
        } else {
            let mut c = stream.alloc_zeros::<bf16>(copy_of.len() * vocab).map_err(drv("allocate masked-row copies"))?;
            for (&row, &at) in &copy_of {
                let (src, mut dst) =
                    (logits.slice(row * vocab..(row + 1) * vocab), c.slice_mut(at * vocab..(at + 1) * vocab));
                stream.memcpy_dtod(&src, &mut dst).map_err(drv("copy a masked row"))?;
            }
            Some(c)
        };
        // 3. The masks, in place.
        let mut mask_rows = Vec::new();
        let mut bits = Vec::new();
        for (i, m) in masks.iter().enumerate() {
            if let Some(m) = m {
                mask_rows.push(sample_rows[i] as u32);
                k::logprobs::mask_words(m, vocab, &mut bits);
            }
        }
        if !mask_rows.is_empty() {
            let up = drv("upload token masks");
            let d_rows = stream.clone_htod(&mask_rows).map_err(&up)?;
            let d_bits = stream.clone_htod(&bits).map_err(&up)?;
            k::logprobs::mask_logits(stream, &mut logits.slice_mut(..rows), vocab, &d_rows, &d_bits)?;
        }
        // 4. Sampling.
        let picked = self.sample(stream, logits, vocab, sample_rows, seqs)?;
        // 5. The picks' scores, then every result back.
        let pick = |j: usize| picked[index[&scores[j].row]];
        let plain: Vec<(usize, u32, usize)> =
            picks_plain.iter().map(|&j| (scores[j].row, pick(j), scores[j].top)).collect();
        let Some(mut out) = out else {
            return Ok((picked, Vec::new()));
        };
        out.score(stream, &logits.slice(..rows), vocab, &plain, given.len())?;
        if let Some(c) = &copies {
            let entries: Vec<(usize, u32, usize)> =
                picks_masked.iter().map(|&j| (copy_of[&scores[j].row], pick(j), scores[j].top)).collect();
            out.score(stream, c, vocab, &entries, given.len() + picks_plain.len())?;
        }
        let rd = drv("read scores");
        let lp = stream.clone_dtoh(&out.logprob).map_err(&rd)?;
        let rank = stream.clone_dtoh(&out.rank).map_err(&rd)?;
        let top_ids = stream.clone_dtoh(&out.top_ids).map_err(&rd)?;
        let top_lps = stream.clone_dtoh(&out.top_lps).map_err(&rd)?;
        let mut scored: Vec<Option<TokenLogprob>> = vec![None; scores.len()];
        for (at, &j) in order.iter().enumerate() {
            let id = scores[j].id.unwrap_or_else(|| pick(j));
            let host = (&lp[..], &rank[..], &top_ids[..], &top_lps[..]);
            scored[j] = Some(k::logprobs::ScoredRows::entry(host, top, at, id, scores[j].top));
        }
        let scored = scored.into_iter().map(|s| s.ok_or_else(|| Error::Backend("an entry was not scored".into())));
        Ok((picked, scored.collect::<Result<Vec<_>>>()?))
    }
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_group_consecutive_rows() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[0, 1, 2]), vec![(0, 0, 3)]);
        assert_eq!(runs(&[3, 7, 8, 9, 12]), vec![(0, 3, 1), (1, 7, 3), (4, 12, 1)]);
    }
}
