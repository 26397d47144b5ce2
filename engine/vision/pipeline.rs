//! Llama 3.2 Vision end to end on the CPU reference: image bytes -> preprocessing ([`super::image`]) -> vision
//! encoder and projector ([`super::encoder`]) -> text decoder with cross-attention ([`super::text`]) -> logits or
//! generated ids. One sequence at a time; the serving engine's batched path comes later.

use std::path::{Path, PathBuf};

use super::config::MllamaConfig;
use super::cuda::encoder::CudaVisionEncoder;
use super::encoder::{project, vision_forward};
use super::image::{ImageProcessor, PreprocessorConfig};
use super::text::{text_forward, text_step, CrossAttentionMask, TextCache};
use super::weights::MllamaWeights;
use crate::exec::generate::Generation;
use crate::sampling::{FinishReason, Sampler, SamplingParams, StopChecker};
use crate::weights::Checkpoint;
use crate::{Error, Result};

/// Whether `dir/config.json` names `MllamaForConditionalGeneration` (or has a `vision_config`).
pub fn is_mllama_dir(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else { return false };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    let arch = v.get("architectures").and_then(|a| a.as_array()).into_iter().flatten();
    arch.filter_map(|a| a.as_str()).any(|a| a.starts_with("Mllama")) || v.get("vision_config").is_some()
}

/// Encoded images of one prompt: the projector output every cross-attention layer reads.
#[derive(Clone, Debug)]
pub struct EncodedImages {
    /// `[images * max_num_tiles, num_patches, text hidden]`.
    pub states: Vec<f32>,
    /// Real tiles per image.
    pub num_tiles: Vec<usize>,
}

impl EncodedImages {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.num_tiles.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.num_tiles.is_empty()
    }
}

/// A loaded Llama 3.2 Vision model on the CPU.
pub struct MllamaModel {
    /// The configuration (EOS ids merged from `generation_config.json`).
    pub cfg: MllamaConfig,
    /// The f32 weights.
    pub weights: MllamaWeights,
    /// The image preprocessor.
    pub processor: ImageProcessor,
    /// The checkpoint directory.
    pub dir: PathBuf,
}

