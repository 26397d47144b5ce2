//! The [`Executor`] impl of [`MllamaCudaExecutor`]: text-only steps, image-set registration and vision steps (a
//! tensor-parallel rank first stages its vocab-parallel token ids); greedy, sampled and scored steps pick on the
//! device ([`crate::exec::cuda::sample::DeviceSampler`]).

use super::super::upload_bf16;
use super::MllamaCudaExecutor;
use crate::config::LlamaConfig;
use crate::exec::cuda::sample::scores_on_device;
use crate::exec::scored::{host_step_scored, sample_every_row, MaskSource, ScoreRow};
use crate::exec::{Executor, SampleSeq, StepInput, StepOutput};
use crate::sampling::TokenLogprob;
use crate::vision::exec::SeqImages;
use crate::vision::pipeline::EncodedImages;
use crate::{Error, Result};

impl Executor for MllamaCudaExecutor {
    fn config(&self) -> &LlamaConfig {
        &self.cfg.text.base
    }

    fn block_size(&self) -> usize {
        self.layout.block_size
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn step(&mut self, input: &StepInput) -> Result<StepOutput> {
        self.stage_rank_ids(input)?;
        self.run(input, &[])
    }

    fn max_logits_rows(&self) -> Option<usize> {
        Some(self.opts.max_logits_rows)
    }

    fn set_ablation(&mut self, labels: Vec<&'static str>) -> Result<()> {
        MllamaCudaExecutor::set_ablation(self, labels)
    }

    fn add_images(&mut self, key: u64, images: &EncodedImages) -> Result<()> {
        let want = images.len() * self.cfg.vision_tokens_per_image() * self.cfg.text.base.hidden_size;
        if images.is_empty() || images.states.len() != want {
            return Err(Error::request(format!(
                "add_images: {} state values for {} image(s), expected {want}",
                images.states.len(),
                images.len()
            )));
        }
        let states = upload_bf16(&self.stream, &images.states)?;
        self.add_images_device(key, &states.slice(..), &images.num_tiles)
    }

    fn trim_images(&mut self, key: u64) -> Result<bool> {
        Ok(self.trim(key))
    }

    fn images_fit(&self, num_tiles: &[usize]) -> Result<bool> {
        self.fits(num_tiles)
    }

    fn remove_images(&mut self, key: u64) -> bool {
        self.release_set(key)
    }

    fn step_with_images(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<StepOutput> {
        self.stage_rank_ids(input)?;
        self.run(input, images)
    }

    fn step_greedy(&mut self, input: &StepInput) -> Result<Vec<u32>> {
        self.step_on_device(input, &[])?;
        self.pick_greedy(input.logits_rows.len())
    }

    fn step_sample(&mut self, input: &StepInput, seqs: &mut [SampleSeq<'_>]) -> Result<Vec<u32>> {
        sample_every_row(self, input, seqs)
    }

    fn step_scored(
        &mut self,
        input: &StepInput,
        images: &[Option<SeqImages<'_>>],
        seqs: &mut [SampleSeq<'_>],
        sample_rows: &[usize],
        masks: MaskSource<'_>,
        scores: &[ScoreRow],
    ) -> Result<(Vec<u32>, Vec<TokenLogprob>)> {
        let (total, vocab) = (input.logits_rows.len(), self.cfg.text.base.vocab_size);
        if !scores_on_device(vocab, total, seqs.len(), sample_rows, scores)? {
            return host_step_scored(self, input, images, seqs, sample_rows, masks, scores);
        }
        self.step_on_device(input, images)?;
        // The forward is issued, not finished: the masks are computed while the device runs it.
        let masks = &masks();
        self.pick_scored(total, seqs, sample_rows, masks, scores)
    }
}

impl MllamaCudaExecutor {
    /// Runs a step with its logits left on the device (a tensor-parallel rank first stages its token ids).
    pub(crate) fn step_on_device(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<()> {
        self.stage_rank_ids(input)?;
        self.run_device(input, images)
    }

    /// The argmax of each of the last step's first `rows` logits rows, picked on the device.
    pub(crate) fn pick_greedy(&mut self, rows: usize) -> Result<Vec<u32>> {
        let vocab = self.cfg.text.base.vocab_size;
        // The logits stay on the device: one id per row comes back.
        self.sampler.greedy(&self.stream, &self.acts.logits, rows, vocab)
    }

    /// [`Executor::step_scored`]'s picks and scores over the last step's `total` logits rows, on the device.
    pub(crate) fn pick_scored(
        &mut self,
        total: usize,
        seqs: &mut [SampleSeq<'_>],
        sample_rows: &[usize],
        masks: &[Option<crate::sampling::TokenMask>],
        scores: &[ScoreRow],
    ) -> Result<(Vec<u32>, Vec<TokenLogprob>)> {
        let vocab = self.cfg.text.base.vocab_size;
        self.sampler.scored(&self.stream, &mut self.acts.logits, total, vocab, seqs, sample_rows, masks, scores)
    }
}
