//! Loading one rank's shard: only the rows or columns the [`TpPlan`] gives the rank are read from the memory-mapped
//! safetensors and converted to f32, so no rank (and no host) ever holds a full copy of a sharded tensor.
//! [`load_rank_weights`] reads a text model's shard, [`load_mllama_rank_text`] the text decoder of a Llama 3.2
//! Vision checkpoint (split as [`super::plan::vision_split`] says).
//!
//! Quantized text models ([`RankQuant`]): a quantized checkpoint's projections are read whole with
//! [`read_linear`] and sliced ([`QuantMatrix::slice`](crate::quant::QuantMatrix::slice)); with quantization at load
//! time the rank's f32 slices are rounded to bf16 and quantized ([`quantize_bf16_rounded`]). Weights are quantized
//! per row in groups along K, so both give exactly the rank's part of the whole model's quantization, as long as
//! the row-parallel projections (`o_proj`, `down_proj`) split K on group boundaries ([`check_quantized_plan`]).

use std::ops::Range;

use rayon::prelude::*;

use super::plan::{vision_split, RankShard, Split, TpPlan};
use crate::quant::format::{read_linear, read_table_int8, QuantizationConfig};
use crate::quant::numerics::quantize_bf16_rounded;
use crate::quant::{ActQuant, AtLoad, Int8Table, QuantLinear, Scheme};
use crate::vision::config::MllamaConfig;
use crate::vision::weights::{
    check_mllama_checkpoint, expected_tensors as mllama_tensors, text_layer, LayerTensors, MllamaLayout,
    TextLayerWeights, TextWeights,
};
use crate::weights::{
    check_checkpoint, random_chunk, stack_rows, Checkpoint, LayerWeights, LinearWeight, ModelWeights, TensorView,
    WeightSource, RANDOM_CHUNK,
};
use crate::{Error, Result};

/// A part of a row-major `[rows, cols]` tensor.
#[derive(Clone, Debug)]
struct Part {
    rows: Range<usize>,
    cols: Range<usize>,
}

/// Appends the elements `part` of a `[.., row_len]` matrix that starts at element `base` of the random stream
/// `(seed, stream)`, with the same values [`crate::weights::random_values`] gives the whole stream. Only the chunks
/// the part touches are generated, one chunk at a time.
fn random_part(seed: u64, stream: u64, base: usize, row_len: usize, part: &Part, out: &mut Vec<f32>) {
    if part.rows.is_empty() || part.cols.is_empty() {
        return;
    }
    let first = base + part.rows.start * row_len + part.cols.start;
    let last = base + (part.rows.end - 1) * row_len + part.cols.end; // exclusive
    let mut buf = vec![0.0f32; RANDOM_CHUNK];
    for chunk in first / RANDOM_CHUNK..=(last - 1) / RANDOM_CHUNK {
        let start = chunk * RANDOM_CHUNK;
        let end = (start + RANDOM_CHUNK).min(last);
        random_chunk(seed, stream, chunk, &mut buf[..end - start]);
        for idx in start.max(first)..end {
            if part.cols.contains(&((idx - base) % row_len)) {
                out.push(buf[idx - start]);
            }
        }
    }
}

/// Appends `part` of a checkpoint tensor viewed as `[.., cols]`, converting only those bytes.
fn view_part(view: &TensorView<'_>, cols: usize, part: &Part, out: &mut Vec<f32>) {
    let es = view.dtype.size();
    let n = part.cols.len();
    let shape = [n];
    let old = out.len();
    out.resize(old + part.rows.len() * n, 0.0);
    let dst = &mut out[old..];
    if part.cols.start == 0 && part.cols.end == cols {
        // Whole rows: one contiguous byte range.
        let bytes = &view.bytes[part.rows.start * cols * es..part.rows.end * cols * es];
        let shape = [dst.len()];
        TensorView { dtype: view.dtype, shape: &shape, bytes }.to_f32_into(dst);
        return;
    }
    for (row, d) in part.rows.clone().zip(dst.chunks_mut(n.max(1))) {
        let at = (row * cols + part.cols.start) * es;
        TensorView { dtype: view.dtype, shape: &shape, bytes: &view.bytes[at..at + n * es] }.to_f32_into(d);
    }
}

/// One part of a fused backend tensor: a checkpoint tensor (or a norm of ones) and the part of it the rank keeps.
struct Piece {
    name: String,
    /// Full `[rows, cols]` shape of the checkpoint tensor.
    shape: [usize; 2],
    part: Part,
    /// Offset of this tensor's first element in the random stream of its fused spec.
    random_base: usize,
    stream: u64,
    is_norm: bool,
}

