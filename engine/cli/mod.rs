//! The `llama32` command line: `logits`, `generate`, `tokenize`, `render`, `info`, `bench`, `serve` and `batch`.

/// `println!` to stdout that returns an error naming stdout instead of panicking when stdout is closed (a pipe
/// into `head`) or full.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(|e| $crate::Error::io("<stdout>", e))
    }};
}

/// `print!` as [`outln!`] (flushed: it is used for streamed text).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        write!(o, $($arg)*).and_then(|()| o.flush()).map_err(|e| $crate::Error::io("<stdout>", e))
    }};
}

/// The largest token count a flag takes: 2^24, over a hundred times Llama 3.2's 128K context, so that sums and
/// products of such counts (KV sizes, buffers) cannot overflow into a small number that passes a later check.
pub(crate) const MAX_TOKENS_FLAG: u64 = 1 << 24;

/// The clap parser of a token-count flag (0..=[`MAX_TOKENS_FLAG`]).
pub(crate) fn token_count() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(0..=MAX_TOKENS_FLAG)
}

mod bench;
mod load;
mod plan;
mod quant_eval;
mod quantize;
mod serve;
mod vision;

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

use bench::parse_devices;
pub use bench::BenchArgs;
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
    /// Seed for random weights (--random-weights, or a --preset); 0 when absent.
    #[arg(long)]
    pub weights_seed: Option<u64>,
    /// Tokenizer file (tokenizer.json or tiktoken tokenizer.model); defaults to the model directory's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Execution device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Tokens of KV cache to allocate, at least one block (default: logits, generate and bench size it for the
    /// request; serve and batch take 16384 on the CPU and what --gpu-memory-utilization leaves on CUDA).
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
    /// Run SiLU * up as its own kernel after the decode gate_up projection instead of in that projection's epilogue
    /// (CUDA only; the same results, for ablations).
    #[arg(long)]
    pub no_fused_swiglu: bool,
    /// Apply RoPE and the KV-cache write in the epilogue of the decode QKV projection (bf16 skinny GEMM) instead of
    /// in a kernel of their own (CUDA text models only; the same results; off by default: slower as timed on an
    /// H100, 2026-11-27).
    #[arg(long)]
    pub fused_rope: bool,
    /// Run residual add + RMSNorm in the prologue of the decode QKV and gate_up projections (bf16 skinny GEMM)
    /// instead of in a kernel of its own (CUDA; text models, and the vision models' self-attention layers; the same
    /// results; off by default: slower as timed on an H100, 2026-11-27).
    #[arg(long)]
    pub fused_norm: bool,
    /// Run decode steps of up to 8 sequences through the persistent decode stack: every decoder layer in one
    /// launch, one block per SM, phases separated by grid barriers (CUDA; text models with bf16 or W4A16 projections
    /// on one GPU; the same results as the layers one by one with 8-warp skinny GEMM tiles and 8 W4A16 K splits; off
    /// by default: slower than the layers one by one as timed on an H200, 2026-11-28).
    #[arg(long)]
    pub persistent_decode: bool,
    /// Quantize the projections at load time (w4a16-g32 or w4a8-g32), e.g. with --random-weights for benchmarks.
    /// A checkpoint written by `llama32 quantize` is detected from its config.json and needs no flag.
    #[arg(long)]
    pub quantize: Option<String>,
    /// How to hold the token embedding and lm_head: bf16, or int8 with one scale per row (the numerics of
    /// `llama32 quantize --embeddings int8`, Meta's 8-bit option for its quantized models: half the bytes of the
    /// largest decode read of the small models). A checkpoint that stores int8 tables keeps them either way.
    #[arg(long, default_value = "bf16")]
    pub embeddings: String,
}

/// The largest `--block-size`: the paged kernels take any size, but a block holds one sequence's tokens only, so
/// larger blocks only waste KV memory (vLLM's CUDA sizes stop at 128).
pub const MAX_BLOCK_SIZE: usize = 1024;

impl ModelArgs {
    /// The seed of random weights (`--weights-seed`, 0 when absent).
    pub fn seed(&self) -> u64 {
        self.weights_seed.unwrap_or(0)
    }

