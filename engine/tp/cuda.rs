//! Tensor parallelism on CUDA: `tp` ranks of the CUDA kernels ([`CudaOps`]), each holding its shard and running
//! [`model::forward`](crate::model::forward) on its own host thread and stream, joined by a device communicator.
//!
//! - [`DeviceComm`]: the collectives the [`Ops`] hooks need, on bf16 device buffers, ordered on
//!   the rank's stream. Two implementations: [`NcclComm`] (NCCL through cudarc: one rank per GPU, in one process or
//!   one process per GPU over the TCP rendezvous of [`super::nccl`]) and [`HostStagedComm`] (ranks that are threads
//!   of one process, on one or several devices: the buffers go through host memory and [`LocalComm`], which sums in
//!   rank order in f32, so every rank holds the same bits; simple and slow, for tests and for several ranks sharing
//!   one GPU, which NCCL refuses).
//! - [`TpCudaExecutor`]: the [`Executor`] over the ranks (all in this process, or one node's ranks of a
//!   multi-node group: [`TpCudaExecutor::join_node`], driven by [`super::multinode`]). The same communicators join the ranks of the Llama 3.2
//!   Vision decoder ([`super::cuda_vision::TpMllamaCudaExecutor`]).
//!
//! This first version runs every step eagerly: no CUDA graphs under tensor parallelism (the host-staged
//! collectives synchronize the stream, so they cannot be captured; NCCL's could, which is future work).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use half::bf16;

use super::comm::{Communicator, LocalComm};
use super::load::{check_quantized_plan, load_rank_weights_at, RankQuant};
use super::nccl::{GroupSpec, NcclComm};
use super::plan::TpPlan;
use crate::config::LlamaConfig;
use crate::exec::cuda::sample::{scores_on_device, DeviceSampler};
use crate::exec::cuda::{CudaExecutor, CudaOps, CudaOptions};
use crate::exec::scored::{host_step_scored, MaskSource, ScoreRow};
use crate::exec::{Executor, SampleSeq, StepInput, StepOutput};
use crate::model::{forward, Dims, Ops};
use crate::quant::{AtLoad, Scheme};
use crate::sampling::TokenLogprob;
use crate::vision::exec::SeqImages;
use crate::weights::WeightSource;
use crate::{Error, Result};

/// Collectives over a tensor-parallel group on bf16 device buffers. Every rank calls the same collectives in the
/// same order with the same lengths; each is ordered on `stream`, the caller's (the rank's) stream.
pub trait DeviceComm: Send {
    /// This rank, `0..world()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Replaces `buf` with the element-wise sum of every rank's `buf`.
    fn all_reduce_sum_bf16(&self, stream: &Arc<CudaStream>, buf: &mut CudaViewMut<'_, bf16>) -> Result<()>;
    /// Writes every rank's `send` into `recv` (`world() * send.len()` values), rank 0's first.
    fn all_gather_bf16(
        &self,
        stream: &Arc<CudaStream>,
        send: &CudaView<'_, bf16>,
        recv: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()>;
    /// Marks the group as failed so that the other ranks' collectives return errors instead of waiting for this
    /// rank. The default does nothing (NCCL has no such release: a failed rank stalls an NCCL group).
    fn abort(&self, why: &str) {
        let _ = why;
    }
    /// A short name for logs ("nccl", "host-staged").
    fn name(&self) -> &'static str;
}

fn drv(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("tensor-parallel {what}: {e}"))
}

/// The in-process device communicator: each collective copies the rank's buffer to the host, exchanges it through
/// a [`LocalComm`] (sums in rank order `0..N` in f32, then one rounding to bf16, so every rank holds the same bits)
/// and copies the result back. The copies synchronize the rank's stream.
pub struct HostStagedComm {
    local: LocalComm,
}

impl HostStagedComm {
    /// A group of `world` ranks; hand element `r` to rank `r`.
    pub fn group(world: usize) -> Result<Vec<HostStagedComm>> {
        Ok(LocalComm::group(world)?.into_iter().map(|local| HostStagedComm { local }).collect())
    }
}

fn download(stream: &Arc<CudaStream>, buf: &CudaView<'_, bf16>) -> Result<Vec<f32>> {
    let host = stream.clone_dtoh(buf).map_err(drv("download"))?;
    Ok(host.into_iter().map(f32::from).collect())
}

fn upload(stream: &Arc<CudaStream>, vals: &[f32], dst: &mut CudaViewMut<'_, bf16>) -> Result<()> {
    if dst.len() != vals.len() {
        return Err(Error::Backend(format!("tensor-parallel upload: {} values into {}", vals.len(), dst.len())));
    }
    let host: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x)).collect();
    stream.memcpy_htod(&host, dst).map_err(drv("upload"))?;
    stream.synchronize().map_err(drv("synchronize"))
}

