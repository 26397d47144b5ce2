//! The sharding plan: which rows or columns of every checkpoint tensor each tensor-parallel rank holds.
//!
//! Megatron-style layout, one all-reduce after each row-parallel projection:
//!
//! | tensor | split | rank `r` holds |
//! |---|---|---|
//! | `q_proj` `[heads * d, hidden]` | column-parallel (rows of the HF matrix) | its query heads |
//! | `k_proj`, `v_proj` `[kv * d, hidden]` | column-parallel | its KV heads (a replica when `tp > kv`) |
//! | `o_proj` `[hidden, heads * d]` | row-parallel (columns), then all-reduce | the columns of its query heads |
//! | `gate_proj`, `up_proj` `[inter, hidden]` | column-parallel | `inter / tp` rows |
//! | `down_proj` `[hidden, inter]` | row-parallel, then all-reduce | the matching `inter / tp` columns |
//! | `embed_tokens` `[vocab, hidden]` | vocab-parallel, then all-reduce | `vocab / tp` rows; other ids embed as zeros |
//! | `lm_head` `[vocab, hidden]` | vocab-parallel, then all-gather | `vocab / tp` rows of logits |
//! | norms | replicated | everything |
//!
//! When `tp > num_key_value_heads`, `tp` must be a multiple of it: each KV head is then held by
//! `tp / num_key_value_heads` ranks, exactly the ranks whose query heads read it (GQA groups never straddle ranks).
//! Nothing is padded: a dimension that does not divide is refused with the config field named.
//!
//! For Llama 3.2 Vision ([`vision_split`]): the text decoder's self- and cross-attention layers are sharded the same
//! way (cross-attention K/V heads split like self-attention's, `q_norm`/`k_norm`/gates replicated), the embedding
//! table's `vocab + 8` rows split by rank, and the vision encoder and projector replicated (see
//! docs/parallelism.md for why).

use std::ops::Range;

use crate::config::LlamaConfig;
use crate::{Error, Result};

/// How one checkpoint tensor (row-major `[rows, cols]`, HF's `[out, in]` for projections) is divided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds the whole tensor.
    Replicated,
    /// The rank holds these rows (output features): column-parallel projections and vocab-parallel tables.
    Rows(Range<usize>),
    /// The rank holds these columns (input features): row-parallel projections.
    Cols(Range<usize>),
}

/// One checkpoint tensor's share on one rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorShard {
    /// Checkpoint tensor name.
    pub name: String,
    /// The full tensor's shape.
    pub shape: Vec<usize>,
    /// The rank's part.
    pub split: Split,
}

impl TensorShard {
    /// Elements the rank holds.
    pub fn numel(&self) -> usize {
        let full: usize = self.shape.iter().product();
        match &self.split {
            Split::Replicated => full,
            Split::Rows(r) => r.len() * full / self.shape[0].max(1),
            Split::Cols(c) => c.len() * self.shape[0],
        }
    }
}

/// What one rank holds, as ranges over heads, the MLP width and the vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankShard {
    /// The rank, `0..tp`.
    pub rank: usize,
    /// Query heads.
    pub q_heads: Range<usize>,
    /// KV heads (one replicated head when `tp > num_key_value_heads`).
    pub kv_heads: Range<usize>,
    /// Rows of `gate_proj`/`up_proj`, columns of `down_proj`.
    pub inter: Range<usize>,
    /// Rows of `lm_head` (and of the embedding table when it has `vocab_size` rows).
    pub vocab: Range<usize>,
}

/// The tensor-parallel layout of a model over `tp` ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct TpPlan {
    cfg: LlamaConfig,
    tp: usize,
}

fn not_divisible(field: &str, value: usize, tp: usize) -> Error {
    Error::request(format!(
        "tensor parallelism: `{field}` ({value}) is not divisible by --tensor-parallel {tp}; \
         choose a tensor-parallel size that divides it (nothing is padded)"
    ))
}

impl TpPlan {
    /// The plan for `cfg` over `tp` ranks, or an error naming the config field that `tp` does not divide.
    pub fn new(cfg: &LlamaConfig, tp: usize) -> Result<Self> {
        if tp == 0 {
            return Err(Error::request("--tensor-parallel must be at least 1"));
        }
        let c = cfg;
        if !c.num_attention_heads.is_multiple_of(tp) {
            return Err(not_divisible("num_attention_heads", c.num_attention_heads, tp));
        }
        let kv = c.num_key_value_heads;
        if kv == 0 || !c.num_attention_heads.is_multiple_of(kv) {
            return Err(Error::request(format!(
                "tensor parallelism: `num_key_value_heads` ({kv}) must divide `num_attention_heads` ({})",
                c.num_attention_heads
            )));
        }
        if tp <= kv && !kv.is_multiple_of(tp) {
            return Err(not_divisible("num_key_value_heads", kv, tp));
        }
        if tp > kv && !tp.is_multiple_of(kv) {
            return Err(Error::request(format!(
                "tensor parallelism: --tensor-parallel {tp} exceeds `num_key_value_heads` ({kv}) and is not a \
                 multiple of it, so a rank's query heads would need KV heads held by two ranks; use a divisor or \
                 a multiple of {kv}"
            )));
        }
        if !c.intermediate_size.is_multiple_of(tp) {
            return Err(not_divisible("intermediate_size", c.intermediate_size, tp));
        }
        if !c.vocab_size.is_multiple_of(tp) {
            return Err(not_divisible("vocab_size", c.vocab_size, tp));
        }
        Ok(TpPlan { cfg: cfg.clone(), tp })
    }

