//! Weights of Llama 3.2 Vision (`MllamaForConditionalGeneration`): the expected tensor list, a checkpoint checker
//! and CPU f32 weight structs for the reference forward.
//!
//! # Tensor names
//! The published checkpoints, and transformers 5.24's `save_pretrained` (which maps names back on save), use the
//! *original* layout: `vision_model.*`, `language_model.model.*`, `language_model.lm_head.weight`,
//! `multi_modal_projector.*`. transformers 5's in-memory `state_dict()` uses another: `model.vision_model.*`,
//! `model.language_model.*` (no inner `model.`), `lm_head.weight`, `model.multi_modal_projector.*`; a checkpoint
//! written straight from it is accepted too ([`MllamaLayout`]). [`expected_tensors`] lists canonical (original)
//! names.
//!
//! # CPU layout
//! Everything is f32, row-major, linear weights `[out, in]` as stored. Fusions (rows stacked in this order):
//! vision `wqkv = [q; k; v]` (`[3 * hidden, hidden]`); text self-attention layers use the text model's
//! [`LayerWeights`] (`wqkv = [q; k; v]`, `w_gate_up = [gate; up]`); cross-attention layers keep `wq` (applied to
//! text) apart from `wkv = [k; v]` (applied to the vision states, once per image), and fuse `w_gate_up`. The patch
//! embedding convolution is stored as a matrix `[hidden, channels * patch * patch]` whose columns are in
//! (channel, row, column) order, so a patch flattened in that order times its transpose gives the convolution.
//! Gates are the raw parameters: the forward applies `tanh` (and `1 - tanh` for the position embedding) as
//! transformers does.

use std::collections::HashMap;

use rayon::prelude::*;

use super::config::MllamaConfig;
use crate::quant::format::{read_linear, read_table_int8, EmbeddingQuant, QuantizationConfig};
use crate::quant::numerics::quantize_bf16_rounded;
use crate::quant::{Int8Table, QuantLinear, QuantMatrix, Scheme};
use crate::weights::{random_values, stack_rows, Checkpoint, LayerWeights, LinearWeight};
use crate::{Error, Result};

mod check;
pub(crate) use check::check_tensors;
pub use check::{check_mllama_checkpoint, expected_tensors};

/// How tensor names are spelled in a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MllamaLayout {
    /// `vision_model.*`, `language_model.model.*`, `language_model.lm_head.weight`, `multi_modal_projector.*`:
    /// the published checkpoints and what transformers' `save_pretrained` writes.
    Original,
    /// `model.vision_model.*`, `model.language_model.*`, `lm_head.weight`, `model.multi_modal_projector.*`:
    /// transformers 5's in-memory module names.
    Transformers5,
}

impl MllamaLayout {
    /// The layout of `ckpt`: [`Transformers5`](Self::Transformers5) when any tensor name starts with
    /// `model.language_model.` or `model.vision_model.`, else [`Original`](Self::Original).
    pub fn detect(ckpt: &Checkpoint) -> Self {
        if ckpt.names().any(|n| n.starts_with("model.language_model.") || n.starts_with("model.vision_model.")) {
            MllamaLayout::Transformers5
        } else {
            MllamaLayout::Original
        }
    }

    /// The name under which this layout stores the tensor with canonical (original) name `canonical`.
    pub fn tensor_name(self, canonical: &str) -> String {
        if self == MllamaLayout::Original {
            return canonical.to_owned();
        }
        const MAP: [(&str, &str); 4] = [
            ("language_model.lm_head.", "lm_head."),
            ("language_model.model.", "model.language_model."),
            ("vision_model.", "model.vision_model."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ];
        for (from, to) in MAP {
            if let Some(rest) = canonical.strip_prefix(from) {
                return format!("{to}{rest}");
            }
        }
        canonical.to_owned()
    }
}

/// Canonical names of the tensors of one decoder layer (`language_model.model.layers.{l}`).
pub(super) fn text_layer_prefix(l: usize) -> String {
    format!("language_model.model.layers.{l}")
}

/// The `quantization_config` of the checkpoint directory's config.json, if any.
fn checkpoint_quantization(ckpt: &Checkpoint) -> Result<Option<QuantizationConfig>> {
    let path = ckpt.dir().join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let root: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(&path, "<root>", format!("not valid JSON: {e}")))?;
    QuantizationConfig::from_config_json(&root, &path)
}

