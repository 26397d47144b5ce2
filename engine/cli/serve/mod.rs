//! `llama32 serve` and `llama32 batch`: the engine thread behind the OpenAI server or an offline batch file.

mod nodes;
mod ranks;
mod vision;

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

use nodes::{follow_node, lead_nodes, node_role, Lead, Role};
use ranks::tp_cuda_node_executor;
pub(crate) use ranks::{
    check_tensor_parallel, check_vision_tensor_parallel, tp_comm_kind, tp_cpu_executor, tp_cuda_executor, CudaRanks,
};
use vision::start_vision_engine;
pub(crate) use vision::vision_logits_tp_cuda;

/// Engine limits shared by `serve` and `batch`.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Most sequences running at once.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Most new tokens per engine step (prefill chunks are cut to fit).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Most sequences waiting for admission before new requests are refused with a 429 (0: no limit; serve and
    /// bench-serve only: batch refuses it, its queue is --max-in-flight).
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
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub node_timeout: u64,
    /// Llama 3.2 Vision on CUDA: image tiles whose cross-attention K/V the decoder keeps at once, all requests
    /// together. An image takes max_num_tiles (4) until its prompt has run, then only its real tiles; requests
    /// whose images do not fit wait for room.
    #[arg(long, default_value_t = 64)]
    pub cross_attention_tiles: usize,
    /// How waiting requests are ordered, as vLLM's flag: `fcfs` (first come, first served; a request's `priority`
    /// other than 0 is refused) or `priority` (lower `priority` first, then arrival; a running sequence may be
    /// preempted for a more urgent one when the KV cache runs out).
    #[arg(long, value_enum, default_value_t = SchedulingPolicy::Fcfs)]
    pub scheduling_policy: SchedulingPolicy,
}

/// `--scheduling-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulingPolicy {
    /// First come, first served.
    Fcfs,
    /// By each request's `priority`, lower first.
    Priority,
}

impl EngineArgs {
    /// Refuses limits no engine can run with, naming the flag, before anything loads.
    fn check(&self) -> Result<()> {
        for (flag, v) in [
            ("--max-num-seqs", self.max_num_seqs),
            ("--max-num-batched-tokens", self.max_num_batched_tokens),
            ("--tensor-parallel", self.tensor_parallel),
            ("--nnodes", self.nnodes),
            ("--cross-attention-tiles", self.cross_attention_tiles),
        ] {
            if v == 0 {
                return Err(Error::request(format!("{flag} must be at least 1")));
            }
        }
        if self.max_model_len == Some(0) {
            return Err(Error::request("--max-model-len must be at least 1"));
        }
        if let Some(name) = self.served_model_name.as_deref().filter(|n| n.trim().is_empty() || n.len() > 256) {
            return Err(Error::request(format!(
                "--served-model-name `{name}`: must be 1 to 256 bytes, not only spaces (clients send it as `model`)"
            )));
        }
        Ok(())
    }

    /// The scheduler limits these flags set.
    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            max_step_tokens: self.max_num_batched_tokens,
            max_seqs: self.max_num_seqs,
            max_waiting: self.max_waiting,
            max_model_len: self.max_model_len,
        }
    }
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
    /// Largest accepted request body, in bytes (1024 to 1 GiB).
    #[arg(long, default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// Seconds the running requests get to finish after Ctrl-C / SIGTERM.
    #[arg(long, default_value_t = 30.0, allow_negative_numbers = true)]
    shutdown_timeout: f64,
    /// Require `Authorization: Bearer KEY` on every /v1 route (401 otherwise; /health and /metrics stay open).
    /// Default: the LLAMA32_API_KEY environment variable, when set (which keeps the key out of `ps`).
    #[arg(long)]
    api_key: Option<String>,
}

