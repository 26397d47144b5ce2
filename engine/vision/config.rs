//! Configuration of Llama 3.2 Vision (`MllamaForConditionalGeneration`), read from a Hugging Face `config.json`
//! (`text_config` + `vision_config`) or taken from a built-in preset ([`MllamaPreset`]).
//!
//! Defaults follow transformers' `configuration_mllama.py` (a field that is absent or `null` takes the value
//! transformers would give it). The text part reuses the Llama parser ([`LlamaConfig::from_json_str`]), so both
//! RoPE spellings (`rope_theta` + `rope_scaling`, and transformers 5's `rope_parameters`) are accepted there;
//! errors name the file and the dotted field (`text_config.rope_scaling.factor`, `vision_config.patch_size`).

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::config::{LlamaConfig, RopeConfig, RopeScaling};
use crate::vision::image::MAX_TILE_SIZE;
use crate::{Error, Result};

/// Extra rows of the text embedding table beyond `vocab_size` (the image token and reserved ids): transformers
/// builds `nn.Embedding(vocab_size + 8, hidden)` while `lm_head` keeps `vocab_size` rows.
pub const EXTRA_EMBED_ROWS: usize = 8;

/// The `<|image|>` token id of the published checkpoints (transformers' default `image_token_index`).
pub const DEFAULT_IMAGE_TOKEN_INDEX: u32 = 128256;

/// Epsilon of the vision model's `layernorm_pre` / `layernorm_post`: transformers builds them as plain
/// `nn.LayerNorm(hidden)`, so they use PyTorch's default rather than `norm_eps` (which the encoder layers use).
pub const VISION_OUTER_LAYERNORM_EPS: f32 = 1e-5;

/// Aspect ratios (tiles high, tiles wide) transformers assumes when `supported_aspect_ratios` is not given
/// (valid only with `max_num_tiles = 4`).
pub const DEFAULT_ASPECT_RATIOS: [(usize, usize); 8] = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)];

/// The text decoder: a Llama decoder in which the layers listed in `cross_attention_layers` are replaced by
/// gated cross-attention layers that attend to the projected vision states.
#[derive(Clone, Debug, PartialEq)]
pub struct MllamaTextConfig {
    /// The Llama-shaped part. `vocab_size` is the output vocabulary (rows of `lm_head`); the embedding table has
    /// [`embed_rows`](Self::embed_rows) rows. `num_hidden_layers` counts every layer, cross-attention ones included.
    /// `head_dim` is always `hidden_size / num_attention_heads` (Mllama has no separate `head_dim`), and
    /// `tie_word_embeddings` is always false.
    pub base: LlamaConfig,
    /// Indices of the cross-attention layers, ascending, each below `base.num_hidden_layers`.
    pub cross_attention_layers: Vec<usize>,
    /// Padding id (`pad_token_id`), if any.
    pub pad_token_id: Option<u32>,
}

impl MllamaTextConfig {
    /// Rows of `embed_tokens` (`vocab_size + 8`).
    pub fn embed_rows(&self) -> usize {
        self.base.vocab_size + EXTRA_EMBED_ROWS
    }

    /// Whether decoder layer `layer` is a cross-attention layer.
    pub fn is_cross_attention_layer(&self, layer: usize) -> bool {
        self.cross_attention_layers.binary_search(&layer).is_ok()
    }

    /// Number of ordinary (self-attention) decoder layers, the ones with a KV cache over text tokens.
    pub fn num_self_attention_layers(&self) -> usize {
        self.base.num_hidden_layers - self.cross_attention_layers.len()
    }
}

/// Activation of the vision encoder's MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisionActivation {
    /// Exact (erf) GELU, transformers' `"gelu"`.
    Gelu,
}

