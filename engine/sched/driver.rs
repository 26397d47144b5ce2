//! Drives a [`Scheduler`] over an [`Executor`]: schedule, run, update, until every sequence is finished.

use super::{Scheduler, StepPlan, StepUpdate};
use crate::exec::generate::Generation;
use crate::exec::scored::{MaskSource, ScoreRow};
use crate::exec::Executor;
use crate::kv::prefix::SeqId;
use crate::sampling::TokenLogprob;
use crate::vision::exec::SeqImages;
use crate::{Error, Result};

/// Runs `plan` and returns the id picked for each of its sampled rows: the backend's argmax
/// ([`Executor::step_greedy`]) when every sampled sequence is plain greedy, else each sequence's sampler
/// ([`Executor::step_sample`]), or [`Executor::step_scored`] for a step with images or prompt rows. Either way the
/// ids are recorded in the samplers.
pub fn run_step<E: Executor + ?Sized>(sched: &mut Scheduler, exec: &mut E, plan: &StepPlan) -> Result<Vec<u32>> {
    let picked = if plan.images.iter().any(Option::is_some) || plan.has_prompt_rows() {
        // Steps with images (vision models) or prompt rows pick through the scored step (on the device where the
        // executor can, else on the host), with nothing to score.
        run_step_scored(sched, exec, plan, &mut Vec::new, &[])?.0
    } else if sched.all_plain_greedy(plan) {
        let ids = exec.step_greedy(&plan.input)?;
        sched.accept_picked(plan, &ids);
        ids
    } else {
        let mut rows = sched.sample_rows(plan)?;
        exec.step_sample(&plan.input, &mut rows)?
    };
    if picked.len() != plan.logits_seqs.len() {
        return Err(Error::Backend(format!(
            "{} ids picked for {} sampled sequences",
            picked.len(),
            plan.logits_seqs.len()
        )));
    }
    Ok(picked)
}

/// Loops schedule -> step -> update until no sequence is left, and returns the finished generations ordered by
/// sequence id (the order the requests were added in). `detok(seq, id)` returns the text newly decoded for `id`;
/// `on_update` sees every step's text deltas and finished sequences as they happen.
pub fn run_to_completion<E: Executor + ?Sized>(
    sched: &mut Scheduler,
    exec: &mut E,
    detok: &mut dyn FnMut(SeqId, u32) -> Result<String>,
    on_update: &mut dyn FnMut(&StepUpdate),
) -> Result<Vec<(SeqId, Generation)>> {
    let (bs, nb) = (sched.kv().block_size(), sched.kv().num_blocks());
    if bs != exec.block_size() || nb > exec.num_blocks() {
        return Err(Error::request(format!(
            "scheduler cache of {nb} blocks of {bs} tokens does not fit the executor's {} blocks of {}",
            exec.num_blocks(),
            exec.block_size()
        )));
    }
    let mut done = Vec::new();
    while sched.has_work() {
        let Some(plan) = sched.schedule()? else {
            return Err(Error::Backend("scheduler: sequences are left but nothing can be scheduled".into()));
        };
        let picked = run_step(sched, exec, &plan)?;
        let up = sched.update(&plan, &picked, detok)?;
        on_update(&up);
        done.extend(up.finished.into_iter().map(|f| (f.seq, f.generation)));
    }
    done.sort_by_key(|(id, _)| *id);
    Ok(done)
}

/// Runs `plan` (images included) with the logits copied to the host, and picks each sampled row's id there with
/// its sequence's sampler (the ids are recorded in the samplers). Returns the ids and the logits of every row,
/// `[plan.input.logits_rows.len(), vocab]` (sampled rows at [`StepPlan::sample_rows`], prompt rows at
/// [`StepPlan::prompt_rows`]), for callers that also need log-probabilities.
pub fn run_step_on_host<E: Executor + ?Sized>(
    sched: &mut Scheduler,
    exec: &mut E,
    plan: &StepPlan,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let out = exec.step_with_images(&plan.input, &plan_images(plan))?;
    let vocab = exec.config().vocab_size;
    let total = plan.input.logits_rows.len();
    if out.logits.len() != total * vocab {
        return Err(Error::Backend(format!("{} logits for {total} rows", out.logits.len())));
    }
    let mut rows = sched.sample_rows(plan)?;
    if plan.sample_rows.len() != rows.len() || plan.sample_rows.iter().any(|&r| r >= total) {
        return Err(Error::Backend(format!(
            "sampled rows {:?} of {total} for {} sequences",
            plan.sample_rows,
            rows.len()
        )));
    }
    let picked =
        rows.iter_mut().zip(&plan.sample_rows).map(|(r, &row)| r.sampler.sample(&out.logits[row * vocab..][..vocab]));
    Ok((picked.collect(), out.logits))
}

/// Runs `plan` through [`Executor::step_scored`]: sampled row `i` may carry a token mask `masks()[i]` (structured
/// outputs; computed once the forward is issued; an empty list masks nothing), and each entry of `scores` is scored
/// under the model's logits. Returns the picked ids (recorded in the samplers) and the scores in `scores`' order.
pub fn run_step_scored<E: Executor + ?Sized>(
    sched: &mut Scheduler,
    exec: &mut E,
    plan: &StepPlan,
    masks: MaskSource<'_>,
    scores: &[ScoreRow],
) -> Result<(Vec<u32>, Vec<TokenLogprob>)> {
    let mut rows = sched.sample_rows(plan)?;
    exec.step_scored(&plan.input, &plan_images(plan), &mut rows, &plan.sample_rows, masks, scores)
}

/// The per-sequence images of `plan` as [`Executor::step_with_images`] takes them (empty when no chunk has any).
pub fn plan_images(plan: &StepPlan) -> Vec<Option<SeqImages<'_>>> {
    if plan.images.iter().all(Option::is_none) {
        return Vec::new();
    }
    plan.images.iter().map(|o| o.as_ref().map(|p| SeqImages { key: p.key, mask: &p.mask })).collect()
}
