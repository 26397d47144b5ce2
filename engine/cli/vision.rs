//! `logits` and `generate` for Llama 3.2 Vision checkpoints (`--image`): on the CPU reference, as tensor-parallel
//! CPU ranks (`logits`), or with the text decoder on CUDA (`logits --device cuda`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{build_prompt, load_tokenizer, print_generation, sampling_params, GenerateArgs, ModelArgs};
use crate::vision::config::{MllamaConfig, MllamaPreset};
use crate::vision::pipeline::{is_mllama_dir, EncodedImages, MllamaModel};
use crate::{Error, Result};

/// The model directory when `--model` is a Llama 3.2 Vision checkpoint; an error when `--image` is given for a
/// text model or the vision model is asked for something it cannot do yet.
pub fn vision_dir(m: &ModelArgs, has_images: bool) -> Result<Option<PathBuf>> {
    match &m.model {
        Some(dir) if is_mllama_dir(dir) => {
            super::load::Device::parse(&m.device)?;
            if m.persistent_decode {
                return Err(Error::request(
                    "--persistent-decode: the stack runs the text models' layers; Llama 3.2 Vision's decoder also has \
                     cross-attention layers",
                ));
            }
            if m.preset.is_some() {
                return Err(Error::request(
                    "--preset: Llama 3.2 Vision runs from --model DIR (a config.json is enough with --random-weights)",
                ));
            }
            Ok(Some(dir.clone()))
        }
        _ if has_images => Err(Error::request(
            "--image needs a Llama 3.2 Vision model: --model DIR whose config.json is MllamaForConditionalGeneration",
        )),
        _ => Ok(None),
    }
}

/// Loads `dir` on the CPU reference (random weights with `--random-weights`; projections quantized by
/// `--quantize` when given) and encodes `images`.
fn load(m: &ModelArgs, dir: &Path, images: &[PathBuf]) -> Result<(MllamaModel, EncodedImages)> {
    let t0 = Instant::now();
    let at_load = super::load::at_load(m)?;
    let model = if m.random_weights {
        MllamaModel::random(dir, m.seed(), at_load)?
    } else {
        MllamaModel::load_with(dir, at_load)?
    };
    let enc = model.encode(&read_images(images)?)?;
    eprintln!(
        "loaded {} and encoded {} image(s) ({:?} tiles) in {:.2} s",
        dir.display(),
        enc.len(),
        enc.num_tiles,
        t0.elapsed().as_secs_f64()
    );
    Ok((model, enc))
}

/// `llama32 logits --image ...`: float32 logits `[T, vocab]` of `ids` with the images as .npy.
pub fn logits(m: &ModelArgs, dir: &Path, ids: &[u32], images: &[PathBuf], out: &Path) -> Result<()> {
    if let super::load::Device::Cuda(ordinal) = super::load::Device::parse(&m.device)? {
        return logits_cuda(m, dir, ids, images, out, ordinal);
    }
    let (model, enc) = load(m, dir, images)?;
    let vocab = model.cfg.text.base.vocab_size;
    let logits = model.logits(ids, &enc)?;
    crate::npy::write_f32(out, &[ids.len(), vocab], &logits)?;
    eprintln!("wrote logits [{}, {vocab}] to {}", ids.len(), out.display());
    Ok(())
}

/// `llama32 logits --image ... --tensor-parallel N` on the CPU: the images are encoded once (the vision encoder and
/// projector are replicated), and the text decoder runs as `tp` in-process ranks
/// ([`crate::tp::vision::TpMllamaCpuExecutor`]) in one prefill step.
pub fn logits_tp(m: &ModelArgs, dir: &Path, ids: &[u32], images: &[PathBuf], out: &Path, tp: usize) -> Result<()> {
    // Only the vision half is converted here: the ranks read their own slices of the text decoder.
    let encoder = crate::vision::pipeline::ImageEncoder::load(dir)?;
    let enc = encoder.encode(&read_images(images)?)?;
    let cfg = encoder.cfg.clone();
    drop(encoder);
    let mask = if enc.is_empty() {
        cfg.refuse_image_tokens_without_images(ids)?;
        None
    } else {
        let max_tiles = cfg.vision.max_num_tiles;
        Some(crate::vision::text::CrossAttentionMask::from_image_tokens(
            ids,
            cfg.image_token_index,
            &enc.num_tiles,
            max_tiles,
        )?)
    };
    if ids.is_empty() {
        return Err(Error::request("--ids: no tokens"));
    }
    let kv_tokens = m.kv_tokens.unwrap_or(ids.len()).max(ids.len());
    let ckpt = crate::weights::Checkpoint::open(dir)?;
    let t0 = Instant::now();
    let at_load = super::load::at_load(m)?;
    let ranks = (kv_tokens, m.block_size);
    let mut exec = crate::tp::vision::TpMllamaCpuExecutor::new_quantized(cfg.clone(), &ckpt, tp, ranks, at_load)?;
    eprintln!("loaded the text decoder as {tp} tensor-parallel CPU ranks in {:.2} s", t0.elapsed().as_secs_f64());
    prefill_to_npy(&mut exec, &cfg, m.block_size, ids, &enc, mask.as_ref(), out)?;
    eprintln!("(tensor-parallel {tp})");
    Ok(())
}