impl DeviceComm for HostStagedComm {
    fn rank(&self) -> usize {
        self.local.rank()
    }

    fn world(&self) -> usize {
        self.local.world()
    }

    fn all_reduce_sum_bf16(&self, stream: &Arc<CudaStream>, buf: &mut CudaViewMut<'_, bf16>) -> Result<()> {
        if self.local.world() == 1 {
            return Ok(());
        }
        let mut vals = download(stream, &buf.as_view())?;
        self.local.all_reduce_sum_f32(&mut vals)?;
        upload(stream, &vals, buf)
    }

    fn all_gather_bf16(
        &self,
        stream: &Arc<CudaStream>,
        send: &CudaView<'_, bf16>,
        recv: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        let mine = download(stream, send)?;
        let mut all = vec![0.0f32; recv.len()];
        self.local.all_gather_f32(&mine, &mut all)?;
        upload(stream, &all, recv)
    }

    fn abort(&self, why: &str) {
        self.local.abort(why)
    }

    fn name(&self) -> &'static str {
        "host-staged"
    }
}

/// Which communicator joins the ranks of a [`TpCudaExecutor`] built in one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TpCommKind {
    /// [`HostStagedComm`]: works for any placement, including several ranks on one GPU.
    InProcess,
    /// [`NcclComm`]: one NCCL communicator per rank (NCCL takes one rank per GPU).
    Nccl,
}

/// How long NCCL may take to form an in-process group before the attempt is reported as hung.
const NCCL_INIT_TIMEOUT: Duration = Duration::from_secs(120);

/// One communicator per rank of an in-process group of `streams.len()` ranks (rank `r` on `streams[r]`), joined by
/// `kind`: element `r` is rank `r`'s. NCCL communicators are created on the ranks' streams.
pub(crate) fn device_comms(kind: TpCommKind, streams: Vec<Arc<CudaStream>>) -> Result<Vec<Box<dyn DeviceComm>>> {
    Ok(match kind {
        TpCommKind::InProcess => {
            HostStagedComm::group(streams.len())?.into_iter().map(|c| Box::new(c) as Box<dyn DeviceComm>).collect()
        }
        TpCommKind::Nccl => NcclComm::local_group(streams, NCCL_INIT_TIMEOUT)?
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn DeviceComm>)
            .collect(),
    })
}

/// One NCCL communicator per rank of this process's part of the group `spec` describes (global ranks
/// `spec.rank .. spec.rank + streams.len()`, rank `spec.rank + i` on `streams[i]`), joined over the TCP rendezvous
/// ([`NcclComm::join_ranks`]): element `i` is local rank `i`'s.
pub(crate) fn node_comms(streams: Vec<Arc<CudaStream>>, spec: &GroupSpec) -> Result<Vec<Box<dyn DeviceComm>>> {
    Ok(NcclComm::join_ranks(streams, spec)?.into_iter().map(|c| Box::new(c) as Box<dyn DeviceComm>).collect())
}

