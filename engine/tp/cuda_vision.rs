//! Tensor parallelism for Llama 3.2 Vision on CUDA: [`TpMllamaCudaExecutor`] runs `tp` ranks of the CUDA vision
//! decoder ([`MllamaCudaExecutor`] built rank by rank from the checkpoint), one host thread each, joined by
//! a [`DeviceComm`] (NCCL when every rank has its own GPU, [`super::cuda::HostStagedComm`] otherwise), as
//! [`super::cuda::TpCudaExecutor`] does for the text models.
//!
//! - The text decoder is sharded as on the CPU reference ([`super::vision::TpMllamaCpuExecutor`]): self- and
//!   cross-attention by heads, the MLP by its width, `lm_head` by the vocabulary, the `vocab + 8`-row embedding by
//!   rows when `tp` divides them (else replicated); each rank reads only its slices of the checkpoint, one layer at
//!   a time ([`super::load::MllamaRankSource`]). The collectives sit where the CPU reference has them (see
//!   `engine/vision/cuda/text/build.rs`).
//! - The vision encoder and the projector are not part of the executor: its contract takes encoded images. The
//!   command line runs them once per image on the first rank's GPU ([`crate::vision::pipeline::ImageEncoder`] with
//!   `use_cuda`), and [`Executor::add_images`] hands the projected states to every rank, which computes the
//!   cross-attention K/V of its own KV heads.
//! - Steps run eagerly (no CUDA graphs), as for the text ranks.
//! - Multi-node runs: [`TpMllamaCudaExecutor::join_node`] builds one node's ranks of a global NCCL group; node 0
//!   drives the other nodes through [`super::multinode`] (the images reach them inside `add_images`).

use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::cuda::{device_comms, node_comms, on_ranks_during, rank_err, DeviceComm, TpCommKind};
use super::load::MllamaRankSource;
use super::nccl::GroupSpec;
use super::plan::TpPlan;
use crate::config::LlamaConfig;
use crate::exec::cuda::sample::scores_on_device;
use crate::exec::scored::{host_step_scored, sample_every_row, MaskSource, ScoreRow};
use crate::exec::{Executor, SampleSeq, StepInput, StepOutput};
use crate::quant::AtLoad;
use crate::sampling::TokenLogprob;
use crate::vision::config::MllamaConfig;
use crate::vision::cuda::text::{MllamaCudaExecutor, MllamaCudaOptions};
use crate::vision::exec::SeqImages;
use crate::vision::pipeline::EncodedImages;
use crate::weights::Checkpoint;
use crate::{Error, Result};

/// One process's tensor-parallel ranks of a Llama 3.2 Vision text decoder on CUDA. Each rank holds only its shard
/// of the weights, of the self-attention KV cache and of every image set's cross-attention K/V (its KV heads) on
/// its device; a step runs all ranks at once and returns the full-vocabulary logits (bit-identical on every rank;
/// the first rank's are returned). Implements the same [`Executor`] contract as [`MllamaCudaExecutor`]. A step is
/// checked once before the ranks run it; a rank that fails inside a step aborts the group (releasing the ranks
/// waiting in a collective, for the in-process communicator), after which the executor refuses every step.
pub struct TpMllamaCudaExecutor {
    cfg: MllamaConfig,
    ranks: Vec<Rank>,
    devices: Vec<usize>,
    /// The group rank of each local rank (`0..tp` in one process; this node's ranks in a multi-node group).
    rank_ids: Vec<usize>,
}

/// A rank, movable to the host thread that runs it for one call.
struct Rank(MllamaCudaExecutor);

// SAFETY: `MllamaCudaExecutor` is not `Send` only because of the CUDA graphs it may hold (cudarc's `CudaGraph`
// wraps raw driver handles). A rank never captures one: a tensor-parallel rank runs every step eagerly
// (`graph_eligible` is false for it), so its graph map stays empty. Everything else it holds (device buffers,
// streams, the cuBLASLt handle, the communicator) is `Send`, and CUDA driver objects may be used from any host
// thread once their context is bound, which every rank thread does first. A rank is used by one thread at a time
// (the scoped threads of `on_all_ranks` each get a `&mut` to a different rank).
unsafe impl Send for Rank {}