/// True for the embedding table and `lm_head` (canonical names).
pub(super) fn is_table(name: &str) -> bool {
    name == "language_model.model.embed_tokens.weight" || name == "language_model.lm_head.weight"
}

/// LayerNorm parameters (weight and bias, each `[width]`).
#[derive(Clone, Debug, Default)]
pub struct LayerNormWeights {
    /// Scale.
    pub weight: Vec<f32>,
    /// Shift.
    pub bias: Vec<f32>,
}

/// One vision encoder layer (local or global).
#[derive(Clone, Debug)]
pub struct VisionLayerWeights {
    /// `input_layernorm`.
    pub attn_norm: LayerNormWeights,
    /// q, k, v projections stacked: `[3 * hidden, hidden]` (no biases).
    pub wqkv: Vec<f32>,
    /// Output projection `[hidden, hidden]`.
    pub wo: Vec<f32>,
    /// `post_attention_layernorm`.
    pub mlp_norm: LayerNormWeights,
    /// `mlp.fc1` `[intermediate, hidden]`.
    pub fc1: Vec<f32>,
    /// `mlp.fc1` bias `[intermediate]`.
    pub fc1_bias: Vec<f32>,
    /// `mlp.fc2` `[hidden, intermediate]`.
    pub fc2: Vec<f32>,
    /// `mlp.fc2` bias `[hidden]`.
    pub fc2_bias: Vec<f32>,
    /// Raw `gate_attn` (global layers only; the attention output is scaled by its tanh).
    pub gate_attn: Option<f32>,
    /// Raw `gate_ffn` (global layers only; the MLP output is scaled by its tanh).
    pub gate_ffn: Option<f32>,
}

/// The vision encoder (`vision_model.*`).
#[derive(Clone, Debug, Default)]
pub struct VisionWeights {
    /// Patch-embedding convolution as a matrix `[hidden, channels * patch * patch]`, columns in
    /// (channel, row, column) order (no bias).
    pub patch_embedding: Vec<f32>,
    /// Class token `[hidden]`, prepended to each tile's patches.
    pub class_embedding: Vec<f32>,
    /// Position embedding `[num_patches, hidden]`, added scaled by `1 - tanh(position_gate)`.
    pub position_embedding: Vec<f32>,
    /// Raw `gated_positional_embedding.gate`.
    pub position_gate: f32,
    /// Per-aspect-ratio tile position embedding `[max_aspect_ratio_id + 1, max_num_tiles * num_patches * hidden]`,
    /// added scaled by `tanh(position_gate)`.
    pub tile_position_embedding: Vec<f32>,
    /// `pre_tile_positional_embedding.embedding` `[max_aspect_ratio_id + 1, max_num_tiles * hidden]`.
    pub pre_tile_embedding: Vec<f32>,
    /// Raw `pre_tile_positional_embedding.gate`.
    pub pre_tile_gate: f32,
    /// `post_tile_positional_embedding.embedding` `[max_aspect_ratio_id + 1, max_num_tiles * hidden]`.
    pub post_tile_embedding: Vec<f32>,
    /// Raw `post_tile_positional_embedding.gate`.
    pub post_tile_gate: f32,
    /// `layernorm_pre` (epsilon [`VISION_OUTER_LAYERNORM_EPS`](super::config::VISION_OUTER_LAYERNORM_EPS)).
    pub layernorm_pre: LayerNormWeights,
    /// `layernorm_post` (same epsilon).
    pub layernorm_post: LayerNormWeights,
    /// Local encoder layers (`transformer.layers`).
    pub layers: Vec<VisionLayerWeights>,
    /// Global encoder layers (`global_transformer.layers`), gated.
    pub global_layers: Vec<VisionLayerWeights>,
}

/// A gated cross-attention decoder layer.
#[derive(Clone, Debug)]
pub struct CrossAttentionLayerWeights {
    /// `input_layernorm` `[hidden]` (RMSNorm).
    pub attn_norm: Vec<f32>,
    /// Query projection `[q_dim, hidden]`, applied to the text.
    pub wq: LinearWeight,
    /// Key and value projections stacked `[2 * kv_dim, hidden]`, applied to the projected vision states.
    pub wkv: LinearWeight,
    /// Output projection `[hidden, q_dim]`.
    pub wo: LinearWeight,
    /// Per-head RMSNorm of the queries `[head_dim]`.
    pub q_norm: Vec<f32>,
    /// Per-head RMSNorm of the keys `[head_dim]`.
    pub k_norm: Vec<f32>,
    /// Raw `cross_attn_attn_gate` (the attention output is scaled by its tanh).
    pub attn_gate: f32,
    /// `post_attention_layernorm` `[hidden]`.
    pub mlp_norm: Vec<f32>,
    /// Gate and up projections stacked `[2 * intermediate, hidden]`.
    pub w_gate_up: LinearWeight,
    /// Down projection `[hidden, intermediate]`.
    pub w_down: LinearWeight,
    /// Raw `cross_attn_mlp_gate` (the MLP output is scaled by its tanh).
    pub mlp_gate: f32,
}