/// `--api-key`, or the LLAMA32_API_KEY environment variable; an empty or unprintable key is refused.
fn api_key(flag: Option<&str>) -> Result<Option<String>> {
    let key = match flag {
        Some(k) => Some(k.to_string()),
        None => std::env::var("LLAMA32_API_KEY").ok().filter(|k| !k.is_empty()),
    };
    match key {
        Some(k) if k.trim().is_empty() || k.len() > 4096 || !k.bytes().all(|b| b.is_ascii_graphic()) => {
            Err(Error::request("--api-key (or LLAMA32_API_KEY): 1 to 4096 printable ASCII characters without spaces"))
        }
        k => Ok(k),
    }
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

/// The largest `--max-body-bytes`: a body is read whole into memory before it is parsed.
const MAX_BODY_BYTES: usize = 1 << 30;

/// KV cache tokens on the CPU backend when `--kv-tokens` is not given (the CUDA backend sizes it from free memory).
const CPU_DEFAULT_KV_TOKENS: usize = 16384;

/// Starts the engine thread for `a` (the model is loaded there) and builds the handlers' context; `lead`: this is
/// node 0 of a multi-node run ([`node_role`]).
fn start_engine(a: &ModelArgs, e: &EngineArgs, lead: Option<Lead>) -> Result<(EngineHandle, ServeContext)> {
    let (engine, mut ctx) = load_engine(a, e, lead)?;
    ctx.priority_scheduling = e.scheduling_policy == SchedulingPolicy::Priority;
    Ok((engine, ctx))
}

/// [`start_engine`] before the request policy: the model, its executor and the engine thread.
fn load_engine(a: &ModelArgs, e: &EngineArgs, lead: Option<Lead>) -> Result<(EngineHandle, ServeContext)> {
    check_tensor_parallel(e.tensor_parallel, &a.device, e.devices.as_deref())?;
    if let Some(dir) = super::vision::vision_dir(a, false)? {
        check_vision_tensor_parallel(e.tensor_parallel, a)?;
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
    let engine = EngineHandle::start(make, tok.clone(), e.engine_config())?;
    let ctx = context_for(a.model.as_deref(), tok, engine.info().clone(), name)?;
    Ok((engine, ctx))
}

/// Runs `llama32 serve` until Ctrl-C / SIGTERM.
pub fn cmd_serve(a: ServeArgs) -> Result<()> {
    a.model.check()?;
    a.engine.check()?;
    if !(a.shutdown_timeout.is_finite() && (0.0..=86_400.0).contains(&a.shutdown_timeout)) {
        return Err(Error::request("--shutdown-timeout must be a number of seconds in [0, 86400]"));
    }
    if !(1024..=MAX_BODY_BYTES).contains(&a.max_body_bytes) {
        return Err(Error::request(format!(
            "--max-body-bytes {}: must be in 1024..={MAX_BODY_BYTES} (1 GiB: a request body is held in memory)",
            a.max_body_bytes
        )));
    }
    let lead = match node_role(&a.model, &a.engine)? {
        Role::Follow(node) => return follow_node(&a.model, &a.engine, &node),
        Role::Lead(lead) => Some(lead),
        Role::Alone => None,
    };
    check_listen_address(&a.host, a.port)?;
    let api_key = api_key(a.api_key.as_deref())?;
    let (engine, ctx) = start_engine(&a.model, &a.engine, lead)?;
    eprintln!("serving model `{}` (max_model_len {} tokens)", ctx.model_name, ctx.info.max_model_len);
    let opts = ServerOptions {
        host: a.host,
        port: a.port,
        max_body_bytes: a.max_body_bytes,
        shutdown_timeout: Duration::from_secs_f64(a.shutdown_timeout),
        api_key,
        ..ServerOptions::default()
    };
    run_blocking(engine, ctx, opts)
}

/// Fails before the model loads (minutes, for a large one) where the server could not listen: a host that does not
/// resolve, or a port taken or not allowed. The trial socket is closed at once; the server binds again after
/// loading.
fn check_listen_address(host: &str, port: u16) -> Result<()> {
    use std::net::ToSocketAddrs;
    let shown = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::request(format!("--host {host}: cannot resolve it ({e})")))?
        .collect();
    // As the server's bind does: the first address that takes it.
    let mut last = None;
    for addr in &addrs {
        match std::net::TcpListener::bind(addr) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => Error::request(format!("cannot listen on {shown} (--host, --port): {e}")),
        None => Error::request(format!("--host {host}: resolves to no address")),
    })
}