impl TpMllamaCudaExecutor {
    /// Loads `tp` ranks of the text decoder of the checkpoint `ckpt` (model config `cfg`): rank `r` reads only its
    /// slices and runs on CUDA device `devices[r % devices.len()]` (`&[0]` puts every rank on device 0), joined by
    /// `kind`. `opts` sizes each rank as for [`MllamaCudaExecutor`] (its `device` and `max_graph_batch` are not
    /// used); with `gpu_memory_utilization`, the ranks of a device split what is left under it equally (all shards
    /// are uploaded first) and every rank gets the smallest share. Fails with the config field named when `tp`
    /// does not divide the text model, before any device is touched.
    pub fn new(
        cfg: MllamaConfig,
        ckpt: &Checkpoint,
        tp: usize,
        devices: &[usize],
        kind: TpCommKind,
        opts: &MllamaCudaOptions,
    ) -> Result<Self> {
        Self::new_quantized(cfg, ckpt, tp, (devices, kind), opts, AtLoad::NONE)
    }

    /// [`new`](Self::new) with the language model's projections quantized at load by `at_load` (W4A16: each rank
    /// quantizes its own slices and keeps only the int4 form; a quantized checkpoint is read quantized either way),
    /// and the vocabulary tables in int8 when `at_load` says so. `at_load` takes an `Option<Scheme>` too.
    pub fn new_quantized(
        cfg: MllamaConfig,
        ckpt: &Checkpoint,
        tp: usize,
        (devices, kind): (&[usize], TpCommKind),
        opts: &MllamaCudaOptions,
        at_load: impl Into<AtLoad>,
    ) -> Result<Self> {
        let at_load = at_load.into();
        if devices.is_empty() {
            return Err(Error::request("tensor parallelism on CUDA needs at least one device"));
        }
        let plan = TpPlan::new(&cfg.text.base, tp)?;
        // Fail before reading any shard when the device or the library is missing.
        crate::ops::cuda::probe()?;
        if kind == TpCommKind::Nccl {
            super::nccl::nccl_available()?;
        }
        let placement: Vec<usize> = (0..tp).map(|r| devices[r % devices.len()]).collect();
        let ranks = ((0..tp).collect(), placement);
        Self::build(cfg, (ckpt, at_load), &plan, ranks, opts, |streams| device_comms(kind, streams))
    }

    /// This node's ranks of a multi-node group described by `spec` (one process per node): global ranks
    /// `spec.rank .. spec.rank + devices.len()` of `spec.world`, rank `spec.rank + i` on CUDA device `devices[i]`
    /// (one rank per GPU: NCCL refuses two on one device), each reading only its slices of `ckpt` as in
    /// [`new`](Self::new); then all of them join the global NCCL group at once over the TCP rendezvous (global rank
    /// 0 serves the id at `spec.master_addr:spec.port`). Every node must make the same calls (see
    /// [`super::multinode`]); a step returns the first local rank's full logits, the same on every node. The KV
    /// pool is sized from this node's devices; node 0's [`MultiNodeExecutor`](super::multinode::MultiNodeExecutor)
    /// uses the smallest of all nodes.
    pub fn join_node(
        cfg: MllamaConfig,
        (ckpt, at_load): (&Checkpoint, impl Into<AtLoad>),
        devices: &[usize],
        spec: &GroupSpec,
        opts: &MllamaCudaOptions,
    ) -> Result<Self> {
        if devices.is_empty() {
            return Err(Error::request("tensor parallelism on CUDA needs at least one device"));
        }
        let plan = TpPlan::new(&cfg.text.base, spec.world)?;
        let rank_ids: Vec<usize> = (spec.rank..spec.rank + devices.len()).collect();
        for &r in &rank_ids {
            plan.rank(r)?;
        }
        super::nccl::nccl_available()?;
        Self::build(cfg, (ckpt, at_load.into()), &plan, (rank_ids, devices.to_vec()), opts, |streams| {
            node_comms(streams, spec)
        })
    }