/// `llama32 logits --image ... --device cuda[:N]`: the images encoded on the device
/// ([`crate::vision::cuda::encoder::CudaVisionEncoder`], bf16), the text decoder in
/// [`crate::vision::cuda::text::MllamaCudaExecutor`] (bf16, or int4 projections for a quantized checkpoint or
/// `--quantize`), read one layer at a time ([`cuda_text_decoder`]), in one prefill step.
fn logits_cuda(m: &ModelArgs, dir: &Path, ids: &[u32], images: &[PathBuf], out: &Path, device: usize) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::request("--ids: no tokens"));
    }
    let t0 = Instant::now();
    let mut encoder = if m.random_weights {
        crate::vision::pipeline::ImageEncoder::random(dir, m.seed())?
    } else {
        crate::vision::pipeline::ImageEncoder::load(dir)?
    };
    let cfg = encoder.cfg.clone();
    let mask = if images.is_empty() {
        None
    } else {
        encoder.use_cuda(device)?;
        let files = read_images(images)?;
        let enc = encoder.encode(&files)?;
        eprintln!("encoded {} image(s) ({:?} tiles) in {:.2} s", enc.len(), enc.num_tiles, t0.elapsed().as_secs_f64());
        let mask = crate::vision::text::CrossAttentionMask::from_image_tokens(
            ids,
            cfg.image_token_index,
            &enc.num_tiles,
            cfg.vision.max_num_tiles,
        )?;
        Some((mask, enc))
    };
    drop(encoder);
    let opts = crate::vision::cuda::text::MllamaCudaOptions {
        device,
        block_size: m.block_size,
        kv_tokens: m.kv_tokens.unwrap_or(ids.len()).max(ids.len()),
        max_step_tokens: ids.len().max(1),
        max_logits_rows: ids.len().max(1),
        skinny_gemm: !m.no_skinny_gemm,
        fuse_swiglu: !m.no_fused_swiglu,
        fuse_norm: m.fused_norm,
        max_graph_batch: m.cuda_graph_max_batch,
        ..Default::default()
    };
    let mut exec =
        cuda_text_decoder((super::load::at_load(m)?, m.random_weights.then_some(m.seed())), dir, &cfg, &opts)?;
    let none = EncodedImages { states: Vec::new(), num_tiles: Vec::new() };
    match &mask {
        Some((mask, enc)) => prefill_to_npy(&mut exec, &cfg, m.block_size, ids, enc, Some(mask), out),
        None => prefill_to_npy(&mut exec, &cfg, m.block_size, ids, &none, None, out),
    }
}

