//! The engine thread's picking end of a step: which rows want log-probabilities (generated tokens and prompt
//! tokens), one scored step through the executor (with the guided rows' masks), and the scores split back by row.

use super::{guides, Core};
use crate::exec::scored::ScoreRow;
use crate::kv::prefix::SeqId;
use crate::sampling::TokenLogprob;
use crate::sched::{run_step, run_step_scored, StepPlan};
use crate::{Error, Result};

impl Core<'_> {
    /// Per logits row of `plan`: the number of alternatives wanted when the row's request wants log-probabilities
    /// (requests with `best_of > n` need them for ranking).
    fn logprob_rows(&self, plan: &StepPlan) -> Vec<Option<usize>> {
        plan.logits_seqs
            .iter()
            .map(|s| {
                let r = self.seqs.get(s).and_then(|i| self.reqs.get(&i.req))?;
                match (r.logprobs, r.buffered) {
                    (Some(k), _) => Some(k),
                    (None, true) => Some(0),
                    (None, false) => None,
                }
            })
            .collect()
    }

    /// Runs `plan`. Returns the picked ids, their log-probabilities where wanted, and the prompt scores of its
    /// prompt rows (sequence, position of the first row, one entry per row).
    #[allow(clippy::type_complexity)]
    pub(super) fn run_plan(
        &mut self,
        plan: &StepPlan,
    ) -> Result<(Vec<u32>, Vec<Option<TokenLogprob>>, Vec<(SeqId, usize, Vec<TokenLogprob>)>)> {
        let wants = self.logprob_rows(plan);
        let guided = !self.guides.is_empty() && plan.logits_seqs.iter().any(|s| self.guides.contains_key(s));
        if wants.iter().all(Option::is_none) && !plan.has_prompt_rows() && !guided {
            let picked = run_step(&mut self.sched, self.exec.as_mut(), plan)?;
            return Ok((picked, vec![None; plan.logits_seqs.len()], Vec::new()));
        }
        // Sampled rows scored by their pick first, then every prompt row of every request that wants them.
        let mut scores: Vec<ScoreRow> = plan
            .sample_rows
            .iter()
            .zip(&wants)
            .filter_map(|(&row, w)| w.map(|top| ScoreRow { row, id: None, top }))
            .collect();
        let sampled_scores = scores.len();
        let mut prompt_spans = Vec::with_capacity(plan.prompt_rows.len());
        for pr in &plan.prompt_rows {
            let wanted = self.seqs.get(&pr.seq).and_then(|i| self.reqs.get(&i.req)?.prompt_logprobs.as_ref());
            let Some(ps) = wanted else { continue };
            let targets = ps.prompt.get(pr.start + 1..pr.start + 1 + pr.len).ok_or_else(|| {
                Error::Backend(format!("prompt rows {}..+{} past a prompt of {}", pr.start, pr.len, ps.prompt.len()))
            })?;
            let top = ps.top;
            scores.extend(targets.iter().enumerate().map(|(i, &t)| ScoreRow {
                row: pr.first_row + i,
                id: Some(t),
                top,
            }));
            prompt_spans.push((pr.seq, pr.start, pr.len));
        }
        // The guided rows' masks, computed by the executor's call once the forward is issued.
        let vocab = self.exec.config().vocab_size;
        let eos = if guided { self.sched.eos_ids().to_vec() } else { Vec::new() };
        let (guides, seqs, failures) = (&mut self.guides, &self.seqs, &mut self.guide_failures);
        let mut masks = || if guided { guides::masks(guides, seqs, failures, &eos, vocab, plan) } else { Vec::new() };
        let (picked, mut scored) = run_step_scored(&mut self.sched, self.exec.as_mut(), plan, &mut masks, &scores)?;
        if scored.len() != scores.len() {
            return Err(Error::Backend(format!("{} scores for {} scored rows", scored.len(), scores.len())));
        }
        let mut prompt = Vec::with_capacity(prompt_spans.len());
        let mut rest = scored.split_off(sampled_scores);
        for (seq, start, len) in prompt_spans {
            let tail = rest.split_off(len);
            prompt.push((seq, start, std::mem::replace(&mut rest, tail)));
        }
        let mut sampled = scored.into_iter();
        let lps = wants.iter().map(|w| w.and_then(|_| sampled.next())).collect();
        Ok((picked, lps, prompt))
    }
}
