//! Executors run one batched step of the model. The CPU reference ([`cpu::CpuExecutor`]) and the CUDA executor
//! implement the same [`Executor`] trait over the same flat [`StepInput`], so tests can run identical steps
//! through both.

pub mod cpu;
pub mod cuda;
pub mod generate;
pub mod scored;

use crate::config::LlamaConfig;
use crate::{Error, Result};

/// One batch of work in flat arrays, in the layout vLLM and FlashInfer use.
///
/// Sequence `s` owns the new tokens `cu_seqlens[s]..cu_seqlens[s + 1]`. Each new token has a position and a cache
/// slot; its K/V are written to that slot before attention, and it attends to every cached position up to and
/// including its own, read through the sequence's block table. Prefill chunks and decode tokens mix freely.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepInput {
    /// Token ids of all new tokens, sequence after sequence.
    pub token_ids: Vec<u32>,
    /// Position of each new token in its sequence.
    pub positions: Vec<u32>,
    /// Query offsets per sequence, length `num_seqs + 1`, starting at 0.
    pub cu_seqlens: Vec<u32>,
    /// Block tables, `[num_seqs, max_blocks_per_seq]` row-major; unused entries may hold anything.
    pub block_tables: Vec<u32>,
    /// Row length of `block_tables`.
    pub max_blocks_per_seq: usize,
    /// Cache slot (`block * block_size + offset`) for each new token's K/V.
    pub slot_mapping: Vec<u32>,
    /// Indices (into the new tokens) whose logits are wanted, in output order.
    pub logits_rows: Vec<u32>,
}

impl StepInput {
    /// Number of sequences in the step.
    pub fn num_seqs(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }

    /// Number of new tokens in the step.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Sequence index of every new token.
    pub fn seq_of_token(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.num_tokens());
        for s in 0..self.num_seqs() {
            let n = (self.cu_seqlens[s + 1] - self.cu_seqlens[s]) as usize;
            out.extend(std::iter::repeat_n(s as u32, n));
        }
        out
    }

    /// Checks every index against the model and the cache geometry, so that no backend ever reads out of bounds.
    pub fn validate(&self, cfg: &LlamaConfig, num_blocks: usize, block_size: usize) -> Result<()> {
        let bad = |msg: String| Err(Error::request(format!("step input: {msg}")));
        let t = self.num_tokens();
        if t == 0 {
            return bad("no tokens".into());
        }
        if self.positions.len() != t || self.slot_mapping.len() != t {
            return bad(format!(
                "{t} tokens but {} positions and {} slots",
                self.positions.len(),
                self.slot_mapping.len()
            ));
        }
        if self.cu_seqlens.first() != Some(&0) || self.cu_seqlens.last().map(|&x| x as usize) != Some(t) {
            return bad(format!("cu_seqlens must start at 0 and end at {t}, got {:?}", self.cu_seqlens));
        }
        if self.cu_seqlens.windows(2).any(|w| w[1] <= w[0]) {
            return bad("cu_seqlens must strictly increase (every sequence has at least one new token)".into());
        }
        let seqs = self.num_seqs();
        // Checked: a step decoded from another node carries max_blocks_per_seq as a raw 64-bit number, and a
        // wrapped product could equal an empty table and pass.
        if self.max_blocks_per_seq == 0 || Some(self.block_tables.len()) != seqs.checked_mul(self.max_blocks_per_seq) {
            return bad(format!(
                "block_tables has {} entries, expected {seqs} x {}",
                self.block_tables.len(),
                self.max_blocks_per_seq
            ));
        }
        if let Some((i, &id)) = self.token_ids.iter().enumerate().find(|(_, &id)| id as usize >= cfg.vocab_size) {
            return bad(format!("token id {id} at index {i} is outside the vocabulary (size {})", cfg.vocab_size));
        }
        let seq_of = self.seq_of_token();
        for (i, (&s, &pos)) in seq_of.iter().zip(&self.positions).enumerate() {
            let (s, pos) = (s as usize, pos as usize);
            if pos >= cfg.max_position_embeddings {
                return bad(format!(
                    "position {pos} of token {i} exceeds max_position_embeddings {}",
                    cfg.max_position_embeddings
                ));
            }
            let blocks_needed = pos / block_size + 1;
            if blocks_needed > self.max_blocks_per_seq {
                return bad(format!("position {pos} of token {i} lies beyond the block table of sequence {s}"));
            }
            let row = &self.block_tables[s * self.max_blocks_per_seq..][..blocks_needed];
            if let Some(&b) = row.iter().find(|&&b| b as usize >= num_blocks) {
                return bad(format!("sequence {s} uses block {b}, but the cache has {num_blocks} blocks"));
            }
            let expected_slot = row[pos / block_size] as usize * block_size + pos % block_size;
            if self.slot_mapping[i] as usize != expected_slot {
                return bad(format!(
                    "token {i} (sequence {s}, position {pos}) maps to slot {} but its block table gives {expected_slot}",
                    self.slot_mapping[i]
                ));
            }
        }
        if let Some(&r) = self.logits_rows.iter().find(|&&r| r as usize >= t) {
            return bad(format!("logits row {r} is not a token of this step ({t} tokens)"));
        }
        Ok(())
    }
}

