//! Loading one rank's shard: only the rows or columns the [`TpPlan`] gives the rank are read from the memory-mapped
//! safetensors and converted to f32, so no rank (and no host) ever holds a full copy of a sharded tensor.
//! [`load_rank_weights`] reads a text model's shard, [`load_mllama_rank_text`] the text decoder of a Llama 3.2
//! Vision checkpoint (split as [`super::plan::vision_split`] says).

use std::ops::Range;

use rayon::prelude::*;

use super::plan::{vision_split, RankShard, Split, TpPlan};
use crate::vision::config::MllamaConfig;
use crate::vision::weights::{
    check_mllama_checkpoint, expected_tensors as mllama_tensors, CrossAttentionLayerWeights, MllamaLayout,
    TextLayerWeights, TextWeights,
};
use crate::weights::{
    check_checkpoint, random_chunk, Checkpoint, LayerWeights, ModelWeights, TensorView, WeightSource, RANDOM_CHUNK,
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

/// Reads rank `rank`'s weights for `plan` from `src`. A checkpoint is checked against the full model's config first
/// (every tensor name and shape); then each rank reads only its slices from the memory map. Random weights give
/// exactly the values of the same slices of [`ModelWeights::random`] with the same seed.
pub fn load_rank_weights(plan: &TpPlan, rank: usize, src: WeightSource<'_>) -> Result<ModelWeights> {
    if let WeightSource::Checkpoint(ckpt) = src {
        check_checkpoint(ckpt, plan.config())?;
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
                wqkv: read_pieces(&src, &qkv_pieces)?.into(),
                wo: read_pieces(&src, &[wo])?.into(),
                mlp_norm: norm(&l.mlp_norm)?,
                w_gate_up: read_pieces(&src, &gu_pieces)?.into(),
                w_down: read_pieces(&src, &[down])?.into(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let v = c.vocab_size;
    let vocab_rows = |spec: &crate::weights::FusedSpec| -> Result<Vec<f32>> {
        let p = piece(&spec.names[0], [v, h], Part { rows: rs.vocab.clone(), cols: all(h) }, 0, spec.stream, false);
        read_pieces(&src, &[p])
    };
    Ok(ModelWeights {
        embed: vocab_rows(&specs.embed)?,
        layers,
        final_norm: norm(&specs.final_norm)?,
        lm_head: specs.lm_head.as_ref().map(vocab_rows).transpose()?,
    })
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
    let src = MllamaRankSource::new(cfg, plan, rank, ckpt)?;
    let layers =
        (0..cfg.text.base.num_hidden_layers).into_par_iter().map(|l| src.layer(l)).collect::<Result<Vec<_>>>()?;
    let text = TextWeights { embed: src.embed()?, layers, final_norm: src.final_norm()?, lm_head: src.lm_head()? };
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
}

impl<'a> MllamaRankSource<'a> {
    /// Checks `ckpt` against `cfg` (every tensor name and shape, either layout) and `plan` against the text config.
    pub fn new(cfg: &MllamaConfig, plan: &TpPlan, rank: usize, ckpt: &'a Checkpoint) -> Result<Self> {
        if plan.config().hidden_size != cfg.text.base.hidden_size
            || plan.config().num_attention_heads != cfg.text.base.num_attention_heads
        {
            return Err(Error::request("tensor parallelism: the plan is not the vision model's text config's"));
        }
        plan.rank(rank)?;
        let layout: MllamaLayout = check_mllama_checkpoint(ckpt, cfg)?;
        let shapes = mllama_tensors(cfg).into_iter().collect();
        Ok(MllamaRankSource { cfg: cfg.clone(), plan: plan.clone(), rank, ckpt, layout, shapes })
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
        let p = format!("language_model.model.layers.{l}");
        let w_gate_up = self.read(&[format!("{p}.mlp.gate_proj.weight"), format!("{p}.mlp.up_proj.weight")])?;
        let w_down = self.one(format!("{p}.mlp.down_proj.weight"))?;
        let attn_norm = self.one(format!("{p}.input_layernorm.weight"))?;
        let mlp_norm = self.one(format!("{p}.post_attention_layernorm.weight"))?;
        if self.cfg.text.is_cross_attention_layer(l) {
            let a = format!("{p}.cross_attn");
            Ok(TextLayerWeights::CrossAttention(CrossAttentionLayerWeights {
                attn_norm,
                wq: self.one(format!("{a}.q_proj.weight"))?.into(),
                wkv: self.read(&[format!("{a}.k_proj.weight"), format!("{a}.v_proj.weight")])?.into(),
                wo: self.one(format!("{a}.o_proj.weight"))?.into(),
                q_norm: self.one(format!("{a}.q_norm.weight"))?,
                k_norm: self.one(format!("{a}.k_norm.weight"))?,
                attn_gate: self.scalar(format!("{p}.cross_attn_attn_gate"))?,
                mlp_norm,
                w_gate_up: w_gate_up.into(),
                w_down: w_down.into(),
                mlp_gate: self.scalar(format!("{p}.cross_attn_mlp_gate"))?,
            }))
        } else {
            let a = format!("{p}.self_attn");
            Ok(TextLayerWeights::SelfAttention(LayerWeights {
                attn_norm,
                wqkv: self.read(&["q", "k", "v"].map(|x| format!("{a}.{x}_proj.weight")))?.into(),
                wo: self.one(format!("{a}.o_proj.weight"))?.into(),
                mlp_norm,
                w_gate_up: w_gate_up.into(),
                w_down: w_down.into(),
            }))
        }
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
        self.one(EMBED.to_owned())
    }

    /// The final norm (whole).
    pub fn final_norm(&self) -> Result<Vec<f32>> {
        self.one("language_model.model.norm.weight".to_owned())
    }

    /// The rank's `lm_head` rows.
    pub fn lm_head(&self) -> Result<Vec<f32>> {
        self.one("language_model.lm_head.weight".to_owned())
    }
}

/// The canonical name of the vision model's embedding table.
const EMBED: &str = "language_model.model.embed_tokens.weight";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::random_values;

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
