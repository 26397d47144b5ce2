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
    /// shard of the weights and KV cache; CUDA tensor parallelism is not available yet.
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel: usize,
}

/// Checks `--tensor-parallel N` against the device: any N >= 1 on the CPU (in-process ranks), only 1 on CUDA so far.
pub(crate) fn check_tensor_parallel(tp: usize, device: &str) -> Result<()> {
    if tp == 0 {
        return Err(Error::request("--tensor-parallel must be at least 1"));
    }
    if tp > 1 && load::Device::parse(device)? != load::Device::Cpu {
        return Err(Error::request(format!(
            "--tensor-parallel {tp} on --device {device}: `logits`/`serve`/`batch` run tensor parallelism as in-process \
             ranks on --device cpu only so far; on CUDA, `llama32 bench --tensor-parallel` drives the (not yet \
             device-verified) multi-GPU executor (docs/parallelism.md)"
        )));
    }
    Ok(())
}

/// The text model of `a` as `tp` tensor-parallel CPU ranks ([`crate::tp::TpCpuExecutor`]) with KV pools of
/// `kv_tokens` tokens: each rank reads only its slices of the checkpoint (or of the seeded random weights).
pub(crate) fn tp_cpu_executor(a: &ModelArgs, tp: usize, kv_tokens: usize) -> Result<crate::tp::TpCpuExecutor> {
    let (cfg, source) = load::resolve_config(a)?;
    let quantized = match &source {
        load::Source::Dir(dir) => load::checkpoint_quantization(dir)?.is_some(),
        load::Source::Preset(_) => false,
    };
    if a.quantize.is_some() || quantized {
        return Err(Error::request("--tensor-parallel > 1 does not support quantized models yet"));
    }
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
    check_tensor_parallel(e.tensor_parallel, &a.device)?;
    if let Some(dir) = super::vision::vision_dir(a, false)? {
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
    let make = move || -> Result<Box<dyn crate::exec::Executor>> {
        if tp > 1 {
            let t0 = std::time::Instant::now();
            let kv_tokens = margs.kv_tokens.unwrap_or(CPU_DEFAULT_KV_TOKENS);
            let exec = tp_cpu_executor(&margs, tp, kv_tokens)?;
            use crate::exec::Executor as _;
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
/// reference, CPU tensor-parallel ranks, or CUDA), the image encoder (CPU reference) in the request handlers.
fn start_vision_engine(a: &ModelArgs, e: &EngineArgs, dir: &std::path::Path) -> Result<(EngineHandle, ServeContext)> {
    let tok = load_tokenizer(a)?.map(Arc::new);
    let t0 = std::time::Instant::now();
    let tp = e.tensor_parallel;
    // With tensor parallelism the ranks read their own slices of the checkpoint, so only the vision half is
    // converted here.
    let (encoder, text) = if tp == 1 {
        let (encoder, text) = crate::vision::pipeline::MllamaModel::load(dir)?.split();
        (encoder, Some(text))
    } else {
        (crate::vision::pipeline::ImageEncoder::load(dir)?, None)
    };
    eprintln!("loaded {} (Llama 3.2 Vision) in {:.1} s", dir.display(), t0.elapsed().as_secs_f64());
    let cfg = encoder.cfg.clone();
    let device = super::load::Device::parse(&a.device)?;
    let kv_tokens = a.kv_tokens.unwrap_or(CPU_DEFAULT_KV_TOKENS);
    let block = a.block_size;
    let ckpt_dir = dir.to_path_buf();
    // The CUDA text decoder: the image encoder stays on the CPU reference in the request handlers.
    let cuda_opts = crate::vision::cuda::text::MllamaCudaOptions {
        device: match device {
            super::load::Device::Cuda(ordinal) => ordinal,
            super::load::Device::Cpu => 0,
        },
        block_size: block,
        kv_tokens: a.kv_tokens.unwrap_or(crate::vision::cuda::text::MllamaCudaOptions::default().kv_tokens),
        max_step_tokens: e.max_num_batched_tokens.max(1),
        max_logits_rows: e.max_num_seqs.max(1),
        skinny_gemm: !a.no_skinny_gemm,
        max_graph_batch: a.cuda_graph_max_batch,
        ..Default::default()
    };
    let make = move || -> Result<Box<dyn crate::exec::Executor>> {
        match text {
            Some(text) if matches!(device, super::load::Device::Cuda(_)) => {
                Ok(Box::new(crate::vision::cuda::text::MllamaCudaExecutor::new(cfg, &text, &cuda_opts)?))
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
