//! The `llama32` command line: `logits`, `generate`, `tokenize`, `render`, `info`, `bench`, `serve` and `batch`.

mod load;
mod plan;
mod quant_eval;
mod quantize;
mod serve;
mod vision;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

use crate::chat_template::{ChatRequest, ChatTemplate, RenderOptions};
use crate::exec::generate::{score, GenRequest, Generation};
use crate::exec::Executor;
use crate::kv::prefix::KvManager;
use crate::sampling::SamplingParams;
use crate::sched::{run_to_completion, Scheduler, SchedulerConfig};
use crate::tokenizer::{EncodeOptions, Tokenizer};
use crate::{Error, Result};

pub use load::{load_model, Device, LoadedModel};
pub use plan::PlanArgs;
pub use quant_eval::QuantEvalArgs;
pub use quantize::QuantizeArgs;
pub use serve::{BatchArgs, BenchServeArgs, EngineArgs, ServeArgs};

/// Top-level command line.
#[derive(Debug, Parser)]
#[command(name = "llama32", version, about = "Inference engine for Meta's Llama 3.2 family")]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write float32 logits [T, vocab] for a list of token ids as .npy.
    Logits(LogitsArgs),
    /// Generate text or ids from a prompt.
    Generate(GenerateArgs),
    /// Print the token ids of a text as JSON.
    Tokenize(TokenizeArgs),
    /// Print the prompt an OpenAI chat-completions request renders to.
    Render(RenderArgs),
    /// Print the parameter count and the memory plan.
    Info(ModelArgs),
    /// Time prefill and decode on the chosen model (use --random-weights at a preset's real shapes).
    Bench(BenchArgs),
    /// Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics).
    Serve(ServeArgs),
    /// Run an OpenAI batch file (JSON lines) offline, resumably, writing results in input order.
    Batch(BatchArgs),
    /// Time to first token, inter-token latency and throughput at several numbers of streaming clients.
    BenchServe(BenchServeArgs),
    /// Quantize a checkpoint's projections to 4 bits (w4a16-g32 or w4a8-g32) into a new checkpoint directory.
    Quantize(QuantizeArgs),
    /// Measure a quantization scheme's logit error and greedy-token agreement against the unquantized model.
    QuantEval(QuantEvalArgs),
    /// Print a tensor-parallel plan: bytes per rank, KV capacity, all-reduce volume and predicted speed.
    Plan(PlanArgs),
}

/// Where the model comes from.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Built-in architecture (1b, 3b; 11b-vision and 90b-vision for `info`) with generated weights; the default is
    /// 1b when --model is absent.
    #[arg(long)]
    pub preset: Option<String>,
    /// Use random weights at the model's real shapes instead of the checkpoint's (for benchmarking).
    #[arg(long)]
    pub random_weights: bool,
    /// Seed for --random-weights.
    #[arg(long, default_value_t = 0)]
    pub weights_seed: u64,
    /// Tokenizer file (tokenizer.json or tiktoken tokenizer.model); defaults to the model directory's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Execution device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Tokens of KV cache to allocate (default: enough for the request).
    #[arg(long)]
    pub kv_tokens: Option<usize>,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Fraction of GPU memory to use for weights, KV cache and workspaces (CUDA only).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f32,
    /// Decode steps of up to this many sequences replay CUDA graphs (0 turns graphs off).
    #[arg(long, default_value_t = 256)]
    pub cuda_graph_max_batch: usize,
    /// Use cuBLASLt for every projection, not the skinny GEMM kernel for decode-sized batches (CUDA only).
    #[arg(long)]
    pub no_skinny_gemm: bool,
    /// Quantize the projections at load time (w4a16-g32 or w4a8-g32), e.g. with --random-weights for benchmarks.
    /// A checkpoint written by `llama32 quantize` is detected from its config.json and needs no flag.
    #[arg(long)]
    pub quantize: Option<String>,
}