fn read_pieces(src: &WeightSource<'_>, pieces: &[Piece]) -> Result<Vec<f32>> {
    let total: usize = pieces.iter().map(|p| p.part.rows.len() * p.part.cols.len()).sum();
    let mut out = Vec::with_capacity(total);
    for p in pieces {
        match *src {
            WeightSource::Random(_) if p.is_norm => out.resize(out.len() + p.part.rows.len() * p.part.cols.len(), 1.0),
            WeightSource::Random(seed) => random_part(seed, p.stream, p.random_base, p.shape[1], &p.part, &mut out),
            WeightSource::Checkpoint(ckpt) => {
                let (view, path) =
                    ckpt.get(&p.name).ok_or_else(|| Error::weights(ckpt.dir(), format!("missing `{}`", p.name)))?;
                let numel: usize = view.shape.iter().product();
                if numel != p.shape[0] * p.shape[1] || view.bytes.len() != numel * view.dtype.size() {
                    return Err(Error::weights(
                        path,
                        format!("tensor `{}` has shape {:?}, expected {:?}", p.name, view.shape, p.shape),
                    ));
                }
                view_part(&view, p.shape[1], &p.part, &mut out);
            }
        }
    }
    Ok(out)
}

/// How a rank's projections come quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum RankQuant {
    /// A quantized checkpoint (its `quantization_config`): each projection is read whole with [`read_linear`]
    /// (any format it reads), then the rank's rows or columns are sliced out.
    Checkpoint(QuantizationConfig),
    /// Unquantized weights (a checkpoint or random) quantized at load time: the rank's f32 slices, rounded to bf16,
    /// go through [`quantize_bf16_rounded`] (the numerics of [`ModelWeights::quantize_in_place`]).
    AtLoad(Scheme),
}

impl RankQuant {
    /// The scheme the projections run with.
    pub fn scheme(&self) -> Scheme {
        match self {
            RankQuant::Checkpoint(q) => q.scheme,
            RankQuant::AtLoad(s) => *s,
        }
    }

    /// The quantization of `src` with `at_load` asked for: a checkpoint's own `quantization_config` (from its
    /// config.json), else `at_load`. A quantized checkpoint with `at_load` is refused (it is quantized already).
    pub fn resolve(src: &WeightSource<'_>, at_load: Option<Scheme>) -> Result<Option<RankQuant>> {
        let own = match src {
            WeightSource::Checkpoint(ckpt) => checkpoint_quantization(ckpt)?,
            WeightSource::Random(_) => None,
        };
        match (own, at_load) {
            (Some(q), Some(s)) => Err(Error::request(format!(
                "quantizing with {} at load: the checkpoint is already quantized ({q})",
                s.name()
            ))),
            (Some(q), None) => Ok(Some(RankQuant::Checkpoint(q))),
            (None, s) => Ok(s.map(RankQuant::AtLoad)),
        }
    }
}

/// The `quantization_config` of the checkpoint's config.json, if it has one (`None` also when there is no
/// config.json next to the weights).
pub fn checkpoint_quantization(ckpt: &Checkpoint) -> Result<Option<QuantizationConfig>> {
    let path = ckpt.dir().join("config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::weights(&path, format!("reading: {e}")))?;
    let root: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::weights(&path, format!("parsing: {e}")))?;
    QuantizationConfig::from_config_json(&root, &path)
}

/// Checks that `plan` can run projections quantized with `scheme`: W4A8 is refused for `tp > 1` (a row-parallel
/// projection would quantize each rank's partial activations per token over the rank's own K slice, other numerics
/// than tp = 1), and the K share of each row-parallel projection (`o_proj`: the rank's query heads x `head_dim`;
/// `down_proj`: `intermediate_size / tp`) must be a multiple of the group, so that no group straddles two ranks.
/// Errors name the scheme, the tensor and the degree.
pub fn check_quantized_plan(plan: &TpPlan, scheme: Scheme) -> Result<()> {
    let tp = plan.tp();
    if tp == 1 {
        return Ok(());
    }
    if scheme.act == ActQuant::Int8PerToken {
        return Err(Error::request(format!(
            "tensor parallelism (tp = {tp}) does not support {}: its row-parallel projections (o_proj, down_proj) \
             would quantize each rank's partial activations to int8 per token over the rank's own slice of K, which \
             are other numerics than tp = 1; use w4a16-g{} (weight-only int4) or tp = 1",
            scheme.name(),
            scheme.group
        )));
    }
    let c = plan.config();
    let r = plan.rank(0)?;
    let shares = [
        ("model.layers.*.self_attn.o_proj", c.q_dim(), r.q_heads.len() * c.head_dim),
        ("model.layers.*.mlp.down_proj", c.intermediate_size, r.inter.len()),
    ];
    for (name, k, share) in shares {
        if scheme.group == 0 || share % scheme.group != 0 {
            return Err(Error::request(format!(
                "tensor parallelism (tp = {tp}) with {}: `{name}` is split by its {k} input columns, {share} per \
                 rank, which is not a multiple of the quantization group {} (groups would straddle ranks); use a \
                 degree whose share is a multiple of {}",
                scheme.name(),
                scheme.group,
                scheme.group
            )));
        }
    }
    Ok(())
}

