//! The logits all-gather of [`CudaOps`] under tensor parallelism: every rank's vocabulary slice gathered and
//! interleaved into whole rows.

use super::*;

impl CudaOps {
    /// Tensor parallelism: all-gathers every rank's `[rows, vocab / tp]` logits (rank-major, `[tp * rows, vocab /
    /// tp]`), then one row gather interleaves them into `[rows, vocab]`: output row `i * tp + r` of the
    /// `[rows * tp, vocab / tp]` view is gathered row `r * rows + i`. A bit-exact copy.
    pub(super) fn tp_gather_logits(&mut self, local: CudaAct) -> Result<CudaAct> {
        self.no_pending_norm("gather_logits")?;
        let world = match self.tp.as_ref() {
            None => return Ok(local),
            Some(tp) => tp.comm.world(),
        };
        let (rows, vl) = (local.rows, local.cols);
        let n = rows * vl;
        let mut gathered = self.alloc(world * rows, vl)?;
        if n > 0 {
            let tp = self.tp.as_ref().ok_or_else(|| Error::Backend("tensor-parallel state missing".into()))?;
            tp.comm.all_gather_bf16(&self.stream, &local.buf.slice(..n), &mut gathered.buf.slice_mut(..world * n))?;
        }
        self.release(local);
        if world == 1 || rows <= 1 {
            // One rank, or one row: rank-major is already `[rows, vocab]`.
            gathered.rows = rows;
            gathered.cols = world * vl;
            return Ok(gathered);
        }
        let mut out = self.alloc(rows, world * vl)?;
        let tp = self.tp.as_mut().ok_or_else(|| Error::Backend("tensor-parallel state missing".into()))?;
        let len = rows * world;
        if tp.gather_rows != rows || tp.gather_ids.is_none() {
            let order: Vec<u32> = (0..len).map(|j| ((j % world) * rows + j / world) as u32).collect();
            let ids = self.stream.clone_htod(&order).map_err(drv("upload logits gather order"))?;
            tp.gather_ids = Some(ids);
            tp.gather_rows = rows;
        }
        let ids = tp.gather_ids.as_ref().ok_or_else(|| Error::Backend("logits gather order missing".into()))?;
        k::embedding::embed(&self.stream, &gathered.view(), vl, &ids.slice(..len), &mut out.buf.slice_mut(..len * vl))?;
        self.release(gathered);
        Ok(out)
    }
}