/// `llama32 logits`.
#[derive(Debug, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long)]
    ids: String,
    /// Output .npy path.
    #[arg(long)]
    out: PathBuf,
    /// Image file (JPEG, PNG, WebP) for a Llama 3.2 Vision model, one per `<|image|>` id (repeatable).
    #[arg(long)]
    image: Vec<PathBuf>,
    /// Run as this many tensor-parallel ranks (1 = no tensor parallelism): in-process ranks on --device cpu; on
    /// --device cuda[:K] (text models) rank r runs on GPU K + r, or on --devices.
    #[arg(long, default_value_t = 1)]
    tensor_parallel: usize,
    /// CUDA devices of the ranks when --tensor-parallel N > 1 on CUDA, e.g. 0,1 or cuda:2,cuda:3 (rank r runs on
    /// entry r mod the count, so `--devices 0` puts every rank on GPU 0). Default: cuda:K..K+N-1 for --device cuda:K.
    #[arg(long)]
    devices: Option<String>,
}

/// `llama32 generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text (tokenized with BOS; with --chat, sent as one user message).
    #[arg(long, conflicts_with = "ids")]
    prompt: Option<String>,
    /// Comma-separated prompt token ids, used as given.
    #[arg(long)]
    ids: Option<String>,
    /// Render the prompt through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System prompt for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Top-k cutoff (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Min-p cutoff (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Frequency penalty (0 = off).
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Presence penalty (0 = off).
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Sampling seed (reproducible output).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print {"ids": [...], "text": "..."} instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Image file (JPEG, PNG, WebP) for a Llama 3.2 Vision model (repeatable). Without `<|image|>` in the prompt,
    /// one is put before it per image.
    #[arg(long)]
    image: Vec<PathBuf>,
}

/// `llama32 tokenize`.
#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// Model directory holding the tokenizer.
    #[arg(long, required_unless_present = "tokenizer")]
    model: Option<PathBuf>,
    /// Tokenizer file (tokenizer.json or tokenizer.model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Text to tokenize.
    #[arg(long)]
    text: String,
    /// Parse special-token strings such as <|eot_id|> into their ids.
    #[arg(long)]
    special: bool,
    /// Prepend <|begin_of_text|>.
    #[arg(long)]
    bos: bool,
}

/// `llama32 render`.
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Model directory holding the chat template.
    #[arg(long)]
    model: PathBuf,
    /// OpenAI chat-completions request body (JSON file; `-` for stdin).
    #[arg(long)]
    request: PathBuf,
    /// Date for the template's `date_string`, e.g. "26 Nov 2026".
    #[arg(long)]
    date: Option<String>,
    /// Leave out the assistant header at the end.
    #[arg(long)]
    no_generation_prompt: bool,
}

/// `llama32 bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Generated tokens per sequence.
    #[arg(long, default_value_t = 16)]
    gen_tokens: usize,
    /// Sequences decoded together; a comma list (e.g. 1,16,64) runs each, printing one JSON line per run.
    #[arg(long, default_value = "1")]
    batch: String,
    /// Tensor-parallel ranks; a comma list (e.g. 1,2,4) runs each with every --batch. On the CPU the ranks are
    /// in-process threads; on CUDA they run on --devices.
    #[arg(long, default_value = "1")]
    tensor_parallel: String,
    /// CUDA devices of the ranks when tp > 1, e.g. 0,1,2,3 or cuda:0,cuda:1 (rank r runs on entry r mod the
    /// count). Default: cuda:K..K+tp-1 for --device cuda:K when that many devices are visible, else cuda:K for all
    /// ranks.
    #[arg(long)]
    devices: Option<String>,
    /// Communicator of CUDA ranks when tp > 1: nccl, host-staged, or auto (nccl when every rank has its own
    /// device, host-staged when ranks share one).
    #[arg(long, default_value = "auto")]
    tp_comm: String,
    /// Append each result line (JSON) to this file as well.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Milliseconds between NVML telemetry samples (CUDA only).
    #[arg(long, default_value_t = 50)]
    telemetry_interval_ms: u64,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
}

