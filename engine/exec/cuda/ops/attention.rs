//! The attention of [`CudaOps`]: the paged decode or prefill kernel of a layer's cache, as the step asks.

use super::*;

impl CudaOps {
    /// [`Ops::attention`]: the paged decode (split-KV, the step's split count) at decode steps, else the paged
    /// prefill, of layer `layer`'s cache.
    pub(super) fn run_attention(&mut self, layer: usize, qkv: &CudaAct, out: &mut CudaAct) -> Result<()> {
        self.no_pending_norm("attention")?;
        let (meta, sz) = (self.meta.as_ref().ok_or_else(|| Error::Backend("no step in progress".into()))?, self.sizes);
        let q_dim = self.cfg.q_dim();
        let positions = meta.positions.slice(..sz.tokens);
        let tables = meta.block_tables.slice(..sz.table_len);
        check("attention out", out, qkv.rows, q_dim)?;
        let q = k::attention::QueryRows { qkv: &qkv.buf.slice(..qkv.rows * qkv.cols), stride: qkv.cols };
        let kv = k::attention::KvPools { layout: self.layout, k: &self.k_cache[layer], v: &self.v_cache[layer] };
        let out = &mut out.buf.slice_mut(..qkv.rows * q_dim);
        if sz.decode {
            let num_splits = k::attention::decode_num_splits(&self.layout, qkv.rows, sz.max_context_len, self.num_sms);
            let dm = k::attention::DecodeMeta {
                positions: &positions,
                block_tables: &tables,
                max_blocks_per_seq: sz.max_blocks_per_seq,
                num_splits,
            };
            k::attention::paged_decode(&self.stream, &q, &kv, &dm, &mut self.workspace, out)
        } else {
            let cu = meta.cu_seqlens.slice(..sz.seqs + 1);
            let pm = k::attention::PrefillMeta {
                positions: &positions,
                cu_seqlens: &cu,
                block_tables: &tables,
                max_blocks_per_seq: sz.max_blocks_per_seq,
                max_query_len: sz.max_query_len,
            };
            k::attention::paged_prefill(&self.stream, &q, &kv, &pm, out)
        }
    }
}