/// Runs `llama32 batch` and prints its summary as JSON.
pub fn cmd_batch(a: BatchArgs) -> Result<()> {
    a.model.check()?;
    a.engine.check()?;
    // A follower node (--node-rank > 0; `node_role` checks the rest) runs node 0's steps: it needs (and reads) no
    // batch file.
    let files = if a.engine.node_rank == 0 {
        if a.max_in_flight == 0 {
            return Err(Error::request("--max-in-flight must be at least 1"));
        }
        // A refusal for a full queue is transient; in a batch it would have to become a line's final result.
        if a.engine.max_waiting != 0 {
            return Err(Error::request(
                "--max-waiting does not apply to batch, which bounds its queue with --max-in-flight",
            ));
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
    let opts = BatchOptions { input, output, max_in_flight: a.max_in_flight, progress: !a.no_progress };
    // The files' faults are reported before a model is loaded (run_batch checks them again).
    crate::serve::batch::check_files(&opts)?;
    let (engine, ctx) = start_engine(&a.model, &a.engine, lead)?;
    let summary = run_batch(&engine, &ctx, &opts);
    engine.shutdown(None);
    engine.join();
    let summary = summary?;
    outln!("{}", serde_json::to_string(&summary).unwrap_or_default())?;
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
    #[arg(long, default_value_t = 512, value_parser = crate::cli::token_count())]
    prompt_tokens: usize,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 128, value_parser = crate::cli::token_count())]
    max_tokens: usize,
    /// With --url: the server's API key (sent as `Authorization: Bearer KEY`); default: LLAMA32_API_KEY.
    #[arg(long)]
    api_key: Option<String>,
    /// A JSON object of fields added to every request, over the defaults (greedy, `ignore_eos`): e.g.
    /// '{"logprobs": 5}', '{"temperature": 1, "repetition_penalty": 1.1}', or a structured output with
    /// '{"ignore_eos": false, "guided_json": {...}}'. Echoed in each level's line as `extra_body`.
    #[arg(long)]
    extra_body: Option<String>,
}

/// Runs `llama32 bench-serve`: one JSON line per load level with TTFT, ITL and throughput.
pub fn cmd_bench_serve(a: BenchServeArgs) -> Result<()> {
    a.model.check()?;
    a.engine.check()?;
    if a.url.is_some() {
        check_url_mode(&a.model, &a.engine)?;
    } else if a.api_key.is_some() {
        return Err(Error::request(
            "--api-key is the key of a server given with --url (the in-process one needs none)",
        ));
    }
    let lead = match node_role(&a.model, &a.engine)? {
        Role::Follow(node) => return follow_node(&a.model, &a.engine, &node),
        Role::Lead(lead) => Some(lead),
        Role::Alone => None,
    };
    let levels = super::parse_list(&a.clients, "--clients", "client count")?;
    if let Some(&c) = levels.iter().find(|&&c| c == 0 || c as usize > MAX_CLIENTS) {
        return Err(Error::request(format!("--clients: {c} is not in 1..={MAX_CLIENTS}")));
    }
    if a.requests_per_client == 0 || a.prompt_tokens == 0 || a.max_tokens == 0 {
        return Err(Error::request("--requests-per-client, --prompt-tokens and --max-tokens must be positive"));
    }
    if a.requests_per_client > MAX_REQUESTS_PER_CLIENT {
        return Err(Error::request(format!("--requests-per-client: at most {MAX_REQUESTS_PER_CLIENT}")));
    }
    let extra_body = match a.extra_body.as_deref() {
        None => serde_json::Map::new(),
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(_) => return Err(Error::request("--extra-body: expected a JSON object")),
            Err(e) => return Err(Error::request(format!("--extra-body: not valid JSON: {e}"))),
        },
    };
    crate::serve::loadgen::check_extra_body(&extra_body)
        .map_err(|e| Error::request(format!("--extra-body: {}", e.detail())))?;
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
        bos: 128000,
        model: String::new(),
        api_key: if a.url.is_some() { api_key(a.api_key.as_deref())? } else { None },
        extra_body,
    };
    // Prints a level's report; a level where no request succeeded measured nothing, and is kept in `failed` for
    // the verdict after every level's report (no_failed_level).
    let report = |c: u32, r: &crate::serve::loadgen::LoadResult, base: &LoadOptions, failed: &mut Vec<_>| {
        if r.ok == 0 {
            failed.push((c, r.first_error.clone()));
        }
        let mut v = serde_json::to_value(r).unwrap_or_default();
        v["prompt_tokens"] = base.prompt_tokens.into();
        v["max_tokens"] = base.max_tokens.into();
        v["requests_per_client"] = base.requests_per_client.into();
        if !base.extra_body.is_empty() {
            v["extra_body"] = serde_json::Value::Object(base.extra_body.clone());
        }
        outln!("{v}")
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
        // The prompts are random token ids: inside the served model's vocabulary (from --model's config.json when
        // given, else Llama 3.2's), led by its BOS.
        if let Some(dir) = &a.model.model {
            let cfg = if crate::vision::pipeline::is_mllama_dir(dir) {
                crate::vision::config::MllamaConfig::from_model_dir(dir)?.text.base
            } else {
                super::load::resolve_config(&a.model)?.0
            };
            base.vocab = cfg.vocab_size.min(128000) as u32;
            base.bos = cfg.bos_token_id.filter(|&b| (b as usize) < cfg.vocab_size).unwrap_or(0);
        }
        let mut failed_levels = Vec::new();
        for &c in &levels {
            let r = rt.block_on(run_load(&LoadOptions { clients: c as usize, ..base.clone() }));
            report(c, &r, &base, &mut failed_levels)?;
        }
        return no_failed_level(&failed_levels);
    }
    let (engine, ctx) = start_engine(&a.model, &a.engine, lead)?;
    base.vocab = ctx.info.config.vocab_size.min(128000) as u32;
    // The model's own BOS where it has one inside its vocabulary (a small test model's 128000 would be refused).
    let vocab = ctx.info.config.vocab_size;
    base.bos = ctx.info.config.bos_token_id.filter(|&b| (b as usize) < vocab).unwrap_or(0);
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
        let mut failed_levels = Vec::new();
        for &c in &levels {
            let r = run_load(&LoadOptions { clients: c as usize, ..base.clone() }).await;
            report(c, &r, &base, &mut failed_levels)?;
        }
        let _ = stop_tx.send(());
        server.await.map_err(|e| Error::Backend(format!("server task: {e}")))??;
        no_failed_level(&failed_levels)
    })
}