/// Parses a comma-separated id list, naming the bad item.
pub fn parse_ids(s: &str, flag: &str) -> Result<Vec<u32>> {
    let ids: Vec<u32> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u32>().map_err(|_| Error::request(format!("{flag}: `{t}` is not a token id"))))
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        return Err(Error::request(format!("{flag}: no token ids given")));
    }
    Ok(ids)
}

/// Runs the command line and returns the process exit code.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Logits(a) => cmd_logits(a),
        Command::Generate(a) => cmd_generate(a),
        Command::Tokenize(a) => cmd_tokenize(a),
        Command::Render(a) => cmd_render(a),
        Command::Info(a) => cmd_info(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Serve(a) => serve::cmd_serve(a),
        Command::Batch(a) => serve::cmd_batch(a),
        Command::BenchServe(a) => serve::cmd_bench_serve(a),
        Command::Quantize(a) => quantize::cmd_quantize(a),
        Command::QuantEval(a) => quant_eval::cmd_quant_eval(a),
        Command::Plan(a) => plan::cmd_plan(a),
    }
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let ids = parse_ids(&a.ids, "--ids")?;
    let tp = a.tensor_parallel;
    serve::check_tensor_parallel(tp, &a.model.device, a.devices.as_deref())?;
    if let Some(dir) = vision::vision_dir(&a.model, !a.image.is_empty())? {
        serve::check_vision_tensor_parallel(tp, &a.model.device)?;
        if tp > 1 {
            return vision::logits_tp(&a.model, &dir, &ids, &a.image, &a.out, tp);
        }
        return vision::logits(&a.model, &dir, &ids, &a.image, &a.out);
    }
    let mut exec: Box<dyn Executor> = if tp > 1 {
        let kv_tokens = a.model.kv_tokens.unwrap_or(ids.len()).max(ids.len());
        match Device::parse(&a.model.device)? {
            Device::Cpu => Box::new(serve::tp_cpu_executor(&a.model, tp, kv_tokens)?),
            Device::Cuda(_) => {
                let ranks = serve::CudaRanks {
                    devices: a.devices.as_deref(),
                    comm: "auto",
                    share_when_short: false,
                    kv_tokens: Some(kv_tokens),
                    min_tokens: ids.len(),
                };
                let m = serve::tp_cuda_executor(&a.model, tp, &ranks)?;
                eprintln!("loaded {} as {tp} tensor-parallel CUDA ranks on {}", m.source_desc, m.device_name);
                Box::new(m.exec)
            }
        }
    } else {
        load_model(&a.model, ids.len())?.exec
    };
    let vocab = exec.config().vocab_size;
    let logits = score(exec.as_mut(), &ids, 512)?;
    crate::npy::write_f32(&a.out, &[ids.len(), vocab], &logits)?;
    eprintln!("wrote logits [{}, {vocab}] to {}", ids.len(), a.out.display());
    Ok(())
}