    /// Uploads the shards of `rank_ids` (rank `rank_ids[i]` on device `placement[i]`), joins them with the
    /// communicators `comms` makes from their streams (element `i` for local rank `i`), then sizes every KV cache.
    fn build(
        cfg: MllamaConfig,
        (ckpt, at_load): (&Checkpoint, AtLoad),
        plan: &TpPlan,
        (rank_ids, placement): (Vec<usize>, Vec<usize>),
        opts: &MllamaCudaOptions,
        comms: impl FnOnce(Vec<Arc<CudaStream>>) -> Result<Vec<Box<dyn DeviceComm>>>,
    ) -> Result<Self> {
        let mut ranks = Vec::with_capacity(rank_ids.len());
        for (&r, &device) in rank_ids.iter().zip(&placement) {
            // One layer's slices at a time on the host (a 90B rank's whole shard is tens of GB in f32).
            let src = MllamaRankSource::new_with(&cfg, plan, r, ckpt, at_load, false)?;
            let o = MllamaCudaOptions { device, ..opts.clone() };
            let rank =
                MllamaCudaExecutor::upload_rank_source(&cfg, plan, r, &src, &o).map_err(|e| rank_err(r, device, e))?;
            ranks.push(Rank(rank));
        }
        // The communicators before the caches: NCCL's buffers then count as used when the caches are sized.
        let comms = comms(ranks.iter().map(|x| x.0.stream().clone()).collect())?;
        if comms.len() != ranks.len() {
            return Err(Error::Backend(format!("{} communicators for {} ranks", comms.len(), ranks.len())));
        }
        for (rank, comm) in ranks.iter_mut().zip(comms) {
            rank.0.set_comm(comm)?;
        }
        // Every rank gets the same number of blocks: the smallest (equal) share over the devices.
        let mut blocks = usize::MAX;
        for (i, rank) in ranks.iter().enumerate() {
            let share = placement.iter().filter(|&&d| d == placement[i]).count();
            blocks = blocks.min(rank.0.kv_blocks(share).map_err(|e| rank_err(rank_ids[i], placement[i], e))?);
        }
        for (i, rank) in ranks.iter_mut().enumerate() {
            rank.0.alloc_kv(blocks).map_err(|e| rank_err(rank_ids[i], placement[i], e))?;
        }
        Ok(TpMllamaCudaExecutor { cfg, ranks, devices: placement, rank_ids })
    }

    /// The number of ranks in this process.
    pub fn tp(&self) -> usize {
        self.ranks.len()
    }

    /// The group rank of each rank in this process (`0..tp` unless built by [`join_node`](Self::join_node)).
    pub fn local_ranks(&self) -> &[usize] {
        &self.rank_ids
    }

    /// The CUDA device of each rank in this process, in rank order.
    pub fn devices(&self) -> &[usize] {
        &self.devices
    }

    /// The full model's configuration.
    pub fn mllama_config(&self) -> &MllamaConfig {
        &self.cfg
    }

    /// The decoder of this process's `rank`-th rank (its config, embedding rows and registered image sets).
    pub fn rank(&self, rank: usize) -> Option<&MllamaCudaExecutor> {
        self.ranks.get(rank).map(|r| &r.0)
    }

