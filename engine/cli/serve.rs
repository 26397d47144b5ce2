//! `llama32 serve` and `llama32 batch`: the engine thread behind the OpenAI server or an offline batch file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::{load, load_tokenizer, ModelArgs};
use crate::serve::batch::{run_batch, BatchOptions};
use crate::serve::engine::{EngineConfig, EngineHandle};
use crate::serve::http::{run_blocking, serve, ServerOptions};
use crate::serve::loadgen::{run_load, LoadOptions};
use crate::serve::{api::ServeContext, context_for};
use crate::{Error, Result};

/// Engine limits shared by `serve` and `batch`.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Most sequences running at once.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Most new tokens per engine step (prefill chunks are cut to fit).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Most sequences waiting for admission before new requests are refused (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_waiting: usize,
    /// Name clients use in `model` (default: the model directory's name, or the preset's).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Longest sequence (prompt + output) served (default: the context length, capped to the KV cache).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Tensor-parallel ranks (1 = none). On --device cpu the ranks are threads of this process, each holding its
    /// shard of the weights and KV cache; on `--device cuda[:K]` (text and Llama 3.2 Vision models) rank r runs on
    /// GPU K + r, or on --devices.
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel: usize,
    /// CUDA devices of the ranks when --tensor-parallel N > 1 on CUDA, e.g. 0,1 or cuda:2,cuda:3 (rank r runs on
    /// entry r mod the count, so `--devices 0` puts every rank on GPU 0). Default: cuda:K..K+N-1 for --device cuda:K.
    #[arg(long)]
    pub devices: Option<String>,
    /// Nodes of a multi-node run (1: this machine alone). With M > 1, --tensor-parallel N is the total over all
    /// nodes: each node runs N / M ranks on its own GPUs (`--device cuda[:K]` / --devices, one rank per GPU), all
    /// joined in one NCCL group; node 0 serves (or runs the batch) and drives the others.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's number in a multi-node run, 0..M-1. Node 0 runs the server or the batch; node K > 0 only runs
    /// its ranks as node 0 tells it (it ignores --input/--output and the server's address flags).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Node 0's host name or address, as every node (node 0 included) reaches it; required with --nnodes > 1.
    #[arg(long)]
    pub master_addr: Option<String>,
    /// Port on node 0 for NCCL's id rendezvous; node 0's control connection to the other nodes uses the next one.
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
    /// Seconds a multi-node run waits for the other nodes (the NCCL rendezvous, then the control connection).
    #[arg(long, default_value_t = 600)]
    pub node_timeout: u64,
    /// Llama 3.2 Vision on CUDA: image tiles whose cross-attention K/V the decoder keeps at once, all requests
    /// together. An image takes max_num_tiles (4) until its prompt has run, then only its real tiles; requests
    /// whose images do not fit wait for room.
    #[arg(long, default_value_t = 64)]
    pub cross_attention_tiles: usize,
}

/// A multi-node run (`--nnodes M > 1`) as the command line describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MultiNode {
    /// `--tensor-parallel N`: the ranks over all nodes.
    pub tp: usize,
    /// `--nnodes M`.
    pub nnodes: usize,
    /// `--node-rank K`.
    pub node_rank: usize,
    /// `--master-addr`.
    pub master_addr: String,
    /// `--master-port P`: NCCL's id rendezvous; the control connection is on P + 1.
    pub master_port: u16,
    /// `--node-timeout`.
    pub timeout: Duration,
}

impl MultiNode {
    /// Ranks on each node (N / M).
    pub fn local_ranks(&self) -> usize {
        self.tp / self.nnodes
    }

    /// This node's global ranks: `K * N/M .. (K + 1) * N/M`.
    pub fn ranks(&self) -> std::ops::Range<usize> {
        let n = self.local_ranks();
        self.node_rank * n..(self.node_rank + 1) * n
    }

    /// Where this node's ranks join the NCCL group (`spec.rank`: the first of them).
    pub fn group_spec(&self) -> crate::tp::nccl::GroupSpec {
        crate::tp::nccl::GroupSpec {
            rank: self.ranks().start,
            world: self.tp,
            master_addr: self.master_addr.clone(),
            port: self.master_port,
            timeout: self.timeout,
        }
    }

    /// Node 0's control port (P + 1).
    pub fn control_port(&self) -> u16 {
        self.master_port.saturating_add(1)
    }

    /// Node 0's control address as the followers reach it (`master_addr:P+1`).
    pub fn control_addr(&self) -> String {
        crate::tp::nccl::host_port(&self.master_addr, self.control_port())
    }

    /// Node 0's side: listens for the followers' control connections (on every interface unless --master-addr is
    /// a loopback address, see [`crate::tp::nccl::listen_addr`]).
    fn listen(&self) -> Result<std::net::TcpListener> {
        let addr = crate::tp::nccl::listen_addr(&self.master_addr, self.control_port());
        std::net::TcpListener::bind(&addr).map_err(|e| {
            Error::Backend(format!(
                "--master-port {}: node 0 cannot listen on {addr} for the control connection (port P + 1): {e}",
                self.master_port
            ))
        })
    }

    /// "ranks a..b of N on node K of M", for logs.
    fn describe(&self) -> String {
        let r = self.ranks();
        format!("ranks {}..{} of {} on node {} of {}", r.start, r.end, self.tp, self.node_rank, self.nnodes)
    }
}

/// Checks the multi-node flags of `serve`/`batch`/`bench-serve` (after [`check_tensor_parallel`]) before anything
/// loads, each error naming its flag: None for a one-node run (`--nnodes 1`, where `--node-rank` must be 0 and
/// `--master-addr`/`--master-port` are not used). With `--nnodes M > 1`: `--device cuda[:K]`, `--tensor-parallel N`
/// divisible by M, `--node-rank` below M, `--master-addr` given, `--master-port` below 65535 (P + 1 must exist), a
/// positive `--node-timeout`, no `--quantize`, and `--devices` (when given) naming N / M distinct GPUs, since every
/// rank joins one NCCL group, which takes one rank per GPU.
pub(crate) fn check_multi_node(a: &ModelArgs, e: &EngineArgs) -> Result<Option<MultiNode>> {
    let (m, k, tp) = (e.nnodes, e.node_rank, e.tensor_parallel);
    if m == 0 {
        return Err(Error::request("--nnodes must be at least 1"));
    }
    if k >= m {
        return Err(Error::request(format!(
            "--node-rank {k} must be less than --nnodes {m} (nodes are numbered 0..{})",
            m - 1
        )));
    }
    if m == 1 {
        return Ok(None);
    }
    if load::Device::parse(&a.device)? == load::Device::Cpu {
        return Err(Error::request(format!(
            "--nnodes {m} joins CUDA ranks over NCCL across the nodes: it needs --device cuda or cuda:K, not --device {}",
            a.device
        )));
    }
    if tp % m != 0 {
        return Err(Error::request(format!(
            "--tensor-parallel {tp} is the number of ranks over all nodes and must be divisible by --nnodes {m} (each \
             node runs N / M ranks)"
        )));
    }
    let master_addr = match e.master_addr.as_deref().map(str::trim) {
        Some(h) if !h.is_empty() => h.to_string(),
        _ => {
            return Err(Error::request(format!(
                "--nnodes {m} needs --master-addr HOST: node 0's host name or address, as every node reaches it"
            )))
        }
    };
    if e.master_port == 0 || e.master_port == u16::MAX {
        return Err(Error::request(format!(
            "--master-port {}: must be in 1..65534 (NCCL's rendezvous uses P, node 0's control connection P + 1)",
            e.master_port
        )));
    }
    if e.node_timeout == 0 {
        return Err(Error::request("--node-timeout must be at least 1 second"));
    }
    if a.quantize.is_some() {
        return Err(Error::request("--tensor-parallel > 1 does not support quantized models yet"));
    }
    let node = MultiNode {
        tp,
        nnodes: m,
        node_rank: k,
        master_addr,
        master_port: e.master_port,
        timeout: Duration::from_secs(e.node_timeout),
    };
    if let Some(list) = e.devices.as_deref() {
        let listed = super::parse_devices(list)?;
        let placement: Vec<usize> = (0..node.local_ranks()).map(|r| listed[r % listed.len()]).collect();
        distinct_gpus(&placement, &node)?;
    }
    Ok(Some(node))
}

