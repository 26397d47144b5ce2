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
    crate::ops::cuda::probe().map_err(|e| match e {
        Error::Backend(m) => {
            Error::Backend(format!("--device {device}: no usable CUDA device for --tensor-parallel {tp}: {m}"))
        }
        other => other,
    })?;
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| Error::Backend(format!("counting CUDA devices: {e}")))?;
    rank_devices(tp, first, listed.as_deref(), usize::try_from(count).unwrap_or(0), share_when_short)
}

/// The text model of `a` as `tp` tensor-parallel CUDA ranks ([`crate::tp::cuda::TpCudaExecutor`]) placed and sized
/// by `r`: each rank reads only its slices of the checkpoint (or of the seeded random weights). The one place that
/// turns the command line into CUDA ranks of a text model (`logits`, `serve`, `batch`, `bench-serve` and `bench`;
/// Llama 3.2 Vision's ranks are placed by the same [`cuda_rank_placement`] and [`tp_comm_kind`]). Quantized models
/// and tensor-parallel degrees that do not divide the model are refused before any device is touched; without a
/// usable CUDA device the error says so.
pub(crate) fn tp_cuda_executor(a: &ModelArgs, tp: usize, r: &CudaRanks<'_>) -> Result<TpCudaModel> {
    if load::Device::parse(&a.device)? == load::Device::Cpu {
        return Err(Error::request("tensor-parallel CUDA ranks need --device cuda or cuda:K"));
    }
    if a.block_size == 0 {
        return Err(Error::request("--block-size must be positive"));
    }
    let (cfg, source) = load::resolve_config(a)?;
    refuse_quantized(a, &source)?;
    crate::tp::TpPlan::new(&cfg, tp)?;
    // Checks the --tp-comm spelling before touching a device (the placement only picks auto's choice).
    tp_comm_kind(r.comm, &[])?;
    let placement = cuda_rank_placement(&a.device, tp, r.devices, r.share_when_short)?;
    let kind = tp_comm_kind(r.comm, &placement)?;
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
    let exec = crate::tp::cuda::TpCudaExecutor::new(cfg, src, tp, &placement, kind, &opts)?;
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
    Ok(TpCudaModel {
        device_name: format!("{} ({tp} ranks, {})", names.join(","), exec.comm_name()),
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
    /// OpenAI batch input file (JSON lines with custom_id, method, url, body).
    #[arg(long)]
    input: PathBuf,
    /// Results file (JSON lines with custom_id, response, error), in input order; an existing one is resumed.
    #[arg(long)]
    output: PathBuf,
    /// Requests submitted to the engine and not yet finished.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// KV cache tokens on the CPU backend when `--kv-tokens` is not given (the CUDA backend sizes it from free memory).
const CPU_DEFAULT_KV_TOKENS: usize = 16384;

/// Starts the engine thread for `a` (the model is loaded there) and builds the handlers' context.
fn start_engine(a: &ModelArgs, e: &EngineArgs) -> Result<(EngineHandle, ServeContext)> {
    check_tensor_parallel(e.tensor_parallel, &a.device, e.devices.as_deref())?;
    if let Some(dir) = super::vision::vision_dir(a, false)? {
        check_vision_tensor_parallel(e.tensor_parallel, a.quantize.as_deref())?;
        return start_vision_engine(a, e, &dir);
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
    let (engine, ctx) = start_engine(&a.model, &a.engine)?;
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
    if a.max_in_flight == 0 {
        return Err(Error::request("--max-in-flight must be at least 1"));
    }
    if !a.input.is_file() {
        return Err(Error::request(format!("--input {}: no such file", a.input.display())));
    }
    let (engine, ctx) = start_engine(&a.model, &a.engine)?;
    let opts =
        BatchOptions { input: a.input, output: a.output, max_in_flight: a.max_in_flight, progress: !a.no_progress };
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
    let (engine, ctx) = start_engine(&a.model, &a.engine)?;
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
/// under `--gpu-memory-utilization` (ranks sharing a GPU split it).
fn start_vision_engine(a: &ModelArgs, e: &EngineArgs, dir: &std::path::Path) -> Result<(EngineHandle, ServeContext)> {
    let tok = load_tokenizer(a)?.map(Arc::new);
    let tp = e.tensor_parallel;
    let device = load::Device::parse(&a.device)?;
    // CUDA ranks: the degree and the placement are checked before anything loads.
    let cuda_tp = match device {
        load::Device::Cuda(_) if tp > 1 => {
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
    let (mut encoder, text) = if tp == 1 {
        let (encoder, text) = crate::vision::pipeline::MllamaModel::load(dir)?.split();
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
    let cuda_opts = crate::vision::cuda::text::MllamaCudaOptions {
        device: cuda_device.unwrap_or(0),
        block_size: block,
        kv_tokens: a.kv_tokens.unwrap_or(block.max(1)),
        gpu_memory_utilization: if a.kv_tokens.is_some() { None } else { Some(a.gpu_memory_utilization) },
        max_step_tokens: e.max_num_batched_tokens.max(1),
        max_logits_rows: e.max_num_seqs.max(1),
        skinny_gemm: !a.no_skinny_gemm,
        max_graph_batch: a.cuda_graph_max_batch,
        ..Default::default()
    };
    let make = move || -> Result<Box<dyn crate::exec::Executor>> {
        use crate::exec::Executor as _;
        if let Some((placement, kind)) = cuda_tp {
            let t0 = std::time::Instant::now();
            let ckpt = crate::weights::Checkpoint::open(&ckpt_dir)?;
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
            Some(text) if matches!(device, load::Device::Cuda(_)) => {
                let exec = crate::vision::cuda::text::MllamaCudaExecutor::new(cfg, &text, &cuda_opts)?;
                eprintln!(
                    "Llama 3.2 Vision text decoder on cuda:{}: KV cache {} blocks of {} tokens ({} tokens{})",
                    cuda_opts.device,
                    exec.num_blocks(),
                    exec.block_size(),
                    exec.num_blocks() * exec.block_size(),
                    match cuda_opts.gpu_memory_utilization {
                        Some(u) => format!(", sized under --gpu-memory-utilization {u}"),
                        None => String::new(),
                    }
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
