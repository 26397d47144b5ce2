//! The [`Executor`] impl of [`MllamaCudaExecutor`]: text-only steps, image-set registration and vision steps (a
//! tensor-parallel rank first stages its vocab-parallel token ids).

use super::super::upload_bf16;
use super::MllamaCudaExecutor;
use crate::config::LlamaConfig;
use crate::exec::{Executor, StepInput, StepOutput};
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
}