/// A multi-node run's ranks join one NCCL group, which takes one rank per GPU.
fn distinct_gpus(placement: &[usize], node: &MultiNode) -> Result<()> {
    if let Some((i, d)) = placement.iter().enumerate().find(|&(i, d)| placement[..i].contains(d)) {
        let first = placement.iter().position(|x| x == d).unwrap_or(0);
        return Err(Error::request(format!(
            "--devices: node {} runs {} ranks of one NCCL group, which takes one GPU per rank, but its local ranks {first} \
             and {i} would share cuda:{d}; list {} distinct GPUs",
            node.node_rank,
            placement.len(),
            placement.len()
        )));
    }
    Ok(())
}

/// Checks `--tensor-parallel N`, `--device` and `--devices` of `logits`/`serve`/`batch` before anything loads: N
/// must be at least 1; any N runs on the CPU (in-process ranks) and on CUDA (text models: see
/// [`tp_cuda_executor`]; vision models: [`check_vision_tensor_parallel`] and
/// [`crate::tp::cuda_vision::TpMllamaCudaExecutor`]); `--devices` must parse and needs N > 1 on CUDA.
pub(crate) fn check_tensor_parallel(tp: usize, device: &str, devices: Option<&str>) -> Result<()> {
    if tp == 0 {
        return Err(Error::request("--tensor-parallel must be at least 1"));
    }
    let dev = load::Device::parse(device)?;
    if let Some(list) = devices {
        if dev == load::Device::Cpu {
            return Err(Error::request(format!(
                "--devices {list}: lists CUDA devices for the ranks of --tensor-parallel N on --device cuda; on \
                 --device cpu the ranks are threads of this process (leave --devices out)"
            )));
        }
        if tp == 1 {
            return Err(Error::request(format!(
                "--devices {list}: places the ranks of --tensor-parallel N > 1; for one GPU use --device cuda:K"
            )));
        }
        super::parse_devices(list)?;
    }
    Ok(())
}

/// Checks `--tensor-parallel N` for a Llama 3.2 Vision checkpoint before anything loads, besides
/// [`check_tensor_parallel`]: any N runs on `--device cpu` (in-process CPU ranks) and on `--device cuda[:K]` (CUDA
/// ranks, [`crate::tp::cuda_vision::TpMllamaCudaExecutor`]); N > 1 refuses `--quantize`, as for text models.
pub(crate) fn check_vision_tensor_parallel(tp: usize, quantize: Option<&str>) -> Result<()> {
    if tp > 1 && quantize.is_some() {
        return Err(Error::request("--tensor-parallel > 1 does not support quantized models yet"));
    }
    Ok(())
}

/// Refuses tensor parallelism for a quantized model (`--quantize`, or a checkpoint written quantized).
fn refuse_quantized(a: &ModelArgs, source: &load::Source) -> Result<()> {
    let quantized = match source {
        load::Source::Dir(dir) => load::checkpoint_quantization(dir)?.is_some(),
        load::Source::Preset(_) => false,
    };
    if a.quantize.is_some() || quantized {
        return Err(Error::request("--tensor-parallel > 1 does not support quantized models yet"));
    }
    Ok(())
}

/// The text model of `a` as `tp` tensor-parallel CPU ranks ([`crate::tp::TpCpuExecutor`]) with KV pools of
/// `kv_tokens` tokens: each rank reads only its slices of the checkpoint (or of the seeded random weights).
pub(crate) fn tp_cpu_executor(a: &ModelArgs, tp: usize, kv_tokens: usize) -> Result<crate::tp::TpCpuExecutor> {
    let (cfg, source) = load::resolve_config(a)?;
    refuse_quantized(a, &source)?;
    if a.block_size == 0 {
        return Err(Error::request("--block-size must be positive"));
    }
    let ckpt;
    let src = match (&source, a.random_weights) {
        (load::Source::Dir(dir), false) => {
            ckpt = crate::weights::Checkpoint::open(dir)?;
            crate::weights::WeightSource::Checkpoint(&ckpt)
        }
        _ => crate::weights::WeightSource::Random(a.weights_seed),
    };
    crate::tp::TpCpuExecutor::with_capacity(cfg, src, tp, kv_tokens, a.block_size)
}

/// How [`tp_cuda_executor`] places and sizes its CUDA ranks.
pub(crate) struct CudaRanks<'a> {
    /// `--devices` as given (None: `--device cuda:K`'s GPU and the ones after it).
    pub devices: Option<&'a str>,
    /// The communicator: `auto` (NCCL when every rank has its own GPU, host-staged otherwise), `nccl` or
    /// `host-staged` (`bench --tp-comm`).
    pub comm: &'a str,
    /// Without `--devices`, when fewer GPUs than ranks are visible from K on: put every rank on cuda:K (`bench`)
    /// instead of failing.
    pub share_when_short: bool,
    /// KV tokens per rank (None: the ranks of a GPU split its free memory under `--gpu-memory-utilization`).
    pub kv_tokens: Option<usize>,
    /// Tokens the run needs in the KV cache at least.
    pub min_tokens: usize,
}

/// A text model loaded as tensor-parallel CUDA ranks.
pub(crate) struct TpCudaModel {
    /// The executor over the ranks.
    pub exec: crate::tp::cuda::TpCudaExecutor,
    /// The GPUs the ranks run on, each once, in rank order.
    pub gpus: Vec<usize>,
    /// The devices and communicator, in words.
    pub device_name: String,
    /// The model source, in words.
    pub source_desc: String,
    /// Seconds spent loading.
    pub load_secs: f64,
}

/// The communicator `--tp-comm` (or `auto`) names for `placement` (the GPU of each rank).
pub(crate) fn tp_comm_kind(comm: &str, placement: &[usize]) -> Result<crate::tp::cuda::TpCommKind> {
    use crate::tp::cuda::TpCommKind;
    let distinct = placement.iter().enumerate().all(|(i, d)| !placement[..i].contains(d));
    match comm {
        "nccl" => Ok(TpCommKind::Nccl),
        "host-staged" => Ok(TpCommKind::InProcess),
        "auto" if distinct => Ok(TpCommKind::Nccl),
        "auto" => Ok(TpCommKind::InProcess),
        other => Err(Error::request(format!("--tp-comm: expected auto, nccl or host-staged, got `{other}`"))),
    }
}

/// The GPU of each of `tp` ranks: `listed` (`--devices`, parsed) round-robin, else `first..first + tp` (`--device
/// cuda:K`); `count` GPUs are visible. Without `--devices`, too few GPUs is an error unless `share_when_short`
/// (then every rank runs on `first`).
pub(crate) fn rank_devices(
    tp: usize,
    first: usize,
    listed: Option<&[usize]>,
    count: usize,
    share_when_short: bool,
) -> Result<Vec<usize>> {
    if let Some(list) = listed {
        if list.is_empty() {
            return Err(Error::request("--devices: no devices given"));
        }
        if let Some(&bad) = list.iter().find(|&&d| d >= count) {
            return Err(Error::request(format!(
                "--devices: cuda:{bad} does not exist ({count} CUDA device{} visible)",
                if count == 1 { " is" } else { "s are" }
            )));
        }
        return Ok((0..tp).map(|r| list[r % list.len()]).collect());
    }
    if first >= count {
        return Err(Error::request(format!("--device cuda:{first}: no such CUDA device ({count} visible)")));
    }
    if first + tp <= count {
        return Ok((first..first + tp).collect());
    }
    if share_when_short {
        return Ok(vec![first; tp]);
    }
    Err(Error::request(format!(
        "--tensor-parallel {tp} on --device cuda:{first} needs one GPU per rank (cuda:{first}..cuda:{}) but {count} \
         CUDA device{} visible; pass --devices to place the ranks yourself (ranks wrap around the list: \
         --devices {first} puts all {tp} ranks on cuda:{first}, sharing it through host-staged collectives)",
        first + tp - 1,
        if count == 1 { " is" } else { "s are" }
    )))
}

