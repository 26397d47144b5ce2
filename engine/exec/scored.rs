//! Steps that sample with token masks and score tokens ([`super::Executor::step_scored`]): what the serving engine
//! runs when a step has structured outputs, logprobs or prompt logprobs. [`host_step_scored`] is the reference (the
//! logits come to the host); the CUDA executor keeps it all on the device.

use std::collections::HashMap;

use rayon::prelude::*;

use super::{Executor, SampleSeq, StepInput};
use crate::sampling::{token_logprob, TokenLogprob, TokenMask};
use crate::vision::exec::SeqImages;
use crate::{Error, Result};

/// The token masks of a scored step's sampled rows, computed on demand (once, after the forward is issued): one
/// entry per sampled row, or an empty list for none.
pub type MaskSource<'a> = &'a mut dyn FnMut() -> Vec<Option<TokenMask>>;

/// One token to score: its log-probability, rank and most likely alternatives under logits row `row`, the model's
/// logits before any token mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoreRow {
    /// The logits row (an index into the step's `logits_rows`).
    pub row: usize,
    /// The token; `None`: the id sampled from this row (which must be a sampled row).
    pub id: Option<u32>,
    /// How many alternatives, most likely first.
    pub top: usize,
}

/// Checks a scored step's arguments against its `total` logits rows: one sampled row per sequence, all distinct,
/// `masks` empty or one per sampled row, every scored row within the step and every `id: None` one sampled. Returns
/// each sampled row's index among `sample_rows`.
pub fn check_scored(
    total: usize,
    seqs: usize,
    sample_rows: &[usize],
    masks: &[Option<TokenMask>],
    scores: &[ScoreRow],
) -> Result<HashMap<usize, usize>> {
    let bad = |msg: String| Err(Error::Backend(format!("scored step: {msg}")));
    if sample_rows.len() != seqs {
        return bad(format!("{} sampled rows for {seqs} sequences", sample_rows.len()));
    }
    if !masks.is_empty() && masks.len() != seqs {
        return bad(format!("{} token masks for {seqs} sampled rows", masks.len()));
    }
    let mut index = HashMap::with_capacity(sample_rows.len());
    for (i, &r) in sample_rows.iter().enumerate() {
        if r >= total || index.insert(r, i).is_some() {
            return bad(format!("sampled row {r} is past the step's {total} rows or listed twice"));
        }
    }
    for s in scores {
        if s.row >= total {
            return bad(format!("scored row {} is past the step's {total} rows", s.row));
        }
        if s.id.is_none() && !index.contains_key(&s.row) {
            return bad(format!("row {} is scored by its sampled id but is not sampled", s.row));
        }
    }
    Ok(index)
}

/// [`super::Executor::step_sample`] through [`super::Executor::step_scored`]: every logits row sampled, in order,
/// nothing masked or scored (for executors whose picking lives in `step_scored`).
pub fn sample_every_row<E: Executor + ?Sized>(
    exec: &mut E,
    input: &StepInput,
    seqs: &mut [SampleSeq<'_>],
) -> Result<Vec<u32>> {
    let rows: Vec<usize> = (0..input.logits_rows.len()).collect();
    if seqs.len() != rows.len() {
        return Err(Error::request(format!("step_sample: {} sequences for {} logits rows", seqs.len(), rows.len())));
    }
    Ok(exec.step_scored(input, &[], seqs, &rows, &mut Vec::new, &[])?.0)
}

/// [`super::Executor::step_scored`] with the logits on the host: runs the step, takes the masks, samples each row on
/// the cores in parallel (a masked row from a copy with every disallowed token at `-inf`), then scores each entry
/// with [`token_logprob`] on the unmasked logits.
#[allow(clippy::too_many_arguments)]
pub fn host_step_scored<E: Executor + ?Sized>(
    exec: &mut E,
    input: &StepInput,
    images: &[Option<SeqImages<'_>>],
    seqs: &mut [SampleSeq<'_>],
    sample_rows: &[usize],
    masks: MaskSource<'_>,
    scores: &[ScoreRow],
) -> Result<(Vec<u32>, Vec<TokenLogprob>)> {
    let total = input.logits_rows.len();
    check_scored(total, seqs.len(), sample_rows, &[], scores)?;
    let out = exec.step_with_images(input, images)?;
    let masks = &masks();
    let index = check_scored(total, seqs.len(), sample_rows, masks, scores)?;
    let vocab = exec.config().vocab_size;
    if out.logits.len() != total * vocab {
        return Err(Error::Backend(format!("{} logits for {total} rows", out.logits.len())));
    }
    let row = |r: usize| &out.logits[r * vocab..(r + 1) * vocab];
    // Each row's sampler is its own, so the rows spread over the cores and the picks do not depend on the order.
    let picked: Vec<u32> = seqs
        .par_iter_mut()
        .zip(sample_rows.par_iter())
        .enumerate()
        .map(|(i, (s, &r))| match masks.get(i).and_then(Option::as_ref) {
            Some(m) => {
                let mut masked = row(r).to_vec();
                m.apply(&mut masked);
                s.sampler.sample(&masked)
            }
            None => s.sampler.sample(row(r)),
        })
        .collect();
    let scored = scores
        .par_iter()
        .map(|s| {
            let id = s.id.unwrap_or_else(|| picked[index[&s.row]]);
            token_logprob(row(s.row), id, s.top)
        })
        .collect();
    Ok((picked, scored))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_scored_names_each_mismatch() {
        let s = |row, id| ScoreRow { row, id, top: 1 };
        assert!(check_scored(4, 2, &[1, 3], &[], &[s(0, Some(5)), s(3, None)]).is_ok());
        let err = |r: Result<HashMap<usize, usize>>| r.unwrap_err().to_string();
        assert!(err(check_scored(4, 1, &[1, 3], &[], &[])).contains("2 sampled rows for 1"));
        assert!(err(check_scored(4, 2, &[1, 3], &[None], &[])).contains("1 token masks"));
        assert!(err(check_scored(4, 2, &[1, 4], &[], &[])).contains("sampled row 4"));
        assert!(err(check_scored(4, 2, &[1, 1], &[], &[])).contains("listed twice"));
        assert!(err(check_scored(4, 2, &[1, 3], &[], &[s(4, Some(0))])).contains("scored row 4"));
        assert!(err(check_scored(4, 2, &[1, 3], &[], &[s(2, None)])).contains("row 2 is scored by its sampled id"));
    }
}
