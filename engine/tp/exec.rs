//! The tensor-parallel CPU executor: `tp` ranks, each a thread running [`model::forward`](crate::model::forward)
//! over its own shard ([`TpRankOps`], a [`CpuOps`] plus a [`Communicator`]), joined by an in-process group.

use std::ops::Range;

use super::comm::{Communicator, LocalComm};
use super::load::{check_quantized_plan, load_rank_weights_at, RankQuant};
use super::plan::TpPlan;
use crate::config::LlamaConfig;
use crate::exec::cpu::{CpuAct, CpuOps};
use crate::exec::{Executor, StepInput, StepOutput};
use crate::model::{forward, Dims, Linear, Norm, Ops};
use crate::quant::{AtLoad, Scheme};
use crate::weights::WeightSource;
use crate::{Error, Result};

/// One rank's kernels: the CPU kernels over the rank's shard (built with [`TpPlan::rank_config`]) plus the
/// tensor-parallel hooks of [`Ops`] implemented through a communicator.
pub struct TpRankOps<C: Communicator> {
    inner: CpuOps,
    comm: C,
    /// Embedding rows this rank holds (token ids in this range embed here, others as zeros).
    vocab: Range<usize>,
    local_ids: Vec<u32>,
}

impl<C: Communicator> TpRankOps<C> {
    /// Wraps `inner` (built over the rank's shard) for the rank `comm.rank()` whose embedding rows are `vocab`.
    pub fn new(inner: CpuOps, comm: C, vocab: Range<usize>) -> Self {
        TpRankOps { inner, comm, vocab, local_ids: Vec::new() }
    }

    /// The rank's communicator.
    pub fn comm(&self) -> &C {
        &self.comm
    }

    /// The rank's CPU kernels.
    pub fn inner(&self) -> &CpuOps {
        &self.inner
    }
}

impl<C: Communicator> Ops for TpRankOps<C> {
    type Act = CpuAct;

    fn begin_step(&mut self, step: &StepInput) -> Result<()> {
        self.inner.begin_step(step)
    }

    fn alloc(&mut self, rows: usize, cols: usize) -> Result<CpuAct> {
        self.inner.alloc(rows, cols)
    }

    fn release(&mut self, act: CpuAct) {
        self.inner.release(act)
    }

    /// Vocab-parallel embedding: ids in this rank's range are embedded from its rows, every other row is zero; the
    /// recipe's [`all_reduce`](Ops::all_reduce) then assembles the full embedding (one non-zero term per row, so it
    /// is exact).
    fn embed(&mut self, ids: &[u32], out: &mut CpuAct) -> Result<()> {
        let v0 = self.vocab.start;
        self.local_ids.clear();
        self.local_ids
            .extend(ids.iter().map(|&id| if self.vocab.contains(&(id as usize)) { id - v0 as u32 } else { 0 }));
        self.inner.embed(&self.local_ids, out)?;
        let cols = out.cols.max(1);
        for (row, &id) in out.data.chunks_mut(cols).zip(ids) {
            if !self.vocab.contains(&(id as usize)) {
                row.fill(0.0);
            }
        }
        Ok(())
    }

    fn rms_norm(&mut self, x: &CpuAct, norm: Norm, out: &mut CpuAct) -> Result<()> {
        self.inner.rms_norm(x, norm, out)
    }

    fn add_rms_norm(&mut self, residual: &mut CpuAct, delta: &CpuAct, norm: Norm, out: &mut CpuAct) -> Result<()> {
        self.inner.add_rms_norm(residual, delta, norm, out)
    }

    fn linear(&mut self, x: &CpuAct, w: Linear, out: &mut CpuAct) -> Result<()> {
        self.inner.linear(x, w, out)
    }

    fn rope_and_cache(&mut self, layer: usize, qkv: &mut CpuAct, step: &StepInput) -> Result<()> {
        self.inner.rope_and_cache(layer, qkv, step)
    }

    fn attention(&mut self, layer: usize, qkv: &CpuAct, step: &StepInput, out: &mut CpuAct) -> Result<()> {
        self.inner.attention(layer, qkv, step, out)
    }

    fn silu_mul(&mut self, gate_up: &CpuAct, out: &mut CpuAct) -> Result<()> {
        self.inner.silu_mul(gate_up, out)
    }

    fn gather_rows(&mut self, x: &CpuAct, rows: &[u32], out: &mut CpuAct) -> Result<()> {
        self.inner.gather_rows(x, rows, out)
    }

    fn all_reduce(&mut self, x: &mut CpuAct) -> Result<()> {
        self.comm.all_reduce_sum_f32(&mut x.data)
    }

    /// All-gathers `[rows, vocab / tp]` from every rank and interleaves them into `[rows, vocab]`.
    fn gather_logits(&mut self, local: CpuAct) -> Result<CpuAct> {
        let world = self.comm.world();
        if world == 1 {
            return Ok(local);
        }
        let (rows, vl) = (local.rows, local.cols);
        let mut gathered = vec![0.0f32; world * local.data.len()];
        self.comm.all_gather_f32(&local.data, &mut gathered)?;
        let mut out = self.inner.alloc(rows, world * vl)?;
        for (r, part) in gathered.chunks(local.data.len().max(1)).enumerate() {
            for (row, src) in part.chunks(vl.max(1)).enumerate() {
                out.data[row * world * vl + r * vl..][..vl].copy_from_slice(src);
            }
        }
        self.inner.release(local);
        Ok(out)
    }
}