/// The GPU of each of `tp` ranks for `--device cuda[:K]` and `--devices` (see [`rank_devices`]), once CUDA is known
/// to be usable: without a usable device the error reads `--device D: no usable CUDA device for --tensor-parallel
/// N: ...`. `--devices` is parsed before any device is touched.
pub(crate) fn cuda_rank_placement(
    device: &str,
    tp: usize,
    devices: Option<&str>,
    share_when_short: bool,
) -> Result<Vec<usize>> {
    let first = match load::Device::parse(device)? {
        load::Device::Cuda(k) => k,
        load::Device::Cpu => return Err(Error::request("tensor-parallel CUDA ranks need --device cuda or cuda:K")),
    };
    let listed = devices.map(super::parse_devices).transpose()?;
    let count = usable_cuda_devices(device, &format!("--tensor-parallel {tp}"))?;
    rank_devices(tp, first, listed.as_deref(), count, share_when_short)
}

/// The number of visible CUDA devices, once CUDA is known to be usable: otherwise the error reads `--device D: no
/// usable CUDA device for WHAT: ...`.
fn usable_cuda_devices(device: &str, what: &str) -> Result<usize> {
    crate::ops::cuda::probe().map_err(|e| match e {
        Error::Backend(m) => Error::Backend(format!("--device {device}: no usable CUDA device for {what}: {m}")),
        other => other,
    })?;
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| Error::Backend(format!("counting CUDA devices: {e}")))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// The GPU of each of this node's ranks in a multi-node run, once CUDA is known to be usable: `--devices` (wrapping
/// around as for one node) or `--device cuda:K`'s GPU and the ones after it; every rank needs a GPU of its own.
/// Without a usable device the error reads `--device D: no usable CUDA device for --tensor-parallel N over
/// --nnodes M: ...`.
pub(crate) fn node_rank_placement(device: &str, devices: Option<&str>, node: &MultiNode) -> Result<Vec<usize>> {
    let first = match load::Device::parse(device)? {
        load::Device::Cuda(k) => k,
        load::Device::Cpu => return Err(Error::request("multi-node runs need --device cuda or cuda:K")),
    };
    let listed = devices.map(super::parse_devices).transpose()?;
    let local = node.local_ranks();
    let what = format!("--tensor-parallel {} over --nnodes {}", node.tp, node.nnodes);
    let count = usable_cuda_devices(device, &what)?;
    if listed.is_none() && first + local > count {
        return Err(Error::request(format!(
            "{what} runs {local} ranks on each node, one GPU each (cuda:{first}..cuda:{}), but {count} CUDA device{} \
             visible on node {}; pass --device cuda:K or --devices to pick this node's GPUs",
            first + local - 1,
            if count == 1 { " is" } else { "s are" },
            node.node_rank
        )));
    }
    let placement = rank_devices(local, first, listed.as_deref(), count, false)?;
    distinct_gpus(&placement, node)?;
    Ok(placement)
}

/// The text model of `a` as `tp` tensor-parallel CUDA ranks ([`crate::tp::cuda::TpCudaExecutor`]) placed and sized
/// by `r`: each rank reads only its slices of the checkpoint (or of the seeded random weights). The one place that
/// turns the command line into CUDA ranks of a text model (`logits`, `serve`, `batch`, `bench-serve` and `bench`;
/// Llama 3.2 Vision's ranks are placed by the same [`cuda_rank_placement`] and [`tp_comm_kind`]). Quantized models
/// and tensor-parallel degrees that do not divide the model are refused before any device is touched; without a
/// usable CUDA device the error says so.
pub(crate) fn tp_cuda_executor(a: &ModelArgs, tp: usize, r: &CudaRanks<'_>) -> Result<TpCudaModel> {
    tp_cuda_model(a, tp, r, None)
}

/// [`tp_cuda_executor`] for this node's ranks of a multi-node run (`node.tp` ranks over all nodes), placed on
/// `placement` ([`node_rank_placement`]) and joined to the global NCCL group
/// ([`crate::tp::cuda::TpCudaExecutor::join_node`]); `r.devices` and `r.comm` are not used.
pub(crate) fn tp_cuda_node_executor(
    a: &ModelArgs,
    node: &MultiNode,
    placement: &[usize],
    r: &CudaRanks<'_>,
) -> Result<TpCudaModel> {
    tp_cuda_model(a, node.tp, r, Some((node, placement)))
}

/// The one place that builds CUDA ranks of a text model: all `tp` ranks in this process (`node` None), or this
/// node's ranks of a multi-node group on the given GPUs.
fn tp_cuda_model(
    a: &ModelArgs,
    tp: usize,
    r: &CudaRanks<'_>,
    node: Option<(&MultiNode, &[usize])>,
) -> Result<TpCudaModel> {
    if load::Device::parse(&a.device)? == load::Device::Cpu {
        return Err(Error::request("tensor-parallel CUDA ranks need --device cuda or cuda:K"));
    }
    if a.block_size == 0 {
        return Err(Error::request("--block-size must be positive"));
    }
    let (cfg, source) = load::resolve_config(a)?;
    refuse_quantized(a, &source)?;
    crate::tp::TpPlan::new(&cfg, tp)?;
    let (placement, kind) = match node {
        Some((_, placement)) => (placement.to_vec(), crate::tp::cuda::TpCommKind::Nccl),
        None => {
            // Checks the --tp-comm spelling before touching a device (the placement only picks auto's choice).
            tp_comm_kind(r.comm, &[])?;
            let placement = cuda_rank_placement(&a.device, tp, r.devices, r.share_when_short)?;
            let kind = tp_comm_kind(r.comm, &placement)?;
            (placement, kind)
        }
    };
    let mut desc = source.describe();
    if a.random_weights {
        desc.push_str(" with random weights");
    }
    let t0 = std::time::Instant::now();
    let opts = crate::exec::cuda::CudaOptions {
        device: placement[0],
        block_size: a.block_size,
        kv_tokens: r.kv_tokens,
        gpu_memory_utilization: a.gpu_memory_utilization,
        max_step_tokens: 2048,
        max_graph_batch: a.cuda_graph_max_batch,
        skinny_gemm: !a.no_skinny_gemm,
    };
    let ckpt;
    let src = match (&source, a.random_weights) {
        (load::Source::Dir(dir), false) => {
            ckpt = crate::weights::Checkpoint::open(dir)?;
            crate::weights::check_checkpoint(&ckpt, &cfg)?;
            crate::weights::WeightSource::Checkpoint(&ckpt)
        }
        _ => crate::weights::WeightSource::Random(a.weights_seed),
    };
    let exec = match node {
        Some((n, _)) => crate::tp::cuda::TpCudaExecutor::join_node(cfg, src, &placement, &n.group_spec(), &opts)?,
        None => crate::tp::cuda::TpCudaExecutor::new(cfg, src, tp, &placement, kind, &opts)?,
    };
    use crate::exec::Executor as _;
    let capacity = exec.num_blocks() * exec.block_size();
    if capacity < r.min_tokens {
        return Err(Error::request(format!(
            "the KV cache of each tensor-parallel rank holds {capacity} tokens but this run needs {}",
            r.min_tokens
        )));
    }
    let mut gpus: Vec<usize> = Vec::new();
    for &d in &placement {
        if !gpus.contains(&d) {
            gpus.push(d);
        }
    }
    let names: Vec<String> = gpus.iter().map(|d| format!("cuda:{d}")).collect();
    let ranks = match node {
        Some((n, _)) => n.describe(),
        None => format!("{tp} ranks"),
    };
    Ok(TpCudaModel {
        device_name: format!("{} ({ranks}, {})", names.join(","), exec.comm_name()),
        exec,
        gpus,
        source_desc: desc,
        load_secs: t0.elapsed().as_secs_f64(),
    })
}