impl MllamaModel {
    /// Loads `dir`: config.json, the checkpoint (checked tensor by tensor) and `preprocessor_config.json` (when
    /// absent: the Llama 3.2 Vision preprocessor with the config's tile size and tile count).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, crate::quant::AtLoad::NONE)
    }

    /// Random weights at the shapes of `dir`'s config (its weights are not read; the directory needs only
    /// config.json), reproducible from `seed` ([`MllamaWeights::random_with`]): for benchmarks and smoke runs.
    /// `at_load` (or an `Option<Scheme>`) quantizes the language model's projections and, when it says so, its
    /// vocabulary tables to int8 ([`TextWeights::quantize_tables_int8`](super::weights::TextWeights)).
    pub fn random(dir: &Path, seed: u64, at_load: impl Into<crate::quant::AtLoad>) -> Result<Self> {
        let at_load = at_load.into();
        let (cfg, processor) = open_config(dir)?;
        let mut weights = MllamaWeights::random_with(&cfg, seed, at_load.scheme)?;
        if at_load.tables_int8 {
            weights.text.quantize_tables_int8()?;
        }
        Ok(MllamaModel { cfg, weights, processor, dir: dir.to_path_buf() })
    }

    /// [`load`](Self::load) with the language model's projections quantized on reading by `at_load.scheme`
    /// (`llama32 ... --quantize SCHEME`; see [`MllamaWeights::load_with`]) and its vocabulary tables in int8 when
    /// `at_load.tables_int8` (`--embeddings int8`). `at_load` takes an `Option<Scheme>` too.
    pub fn load_with(dir: &Path, at_load: impl Into<crate::quant::AtLoad>) -> Result<Self> {
        let at_load = at_load.into();
        let (cfg, ckpt, processor) = open_parts(dir)?;
        let mut weights = MllamaWeights::load_with(&ckpt, &cfg, at_load.scheme)?;
        if at_load.tables_int8 {
            weights.text.quantize_tables_int8()?;
        }
        Ok(MllamaModel { cfg, weights, processor, dir: dir.to_path_buf() })
    }

    /// Preprocesses and encodes encoded images (JPEG, PNG or WebP bytes; `names` label the errors).
    pub fn encode(&self, images: &[(String, Vec<u8>)]) -> Result<EncodedImages> {
        encode_images(&self.cfg, &self.weights, &self.processor, images, None)
    }

    /// [`encode`](Self::encode) with the encoder and projector on CUDA device `device` (bf16; preprocessing stays
    /// on the CPU). The device weights are uploaded for this call and freed after it.
    pub fn encode_cuda(&self, images: &[(String, Vec<u8>)], device: usize) -> Result<EncodedImages> {
        if images.is_empty() {
            return Ok(EncodedImages { states: Vec::new(), num_tiles: Vec::new() });
        }
        let enc = open_cuda_encoder(&self.cfg, &self.weights, device)?;
        encode_images(&self.cfg, &self.weights, &self.processor, images, Some(&enc))
    }

    /// Splits the model into the image encoder (vision weights, projector, preprocessor) and the text decoder's
    /// weights (for [`super::exec::MllamaCpuExecutor`]), so that each part is held once.
    pub fn split(self) -> (ImageEncoder, MllamaWeights) {
        let MllamaModel { cfg, mut weights, processor, dir } = self;
        let text = MllamaWeights { text: std::mem::take(&mut weights.text), ..Default::default() };
        let cache = std::sync::Mutex::new(EncoderCache::default());
        (ImageEncoder { cfg, weights, processor, dir, cache, cuda: None }, text)
    }

    /// The cross-attention mask of `prompt` (one `<|image|>` token per image, as the processor builds it).
    pub fn mask(&self, prompt: &[u32], images: &EncodedImages) -> Result<CrossAttentionMask> {
        CrossAttentionMask::from_image_tokens(
            prompt,
            self.cfg.image_token_index,
            &images.num_tiles,
            self.cfg.vision.max_num_tiles,
        )
    }

    /// Logits `[prompt.len(), vocab]` of the whole prompt.
    pub fn logits(&self, prompt: &[u32], images: &EncodedImages) -> Result<Vec<f32>> {
        if images.is_empty() {
            self.cfg.refuse_image_tokens_without_images(prompt)?;
            return text_forward(&self.weights.text, &self.cfg, prompt, None, None);
        }
        let mask = self.mask(prompt, images)?;
        text_forward(&self.weights.text, &self.cfg, prompt, Some(&images.states), Some(&mask))
    }

    /// Generates from `prompt` with `params` (stop ids: the model's EOS ids plus `params.stop_token_ids`), one
    /// token per step over the cached self-attention and cross-attention K/V. `detok(id)` gives each id's text;
    /// `on_text` sees the text as it becomes final.
    pub fn generate(
        &self,
        prompt: &[u32],
        images: &EncodedImages,
        params: &SamplingParams,
        detok: &mut dyn FnMut(u32) -> Result<String>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        params.validate(self.cfg.text.base.vocab_size)?;
        let ctx = self.cfg.text.base.max_position_embeddings;
        if prompt.is_empty() || prompt.len() >= ctx {
            return Err(Error::request(format!(
                "prompt of {} tokens: must be non-empty and leave room in the context length {ctx}",
                prompt.len()
            )));
        }
        let w = &self.weights.text;
        let mut cache = TextCache::new(w, &self.cfg.text)?;
        let per_image = images.states.len() / images.len().max(1);
        let mask = if images.is_empty() {
            self.cfg.refuse_image_tokens_without_images(prompt)?;
            None
        } else {
            for k in 0..images.len() {
                cache.add_image(w, &self.cfg, &images.states[k * per_image..(k + 1) * per_image])?;
            }
            Some(self.mask(prompt, images)?)
        };
        let mut sampler = Sampler::new(params, prompt).with_eos_ids(&self.cfg.text.base.eos_token_ids);
        let mut stop = StopChecker::new(&self.cfg.text.base.eos_token_ids, params);
        let vocab = self.cfg.text.base.vocab_size;
        let mut logits = text_step(w, &self.cfg.text, &mut cache, prompt, mask.as_ref().map(|m| m.data()))?;
        let last_row = mask.as_ref().map(|m| m.row(m.tokens() - 1).to_vec());
        let (mut ids, mut text) = (Vec::new(), String::new());
        loop {
            let row = &logits[logits.len() - vocab..];
            let t = sampler.sample(row);
            ids.push(t);
            let piece = detok(t)?;
            let st = stop.push(t, &piece);
            let mut emit = st.emit;
            let mut finish = st.finished;
            if finish.is_none() && prompt.len() + ids.len() >= ctx {
                emit.push_str(&stop.finish());
                finish = Some(FinishReason::Length);
            }
            if !emit.is_empty() {
                on_text(&emit);
                text.push_str(&emit);
            }
            if let Some(finish) = finish {
                return Ok(Generation { ids, text, finish });
            }
            logits = text_step(w, &self.cfg.text, &mut cache, &[t], last_row.as_deref())?;
        }
    }
}

