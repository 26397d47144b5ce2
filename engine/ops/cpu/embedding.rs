//! Embedding gather, the CPU twin of `kernels/embedding.cu`.

/// Copies row `ids[i]` of the `[vocab, hidden]` table into row `i` of `out`. Ids must be in range.
pub fn embed(table: &[f32], hidden: usize, ids: &[u32], out: &mut [f32]) {
    assert_eq!(out.len(), ids.len() * hidden, "embed: out length");
    for (row, &id) in out.chunks_mut(hidden).zip(ids) {
        let start = id as usize * hidden;
        row.copy_from_slice(&table[start..start + hidden]);
    }
}