/// `llama32 serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// Seconds the running requests get to finish after Ctrl-C / SIGTERM.
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout: f64,
}

/// `llama32 batch`.
#[derive(Debug, Args)]
pub struct BatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// OpenAI batch input file (JSON lines with custom_id, method, url, body). Required, except on the follower
    /// nodes of a multi-node run (--node-rank > 0), which ignore it.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Results file (JSON lines with custom_id, response, error), in input order; an existing one is resumed.
    /// Required, except on follower nodes (ignored there).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Requests submitted to the engine and not yet finished.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// KV cache tokens on the CPU backend when `--kv-tokens` is not given (the CUDA backend sizes it from free memory).
const CPU_DEFAULT_KV_TOKENS: usize = 16384;

/// Node 0's part of a multi-node run: the run, this node's GPUs, and where the followers connect.
struct Lead {
    node: MultiNode,
    placement: Vec<usize>,
    listener: std::net::TcpListener,
}

/// How this process takes part in a `serve`/`batch`/`bench-serve` run.
enum Role {
    /// A one-node run.
    Alone,
    /// Node 0 of a multi-node run.
    Lead(Lead),
    /// Node K > 0 of a multi-node run.
    Follow(MultiNode),
}

/// Checks the tensor-parallel and multi-node flags before anything loads and says what this process is. For a
/// multi-node run the degree is checked against the model (and quantized models refused) first; then node 0
/// places its ranks (failing here without a usable CUDA device) and listens for the followers.
fn node_role(a: &ModelArgs, e: &EngineArgs) -> Result<Role> {
    check_tensor_parallel(e.tensor_parallel, &a.device, e.devices.as_deref())?;
    let Some(node) = check_multi_node(a, e)? else {
        return Ok(Role::Alone);
    };
    if let Some(dir) = super::vision::vision_dir(a, false)? {
        check_vision_tensor_parallel(node.tp, a.quantize.as_deref())?;
        let cfg = crate::vision::config::MllamaConfig::from_model_dir(&dir)?;
        crate::tp::TpPlan::new(&cfg.text.base, node.tp)?;
    } else {
        let (cfg, source) = load::resolve_config(a)?;
        refuse_quantized(a, &source)?;
        crate::tp::TpPlan::new(&cfg, node.tp)?;
    }
    if node.node_rank > 0 {
        return Ok(Role::Follow(node));
    }
    let placement = node_rank_placement(&a.device, e.devices.as_deref(), &node)?;
    let listener = node.listen()?;
    Ok(Role::Lead(Lead { node, placement, listener }))
}

/// Node 0: waits (up to `--node-timeout`) for the followers' control connections, then drives them beside `exec`,
/// its own ranks ([`crate::tp::multinode::MultiNodeExecutor`]).
fn lead_nodes<E: crate::exec::Executor + 'static>(exec: E, lead: &Lead) -> Result<Box<dyn crate::exec::Executor>> {
    use crate::exec::Executor as _;
    let n = &lead.node;
    eprintln!(
        "node 0 of {}: waiting for nodes 1..{} on the control port {} (up to {} s)",
        n.nnodes,
        n.nnodes - 1,
        n.control_port(),
        n.timeout.as_secs()
    );
    let multi = crate::tp::multinode::MultiNodeExecutor::lead(exec, &lead.listener, n.nnodes, n.timeout)?;
    eprintln!(
        "node 0 of {}: every node joined; {} tensor-parallel ranks over {} nodes, KV cache {} blocks of {} tokens \
         per rank (the smallest of all nodes)",
        n.nnodes,
        n.tp,
        n.nnodes,
        multi.num_blocks(),
        multi.block_size()
    );
    Ok(Box::new(multi))
}

/// Node K > 0 of a multi-node run: loads this node's ranks (joining the global NCCL group), then runs every call
/// node 0 sends until node 0 ends the session ([`crate::tp::multinode::follow`]). No server, no batch file.
fn follow_node(a: &ModelArgs, e: &EngineArgs, node: &MultiNode) -> Result<()> {
    let (k, m) = (node.node_rank, node.nnodes);
    let placement = node_rank_placement(&a.device, e.devices.as_deref(), node)?;
    let control = node.control_addr();
    let t0 = std::time::Instant::now();
    let run = if let Some(dir) = super::vision::vision_dir(a, false)? {
        let cfg = crate::vision::config::MllamaConfig::from_model_dir(&dir)?;
        let opts = vision_cuda_options(a, e, placement[0]);
        let ckpt = crate::weights::Checkpoint::open(&dir)?;
        let mut exec =
            crate::tp::cuda_vision::TpMllamaCudaExecutor::join_node(cfg, &ckpt, &placement, &node.group_spec(), &opts)?;
        use crate::exec::Executor as _;
        eprintln!(
            "loaded the Llama 3.2 Vision text decoder of {} as {} on {:?} in {:.1} s: KV cache {} blocks of {} tokens \
             per rank",
            dir.display(),
            node.describe(),
            placement,
            t0.elapsed().as_secs_f64(),
            exec.num_blocks(),
            exec.block_size()
        );
        eprintln!("node {k} of {m}: following node 0 at {control}");
        crate::tp::multinode::follow(&mut exec, &control, k, m, node.timeout)
    } else {
        let ranks =
            CudaRanks { devices: None, comm: "auto", share_when_short: false, kv_tokens: a.kv_tokens, min_tokens: 1 };
        let mut model = tp_cuda_node_executor(a, node, &placement, &ranks)?;
        use crate::exec::Executor as _;
        eprintln!(
            "loaded {} on {} in {:.1} s: KV cache {} blocks of {} tokens per rank",
            model.source_desc,
            model.device_name,
            model.load_secs,
            model.exec.num_blocks(),
            model.exec.block_size()
        );
        eprintln!("node {k} of {m}: following node 0 at {control}");
        crate::tp::multinode::follow(&mut model.exec, &control, k, m, node.timeout)
    };
    run.map_err(|err| match err {
        Error::Backend(msg) => Error::Backend(format!("node {k} of {m}: {msg}")),
        other => other,
    })?;
    eprintln!("node {k} of {m}: node 0 ended the session");
    Ok(())
}