/// The vision encoder: a local transformer over each tile's patches, then a gated global transformer over all
/// tiles of an image, with precomputed (aspect-ratio-indexed) tile and position embeddings.
#[derive(Clone, Debug, PartialEq)]
pub struct MllamaVisionConfig {
    /// Width of the encoder.
    pub hidden_size: usize,
    /// Inner width of each encoder MLP (`fc1` output).
    pub intermediate_size: usize,
    /// Layers of the local encoder (`transformer.layers`).
    pub num_hidden_layers: usize,
    /// Layers of the gated global encoder (`global_transformer.layers`).
    pub num_global_layers: usize,
    /// Attention heads (`attention_heads`, alias `num_attention_heads`).
    pub attention_heads: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Side of one square tile in pixels.
    pub image_size: usize,
    /// Side of one square patch in pixels (the patch-embedding convolution's kernel and stride).
    pub patch_size: usize,
    /// Most tiles one image is split into.
    pub max_num_tiles: usize,
    /// Local-encoder layers whose outputs are concatenated to the final state (0-based layer indices).
    pub intermediate_layers_indices: Vec<usize>,
    /// Tile grids `(tiles high, tiles wide)`; aspect-ratio id `k + 1` names entry `k`, id 0 is padding.
    pub supported_aspect_ratios: Vec<(usize, usize)>,
    /// Width of the vision output fed to the projector: `hidden_size * (1 + intermediate_layers_indices.len())`.
    pub vision_output_dim: usize,
    /// LayerNorm epsilon of the encoder layers (`norm_eps`).
    pub norm_eps: f32,
    /// MLP activation.
    pub hidden_act: VisionActivation,
}

impl MllamaVisionConfig {
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.attention_heads
    }

    /// Patches along each side of a tile (`image_size / patch_size`, rounded down as the convolution does).
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per tile: the patches plus the class token (transformers' `num_patches`).
    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side() + 1
    }

    /// Tokens per tile after padding to a multiple of 8, as the encoder runs them.
    pub fn padded_patches(&self) -> usize {
        self.num_patches().div_ceil(8) * 8
    }

    /// Inputs of one patch: `num_channels * patch_size^2`, in (channel, row, column) order.
    pub fn patch_dim(&self) -> usize {
        self.num_channels * self.patch_size * self.patch_size
    }

    /// Largest aspect-ratio id (`len(supported_aspect_ratios)`); embedding tables have one more row (id 0 = none).
    pub fn max_aspect_ratio_id(&self) -> usize {
        self.supported_aspect_ratios.len()
    }

    /// The aspect-ratio id (1-based) of a `tiles_high x tiles_wide` grid, or None if it is not supported.
    pub fn aspect_ratio_id(&self, tiles_high: usize, tiles_wide: usize) -> Option<usize> {
        self.supported_aspect_ratios.iter().position(|&r| r == (tiles_high, tiles_wide)).map(|k| k + 1)
    }
}

/// A whole `MllamaForConditionalGeneration` model.
#[derive(Clone, Debug, PartialEq)]
pub struct MllamaConfig {
    /// The text decoder.
    pub text: MllamaTextConfig,
    /// The vision encoder.
    pub vision: MllamaVisionConfig,
    /// Id of the `<|image|>` token (`image_token_index`, alias `image_token_id`), a row of the embedding table.
    pub image_token_index: u32,
    /// The checkpoint's stored dtype as the config names it (`bfloat16`, ...), if any.
    pub dtype: Option<String>,
}