/// The per-rank results of one collective step, in rank order, or the first failing rank's own error: a rank
/// that failed aborts the group, so the others report "group aborted", which is only returned when no rank has a
/// more specific error.
/// Runs `f(i, rank)` on every rank at once, one scoped host thread each, and `during` on the calling thread
/// meanwhile (a step's token masks; a no-op elsewhere). A rank whose `f` fails or panics calls `abort(rank, error)`
/// (so that ranks waiting for it in a collective are released); the first rank's own error is returned rather than
/// the "group aborted" it caused on the others.
pub(crate) fn on_ranks_during<R: Send, T: Send>(
    ranks: &mut [R],
    f: &(dyn Fn(usize, &mut R) -> Result<T> + Sync),
    abort: &(dyn Fn(&R, &str) + Sync),
    during: &mut dyn FnMut(),
) -> Result<Vec<T>> {
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter_mut()
            .enumerate()
            .map(|(i, rank)| {
                s.spawn(move || {
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i, &mut *rank)));
                    let err = match run {
                        Ok(Ok(v)) => return Ok(v),
                        Ok(Err(e)) => e,
                        Err(_) => Error::Backend(format!("tensor-parallel rank {i} (local) panicked")),
                    };
                    abort(rank, &err.to_string());
                    Err(err)
                })
            })
            .collect();
        during();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Backend("a tensor-parallel rank thread died".into()))))
            .collect()
    });
    rank_results(results)
}