/// Starts the engine thread for `a` (the model is loaded there) and builds the handlers' context; `lead`: this is
/// node 0 of a multi-node run ([`node_role`]).
fn start_engine(a: &ModelArgs, e: &EngineArgs, lead: Option<Lead>) -> Result<(EngineHandle, ServeContext)> {
    check_tensor_parallel(e.tensor_parallel, &a.device, e.devices.as_deref())?;
    if let Some(dir) = super::vision::vision_dir(a, false)? {
        check_vision_tensor_parallel(e.tensor_parallel, a.quantize.as_deref())?;
        return start_vision_engine(a, e, &dir, lead);
    }
    let (_, source) = load::resolve_config(a)?;
    let tok = load_tokenizer(a)?.map(Arc::new);
    if tok.is_none() {
        eprintln!("warning: no tokenizer found; only token-id prompts and token-id output will work");
    }
    let name = e.served_model_name.clone().unwrap_or_else(|| match (&a.model, &source) {
        (Some(dir), _) => dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()),
        (None, load::Source::Preset(p)) => format!("llama-3.2-{}", p.name()),
        (None, load::Source::Dir(d)) => d.display().to_string(),
    });
    let margs = a.clone();
    let tp = e.tensor_parallel;
    let devices = e.devices.clone();
    let make = move || -> Result<Box<dyn crate::exec::Executor>> {
        use crate::exec::Executor as _;
        if tp > 1 && load::Device::parse(&margs.device)? != load::Device::Cpu {
            let ranks = CudaRanks {
                devices: devices.as_deref(),
                comm: "auto",
                share_when_short: false,
                kv_tokens: margs.kv_tokens,
                min_tokens: 1,
            };
            if let Some(lead) = &lead {
                let m = tp_cuda_node_executor(&margs, &lead.node, &lead.placement, &ranks)?;
                eprintln!(
                    "loaded {} on {} in {:.1} s: KV cache {} blocks of {} tokens per rank",
                    m.source_desc,
                    m.device_name,
                    m.load_secs,
                    m.exec.num_blocks(),
                    m.exec.block_size()
                );
                return lead_nodes(m.exec, lead);
            }
            let m = tp_cuda_executor(&margs, tp, &ranks)?;
            eprintln!(
                "loaded {} as {tp} tensor-parallel CUDA ranks on {} in {:.1} s: KV cache {} blocks of {} tokens per rank",
                m.source_desc,
                m.device_name,
                m.load_secs,
                m.exec.num_blocks(),
                m.exec.block_size()
            );
            return Ok(Box::new(m.exec));
        }
        if tp > 1 {
            let t0 = std::time::Instant::now();
            let kv_tokens = margs.kv_tokens.unwrap_or(CPU_DEFAULT_KV_TOKENS);
            let exec = tp_cpu_executor(&margs, tp, kv_tokens)?;
            eprintln!(
                "loaded {} as {tp} tensor-parallel CPU ranks in {:.1} s: KV cache {} blocks of {} tokens per rank",
                load::resolve_config(&margs)?.1.describe(),
                t0.elapsed().as_secs_f64(),
                exec.num_blocks(),
                exec.block_size()
            );
            return Ok(Box::new(exec));
        }
        let min_tokens = if margs.device == "cpu" { margs.kv_tokens.unwrap_or(CPU_DEFAULT_KV_TOKENS) } else { 1 };
        let m = load::load_model(&margs, min_tokens)?;
        eprintln!(
            "loaded {} on {} in {:.1} s: KV cache {} blocks of {} tokens",
            m.source_desc,
            m.device_name,
            m.load_secs,
            m.exec.num_blocks(),
            m.exec.block_size()
        );
        Ok(m.exec)
    };
    let cfg = EngineConfig {
        max_step_tokens: e.max_num_batched_tokens,
        max_seqs: e.max_num_seqs,
        max_waiting: e.max_waiting,
        max_model_len: e.max_model_len,
    };
    let engine = EngineHandle::start(make, tok.clone(), cfg)?;
    let ctx = context_for(a.model.as_deref(), tok, engine.info().clone(), name)?;
    Ok((engine, ctx))
}

/// Runs `llama32 serve` until Ctrl-C / SIGTERM.
pub fn cmd_serve(a: ServeArgs) -> Result<()> {
    if !(a.shutdown_timeout.is_finite() && a.shutdown_timeout >= 0.0) {
        return Err(Error::request("--shutdown-timeout must be a number of seconds >= 0"));
    }
    let lead = match node_role(&a.model, &a.engine)? {
        Role::Follow(node) => return follow_node(&a.model, &a.engine, &node),
        Role::Lead(lead) => Some(lead),
        Role::Alone => None,
    };
    let (engine, ctx) = start_engine(&a.model, &a.engine, lead)?;
    eprintln!("serving model `{}` (max_model_len {} tokens)", ctx.model_name, ctx.info.max_model_len);
    let opts = ServerOptions {
        host: a.host,
        port: a.port,
        max_body_bytes: a.max_body_bytes,
        shutdown_timeout: Duration::from_secs_f64(a.shutdown_timeout),
    };
    run_blocking(engine, ctx, opts)
}

/// Runs `llama32 batch` and prints its summary as JSON.
pub fn cmd_batch(a: BatchArgs) -> Result<()> {
    // A follower node (--node-rank > 0; `node_role` checks the rest) runs node 0's steps: it needs (and reads) no
    // batch file.
    let files = if a.engine.node_rank == 0 {
        if a.max_in_flight == 0 {
            return Err(Error::request("--max-in-flight must be at least 1"));
        }
        let note = "(only the follower nodes of a multi-node run, --node-rank > 0, run without it)";
        let input = a.input.ok_or_else(|| Error::request(format!("--input FILE is required {note}")))?;
        let output = a.output.ok_or_else(|| Error::request(format!("--output FILE is required {note}")))?;
        if !input.is_file() {
            return Err(Error::request(format!("--input {}: no such file", input.display())));
        }
        Some((input, output))
    } else {
        None
    };
    let lead = match node_role(&a.model, &a.engine)? {
        Role::Follow(node) => return follow_node(&a.model, &a.engine, &node),
        Role::Lead(lead) => Some(lead),
        Role::Alone => None,
    };
    let (input, output) = files.ok_or_else(|| Error::Backend("batch: no input on node 0".into()))?;
    let (engine, ctx) = start_engine(&a.model, &a.engine, lead)?;
    let opts = BatchOptions { input, output, max_in_flight: a.max_in_flight, progress: !a.no_progress };
    let summary = run_batch(&engine, &ctx, &opts);
    engine.shutdown(None);
    engine.join();
    let summary = summary?;
    println!("{}", serde_json::to_string(&summary).unwrap_or_default());
    Ok(())
}

/// `llama32 bench-serve`.
#[derive(Debug, Args)]
pub struct BenchServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// A running server (`HOST:PORT`); without it, the model is served in-process on a free loopback port.
    #[arg(long)]
    url: Option<String>,
    /// Comma-separated numbers of concurrent streaming clients, one load level each.
    #[arg(long, default_value = "1,16,64,256")]
    clients: String,
    /// Requests each client sends one after another, per level.
    #[arg(long, default_value_t = 4)]
    requests_per_client: usize,
    /// Prompt tokens per request (random ids).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
}

/// Runs `llama32 bench-serve`: one JSON line per load level with TTFT, ITL and throughput.
pub fn cmd_bench_serve(a: BenchServeArgs) -> Result<()> {
    if a.url.is_some() && a.engine.nnodes > 1 {
        return Err(Error::request("--url measures a running server: leave out --nnodes (start the nodes with serve)"));
    }
    let lead = match node_role(&a.model, &a.engine)? {
        Role::Follow(node) => return follow_node(&a.model, &a.engine, &node),
        Role::Lead(lead) => Some(lead),
        Role::Alone => None,
    };
    let levels = super::parse_ids(&a.clients, "--clients")?;
    if levels.contains(&0) || a.requests_per_client == 0 || a.prompt_tokens == 0 || a.max_tokens == 0 {
        return Err(Error::request(
            "--clients, --requests-per-client, --prompt-tokens and --max-tokens must be positive",
        ));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Backend(format!("tokio runtime: {e}")))?;
    let mut base = LoadOptions {
        addr: "127.0.0.1:0".parse().map_err(|_| Error::Backend("address".into()))?,
        clients: 1,
        requests_per_client: a.requests_per_client,
        prompt_tokens: a.prompt_tokens,
        max_tokens: a.max_tokens,
        vocab: 128000,
        model: String::new(),
    };
    let report = |r: &crate::serve::loadgen::LoadResult, base: &LoadOptions| {
        let mut v = serde_json::to_value(r).unwrap_or_default();
        v["prompt_tokens"] = base.prompt_tokens.into();
        v["max_tokens"] = base.max_tokens.into();
        v["requests_per_client"] = base.requests_per_client.into();
        println!("{v}");
    };
    if let Some(url) = &a.url {
        let hostport = url.trim_start_matches("http://").trim_end_matches('/');
        base.addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
            .ok()
            .and_then(|mut it| it.next())
            .ok_or_else(|| Error::request(format!("--url: cannot resolve `{url}` (expected HOST:PORT)")))?;
        base.model = a.engine.served_model_name.clone().unwrap_or_default();
        if base.model.is_empty() {
            return Err(Error::request("--url needs --served-model-name (the `model` to send)"));
        }
        for &c in &levels {
            let r = rt.block_on(run_load(&LoadOptions { clients: c as usize, ..base.clone() }));
            report(&r, &base);
        }
        return Ok(());
    }
    let (engine, ctx) = start_engine(&a.model, &a.engine, lead)?;
    base.vocab = ctx.info.config.vocab_size.min(128000) as u32;
    base.model = ctx.model_name.clone();
    let need = a.prompt_tokens + a.max_tokens;
    if need > ctx.info.max_model_len {
        return Err(Error::request(format!(
            "--prompt-tokens + --max-tokens ({need}) exceed max_model_len {}",
            ctx.info.max_model_len
        )));
    }
    let ctx = Arc::new(ctx);
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Backend(format!("bind 127.0.0.1:0: {e}")))?;
        base.addr = listener.local_addr().map_err(|e| Error::Backend(format!("local address: {e}")))?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let opts =
            ServerOptions { port: base.addr.port(), shutdown_timeout: Duration::from_secs(5), ..Default::default() };
        let server = tokio::spawn(serve(listener, engine.clone(), ctx.clone(), opts, async move {
            let _ = stop_rx.await;
        }));
        // Warm-up: one short request (first-call costs stay out of the figures).
        let warm = LoadOptions { clients: 1, requests_per_client: 1, max_tokens: 4, ..base.clone() };
        let w = run_load(&warm).await;
        if w.ok != 1 {
            eprintln!("warm-up failed: {:?}", w.first_error);
        }
        for &c in &levels {
            let r = run_load(&LoadOptions { clients: c as usize, ..base.clone() }).await;
            report(&r, &base);
        }
        let _ = stop_tx.send(());
        match server.await {
            Ok(r) => r,
            Err(e) => Err(Error::Backend(format!("server task: {e}"))),
        }
    })
}