fn load_tokenizer(model: &ModelArgs) -> Result<Option<Tokenizer>> {
    if let Some(t) = &model.tokenizer {
        return Tokenizer::from_file(t).map(Some);
    }
    if let Some(dir) = &model.model {
        // A checkpoint without a tokenizer can still run on token ids.
        let files = ["tokenizer.json", "tokenizer.model", "original/tokenizer.model"];
        if !files.iter().any(|f| dir.join(f).exists()) {
            return Ok(None);
        }
        return Tokenizer::from_model_dir(dir).map(Some);
    }
    // A preset: use the real Llama 3 tokenizer when the test data names one.
    if let Some(data) = std::env::var_os("LLAMA32_TEST_DATA") {
        let p = PathBuf::from(data).join("tokenizer.model");
        if p.exists() {
            return Tokenizer::from_file(&p).map(Some);
        }
    }
    Ok(None)
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    if let Some(dir) = vision::vision_dir(&a.model, !a.image.is_empty())? {
        return vision::generate(&a, &dir);
    }
    load::resolve_config(&a.model)?; // Fail fast on a bad --model before reading the tokenizer.
    let tok = load_tokenizer(&a.model)?;
    let prompt = build_prompt(&a, tok.as_ref(), 0, None)?;
    let params = sampling_params(&a);
    let mut m = load_model(&a.model, prompt.len() + a.max_tokens)?;
    if tok.is_none() && !a.stop.is_empty() {
        return Err(Error::request("--stop needs a tokenizer to see text"));
    }
    let mut decoder = tok.as_ref().map(|t| t.stream_decoder(true));
    let mut detok = |_seq: usize, id: u32| -> Result<String> {
        match decoder.as_mut() {
            Some(d) => d.push(id),
            None => Ok(String::new()),
        }
    };
    let json = a.json;
    let mut on_text = |_seq: usize, s: &str| {
        if !json {
            print!("{s}");
            let _ = std::io::stdout().flush();
        }
    };
    let t0 = Instant::now();
    let reqs = [GenRequest { prompt: prompt.clone(), params }];
    let out = run_scheduled(m.exec.as_mut(), &m.eos_ids, &reqs, 512, &mut detok, &mut on_text)?;
    let secs = t0.elapsed().as_secs_f64();
    print_generation(json, tok.is_some(), &out[0], prompt.len(), secs);
    Ok(())
}

/// The end of `generate`'s output: the JSON object (`--json`), or a newline after the streamed text (the ids when
/// there is no tokenizer); then the timing line on stderr.
fn print_generation(json: bool, has_tokenizer: bool, g: &Generation, prompt_len: usize, secs: f64) {
    if json {
        let text = if has_tokenizer { serde_json::Value::from(g.text.clone()) } else { serde_json::Value::Null };
        println!("{}", serde_json::json!({"ids": g.ids, "text": text, "finish_reason": g.finish.as_str()}));
    } else {
        if !has_tokenizer {
            print!("(no tokenizer: generated ids) {:?}", g.ids);
        }
        println!();
    }
    eprintln!(
        "{prompt_len} prompt + {} generated tokens in {secs:.2} s ({:.2} tok/s overall), finish_reason={}",
        g.ids.len(),
        g.ids.len() as f64 / secs,
        g.finish
    );
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = match (&a.tokenizer, &a.model) {
        (Some(t), _) => Tokenizer::from_file(t)?,
        (None, Some(dir)) => Tokenizer::from_model_dir(dir)?,
        (None, None) => return Err(Error::request("pass --model DIR or --tokenizer FILE")),
    };
    let ids = tok.encode(&a.text, EncodeOptions { add_bos: a.bos, parse_special: a.special })?;
    println!("{}", serde_json::json!({ "ids": ids }));
    Ok(())
}

fn cmd_render(a: RenderArgs) -> Result<()> {
    let body = if a.request.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|e| Error::io("<stdin>", e))?;
        s
    } else {
        std::fs::read_to_string(&a.request).map_err(|e| Error::io(&a.request, e))?
    };
    let req = ChatRequest::from_json(&body).map_err(|e| Error::request(format!("{}: {e}", a.request.display())))?;
    let template = ChatTemplate::from_model_dir(&a.model)?;
    let opts = RenderOptions { add_generation_prompt: !a.no_generation_prompt, date_string: a.date.clone() };
    print!("{}", template.render(&req, &opts)?);
    Ok(())
}