/// One decoder layer of the text model.
#[derive(Clone, Debug)]
pub enum TextLayerWeights {
    /// An ordinary Llama layer, in the text model's CPU layout.
    SelfAttention(LayerWeights),
    /// A gated cross-attention layer.
    CrossAttention(CrossAttentionLayerWeights),
}

/// The text decoder (`language_model.*`).
#[derive(Clone, Debug, Default)]
pub struct TextWeights {
    /// Embedding table `[vocab_size + 8, hidden]` (includes the image token's row).
    pub embed: Vec<f32>,
    /// Decoder layers, in order.
    pub layers: Vec<TextLayerWeights>,
    /// Final RMSNorm `[hidden]`.
    pub final_norm: Vec<f32>,
    /// Output projection `[vocab_size, hidden]` (never tied).
    pub lm_head: Vec<f32>,
    /// The embedding table in int8, when the checkpoint keeps it so (`--embeddings int8`); `embed` is then exactly
    /// its dequantization. The CUDA decoder keeps this form.
    pub embed_int8: Option<Int8Table>,
    /// `lm_head` in int8, as `embed_int8`.
    pub lm_head_int8: Option<Int8Table>,
}

impl TextWeights {
    /// Quantizes the embedding table and `lm_head` to int8 per row ([`Int8Table::quantize`], the numerics of
    /// `llama32 quantize --embeddings int8`): the f32 tables become their exact dequantizations and the int8 forms
    /// are kept for the CUDA decoder. Tables already in int8 are left as they are. For `--embeddings int8`.
    pub fn quantize_tables_int8(&mut self) -> Result<()> {
        let cols = self.final_norm.len();
        if cols == 0 {
            return Err(Error::request("cannot quantize the tables of a model with hidden size 0"));
        }
        let embed = "language_model.model.embed_tokens.weight";
        Int8Table::quantize_in_place(&mut self.embed, &mut self.embed_int8, cols, embed)?;
        Int8Table::quantize_in_place(&mut self.lm_head, &mut self.lm_head_int8, cols, "language_model.lm_head.weight")?;
        Ok(())
    }
}

/// All weights of an `MllamaForConditionalGeneration` in the CPU layout.
#[derive(Clone, Debug, Default)]
pub struct MllamaWeights {
    /// The vision encoder.
    pub vision: VisionWeights,
    /// `multi_modal_projector.weight` `[text hidden, vision_output_dim]`.
    pub projector: Vec<f32>,
    /// `multi_modal_projector.bias` `[text hidden]`.
    pub projector_bias: Vec<f32>,
    /// The text decoder.
    pub text: TextWeights,
}

impl MllamaWeights {
    /// Checks `ckpt` against `cfg` ([`check_mllama_checkpoint`]) and converts every tensor to f32.
    ///
    /// A checkpoint written by `llama32 quantize` (a `quantization_config` in its config.json) loads with its
    /// language-model projections quantized: [`LinearWeight::quant`] holds the int4 form and `dense` its exact
    /// dequantization, so W4A16 runs as the f32 reference and W4A8 through its integer kernel.
    pub fn load(ckpt: &Checkpoint, cfg: &MllamaConfig) -> Result<Self> {
        match checkpoint_quantization(ckpt)? {
            Some(q) => {
                let layout = check_tensors(ckpt, cfg, Some(&q))?;
                Self::build(&Reader::new(cfg, Source::Quantized(ckpt, layout, &q)), cfg)
            }
            None => {
                let layout = check_mllama_checkpoint(ckpt, cfg)?;
                Self::build(&Reader::new(cfg, Source::Checkpoint(ckpt, layout)), cfg)
            }
        }
    }