    /// The number of ranks.
    pub fn tp(&self) -> usize {
        self.tp
    }

    /// The full model's config.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Query heads per rank.
    pub fn heads_per_rank(&self) -> usize {
        self.cfg.num_attention_heads / self.tp
    }

    /// KV heads per rank (1 when KV heads are replicated).
    pub fn kv_heads_per_rank(&self) -> usize {
        (self.cfg.num_key_value_heads / self.tp).max(1)
    }

    /// How many ranks hold each KV head (1 unless `tp > num_key_value_heads`).
    pub fn kv_replication(&self) -> usize {
        (self.tp / self.cfg.num_key_value_heads).max(1)
    }

    /// What rank `rank` holds. `rank` must be below [`tp`](Self::tp).
    pub fn rank(&self, rank: usize) -> Result<RankShard> {
        if rank >= self.tp {
            return Err(Error::request(format!("rank {rank} is outside the tensor-parallel group of {}", self.tp)));
        }
        let (h, kvh) = (self.heads_per_rank(), self.kv_heads_per_rank());
        let kv0 = if self.tp > self.cfg.num_key_value_heads { rank / self.kv_replication() } else { rank * kvh };
        let (i, v) = (self.cfg.intermediate_size / self.tp, self.cfg.vocab_size / self.tp);
        Ok(RankShard {
            rank,
            q_heads: rank * h..(rank + 1) * h,
            kv_heads: kv0..kv0 + kvh,
            inter: rank * i..(rank + 1) * i,
            vocab: rank * v..(rank + 1) * v,
        })
    }

    /// The config a rank's kernels run with: heads, KV heads, MLP width and vocabulary are the rank's shares;
    /// everything else is the model's.
    pub fn rank_config(&self) -> LlamaConfig {
        let mut c = self.cfg.clone();
        c.num_attention_heads = self.heads_per_rank();
        c.num_key_value_heads = self.kv_heads_per_rank();
        c.intermediate_size /= self.tp;
        c.vocab_size /= self.tp;
        c
    }

    /// Every checkpoint tensor of a `LlamaForCausalLM` with rank `rank`'s part of it, in checkpoint order.
    pub fn tensor_shards(&self, rank: usize) -> Result<Vec<TensorShard>> {
        let r = self.rank(rank)?;
        let d = self.cfg.head_dim;
        Ok(crate::weights::expected_tensors(&self.cfg)
            .into_iter()
            .map(|(name, shape)| {
                let split = text_split(&name, &r, d);
                TensorShard { name, shape, split }
            })
            .collect())
    }

    /// Bytes a rank holds at `bytes_per_weight` bytes per value (2 for bf16), and the full model's.
    pub fn weight_bytes(&self, rank: usize, bytes_per_weight: f64) -> Result<(f64, f64)> {
        let shards = self.tensor_shards(rank)?;
        let full: usize = shards.iter().map(|s| s.shape.iter().product::<usize>()).sum();
        let mine: usize = shards.iter().map(TensorShard::numel).sum();
        Ok((mine as f64 * bytes_per_weight, full as f64 * bytes_per_weight))
    }
}

/// The split of a text-decoder tensor named in HF's `LlamaForCausalLM` (or Mllama's `language_model.`) spelling.
fn text_split(name: &str, r: &RankShard, head_dim: usize) -> Split {
    let heads = |h: &Range<usize>| h.start * head_dim..h.end * head_dim;
    let tail = name.rsplit_once(".layers.").map(|(_, t)| t.split_once('.').map_or(t, |(_, rest)| rest));
    match tail {
        Some(t) if t.ends_with("attn.q_proj.weight") => Split::Rows(heads(&r.q_heads)),
        Some(t) if t.ends_with("attn.k_proj.weight") || t.ends_with("attn.v_proj.weight") => {
            Split::Rows(heads(&r.kv_heads))
        }
        Some(t) if t.ends_with("attn.o_proj.weight") => Split::Cols(heads(&r.q_heads)),
        Some("mlp.gate_proj.weight" | "mlp.up_proj.weight") => Split::Rows(r.inter.clone()),
        Some("mlp.down_proj.weight") => Split::Cols(r.inter.clone()),
        Some(_) => Split::Replicated,
        None if name.ends_with("lm_head.weight") || name.ends_with("embed_tokens.weight") => {
            Split::Rows(r.vocab.clone())
        }
        None => Split::Replicated,
    }
}