/// The config (with generation_config.json merged), the opened checkpoint and the image processor of `dir`
/// (`preprocessor_config.json`; when absent, the Llama 3.2 Vision preprocessor with the config's tile size and
/// tile count).
fn open_parts(dir: &Path) -> Result<(MllamaConfig, Checkpoint, ImageProcessor)> {
    let (cfg, processor) = open_config(dir)?;
    Ok((cfg, Checkpoint::open(dir)?, processor))
}

/// The config (with generation_config.json merged) and the image processor of `dir`, without its weights.
fn open_config(dir: &Path) -> Result<(MllamaConfig, ImageProcessor)> {
    let mut cfg = MllamaConfig::from_model_dir(dir)?;
    cfg.merge_generation_config(dir)?;
    let pre_path = dir.join("preprocessor_config.json");
    let pre = if pre_path.exists() {
        PreprocessorConfig::from_file(&pre_path)?
    } else {
        PreprocessorConfig {
            tile_size: cfg.vision.image_size,
            max_image_tiles: cfg.vision.max_num_tiles,
            ..Default::default()
        }
    };
    if pre.tile_size != cfg.vision.image_size || pre.max_image_tiles != cfg.vision.max_num_tiles {
        return Err(Error::config(
            &pre_path,
            "size / max_image_tiles",
            format!(
                "tiles of {} px, at most {}, but config.json's vision_config has image_size {} and max_num_tiles {}",
                pre.tile_size, pre.max_image_tiles, cfg.vision.image_size, cfg.vision.max_num_tiles
            ),
        ));
    }
    Ok((cfg, ImageProcessor::new(pre)?))
}

/// The vision half of a model: preprocessing, the vision encoder and the projector (the text weights left out).
pub struct ImageEncoder {
    /// The configuration.
    pub cfg: MllamaConfig,
    /// Vision and projector weights (the text part is empty).
    weights: MllamaWeights,
    /// The image preprocessor.
    pub processor: ImageProcessor,
    /// The checkpoint directory.
    pub dir: PathBuf,
    cache: std::sync::Mutex<EncoderCache>,
    /// The encoder on a CUDA device ([`ImageEncoder::use_cuda`]); None: the f32 CPU reference.
    cuda: Option<std::sync::Mutex<CudaVisionEncoder>>,
}

/// Most encoded images kept by an [`ImageEncoder`] (least recently used ones go first).
pub const ENCODER_CACHE_IMAGES: usize = 32;

#[derive(Default)]
struct EncoderCache {
    map: std::collections::HashMap<u64, std::sync::Arc<EncodedImages>>,
    order: std::collections::VecDeque<u64>,
    hits: u64,
    misses: u64,
}

impl ImageEncoder {
    /// Loads only the vision half of `dir` (config, preprocessor, vision encoder and projector tensors; the
    /// checkpoint is still checked whole), for when the text decoder is loaded separately.
    pub fn load(dir: &Path) -> Result<Self> {
        let (cfg, ckpt, processor) = open_parts(dir)?;
        let weights = MllamaWeights::load_vision(&ckpt, &cfg)?;
        let cache = std::sync::Mutex::new(EncoderCache::default());
        Ok(ImageEncoder { cfg, weights, processor, dir: dir.to_path_buf(), cache, cuda: None })
    }

    /// The vision half with random weights (as [`MllamaModel::random`] draws them) at the shapes of `dir`'s
    /// config, whose weights are not read.
    pub fn random(dir: &Path, seed: u64) -> Result<Self> {
        let (cfg, processor) = open_config(dir)?;
        let weights = MllamaWeights::random_vision(&cfg, seed)?;
        let cache = std::sync::Mutex::new(EncoderCache::default());
        Ok(ImageEncoder { cfg, weights, processor, dir: dir.to_path_buf(), cache, cuda: None })
    }

    /// Runs the encoder and projector on CUDA device `device` from now on (bf16, on a stream of its own; the
    /// preprocessing stays on the CPU): uploads their weights there. Encoded images already cached are kept.
    pub fn use_cuda(&mut self, device: usize) -> Result<()> {
        let enc = open_cuda_encoder(&self.cfg, &self.weights, device)?;
        self.cuda = Some(std::sync::Mutex::new(enc));
        Ok(())
    }

    /// Whether the encoder runs on CUDA.
    pub fn on_cuda(&self) -> bool {
        self.cuda.is_some()
    }

