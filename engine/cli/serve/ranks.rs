//! Tensor parallelism from the command line: the flags checked before anything loads, and the CPU or CUDA ranks of
//! a text model built from them.

use super::nodes::MultiNode;
use crate::cli::{load, parse_devices, ModelArgs};
use crate::{Error, Result};

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
        parse_devices(list)?;
    }
    Ok(())
}

/// Checks `--tensor-parallel N` for a Llama 3.2 Vision checkpoint before anything loads, besides
/// [`check_tensor_parallel`]: any N runs on `--device cpu` (in-process CPU ranks) and on `--device cuda[:K]` (CUDA
/// ranks, [`crate::tp::cuda_vision::TpMllamaCudaExecutor`]). With N > 1, a quantized model (`--quantize`, or a
/// quantized checkpoint, not both) must be W4A16 with group-aligned row-parallel splits
/// ([`crate::tp::load::check_quantized_plan`]), and `--random-weights` is refused (the ranks read checkpoint slices).
pub(crate) fn check_vision_tensor_parallel(tp: usize, a: &ModelArgs) -> Result<()> {
    check_vision_tp_flags(tp, a.random_weights)?;
    let (true, Some(dir)) = (tp > 1, &a.model) else { return Ok(()) };
    let flag = a.quantize.as_deref().map(crate::quant::Scheme::parse).transpose()?;
    let scheme = match (flag, load::checkpoint_quantization(dir)?) {
        (Some(s), Some(q)) => {
            return Err(Error::request(format!("--quantize {}: the checkpoint is already quantized ({q})", s.name())))
        }
        (Some(s), None) => Some(s),
        (None, q) => q.map(|q| q.scheme),
    };
    if let Some(s) = scheme {
        let cfg = crate::vision::config::MllamaConfig::from_model_dir(dir)?;
        crate::tp::load::check_quantized_plan(&crate::tp::TpPlan::new(&cfg.text.base, tp)?, s)?;
    }
    Ok(())
}

/// The flag checks of [`check_vision_tensor_parallel`].
fn check_vision_tp_flags(tp: usize, random_weights: bool) -> Result<()> {
    if tp > 1 && random_weights {
        return Err(Error::request(
            "--tensor-parallel > 1 reads each rank's slices from the checkpoint: --random-weights is not supported \
             with it for Llama 3.2 Vision",
        ));
    }
    Ok(())
}

/// The quantization of a text model run as `tp` ranks, checked before anything loads: `--quantize` or a quantized
/// checkpoint (not both), W4A8 refused at `tp > 1` and every row-parallel K share a multiple of the group
/// ([`crate::tp::load::check_quantized_plan`]; errors name the scheme, the tensor and the degree). Returns what to
/// convert at load time: the scheme of `--quantize`, or a quantized checkpoint's with `--random-weights` (none
/// for an unquantized model or a quantized checkpoint, which the ranks detect and read themselves), and int8
/// tables for `--embeddings int8` (or, with `--random-weights`, a quantized checkpoint config that says so).
pub(super) fn tp_quantization(
    a: &ModelArgs,
    source: &load::Source,
    cfg: &crate::config::LlamaConfig,
    tp: usize,
) -> Result<crate::quant::AtLoad> {
    let tables_int8 = load::tables_int8(a)?;
    let Some(q) = load::quantization_of(a, source)? else {
        return Ok(crate::quant::AtLoad { scheme: None, tables_int8 });
    };
    let (scheme, at_load) = match &q {
        load::Quantization::AtLoad(s) => (*s, crate::quant::AtLoad { scheme: Some(*s), tables_int8 }),
        load::Quantization::Checkpoint(c) => {
            let random = a.random_weights;
            let tables = tables_int8 || (random && c.embeddings == crate::quant::format::EmbeddingQuant::Int8);
            (c.scheme, crate::quant::AtLoad { scheme: random.then_some(c.scheme), tables_int8: tables })
        }
    };
    let plan = crate::tp::TpPlan::new(cfg, tp)?;
    crate::tp::load::check_quantized_plan(&plan, scheme).map_err(|e| match e {
        Error::Request(m) => Error::request(format!("--tensor-parallel {tp} ({}): {m}", q.describe())),
        other => other,
    })?;
    Ok(at_load)
}