    /// [`load`](Self::load), with the language model's projections quantized on reading with `quantize` when
    /// given (the checkpoint quantizer's numerics; dense keeps the exact dequantization, as for a quantized
    /// checkpoint). A checkpoint that is already quantized refuses `quantize`.
    pub fn load_with(ckpt: &Checkpoint, cfg: &MllamaConfig, quantize: Option<Scheme>) -> Result<Self> {
        let Some(scheme) = quantize else { return Self::load(ckpt, cfg) };
        if let Some(q) = checkpoint_quantization(ckpt)? {
            return Err(Error::weights(
                ckpt.dir(),
                format!("cannot quantize to {}: the checkpoint is already quantized ({q})", scheme.name()),
            ));
        }
        let layout = check_mllama_checkpoint(ckpt, cfg)?;
        let mut r = Reader::new(cfg, Source::Checkpoint(ckpt, layout));
        r.quantize = Some(scheme);
        Self::build(&r, cfg)
    }

    /// Random weights at the config's shapes, reproducible from `seed`: matrices, embeddings and linear biases
    /// uniform with standard deviation 0.02 (drawn per tensor name), norm weights 1, LayerNorm biases 0, and every
    /// gate at pi/4 (tanh 0.66) so that each gated path contributes. For benchmarks and smoke runs only.
    pub fn random(cfg: &MllamaConfig, seed: u64) -> Result<Self> {
        Self::build(&Reader::new(cfg, Source::Random(seed)), cfg)
    }

    /// [`random`](Self::random) with the language model's projections generated in int4 by `quantize` (as
    /// [`TextSource::random`] does), keeping their exact dequantization for the CPU reference.
    pub fn random_with(cfg: &MllamaConfig, seed: u64, quantize: Option<Scheme>) -> Result<Self> {
        let mut r = Reader::new(cfg, Source::Random(seed));
        r.quantize = quantize;
        Self::build(&r, cfg)
    }

    /// The vision encoder and projector of [`random`](Self::random) alone (the text part is empty).
    pub fn random_vision(cfg: &MllamaConfig, seed: u64) -> Result<Self> {
        check_vision_host_memory(cfg)?;
        Self::build_vision(&Reader::new(cfg, Source::Random(seed)), cfg)
    }

    /// Checks `ckpt` against `cfg` and converts only the vision encoder and projector tensors to f32 (the text
    /// part is left empty): what an image encoder needs when the text decoder is loaded elsewhere, e.g. as
    /// tensor-parallel ranks that read their own slices.
    pub fn load_vision(ckpt: &Checkpoint, cfg: &MllamaConfig) -> Result<Self> {
        let q = checkpoint_quantization(ckpt)?;
        let layout = check_tensors(ckpt, cfg, q.as_ref())?;
        check_vision_host_memory(cfg)?;
        Self::build_vision(&Reader::new(cfg, Source::Checkpoint(ckpt, layout)), cfg)
    }

    fn build(r: &Reader<'_>, cfg: &MllamaConfig) -> Result<Self> {
        crate::weights::check_host_f32("the model's", cfg.num_parameters(), || sizes_of(cfg))?;
        let mut w = Self::build_vision(r, cfg)?;
        w.text = Self::build_text(r, cfg)?;
        Ok(w)
    }

    fn build_vision(r: &Reader<'_>, cfg: &MllamaConfig) -> Result<Self> {
        let v = &cfg.vision;
        let vision_layers = |encoder: &str, n: usize, gated: bool| -> Result<Vec<VisionLayerWeights>> {
            (0..n)
                .into_par_iter()
                .map(|l| {
                    let p = format!("vision_model.{encoder}.layers.{l}");
                    Ok(VisionLayerWeights {
                        attn_norm: r.layer_norm(&format!("{p}.input_layernorm"))?,
                        wqkv: r.cat(&["q", "k", "v"].map(|x| format!("{p}.self_attn.{x}_proj.weight")))?,
                        wo: r.read(&format!("{p}.self_attn.o_proj.weight"))?,
                        mlp_norm: r.layer_norm(&format!("{p}.post_attention_layernorm"))?,
                        fc1: r.read(&format!("{p}.mlp.fc1.weight"))?,
                        fc1_bias: r.read(&format!("{p}.mlp.fc1.bias"))?,
                        fc2: r.read(&format!("{p}.mlp.fc2.weight"))?,
                        fc2_bias: r.read(&format!("{p}.mlp.fc2.bias"))?,
                        gate_attn: gated.then(|| r.scalar(&format!("{p}.gate_attn"))).transpose()?,
                        gate_ffn: gated.then(|| r.scalar(&format!("{p}.gate_ffn"))).transpose()?,
                    })
                })
                .collect()
        };
        let pv = "vision_model";
        let vision = VisionWeights {
            patch_embedding: r.read(&format!("{pv}.patch_embedding.weight"))?,
            class_embedding: r.read(&format!("{pv}.class_embedding"))?,
            position_embedding: r.read(&format!("{pv}.gated_positional_embedding.embedding"))?,
            position_gate: r.scalar(&format!("{pv}.gated_positional_embedding.gate"))?,
            tile_position_embedding: r.read(&format!("{pv}.gated_positional_embedding.tile_embedding.weight"))?,
            pre_tile_embedding: r.read(&format!("{pv}.pre_tile_positional_embedding.embedding.weight"))?,
            pre_tile_gate: r.scalar(&format!("{pv}.pre_tile_positional_embedding.gate"))?,
            post_tile_embedding: r.read(&format!("{pv}.post_tile_positional_embedding.embedding.weight"))?,
            post_tile_gate: r.scalar(&format!("{pv}.post_tile_positional_embedding.gate"))?,
            layernorm_pre: r.layer_norm(&format!("{pv}.layernorm_pre"))?,
            layernorm_post: r.layer_norm(&format!("{pv}.layernorm_post"))?,
            layers: vision_layers("transformer", v.num_hidden_layers, false)?,
            global_layers: vision_layers("global_transformer", v.num_global_layers, true)?,
        };
        Ok(MllamaWeights {
            vision,
            projector: r.read("multi_modal_projector.weight")?,
            projector_bias: r.read("multi_modal_projector.bias")?,
            text: TextWeights::default(),
        })
    }

