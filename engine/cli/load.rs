//! Resolving `--model` / `--preset` / `--random-weights` / `--device` into a ready executor.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::ModelArgs;
use crate::config::{LlamaConfig, Preset};
use crate::exec::cpu::CpuExecutor;
use crate::exec::cuda::{CudaExecutor, CudaOptions};
use crate::exec::Executor;
use crate::quant::format::{EmbeddingQuant, QuantizationConfig};
use crate::quant::{AtLoad, Scheme};
use crate::weights::{check_checkpoint, Checkpoint, ModelWeights, WeightSource};
use crate::{Error, Result};

/// An execution device named by `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU reference backend.
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl Device {
    /// Parses `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| Error::request(format!("--device: expected cpu, cuda or cuda:N, got `{s}`"))),
        }
    }
}

/// Where the model's config came from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A checkpoint directory.
    Dir(PathBuf),
    /// A built-in preset.
    Preset(Preset),
}

impl Source {
    /// A one-line description for logs and JSON output.
    pub fn describe(&self) -> String {
        match self {
            Source::Dir(d) => d.display().to_string(),
            Source::Preset(p) => format!("preset {} (generated weights)", p.name()),
        }
    }
}

/// The config named by the arguments: `--model DIR`, `--preset NAME`, or the default 1B preset.
pub fn resolve_config(a: &ModelArgs) -> Result<(LlamaConfig, Source)> {
    match (&a.model, &a.preset) {
        (Some(_), Some(_)) => Err(Error::request("pass either --model or --preset, not both")),
        (Some(dir), None) => {
            let mut cfg = LlamaConfig::from_model_dir(dir)?;
            cfg.merge_generation_config(dir)?;
            Ok((cfg, Source::Dir(dir.clone())))
        }
        (None, Some(name)) => {
            let p = Preset::from_name(name)?;
            Ok((p.config(), Source::Preset(p)))
        }
        (None, None) => Ok((Preset::Llama32_1B.config(), Source::Preset(Preset::Llama32_1B))),
    }
}

/// A ready model.
pub struct LoadedModel {
    /// The executor.
    pub exec: Box<dyn Executor>,
    /// End-of-sequence ids from config.json and generation_config.json.
    pub eos_ids: Vec<u32>,
    /// The device, in words.
    pub device_name: String,
    /// The model source, in words.
    pub source_desc: String,
    /// Seconds spent loading or generating weights.
    pub load_secs: f64,
}

/// Loads the model named by `a` with a KV cache for at least `min_tokens` tokens (or `--kv-tokens`).
pub fn load_model(a: &ModelArgs, min_tokens: usize) -> Result<LoadedModel> {
    let device = Device::parse(&a.device)?;
    let (cfg, source) = resolve_config(a)?;
    if a.model.is_none() && a.preset.is_none() {
        eprintln!(
            "no --model given: using the built-in Llama 3.2 1B preset with RANDOM weights (seed {}); \
             its output is meaningless text, useful only to exercise the engine",
            a.seed()
        );
    }
    if let Device::Cuda(ordinal) = device {
        return load_cuda(a, cfg, &source, ordinal, min_tokens);
    }
    let t0 = Instant::now();
    let weights = load_cpu_weights(a, &cfg, &source)?;
    let load_secs = t0.elapsed().as_secs_f64();
    let kv_tokens = a.kv_tokens.unwrap_or(min_tokens).max(min_tokens);
    let eos_ids = cfg.eos_token_ids.clone();
    let mut desc = source.describe();
    if a.random_weights {
        desc.push_str(" with random weights");
    }
    if let Some(scheme) = weights.quant_scheme() {
        desc.push_str(&format!(", quantized {}", scheme.name()));
    }
    if weights.embed_int8.is_some() {
        desc.push_str(", int8 embeddings");
    }
    let exec = CpuExecutor::with_capacity(cfg, weights, kv_tokens, a.block_size)?;
    Ok(LoadedModel {
        exec: Box::new(exec),
        eos_ids,
        device_name: format!("cpu ({} threads)", rayon::current_num_threads()),
        source_desc: desc,
        load_secs,
    })
}

/// How a model's projections are quantized: by its checkpoint (`quantization_config` in config.json) or by
/// `--quantize` at load time.
#[derive(Clone, Debug)]
pub enum Quantization {
    /// A quantized checkpoint.
    Checkpoint(QuantizationConfig),
    /// `--quantize SCHEME` on unquantized weights.
    AtLoad(Scheme),
}

impl Quantization {
    /// In words, for errors and logs.
    pub fn describe(&self) -> String {
        match self {
            Quantization::Checkpoint(q) => format!("checkpoint quantized as {q}"),
            Quantization::AtLoad(s) => format!("--quantize {}", s.name()),
        }
    }
}