/// The most concurrent clients of one `bench-serve` level (each holds a connection, and a loopback host has about
/// 28,000 ephemeral ports).
const MAX_CLIENTS: usize = 16384;

/// The most requests per client and level.
const MAX_REQUESTS_PER_CLIENT: usize = 1 << 20;

/// `bench-serve --url` measures a server started elsewhere: the flags that would configure a local model or engine
/// have no effect there, so they are refused rather than ignored. `--model DIR` is allowed (its config.json gives
/// the vocabulary of the random prompts).
fn check_url_mode(m: &ModelArgs, e: &EngineArgs) -> Result<()> {
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        m: ModelArgs,
        #[command(flatten)]
        e: EngineArgs,
    }
    let Defaults { m: dm, e: defaults } = <Defaults as clap::Parser>::try_parse_from(["bench-serve"])
        .map_err(|err| Error::Backend(format!("flag defaults: {err}")))?;
    let given = [
        ("--preset", m.preset.is_some()),
        ("--random-weights", m.random_weights),
        ("--weights-seed", m.weights_seed != dm.weights_seed),
        ("--tokenizer", m.tokenizer.is_some()),
        ("--device", m.device != dm.device),
        ("--kv-tokens", m.kv_tokens.is_some()),
        ("--block-size", m.block_size != dm.block_size),
        ("--gpu-memory-utilization", m.gpu_memory_utilization != dm.gpu_memory_utilization),
        ("--cuda-graph-max-batch", m.cuda_graph_max_batch != dm.cuda_graph_max_batch),
        ("--no-skinny-gemm", m.no_skinny_gemm),
        ("--no-fused-swiglu", m.no_fused_swiglu),
        ("--fused-rope", m.fused_rope),
        ("--fused-norm", m.fused_norm),
        ("--persistent-decode", m.persistent_decode),
        ("--quantize", m.quantize.is_some()),
        ("--embeddings", m.embeddings != dm.embeddings),
        ("--cross-attention-tiles", e.cross_attention_tiles != defaults.cross_attention_tiles),
        ("--tensor-parallel", e.tensor_parallel != defaults.tensor_parallel),
        ("--devices", e.devices.is_some()),
        ("--nnodes", e.nnodes != defaults.nnodes),
        ("--max-model-len", e.max_model_len.is_some()),
        ("--max-waiting", e.max_waiting != defaults.max_waiting),
        ("--max-num-seqs", e.max_num_seqs != defaults.max_num_seqs),
        ("--max-num-batched-tokens", e.max_num_batched_tokens != defaults.max_num_batched_tokens),
        ("--scheduling-policy", e.scheduling_policy != defaults.scheduling_policy),
    ];
    let set: Vec<&str> = given.iter().filter(|(_, on)| *on).map(|(f, _)| *f).collect();
    if set.is_empty() {
        return Ok(());
    }
    Err(Error::request(format!(
        "--url measures a running server: {} configure a local engine and would be ignored (start the server with them)",
        set.join(", ")
    )))
}

/// bench-serve's verdict: an error naming the first client level at which no request succeeded (it measured
/// nothing), after every level's report was printed.
fn no_failed_level(failed: &[(u32, Option<String>)]) -> Result<()> {
    match failed.first() {
        None => Ok(()),
        Some((c, e)) => Err(Error::Backend(format!(
            "bench-serve: no request succeeded at {c} client(s) ({} level(s) in all); first error: {}",
            failed.len(),
            e.as_deref().unwrap_or("unknown")
        ))),
    }
}
