//! One step: validating it, uploading its metadata (self-attention tables and the per-token cross-attention
//! tables built from the mask rows), and running it eagerly or through a decode graph.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::super::drv;
use super::{alloc, MllamaCudaExecutor, Sizes};
use crate::exec::{StepInput, StepOutput};
use crate::ops::cuda as k;
use crate::vision::exec::SeqImages;
use crate::vision::tiles::RowTiles;
use crate::{Error, Result};

impl MllamaCudaExecutor {
    /// Uploads `src` into `dst`, growing it (and bumping `generation`: captured graphs read the old address) when
    /// it is too small.
    fn put<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        stream: &Arc<CudaStream>,
        dst: &mut CudaSlice<T>,
        src: &[T],
        generation: &mut u64,
    ) -> Result<()> {
        if dst.len() < src.len() {
            *dst = alloc(stream, src.len().next_power_of_two())?;
            *generation += 1;
        }
        if !src.is_empty() {
            stream.memcpy_htod(src, &mut dst.slice_mut(..src.len())).map_err(drv("upload step metadata"))?;
        }
        Ok(())
    }

    /// Validates a step against the executor's limits and its image references against the registered sets, as
    /// every step does before it touches the device. A tensor-parallel group checks each step once, on its first
    /// rank, before any rank starts it, so that a bad request fails without aborting the group (the ranks hold the
    /// same sets, so the check is theirs too).
    pub(crate) fn check_step(&self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<()> {
        input.validate(&self.ids_cfg, self.num_blocks, self.layout.block_size)?;
        let seqs = input.num_seqs();
        let tokens = input.num_tokens();
        if tokens > self.opts.max_step_tokens {
            return Err(Error::request(format!(
                "step of {tokens} tokens exceeds max_step_tokens {}",
                self.opts.max_step_tokens
            )));
        }
        if input.logits_rows.len() > self.opts.max_logits_rows {
            return Err(Error::request(format!(
                "step asks for {} logits rows, at most {} are supported",
                input.logits_rows.len(),
                self.opts.max_logits_rows
            )));
        }
        if !images.is_empty() && images.len() != seqs {
            return Err(Error::request(format!("step: {} image entries for {seqs} sequences", images.len())));
        }
        for (s, im) in images.iter().enumerate() {
            let Some(im) = im else { continue };
            let set = self.sets.get(&im.key).ok_or_else(|| {
                Error::request(format!("step: sequence {s} uses image set {} which is not registered", im.key))
            })?;
            let n = (input.cu_seqlens[s + 1] - input.cu_seqlens[s]) as usize;
            let cols = set.map.columns();
            if im.mask.len() != n * cols {
                return Err(Error::request(format!(
                    "step: sequence {s} has {} mask values for {n} tokens x {cols} tiles",
                    im.mask.len(),
                )));
            }
            if im.mask.iter().any(|&v| v > 1) {
                return Err(Error::request(format!("step: sequence {s}'s cross-attention mask is not 0/1")));
            }
            for (i, row) in im.mask.chunks(cols).enumerate() {
                set.map.row(row, &|| format!("step: sequence {s} token {i} (image set {})", im.key))?;
            }
        }
        Ok(())
    }

    /// Uploads the metadata of a checked step. `graph` (a padded decode step about to run through a graph) fixes
    /// what the graph bakes in: the cross layers run even when no sequence has images, the cross tables are
    /// `cross_tiles` wide, and the split counts are the given (self, cross) ones.
    pub(super) fn begin(
        &mut self,
        input: &StepInput,
        images: &[Option<SeqImages<'_>>],
        graph: Option<(usize, usize)>,
    ) -> Result<Sizes> {
        let (seqs, tokens) = (input.num_seqs(), input.num_tokens());
        let tpt = self.cfg.vision.num_patches();
        let lens: Vec<usize> = input.cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
        let mut sz = Sizes {
            tokens,
            seqs,
            width: input.max_blocks_per_seq,
            max_query: lens.iter().copied().max().unwrap_or(0),
            max_ctx: input.positions.iter().map(|&p| p as usize + 1).max().unwrap_or(0),
            cross: graph.is_some() || images.iter().any(Option::is_some),
            ..Sizes::default()
        };
        sz.splits = match graph {
            Some((splits, _)) => splits,
            None => k::attention::decode_num_splits(&self.layout, tokens, sz.max_ctx, self.num_sms),
        };
        let s = self.stream.clone();
        let (m, gen) = (&mut self.meta, &mut self.generation);
        Self::put(&s, &mut m.ids, &input.token_ids, gen)?;
        Self::put(&s, &mut m.positions, &input.positions, gen)?;
        Self::put(&s, &mut m.cu_seqlens, &input.cu_seqlens, gen)?;
        Self::put(&s, &mut m.block_tables, &input.block_tables, gen)?;
        Self::put(&s, &mut m.slots, &input.slot_mapping, gen)?;
        Self::put(&s, &mut m.seq_of_token, &input.seq_of_token(), gen)?;
        Self::put(&s, &mut m.logits_rows, &input.logits_rows, gen)?;
        if !sz.cross {
            return Ok(sz);
        }
        // Per token: the blocks it sees (runs of equal lists within a sequence share a table row).
        let mut runs: Vec<Vec<u32>> = Vec::new();
        let mut cu = vec![0u32];
        let (mut x_pos, mut x_seq, mut a_scale, mut m_scale) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (si, &n) in lens.iter().enumerate() {
            let im = images.get(si).copied().flatten();
            for tk in 0..n {
                let (list, attn, mlp) = match im {
                    None => (vec![0u32], 0.0, 0.0),
                    Some(im) => {
                        let set = self
                            .sets
                            .get(&im.key)
                            .ok_or_else(|| Error::request(format!("step: image set {} is not registered", im.key)))?;
                        let cols = set.map.columns();
                        let row = &im.mask[tk * cols..(tk + 1) * cols];
                        let what = || format!("step: sequence {si} token {tk} (image set {})", im.key);
                        let block = |slot: usize| set.blocks[slot];
                        match set.map.row(row, &what)? {
                            RowTiles::Sees(slots) => (slots.into_iter().map(block).collect(), 1.0, 1.0),
                            RowTiles::None => ((0..set.map.held()).map(block).collect(), 1.0, 0.0),
                        }
                    }
                };
                let ctx = if im.is_none() { 1 } else { list.len() * tpt };
                let new_run = tk == 0 || runs.last() != Some(&list);
                if new_run {
                    runs.push(list);
                    cu.push(*cu.last().unwrap_or(&0));
                }
                if let Some(c) = cu.last_mut() {
                    *c += 1;
                }
                x_pos.push((ctx - 1) as u32);
                x_seq.push((runs.len() - 1) as u32);
                a_scale.push(attn);
                m_scale.push(mlp);
            }
        }
        let width = match graph {
            // Every list fits: a set never holds more than the pool's tiles.
            Some(_) => self.cross_tiles.max(1),
            None => runs.iter().map(Vec::len).max().unwrap_or(1).max(1),
        };
        let mut tables = vec![0u32; runs.len() * width];
        for (r, list) in runs.iter().enumerate() {
            tables[r * width..][..list.len()].copy_from_slice(list);
        }
        sz.runs = runs.len();
        sz.x_width = width;
        sz.x_max_query = cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(1);
        sz.x_max_ctx = x_pos.iter().map(|&p| p as usize + 1).max().unwrap_or(1);
        sz.x_splits = match graph {
            Some((_, x_splits)) => x_splits,
            None => k::attention::decode_num_splits(&self.cross_layout, sz.runs, sz.x_max_ctx, self.num_sms),
        };
        Self::put(&s, &mut m.x_positions, &x_pos, gen)?;
        Self::put(&s, &mut m.x_cu, &cu, gen)?;
        Self::put(&s, &mut m.x_tables, &tables, gen)?;
        Self::put(&s, &mut m.x_seq_of_token, &x_seq, gen)?;
        Self::put(&s, &mut m.attn_scale, &a_scale, gen)?;
        Self::put(&s, &mut m.mlp_scale, &m_scale, gen)?;
        Ok(sz)
    }

    /// Runs the step, leaving its logits rows at the front of the logits buffer on the device.
    pub(super) fn run_device(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<()> {
        self.check_step(input, images)?;
        if self.graph_eligible(input) {
            self.step_graph(input, images)
        } else {
            let sz = self.begin(input, images, None)?;
            self.forward(sz, input.logits_rows.len())
        }
    }

    pub(super) fn run(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<StepOutput> {
        self.run_device(input, images)?;
        let n = input.logits_rows.len() * self.cfg.text.base.vocab_size;
        if n == 0 {
            return Ok(StepOutput::default());
        }
        let host = self.stream.clone_dtoh(&self.acts.logits.slice(..n)).map_err(drv("read logits"))?;
        Ok(StepOutput { logits: host.into_iter().map(f32::from).collect() })
    }
}