/// A rank's projection from its `pieces` (stacked along rows): f32 without `quant`; for a quantized checkpoint each
/// tensor read whole with [`read_linear`] (any format it reads) and the rank's rows or columns sliced out; else the
/// rank's f32 slice quantized at load (rounded to bf16 first, as the checkpoint quantizer does). `keep_dense` keeps
/// the dense dequantization of a quantized projection (the CPU reference needs it); `(rank, tp)` label errors.
fn rank_projection(
    src: &WeightSource<'_>,
    quant: Option<&RankQuant>,
    pieces: &[Piece],
    keep_dense: bool,
    (rank, tp): (usize, usize),
) -> Result<LinearWeight> {
    let wrap = |q: QuantLinear| if keep_dense { LinearWeight::quantized(q) } else { LinearWeight::quantized_only(q) };
    match (quant, src) {
        (None, _) => Ok(read_pieces(src, pieces)?.into()),
        (Some(RankQuant::Checkpoint(qcfg)), WeightSource::Checkpoint(ckpt)) => {
            let parts = pieces
                .iter()
                .map(|p| {
                    let whole = read_linear(ckpt, &p.name, qcfg, p.shape[0], p.shape[1])?;
                    let matrix = whole
                        .matrix
                        .slice(p.part.rows.clone(), p.part.cols.clone())
                        .map_err(|e| Error::weights(ckpt.dir(), format!("`{}`, rank {rank} of {tp}: {e}", p.name)))?;
                    Ok(QuantLinear { matrix, scheme: whole.scheme })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(wrap(stack_rows(parts, &pieces[0].name)?))
        }
        (Some(q), _) => {
            let scheme = q.scheme();
            let k = pieces[0].part.cols.len();
            let n: usize = pieces.iter().map(|p| p.part.rows.len()).sum();
            let matrix = quantize_bf16_rounded(read_pieces(src, pieces)?, n, k, scheme.group)
                .map_err(|e| Error::request(format!("`{}` [{n}, {k}] of rank {rank} of {tp}: {e}", pieces[0].name)))?;
            Ok(wrap(QuantLinear { matrix, scheme }))
        }
    }
}

/// Reads rank `rank`'s weights for `plan` from `src`. A checkpoint is checked against the full model's config first
/// (every tensor name and shape); then each rank reads only its slices from the memory map. Random weights give
/// exactly the values of the same slices of [`ModelWeights::random`] with the same seed. A quantized checkpoint
/// (one whose config.json has a `quantization_config`) is read quantized, as [`load_rank_weights_with`] does.
pub fn load_rank_weights(plan: &TpPlan, rank: usize, src: WeightSource<'_>) -> Result<ModelWeights> {
    let quant = RankQuant::resolve(&src, None)?;
    load_rank_weights_with(plan, rank, src, quant.as_ref(), true)
}

/// [`load_rank_weights_with`], then, when `tables_int8` (`--embeddings int8`), the rank's vocabulary rows quantized
/// to int8 per row ([`ModelWeights::quantize_tables_int8`]): one scale per row, so a rank's rows are exactly those
/// rows of the whole quantized table. Rows a quantized checkpoint already stores in int8 stay as they are.
pub fn load_rank_weights_at(
    plan: &TpPlan,
    rank: usize,
    src: WeightSource<'_>,
    (quant, tables_int8): (Option<&RankQuant>, bool),
    keep_dense: bool,
) -> Result<ModelWeights> {
    let mut w = load_rank_weights_with(plan, rank, src, quant, keep_dense)?;
    if tables_int8 {
        w.quantize_tables_int8().map_err(|e| Error::request(format!("tensor-parallel rank {rank}: {e}")))?;
    }
    Ok(w)
}

/// [`load_rank_weights`] with the projections quantized as `quant` says (see [`RankQuant`]; `None`: dense f32).
/// A quantized projection keeps its exact dense dequantization when `keep_dense` (the CPU reference multiplies by
/// it); without it only the int4 form is kept ([`LinearWeight::quantized_only`], for ranks bound for a device).
/// The plan is checked first ([`check_quantized_plan`]). Embeddings, norms and `lm_head` stay f32; an int8 table of
/// an int8-embeddings checkpoint is sliced to the rank's rows, kept in int8 (`embed_int8`, `lm_head_int8`) beside
/// its exact dequantization.
pub fn load_rank_weights_with(
    plan: &TpPlan,
    rank: usize,
    src: WeightSource<'_>,
    quant: Option<&RankQuant>,
    keep_dense: bool,
) -> Result<ModelWeights> {
    match (quant, &src) {
        (Some(RankQuant::Checkpoint(_)), WeightSource::Random(_)) => {
            return Err(Error::request(
                "tensor parallelism: random weights cannot be read as a quantized checkpoint (quantize them at load)",
            ))
        }
        (Some(RankQuant::Checkpoint(_)), WeightSource::Checkpoint(ckpt)) => {
            crate::weights::check_quantized_checkpoint(ckpt, plan.config())?
        }
        (_, WeightSource::Checkpoint(ckpt)) => check_checkpoint(ckpt, plan.config())?,
        (_, WeightSource::Random(_)) => {}
    }
    if let Some(q) = quant {
        check_quantized_plan(plan, q.scheme())?;
    }
    let r = plan.rank(rank)?;
    let specs = crate::weights::ModelSpecs::of(plan.config());
    let c = plan.config();
    let (h, d) = (c.hidden_size, c.head_dim);
    let all = |n: usize| 0..n;
    let piece = |name: &str, shape: [usize; 2], part: Part, random_base: usize, stream: u64, is_norm: bool| Piece {
        name: name.to_owned(),
        shape,
        part,
        random_base,
        stream,
        is_norm,
    };
    let norm = |spec: &crate::weights::FusedSpec| -> Result<Vec<f32>> {
        let p = piece(&spec.names[0], [1, h], Part { rows: 0..1, cols: all(h) }, 0, spec.stream, true);
        read_pieces(&src, &[p])
    };
    let proj = |pieces: &[Piece]| rank_projection(&src, quant, pieces, keep_dense, (rank, plan.tp()));
    let heads = |x: &Range<usize>| x.start * d..x.end * d;
    let rs: &RankShard = &r;
    let layers = specs
        .layers
        .par_iter()
        .map(|l| {
            let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
            let qkv = &l.wqkv;
            let qkv_pieces = [
                piece(&qkv.names[0], [q_dim, h], Part { rows: heads(&rs.q_heads), cols: all(h) }, 0, qkv.stream, false),
                piece(
                    &qkv.names[1],
                    [kv_dim, h],
                    Part { rows: heads(&rs.kv_heads), cols: all(h) },
                    q_dim * h,
                    qkv.stream,
                    false,
                ),
                piece(
                    &qkv.names[2],
                    [kv_dim, h],
                    Part { rows: heads(&rs.kv_heads), cols: all(h) },
                    (q_dim + kv_dim) * h,
                    qkv.stream,
                    false,
                ),
            ];
            let i = c.intermediate_size;
            let gu = &l.w_gate_up;
            let gu_pieces = [
                piece(&gu.names[0], [i, h], Part { rows: rs.inter.clone(), cols: all(h) }, 0, gu.stream, false),
                piece(&gu.names[1], [i, h], Part { rows: rs.inter.clone(), cols: all(h) }, i * h, gu.stream, false),
            ];
            let wo = piece(
                &l.wo.names[0],
                [h, q_dim],
                Part { rows: all(h), cols: heads(&rs.q_heads) },
                0,
                l.wo.stream,
                false,
            );
            let down = piece(
                &l.w_down.names[0],
                [h, i],
                Part { rows: all(h), cols: rs.inter.clone() },
                0,
                l.w_down.stream,
                false,
            );
            Ok(LayerWeights {
                attn_norm: norm(&l.attn_norm)?,
                wqkv: proj(&qkv_pieces)?,
                wo: proj(&[wo])?,
                mlp_norm: norm(&l.mlp_norm)?,
                w_gate_up: proj(&gu_pieces)?,
                w_down: proj(&[down])?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let v = c.vocab_size;
    // The rank's rows of a vocabulary table, with their int8 form when the checkpoint stores the table in int8.
    let vocab_rows = |spec: &crate::weights::FusedSpec| -> Result<(Vec<f32>, Option<Int8Table>)> {
        let name = &spec.names[0];
        if let (Some(RankQuant::Checkpoint(_)), WeightSource::Checkpoint(ckpt)) = (quant, &src) {
            if let Some(t) = read_table_int8(ckpt, name, v, h)? {
                let mine = t.slice_rows(rs.vocab.clone(), name)?;
                return Ok((mine.dequantize(), Some(mine)));
            }
        }
        let p = piece(name, [v, h], Part { rows: rs.vocab.clone(), cols: all(h) }, 0, spec.stream, false);
        Ok((read_pieces(&src, &[p])?, None))
    };
    let (embed, embed_int8) = vocab_rows(&specs.embed)?;
    let (lm_head, lm_head_int8) = match &specs.lm_head {
        Some(spec) => {
            let (t, q) = vocab_rows(spec)?;
            (Some(t), q)
        }
        None => (None, None),
    };
    Ok(ModelWeights { embed, layers, final_norm: norm(&specs.final_norm)?, lm_head, embed_int8, lm_head_int8 })
}

/// The rank's share of a Llama 3.2 Vision text decoder.
#[derive(Debug)]
pub struct MllamaRankText {
    /// The weights in the shapes of the rank's config ([`TpPlan::rank_config`] of the text config): the rank's
    /// query/KV heads of every self- and cross-attention layer, its MLP width, its `vocab / tp` rows of `lm_head`
    /// and its embedding rows; norms, `q_norm`/`k_norm` and gates whole.
    pub text: TextWeights,
    /// The rows of the `vocab_size + 8`-row embedding table the rank holds (the whole table when `tp` does not
    /// divide it).
    pub embed_rows: Range<usize>,
}

/// Reads rank `rank`'s share of the text decoder of the Llama 3.2 Vision checkpoint `ckpt` for `plan` (the plan of
/// `cfg.text.base`). The checkpoint is checked against `cfg` first (every tensor name and shape, either layout);
/// then only the rank's rows or columns of each tensor are converted from the memory map. The vision encoder and
/// the projector are not read (they are replicated and run once per image, outside the ranks).
pub fn load_mllama_rank_text(
    cfg: &MllamaConfig,
    plan: &TpPlan,
    rank: usize,
    ckpt: &Checkpoint,
) -> Result<MllamaRankText> {
    load_mllama_rank_text_with(cfg, plan, rank, ckpt, AtLoad::NONE)
}

/// [`load_mllama_rank_text`] with the projections of an unquantized checkpoint quantized at load by `at_load`, and
/// the vocabulary tables in int8 when it says so ([`MllamaRankSource::new_with`]; a quantized checkpoint is read
/// quantized either way). `at_load` takes an `Option<Scheme>` too.
pub fn load_mllama_rank_text_with(
    cfg: &MllamaConfig,
    plan: &TpPlan,
    rank: usize,
    ckpt: &Checkpoint,
    at_load: impl Into<AtLoad>,
) -> Result<MllamaRankText> {
    let src = MllamaRankSource::new_with(cfg, plan, rank, ckpt, at_load, true)?;
    let layers =
        (0..cfg.text.base.num_hidden_layers).into_par_iter().map(|l| src.layer(l)).collect::<Result<Vec<_>>>()?;
    let ((embed, embed_int8), (lm_head, lm_head_int8)) = (src.embed_table()?, src.lm_head_table()?);
    let text = TextWeights { embed, layers, final_norm: src.final_norm()?, lm_head, embed_int8, lm_head_int8 };
    Ok(MllamaRankText { text, embed_rows: src.embed_rows()? })
}

/// A rank's share of a Llama 3.2 Vision text decoder read one layer at a time (what
/// [`load_mllama_rank_text`] collects), so that a device rank can upload layer by layer and the host never holds
/// its whole shard (a 90B rank at tp = 8 is 44 GB in f32).
pub struct MllamaRankSource<'a> {
    cfg: MllamaConfig,
    plan: TpPlan,
    rank: usize,
    ckpt: &'a Checkpoint,
    layout: MllamaLayout,
    shapes: std::collections::HashMap<String, Vec<usize>>,
    /// How the language model's projections come quantized (W4A16 only under tensor parallelism), and whether
    /// quantized projections keep their dense dequantization (the CPU reference needs it).
    quant: Option<RankQuant>,
    keep_dense: bool,
    /// Quantize the rank's vocabulary rows to int8 per row as they are read (`--embeddings int8`).
    tables_int8: bool,
}

impl LayerTensors for MllamaRankSource<'_> {
    fn proj(&self, names: &[String]) -> Result<LinearWeight> {
        MllamaRankSource::proj(self, names)
    }

    fn vector(&self, name: &str) -> Result<Vec<f32>> {
        self.one(name.to_owned())
    }

    fn scalar(&self, name: &str) -> Result<f32> {
        MllamaRankSource::scalar(self, name.to_owned())
    }
}

impl<'a> MllamaRankSource<'a> {
    /// Checks `ckpt` against `cfg` (every tensor name and shape, either layout) and `plan` against the text config.
    /// A quantized checkpoint is read quantized (its projections sliced from each whole tensor).
    pub fn new(cfg: &MllamaConfig, plan: &TpPlan, rank: usize, ckpt: &'a Checkpoint) -> Result<Self> {
        Self::new_with(cfg, plan, rank, ckpt, AtLoad::NONE, true)
    }

    /// [`new`](Self::new), with the projections of an unquantized checkpoint quantized at load by `at_load.scheme`
    /// (each rank's slice, rounded to bf16: the slices of the whole model's quantization when the row-parallel
    /// splits are group-aligned, which [`check_quantized_plan`] requires, as it refuses W4A8) and, with
    /// `at_load.tables_int8`, the rank's vocabulary rows quantized to int8 per row (the rows of the whole quantized
    /// table); `keep_dense` keeps the dense dequantization of quantized projections (the CPU reference), a device
    /// rank leaves it out. `at_load` takes an `Option<Scheme>` too.
    pub fn new_with(
        cfg: &MllamaConfig,
        plan: &TpPlan,
        rank: usize,
        ckpt: &'a Checkpoint,
        at_load: impl Into<AtLoad>,
        keep_dense: bool,
    ) -> Result<Self> {
        let at_load = at_load.into();
        if plan.config().hidden_size != cfg.text.base.hidden_size
            || plan.config().num_attention_heads != cfg.text.base.num_attention_heads
        {
            return Err(Error::request("tensor parallelism: the plan is not the vision model's text config's"));
        }
        plan.rank(rank)?;
        let quant = RankQuant::resolve(&WeightSource::Checkpoint(ckpt), at_load.scheme)?;
        let layout = match &quant {
            Some(RankQuant::Checkpoint(q)) => crate::vision::weights::check_tensors(ckpt, cfg, Some(q))?,
            _ => check_mllama_checkpoint(ckpt, cfg)?,
        };
        if let Some(q) = &quant {
            check_quantized_plan(plan, q.scheme())?;
        }
        let shapes = mllama_tensors(cfg).into_iter().collect();
        let tables_int8 = at_load.tables_int8;
        Ok(MllamaRankSource {
            cfg: cfg.clone(),
            plan: plan.clone(),
            rank,
            ckpt,
            layout,
            shapes,
            quant,
            keep_dense,
            tables_int8,
        })
    }

    /// The projections' quantization scheme, if any.
    pub fn scheme(&self) -> Option<Scheme> {
        self.quant.as_ref().map(RankQuant::scheme)
    }

    /// A projection stacked from the rank's pieces of `names` (each `[n_i, k]`): f32, or quantized as the source
    /// says ([`rank_projection`]).
    fn proj(&self, names: &[String]) -> Result<LinearWeight> {
        let pieces = names.iter().map(|n| self.piece(n).map(|(p, _)| p)).collect::<Result<Vec<_>>>()?;
        let src = WeightSource::Checkpoint(self.ckpt);
        rank_projection(&src, self.quant.as_ref(), &pieces, self.keep_dense, (self.rank, self.plan.tp()))
    }

    /// The rank's rows of a vocabulary table (`embed_tokens`, `lm_head`), with their int8 form when a quantized
    /// checkpoint stores the table in int8 or `tables_int8` asks for it (then the f32 rows are exactly its
    /// dequantization).
    fn table(&self, canonical: &str) -> Result<(Vec<f32>, Option<Int8Table>)> {
        if let Some(RankQuant::Checkpoint(q)) = &self.quant {
            if q.embeddings == crate::quant::format::EmbeddingQuant::Int8 {
                let (p, _) = self.piece(canonical)?;
                if let Some(t) = read_table_int8(self.ckpt, &p.name, p.shape[0], p.shape[1])? {
                    let mine = t.slice_rows(p.part.rows.clone(), &p.name)?;
                    return Ok((mine.dequantize(), Some(mine)));
                }
            }
        }
        let values = self.one(canonical.to_owned())?;
        if !self.tables_int8 {
            return Ok((values, None));
        }
        // One scale per whole row: a rank's rows (or the replicated table) quantize as the same rows of the whole
        // table do; a column slice would not.
        let (p, _) = self.piece(canonical)?;
        if p.part.cols.len() != p.shape[1] {
            return Err(Error::request(format!("`{}`: an int8 table cannot be split by columns", p.name)));
        }
        let (f32s, t) = Int8Table::quantize_with_f32(&values, p.part.rows.len(), p.shape[1], &p.name)?;
        Ok((f32s, Some(t)))
    }

    /// The rank's part of one canonical tensor, as a 2-D `[rows, cols]` piece (1-D tensors are one row).
    fn piece(&self, canonical: &str) -> Result<(Piece, Split)> {
        let dir = self.ckpt.dir();
        let shape = self
            .shapes
            .get(canonical)
            .ok_or_else(|| Error::weights(dir, format!("internal: `{canonical}` is not an Mllama tensor")))?;
        let (rows, cols) = match shape.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => return Err(Error::weights(dir, format!("internal: `{canonical}` is not a matrix"))),
        };
        let split = vision_split(&self.plan, self.rank, canonical, shape)?;
        let part = match &split {
            Split::Replicated => Part { rows: 0..rows, cols: 0..cols },
            Split::Rows(r) => Part { rows: r.clone(), cols: 0..cols },
            Split::Cols(c) => Part { rows: 0..rows, cols: c.clone() },
        };
        let name = self.layout.tensor_name(canonical);
        Ok((Piece { name, shape: [rows, cols], part, random_base: 0, stream: 0, is_norm: false }, split))
    }

    fn read(&self, names: &[String]) -> Result<Vec<f32>> {
        let pieces = names.iter().map(|n| self.piece(n).map(|(p, _)| p)).collect::<Result<Vec<_>>>()?;
        read_pieces(&WeightSource::Checkpoint(self.ckpt), &pieces)
    }

    fn one(&self, name: String) -> Result<Vec<f32>> {
        self.read(std::slice::from_ref(&name))
    }

    fn scalar(&self, name: String) -> Result<f32> {
        self.one(name.clone())?
            .first()
            .copied()
            .ok_or_else(|| Error::weights(self.ckpt.dir(), format!("tensor `{name}` is empty")))
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.cfg.text.base.num_hidden_layers
    }

    /// The rank's share of decoder layer `l`.
    pub fn layer(&self, l: usize) -> Result<TextLayerWeights> {
        if l >= self.num_layers() {
            return Err(Error::request(format!("text layer {l} of {}", self.num_layers())));
        }
        text_layer(self, &self.cfg, l)
    }

    /// The rows of the `vocab_size + 8`-row embedding table the rank holds (the whole table when `tp` does not
    /// divide it).
    pub fn embed_rows(&self) -> Result<Range<usize>> {
        Ok(match self.piece(EMBED)?.1 {
            Split::Rows(r) => r,
            _ => 0..self.cfg.text.embed_rows(),
        })
    }

    /// The rank's embedding rows.
    pub fn embed(&self) -> Result<Vec<f32>> {
        Ok(self.table(EMBED)?.0)
    }

    /// The rank's embedding rows with their int8 form, when the checkpoint stores the table in int8.
    pub fn embed_table(&self) -> Result<(Vec<f32>, Option<Int8Table>)> {
        self.table(EMBED)
    }

    /// The final norm (whole).
    pub fn final_norm(&self) -> Result<Vec<f32>> {
        self.one("language_model.model.norm.weight".to_owned())
    }

    /// The rank's `lm_head` rows.
    pub fn lm_head(&self) -> Result<Vec<f32>> {
        Ok(self.table(LM_HEAD)?.0)
    }

    /// The rank's `lm_head` rows with their int8 form, as [`embed_table`](Self::embed_table).
    pub fn lm_head_table(&self) -> Result<(Vec<f32>, Option<Int8Table>)> {
        self.table(LM_HEAD)
    }
}

/// The canonical name of the vision model's embedding table.
const EMBED: &str = "language_model.model.embed_tokens.weight";
/// The canonical name of the vision model's `lm_head`.
const LM_HEAD: &str = "language_model.lm_head.weight";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::random_values;

    #[test]
    fn quantized_rank_weights_are_slices_of_the_whole_models_quantization() {
        let mut cfg = crate::config::Preset::Llama32_1B.config();
        (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) = (256, 128, 256, 2);
        (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) = (8, 2, 16);
        let seed = 3;
        let mut whole = ModelWeights::random(&cfg, seed).unwrap();
        whole.quantize_in_place(Scheme::W4A16_G32).unwrap();
        let at_load = RankQuant::AtLoad(Scheme::W4A16_G32);
        let (h, d, i, q_dim, kv_dim) = (128, 16, 256, cfg.q_dim(), cfg.kv_dim());
        let part = |w: &LinearWeight, rows: Range<usize>, cols: Range<usize>| {
            let q = w.quant.as_ref().unwrap();
            QuantLinear { matrix: q.matrix.slice(rows, cols).unwrap(), scheme: q.scheme }
        };
        let mut checked = 0;
        for tp in [2, 4] {
            let plan = TpPlan::new(&cfg, tp).unwrap();
            for rank in 0..tp {
                let rs = plan.rank(rank).unwrap();
                let got =
                    load_rank_weights_with(&plan, rank, WeightSource::Random(seed), Some(&at_load), true).unwrap();
                let bare =
                    load_rank_weights_with(&plan, rank, WeightSource::Random(seed), Some(&at_load), false).unwrap();
                let (qh, kvh) = (rs.q_heads.start * d..rs.q_heads.end * d, rs.kv_heads.start * d..rs.kv_heads.end * d);
                let shift = |r: &Range<usize>, by: usize| r.start + by..r.end + by;
                for (l, (g, w)) in got.layers.iter().zip(&whole.layers).enumerate() {
                    let qkv = stack_rows(
                        vec![
                            part(&w.wqkv, qh.clone(), 0..h),
                            part(&w.wqkv, shift(&kvh, q_dim), 0..h),
                            part(&w.wqkv, shift(&kvh, q_dim + kv_dim), 0..h),
                        ],
                        "qkv",
                    )
                    .unwrap();
                    let gate_up = stack_rows(
                        vec![part(&w.w_gate_up, rs.inter.clone(), 0..h), part(&w.w_gate_up, shift(&rs.inter, i), 0..h)],
                        "gate_up",
                    )
                    .unwrap();
                    let want = [qkv, part(&w.wo, 0..h, qh.clone()), gate_up, part(&w.w_down, 0..h, rs.inter.clone())];
                    let mine = [&g.wqkv, &g.wo, &g.w_gate_up, &g.w_down];
                    let mine_bare = {
                        let b = &bare.layers[l];
                        [&b.wqkv, &b.wo, &b.w_gate_up, &b.w_down]
                    };
                    for ((m, b), want) in mine.iter().zip(mine_bare).zip(&want) {
                        assert_eq!(m.quant.as_deref(), Some(want), "tp {tp} rank {rank} layer {l}");
                        assert_eq!(m.dense, want.matrix.dequantize());
                        assert_eq!((b.quant.as_deref(), b.dense.len()), (Some(want), 0));
                        checked += 1;
                    }
                }
                // Embeddings stay dense rows of the unquantized table.
                assert_eq!(got.embed, whole.embed[rs.vocab.start * h..rs.vocab.end * h].to_vec());
            }
        }
        assert_eq!(checked, (2 + 4) * 2 * 4);
        // tp = 8: one query head (16 columns of o_proj) per rank straddles a group of 32.
        let plan = TpPlan::new(&cfg, 8).unwrap();
        let e = load_rank_weights_with(&plan, 0, WeightSource::Random(seed), Some(&at_load), true).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("self_attn.o_proj") && e.contains("tp = 8") && e.contains("16 per rank"), "{e}");
        let plan = TpPlan::new(&cfg, 2).unwrap();
        let w4a8 = RankQuant::AtLoad(Scheme::W4A8_G32);
        let e = load_rank_weights_with(&plan, 0, WeightSource::Random(seed), Some(&w4a8), true).unwrap_err();
        assert!(e.to_string().contains("w4a8-g32"), "{e}");
        // At tp = 1 W4A8 is the single-device model.
        assert!(check_quantized_plan(&TpPlan::new(&cfg, 1).unwrap(), Scheme::W4A8_G32).is_ok());
    }

    #[test]
    fn random_parts_equal_slices_of_the_whole_stream() {
        let (rows, cols, base) = (300, 500, 7 * 500);
        let whole = random_values(base + rows * cols, 42, 9);
        for part in [Part { rows: 10..200, cols: 0..500 }, Part { rows: 0..300, cols: 125..250 }] {
            let mut got = Vec::new();
            random_part(42, 9, base, cols, &part, &mut got);
            let want: Vec<f32> = part
                .rows
                .clone()
                .flat_map(|r| whole[base + r * cols + part.cols.start..base + r * cols + part.cols.end].to_vec())
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn checkpoint_parts_convert_only_their_bytes() {
        use crate::weights::DType;
        let vals: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        let shape = [3, 4];
        let view = TensorView { dtype: DType::BF16, shape: &shape, bytes: &bytes };
        let mut out = Vec::new();
        view_part(&view, 4, &Part { rows: 0..3, cols: 1..3 }, &mut out);
        assert_eq!(out, vec![1.0, 2.0, 5.0, 6.0, 9.0, 10.0]);
        out.clear();
        view_part(&view, 4, &Part { rows: 1..3, cols: 0..4 }, &mut out);
        assert_eq!(out, vals[4..].to_vec());
    }
}