    fn build_text(r: &Reader<'_>, cfg: &MllamaConfig) -> Result<TextWeights> {
        let layers = (0..cfg.text.base.num_hidden_layers)
            .into_par_iter()
            .map(|l| text_layer(r, cfg, l))
            .collect::<Result<Vec<_>>>()?;
        let (embed, embed_int8) = r.read_table("language_model.model.embed_tokens.weight")?;
        let (lm_head, lm_head_int8) = r.read_table("language_model.lm_head.weight")?;
        Ok(TextWeights {
            embed,
            layers,
            final_norm: r.read("language_model.model.norm.weight")?,
            lm_head,
            embed_int8,
            lm_head_int8,
        })
    }
}

/// Where [`text_layer`] reads a decoder layer's tensors (canonical names): the whole model ([`Reader`]) or one
/// tensor-parallel rank's share of it (`tp::load::MllamaRankSource`).
pub(crate) trait LayerTensors {
    /// A projection stacked from `names` (each `[n_i, k]`), f32 or quantized as the source says.
    fn proj(&self, names: &[String]) -> Result<LinearWeight>;
    /// One tensor, flattened.
    fn vector(&self, name: &str) -> Result<Vec<f32>>;
    /// The value of a one-element tensor (a tanh gate).
    fn scalar(&self, name: &str) -> Result<f32>;
}

impl LayerTensors for Reader<'_> {
    fn proj(&self, names: &[String]) -> Result<LinearWeight> {
        Reader::proj(self, names)
    }

    fn vector(&self, name: &str) -> Result<Vec<f32>> {
        self.read(name)
    }

    fn scalar(&self, name: &str) -> Result<f32> {
        Reader::scalar(self, name)
    }
}

/// Decoder layer `l` read through `r`.
pub(crate) fn text_layer(r: &impl LayerTensors, cfg: &MllamaConfig, l: usize) -> Result<TextLayerWeights> {
    let p = text_layer_prefix(l);
    let w_gate_up = r.proj(&[format!("{p}.mlp.gate_proj.weight"), format!("{p}.mlp.up_proj.weight")])?;
    let w_down = r.proj(&[format!("{p}.mlp.down_proj.weight")])?;
    let attn_norm = r.vector(&format!("{p}.input_layernorm.weight"))?;
    let mlp_norm = r.vector(&format!("{p}.post_attention_layernorm.weight"))?;
    if cfg.text.is_cross_attention_layer(l) {
        let a = format!("{p}.cross_attn");
        Ok(TextLayerWeights::CrossAttention(CrossAttentionLayerWeights {
            attn_norm,
            wq: r.proj(&[format!("{a}.q_proj.weight")])?,
            wkv: r.proj(&[format!("{a}.k_proj.weight"), format!("{a}.v_proj.weight")])?,
            wo: r.proj(&[format!("{a}.o_proj.weight")])?,
            q_norm: r.vector(&format!("{a}.q_norm.weight"))?,
            k_norm: r.vector(&format!("{a}.k_norm.weight"))?,
            attn_gate: r.scalar(&format!("{p}.cross_attn_attn_gate"))?,
            mlp_norm,
            w_gate_up,
            w_down,
            mlp_gate: r.scalar(&format!("{p}.cross_attn_mlp_gate"))?,
        }))
    } else {
        let a = format!("{p}.self_attn");
        Ok(TextLayerWeights::SelfAttention(LayerWeights {
            attn_norm,
            wqkv: r.proj(&["q", "k", "v"].map(|x| format!("{a}.{x}_proj.weight")))?,
            wo: r.proj(&[format!("{a}.o_proj.weight")])?,
            mlp_norm,
            w_gate_up,
            w_down,
        }))
    }
}

