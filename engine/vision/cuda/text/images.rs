//! The cross-attention image-set pool: registering an image set's cross K/V in a contiguous block range of every
//! cross layer's pool, finding free ranges, and the pool's bookkeeping.

use cudarc::driver::CudaView;
use half::bf16;

use super::super::{drv, gemm};
use super::{alloc, ImageSet, Layer, MllamaCudaExecutor};
use crate::ops::cuda as k;
use crate::{Error, Result};

impl MllamaCudaExecutor {
    /// Number of registered image sets.
    pub fn num_image_sets(&self) -> usize {
        self.sets.len()
    }

    /// Cross-pool tiles not taken by a registered image set.
    pub fn free_cross_tiles(&self) -> usize {
        let used: usize = self.sets.values().map(|s| s.images * self.cfg.vision.max_num_tiles).sum();
        self.cross_tiles - used
    }

    /// The first free range of `n` blocks in `1..=cross_tiles`.
    fn find_range(&self, n: usize) -> Option<usize> {
        let tiles = self.cfg.vision.max_num_tiles;
        let mut taken: Vec<(usize, usize)> =
            self.sets.values().map(|s| (s.start, s.start + s.images * tiles)).collect();
        taken.sort_unstable();
        let mut start = 1;
        for (a, b) in taken {
            if a >= start + n {
                break;
            }
            start = start.max(b);
        }
        (start + n <= 1 + self.cross_tiles).then_some(start)
    }

    /// Registers projected states already on the device (`[images * max_num_tiles * num_patches, hidden]` bf16,
    /// e.g. [`super::encoder::CudaEncoded::states`](crate::vision::cuda::encoder::CudaEncoded::states)) under
    /// `key`, replacing an earlier set with that key.
    pub fn add_images_device(&mut self, key: u64, states: &CudaView<'_, bf16>, images: usize) -> Result<()> {
        let t = &self.cfg.text.base;
        let (tiles, tpt) = (self.cfg.vision.max_num_tiles, self.cfg.vision.num_patches());
        let (hidden, kv_dim) = (t.hidden_size, t.kv_dim());
        if images == 0 {
            return Err(Error::request("add_images: no images"));
        }
        let rows = images * tiles * tpt;
        if states.len() != rows * hidden {
            return Err(Error::request(format!(
                "add_images: states hold {} values, expected {images} images x {tiles} tiles x {tpt} tokens x {hidden}",
                states.len()
            )));
        }
        self.sets.remove(&key);
        let start = self.find_range(images * tiles).ok_or_else(|| {
            Error::request(format!(
                "add_images: {} tiles do not fit in the cross-attention pool ({} of {} free, or fragmented)",
                images * tiles,
                self.free_cross_tiles(),
                self.cross_tiles
            ))
        })?;
        let (off, len) = (start * tpt * kv_dim, rows * kv_dim);
        let mut tmp = alloc::<bf16>(&self.stream, len)?;
        for layer in &mut self.layers {
            let Layer::Cross { wk, wv, k_norm, k_pool, v_pool, .. } = layer else { continue };
            gemm(&self.blas, states, &wk.slice(..), (rows, hidden, kv_dim), &mut tmp)?;
            k::norm::rms_norm(
                &self.stream,
                &tmp,
                k_norm,
                t.rms_norm_eps,
                t.head_dim,
                &mut k_pool.slice_mut(off..off + len),
            )?;
            gemm(&self.blas, states, &wv.slice(..), (rows, hidden, kv_dim), &mut v_pool.slice_mut(off..off + len))?;
        }
        self.stream.synchronize().map_err(drv("compute cross-attention K/V"))?;
        self.sets.insert(key, ImageSet { start, images });
        Ok(())
    }
}