/// The `quantization_config` of a checkpoint directory's config.json, if it has one.
pub fn checkpoint_quantization(dir: &Path) -> Result<Option<QuantizationConfig>> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let root: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(&path, "", format!("not valid JSON: {e}")))?;
    QuantizationConfig::from_config_json(&root, &path)
}

/// Whether `--embeddings` asks for int8 vocabulary tables (`bf16` or `int8`; anything else is refused, naming the
/// flag).
pub fn tables_int8(a: &ModelArgs) -> Result<bool> {
    match EmbeddingQuant::parse(&a.embeddings) {
        Ok(e) => Ok(e == EmbeddingQuant::Int8),
        Err(_) => Err(Error::request(format!("--embeddings `{}`: expected bf16 or int8", a.embeddings))),
    }
}

/// What `--quantize` and `--embeddings` ask to convert at load time, both flags checked.
pub fn at_load(a: &ModelArgs) -> Result<AtLoad> {
    let scheme = a.quantize.as_deref().map(Scheme::parse).transpose()?;
    Ok(AtLoad { scheme, tables_int8: tables_int8(a)? })
}

/// The quantization the arguments ask for: `--quantize`, or a quantized checkpoint (not both).
pub fn quantization_of(a: &ModelArgs, source: &Source) -> Result<Option<Quantization>> {
    let flag = a.quantize.as_deref().map(Scheme::parse).transpose()?;
    let ckpt = match source {
        Source::Dir(dir) => checkpoint_quantization(dir)?,
        Source::Preset(_) => None,
    };
    match (flag, ckpt) {
        (Some(s), Some(_)) => Err(Error::request(format!(
            "--quantize {}: the checkpoint is already quantized (its config.json has a quantization_config)",
            s.name()
        ))),
        (Some(s), None) => Ok(Some(Quantization::AtLoad(s))),
        (None, Some(q)) => Ok(Some(Quantization::Checkpoint(q))),
        (None, None) => Ok(None),
    }
}

/// The CPU weights named by the arguments: a checkpoint (quantized or not) or random weights, then quantized by
/// `--quantize` if given, and their tables to int8 with `--embeddings int8`. `--random-weights` with a quantized
/// checkpoint's config quantizes the random weights with the checkpoint's scheme, and its tables to int8 when the
/// config says `"embeddings": "int8"`.
pub fn load_cpu_weights(a: &ModelArgs, cfg: &LlamaConfig, source: &Source) -> Result<ModelWeights> {
    let mut weights = load_cpu_weights_as_stored(a, cfg, source)?;
    if tables_int8(a)? {
        weights.quantize_tables_int8()?;
    }
    Ok(weights)
}

/// [`load_cpu_weights`] without `--embeddings int8` (not read here): the tables as the checkpoint stores them (for
/// `quant-eval`, whose bf16 baseline keeps them and which applies the flag to its quantized runs itself).
pub fn load_cpu_weights_as_stored(a: &ModelArgs, cfg: &LlamaConfig, source: &Source) -> Result<ModelWeights> {
    let quant = quantization_of(a, source)?;
    let mut weights = match (source, a.random_weights, &quant) {
        (Source::Dir(dir), false, Some(Quantization::Checkpoint(q))) => {
            let ckpt = Checkpoint::open(dir)?;
            let bar = progress_bar(ckpt.total_bytes());
            let w = ModelWeights::load_quantized(&ckpt, cfg, q, &|done| bar.set_position(done))?;
            bar.finish_and_clear();
            w
        }
        (Source::Dir(dir), false, _) => {
            let ckpt = Checkpoint::open(dir)?;
            let bar = progress_bar(ckpt.total_bytes());
            let w = ModelWeights::load(&ckpt, cfg, &|done| bar.set_position(done))?;
            bar.finish_and_clear();
            w
        }
        _ => ModelWeights::random(cfg, a.seed())?,
    };
    match (&quant, a.random_weights) {
        (Some(Quantization::AtLoad(scheme)), _) => weights.quantize_in_place(*scheme)?,
        (Some(Quantization::Checkpoint(q)), true) => {
            weights.quantize_in_place(q.scheme)?;
            // A config whose checkpoint keeps the tables in int8: the random tables too (for benchmarks).
            if q.embeddings == EmbeddingQuant::Int8 {
                weights.quantize_tables_int8()?;
            }
        }
        _ => {}
    }
    Ok(weights)
}