fn cmd_info(a: ModelArgs) -> Result<()> {
    if let Some(info) = vision::info(&a)? {
        println!("{}", serde_json::to_string_pretty(&info).unwrap_or_default());
        return Ok(());
    }
    let (cfg, source) = load::resolve_config(&a)?;
    let params = cfg.num_parameters();
    let ckpt_bytes = match &source {
        load::Source::Dir(dir) if !a.random_weights => {
            Some(crate::weights::Checkpoint::open(dir).map(|c| c.total_bytes())?)
        }
        _ => None,
    };
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let ctx = cfg.max_position_embeddings;
    let info = serde_json::json!({
        "source": source.describe(),
        "architecture": {
            "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_word_embeddings, "max_position_embeddings": ctx,
            "rope": format!("{:?}", cfg.rope),
        },
        "parameters": params,
        "quantization": load::quantization_info(&a, &cfg, &source)?,
        "memory_plan": {
            "checkpoint_bytes": ckpt_bytes,
            "weights_bf16_gib": gib(params as f64 * 2.0),
            "weights_cpu_f32_gib": gib(params as f64 * 4.0),
            "kv_bytes_per_token_bf16": cfg.kv_bytes_per_token(2),
            "kv_bytes_per_token_cpu_f32": cfg.kv_bytes_per_token(4),
            "kv_full_context_bf16_gib": gib(cfg.kv_bytes_per_token(2) as f64 * ctx as f64),
        },
    });
    println!("{}", serde_json::to_string_pretty(&info).unwrap_or_default());
    Ok(())
}

/// Parses a comma list of positive integers for `flag`, naming the bad item.
fn parse_counts(s: &str, flag: &str) -> Result<Vec<usize>> {
    let v: Vec<usize> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| match t.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::request(format!("{flag}: `{t}` is not a positive integer"))),
        })
        .collect::<Result<_>>()?;
    if v.is_empty() {
        return Err(Error::request(format!("{flag}: no values given")));
    }
    Ok(v)
}

/// Parses `--devices` (`0,1` or `cuda:0,cuda:1`) into CUDA ordinals.
fn parse_devices(s: &str) -> Result<Vec<usize>> {
    let v: Vec<usize> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let n = t.strip_prefix("cuda:").unwrap_or(t);
            n.parse::<usize>()
                .map_err(|_| Error::request(format!("--devices: `{t}` is not a CUDA device (N or cuda:N)")))
        })
        .collect::<Result<_>>()?;
    if v.is_empty() {
        return Err(Error::request("--devices: no devices given"));
    }
    Ok(v)
}

/// One model loaded for a tensor-parallel degree of the bench sweep.
struct BenchModel {
    exec: Box<dyn Executor>,
    device_name: String,
    source_desc: String,
    load_secs: f64,
    /// The CUDA devices the ranks run on (empty on the CPU).
    gpus: Vec<usize>,
}

