//! Shared by the scored-step GPU tests: one step's picks and scores on the device against the host reference
//! (`host_step_scored`) on the same executor and step.

use llama32::exec::scored::{host_step_scored, ScoreRow};
use llama32::exec::{Executor, SampleSeq, StepInput};
use llama32::sampling::{Sampler, SamplingParams, TokenLogprob, TokenMask};
use llama32::vision::exec::SeqImages;

/// What a scored step samples and scores: sequence `i` samples row `sample_rows[i]` with `params[i]` (a fresh
/// sampler over `prompts[i]`), masked by `masks[i]`, and `scores` are scored.
pub(crate) struct Scored<'a> {
    pub(crate) images: &'a [Option<SeqImages<'a>>],
    pub(crate) params: &'a [SamplingParams],
    pub(crate) prompts: &'a [&'a [u32]],
    pub(crate) sample_rows: &'a [usize],
    pub(crate) masks: &'a [Option<TokenMask>],
    pub(crate) scores: &'a [ScoreRow],
}

impl Scored<'_> {
    /// Runs `step` through `exec.step_scored` (`device`) or `host_step_scored` with fresh samplers.
    pub(crate) fn run(&self, exec: &mut dyn Executor, step: &StepInput, device: bool) -> (Vec<u32>, Vec<TokenLogprob>) {
        let mut samplers: Vec<Sampler> =
            self.params.iter().zip(self.prompts).map(|(p, pr)| Sampler::new(p, pr)).collect();
        let mut seqs: Vec<SampleSeq<'_>> = samplers
            .iter_mut()
            .zip(self.params)
            .zip(self.prompts)
            .map(|((sampler, params), prompt)| SampleSeq { params, sampler, prompt, output: &[] })
            .collect();
        let (rows, scores) = (self.sample_rows, self.scores);
        let mut masks = || self.masks.to_vec();
        if device {
            exec.step_scored(step, self.images, &mut seqs, rows, &mut masks, scores).unwrap()
        } else {
            host_step_scored(exec, step, self.images, &mut seqs, rows, &mut masks, scores).unwrap()
        }
    }

    /// The device's picks and scores, after checking them against the host's: the same picks, ranks and
    /// alternatives, log-probabilities within 4e-6 relative.
    pub(crate) fn check(&self, name: &str, exec: &mut dyn Executor, step: &StepInput) -> (Vec<u32>, Vec<TokenLogprob>) {
        let device = self.run(exec, step, true);
        let host = self.run(exec, step, false);
        assert_eq!(device.0, host.0, "{name}: picks");
        assert_eq!(device.1.len(), self.scores.len(), "{name}: scores");
        let close = |g: f32, w: f32| g == w || ((g - w).abs() as f64) <= 4e-6 * (w.abs() as f64).max(1.0);
        let ids = |l: &TokenLogprob| l.top.iter().map(|t| t.0).collect::<Vec<_>>();
        for (j, (d, h)) in device.1.iter().zip(&host.1).enumerate() {
            assert_eq!((d.id, d.rank), (h.id, h.rank), "{name}: entry {j}");
            assert_eq!(ids(d), ids(h), "{name}: entry {j} alternatives");
            assert!(close(d.logprob, h.logprob), "{name}: entry {j}: {} vs {}", d.logprob, h.logprob);
            assert!(d.top.iter().zip(&h.top).all(|(a, b)| close(a.1, b.1)), "{name}: entry {j} alternatives");
        }
        device
    }
}