    /// Refuses flag values no command can run with, before anything is loaded: a device that does not parse, a
    /// block size outside 1..=[`MAX_BLOCK_SIZE`], a `--kv-tokens` under one block, a `--gpu-memory-utilization`
    /// outside [0.05, 1], a `--tokenizer` that is not a file, and a `--weights-seed` with a `--model` whose own
    /// weights load (it would be ignored).
    pub fn check(&self) -> Result<()> {
        Device::parse(&self.device)?;
        if let (Some(seed), Some(dir), false) = (self.weights_seed, &self.model, self.random_weights) {
            return Err(Error::request(format!(
                "--weights-seed {seed}: {} loads its own weights; add --random-weights to replace them with random \
                 ones of that seed, or drop --weights-seed",
                dir.display()
            )));
        }
        if !(1..=MAX_BLOCK_SIZE).contains(&self.block_size) {
            return Err(Error::request(format!(
                "--block-size {}: must be in 1..={MAX_BLOCK_SIZE} tokens",
                self.block_size
            )));
        }
        if let Some(k) = self.kv_tokens.filter(|&k| k < self.block_size) {
            return Err(Error::request(format!(
                "--kv-tokens {k}: the KV cache must hold at least one block (--block-size {})",
                self.block_size
            )));
        }
        if !(0.05..=1.0).contains(&self.gpu_memory_utilization) {
            return Err(Error::request(format!(
                "--gpu-memory-utilization {}: must be in [0.05, 1]",
                self.gpu_memory_utilization
            )));
        }
        if let Some(t) = self.tokenizer.as_ref().filter(|t| !t.is_file()) {
            let why = if t.exists() { "not a regular file" } else { "no such file" };
            return Err(Error::request(format!("--tokenizer {}: {why}", t.display())));
        }
        Ok(())
    }
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
    /// --device cuda[:K] (text and Llama 3.2 Vision models) rank r runs on GPU K + r, or on --devices.
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
    #[arg(long, default_value_t = 64, value_parser = token_count())]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Top-k cutoff (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Min-p cutoff (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    /// Frequency penalty (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Presence penalty (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
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
    /// Print {"ids": [...], "text": "...", "finish_reason": "..."} instead of streaming text (text is null without
    /// a tokenizer).
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
    #[arg(long, required_unless_present = "tokenizer", conflicts_with = "tokenizer")]
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

/// Parses a comma-separated list of non-negative integers (`what`: "token id", "client count"), naming the bad
/// item: an empty item (`1,,2`) is an error, a trailing comma is not.
pub fn parse_list(s: &str, flag: &str, what: &str) -> Result<Vec<u32>> {
    let mut items: Vec<&str> = s.split(',').map(str::trim).collect();
    if items.len() > 1 && items.last() == Some(&"") {
        items.pop();
    }
    if items == [""] {
        return Err(Error::request(format!("{flag}: no {what}s given")));
    }
    let item = |(i, t): (usize, &&str)| {
        if t.is_empty() {
            return Err(Error::request(format!("{flag}: item {} of {} is empty", i + 1, items.len())));
        }
        t.parse::<u32>().map_err(|_| Error::request(format!("{flag}: `{t}` is not a {what}")))
    };
    items.iter().enumerate().map(item).collect()
}

/// Parses a comma-separated token id list, naming the bad item.
pub fn parse_ids(s: &str, flag: &str) -> Result<Vec<u32>> {
    parse_list(s, flag, "token id")
}

/// Runs the command line and returns the process exit code.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Logits(a) => cmd_logits(a),
        Command::Generate(a) => cmd_generate(a),
        Command::Tokenize(a) => cmd_tokenize(a),
        Command::Render(a) => cmd_render(a),
        Command::Info(a) => cmd_info(a),
        Command::Bench(a) => bench::cmd_bench(a),
        Command::Serve(a) => serve::cmd_serve(a),
        Command::Batch(a) => serve::cmd_batch(a),
        Command::BenchServe(a) => serve::cmd_bench_serve(a),
        Command::Quantize(a) => quantize::cmd_quantize(a),
        Command::QuantEval(a) => quant_eval::cmd_quant_eval(a),
        Command::Plan(a) => plan::cmd_plan(a),
    }
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    a.model.check()?;
    let ids = parse_ids(&a.ids, "--ids")?;
    crate::npy::check_output(&a.out)?; // before loading anything: a bad --out would waste the whole run

    let tp = a.tensor_parallel;
    serve::check_tensor_parallel(tp, &a.model.device, a.devices.as_deref())?;
    if let Some(dir) = vision::vision_dir(&a.model, !a.image.is_empty())? {
        serve::check_vision_tensor_parallel(tp, &a.model)?;
        if tp > 1 && Device::parse(&a.model.device)? != Device::Cpu {
            let ranks = (tp, a.devices.as_deref());
            return serve::vision_logits_tp_cuda(&a.model, &dir, &ids, &a.image, &a.out, ranks);
        }
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
    a.model.check()?;
    if a.system.is_some() && !a.chat {
        return Err(Error::request("--system is the system message of --chat: add --chat"));
    }
    if a.chat && a.prompt.is_none() {
        return Err(Error::request("--chat renders --prompt TEXT through the chat template: give --prompt"));
    }
    if let Some(dir) = vision::vision_dir(&a.model, !a.image.is_empty())? {
        return vision::generate(&a, &dir);
    }
    let (cfg, _) = load::resolve_config(&a.model)?; // Fail fast on a bad --model before reading the tokenizer.
    let tok = load_tokenizer(&a.model)?;
    let prompt = build_prompt(&a, tok.as_ref(), 0, None)?;
    let params = sampling_params(&a);
    // The cache holds what can run: prompt + new tokens, but never past the context, where generation stops anyway.
    let ctx = cfg.max_position_embeddings;
    if prompt.len() + a.max_tokens > ctx {
        eprintln!(
            "note: --max-tokens {} runs past the context length ({ctx} tokens, {} of them the prompt): at most {} \
             tokens can be generated (finish_reason `length`)",
            a.max_tokens,
            prompt.len(),
            ctx.saturating_sub(prompt.len())
        );
    }
    let mut m = load_model(&a.model, (prompt.len() + a.max_tokens).min(ctx))?;
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
            // A closed stdout shows at the final line below, which returns the error.
            let _ = out!("{s}");
        }
    };
    let t0 = Instant::now();
    let reqs = [GenRequest { prompt: prompt.clone(), params }];
    let out = run_scheduled(m.exec.as_mut(), &m.eos_ids, &reqs, 512, &mut detok, &mut on_text)?;
    let secs = t0.elapsed().as_secs_f64();
    print_generation(json, tok.is_some(), &out[0], prompt.len(), secs)?;
    Ok(())
}