/// [`start_engine`] for a Llama 3.2 Vision checkpoint: the text decoder runs in the engine's batched executor (CPU
/// reference, CPU tensor-parallel ranks, CUDA, or CUDA tensor-parallel ranks), the image encoder in the request
/// handlers (on the CUDA device too with `--device cuda`, on the first rank's GPU with tensor parallelism, else the
/// CPU reference). On CUDA without `--kv-tokens`, the self-attention KV cache gets what the device memory holds
/// under `--gpu-memory-utilization` (ranks sharing a GPU split it). With `lead` (node 0 of a multi-node run) the
/// text decoder is this node's ranks of the global group, driving the other nodes' ranks; the image encoder runs
/// on node 0 only, and the encoded images travel to the other nodes with the executor calls.
fn start_vision_engine(
    a: &ModelArgs,
    e: &EngineArgs,
    dir: &std::path::Path,
    lead: Option<Lead>,
) -> Result<(EngineHandle, ServeContext)> {
    let tok = load_tokenizer(a)?.map(Arc::new);
    let tp = e.tensor_parallel;
    let device = load::Device::parse(&a.device)?;
    // CUDA ranks: the degree and the placement are checked before anything loads (a multi-node run's in
    // `node_role`).
    let cuda_tp = match (device, &lead) {
        (load::Device::Cuda(_), Some(lead)) => Some((lead.placement.clone(), crate::tp::cuda::TpCommKind::Nccl)),
        (load::Device::Cuda(_), None) if tp > 1 => {
            let cfg = crate::vision::config::MllamaConfig::from_model_dir(dir)?;
            crate::tp::TpPlan::new(&cfg.text.base, tp)?;
            let placement = cuda_rank_placement(&a.device, tp, e.devices.as_deref(), false)?;
            let kind = tp_comm_kind("auto", &placement)?;
            Some((placement, kind))
        }
        _ => None,
    };
    let t0 = std::time::Instant::now();
    // With tensor parallelism the ranks read their own slices of the checkpoint, so only the vision half is
    // converted here.
    // The CPU reference converts the whole model (its projections quantized by --quantize); the CUDA decoder reads
    // the checkpoint one layer at a time in the engine thread (`cli::vision::cuda_text_decoder`).
    let (mut encoder, text) = if tp == 1 && cuda_tp.is_none() && device == load::Device::Cpu {
        let quantize = a.quantize.as_deref().map(crate::quant::Scheme::parse).transpose()?;
        let (encoder, text) = crate::vision::pipeline::MllamaModel::load_with(dir, quantize)?.split();
        (encoder, Some(text))
    } else {
        (crate::vision::pipeline::ImageEncoder::load(dir)?, None)
    };
    eprintln!("loaded {} (Llama 3.2 Vision) in {:.1} s", dir.display(), t0.elapsed().as_secs_f64());
    let cfg = encoder.cfg.clone();
    // The image encoder on the text decoder's GPU (its first rank's), on a stream of its own.
    let cuda_device = match (&cuda_tp, device) {
        (Some((placement, _)), _) => Some(placement[0]),
        (None, load::Device::Cuda(ordinal)) => Some(ordinal),
        (None, load::Device::Cpu) => None,
    };
    if let Some(d) = cuda_device {
        encoder.use_cuda(d)?;
        eprintln!("image encoder on cuda:{d} (bf16)");
    }
    let kv_tokens = a.kv_tokens.unwrap_or(CPU_DEFAULT_KV_TOKENS);
    let block = a.block_size;
    let ckpt_dir = dir.to_path_buf();
    // The CUDA text decoder: `--kv-tokens` exactly, or what fits under --gpu-memory-utilization.
    let cuda_opts = vision_cuda_options(a, e, cuda_device.unwrap_or(0));
    let quantize = a.quantize.clone();
    let make = move || -> Result<Box<dyn crate::exec::Executor>> {
        use crate::exec::Executor as _;
        if let Some((placement, kind)) = cuda_tp {
            let t0 = std::time::Instant::now();
            let ckpt = crate::weights::Checkpoint::open(&ckpt_dir)?;
            if let Some(lead) = &lead {
                let spec = lead.node.group_spec();
                let exec =
                    crate::tp::cuda_vision::TpMllamaCudaExecutor::join_node(cfg, &ckpt, &placement, &spec, &cuda_opts)?;
                eprintln!(
                    "Llama 3.2 Vision text decoder as {} on {:?} (nccl; vision encoder on node 0's cuda:{}) in {:.1} \
                     s: KV cache {} blocks of {} tokens per rank",
                    lead.node.describe(),
                    placement,
                    placement[0],
                    t0.elapsed().as_secs_f64(),
                    exec.num_blocks(),
                    exec.block_size()
                );
                return lead_nodes(exec, lead);
            }
            let exec = crate::tp::cuda_vision::TpMllamaCudaExecutor::new(cfg, &ckpt, tp, &placement, kind, &cuda_opts)?;
            let mut gpus: Vec<String> = Vec::new();
            for d in &placement {
                let name = format!("cuda:{d}");
                if !gpus.contains(&name) {
                    gpus.push(name);
                }
            }
            eprintln!(
                "Llama 3.2 Vision text decoder as {tp} tensor-parallel CUDA ranks on {} ({}; vision encoder \
                 replicated, on cuda:{}) in {:.1} s: KV cache {} blocks of {} tokens ({} tokens) per rank",
                gpus.join(","),
                exec.comm_name(),
                placement[0],
                t0.elapsed().as_secs_f64(),
                exec.num_blocks(),
                exec.block_size(),
                exec.num_blocks() * exec.block_size()
            );
            return Ok(Box::new(exec));
        }
        match text {
            None if matches!(device, load::Device::Cuda(_)) => {
                let exec = super::vision::cuda_text_decoder(quantize.as_deref(), &ckpt_dir, &cfg, &cuda_opts)?;
                eprintln!(
                    "Llama 3.2 Vision text decoder on cuda:{}: KV cache {} blocks of {} tokens ({} tokens{}), {} \
                     cross-attention tiles",
                    cuda_opts.device,
                    exec.num_blocks(),
                    exec.block_size(),
                    exec.num_blocks() * exec.block_size(),
                    match cuda_opts.gpu_memory_utilization {
                        Some(u) => format!(", sized under --gpu-memory-utilization {u}"),
                        None => String::new(),
                    },
                    cuda_opts.cross_tiles
                );
                Ok(Box::new(exec))
            }
            Some(text) => Ok(Box::new(crate::vision::exec::MllamaCpuExecutor::new(cfg, text, kv_tokens, block)?)),
            None => {
                let ckpt = crate::weights::Checkpoint::open(&ckpt_dir)?;
                let exec = crate::tp::vision::TpMllamaCpuExecutor::new(cfg, &ckpt, tp, kv_tokens, block)?;
                eprintln!(
                    "Llama 3.2 Vision text decoder as {tp} tensor-parallel CPU ranks (vision encoder replicated)"
                );
                Ok(Box::new(exec))
            }
        }
    };
    let ecfg = EngineConfig {
        max_step_tokens: e.max_num_batched_tokens,
        max_seqs: e.max_num_seqs,
        max_waiting: e.max_waiting,
        max_model_len: e.max_model_len,
    };
    let engine = EngineHandle::start(make, tok.clone(), ecfg)?;
    let name = e
        .served_model_name
        .clone()
        .unwrap_or_else(|| dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()));
    let mut ctx = context_for(Some(dir), tok, engine.info().clone(), name)?;
    ctx.vision = Some(Arc::new(encoder));
    Ok((engine, ctx))
}