/// Loads the model of `a` as `tp` ranks with KV room for `kv_tokens` tokens (per rank).
fn bench_model(
    a: &BenchArgs,
    model_args: &ModelArgs,
    tp: usize,
    kv_tokens: usize,
    min_tokens: usize,
) -> Result<BenchModel> {
    let device = Device::parse(&a.model.device)?;
    if tp == 1 {
        let m = load_model(model_args, min_tokens)?;
        let gpus = match device {
            Device::Cuda(o) => vec![o],
            Device::Cpu => Vec::new(),
        };
        return Ok(BenchModel {
            exec: m.exec,
            device_name: m.device_name,
            source_desc: m.source_desc,
            load_secs: m.load_secs,
            gpus,
        });
    }
    if device == Device::Cpu {
        let (_, source) = load::resolve_config(model_args)?;
        let mut desc = source.describe();
        if model_args.random_weights {
            desc.push_str(" with random weights");
        }
        let t0 = Instant::now();
        let exec = serve::tp_cpu_executor(model_args, tp, kv_tokens)?;
        return Ok(BenchModel {
            exec: Box::new(exec),
            device_name: format!("cpu ({} threads)", rayon::current_num_threads()),
            source_desc: desc,
            load_secs: t0.elapsed().as_secs_f64(),
            gpus: Vec::new(),
        });
    }
    let ranks = serve::CudaRanks {
        devices: a.devices.as_deref(),
        comm: &a.tp_comm,
        share_when_short: true,
        kv_tokens: model_args.kv_tokens,
        min_tokens,
    };
    let m = serve::tp_cuda_executor(model_args, tp, &ranks)?;
    Ok(BenchModel {
        exec: Box::new(m.exec),
        device_name: m.device_name,
        source_desc: m.source_desc,
        load_secs: m.load_secs,
        gpus: m.gpus,
    })
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let batches = parse_counts(&a.batch, "--batch")?;
    let tps = parse_counts(&a.tensor_parallel, "--tensor-parallel")?;
    if a.prompt_tokens == 0 {
        return Err(Error::request("--prompt-tokens and --batch must be positive"));
    }
    let device = Device::parse(&a.model.device)?;
    // Fail before loading anything on a bad placement flag or when a degree cannot shard the model.
    if let Some(d) = &a.devices {
        parse_devices(d)?;
    }
    serve::tp_comm_kind(&a.tp_comm, &[])?;
    let (cfg, _) = load::resolve_config(&a.model)?;
    for &tp in &tps {
        if tp > 1 {
            crate::tp::TpPlan::new(&cfg, tp)?;
        }
    }
    let total = a.prompt_tokens + a.gen_tokens;
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let kv_tokens = a.model.kv_tokens.unwrap_or(total * max_batch + 64);
    let model_args = ModelArgs { kv_tokens: Some(kv_tokens), ..a.model.clone() };
    let mut json_out = match &a.json_out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::request(format!("--json-out {}: {e}", p.display())))?,
        ),
        None => None,
    };
    for &tp in &tps {
        let mut m = bench_model(&a, &model_args, tp, kv_tokens, total)?;
        let telemetry = match device {
            Device::Cuda(_) => {
                let interval = std::time::Duration::from_millis(a.telemetry_interval_ms.max(1));
                let t = crate::telemetry::Telemetry::start(&m.gpus, interval);
                if let crate::telemetry::Telemetry::Unavailable(why) = &t {
                    eprintln!("GPU telemetry unavailable: {why}");
                }
                Some(t)
            }
            Device::Cpu => None,
        };
        for &batch in &batches {
            let out = bench_one(&a, &mut m, tp, batch, telemetry.as_ref())?;
            let line = out.to_string();
            println!("{line}");
            std::io::stdout().flush().ok();
            if let (Some(f), Some(p)) = (json_out.as_mut(), &a.json_out) {
                writeln!(f, "{line}").map_err(|e| Error::request(format!("--json-out {}: {e}", p.display())))?;
            }
        }
    }
    Ok(())
}