impl MllamaConfig {
    /// Reads `config.json` from a model directory.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses config JSON; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let root: Value =
            serde_json::from_str(text).map_err(|e| Error::config(path, "<json>", format!("not valid JSON: {e}")))?;
        let obj = root.as_object().ok_or_else(|| Error::config(path, "<root>", "expected a JSON object"))?;
        let top = Obj { path, prefix: "", map: obj };
        if let Some(arch) = top.get("architectures") {
            let names: Vec<&str> =
                arch.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            if !names.contains(&"MllamaForConditionalGeneration") {
                let hint =
                    if names.contains(&"LlamaForCausalLM") { " (a text-only model: use LlamaConfig)" } else { "" };
                return Err(
                    top.err("architectures", format!("expected MllamaForConditionalGeneration, got {arch}{hint}"))
                );
            }
        }
        if let Some(mt) = top.get("model_type") {
            if mt.as_str() != Some("mllama") {
                return Err(top.err("model_type", format!("expected \"mllama\", got {mt}")));
            }
        }
        let text_cfg = parse_text(path, top.object("text_config")?)?;
        let vision = parse_vision(path, top.object("vision_config")?)?;
        let image_token_index = match (top.get("image_token_index"), top.get("image_token_id")) {
            (Some(_), _) => top.u32_or("image_token_index", DEFAULT_IMAGE_TOKEN_INDEX)?,
            (None, Some(_)) => top.u32_or("image_token_id", DEFAULT_IMAGE_TOKEN_INDEX)?,
            (None, None) => DEFAULT_IMAGE_TOKEN_INDEX,
        };
        if image_token_index as usize >= text_cfg.embed_rows() {
            return Err(top.err(
                "image_token_index",
                format!(
                    "{image_token_index} is outside the embedding table ({} rows = text_config.vocab_size + {EXTRA_EMBED_ROWS})",
                    text_cfg.embed_rows()
                ),
            ));
        }
        let dtype = top
            .get("dtype")
            .or_else(|| top.get("torch_dtype"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| text_cfg.base.dtype.clone());
        Ok(MllamaConfig { text: text_cfg, vision, image_token_index, dtype })
    }

    /// Cross-attention key/value tokens of one image: `max_num_tiles * num_patches` (padded tiles included, as
    /// transformers runs them; masked out by the cross-attention mask).
    pub fn vision_tokens_per_image(&self) -> usize {
        self.vision.max_num_tiles * self.vision.num_patches()
    }

    /// Refuses `<|image|>` tokens in a prompt that comes without images, as the HF processor does: without
    /// images they would attend to nothing and run as an ordinary (meaningless) embedding row.
    pub fn refuse_image_tokens_without_images(&self, prompt: &[u32]) -> Result<()> {
        let n = prompt.iter().filter(|&&t| t == self.image_token_index).count();
        if n > 0 {
            return Err(Error::request(format!("the prompt has {n} <|image|> token(s) but no image was given")));
        }
        Ok(())
    }

    /// Merges `eos_token_id` from `generation_config.json` in `dir`, if present, into the text model's stop ids.
    pub fn merge_generation_config(&mut self, dir: &Path) -> Result<()> {
        self.text.base.merge_generation_config(dir)
    }

    /// Total parameter count: every tensor of the checkpoint (see [`crate::vision::weights::expected_tensors`]).
    pub fn num_parameters(&self) -> u64 {
        let (vision, rest) = self.parameter_split();
        vision + rest
    }

    /// Parameters of the vision encoder and projector alone (what an image encoder loads).
    pub fn num_vision_parameters(&self) -> u64 {
        self.parameter_split().0
    }

    /// (vision encoder + projector, language model) parameter counts.
    fn parameter_split(&self) -> (u64, u64) {
        let v = &self.vision;
        let (h, i) = (v.hidden_size as u64, v.intermediate_size as u64);
        let (p, tiles, ar_rows) = (v.num_patches() as u64, v.max_num_tiles as u64, v.max_aspect_ratio_id() as u64 + 1);
        let vision_layer = 4 * h * h // q, k, v, o (no biases)
            + 2 * h * i + i + h // fc1, fc2 with biases
            + 4 * h; // two LayerNorms (weight + bias)
        let vision = h * v.patch_dim() as u64 // patch_embedding
            + h // class_embedding
            + p * h + 1 + ar_rows * tiles * p * h // gated_positional_embedding
            + 2 * (ar_rows * tiles * h + 1) // pre/post tile embeddings
            + 4 * h // layernorm_pre/post
            + vision_layer * v.num_hidden_layers as u64
            + (vision_layer + 2) * v.num_global_layers as u64;

        let t = &self.text.base;
        let (th, ti) = (t.hidden_size as u64, t.intermediate_size as u64);
        let (q, kv) = (t.q_dim() as u64, t.kv_dim() as u64);
        let mlp_and_norms = 3 * th * ti + 2 * th;
        let self_layer = th * (q + 2 * kv) + q * th + mlp_and_norms;
        let cross_layer = self_layer + 2 * t.head_dim as u64 + 2; // + q_norm, k_norm, two gates
        let n_cross = self.text.cross_attention_layers.len() as u64;
        let text = self.text.embed_rows() as u64 * th // embed_tokens
            + t.vocab_size as u64 * th // lm_head
            + th // final norm
            + self_layer * (t.num_hidden_layers as u64 - n_cross)
            + cross_layer * n_cross;

        let projector = th * v.vision_output_dim as u64 + th;
        (vision + projector, text)
    }
}