/// The text decoder's weights read one layer at a time, from a checkpoint (quantized or not) or as seeded random
/// values, optionally quantizing the projections as they are read: what a device executor uploads layer by layer,
/// so that no host ever holds the whole model (90B Vision is 350 GB in f32).
///
/// Quantized projections come without their dense f32 copy ([`LinearWeight::quantized_only`]). With `quantize`,
/// checkpoint projections are rounded to bf16 and quantized with the checkpoint-quantizer's numerics, and random
/// ones are generated straight in int4 ([`QuantMatrix::random`](crate::quant::QuantMatrix::random)).
pub struct TextSource<'a> {
    r: Reader<'a>,
    cfg: MllamaConfig,
}

impl<'a> TextSource<'a> {
    /// The text decoder of `ckpt` (checked whole against `cfg` first), quantized on reading with `quantize` when
    /// given; a checkpoint that is already quantized keeps its own scheme and refuses `quantize`.
    pub fn checkpoint(ckpt: &'a Checkpoint, cfg: &MllamaConfig, quantize: Option<Scheme>) -> Result<Self> {
        let src = match (checkpoint_quantization(ckpt)?, quantize) {
            (Some(q), Some(s)) => {
                return Err(Error::weights(
                    ckpt.dir(),
                    format!("cannot quantize to {}: the checkpoint is already quantized ({q})", s.name()),
                ))
            }
            (Some(q), None) => {
                let layout = check_tensors(ckpt, cfg, Some(&q))?;
                Source::QuantizedOwned(ckpt, layout, q)
            }
            (None, _) => Source::Checkpoint(ckpt, check_mllama_checkpoint(ckpt, cfg)?),
        };
        let mut r = Reader::new(cfg, src);
        r.quantize = quantize;
        r.keep_dense = false;
        Ok(TextSource { r, cfg: cfg.clone() })
    }

    /// Seeded random weights at `cfg`'s shapes (as [`MllamaWeights::random`] draws them), with the projections
    /// generated in int4 when `quantize` is given.
    pub fn random(cfg: &MllamaConfig, seed: u64, quantize: Option<Scheme>) -> Self {
        let mut r = Reader::new(cfg, Source::Random(seed));
        r.quantize = quantize;
        r.keep_dense = false;
        TextSource { r, cfg: cfg.clone() }
    }

    /// The projections' quantization scheme, if any (the checkpoint's or the requested one).
    pub fn scheme(&self) -> Option<Scheme> {
        match &self.r.src {
            Source::QuantizedOwned(_, _, q) => Some(q.scheme),
            _ => self.r.quantize,
        }
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.cfg.text.base.num_hidden_layers
    }

    /// Decoder layer `l`.
    pub fn layer(&self, l: usize) -> Result<TextLayerWeights> {
        if l >= self.num_layers() {
            return Err(Error::request(format!("text layer {l} of {}", self.num_layers())));
        }
        text_layer(&self.r, &self.cfg, l)
    }

    /// Embedding table `[vocab_size + 8, hidden]`.
    pub fn embed(&self) -> Result<Vec<f32>> {
        self.r.read("language_model.model.embed_tokens.weight")
    }

    /// The embedding table with its int8 form, when it has one: an int8-embeddings checkpoint's, or, after
    /// [`with_int8_tables`](Self::with_int8_tables), the table quantized as `llama32 quantize --embeddings int8`
    /// does. The f32 table is then exactly its dequantization.
    pub fn embed_table(&self) -> Result<(Vec<f32>, Option<Int8Table>)> {
        self.r.read_table("language_model.model.embed_tokens.weight")
    }

    /// `lm_head` with its int8 form, as [`embed_table`](Self::embed_table).
    pub fn lm_head_table(&self) -> Result<(Vec<f32>, Option<Int8Table>)> {
        self.r.read_table("language_model.lm_head.weight")
    }