/// What a step returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutput {
    /// Logits for each requested row, `[logits_rows.len(), vocab]` row-major, f32.
    pub logits: Vec<f32>,
}

/// A backend that owns weights, the KV block pool and workspaces, and runs batched steps.
pub trait Executor {
    /// The model's configuration.
    fn config(&self) -> &LlamaConfig;
    /// Tokens per KV block.
    fn block_size(&self) -> usize;
    /// Physical KV blocks in the pool.
    fn num_blocks(&self) -> usize;
    /// Runs one step: writes the new tokens' K/V into the cache and returns the requested logits.
    fn step(&mut self, input: &StepInput) -> Result<StepOutput>;

    /// Most logits rows one step may ask for (a device buffer's size, or what a memory plan reserved); `None`: no
    /// limit of its own. The engine keeps prompt log-probabilities' rows within it, after one row per sequence.
    fn max_logits_rows(&self) -> Option<usize> {
        None
    }

    /// Steps so far whose decoder layers ran as one fused launch (the CUDA persistent decode stack,
    /// `--persistent-decode`), for reports; 0 for a backend without one.
    fn fused_decode_steps(&self) -> u64 {
        0
    }

    /// Turns per-phase timing of the fused decode launch on or off (profiling; read with
    /// [`fused_decode_phases`](Self::fused_decode_phases)); a backend without a fused launch on refuses `on`.
    fn set_fused_decode_timing(&mut self, on: bool) -> Result<()> {
        if on {
            return Err(Error::request("phase timing needs the CUDA persistent decode stack (--persistent-decode)"));
        }
        Ok(())
    }

    /// The phases of the last fused decode launch since timing was turned on (waits for the device); `None` while
    /// timing is off.
    fn fused_decode_phases(&self) -> Result<Option<crate::ops::cuda::decode_layers::StackPhases>> {
        Ok(None)
    }

    /// Runs one step and returns the argmax id of each requested logits row (lowest id on ties), for sequences
    /// that decode greedily without penalties. Backends that can pick on the device override this and skip
    /// copying the logits to the host.
    fn step_greedy(&mut self, input: &StepInput) -> Result<Vec<u32>> {
        let out = self.step(input)?;
        let vocab = self.config().vocab_size;
        Ok(out.logits.chunks(vocab).map(crate::sampling::argmax).collect())
    }

    /// Runs `input` as [`step`](Self::step) does (a decode step in the padded shape its CUDA graph has), but
    /// eagerly and with every [`crate::model::Ops`] call timed, and adds the step to `profile`
    /// ([`crate::model::profile`]). Returns the step's output. Executors without a profiler (tensor-parallel
    /// ranks, the vision models) refuse.
    fn profile_step(
        &mut self,
        input: &StepInput,
        profile: &mut crate::model::profile::StepProfile,
    ) -> Result<StepOutput> {
        let _ = (input, profile);
        Err(Error::request(
            "this executor has no step profiler (it profiles text models on the CPU or one GPU, without tensor \
             parallelism)",
        ))
    }