/// The single-GPU CUDA text decoder of the Llama 3.2 Vision checkpoint `dir`, read and uploaded one layer at a
/// time ([`crate::vision::weights::TextSource`]), so the host never holds the whole model: bf16, a quantized
/// checkpoint's int4 projections, or the bf16 checkpoint quantized on reading by `at_load.scheme` (`--quantize`);
/// with `random_seed` (`--random-weights`) random weights at the config's shapes instead (int4 ones with a scheme).
/// `at_load.tables_int8` (`--embeddings int8`) quantizes the embedding and `lm_head` to int8 as they are read.
/// Shows a progress bar over the layers.
pub(crate) fn cuda_text_decoder(
    (at_load, random_seed): (crate::quant::AtLoad, Option<u64>),
    dir: &Path,
    cfg: &MllamaConfig,
    opts: &crate::vision::cuda::text::MllamaCudaOptions,
) -> Result<crate::vision::cuda::text::MllamaCudaExecutor> {
    let quantize = at_load.scheme;
    let ckpt;
    let mut src = match random_seed {
        Some(seed) => crate::vision::weights::TextSource::random(cfg, seed, quantize),
        None => {
            ckpt = crate::weights::Checkpoint::open(dir)?;
            crate::vision::weights::TextSource::checkpoint(&ckpt, cfg, quantize)?
        }
    };
    if at_load.tables_int8 {
        src = src.with_int8_tables();
    }
    let t0 = Instant::now();
    let bar = indicatif::ProgressBar::new(cfg.text.base.num_hidden_layers as u64).with_style(
        indicatif::ProgressStyle::with_template("uploading the text decoder {bar:40} {pos}/{len} layers {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let exec = crate::vision::cuda::text::MllamaCudaExecutor::from_source(cfg.clone(), &src, opts, &|done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let what = src.scheme().map_or_else(|| "bf16".to_string(), |s| s.name());
    eprintln!(
        "uploaded the text decoder ({what}) to cuda:{} in {:.2} s: {} KV tokens",
        opts.device,
        t0.elapsed().as_secs_f64(),
        crate::exec::Executor::num_blocks(&exec) * opts.block_size
    );
    Ok(exec)
}

/// Reads image files for the encoder, each named by its path.
fn read_images(images: &[PathBuf]) -> Result<Vec<(String, Vec<u8>)>> {
    images.iter().map(|p| Ok((p.display().to_string(), std::fs::read(p).map_err(|e| Error::io(p, e))?))).collect()
}

/// Runs `ids` (with the images, when `mask` is given) through `exec` in one prefill step and writes every row's
/// logits as .npy.
fn prefill_to_npy(
    exec: &mut dyn crate::exec::Executor,
    cfg: &MllamaConfig,
    block_size: usize,
    ids: &[u32],
    enc: &EncodedImages,
    mask: Option<&crate::vision::text::CrossAttentionMask>,
    out: &Path,
) -> Result<()> {
    use crate::exec::generate::{build_step, LogitsWanted, SeqChunk};
    let table: Vec<u32> = (0..ids.len().div_ceil(block_size) as u32).collect();
    let chunk = SeqChunk { tokens: ids, start_pos: 0, block_table: &table, logits: LogitsWanted::All };
    let step = build_step(&[chunk], block_size)?;
    let logits = match mask {
        Some(mask) => {
            exec.add_images(0, enc)?;
            let seq = crate::vision::exec::SeqImages { key: 0, mask: mask.data() };
            exec.step_with_images(&step, &[Some(seq)])?.logits
        }
        None => exec.step(&step)?.logits,
    };
    let vocab = cfg.text.base.vocab_size;
    crate::npy::write_f32(out, &[ids.len(), vocab], &logits)?;
    eprintln!("wrote logits [{}, {vocab}] to {}", ids.len(), out.display());
    Ok(())
}

/// `llama32 generate --image ...`.
pub fn generate(a: &GenerateArgs, dir: &Path) -> Result<()> {
    if a.model.device != "cpu" {
        return Err(Error::request(format!(
            "--device {}: `generate --image` runs on the CPU reference (use `serve --device cuda` or `logits --device \
             cuda` for the CUDA text decoder)",
            a.model.device
        )));
    }
    let tok = load_tokenizer(&a.model)?;
    let image_token = MllamaConfig::from_model_dir(dir)?.image_token_index;
    let prompt = build_prompt(a, tok.as_ref(), a.image.len(), Some(image_token))?;
    let params = sampling_params(a);
    if tok.is_none() && !a.stop.is_empty() {
        return Err(Error::request("--stop needs a tokenizer to see text"));
    }
    let (model, enc) = load(&a.model, dir, &a.image)?;
    let mut decoder = tok.as_ref().map(|t| t.stream_decoder(true));
    let mut detok = |id: u32| match decoder.as_mut() {
        Some(d) => d.push(id),
        None => Ok(String::new()),
    };
    let json = a.json;
    let mut on_text = |s: &str| {
        if !json {
            // A closed stdout shows at the final line, which returns the error.
            let _ = out!("{s}");
        }
    };
    let t0 = Instant::now();
    let g = model.generate(&prompt, &enc, &params, &mut detok, &mut on_text)?;
    let secs = t0.elapsed().as_secs_f64();
    print_generation(json, tok.is_some(), &g, prompt.len(), secs)?;
    Ok(())
}

/// `llama32 info` for a Llama 3.2 Vision checkpoint or preset (`11b-vision`, `90b-vision`): architecture, parameter
/// count and memory plan; `None` for text models.
pub fn info(a: &ModelArgs) -> Result<Option<serde_json::Value>> {
    let (cfg, source, ckpt_bytes) = match (&a.model, &a.preset) {
        (Some(dir), None) if is_mllama_dir(dir) => {
            let cfg = MllamaConfig::from_model_dir(dir)?;
            let bytes =
                if a.random_weights { None } else { Some(crate::weights::Checkpoint::open(dir)?.total_bytes()) };
            (cfg, dir.display().to_string(), bytes)
        }
        (None, Some(name)) if name.ends_with("-vision") => {
            let p = MllamaPreset::from_name(name)?;
            (p.config(), format!("preset {} (generated weights)", p.name()), None)
        }
        _ => return Ok(None),
    };
    let quantization = vision_quantization_info(a)?;
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let params = cfg.num_parameters();
    let t = &cfg.text.base;
    let v = &cfg.vision;
    let self_layers = cfg.text.num_self_attention_layers();
    // Self-attention K/V per token (bf16) and cross-attention K/V per image (bf16, every tile slot).
    let kv_token = 2 * self_layers * t.num_key_value_heads * t.head_dim * 2;
    let cross_image = 2
        * cfg.text.cross_attention_layers.len()
        * t.num_key_value_heads
        * t.head_dim
        * 2
        * cfg.vision_tokens_per_image();
    Ok(Some(serde_json::json!({
        "source": source,
        "architecture": {
            "text": {
                "layers": t.num_hidden_layers, "cross_attention_layers": cfg.text.cross_attention_layers,
                "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim,
                "vocab_size": t.vocab_size, "max_position_embeddings": t.max_position_embeddings,
            },
            "vision": {
                "layers": v.num_hidden_layers, "global_layers": v.num_global_layers, "hidden_size": v.hidden_size,
                "image_size": v.image_size, "patch_size": v.patch_size, "max_num_tiles": v.max_num_tiles,
                "vision_output_dim": v.vision_output_dim, "tokens_per_image": cfg.vision_tokens_per_image(),
            },
            "image_token_index": cfg.image_token_index,
        },
        "parameters": params,
        "quantization": quantization,
        "memory_plan": {
            "checkpoint_bytes": ckpt_bytes,
            "weights_bf16_gib": gib(params as f64 * 2.0),
            "weights_cpu_f32_gib": gib(params as f64 * 4.0),
            "kv_bytes_per_token_bf16": kv_token,
            "cross_kv_bytes_per_image_bf16": cross_image,
        },
    })))
}

/// The `quantization` object of vision `info`: the scheme of `--quantize` or of a quantized checkpoint (not both),
/// how the vocabulary tables are held, and the weight bytes so stored (the language model's projections in int4,
/// everything else bf16, by the same count as `llama32 plan`); `null` for a bf16 model.
fn vision_quantization_info(a: &ModelArgs) -> Result<serde_json::Value> {
    use super::load::{quantization_of, Quantization, Source};
    use crate::tp::perf::{predict_stored, Gpu, ModelShape, Storage, Workload};
    let at_load = super::load::at_load(a)?;
    // The text models' rule (`--quantize` or a quantized checkpoint, not both); a preset has no checkpoint.
    let (model, quant) = match (&a.model, &a.preset) {
        (Some(dir), _) => (dir.display().to_string(), quantization_of(a, &Source::Dir(dir.clone()))?),
        (None, Some(name)) => (name.clone(), at_load.scheme.map(Quantization::AtLoad)),
        (None, None) => return Ok(serde_json::Value::Null),
    };
    let ckpt = match quant {
        Some(Quantization::Checkpoint(q)) => Some(q),
        _ => None,
    };
    let scheme = at_load.scheme.or(ckpt.as_ref().map(|q| q.scheme));
    let int8_tables = at_load.tables_int8
        || ckpt.as_ref().is_some_and(|q| q.embeddings == crate::quant::format::EmbeddingQuant::Int8);
    if scheme.is_none() && !int8_tables {
        return Ok(serde_json::Value::Null);
    }
    let shape = ModelShape::resolve(&model)?;
    let w = Workload { batch: 1, context: 1, images: 0 };
    let st = Storage { projections: scheme, int8_tables };
    let p = predict_stored(&shape, 1, &Gpu::by_name("h100")?, &w, st)?;
    Ok(serde_json::json!({
        "scheme": scheme.map(|s| s.name()),
        "checkpoint_quantization": ckpt.map(|q| q.to_string()),
        "embeddings": if int8_tables { "int8" } else { "bf16" },
        "weights_bytes_total": p.weight_bytes_total,
    }))
}