/// The `quantization` object of `llama32 info`: the scheme and the bytes of the quantized projections (packed
/// int4 values plus bf16 group scales) next to their bf16 bytes, and how the vocabulary tables are held (int8: one
/// byte per value plus a bf16 scale per row); `null` for a model with neither.
pub fn quantization_info(a: &ModelArgs, cfg: &LlamaConfig, source: &Source) -> Result<serde_json::Value> {
    let tables_flag = tables_int8(a)?;
    let (scheme, ckpt_quant, ckpt_tables) = match quantization_of(a, source)? {
        None if !tables_flag => return Ok(serde_json::Value::Null),
        None => (None, None, false),
        Some(Quantization::AtLoad(s)) => (Some(s), None, false),
        Some(Quantization::Checkpoint(q)) => {
            (Some(q.scheme), Some(q.to_string()), q.embeddings == EmbeddingQuant::Int8)
        }
    };
    let int8_tables = tables_flag || ckpt_tables;
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let per_layer = [(cfg.q_dim() + 2 * cfg.kv_dim(), h), (h, cfg.q_dim()), (2 * i, h), (h, i)];
    let proj_params: u64 = per_layer.iter().map(|&(n, k)| (n * k) as u64).sum::<u64>() * cfg.num_hidden_layers as u64;
    let table_rows = cfg.vocab_size as u64 * if cfg.tie_word_embeddings { 1 } else { 2 };
    let table_params = table_rows * h as u64;
    let other_params = cfg.num_parameters() - proj_params - table_params;
    let proj_bytes = match scheme {
        Some(s) => proj_params / 2 + proj_params / s.group as u64 * 2,
        None => proj_params * 2,
    };
    let table_bytes = if int8_tables { table_params + table_rows * 2 } else { table_params * 2 };
    Ok(serde_json::json!({
        "scheme": scheme.map(|s| s.name()),
        "checkpoint_quantization": ckpt_quant,
        "quantized_projection_parameters": if scheme.is_some() { proj_params } else { 0 },
        "quantized_projection_bytes": if scheme.is_some() { proj_bytes } else { 0 },
        "projection_bytes_bf16": proj_params * 2,
        "embeddings": if int8_tables { "int8" } else { "bf16" },
        "table_bytes": table_bytes,
        "weights_bytes_total": proj_bytes + table_bytes + other_params * 2,
    }))
}

fn progress_bar(total: u64) -> ProgressBar {
    ProgressBar::new(total).with_style(
        ProgressStyle::with_template("loading weights {bar:40} {binary_bytes}/{binary_total_bytes} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}

fn load_cuda(
    a: &ModelArgs,
    cfg: LlamaConfig,
    source: &Source,
    ordinal: usize,
    min_tokens: usize,
) -> Result<LoadedModel> {
    let opts = CudaOptions {
        device: ordinal,
        block_size: a.block_size,
        kv_tokens: a.kv_tokens,
        gpu_memory_utilization: a.gpu_memory_utilization,
        max_step_tokens: 2048,
        max_graph_batch: a.cuda_graph_max_batch,
        skinny_gemm: !a.no_skinny_gemm,
        fuse_swiglu: !a.no_fused_swiglu,
        fuse_rope: a.fused_rope,
        fuse_norm: a.fused_norm,
        persistent_decode: a.persistent_decode,
    };
    let t0 = Instant::now();
    let eos_ids = cfg.eos_token_ids.clone();
    let mut desc = source.describe();
    let quant = quantization_of(a, source)?;
    let tables = tables_int8(a)?;
    let exec = match (source, a.random_weights) {
        _ if quant.is_some() || tables => {
            // Quantized projections and int8 tables are made on the host first (the checkpoint's int4 tensors, or
            // bf16 weights quantized by --quantize / --embeddings), then uploaded in the kernels' layout.
            let w = load_cpu_weights(a, &cfg, source)?;
            if let Some(q) = &quant {
                desc.push_str(&format!(", {}", q.describe()));
            }
            if a.random_weights {
                desc.push_str(" with random weights");
            }
            if w.embed_int8.is_some() {
                desc.push_str(", int8 embeddings");
            }
            CudaExecutor::from_weights(cfg, &w, &opts)?
        }
        (Source::Dir(dir), false) => {
            let ckpt = Checkpoint::open(dir)?;
            check_checkpoint(&ckpt, &cfg)?;
            let bar = progress_bar(ckpt.total_bytes());
            let tick = |bytes: u64| bar.inc(bytes);
            let e = CudaExecutor::new(cfg, WeightSource::Checkpoint(&ckpt), &opts, &tick)?;
            bar.finish_and_clear();
            e
        }
        _ => {
            if a.random_weights {
                desc.push_str(" with random weights");
            }
            CudaExecutor::new(cfg, WeightSource::Random(a.seed()), &opts, &|_| {})?
        }
    };
    if exec.num_blocks() * exec.block_size() < min_tokens {
        return Err(Error::request(format!(
            "the KV cache holds {} tokens but this run needs {min_tokens}",
            exec.num_blocks() * exec.block_size()
        )));
    }
    Ok(LoadedModel {
        device_name: format!("cuda:{ordinal} ({})", exec.device_name()),
        exec: Box::new(exec),
        eos_ids,
        source_desc: desc,
        load_secs: t0.elapsed().as_secs_f64(),
    })
}