/// The CPU reference run as `tp` tensor-parallel ranks, one thread each, over an in-process communicator. Each rank
/// holds only its shard of the weights and of the KV cache (its KV heads); logits come back for the full vocabulary,
/// bit-identical on every rank (rank 0's are returned).
pub struct TpCpuExecutor {
    cfg: LlamaConfig,
    rank_cfg: LlamaConfig,
    ranks: Vec<TpRankOps<LocalComm>>,
    num_blocks: usize,
    block_size: usize,
    scheme: Option<Scheme>,
}

impl TpCpuExecutor {
    /// Loads `tp` rank shards from `src` (each rank reads only its slices) with KV pools of `num_blocks` blocks of
    /// `block_size` tokens. Fails with the config field named when `tp` does not divide the model. A quantized
    /// checkpoint is detected from its config.json and loaded quantized (see [`new_quantized`](Self::new_quantized)).
    pub fn new(
        cfg: LlamaConfig,
        src: WeightSource<'_>,
        tp: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self> {
        Self::new_quantized(cfg, src, tp, AtLoad::NONE, num_blocks, block_size)
    }

    /// [`new`](Self::new) with the projections quantized with `at_load.scheme` at load time (`--quantize`: each
    /// rank's bf16-rounded f32 slices are quantized, which equals slicing the quantization of the whole model), or,
    /// for a quantized checkpoint (no scheme given), read from its int4 tensors and sliced ([`RankQuant`]); with
    /// `at_load.tables_int8` (`--embeddings int8`) each rank's vocabulary rows are quantized to int8 per row, which
    /// equals slicing the quantized tables. Refused with the reason named: W4A8 at `tp > 1`, a row-parallel K share
    /// that is not a multiple of the group ([`check_quantized_plan`]), and a scheme with an already quantized
    /// checkpoint. `at_load` takes an `Option<Scheme>` too.
    pub fn new_quantized(
        cfg: LlamaConfig,
        src: WeightSource<'_>,
        tp: usize,
        at_load: impl Into<AtLoad>,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self> {
        let at_load = at_load.into();
        let plan = TpPlan::new(&cfg, tp)?;
        let quant = RankQuant::resolve(&src, at_load.scheme)?;
        if let Some(q) = &quant {
            check_quantized_plan(&plan, q.scheme())?;
        }
        let rank_cfg = plan.rank_config();
        let comms = LocalComm::group(tp)?;
        let mut ranks = Vec::with_capacity(tp);
        for (r, comm) in comms.into_iter().enumerate() {
            let w = load_rank_weights_at(&plan, r, src, (quant.as_ref(), at_load.tables_int8), true)?;
            let ops = CpuOps::new(rank_cfg.clone(), w, num_blocks, block_size)?;
            ranks.push(TpRankOps::new(ops, comm, plan.rank(r)?.vocab));
        }
        Ok(TpCpuExecutor { cfg, rank_cfg, ranks, num_blocks, block_size, scheme: quant.map(|q| q.scheme()) })
    }

    /// An executor whose pools hold `max_tokens` tokens (rounded up to whole blocks).
    pub fn with_capacity(
        cfg: LlamaConfig,
        src: WeightSource<'_>,
        tp: usize,
        max_tokens: usize,
        block_size: usize,
    ) -> Result<Self> {
        Self::with_capacity_quantized(cfg, src, tp, AtLoad::NONE, max_tokens, block_size)
    }

    /// [`new_quantized`](Self::new_quantized) with pools of `max_tokens` tokens (rounded up to whole blocks).
    pub fn with_capacity_quantized(
        cfg: LlamaConfig,
        src: WeightSource<'_>,
        tp: usize,
        at_load: impl Into<AtLoad>,
        max_tokens: usize,
        block_size: usize,
    ) -> Result<Self> {
        Self::new_quantized(cfg, src, tp, at_load, max_tokens.div_ceil(block_size.max(1)).max(1), block_size)
    }

    /// The scheme of the quantized projections, if the model is quantized.
    pub fn quant_scheme(&self) -> Option<Scheme> {
        self.scheme
    }

    /// The number of ranks.
    pub fn tp(&self) -> usize {
        self.ranks.len()
    }

    /// The config each rank's kernels run with.
    pub fn rank_config(&self) -> &LlamaConfig {
        &self.rank_cfg
    }

    /// Runs one step on every rank and returns each rank's full-vocabulary logits, rank 0 first.
    pub fn step_all_ranks(&mut self, input: &StepInput) -> Result<Vec<Vec<f32>>> {
        input.validate(&self.cfg, self.num_blocks, self.block_size)?;
        let dims = Dims::of(&self.rank_cfg);
        let results: Vec<Result<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .map(|rank| {
                    s.spawn(move || {
                        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| forward(rank, dims, input)));
                        match run {
                            Ok(Ok(logits)) => Ok(logits.data),
                            Ok(Err(e)) => {
                                rank.comm().abort(&e.to_string());
                                Err(e)
                            }
                            Err(_) => {
                                rank.comm().abort("panicked");
                                Err(Error::Backend(format!("tensor-parallel rank {} panicked", rank.comm().rank())))
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
        // Report the first failing rank's own error rather than the "group aborted" it caused elsewhere.
        let mut first_err = None;
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            match r {
                Ok(l) => out.push(l),
                Err(e) => {
                    let aborted = e.to_string().contains("group aborted");
                    if first_err.is_none() || (!aborted && first_err.as_ref().is_some_and(|(a, _)| *a)) {
                        first_err = Some((aborted, e));
                    }
                }
            }
        }
        match first_err {
            Some((_, e)) => Err(e),
            None => Ok(out),
        }
    }
}

impl Executor for TpCpuExecutor {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn step(&mut self, input: &StepInput) -> Result<StepOutput> {
        let mut all = self.step_all_ranks(input)?;
        Ok(StepOutput { logits: all.swap_remove(0) })
    }
}