/// A named built-in vision architecture with the real dimensions of the published model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MllamaPreset {
    /// Llama 3.2 11B Vision: 40 text layers (8 cross-attention), hidden 4096, 32/8 heads; 10.67 B parameters.
    Vision11B,
    /// Llama 3.2 90B Vision: 100 text layers (20 cross-attention), hidden 8192, 64/8 heads; 88.6 B parameters.
    Vision90B,
}

impl MllamaPreset {
    /// Every preset, for listings.
    pub const ALL: [MllamaPreset; 2] = [MllamaPreset::Vision11B, MllamaPreset::Vision90B];

    /// The preset's short name (`11b-vision`, `90b-vision`).
    pub fn name(self) -> &'static str {
        match self {
            MllamaPreset::Vision11B => "11b-vision",
            MllamaPreset::Vision90B => "90b-vision",
        }
    }

    /// Looks a preset up by its short name.
    pub fn from_name(name: &str) -> Result<Self> {
        MllamaPreset::ALL.into_iter().find(|p| p.name().eq_ignore_ascii_case(name)).ok_or_else(|| {
            Error::request(format!(
                "unknown vision preset `{name}`; known presets: {}",
                MllamaPreset::ALL.map(|p| p.name()).join(", ")
            ))
        })
    }

    /// The preset's configuration. Both share the vision encoder; the text decoders differ.
    pub fn config(self) -> MllamaConfig {
        let (hidden, inter, layers, heads) = match self {
            MllamaPreset::Vision11B => (4096, 14336, 40, 32),
            MllamaPreset::Vision90B => (8192, 28672, 100, 64),
        };
        // Every fifth layer starting at 3: [3, 8, ..., 38] for 11B, [3, 8, ..., 98] for 90B.
        let cross_attention_layers = (3..layers).step_by(5).collect();
        MllamaConfig {
            text: MllamaTextConfig {
                base: LlamaConfig {
                    vocab_size: 128256,
                    hidden_size: hidden,
                    intermediate_size: inter,
                    num_hidden_layers: layers,
                    num_attention_heads: heads,
                    num_key_value_heads: 8,
                    head_dim: 128,
                    rms_norm_eps: 1e-5,
                    rope: RopeConfig {
                        theta: 500000.0,
                        scaling: RopeScaling::Llama3 {
                            factor: 8.0,
                            low_freq_factor: 1.0,
                            high_freq_factor: 4.0,
                            original_max_position_embeddings: 8192,
                        },
                    },
                    max_position_embeddings: 131072,
                    tie_word_embeddings: false,
                    bos_token_id: Some(128000),
                    eos_token_ids: vec![128001, 128008, 128009],
                    dtype: Some("bfloat16".into()),
                },
                cross_attention_layers,
                pad_token_id: Some(128004),
            },
            vision: MllamaVisionConfig {
                hidden_size: 1280,
                intermediate_size: 5120,
                num_hidden_layers: 32,
                num_global_layers: 8,
                attention_heads: 16,
                num_channels: 3,
                image_size: 560,
                patch_size: 14,
                max_num_tiles: 4,
                intermediate_layers_indices: vec![3, 7, 15, 23, 30],
                supported_aspect_ratios: DEFAULT_ASPECT_RATIOS.to_vec(),
                vision_output_dim: 7680,
                norm_eps: 1e-5,
                hidden_act: VisionActivation::Gelu,
            },
            image_token_index: DEFAULT_IMAGE_TOKEN_INDEX,
            dtype: Some("bfloat16".into()),
        }
    }
}