    /// Quantizes the embedding table and `lm_head` to int8 as they are read (for random weights or a bf16
    /// checkpoint: what an int8-embeddings checkpoint holds); an int8-embeddings checkpoint's tables are int8
    /// either way.
    pub fn with_int8_tables(mut self) -> Self {
        self.r.tables_int8 = true;
        self
    }

    /// Final RMSNorm `[hidden]`.
    pub fn final_norm(&self) -> Result<Vec<f32>> {
        self.r.read("language_model.model.norm.weight")
    }

    /// Output projection `[vocab_size, hidden]`.
    pub fn lm_head(&self) -> Result<Vec<f32>> {
        self.r.read("language_model.lm_head.weight")
    }
}

enum Source<'a> {
    Checkpoint(&'a Checkpoint, MllamaLayout),
    /// A checkpoint whose language-model projections are quantized (`llama32 quantize`).
    Quantized(&'a Checkpoint, MllamaLayout, &'a QuantizationConfig),
    /// The same, owning its quantization config.
    QuantizedOwned(&'a Checkpoint, MllamaLayout, QuantizationConfig),
    Random(u64),
}

/// Reads tensors by canonical name, from a checked checkpoint or as seeded random values.
struct Reader<'a> {
    shapes: HashMap<String, Vec<usize>>,
    src: Source<'a>,
    /// Quantize unquantized projections with this scheme as they are read.
    quantize: Option<Scheme>,
    /// Keep the dense f32 copy of quantized projections (the CPU reference's W4A16 form).
    keep_dense: bool,
    /// Quantize the embedding table and `lm_head` to int8 as they are read ([`TextSource::with_int8_tables`]).
    tables_int8: bool,
}

impl<'a> Reader<'a> {
    fn new(cfg: &MllamaConfig, src: Source<'a>) -> Self {
        Reader {
            shapes: expected_tensors(cfg).into_iter().collect(),
            src,
            quantize: None,
            keep_dense: true,
            tables_int8: false,
        }
    }

    /// A table (`embed_tokens` or `lm_head`, canonical name) in f32 with its int8 form: an int8-embeddings
    /// checkpoint's, or the table quantized when `tables_int8` asks for it; else the f32 table alone.
    fn read_table(&self, name: &str) -> Result<(Vec<f32>, Option<Int8Table>)> {
        if let Some((ckpt, layout, q)) = self.stored_quant() {
            if q.embeddings == EmbeddingQuant::Int8 && is_table(name) {
                let shape = self.shape(name)?;
                let stored = layout.tensor_name(name);
                if let Some(t) = read_table_int8(ckpt, &stored, shape[0], shape[1])? {
                    return Ok((t.dequantize(), Some(t)));
                }
            }
        }
        let values = self.read_tensor(name)?;
        if !self.tables_int8 {
            return Ok((values, None));
        }
        let shape = self.shape(name)?;
        let (f32s, t) = Int8Table::quantize_with_f32(&values, shape[0], shape[1], name)?;
        Ok((f32s, Some(t)))
    }

    /// The checkpoint's quantization, when its projections are stored quantized.
    fn stored_quant(&self) -> Option<(&'a Checkpoint, MllamaLayout, &QuantizationConfig)> {
        match &self.src {
            Source::Quantized(c, l, q) => Some((c, *l, q)),
            Source::QuantizedOwned(c, l, q) => Some((c, *l, q)),
            _ => None,
        }
    }