/// Times prefill and decode of `batch` sequences on `m` (`tp` ranks); the result line. With `telemetry`, adds each
/// GPU's window summary over the full run and the energy per generated token.
fn bench_one(
    a: &BenchArgs,
    m: &mut BenchModel,
    tp: usize,
    batch: usize,
    telemetry: Option<&crate::telemetry::Telemetry>,
) -> Result<serde_json::Value> {
    use crate::telemetry::Telemetry;
    let vocab = m.exec.config().vocab_size as u32;
    let reqs: Vec<GenRequest> = (0..batch)
        .map(|b| GenRequest {
            prompt: (0..a.prompt_tokens).map(|i| ((i * 7919 + b * 104729) as u32 % (vocab - 1)) + 1).collect(),
            params: SamplingParams {
                max_tokens: a.gen_tokens,
                ignore_eos: true,
                temperature: a.temperature,
                top_p: a.top_p,
                seed: Some(b as u64),
                ..SamplingParams::greedy()
            },
        })
        .collect();
    // Prefill alone (one token generated), then the full run; decode time is the difference.
    let prefill_reqs: Vec<GenRequest> = reqs
        .iter()
        .map(|r| GenRequest { prompt: r.prompt.clone(), params: SamplingParams { max_tokens: 1, ..r.params.clone() } })
        .collect();
    let (mut nodetok, mut notext) = (|_: usize, _: u32| Ok(String::new()), |_: usize, _: &str| {});
    // Warm-up (first-call costs: module loading, GEMM heuristics, allocator pools) stays out of the figures.
    let warm: Vec<GenRequest> = reqs
        .iter()
        .map(|r| GenRequest { prompt: r.prompt.clone(), params: SamplingParams { max_tokens: 3, ..r.params.clone() } })
        .collect();
    run_scheduled(m.exec.as_mut(), &[], &warm, 2048, &mut nodetok, &mut notext)?;
    let sampler = match telemetry {
        Some(Telemetry::Sampling(s)) => Some(s),
        _ => None,
    };
    let mark = |fallback: Instant| sampler.map_or(fallback, |s| s.mark());
    let p0 = mark(Instant::now());
    let t0 = Instant::now();
    run_scheduled(m.exec.as_mut(), &[], &prefill_reqs, 2048, &mut nodetok, &mut notext)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let p1 = mark(Instant::now());
    let t1 = Instant::now();
    run_scheduled(m.exec.as_mut(), &[], &reqs, 2048, &mut nodetok, &mut notext)?;
    let full_s = t1.elapsed().as_secs_f64();
    let f1 = mark(Instant::now());
    let decode_steps = a.gen_tokens.saturating_sub(1).max(1) as f64;
    let decode_s = (full_s - prefill_s).max(0.0);
    let mut out = serde_json::json!({
        "device": m.device_name,
        "threads": rayon::current_num_threads(),
        "model": m.source_desc,
        "batch": batch, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
        "temperature": a.temperature, "top_p": a.top_p,
        "load_s": m.load_secs,
        "prefill_s": prefill_s,
        "prefill_tok_per_s": (batch * a.prompt_tokens) as f64 / prefill_s,
        "decode_ms_per_step": decode_s * 1e3 / decode_steps,
        "decode_tok_per_s": batch as f64 * decode_steps / decode_s.max(1e-9),
        "total_s": full_s,
        "output_tok_per_s": (batch * a.gen_tokens) as f64 / full_s,
        "tp": tp,
    });
    let tele = match telemetry {
        None => None,
        Some(Telemetry::Unavailable(why)) => Some(serde_json::json!({ "unavailable": why })),
        Some(Telemetry::Sampling(s)) => {
            let prefill = s.window(p0, p1);
            let full = s.window(p1, f1);
            s.forget_before(f1);
            // Each window's energy comes only from its own samples, or is null with the reason in "note" (windows
            // shorter than a few sampling intervals or energy counter updates get none).
            let e = crate::telemetry::run_energy(
                &prefill,
                &full,
                batch * a.gen_tokens,
                batch * a.gen_tokens.saturating_sub(1),
            );
            Some(serde_json::json!({
                "interval_ms": a.telemetry_interval_ms.max(1),
                "prefill_window_s": p1.saturating_duration_since(p0).as_secs_f64(),
                "window_s": f1.saturating_duration_since(p1).as_secs_f64(),
                "energy_j": e.energy_j,
                "j_per_token": e.j_per_token,
                "prefill_energy_j": e.prefill_energy_j,
                "decode_j_per_token": e.decode_j_per_token,
                "decode_rel_uncertainty": e.decode_rel_uncertainty,
                "window_too_short": e.window_too_short,
                "note": e.note,
                "gpus": full,
                "prefill_gpus": prefill,
            }))
        }
    };
    if let (Some(t), Some(obj)) = (tele, out.as_object_mut()) {
        obj.insert("telemetry".into(), t);
    }
    Ok(out)
}