/// The CUDA text decoder options of `serve`/`batch` for a Llama 3.2 Vision checkpoint (the same on every node of a
/// multi-node run): `--kv-tokens` exactly, or what fits under `--gpu-memory-utilization`; step and logits buffers
/// sized by the engine limits.
fn vision_cuda_options(a: &ModelArgs, e: &EngineArgs, device: usize) -> crate::vision::cuda::text::MllamaCudaOptions {
    let block = a.block_size;
    crate::vision::cuda::text::MllamaCudaOptions {
        device,
        block_size: block,
        kv_tokens: a.kv_tokens.unwrap_or(block.max(1)),
        gpu_memory_utilization: if a.kv_tokens.is_some() { None } else { Some(a.gpu_memory_utilization) },
        max_step_tokens: e.max_num_batched_tokens.max(1),
        max_logits_rows: e.max_num_seqs.max(1),
        skinny_gemm: !a.no_skinny_gemm,
        max_graph_batch: a.cuda_graph_max_batch,
        cross_tiles: e.cross_attention_tiles,
    }
}

/// `llama32 logits --image ... --tensor-parallel N --device cuda[:K] [--devices LIST]`: the images encoded once on
/// the first rank's GPU (bf16; the encoder and projector are replicated, not sharded), the text decoder as N CUDA
/// ranks ([`crate::tp::cuda_vision::TpMllamaCudaExecutor`], placed as for text models) in one prefill step; writes
/// every row's logits `[T, vocab]` as .npy. The degree and the placement are checked before anything loads.
pub(crate) fn vision_logits_tp_cuda(
    m: &ModelArgs,
    dir: &std::path::Path,
    ids: &[u32],
    images: &[PathBuf],
    out: &std::path::Path,
    (tp, devices): (usize, Option<&str>),
) -> Result<()> {
    use crate::exec::generate::{build_step, LogitsWanted, SeqChunk};
    use crate::exec::Executor as _;
    if ids.is_empty() {
        return Err(Error::request("--ids: no tokens"));
    }
    if m.block_size == 0 {
        return Err(Error::request("--block-size must be positive"));
    }
    let cfg = crate::vision::config::MllamaConfig::from_model_dir(dir)?;
    crate::tp::TpPlan::new(&cfg.text.base, tp)?;
    let placement = cuda_rank_placement(&m.device, tp, devices, false)?;
    let kind = tp_comm_kind("auto", &placement)?;
    let t0 = std::time::Instant::now();
    let (cfg, enc, mask) = if images.is_empty() {
        let n = ids.iter().filter(|&&t| t == cfg.image_token_index).count();
        if n > 0 {
            return Err(Error::request(format!("the prompt has {n} <|image|> token(s) but no image was given")));
        }
        (cfg, crate::vision::pipeline::EncodedImages { states: Vec::new(), num_tiles: Vec::new() }, None)
    } else {
        let mut encoder = crate::vision::pipeline::ImageEncoder::load(dir)?;
        encoder.use_cuda(placement[0])?;
        let files = images
            .iter()
            .map(|p| Ok((p.display().to_string(), std::fs::read(p).map_err(|e| Error::io(p, e))?)))
            .collect::<Result<Vec<_>>>()?;
        let enc = encoder.encode(&files)?;
        let c = encoder.cfg.clone();
        let mask = crate::vision::text::CrossAttentionMask::from_image_tokens(
            ids,
            c.image_token_index,
            &enc.num_tiles,
            c.vision.max_num_tiles,
        )?;
        eprintln!(
            "encoded {} image(s) ({:?} tiles) on cuda:{} in {:.2} s",
            enc.len(),
            enc.num_tiles,
            placement[0],
            t0.elapsed().as_secs_f64()
        );
        (c, enc, Some(mask))
    };
    let opts = crate::vision::cuda::text::MllamaCudaOptions {
        device: placement[0],
        block_size: m.block_size,
        kv_tokens: m.kv_tokens.unwrap_or(ids.len()).max(ids.len()),
        gpu_memory_utilization: None,
        max_step_tokens: ids.len(),
        max_logits_rows: ids.len(),
        cross_tiles: (enc.len() * cfg.vision.max_num_tiles).max(1),
        skinny_gemm: !m.no_skinny_gemm,
        max_graph_batch: 0,
    };
    let t0 = std::time::Instant::now();
    let ckpt = crate::weights::Checkpoint::open(dir)?;
    let mut exec = crate::tp::cuda_vision::TpMllamaCudaExecutor::new(cfg.clone(), &ckpt, tp, &placement, kind, &opts)?;
    eprintln!(
        "loaded the text decoder as {tp} tensor-parallel CUDA ranks on {:?} ({}) in {:.2} s",
        placement,
        exec.comm_name(),
        t0.elapsed().as_secs_f64()
    );
    let block = m.block_size;
    let table: Vec<u32> = (0..ids.len().div_ceil(block) as u32).collect();
    let chunk = SeqChunk { tokens: ids, start_pos: 0, block_table: &table, logits: LogitsWanted::All };
    let step = build_step(&[chunk], block)?;
    let logits = match &mask {
        Some(mask) => {
            exec.add_images(0, &enc)?;
            let seq = crate::vision::exec::SeqImages { key: 0, mask: mask.data() };
            exec.step_with_images(&step, &[Some(seq)])?.logits
        }
        None => exec.step(&step)?.logits,
    };
    let vocab = exec.config().vocab_size;
    crate::npy::write_f32(out, &[ids.len(), vocab], &logits)?;
    eprintln!("wrote logits [{}, {vocab}] to {} (tensor-parallel {tp} on CUDA)", ids.len(), out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tp::cuda::TpCommKind;

    fn err(r: Result<Vec<usize>>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn ranks_default_to_consecutive_gpus_from_the_device() {
        assert_eq!(rank_devices(2, 0, None, 2, false).unwrap(), vec![0, 1]);
        assert_eq!(rank_devices(4, 2, None, 8, false).unwrap(), vec![2, 3, 4, 5]);
        // Too few GPUs from K on: an error naming the fix, or (bench) every rank on cuda:K.
        let e = err(rank_devices(2, 0, None, 1, false));
        assert!(e.contains("--tensor-parallel 2") && e.contains("--devices") && e.contains("1 CUDA device is"), "{e}");
        let e = err(rank_devices(4, 6, None, 8, false));
        assert!(e.contains("cuda:6..cuda:9") && e.contains("8 CUDA devices are"), "{e}");
        assert_eq!(rank_devices(4, 1, None, 2, true).unwrap(), vec![1; 4]);
        let e = err(rank_devices(2, 3, None, 2, true));
        assert!(e.contains("--device cuda:3"), "{e}");
    }

    #[test]
    fn listed_devices_wrap_around_and_must_exist() {
        assert_eq!(rank_devices(2, 0, Some(&[0]), 1, false).unwrap(), vec![0, 0]);
        assert_eq!(rank_devices(4, 0, Some(&[3, 1]), 4, false).unwrap(), vec![3, 1, 3, 1]);
        // --devices wins over --device's ordinal.
        assert_eq!(rank_devices(2, 5, Some(&[0, 1]), 2, false).unwrap(), vec![0, 1]);
        let e = err(rank_devices(2, 0, Some(&[0, 2]), 2, false));
        assert!(e.contains("--devices") && e.contains("cuda:2") && e.contains("2 CUDA devices"), "{e}");
        assert!(err(rank_devices(2, 0, Some(&[]), 2, false)).contains("--devices"));
    }

    #[test]
    fn the_communicator_is_nccl_only_when_every_rank_has_its_own_gpu() {
        assert_eq!(tp_comm_kind("auto", &[0, 1, 2, 3]).unwrap(), TpCommKind::Nccl);
        assert_eq!(tp_comm_kind("auto", &[0, 1, 0, 1]).unwrap(), TpCommKind::InProcess);
        assert_eq!(tp_comm_kind("auto", &[0, 0]).unwrap(), TpCommKind::InProcess);
        assert_eq!(tp_comm_kind("host-staged", &[0, 1]).unwrap(), TpCommKind::InProcess);
        assert_eq!(tp_comm_kind("nccl", &[0, 0]).unwrap(), TpCommKind::Nccl);
        let e = tp_comm_kind("gloo", &[0, 1]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("--tp-comm") && e.contains("`gloo`"), "{e}");
    }

    /// `check_multi_node` on `llama32 serve ARGS`'s flags.
    fn multi_node(args: &[&str]) -> Result<Option<MultiNode>> {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from(["llama32", "serve"].iter().chain(args))
            .map_err(|e| Error::request(e.to_string()))?;
        match cli.command {
            crate::cli::Command::Serve(a) => check_multi_node(&a.model, &a.engine),
            _ => unreachable!("parsed a serve command"),
        }
    }

    #[test]
    fn multi_node_flags_are_checked_before_loading() {
        // A valid 2-node command (node 0, or with --node-rank) with `extra` flags replacing or adding to it.
        let two = |extra: &[&str]| {
            let mut flags =
                vec![("--device", "cuda"), ("--tensor-parallel", "16"), ("--nnodes", "2"), ("--master-addr", "node0")];
            for kv in extra.chunks(2) {
                match flags.iter_mut().find(|(k, _)| *k == kv[0]) {
                    Some(f) => f.1 = kv[1],
                    None => flags.push((kv[0], kv[1])),
                }
            }
            multi_node(&flags.iter().flat_map(|(k, v)| [*k, *v]).collect::<Vec<_>>())
        };
        let e = |r: Result<Option<MultiNode>>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let n = two(&["--node-rank", "1", "--master-port", "4000"]).unwrap().unwrap();
        assert_eq!((n.tp, n.nnodes, n.node_rank, n.local_ranks(), n.ranks()), (16, 2, 1, 8, 8..16));
        assert_eq!((n.master_addr.as_str(), n.master_port, n.control_port()), ("node0", 4000, 4001));
        assert_eq!((n.control_addr(), n.timeout), ("node0:4001".to_string(), Duration::from_secs(600)));
        let spec = n.group_spec();
        assert_eq!((spec.rank, spec.world, spec.port, spec.master_addr.as_str()), (8, 16, 4000, "node0"));
        let n = two(&["--node-timeout", "5", "--master-addr", "::1", "--device", "cuda:3"]).unwrap().unwrap();
        assert_eq!((n.node_rank, n.ranks(), n.master_port, n.timeout), (0, 0..8, 29500, Duration::from_secs(5)));
        assert_eq!(n.control_addr(), "[::1]:29501");
        let n = two(&["--tensor-parallel", "8", "--nnodes", "4", "--node-rank", "3"]).unwrap().unwrap();
        assert_eq!((n.local_ranks(), n.ranks(), n.group_spec().rank), (2, 6..8, 6));
        // One node: nothing to do, whatever --master-addr says; --node-rank must be 0.
        assert_eq!(multi_node(&["--device", "cpu", "--master-addr", "x"]).unwrap(), None);
        assert!(e(multi_node(&["--node-rank", "1"])).contains("--node-rank 1 must be less than --nnodes 1"));
        assert!(e(multi_node(&["--nnodes", "0"])).contains("--nnodes must be at least 1"));
        // Each refusal names its flag.
        let m = e(two(&["--device", "cpu"]));
        assert!(m.contains("--nnodes 2") && m.contains("--device cuda") && m.contains("--device cpu"), "{m}");
        let m = e(two(&["--tensor-parallel", "6", "--nnodes", "4"]));
        assert!(m.contains("--tensor-parallel 6") && m.contains("divisible by --nnodes 4"), "{m}");
        let m = e(two(&["--tensor-parallel", "1"]));
        assert!(m.contains("--tensor-parallel 1") && m.contains("--nnodes 2"), "{m}");
        let m = e(two(&["--node-rank", "2"]));
        assert!(m.contains("--node-rank 2 must be less than --nnodes 2"), "{m}");
        let m = e(multi_node(&["--device", "cuda", "--tensor-parallel", "4", "--nnodes", "2"]));
        assert!(m.contains("--master-addr HOST"), "{m}");
        assert!(e(two(&["--master-addr", " "])).contains("--master-addr HOST"));
        assert!(e(two(&["--master-port", "65535"])).contains("--master-port 65535"));
        assert!(e(two(&["--master-port", "0"])).contains("--master-port 0"));
        assert!(e(two(&["--node-timeout", "0"])).contains("--node-timeout"));
        let m = e(two(&["--quantize", "w4a16-g32"]));
        assert!(m.contains("--tensor-parallel > 1 does not support quantized models"), "{m}");
        // --devices: this node's 8 ranks need 8 distinct GPUs (one NCCL group takes one rank per GPU).
        assert!(two(&["--devices", "7,6,5,4,3,2,1,0"]).is_ok());
        let m = e(two(&["--devices", "0,1,2,3"]));
        assert!(m.contains("--devices") && m.contains("local ranks 0 and 4 would share cuda:0"), "{m}");
        assert!(e(two(&["--devices", "0,x"])).contains("--devices: `x`"));
    }

    #[test]
    fn flags_are_checked_before_loading() {
        let e = |r: Result<()>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(check_tensor_parallel(2, "cuda", None).is_ok());
        assert!(check_tensor_parallel(4, "cuda:1", Some("cuda:0,1")).is_ok());
        assert!(check_tensor_parallel(2, "cpu", None).is_ok());
        assert!(e(check_tensor_parallel(0, "cpu", None)).contains("--tensor-parallel"));
        assert!(e(check_tensor_parallel(2, "gpu", None)).contains("--device"));
        assert!(e(check_tensor_parallel(2, "cuda", Some("0,x"))).contains("--devices: `x`"));
        assert!(e(check_tensor_parallel(2, "cuda", Some(","))).contains("--devices: no devices"));
        assert!(e(check_tensor_parallel(2, "cpu", Some("0"))).contains("--devices 0"));
        assert!(e(check_tensor_parallel(1, "cuda", Some("0"))).contains("--devices 0"));
        // Vision checkpoints take any degree on either device; only a quantized tensor-parallel run is refused.
        assert!(check_vision_tensor_parallel(1, None).is_ok());
        assert!(check_vision_tensor_parallel(4, None).is_ok());
        assert!(check_vision_tensor_parallel(1, Some("w4a16-g32")).is_ok());
        let v = e(check_vision_tensor_parallel(2, Some("w4a16-g32")));
        assert!(v.contains("--tensor-parallel > 1") && v.contains("quantized"), "{v}");
    }
}