fn rank_results<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    let mut first_err: Option<(bool, Error)> = None;
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(v) => out.push(v),
            Err(e) => {
                let aborted = e.to_string().contains("group aborted");
                if first_err.as_ref().is_none_or(|(a, _)| *a && !aborted) {
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

/// One process's tensor-parallel ranks on CUDA. Each rank holds only its shard of the weights and of the KV cache
/// (its KV heads) on its device; a step runs all local ranks at once, one host thread each, and returns rank 0's
/// (the first local rank's) full-vocabulary logits. Steps run eagerly (no CUDA graphs).
pub struct TpCudaExecutor {
    cfg: LlamaConfig,
    rank_cfg: LlamaConfig,
    /// The ranks this process runs, in rank order, each with its communicator set.
    ranks: Vec<CudaOps>,
    /// Their rank numbers in the group.
    rank_ids: Vec<usize>,
    tp: usize,
    num_blocks: usize,
    block_size: usize,
    /// Logits rows a step may ask for within each rank's memory plan.
    planned_logits_rows: usize,
    /// Picks ids from the first local rank's logits on its device (greedy, sampled and scored steps).
    sampler: DeviceSampler,
}

impl TpCudaExecutor {
    /// Loads `tp` ranks in this process: rank `r` reads only its slices from `src` and runs on CUDA device
    /// `devices[r % devices.len()]` (`&[0]` puts every rank on device 0), joined by `kind`. `opts` sizes each rank
    /// as for [`CudaExecutor`] (its `device` and `max_graph_batch` are not used); without `kv_tokens`, the ranks of a
    /// device split what is left under `gpu_memory_utilization` equally, and every rank gets the smallest share. A
    /// quantized checkpoint is detected from its config.json (see [`new_quantized`](Self::new_quantized)).
    pub fn new(
        cfg: LlamaConfig,
        src: WeightSource<'_>,
        tp: usize,
        devices: &[usize],
        kind: TpCommKind,
        opts: &CudaOptions,
    ) -> Result<Self> {
        Self::new_quantized(cfg, src, tp, AtLoad::NONE, devices, kind, opts)
    }

    /// [`new`](Self::new) with the projections quantized with `at_load.scheme` at load time (an `Option<Scheme>`
    /// converts), or, for a quantized checkpoint (no scheme), read from its int4 tensors and sliced ([`RankQuant`]);
    /// `at_load.tables_int8` quantizes each rank's vocabulary rows to int8 (`--embeddings int8`). Each rank uploads its
    /// int4 projections in the 4-bit kernels' layout (its host copy keeps no dense f32 form). The quantization is
    /// checked before any device is touched ([`check_quantized_plan`]: W4A8 at `tp > 1` and a row-parallel K
    /// share that is not a multiple of the group are refused); the kernels also need each rank's K to be a multiple
    /// of 64.
    pub fn new_quantized(
        cfg: LlamaConfig,
        src: WeightSource<'_>,
        tp: usize,
        at_load: impl Into<AtLoad>,
        devices: &[usize],
        kind: TpCommKind,
        opts: &CudaOptions,
    ) -> Result<Self> {
        if devices.is_empty() {
            return Err(Error::request("tensor parallelism on CUDA needs at least one device"));
        }
        let at_load = at_load.into();
        let plan = TpPlan::new(&cfg, tp)?;
        let quant = resolve_quant(&plan, &src, at_load.scheme)?;
        // Fail before reading any shard when the device or the library is missing.
        crate::ops::cuda::probe()?;
        if kind == TpCommKind::Nccl {
            super::nccl::nccl_available()?;
        }
        let placement: Vec<usize> = (0..tp).map(|r| devices[r % devices.len()]).collect();
        let ranks =
            Self::load_ranks(&plan, (0..tp).collect(), &placement, src, (quant.as_ref(), at_load.tables_int8), opts)?;
        let comms = device_comms(kind, ranks.iter().map(|o| o.stream().clone()).collect())?;
        Self::finish(cfg, &plan, ranks, (0..tp).collect(), comms, opts)
    }

    /// This process's one rank of a multi-process (and possibly multi-node) NCCL group described by `spec`, on CUDA
    /// device `device`: rank `spec.rank` of `spec.world` loads its shard, then the TCP rendezvous hands rank 0's
    /// NCCL id to every rank. Every process must make the same steps; each returns the full logits.
    pub fn join(
        cfg: LlamaConfig,
        src: WeightSource<'_>,
        device: usize,
        spec: &GroupSpec,
        opts: &CudaOptions,
    ) -> Result<Self> {
        Self::join_node(cfg, src, &[device], spec, AtLoad::NONE, opts)
    }

    /// This node's ranks of a multi-node NCCL group described by `spec` (one process per node): global ranks
    /// `spec.rank .. spec.rank + devices.len()` of `spec.world`, rank `spec.rank + i` on CUDA device `devices[i]`
    /// (one rank per GPU: NCCL refuses two on one device). Each rank loads only its slices (as in
    /// [`new`](Self::new)), then all of them join the global group at once over the TCP rendezvous (global rank 0
    /// serves NCCL's id at `spec.master_addr:spec.port`). Every node must make the same steps (see
    /// [`super::multinode`]); a step returns the first local rank's full logits, the same on every node. Without
    /// `kv_tokens` the KV pool is sized from this node's free memory; node 0's
    /// [`MultiNodeExecutor`](super::multinode::MultiNodeExecutor) uses the smallest pool of all nodes. `at_load`
    /// (and a quantized checkpoint) as in [`new_quantized`](Self::new_quantized).
    pub fn join_node(
        cfg: LlamaConfig,
        src: WeightSource<'_>,
        devices: &[usize],
        spec: &GroupSpec,
        at_load: impl Into<AtLoad>,
        opts: &CudaOptions,
    ) -> Result<Self> {
        let at_load = at_load.into();
        if devices.is_empty() {
            return Err(Error::request("tensor parallelism on CUDA needs at least one device"));
        }
        let plan = TpPlan::new(&cfg, spec.world)?;
        let rank_ids: Vec<usize> = (spec.rank..spec.rank + devices.len()).collect();
        for &r in &rank_ids {
            plan.rank(r)?;
        }
        let quant = resolve_quant(&plan, &src, at_load.scheme)?;
        super::nccl::nccl_available()?;
        let ranks =
            Self::load_ranks(&plan, rank_ids.clone(), devices, src, (quant.as_ref(), at_load.tables_int8), opts)?;
        let comms = node_comms(ranks.iter().map(|o| o.stream().clone()).collect(), spec)?;
        Self::finish(cfg, &plan, ranks, rank_ids, comms, opts)
    }

    /// Uploads the shards of `rank_ids` (rank `rank_ids[i]` on device `placement[i]`), then sizes every cache.
    fn load_ranks(
        plan: &TpPlan,
        rank_ids: Vec<usize>,
        placement: &[usize],
        src: WeightSource<'_>,
        quant: (Option<&RankQuant>, bool),
        opts: &CudaOptions,
    ) -> Result<Vec<CudaOps>> {
        let rank_cfg = plan.rank_config();
        let mut uploaded = Vec::with_capacity(rank_ids.len());
        for (&r, &device) in rank_ids.iter().zip(placement) {
            // Quantized projections go up in int4 only: no dense f32 copy on the host.
            let w = load_rank_weights_at(plan, r, src, quant, false)?;
            let o = CudaOptions { device, ..opts.clone() };
            let up = CudaExecutor::upload_weights(&rank_cfg, &w, &o).map_err(|e| rank_err(r, device, e))?;
            uploaded.push(up);
        }
        let mut opts = opts.clone();
        if opts.kv_tokens.is_none() {
            // Every rank gets the same number of blocks: the smallest equal share over the devices.
            let mut blocks = usize::MAX;
            for (i, up) in uploaded.iter().enumerate() {
                let share = placement.iter().filter(|&&d| d == placement[i]).count();
                blocks = blocks.min(CudaExecutor::fit_blocks(&rank_cfg, &opts, up, share)?);
            }
            if blocks == 0 {
                return Err(Error::request(format!(
                    "no room for a KV cache: the shards of {} ranks fill the devices under --gpu-memory-utilization {}",
                    rank_ids.len(),
                    opts.gpu_memory_utilization
                )));
            }
            opts.kv_tokens = Some(blocks * opts.block_size);
        }
        let mut ranks = Vec::with_capacity(uploaded.len());
        for ((up, &r), &device) in uploaded.into_iter().zip(&rank_ids).zip(placement) {
            let o = CudaOptions { device, ..opts.clone() };
            ranks.push(CudaExecutor::rank_ops(rank_cfg.clone(), &o, up).map_err(|e| rank_err(r, device, e))?);
        }
        Ok(ranks)
    }

    fn finish(
        cfg: LlamaConfig,
        plan: &TpPlan,
        mut ranks: Vec<CudaOps>,
        rank_ids: Vec<usize>,
        comms: Vec<Box<dyn DeviceComm>>,
        opts: &CudaOptions,
    ) -> Result<Self> {
        let block_size = opts.block_size;
        if comms.len() != ranks.len() {
            return Err(Error::Backend(format!("{} communicators for {} ranks", comms.len(), ranks.len())));
        }
        let num_blocks = ranks.iter().map(CudaOps::num_blocks).min().unwrap_or(0);
        if ranks.iter().any(|o| o.num_blocks() != num_blocks) {
            return Err(Error::Backend("tensor-parallel ranks were given different KV pools".into()));
        }
        for ((ops, comm), &r) in ranks.iter_mut().zip(comms).zip(&rank_ids) {
            if comm.rank() != r || comm.world() != plan.tp() {
                return Err(Error::Backend(format!(
                    "communicator is rank {} of {}, expected rank {r} of {}",
                    comm.rank(),
                    comm.world(),
                    plan.tp()
                )));
            }
            let vocab: Range<usize> = plan.rank(r)?.vocab;
            ops.set_tensor_parallel(comm, vocab);
        }
        let rank_cfg = plan.rank_config();
        let planned_logits_rows = crate::exec::cuda::planned_logits_rows(opts);
        let first = ranks.first().ok_or_else(|| Error::Backend("a tensor-parallel executor needs a rank".into()))?;
        first.stream().context().bind_to_thread().map_err(drv("bind device"))?;
        let sampler = DeviceSampler::new(first.stream())?;
        Ok(TpCudaExecutor {
            cfg,
            rank_cfg,
            ranks,
            rank_ids,
            tp: plan.tp(),
            num_blocks,
            block_size,
            planned_logits_rows,
            sampler,
        })
    }

    /// The size of the group.
    pub fn tp(&self) -> usize {
        self.tp
    }

    /// The group ranks this process runs.
    pub fn local_ranks(&self) -> &[usize] {
        &self.rank_ids
    }

    /// The config each rank's kernels run with.
    pub fn rank_config(&self) -> &LlamaConfig {
        &self.rank_cfg
    }

    /// The communicator's name ("host-staged" or "nccl").
    pub fn comm_name(&self) -> &'static str {
        self.ranks.first().and_then(CudaOps::device_comm).map_or("none", |c| c.name())
    }

    /// Runs one step on every local rank and returns each local rank's full-vocabulary logits (as f32 from bf16),
    /// in rank order.
    pub fn step_all_ranks(&mut self, input: &StepInput) -> Result<Vec<Vec<f32>>> {
        Ok(self.run(input, Read::All)?.into_iter().map(|(l, _)| l.unwrap_or_default()).collect())
    }

    /// Runs the step on all local ranks at once; reads back the logits of every rank, of the first, or of none
    /// (every rank waits for its work). Returns each rank's logits (when read) and its logits' pool slot.
    fn run(&mut self, input: &StepInput, read: Read) -> Result<Vec<(Option<Vec<f32>>, usize)>> {
        self.run_during(input, read, &mut || {})
    }

    /// [`run`](Self::run), running `during` on this thread while the ranks work.
    fn run_during(
        &mut self,
        input: &StepInput,
        read: Read,
        during: &mut dyn FnMut(),
    ) -> Result<Vec<(Option<Vec<f32>>, usize)>> {
        input.validate(&self.cfg, self.num_blocks, self.block_size)?;
        let dims = Dims::of(&self.rank_cfg);
        let n = input.logits_rows.len() * self.cfg.vocab_size;
        let wants = |i: usize| match read {
            Read::All => true,
            Read::First => i == 0,
            Read::None => false,
        };
        let f = |i: usize, ops: &mut CudaOps| rank_step(ops, dims, input, wants(i).then_some(n));
        let abort = |ops: &CudaOps, why: &str| {
            if let Some(c) = ops.device_comm() {
                c.abort(why);
            }
        };
        on_ranks_during(&mut self.ranks, &f, &abort, during)
    }

    /// Runs the step with the logits left on the devices (`during` runs on this thread meanwhile), and binds the
    /// first local rank's device to this thread for picking from them. Returns that rank's logits slot.
    fn run_on_device(&mut self, input: &StepInput, during: &mut dyn FnMut()) -> Result<usize> {
        let slot = self.run_during(input, Read::None, during)?.first().map(|r| r.1);
        let first = self.ranks.first().ok_or_else(|| Error::Backend("no local rank".into()))?;
        first.stream().context().bind_to_thread().map_err(drv("bind device"))?;
        slot.ok_or_else(|| Error::Backend("no local rank".into()))
    }
}

/// Which ranks' logits a step reads back to the host.
#[derive(Clone, Copy)]
enum Read {
    All,
    First,
    None,
}

/// The quantization of a text model's ranks ([`RankQuant::resolve`]), checked against `plan`.
fn resolve_quant(plan: &TpPlan, src: &WeightSource<'_>, quantize: Option<Scheme>) -> Result<Option<RankQuant>> {
    let quant = RankQuant::resolve(src, quantize)?;
    if let Some(q) = &quant {
        check_quantized_plan(plan, q.scheme())?;
    }
    Ok(quant)
}

pub(crate) fn rank_err(rank: usize, device: usize, e: Error) -> Error {
    Error::Backend(format!("tensor-parallel rank {rank} on cuda:{device}: {e}"))
}

/// One rank's step: the recipe over the rank's shard, then (when `read` is the logits length) the logits to the host.
/// Returns them and the pool slot the logits stay in until the next step.
fn rank_step(
    ops: &mut CudaOps,
    dims: Dims,
    input: &StepInput,
    read: Option<usize>,
) -> Result<(Option<Vec<f32>>, usize)> {
    ops.stream().context().bind_to_thread().map_err(drv("bind device"))?;
    let logits = forward(ops, dims, input)?;
    let slot = logits.slot();
    let host = match read {
        Some(n) if logits.view().len() < n => {
            Err(Error::Backend(format!("rank logits hold {} values, expected {n}", logits.view().len())))
        }
        Some(0) => Ok(Some(Vec::new())),
        Some(n) => ops
            .stream()
            .clone_dtoh(&logits.view().slice(..n))
            .map(|v| Some(v.into_iter().map(f32::from).collect()))
            .map_err(drv("read logits")),
        // Wait for the rank's work, so that a failure shows in this step.
        None => ops.stream().synchronize().map(|()| None).map_err(drv("synchronize")),
    };
    ops.release(logits);
    host.map(|h| (h, slot))
}

impl Executor for TpCudaExecutor {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn max_logits_rows(&self) -> Option<usize> {
        Some(self.planned_logits_rows)
    }

    fn step(&mut self, input: &StepInput) -> Result<StepOutput> {
        let first = self.run(input, Read::First)?.into_iter().next().and_then(|r| r.0).unwrap_or_default();
        Ok(StepOutput { logits: first })
    }

    fn step_greedy(&mut self, input: &StepInput) -> Result<Vec<u32>> {
        let slot = self.run_on_device(input, &mut || {})?;
        let (rows, vocab) = (input.logits_rows.len(), self.cfg.vocab_size);
        let ops = &self.ranks[0];
        let buf = ops.pooled(slot).ok_or_else(|| Error::Backend("logits buffer missing".into()))?;
        // The logits stay on the device: one id per row comes back.
        self.sampler.greedy(ops.stream(), buf, rows, vocab)
    }

    fn step_sample(&mut self, input: &StepInput, seqs: &mut [SampleSeq<'_>]) -> Result<Vec<u32>> {
        let (rows, vocab) = (input.logits_rows.len(), self.cfg.vocab_size);
        if seqs.len() != rows {
            return Err(Error::request(format!("step_sample: {} sequences for {rows} logits rows", seqs.len())));
        }
        if vocab > crate::ops::cuda::sampling::MAX_SAMPLE_VOCAB {
            let out = self.step(input)?;
            return Ok(seqs.iter_mut().zip(out.logits.chunks(vocab)).map(|(r, l)| r.sampler.sample(l)).collect());
        }
        let slot = self.run_on_device(input, &mut || {})?;
        let ops = &self.ranks[0];
        let buf = ops.pooled(slot).ok_or_else(|| Error::Backend("logits buffer missing".into()))?;
        let rows: Vec<usize> = (0..rows).collect();
        self.sampler.sample(ops.stream(), buf, vocab, &rows, seqs)
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
        let (total, vocab) = (input.logits_rows.len(), self.cfg.vocab_size);
        if images.iter().any(Option::is_some) || !scores_on_device(vocab, total, seqs.len(), sample_rows, scores)? {
            return host_step_scored(self, input, images, seqs, sample_rows, masks, scores);
        }
        // The masks are computed on this thread while the rank threads run the step.
        let mut computed = Vec::new();
        let slot = self.run_on_device(input, &mut || computed = masks())?;
        let masks = &computed;
        let ops = &mut self.ranks[0];
        let stream = ops.stream().clone();
        let buf = ops.pooled_mut(slot).ok_or_else(|| Error::Backend("logits buffer missing".into()))?;
        self.sampler.scored(&stream, buf, total, vocab, seqs, sample_rows, masks, scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_ranks_are_checked_before_any_device() {
        let mut cfg = crate::config::Preset::Llama32_1B.config();
        (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) = (512, 128, 256, 2);
        (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) = (4, 2, 32);
        let opts = CudaOptions { kv_tokens: Some(64), ..CudaOptions::default() };
        let new = |cfg: &LlamaConfig, tp, scheme| {
            let kind = TpCommKind::InProcess;
            TpCudaExecutor::new_quantized(cfg.clone(), WeightSource::Random(0), tp, Some(scheme), &[0], kind, &opts)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let e = new(&cfg, 2, Scheme::W4A8_G32);
        assert!(e.contains("w4a8-g32") && e.contains("tp = 2"), "{e}");
        cfg.intermediate_size = 192; // 48 columns of down_proj per rank at tp = 4
        let e = new(&cfg, 4, Scheme::W4A16_G32);
        assert!(e.contains("mlp.down_proj") && e.contains("tp = 4") && e.contains("group 32"), "{e}");
        let spec = GroupSpec::unreachable(0, 2);
        cfg.intermediate_size = 256;
        let e = TpCudaExecutor::join_node(cfg, WeightSource::Random(0), &[0], &spec, Some(Scheme::W4A8_G32), &opts)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("w4a8-g32"), "{e}");
    }

    #[test]
    fn without_a_device_the_executor_is_an_error_not_a_panic() {
        if crate::ops::cuda::is_available() {
            return; // A machine with a GPU runs the real path in tests/gpu/cuda_tp.rs.
        }
        let mut cfg = crate::config::Preset::Llama32_1B.config();
        (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) = (512, 128, 256, 2);
        (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) = (4, 2, 32);
        let opts = CudaOptions { kv_tokens: Some(64), ..CudaOptions::default() };
        for kind in [TpCommKind::InProcess, TpCommKind::Nccl] {
            let e = TpCudaExecutor::new(cfg.clone(), WeightSource::Random(0), 2, &[0], kind, &opts).err();
            assert!(e.is_some_and(|e| !e.to_string().is_empty()));
        }
        let e = TpCudaExecutor::new(cfg.clone(), WeightSource::Random(0), 2, &[], TpCommKind::InProcess, &opts).err();
        assert!(e.is_some_and(|e| e.to_string().contains("at least one device")));
        let e = TpCudaExecutor::new(cfg.clone(), WeightSource::Random(0), 3, &[0], TpCommKind::InProcess, &opts).err();
        assert!(e.is_some_and(|e| e.to_string().contains("not divisible")), "a bad tp is refused before any upload");
        // A node's ranks of a multi-node group: refused without a device, before any rendezvous (no waiting).
        let spec = GroupSpec::unreachable;
        let t0 = std::time::Instant::now();
        let e =
            TpCudaExecutor::join_node(cfg.clone(), WeightSource::Random(0), &[0, 1], &spec(2, 4), None, &opts).err();
        assert!(e.is_some_and(|e| !e.to_string().is_empty()));
        let e =
            TpCudaExecutor::join_node(cfg.clone(), WeightSource::Random(0), &[0, 1], &spec(3, 4), None, &opts).err();
        assert!(e.is_some_and(|e| e.to_string().contains("rank 4 is outside")), "ranks past the world are refused");
        let e = TpCudaExecutor::join_node(cfg.clone(), WeightSource::Random(0), &[], &spec(0, 4), None, &opts).err();
        assert!(e.is_some_and(|e| e.to_string().contains("at least one device")));
        let e = TpCudaExecutor::join(cfg, WeightSource::Random(0), 0, &spec(1, 3), &opts).err();
        assert!(e.is_some_and(|e| e.to_string().contains("not divisible")));
        assert!(t0.elapsed() < Duration::from_secs(60));
    }
}
