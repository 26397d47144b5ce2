//! The engine thread's part of structured outputs: each step's token masks for the guided rows, advancing the
//! guides by the picked ids, and failing the requests whose grammar failed.

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;

use super::{Core, SeqInfo};
use crate::kv::prefix::SeqId;
use crate::sampling::TokenMask;
use crate::sched::StepPlan;
use crate::serve::guided::Guide;
use crate::Result;

/// The token mask of each sampled row of `plan` whose sequence is guided (empty when none is), computed on the cores
/// in parallel (the engine hands this to the executor, which calls it once the step's forward is issued). A guide
/// that fails gets a mask of the EOS ids alone (its row is never sampled free), and its request is recorded in
/// `failures`: it fails after the step, its token unsent.
pub(super) fn masks(
    guides: &mut HashMap<SeqId, Guide>,
    seqs: &HashMap<SeqId, SeqInfo>,
    failures: &mut Vec<(u64, String)>,
    eos_ids: &[u32],
    vocab: usize,
    plan: &StepPlan,
) -> Vec<Option<TokenMask>> {
    if guides.is_empty() || !plan.logits_seqs.iter().any(|s| guides.contains_key(s)) {
        return Vec::new();
    }
    let wanted: HashSet<SeqId> = plan.logits_seqs.iter().copied().collect();
    let mut mine: Vec<(SeqId, &mut Guide)> =
        guides.iter_mut().filter(|(s, _)| wanted.contains(s)).map(|(&s, g)| (s, g)).collect();
    let mut computed: HashMap<SeqId, Result<TokenMask>> = mine.par_iter_mut().map(|(s, g)| (*s, g.mask())).collect();
    let mut masks = Vec::with_capacity(plan.logits_seqs.len());
    for s in &plan.logits_seqs {
        masks.push(match computed.remove(s) {
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => {
                if let Some(i) = seqs.get(s) {
                    failures.push((i.req, e.to_string()));
                }
                let mut eos = TokenMask::new(vocab);
                eos_ids.iter().for_each(|&t| eos.allow(t));
                Some(eos)
            }
            None => None,
        });
    }
    masks
}

impl Core<'_> {
    /// Records that sequence `seq`'s guide failed: its request fails after the step.
    fn guide_failed(&mut self, seq: SeqId, msg: String) {
        if let Some(i) = self.seqs.get(&seq) {
            self.guide_failures.push((i.req, msg));
        }
    }

    /// Advances the guided sequences of `plan` by their picked ids.
    pub(super) fn advance_guides(&mut self, plan: &StepPlan, picked: &[u32]) {
        let mut failed = Vec::new();
        for (s, &id) in plan.logits_seqs.iter().zip(picked) {
            if let Some(g) = self.guides.get_mut(s) {
                if let Err(e) = g.advance(id) {
                    failed.push((*s, e.to_string()));
                }
            }
        }
        for (s, msg) in failed {
            self.guide_failed(s, msg);
        }
    }

    /// Fails the requests whose guides failed this step.
    pub(super) fn fail_guided(&mut self) {
        for (req, msg) in std::mem::take(&mut self.guide_failures) {
            if self.reqs.contains_key(&req) {
                self.fail(req, &msg);
            }
        }
    }
}