    /// Preprocesses and encodes images (JPEG, PNG or WebP bytes, each with a name for errors). Each image's output
    /// is cached by a hash of its bytes, so an image sent again (the next turn of a conversation) is not encoded
    /// again; images are encoded independently, so the result is the same as encoding them together.
    pub fn encode(&self, images: &[(String, Vec<u8>)]) -> Result<EncodedImages> {
        let mut out = EncodedImages { states: Vec::new(), num_tiles: Vec::new() };
        for img in images {
            let key = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                img.1.hash(&mut h);
                h.finish()
            };
            let cached = self.with_cache(|c| {
                let hit = c.map.get(&key).cloned();
                if hit.is_some() {
                    c.hits += 1;
                    c.order.retain(|&k| k != key);
                    c.order.push_back(key);
                } else {
                    c.misses += 1;
                }
                hit
            });
            let one = match cached {
                Some(e) => e,
                None => {
                    let cuda = self.cuda.as_ref().map(|c| c.lock().unwrap_or_else(|p| p.into_inner()));
                    let one = std::slice::from_ref(img);
                    let e = std::sync::Arc::new(encode_images(
                        &self.cfg,
                        &self.weights,
                        &self.processor,
                        one,
                        cuda.as_deref(),
                    )?);
                    self.with_cache(|c| {
                        if c.map.insert(key, e.clone()).is_none() {
                            c.order.push_back(key);
                        }
                        while c.order.len() > ENCODER_CACHE_IMAGES {
                            if let Some(old) = c.order.pop_front() {
                                c.map.remove(&old);
                            }
                        }
                    });
                    e
                }
            };
            out.states.extend_from_slice(&one.states);
            out.num_tiles.extend_from_slice(&one.num_tiles);
        }
        Ok(out)
    }

    /// Encoder cache (hits, misses) so far.
    pub fn cache_stats(&self) -> (u64, u64) {
        self.with_cache(|c| (c.hits, c.misses))
    }

    fn with_cache<R>(&self, f: impl FnOnce(&mut EncoderCache) -> R) -> R {
        let mut g = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }
}

/// The CUDA encoder of `cfg` / `w` on device `device`, on a stream of its own.
fn open_cuda_encoder(cfg: &MllamaConfig, w: &MllamaWeights, device: usize) -> Result<CudaVisionEncoder> {
    let (stream, _) = crate::vision::cuda::open_stream(device)?;
    CudaVisionEncoder::new(cfg, w, stream)
}

/// Preprocesses `images` and runs the encoder and projector: the f32 CPU reference, or `cuda` (bf16).
fn encode_images(
    cfg: &MllamaConfig,
    w: &MllamaWeights,
    processor: &ImageProcessor,
    images: &[(String, Vec<u8>)],
    cuda: Option<&CudaVisionEncoder>,
) -> Result<EncodedImages> {
    if images.is_empty() {
        return Ok(EncodedImages { states: Vec::new(), num_tiles: Vec::new() });
    }
    let (mut pixels, mut ids, mut masks, mut tiles) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (name, bytes) in images {
        // The inner message without its own "invalid request: " (the outer error says it once).
        let p = processor.preprocess_bytes(bytes).map_err(|e| match e {
            Error::Request(m) => Error::request(format!("image {name}: {m}")),
            other => Error::request(format!("image {name}: {other}")),
        })?;
        pixels.extend_from_slice(&p.pixel_values);
        ids.push(p.aspect_ratio_id);
        masks.extend_from_slice(&p.aspect_ratio_mask);
        tiles.push(p.num_tiles);
    }
    if let Some(enc) = cuda {
        let (_, states) = enc.encode_host(&pixels, images.len(), &ids, &masks)?;
        return Ok(EncodedImages { states, num_tiles: tiles });
    }
    let vis = vision_forward(&w.vision, &cfg.vision, &pixels, images.len(), &ids, &masks)?;
    let states = project(w, cfg, &vis)?;
    Ok(EncodedImages { states, num_tiles: tiles })
}

/// Tokenizes `text` (special tokens parsed) with every `<|image|>` becoming `image_token`. A vision model's
/// `tokenizer.json` has `<|image|>` at the image token (128256) already; the tiktoken `tokenizer.model` does not
/// (Meta's tokenizer spells it 128011 and rewrites it before the model), so the text is split around it.
pub fn encode_with_images(tok: &crate::tokenizer::Tokenizer, text: &str, image_token: u32) -> Result<Vec<u32>> {
    use crate::tokenizer::EncodeOptions;
    let opts = EncodeOptions { add_bos: false, parse_special: true };
    if tok.token_to_id("<|image|>") == Some(image_token) {
        return tok.encode(text, opts);
    }
    let mut ids = Vec::new();
    for (k, piece) in text.split("<|image|>").enumerate() {
        if k > 0 {
            ids.push(image_token);
        }
        if !piece.is_empty() {
            ids.extend(tok.encode(piece, opts)?);
        }
    }
    Ok(ids)
}