/// The split of a Llama 3.2 Vision (`MllamaForConditionalGeneration`) tensor, canonical name and full shape, for
/// the plan `plan` of its text config ([`crate::vision::config::MllamaTextConfig::base`]). The embedding table's
/// `vocab + 8` rows are split evenly when `tp` divides them (else replicated); the vision encoder and the projector
/// are replicated. The text path of this layout is what the CPU tensor-parallel executor runs; the vision path is
/// the plan for the CUDA executor.
pub fn vision_split(plan: &TpPlan, rank: usize, name: &str, shape: &[usize]) -> Result<Split> {
    let r = plan.rank(rank)?;
    if name.starts_with("vision_model.") || name.starts_with("multi_modal_projector.") {
        return Ok(Split::Replicated);
    }
    if name.ends_with("embed_tokens.weight") {
        let rows = shape.first().copied().unwrap_or(0);
        if rows % plan.tp() != 0 {
            return Ok(Split::Replicated);
        }
        let per = rows / plan.tp();
        return Ok(Split::Rows(rank * per..(rank + 1) * per));
    }
    Ok(text_split(name, &r, plan.config().head_dim))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    fn cfg(heads: usize, kv: usize) -> LlamaConfig {
        let mut c = Preset::Llama32_1B.config();
        c.num_attention_heads = heads;
        c.num_key_value_heads = kv;
        c
    }

    #[test]
    fn kv_heads_are_split_then_replicated_to_the_ranks_that_read_them() {
        let p = TpPlan::new(&cfg(32, 8), 2).unwrap();
        assert_eq!(p.rank(1).unwrap().kv_heads, 4..8);
        assert_eq!(p.rank(1).unwrap().q_heads, 16..32);
        let p = TpPlan::new(&cfg(8, 2), 8).unwrap();
        assert_eq!(p.kv_replication(), 4);
        for r in 0..8 {
            let s = p.rank(r).unwrap();
            // The query head's GQA group (group size 4) is the KV head the rank holds.
            assert_eq!(s.kv_heads, s.q_heads.start / 4..s.q_heads.start / 4 + 1, "rank {r}");
        }
    }

    #[test]
    fn indivisible_sizes_name_the_field() {
        let e = TpPlan::new(&cfg(24, 8), 16).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
        let e = TpPlan::new(&cfg(12, 4), 6).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut c = cfg(32, 8);
        c.intermediate_size = 100;
        let e = TpPlan::new(&c, 8).unwrap_err().to_string();
        assert!(e.contains("intermediate_size"), "{e}");
        let mut c = cfg(32, 8);
        c.vocab_size = 1001;
        let e = TpPlan::new(&c, 2).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
        assert!(TpPlan::new(&cfg(32, 8), 0).is_err());
    }

    #[test]
    fn shards_cover_every_tensor_once_except_replicas() {
        let c = cfg(32, 8);
        for tp in [1, 2, 4, 8] {
            let p = TpPlan::new(&c, tp).unwrap();
            let (_, full) = p.weight_bytes(0, 1.0).unwrap();
            let mut total = 0.0;
            let mut replicated = 0.0;
            for r in 0..tp {
                total += p.weight_bytes(r, 1.0).unwrap().0;
                replicated += p
                    .tensor_shards(r)
                    .unwrap()
                    .iter()
                    .filter(|s| s.split == Split::Replicated)
                    .map(TensorShard::numel)
                    .sum::<usize>() as f64;
            }
            let norms = replicated / tp as f64;
            assert_eq!(total - replicated, full - norms, "tp {tp}");
        }
    }

    #[test]
    fn vision_encoder_is_replicated_and_cross_attention_split() {
        let v = crate::vision::config::MllamaPreset::Vision11B.config();
        let p = TpPlan::new(&v.text.base, 8).unwrap();
        let s = vision_split(&p, 3, "vision_model.transformer.layers.0.self_attn.q_proj.weight", &[1280, 1280]);
        assert_eq!(s.unwrap(), Split::Replicated);
        let s = vision_split(&p, 3, "language_model.model.layers.3.cross_attn.k_proj.weight", &[1024, 4096]);
        assert_eq!(s.unwrap(), Split::Rows(3 * 128..4 * 128));
        let s = vision_split(&p, 3, "language_model.model.layers.3.cross_attn.o_proj.weight", &[4096, 4096]);
        assert_eq!(s.unwrap(), Split::Cols(3 * 512..4 * 512));
        let s = vision_split(&p, 1, "language_model.model.embed_tokens.weight", &[128264, 4096]);
        assert_eq!(s.unwrap(), Split::Rows(16033..2 * 16033));
        let s = vision_split(&p, 1, "language_model.model.layers.3.cross_attn.q_norm.weight", &[128]);
        assert_eq!(s.unwrap(), Split::Replicated);
    }
}