/// The text model of `a` as `tp` tensor-parallel CPU ranks ([`crate::tp::TpCpuExecutor`]) with KV pools of
/// `kv_tokens` tokens: each rank reads only its slices of the checkpoint (or of the seeded random weights), its
/// projections quantized as [`tp_quantization`] says.
pub(crate) fn tp_cpu_executor(a: &ModelArgs, tp: usize, kv_tokens: usize) -> Result<crate::tp::TpCpuExecutor> {
    let (cfg, source) = load::resolve_config(a)?;
    let at_load = tp_quantization(a, &source, &cfg, tp)?;
    let ckpt;
    let src = match (&source, a.random_weights) {
        (load::Source::Dir(dir), false) => {
            ckpt = crate::weights::Checkpoint::open(dir)?;
            crate::weights::WeightSource::Checkpoint(&ckpt)
        }
        _ => crate::weights::WeightSource::Random(a.seed()),
    };
    crate::tp::TpCpuExecutor::with_capacity_quantized(cfg, src, tp, at_load, kv_tokens, a.block_size)
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
    let listed = devices.map(parse_devices).transpose()?;
    let count = usable_cuda_devices(device, &format!("--tensor-parallel {tp}"))?;
    rank_devices(tp, first, listed.as_deref(), count, share_when_short)
}

/// The number of visible CUDA devices, once CUDA is known to be usable: otherwise the error reads `--device D: no
/// usable CUDA device for WHAT: ...`.
pub(super) fn usable_cuda_devices(device: &str, what: &str) -> Result<usize> {
    crate::ops::cuda::probe().map_err(|e| match e {
        Error::Backend(m) => Error::Backend(format!("--device {device}: no usable CUDA device for {what}: {m}")),
        other => other,
    })?;
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| Error::Backend(format!("counting CUDA devices: {e}")))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// The text model of `a` as `tp` tensor-parallel CUDA ranks ([`crate::tp::cuda::TpCudaExecutor`]) placed and sized
/// by `r`: each rank reads only its slices of the checkpoint (or of the seeded random weights). The one place that
/// turns the command line into CUDA ranks of a text model (`logits`, `serve`, `batch`, `bench-serve` and `bench`;
/// Llama 3.2 Vision's ranks are placed by the same [`cuda_rank_placement`] and [`tp_comm_kind`]). W4A16 models
/// (`--quantize`, or a quantized checkpoint) run as int4 ranks; W4A8, a row-parallel K share that is not a multiple
/// of the quantization group ([`tp_quantization`]) and tensor-parallel degrees that do not divide the model are
/// refused before any device is touched; without a usable CUDA device the error says so.
pub(crate) fn tp_cuda_executor(a: &ModelArgs, tp: usize, r: &CudaRanks<'_>) -> Result<TpCudaModel> {
    tp_cuda_model(a, tp, r, None)
}

/// [`tp_cuda_executor`] for this node's ranks of a multi-node run (`node.tp` ranks over all nodes), placed on
/// `placement` ([`node_rank_placement`]) and joined to the global NCCL group
/// ([`crate::tp::cuda::TpCudaExecutor::join_node`]); `r.devices` and `r.comm` are not used.
///
/// [`node_rank_placement`]: super::nodes::node_rank_placement
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
    let (cfg, source) = load::resolve_config(a)?;
    crate::tp::TpPlan::new(&cfg, tp)?;
    let at_load = tp_quantization(a, &source, &cfg, tp)?;
    let ckpt_quantized = matches!(load::quantization_of(a, &source)?, Some(load::Quantization::Checkpoint(_)));
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
    if let Some(q) = load::quantization_of(a, &source)? {
        desc.push_str(&format!(", {}", q.describe()));
    }
    if at_load.tables_int8 {
        desc.push_str(", int8 embeddings");
    }
    if a.persistent_decode {
        return Err(crate::Error::request(
            "--persistent-decode runs on one GPU; it does not combine with tensor parallelism",
        ));
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
        fuse_swiglu: !a.no_fused_swiglu,
        fuse_rope: a.fused_rope,
        fuse_norm: a.fused_norm,
        persistent_decode: false,
    };
    let ckpt;
    let src = match (&source, a.random_weights) {
        (load::Source::Dir(dir), false) => {
            ckpt = crate::weights::Checkpoint::open(dir)?;
            if !ckpt_quantized {
                // Before any device (a quantized checkpoint's tensors are checked as its ranks read them).
                crate::weights::check_checkpoint(&ckpt, &cfg)?;
            }
            crate::weights::WeightSource::Checkpoint(&ckpt)
        }
        _ => crate::weights::WeightSource::Random(a.seed()),
    };
    let exec = match node {
        Some((n, _)) => {
            crate::tp::cuda::TpCudaExecutor::join_node(cfg, src, &placement, &n.group_spec(), at_load, &opts)?
        }
        None => crate::tp::cuda::TpCudaExecutor::new_quantized(cfg, src, tp, at_load, &placement, kind, &opts)?,
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
        // Vision checkpoints take any degree on either device; random weights need tp = 1 (quantization is checked
        // against the checkpoint: tests/tp_vision.rs).
        assert!(check_vision_tp_flags(1, false).is_ok());
        assert!(check_vision_tp_flags(4, false).is_ok());
        assert!(check_vision_tp_flags(1, true).is_ok());
        let v = e(check_vision_tp_flags(2, true));
        assert!(v.contains("--random-weights"), "{v}");
    }
}