    /// Leaves out every later step's calls under `labels` (see [`crate::model::profile::ABLATABLE`]; an empty list
    /// restores the full steps), for `llama32 bench --ablate`: a run's step time without them, against a full
    /// run, is their marginal cost. The steps' outputs are then meaningless. Executors without it
    /// (tensor-parallel ranks, the vision models) refuse a non-empty list.
    fn set_ablation(&mut self, labels: Vec<&'static str>) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        Err(Error::request(
            "--ablate: this executor cannot leave calls out (text models on the CPU or one GPU, without tensor \
             parallelism)",
        ))
    }

    /// Registers the encoded images of a request under `key` (a vision model computes and keeps their
    /// cross-attention K/V until [`remove_images`](Self::remove_images)). Text models refuse.
    fn add_images(&mut self, key: u64, images: &crate::vision::pipeline::EncodedImages) -> Result<()> {
        let _ = (key, images);
        Err(Error::request("this model takes no images (it is not a Llama 3.2 Vision model)"))
    }

    /// Forgets the image set `key`; returns whether it existed.
    fn remove_images(&mut self, key: u64) -> bool {
        let _ = key;
        false
    }

    /// Whether images with these real tile counts can be registered now. `Ok(false)`: not until registered sets
    /// are removed or trimmed (a device pool of bounded size is full); an error: never (the set exceeds the whole
    /// pool). Backends without such a limit always say yes.
    fn images_fit(&self, num_tiles: &[usize]) -> Result<bool> {
        let _ = num_tiles;
        Ok(true)
    }

    /// Frees the cross-attention K/V of the padding tiles of image set `key`, keeping only each image's real tiles.
    /// Afterwards only rows that see an image may use the set: rows that see none (the tokens before a prompt's
    /// first `<|image|>`) attend over every tile, padding included, as transformers does, and a step that has
    /// such a row for a trimmed set fails; [`add_images`](Self::add_images) again restores the full set. Returns
    /// whether the set exists. Backends that keep every tile do nothing.
    fn trim_images(&mut self, key: u64) -> Result<bool> {
        let _ = key;
        Ok(false)
    }

    /// Runs one step in which sequence `s` may use the image set `images[s]` (`images` empty: none does). Text
    /// models run steps without images only.
    fn step_with_images(
        &mut self,
        input: &StepInput,
        images: &[Option<crate::vision::exec::SeqImages<'_>>],
    ) -> Result<StepOutput> {
        if images.iter().any(Option::is_some) {
            return Err(Error::request("this model takes no images (it is not a Llama 3.2 Vision model)"));
        }
        self.step(input)
    }

    /// Runs one step (sequence `s` seeing `images[s]`, as [`step_with_images`](Self::step_with_images)), picks an
    /// id for each sampled row `sample_rows[i]` with `seqs[i]` (with every token `masks()[i]` disallows at `-inf`,
    /// where the masks have one; `masks` is called once, after the forward is issued, so that a device backend
    /// overlaps the masks' computation with it; an empty list masks nothing), and scores each entry of `scores`
    /// under the model's unmasked logits. Returns the picked ids (recorded in the samplers) and the scores in
    /// `scores`' order. The reference ([`scored::host_step_scored`]) brings the logits to the host; a device backend
    /// may mask, sample and score on the device and bring back only the results.
    #[allow(clippy::too_many_arguments)]
    fn step_scored(
        &mut self,
        input: &StepInput,
        images: &[Option<crate::vision::exec::SeqImages<'_>>],
        seqs: &mut [SampleSeq<'_>],
        sample_rows: &[usize],
        masks: scored::MaskSource<'_>,
        scores: &[scored::ScoreRow],
    ) -> Result<(Vec<u32>, Vec<crate::sampling::TokenLogprob>)> {
        scored::host_step_scored(self, input, images, seqs, sample_rows, masks, scores)
    }

    /// Runs one step and samples one id per requested logits row with that row's sequence state (penalties,
    /// temperature, filters, its random stream), recording the id in the sampler. The CPU reference samples on the
    /// host; a device backend may sample on the device, drawing the same uniforms so the picks are the same.
    fn step_sample(&mut self, input: &StepInput, rows: &mut [SampleSeq<'_>]) -> Result<Vec<u32>> {
        let out = self.step(input)?;
        let vocab = self.config().vocab_size;
        if rows.len() != input.logits_rows.len() {
            return Err(Error::request(format!(
                "step_sample: {} sequences for {} logits rows",
                rows.len(),
                input.logits_rows.len()
            )));
        }
        Ok(rows.iter_mut().zip(out.logits.chunks(vocab)).map(|(r, l)| r.sampler.sample(l)).collect())
    }
}

/// One logits row's sampling state for [`Executor::step_sample`].
pub struct SampleSeq<'a> {
    /// The sequence's sampling parameters.
    pub params: &'a crate::sampling::SamplingParams,
    /// Its sampler (random stream and penalty counts); the picked id is recorded in it.
    pub sampler: &'a mut crate::sampling::Sampler,
    /// Prompt ids (repetition penalty).
    pub prompt: &'a [u32],
    /// Ids generated so far (all penalties).
    pub output: &'a [u32],
}
