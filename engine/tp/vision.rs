//! Tensor parallelism for Llama 3.2 Vision on the CPU reference: [`TpMllamaCpuExecutor`] runs `tp` ranks of the
//! vision decoder ([`MllamaCpuExecutor::shard`]), one thread each, joined by an in-process [`LocalComm`].
//!
//! - The text decoder is sharded like the text model ([`TpPlan`]): self-attention q/k/v column-parallel by heads
//!   and `o_proj` row-parallel, the MLP by its width, each row-parallel projection followed by an all-reduce. The
//!   cross-attention layers are split the same way: `q_proj`, `k_proj`, `v_proj` by heads, `o_proj` by columns
//!   (then an all-reduce, before the tanh gate), `q_norm`/`k_norm` and the gates whole.
//! - Cross-attention K/V: every rank computes, from the same projected vision states, the K/V of its own KV heads
//!   only, once per registered image set.
//! - The embedding table (`vocab_size + 8` rows) is split by rows (then all-reduced) when `tp` divides it, else
//!   replicated; `lm_head` is vocab-parallel and the logits are all-gathered.
//! - The vision encoder and the projector are replicated and run **once** per image, outside the ranks (by the
//!   caller's [`crate::vision::pipeline::ImageEncoder`]); the ranks share the resulting states by reference. On the
//!   CPU every rank lives in one process, so one encoder run serves all of them; docs/parallelism.md has the
//!   reasoning for GPUs.

use super::comm::{Communicator, LocalComm};
use super::load::load_mllama_rank_text_with;
use super::plan::TpPlan;
use crate::config::LlamaConfig;
use crate::exec::{Executor, StepInput, StepOutput};
use crate::vision::config::MllamaConfig;
use crate::vision::exec::{DecoderComm, DecoderShard, MllamaCpuExecutor, SeqImages};
use crate::vision::pipeline::EncodedImages;
use crate::vision::weights::MllamaWeights;
use crate::weights::Checkpoint;
use crate::{Error, Result};

/// A rank's [`DecoderComm`] over a [`Communicator`].
struct RankComm<'a, C: Communicator> {
    comm: &'a C,
}

impl<C: Communicator> DecoderComm for RankComm<'_, C> {
    fn all_reduce(&mut self, x: &mut [f32]) -> Result<()> {
        self.comm.all_reduce_sum_f32(x)
    }

    /// All-gathers `[rows, vocab / tp]` from every rank and interleaves them into `[rows, vocab]`.
    fn gather_logits(&mut self, local: Vec<f32>, rows: usize) -> Result<Vec<f32>> {
        let world = self.comm.world();
        if world == 1 {
            return Ok(local);
        }
        let vl = local.len().checked_div(rows).unwrap_or(0);
        let mut gathered = vec![0.0f32; world * local.len()];
        self.comm.all_gather_f32(&local, &mut gathered)?;
        let mut out = vec![0.0f32; gathered.len()];
        for (r, part) in gathered.chunks(local.len().max(1)).enumerate() {
            for (row, src) in part.chunks(vl.max(1)).enumerate() {
                out[row * world * vl + r * vl..][..vl].copy_from_slice(src);
            }
        }
        Ok(out)
    }
}

/// The Llama 3.2 Vision CPU executor run as `tp` tensor-parallel ranks (threads of this process). Each rank holds
/// only its shard of the text decoder and of the caches (self-attention K/V and cross-attention K/V of its KV
/// heads); logits come back for the full vocabulary, bit-identical on every rank (rank 0's are returned). It
/// implements the same [`Executor`] contract as [`MllamaCpuExecutor`] (`add_images`, `remove_images`,
/// `step_with_images`).
pub struct TpMllamaCpuExecutor {
    cfg: MllamaConfig,
    ranks: Vec<(MllamaCpuExecutor, LocalComm)>,
}

impl TpMllamaCpuExecutor {
    /// Loads `tp` rank shards of the text decoder of the checkpoint `ckpt` (each rank reads only its slices; the
    /// vision tensors are not read) with self-attention pools of `max_tokens` tokens in blocks of `block_size`.
    /// Fails with the config field named when `tp` does not divide the text model.
    pub fn new(cfg: MllamaConfig, ckpt: &Checkpoint, tp: usize, max_tokens: usize, block_size: usize) -> Result<Self> {
        Self::new_quantized(cfg, ckpt, tp, (max_tokens, block_size), crate::quant::AtLoad::NONE)
    }