    fn shape(&self, name: &str) -> Result<&[usize]> {
        self.shapes
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::weights("<mllama>", format!("internal: `{name}` is not an Mllama tensor")))
    }

    /// Tensor `name` in f32; a table (`embed_tokens`, `lm_head`) as [`read_table`](Self::read_table) gives it.
    fn read(&self, name: &str) -> Result<Vec<f32>> {
        if is_table(name) {
            return Ok(self.read_table(name)?.0);
        }
        self.read_tensor(name)
    }

    /// Tensor `name` as the source stores it unquantized, in f32.
    fn read_tensor(&self, name: &str) -> Result<Vec<f32>> {
        let numel: usize = self.shape(name)?.iter().product();
        let (ckpt, layout) = match &self.src {
            Source::Random(seed) => return Ok(random_tensor(name, numel, *seed)),
            Source::Checkpoint(c, l) | Source::Quantized(c, l, _) | Source::QuantizedOwned(c, l, _) => (*c, *l),
        };
        let stored = layout.tensor_name(name);
        let (view, path) =
            ckpt.get(&stored).ok_or_else(|| Error::weights(ckpt.dir(), format!("missing tensor `{stored}`")))?;
        if view.numel() != numel {
            return Err(Error::weights(
                path,
                format!("tensor `{stored}` has {} elements, expected {numel}", view.numel()),
            ));
        }
        Ok(view.to_f32())
    }

    fn cat(&self, names: &[String]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for n in names {
            out.extend(self.read(n)?);
        }
        Ok(out)
    }

    /// A projection stacked from `names` (each `[n_i, k]`, `... .weight`): quantized matrices read with
    /// [`read_linear`] from a quantized checkpoint, quantized on reading with `quantize` (random ones generated in
    /// int4), f32 values otherwise. Quantized ones keep their exact dequantization as `dense` when `keep_dense`.
    fn proj(&self, names: &[String]) -> Result<LinearWeight> {
        let parts = if let Some((ckpt, layout, q)) = self.stored_quant() {
            names
                .iter()
                .map(|name| {
                    let shape = self.shape(name)?;
                    read_linear(ckpt, &layout.tensor_name(name), q, shape[0], shape[1])
                })
                .collect::<Result<Vec<_>>>()?
        } else if let Some(scheme) = self.quantize {
            names
                .iter()
                .map(|name| {
                    let (n, k) = match self.shape(name)? {
                        [n, k] => (*n, *k),
                        s => return Err(Error::weights("<mllama>", format!("`{name}` has shape {s:?}, not 2-D"))),
                    };
                    let matrix = match self.src {
                        Source::Random(seed) => QuantMatrix::random(n, k, scheme.group, seed, name_stream(name))?,
                        _ => quantize_bf16_rounded(self.read(name)?, n, k, scheme.group)
                            .map_err(|e| Error::weights("<mllama>", format!("quantizing `{name}`: {e}")))?,
                    };
                    Ok(QuantLinear { matrix, scheme })
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            return Ok(self.cat(names)?.into());
        };
        let q = stack_rows(parts, &names[0])?;
        Ok(if self.keep_dense { LinearWeight::quantized(q) } else { LinearWeight::quantized_only(q) })
    }

    fn scalar(&self, name: &str) -> Result<f32> {
        Ok(self.read(name)?[0])
    }

    fn layer_norm(&self, prefix: &str) -> Result<LayerNormWeights> {
        Ok(LayerNormWeights {
            weight: self.read(&format!("{prefix}.weight"))?,
            bias: self.read(&format!("{prefix}.bias"))?,
        })
    }
}

/// The random stream of a tensor: FNV-1a of its name.
fn name_stream(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Seeded values for one tensor: norms 1, LayerNorm biases 0, gates pi/4, everything else uniform (std 0.02) from
/// a stream named by the tensor, so a tensor's values do not depend on the others.
fn random_tensor(name: &str, numel: usize, seed: u64) -> Vec<f32> {
    let is_gate = name.ends_with("_gate")
        || name.ends_with(".gate")
        || name.ends_with(".gate_attn")
        || name.ends_with(".gate_ffn");
    let is_norm = name.contains("norm") && !name.contains("embedding");
    if is_gate {
        vec![std::f32::consts::FRAC_PI_4; numel]
    } else if is_norm && name.ends_with(".weight") {
        vec![1.0; numel]
    } else if is_norm && name.ends_with(".bias") {
        vec![0.0; numel]
    } else {
        random_values(numel, seed, name_stream(name))
    }
}

/// The host-memory check of the vision encoder and projector alone, for the loads that build only them (`build`
/// checks the whole model's).
fn check_vision_host_memory(cfg: &MllamaConfig) -> Result<()> {
    crate::weights::check_host_f32("the vision encoder's", cfg.num_vision_parameters(), || sizes_of(cfg))
}

/// The config sizes an out-of-memory refusal names.
fn sizes_of(cfg: &MllamaConfig) -> String {
    let (v, t) = (&cfg.vision, &cfg.text.base);
    format!(
        "vision hidden_size {}, intermediate_size {}, {} + {} layers; text hidden_size {}, intermediate_size {}, {} \
         layers, vocabulary {}",
        v.hidden_size,
        v.intermediate_size,
        v.num_hidden_layers,
        v.num_global_layers,
        t.hidden_size,
        t.intermediate_size,
        t.num_hidden_layers,
        t.vocab_size
    )
}
