//! Decode CUDA graphs: which steps qualify, and capturing (or recapturing) and replaying a batch bucket's graph.

use cudarc::driver::sys;

use super::super::drv;
use super::{DecodeGraph, MllamaCudaExecutor};
use crate::exec::cuda::{graph_bucket, CudaExecutor};
use crate::exec::StepInput;
use crate::ops::cuda as k;
use crate::vision::exec::SeqImages;
use crate::{Error, Result};

impl MllamaCudaExecutor {
    /// Graphs captured and replayed so far, as `(captures, replays)`.
    pub fn graph_counts(&self) -> (u64, u64) {
        self.graph_counts
    }

    /// Sets the most sequences a decode step may have to run as a CUDA graph (0: every step eagerly), up to the
    /// rows the executor's buffers were sized for at construction; drops the graphs captured so far.
    pub fn set_max_graph_batch(&mut self, max: usize) {
        self.opts.max_graph_batch = max;
        self.graphs.clear();
    }

    /// Turns the norm prologue fusion ([`super::MllamaCudaOptions::fuse_norm`]) on or off; drops the graphs captured
    /// so far. The results are the same bits either way.
    pub fn set_fuse_norm(&mut self, on: bool) {
        self.opts.fuse_norm = on;
        self.graphs.clear();
    }

    /// Whether a checked step runs through a decode graph: one token and one logits row per sequence, in order,
    /// few enough sequences, and a block table no wider than graphs are captured for.
    pub(super) fn graph_eligible(&self, input: &StepInput) -> bool {
        let seqs = input.num_seqs();
        // A tensor-parallel rank runs eagerly (build.rs's module docs say why).
        self.tp.is_none()
            && seqs > 0
            && seqs <= self.opts.max_graph_batch
            && graph_bucket(seqs) <= self.rows_cap
            && input.cu_seqlens.windows(2).all(|w| w[1] == w[0] + 1)
            && input.logits_rows.len() == seqs
            && input.logits_rows.iter().enumerate().all(|(i, &r)| r as usize == i)
            && input.max_blocks_per_seq <= self.max_blocks_per_seq
    }

    /// Runs a checked decode step through its batch bucket's graph, capturing it first when there is none or the
    /// buffers it reads have moved. The step is padded to the bucket (padding rows write no cache slot and see the
    /// zero cross block), its metadata and cross-attention tables uploaded into the buffers the graph reads, and
    /// the graph replayed: the same graph serves steps with and without images. The logits of the real rows come
    /// first in `acts.logits`.
    pub(super) fn step_graph(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<()> {
        let seqs = input.num_seqs();
        let bucket = graph_bucket(seqs);
        // Table width rounds up to a power of two so that few graphs cover all context lengths.
        let width = input.max_blocks_per_seq.next_power_of_two().min(self.max_blocks_per_seq);
        let padded = CudaExecutor::padded_decode(input, bucket, width);
        let mut padded_images: Vec<Option<SeqImages<'_>>> = images.to_vec();
        padded_images.resize(bucket, None);
        // Split counts are part of the graph: the self-attention's from this step's context (a key component, as
        // in the text executor), the cross-attention's from the largest context an image set can give, so that
        // text-only and vision steps share the graph (any split count is correct for any context).
        let (splits, x_splits) = if self.fast_attn {
            let max_ctx = input.positions.iter().map(|&p| p as usize + 1).max().unwrap_or(1);
            let x_ctx = (self.cross_tiles * self.cfg.vision.num_patches()).max(1);
            (
                k::attention::decode_num_splits(&self.layout, bucket, max_ctx, self.num_sms),
                k::attention::decode_num_splits(&self.cross_layout, bucket, x_ctx, self.num_sms),
            )
        } else {
            (1, 1)
        };
        let key = (bucket, splits, width);
        let sz = self.begin(&padded, &padded_images, Some((splits, x_splits)))?;
        let stale = self.graphs.get(&key).is_none_or(|g| g.generation != self.generation);
        if stale {
            self.graphs.remove(&key);
            // An eager run first (module loading and cuBLASLt's choices happen outside the capture); its cache
            // writes are the ones the replay repeats.
            self.forward(sz, bucket)?;
            let generation = self.generation;
            let stream = self.stream.clone();
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(drv("begin graph capture"))?;
            self.capturing = true;
            let captured = self.forward(sz, bucket);
            self.capturing = false;
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(drv("end graph capture"))?;
            captured?;
            let graph = graph.ok_or_else(|| Error::Backend("graph capture produced no graph".into()))?;
            if self.generation != generation {
                return Err(Error::Backend("buffers moved during graph capture".into()));
            }
            self.graphs.insert(key, DecodeGraph { graph, generation });
            self.graph_counts.0 += 1;
        }
        let g = self.graphs.get(&key).ok_or_else(|| Error::Backend("decode graph missing".into()))?;
        g.graph.launch().map_err(drv("launch decode graph"))?;
        self.graph_counts.1 += 1;
        Ok(())
    }
}
