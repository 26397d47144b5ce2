//! Causal attention over a paged KV cache, the CPU twin of the flash-attention prefill and paged-decode kernels.

use rayon::prelude::*;

/// The geometry shared by the cache and the attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedLayout {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; `num_heads` is a multiple of it.
    pub num_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Tokens per cache block.
    pub block_size: usize,
}

impl PagedLayout {
    /// Floats per cache slot (one token's K, or V, for all kv heads).
    pub fn slot_len(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// Writes each token's K and V (the first `slot_len` floats of `k` and `v` rows, row stride `stride`) into the
/// cache at `slot_mapping[i]`. Slots must be in range.
pub fn write_kv(
    layout: &PagedLayout,
    k: &[f32],
    v: &[f32],
    stride: usize,
    slot_mapping: &[u32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
) {
    let d = layout.slot_len();
    for (i, &slot) in slot_mapping.iter().enumerate() {
        let dst = slot as usize * d;
        k_cache[dst..dst + d].copy_from_slice(&k[i * stride..i * stride + d]);
        v_cache[dst..dst + d].copy_from_slice(&v[i * stride..i * stride + d]);
    }
}

/// Per-step inputs of [`paged_attention`].
#[derive(Clone, Copy, Debug)]
pub struct AttentionBatch<'a> {
    /// Sequence index of each query token.
    pub seq_of_token: &'a [u32],
    /// Position of each query token; it attends to positions `0..=position`.
    pub positions: &'a [u32],
    /// `[num_seqs, max_blocks_per_seq]` block tables.
    pub block_tables: &'a [u32],
    /// Row length of `block_tables`.
    pub max_blocks_per_seq: usize,
}

/// Causal GQA attention: query token `i`, head `h` attends over cached positions `0..=positions[i]` of its
/// sequence with kv head `h / (num_heads / num_kv_heads)`, softmax scaled by `1/sqrt(head_dim)`, all in f32.
///
/// `q` rows have stride `q_stride` and hold `num_heads * head_dim` floats; `out` is `[tokens, num_heads * head_dim]`.
pub fn paged_attention(
    layout: &PagedLayout,
    q: &[f32],
    q_stride: usize,
    batch: &AttentionBatch<'_>,
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
) {
    let PagedLayout { num_heads, num_kv_heads, head_dim, block_size } = *layout;
    let group = num_heads / num_kv_heads;
    let row = num_heads * head_dim;
    let slot_len = layout.slot_len();
    let scale = 1.0 / (head_dim as f32).sqrt();
    assert_eq!(out.len(), batch.positions.len() * row, "paged_attention: out length");
    out.par_chunks_mut(head_dim).enumerate().for_each(|(task, o)| {
        let (i, h) = (task / num_heads, task % num_heads);
        let kvh = h / group;
        let qv = &q[i * q_stride + h * head_dim..][..head_dim];
        let seq = batch.seq_of_token[i] as usize;
        let table = &batch.block_tables[seq * batch.max_blocks_per_seq..][..batch.max_blocks_per_seq];
        let ctx = batch.positions[i] as usize + 1;
        let offset =
            |p: usize| (table[p / block_size] as usize * block_size + p % block_size) * slot_len + kvh * head_dim;
        let mut scores: Vec<f32> = (0..ctx)
            .map(|p| {
                let kv = &k_cache[offset(p)..][..head_dim];
                qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        o.fill(0.0);
        for (p, &w) in scores.iter().enumerate() {
            let vv = &v_cache[offset(p)..][..head_dim];
            for (acc, &x) in o.iter_mut().zip(vv) {
                *acc += w * x;
            }
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|x| *x *= inv);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_query_averages_values() {
        // A zero query gives equal weights, so each output is the mean of the V rows at positions 0..=pos.
        let layout = PagedLayout { num_heads: 2, num_kv_heads: 1, head_dim: 2, block_size: 4 };
        let mut k_cache = vec![0.0f32; 8 * 2];
        let mut v_cache = vec![f32::NAN; 8 * 2];
        // The sequence's first logical block is physical block 1, so positions 0 and 1 live in slots 4 and 5.
        write_kv(&layout, &[9.0, 9.0, 9.0, 9.0], &[1.0, 2.0, 3.0, 4.0], 2, &[4, 5], &mut k_cache, &mut v_cache);
        let batch =
            AttentionBatch { seq_of_token: &[0, 0], positions: &[0, 1], block_tables: &[1, 0], max_blocks_per_seq: 2 };
        let mut out = vec![f32::NAN; 8];
        paged_attention(&layout, &[0.0; 8], 4, &batch, &k_cache, &v_cache, &mut out);
        assert_eq!(out, vec![1.0, 2.0, 1.0, 2.0, 2.0, 3.0, 2.0, 3.0]);
    }
}