/// Runs `reqs` to completion through the serving [`Scheduler`] (continuous batching, chunked prefill of at most
/// `max_step_tokens` tokens per step, prefix caching) and returns their generations in request order. `on_text`
/// sees each request's text as it becomes final.
pub fn run_scheduled(
    exec: &mut dyn Executor,
    eos_ids: &[u32],
    reqs: &[GenRequest],
    max_step_tokens: usize,
    detok: &mut dyn FnMut(usize, u32) -> Result<String>,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    let mut cfg = SchedulerConfig::new(exec.config(), max_step_tokens, reqs.len().max(1));
    cfg.eos_ids = eos_ids.to_vec();
    let kv = KvManager::new(exec.num_blocks(), exec.block_size())?;
    let mut sched = Scheduler::new(cfg, kv)?;
    let mut index = std::collections::HashMap::new();
    for (i, r) in reqs.iter().enumerate() {
        let id = sched.add_request(r.prompt.clone(), r.params.clone(), 0).map_err(|e| match e {
            Error::Request(m) if reqs.len() > 1 => Error::request(format!("sequence {i}: {m}")),
            other => other,
        })?;
        index.insert(id, i);
    }
    let idx = |seq: crate::kv::prefix::SeqId| index.get(&seq).copied().unwrap_or(usize::MAX);
    let mut detok_i = |seq: crate::kv::prefix::SeqId, id: u32| detok(idx(seq), id);
    let mut on_update = |u: &crate::sched::StepUpdate| {
        for (seq, text) in &u.deltas {
            on_text(idx(*seq), text);
        }
    };
    let done = run_to_completion(&mut sched, exec, &mut detok_i, &mut on_update)?;
    Ok(done.into_iter().map(|(_, g)| g).collect())
}

/// The prompt ids of `generate`: `--ids` as given, `--prompt` tokenized (with `--chat`, rendered through the model's
/// chat template with `images` image parts before the text), or a built-in prompt.
fn build_prompt(
    a: &GenerateArgs,
    tok: Option<&Tokenizer>,
    images: usize,
    image_token: Option<u32>,
) -> Result<Vec<u32>> {
    let encode_special = |tok: &Tokenizer, text: &str| match image_token {
        Some(id) => crate::vision::pipeline::encode_with_images(tok, text, id),
        None => tok.encode(text, EncodeOptions { add_bos: false, parse_special: true }),
    };
    Ok(match (&a.prompt, &a.ids) {
        (_, Some(ids)) => parse_ids(ids, "--ids")?,
        (Some(text), None) => {
            let tok = tok.ok_or_else(|| {
                Error::request("--prompt needs a tokenizer: pass --model DIR with one, or --tokenizer FILE")
            })?;
            if a.chat {
                let dir = a.model.model.as_ref().ok_or_else(|| Error::request("--chat needs --model DIR"))?;
                let template = ChatTemplate::from_model_dir(dir)?;
                let mut messages = Vec::new();
                if let Some(sys) = &a.system {
                    messages.push(serde_json::json!({"role": "system", "content": sys}));
                }
                let content = if images == 0 {
                    serde_json::json!(text)
                } else {
                    let mut parts = vec![serde_json::json!({"type": "image"}); images];
                    parts.push(serde_json::json!({"type": "text", "text": text}));
                    serde_json::Value::Array(parts)
                };
                messages.push(serde_json::json!({"role": "user", "content": content}));
                let req = ChatRequest::from_json(&serde_json::json!({ "messages": messages }).to_string())?;
                let rendered = template.render(&req, &RenderOptions::default())?;
                encode_special(tok, &rendered)?
            } else if images > 0 {
                // As in the model card: "<|image|><|begin_of_text|>text", unless the text places its images itself.
                let text = if text.contains("<|image|>") {
                    text.clone()
                } else {
                    format!("{}<|begin_of_text|>{text}", "<|image|>".repeat(images))
                };
                encode_special(tok, &text)?
            } else {
                tok.encode(text, EncodeOptions { add_bos: true, parse_special: false })?
            }
        }
        (None, None) => {
            // "<|begin_of_text|>The capital of France is" in the Llama 3 vocabulary.
            eprintln!("no --prompt or --ids: using the built-in prompt \"The capital of France is\"");
            vec![128000, 791, 6864, 315, 9822, 374]
        }
    })
}

/// The sampling flags of `generate`.
fn sampling_params(a: &GenerateArgs) -> SamplingParams {
    SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        frequency_penalty: a.frequency_penalty,
        presence_penalty: a.presence_penalty,
        seed: a.seed,
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        stop_token_ids: Vec::new(),
        ignore_eos: a.ignore_eos,
    }
}