    /// The communicator's name ("host-staged" or "nccl").
    pub fn comm_name(&self) -> &'static str {
        self.ranks.first().and_then(|r| r.0.device_comm()).map_or("none", |c| c.name())
    }

    /// Number of registered image sets.
    pub fn num_image_sets(&self) -> usize {
        self.ranks.first().map_or(0, |r| r.0.num_image_sets())
    }

    /// Runs one step on every rank and returns each rank's full-vocabulary logits, rank 0 first. `images` as in
    /// [`Executor::step_with_images`].
    pub fn step_all_ranks(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<Vec<Vec<f32>>> {
        self.check(input, images)?;
        self.on_all_ranks(true, |rank| rank.step_with_images(input, images).map(|o| o.logits))
    }

    /// Runs a step on every rank with the logits left on the devices (each rank waits for its work, so that a
    /// failure shows in this step), and returns the first local rank, its device bound to this thread, for picking
    /// from its full-vocabulary logits.
    fn step_on_device(
        &mut self,
        input: &StepInput,
        images: &[Option<SeqImages<'_>>],
        during: &mut dyn FnMut(),
    ) -> Result<&mut MllamaCudaExecutor> {
        self.check(input, images)?;
        let step = |rank: &mut MllamaCudaExecutor| {
            rank.step_on_device(input, images)?;
            rank.stream().synchronize().map_err(|e| Error::Backend(format!("synchronize: {e}")))
        };
        self.on_all_ranks_during(true, step, during)?;
        let first = &mut self.ranks.first_mut().ok_or_else(|| Error::Backend("no local rank".into()))?.0;
        first.stream().context().bind_to_thread().map_err(|e| Error::Backend(format!("bind device: {e}")))?;
        Ok(first)
    }

    /// Checks a step once before the ranks run it: a bad request fails here, without aborting the group (a rank
    /// that fails inside a step aborts it, which releases the others but leaves the group unusable).
    fn check(&self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<()> {
        match self.ranks.first() {
            Some(r) => r.0.check_step(input, images),
            None => Err(Error::Backend("tensor-parallel executor without ranks".into())),
        }
    }

    /// Runs `f` on every rank at once, one thread each bound to the rank's device. A rank that fails aborts the
    /// group (`collective`: its communicator releases the ranks waiting in a collective); the first rank's own error
    /// is returned rather than the "group aborted" it caused.
    fn on_all_ranks<T: Send>(
        &mut self,
        collective: bool,
        f: impl Fn(&mut MllamaCudaExecutor) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        self.on_all_ranks_during(collective, f, &mut || {})
    }

    /// [`on_all_ranks`](Self::on_all_ranks), running `during` on this thread while the ranks work.
    fn on_all_ranks_during<T: Send>(
        &mut self,
        collective: bool,
        f: impl Fn(&mut MllamaCudaExecutor) -> Result<T> + Sync,
        during: &mut dyn FnMut(),
    ) -> Result<Vec<T>> {
        let ids = &self.rank_ids;
        let run = |i: usize, cell: &mut Rank| {
            let (rank, r) = (&mut cell.0, ids[i]);
            rank.stream()
                .context()
                .bind_to_thread()
                .map_err(|e| Error::Backend(format!("tensor-parallel rank {r}: bind device: {e}")))?;
            f(rank)
        };
        let abort = |cell: &Rank, why: &str| {
            if let Some(c) = cell.0.device_comm().filter(|_| collective) {
                c.abort(why);
            }
        };
        on_ranks_during(&mut self.ranks, &run, &abort, during)
    }
}

impl Executor for TpMllamaCudaExecutor {
    fn config(&self) -> &LlamaConfig {
        &self.cfg.text.base
    }

    fn block_size(&self) -> usize {
        self.ranks.first().map_or(0, |r| r.0.block_size())
    }

    fn num_blocks(&self) -> usize {
        self.ranks.first().map_or(0, |r| r.0.num_blocks())
    }

    fn step(&mut self, input: &StepInput) -> Result<StepOutput> {
        self.step_with_images(input, &[])
    }

    fn max_logits_rows(&self) -> Option<usize> {
        self.ranks.iter().filter_map(|r| r.0.max_logits_rows()).min()
    }

    /// Every rank uploads the same projected states and computes the cross-attention K/V of its own KV heads (the
    /// ranks work at once); a set that fails on any rank is registered on none (and an earlier set with that key is
    /// gone).
    fn add_images(&mut self, key: u64, images: &EncodedImages) -> Result<()> {
        let res = self.on_all_ranks(false, |rank| rank.add_images(key, images));
        if res.is_err() {
            for rank in &mut self.ranks {
                rank.0.remove_images(key);
            }
        }
        res.map(|_| ())
    }

    /// Every rank's pool holds the same sets in the same places; a set fits when it fits on every rank.
    fn images_fit(&self, num_tiles: &[usize]) -> Result<bool> {
        let mut fit = true;
        for rank in &self.ranks {
            fit &= rank.0.images_fit(num_tiles)?;
        }
        Ok(fit)
    }

    fn remove_images(&mut self, key: u64) -> bool {
        let mut found = false;
        for rank in &mut self.ranks {
            found |= rank.0.remove_images(key);
        }
        found
    }

    /// Trims the set on every rank; a set that fails to trim on any rank is removed from all of them, so that the
    /// ranks never disagree on what a set holds.
    fn trim_images(&mut self, key: u64) -> Result<bool> {
        let mut found = false;
        for r in 0..self.ranks.len() {
            match self.ranks[r].0.trim_images(key) {
                Ok(f) => found |= f,
                Err(e) => {
                    self.remove_images(key);
                    return Err(e);
                }
            }
        }
        Ok(found)
    }

    fn step_greedy(&mut self, input: &StepInput) -> Result<Vec<u32>> {
        self.step_on_device(input, &[], &mut || {})?.pick_greedy(input.logits_rows.len())
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
        let total = input.logits_rows.len();
        if !scores_on_device(self.cfg.text.base.vocab_size, total, seqs.len(), sample_rows, scores)? {
            return host_step_scored(self, input, images, seqs, sample_rows, masks, scores);
        }
        // The masks are computed on this thread while the rank threads run the step.
        let mut computed = Vec::new();
        let first = self.step_on_device(input, images, &mut || computed = masks())?;
        first.pick_scored(total, seqs, sample_rows, &computed, scores)
    }

    fn step_with_images(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<StepOutput> {
        self.check(input, images)?;
        let first = self.rank_ids.first().copied();
        let mut all = self.on_all_ranks(true, |rank| {
            let out = rank.step_with_images(input, images)?;
            // Only the first local rank's logits are returned; the others are dropped here.
            let is_first = rank.tensor_parallel_rank().map(|(r, _)| r) == first;
            Ok(if is_first { out.logits } else { Vec::new() })
        })?;
        Ok(StepOutput { logits: std::mem::take(&mut all[0]) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_device_the_executor_is_an_error_not_a_panic() {
        if crate::ops::cuda::is_available() {
            return; // A machine with a GPU runs the real path in tests/gpu/cuda_tp_vision.rs.
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/mllama-resize");
        let cfg = MllamaConfig::from_model_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let opts = MllamaCudaOptions { kv_tokens: 64, ..MllamaCudaOptions::default() };
        for kind in [TpCommKind::InProcess, TpCommKind::Nccl] {
            let e = TpMllamaCudaExecutor::new(cfg.clone(), &ckpt, 2, &[0], kind, &opts).err();
            assert!(e.is_some_and(|e| !e.to_string().is_empty()));
        }
        let e = TpMllamaCudaExecutor::new(cfg.clone(), &ckpt, 2, &[], TpCommKind::InProcess, &opts).err();
        assert!(e.is_some_and(|e| e.to_string().contains("at least one device")));
        let e = TpMllamaCudaExecutor::new(cfg.clone(), &ckpt, 3, &[0], TpCommKind::InProcess, &opts).err();
        assert!(e.is_some_and(|e| e.to_string().contains("num_attention_heads")), "a bad tp is refused first");
        // A node's ranks of a multi-node group: refused without a device, before any rendezvous (no waiting).
        let spec = GroupSpec::unreachable;
        let t0 = std::time::Instant::now();
        let e = TpMllamaCudaExecutor::join_node(cfg.clone(), (&ckpt, None), &[0, 1], &spec(2, 4), &opts).err();
        assert!(e.is_some_and(|e| !e.to_string().is_empty()));
        let e = TpMllamaCudaExecutor::join_node(cfg.clone(), (&ckpt, None), &[0, 1], &spec(3, 4), &opts).err();
        assert!(e.is_some_and(|e| e.to_string().contains("rank 4 is outside")), "ranks past the world are refused");
        let e = TpMllamaCudaExecutor::join_node(cfg.clone(), (&ckpt, None), &[], &spec(0, 4), &opts).err();
        assert!(e.is_some_and(|e| e.to_string().contains("at least one device")));
        let e = TpMllamaCudaExecutor::join_node(cfg, (&ckpt, None), &[0], &spec(0, 3), &opts).err();
        assert!(e.is_some_and(|e| e.to_string().contains("num_attention_heads")));
        assert!(t0.elapsed() < std::time::Duration::from_secs(60));
    }
}