/// transformers' `MllamaTextConfig` defaults for the fields the Llama parser reads.
fn text_defaults() -> [(&'static str, Value); 9] {
    [
        ("vocab_size", json!(128256)),
        ("hidden_size", json!(4096)),
        ("hidden_act", json!("silu")),
        ("num_hidden_layers", json!(40)),
        ("num_attention_heads", json!(32)),
        ("num_key_value_heads", json!(8)),
        ("intermediate_size", json!(14336)),
        ("rms_norm_eps", json!(1e-5)),
        ("max_position_embeddings", json!(131072)),
    ]
}

fn parse_text(path: &Path, obj: Option<&Map<String, Value>>) -> Result<MllamaTextConfig> {
    const PREFIX: &str = "text_config.";
    let mut m = obj.cloned().unwrap_or_default();
    let scope = Obj { path, prefix: PREFIX, map: &m };
    if scope.bool_or("tie_word_embeddings", false)? {
        return Err(scope.err(
            "tie_word_embeddings",
            format!(
                "Mllama never ties lm_head (vocab_size rows) to embed_tokens (vocab_size + {EXTRA_EMBED_ROWS} rows)"
            ),
        ));
    }
    let explicit_head_dim = scope.get("head_dim").is_some();
    let cross = match scope.get("cross_attention_layers") {
        None => vec![3, 8, 13, 18, 23, 28, 33, 38],
        Some(_) => scope.index_list("cross_attention_layers")?,
    };
    let pad_token_id = match scope.get("pad_token_id") {
        None if obj.is_some_and(|o| o.contains_key("pad_token_id")) => None, // explicit null
        None => Some(128004),
        Some(_) => Some(scope.u32_or("pad_token_id", 128004)?),
    };
    // Fill transformers' defaults, then let the Llama parser read it (RoPE spellings, GQA and activation checks).
    m.remove("architectures");
    for (k, v) in text_defaults() {
        if m.get(k).is_none_or(Value::is_null) {
            m.insert(k.into(), v);
        }
    }
    // An explicit `null` id stays unset, as in transformers; an absent one takes the default.
    for (k, v) in [("bos_token_id", 128000), ("eos_token_id", 128001)] {
        if !m.contains_key(k) {
            m.insert(k.into(), json!(v));
        }
    }
    if m.get("rope_theta").is_none_or(Value::is_null) {
        // transformers 5's `default_theta` for Mllama; a `rope_theta` inside rope_parameters/rope_scaling wins.
        m.insert("rope_theta".into(), json!(500000.0));
    }
    let base = LlamaConfig::from_json_str(&Value::Object(m).to_string(), path).map_err(|e| match e {
        Error::Config { path, field, msg } => Error::Config { path, field: format!("{PREFIX}{field}"), msg },
        other => other,
    })?;
    let err = |field: &str, msg: String| Error::config(path, format!("{PREFIX}{field}"), msg);
    let heads = base.num_attention_heads;
    if base.hidden_size % heads != 0 {
        return Err(err(
            "num_attention_heads",
            format!("{heads} does not divide hidden_size {} (Mllama derives head_dim from them)", base.hidden_size),
        ));
    }
    if explicit_head_dim && base.head_dim != base.hidden_size / heads {
        return Err(err(
            "head_dim",
            format!(
                "{} differs from hidden_size / num_attention_heads = {}, which Mllama always uses",
                base.head_dim,
                base.hidden_size / heads
            ),
        ));
    }
    let mut sorted = cross.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != cross.len() {
        return Err(err("cross_attention_layers", format!("repeated layer index in {cross:?}")));
    }
    if let Some(&bad) = sorted.iter().find(|&&l| l >= base.num_hidden_layers) {
        return Err(err(
            "cross_attention_layers",
            format!("layer {bad} does not exist (num_hidden_layers is {})", base.num_hidden_layers),
        ));
    }
    Ok(MllamaTextConfig { base, cross_attention_layers: sorted, pad_token_id })
}

fn parse_vision(path: &Path, obj: Option<&Map<String, Value>>) -> Result<MllamaVisionConfig> {
    let empty = Map::new();
    let v = Obj { path, prefix: "vision_config.", map: obj.unwrap_or(&empty) };
    let hidden_act = match v.get("hidden_act") {
        None => VisionActivation::Gelu,
        Some(a) if a.as_str() == Some("gelu") => VisionActivation::Gelu,
        Some(a) => return Err(v.err("hidden_act", format!("only \"gelu\" (exact erf GELU) is supported, got {a}"))),
    };
    let hidden_size = v.usize_or("hidden_size", 1280)?;
    let attention_heads = match (v.get("attention_heads"), v.get("num_attention_heads")) {
        (Some(_), Some(_)) => {
            let (a, b) = (v.usize_or("attention_heads", 16)?, v.usize_or("num_attention_heads", 16)?);
            if a != b {
                return Err(v.err("num_attention_heads", format!("{b} contradicts attention_heads {a}")));
            }
            a
        }
        (None, Some(_)) => v.usize_or("num_attention_heads", 16)?,
        _ => v.usize_or("attention_heads", 16)?,
    };
    if hidden_size % attention_heads != 0 {
        return Err(v.err("attention_heads", format!("{attention_heads} does not divide hidden_size {hidden_size}")));
    }
    let image_size = v.square_or("image_size", 448)?;
    if image_size > MAX_TILE_SIZE {
        let why = "the largest tile the image preprocessor takes";
        return Err(v.err("image_size", format!("{image_size} exceeds {MAX_TILE_SIZE}, {why}")));
    }
    let patch_size = v.square_or("patch_size", 14)?;
    if patch_size > image_size {
        return Err(v.err("patch_size", format!("{patch_size} exceeds image_size {image_size}")));
    }
    let num_hidden_layers = v.usize_or("num_hidden_layers", 32)?;
    let max_num_tiles = v.usize_or("max_num_tiles", 4)?;
    let intermediate_layers_indices = match v.get("intermediate_layers_indices") {
        None => vec![3, 7, 15, 23, 30],
        Some(_) => v.index_list("intermediate_layers_indices")?,
    };
    if let Some(&bad) = intermediate_layers_indices.iter().find(|&&i| i >= num_hidden_layers) {
        return Err(v.err(
            "intermediate_layers_indices",
            format!("layer {bad} does not exist (num_hidden_layers is {num_hidden_layers})"),
        ));
    }
    let supported_aspect_ratios = match v.get("supported_aspect_ratios") {
        None if max_num_tiles != 4 => {
            return Err(v.err(
                "supported_aspect_ratios",
                format!("missing; the default list is only valid for max_num_tiles 4, not {max_num_tiles}"),
            ))
        }
        None => DEFAULT_ASPECT_RATIOS.to_vec(),
        Some(_) => v.pairs("supported_aspect_ratios")?,
    };
    if supported_aspect_ratios == DEFAULT_ASPECT_RATIOS && max_num_tiles != 4 {
        return Err(
            v.err("max_num_tiles", format!("must be 4 with the default supported_aspect_ratios, got {max_num_tiles}"))
        );
    }
    for (k, &(h, w)) in supported_aspect_ratios.iter().enumerate() {
        if h * w > max_num_tiles {
            return Err(v.err(
                &format!("supported_aspect_ratios[{k}]"),
                format!("[{h}, {w}] needs {} tiles, more than max_num_tiles {max_num_tiles}", h * w),
            ));
        }
        if supported_aspect_ratios[..k].contains(&(h, w)) {
            return Err(v.err(&format!("supported_aspect_ratios[{k}]"), format!("[{h}, {w}] is listed twice")));
        }
    }
    let intermediate_size = v.usize_or("intermediate_size", 5120)?;
    let num_global_layers = v.usize_or("num_global_layers", 8)?;
    let num_channels = v.usize_or("num_channels", 3)?;
    // Sizes no Mllama has are refused before anything is allocated or enumerated from them (the text model's
    // bounds).
    for (field, n) in [("num_hidden_layers", num_hidden_layers), ("num_global_layers", num_global_layers)] {
        if let Some(msg) = crate::config::too_many_layers(n) {
            return Err(v.err(field, msg));
        }
    }
    for (field, w) in [("hidden_size", hidden_size), ("intermediate_size", intermediate_size)] {
        if let Some(msg) = crate::config::too_wide(w, "") {
            return Err(v.err(field, msg));
        }
    }
    if num_channels > 64 {
        return Err(v.err("num_channels", format!("{num_channels} channels, at most 64 are supported")));
    }
    let vision_output_dim = v.usize_or("vision_output_dim", 7680)?;
    let want = hidden_size * (1 + intermediate_layers_indices.len());
    if vision_output_dim != want {
        return Err(v.err(
            "vision_output_dim",
            format!(
                "{vision_output_dim} must equal hidden_size {hidden_size} x (1 + {} intermediate layers) = {want}",
                intermediate_layers_indices.len()
            ),
        ));
    }
    Ok(MllamaVisionConfig {
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_global_layers,
        attention_heads,
        num_channels,
        image_size,
        patch_size,
        max_num_tiles,
        intermediate_layers_indices,
        supported_aspect_ratios,
        vision_output_dim,
        norm_eps: v.positive_f32_or("norm_eps", 1e-5)?,
        hidden_act,
    })
}

/// Reads fields of one JSON object, naming the file and the dotted field in every error. A `null` field counts as
/// absent (transformers writes `null` for unset options).
struct Obj<'a> {
    path: &'a Path,
    prefix: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::config(self.path, format!("{}{field}", self.prefix), msg)
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn object(&self, field: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(v) => Err(self.err(field, format!("expected an object, got {v}"))),
        }
    }

    fn usize_or(&self, field: &str, default: usize) -> Result<usize> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0 && n <= u32::MAX as u64)
                .map(|n| n as usize)
                .ok_or_else(|| self.err(field, format!("expected a positive integer, got {v}"))),
        }
    }

    fn u32_or(&self, field: &str, default: u32) -> Result<u32> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&n| n <= u32::MAX as u64)
                .map(|n| n as u32)
                .ok_or_else(|| self.err(field, format!("expected a token id, got {v}"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(field, format!("expected true or false, got {v}"))),
        }
    }

    fn positive_f32_or(&self, field: &str, default: f32) -> Result<f32> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|x| x as f32)
                // Checked as an f32: 1e300 would be infinite and 1e-300 zero.
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| self.err(field, format!("expected a positive number within f32's range, got {v}"))),
        }
    }

    /// A square size: an integer, or a `[n, n]` pair (transformers' type allows both; the model needs a square).
    fn square_or(&self, field: &str, default: usize) -> Result<usize> {
        match self.get(field) {
            Some(Value::Array(items)) => {
                let sides: Vec<u64> = items.iter().filter_map(Value::as_u64).collect();
                match sides[..] {
                    [a, b] if a == b && a > 0 && a <= u32::MAX as u64 && items.len() == 2 => Ok(a as usize),
                    _ => Err(self.err(
                        field,
                        format!("expected a positive integer or a square [n, n], got {}", Value::Array(items.clone())),
                    )),
                }
            }
            _ => self.usize_or(field, default),
        }
    }

    /// A list of non-negative integers.
    fn index_list(&self, field: &str) -> Result<Vec<usize>> {
        let v = self.get(field).unwrap_or(&Value::Null);
        let items = v.as_array().ok_or_else(|| self.err(field, format!("expected a list of integers, got {v}")))?;
        items
            .iter()
            .enumerate()
            .map(|(k, x)| {
                x.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| n as usize).ok_or_else(|| {
                    self.err(&format!("{field}[{k}]"), format!("expected a non-negative integer, got {x}"))
                })
            })
            .collect()
    }

    /// A non-empty list of positive `[a, b]` pairs.
    fn pairs(&self, field: &str) -> Result<Vec<(usize, usize)>> {
        let v = self.get(field).unwrap_or(&Value::Null);
        let items = v.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
            self.err(field, format!("expected a non-empty list of [tiles_high, tiles_wide] pairs, got {v}"))
        })?;
        items
            .iter()
            .enumerate()
            .map(|(k, x)| {
                let pair: Option<Vec<usize>> = x.as_array().map(|p| {
                    p.iter().filter_map(Value::as_u64).filter(|&n| n > 0 && n <= 64).map(|n| n as usize).collect()
                });
                match (pair, x.as_array().map(Vec::len)) {
                    (Some(p), Some(2)) if p.len() == 2 => Ok((p[0], p[1])),
                    _ => {
                        Err(self
                            .err(&format!("{field}[{k}]"), format!("expected a pair of positive integers, got {x}")))
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MllamaConfig> {
        MllamaConfig::from_json_str(text, Path::new("config.json"))
    }

    #[test]
    fn empty_sub_configs_take_transformers_defaults() {
        let cfg = parse(r#"{"architectures":["MllamaForConditionalGeneration"],"text_config":{},"vision_config":{}}"#)
            .unwrap();
        let preset = MllamaPreset::Vision11B.config();
        assert_eq!(cfg.text.base.rope.theta, 500000.0);
        assert_eq!(cfg.text.base.rope.scaling, RopeScaling::None); // no scaling unless the config names one
        assert_eq!(cfg.text.cross_attention_layers, preset.text.cross_attention_layers);
        assert_eq!(cfg.text.base.head_dim, 128);
        assert_eq!(cfg.vision.image_size, 448); // transformers' default, not the published 560
        assert_eq!(cfg.image_token_index, 128256);
        assert_eq!(cfg.text.embed_rows(), 128264);
        assert_eq!(cfg.text.base.eos_token_ids, vec![128001]);
    }

    #[test]
    fn vision_sizes_no_mllama_has_are_refused_by_field() {
        for (fields, needle) in [
            (r#""num_hidden_layers":1000000000"#, "vision_config.num_hidden_layers"),
            (r#""num_global_layers":1000000000"#, "vision_config.num_global_layers"),
            (r#""intermediate_size":67108864"#, "vision_config.intermediate_size"),
            (r#""num_channels":1000"#, "vision_config.num_channels"),
        ] {
            let text = format!(
                r#"{{"architectures":["MllamaForConditionalGeneration"],"text_config":{{}},"vision_config":{{{fields}}}}}"#
            );
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("supported"), "{fields}: {e}");
        }
        let e = parse(r#"{"architectures":["MllamaForConditionalGeneration"],"text_config":{"num_hidden_layers":2000000},"vision_config":{}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("text_config.num_hidden_layers"), "{e}");
        // The vision encoder and projector of the 11B preset: 0.90 B of its 10.67 B parameters.
        let c = MllamaPreset::Vision11B.config();
        assert!(c.num_vision_parameters() < c.num_parameters() / 10, "{}", c.num_vision_parameters());
    }

    #[test]
    fn preset_geometry() {
        let c = MllamaPreset::Vision11B.config();
        assert_eq!(c.vision.num_patches(), 1601);
        assert_eq!(c.vision.padded_patches(), 1608);
        assert_eq!(c.vision_tokens_per_image(), 6404);
        assert_eq!(c.vision.aspect_ratio_id(2, 2), Some(6));
        assert_eq!(c.vision.aspect_ratio_id(2, 3), None);
        assert_eq!(c.text.num_self_attention_layers(), 32);
        assert!(c.text.is_cross_attention_layer(38) && !c.text.is_cross_attention_layer(39));
        let c90 = MllamaPreset::Vision90B.config();
        assert_eq!(c90.text.cross_attention_layers.len(), 20);
        assert_eq!(*c90.text.cross_attention_layers.last().unwrap(), 98);
    }
}