    /// [`new`](Self::new) with the language model's projections quantized at load by `at_load` (W4A16; a quantized
    /// checkpoint is read quantized either way), and its vocabulary tables in int8 when `at_load` says so: every rank
    /// quantizes its own slices ([`crate::tp::load::MllamaRankSource::new_with`]). `at_load` takes an
    /// `Option<Scheme>` too.
    pub fn new_quantized(
        cfg: MllamaConfig,
        ckpt: &Checkpoint,
        tp: usize,
        (max_tokens, block_size): (usize, usize),
        at_load: impl Into<crate::quant::AtLoad>,
    ) -> Result<Self> {
        let at_load = at_load.into();
        let plan = TpPlan::new(&cfg.text.base, tp)?;
        let mut rank_cfg = cfg.clone();
        rank_cfg.text.base = plan.rank_config();
        let comms = LocalComm::group(tp)?;
        let mut ranks = Vec::with_capacity(tp);
        for (r, comm) in comms.into_iter().enumerate() {
            let shard = load_mllama_rank_text_with(&cfg, &plan, r, ckpt, at_load)?;
            let w = MllamaWeights { text: shard.text, ..Default::default() };
            let ds = DecoderShard { embed_rows: shard.embed_rows, full_embed_rows: cfg.text.embed_rows() };
            let exec = MllamaCpuExecutor::shard(rank_cfg.clone(), w, max_tokens, block_size, ds)?;
            ranks.push((exec, comm));
        }
        Ok(TpMllamaCpuExecutor { cfg, ranks })
    }

    /// The number of ranks.
    pub fn tp(&self) -> usize {
        self.ranks.len()
    }

    /// The full model's configuration.
    pub fn mllama_config(&self) -> &MllamaConfig {
        &self.cfg
    }

    /// Rank `rank`'s decoder (its config, embedding rows and registered image sets).
    pub fn rank(&self, rank: usize) -> Option<&MllamaCpuExecutor> {
        self.ranks.get(rank).map(|(e, _)| e)
    }

    /// Number of registered image sets.
    pub fn num_image_sets(&self) -> usize {
        self.ranks.first().map_or(0, |(e, _)| e.num_image_sets())
    }

    /// Runs one step on every rank and returns each rank's full-vocabulary logits, rank 0 first. `images` as in
    /// [`Executor::step_with_images`].
    pub fn step_all_ranks(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<Vec<Vec<f32>>> {
        let results: Vec<Result<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .map(|(exec, comm)| {
                    s.spawn(move || {
                        let mut rc = RankComm { comm: &*comm };
                        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            exec.run_with(input, images, &mut rc)
                        }));
                        match run {
                            Ok(Ok(out)) => Ok(out.logits),
                            Ok(Err(e)) => {
                                comm.abort(&e.to_string());
                                Err(e)
                            }
                            Err(_) => {
                                comm.abort("panicked");
                                Err(Error::Backend(format!("tensor-parallel rank {} panicked", comm.rank())))
                            }
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(Error::Backend("a tensor-parallel rank thread died".into()))))
                .collect()
        });
        // Report a rank's own error rather than the "group aborted" it caused on the others.
        let mut first_err: Option<Error> = None;
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            match r {
                Ok(l) => out.push(l),
                Err(e) => {
                    let own = !e.to_string().contains("group aborted");
                    let replace = first_err.as_ref().is_none_or(|f| own && f.to_string().contains("group aborted"));
                    if replace {
                        first_err = Some(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

impl Executor for TpMllamaCpuExecutor {
    fn config(&self) -> &LlamaConfig {
        &self.cfg.text.base
    }

    fn block_size(&self) -> usize {
        self.ranks[0].0.block_size()
    }

    fn num_blocks(&self) -> usize {
        self.ranks[0].0.num_blocks()
    }

    fn step(&mut self, input: &StepInput) -> Result<StepOutput> {
        self.step_with_images(input, &[])
    }

    /// Every rank computes the cross-attention K/V of its own KV heads from the same (replicated) states; a set
    /// that fails on any rank is registered on none (and an earlier set with that key is gone).
    fn add_images(&mut self, key: u64, images: &EncodedImages) -> Result<()> {
        for k in 0..self.ranks.len() {
            if let Err(e) = self.ranks[k].0.add_images(key, images) {
                for (exec, _) in &mut self.ranks {
                    exec.remove_images(key);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn remove_images(&mut self, key: u64) -> bool {
        let mut found = false;
        for (exec, _) in &mut self.ranks {
            found |= exec.remove_images(key);
        }
        found
    }

    fn trim_images(&mut self, key: u64) -> Result<bool> {
        let mut found = false;
        for (exec, _) in &mut self.ranks {
            found |= exec.trim_images(key)?;
        }
        Ok(found)
    }

    fn step_with_images(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<StepOutput> {
        let mut all = self.step_all_ranks(input, images)?;
        Ok(StepOutput { logits: all.swap_remove(0) })
    }
}