/// The end of `generate`'s output: the JSON object (`--json`), or a newline after the streamed text (the ids when
/// there is no tokenizer); then the timing line on stderr.
fn print_generation(json: bool, has_tokenizer: bool, g: &Generation, prompt_len: usize, secs: f64) -> Result<()> {
    if json {
        let text = if has_tokenizer { serde_json::Value::from(g.text.clone()) } else { serde_json::Value::Null };
        outln!("{}", serde_json::json!({"ids": g.ids, "text": text, "finish_reason": g.finish.as_str()}))?;
    } else {
        if !has_tokenizer {
            out!("(no tokenizer: generated ids) {:?}", g.ids)?;
        }
        outln!()?;
    }
    eprintln!(
        "{prompt_len} prompt + {} generated tokens in {secs:.2} s ({:.2} tok/s overall), finish_reason={}",
        g.ids.len(),
        g.ids.len() as f64 / secs,
        g.finish
    );
    Ok(())
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = match (&a.tokenizer, &a.model) {
        (Some(t), _) => Tokenizer::from_file(t)?,
        (None, Some(dir)) => Tokenizer::from_model_dir(dir)?,
        (None, None) => return Err(Error::request("pass --model DIR or --tokenizer FILE")),
    };
    let ids = tok.encode(&a.text, EncodeOptions { add_bos: a.bos, parse_special: a.special })?;
    outln!("{}", serde_json::json!({ "ids": ids }))?;
    Ok(())
}

fn cmd_render(a: RenderArgs) -> Result<()> {
    if a.date.as_deref().is_some_and(|d| d.trim().is_empty()) {
        return Err(Error::request("--date: empty (leave it out for today's date)"));
    }
    let body = if a.request.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|e| Error::io("<stdin>", e))?;
        s
    } else {
        std::fs::read_to_string(&a.request).map_err(|e| Error::io(&a.request, e))?
    };
    let req = ChatRequest::from_json(&body)
        .map_err(|e| Error::request(format!("{}: {}", a.request.display(), e.detail())))?;
    let template = ChatTemplate::from_model_dir(&a.model)?;
    let opts = RenderOptions { add_generation_prompt: !a.no_generation_prompt, date_string: a.date.clone() };
    out!("{}", template.render(&req, &opts)?)?;
    Ok(())
}

fn cmd_info(a: ModelArgs) -> Result<()> {
    a.check()?;
    if let Some(info) = vision::info(&a)? {
        outln!("{}", serde_json::to_string_pretty(&info).unwrap_or_default())?;
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
    outln!("{}", serde_json::to_string_pretty(&info).unwrap_or_default())?;
    Ok(())
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
        logit_bias: Vec::new(),
        min_tokens: 0,
    }
}
