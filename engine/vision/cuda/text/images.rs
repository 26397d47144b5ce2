//! The cross-attention image-set pool: registering an image set's cross K/V in a contiguous block range of every
//! cross layer's pool, finding free ranges, and the pool's bookkeeping.

use cudarc::driver::CudaView;
use half::bf16;

use super::super::{drv, gemm};
use super::{alloc, ImageSet, Layer, MllamaCudaExecutor};
use crate::ops::cuda as k;
use crate::vision::tiles::TileMap;
use crate::{Error, Result};

impl MllamaCudaExecutor {
    /// Number of registered image sets.
    pub fn num_image_sets(&self) -> usize {
        self.sets.len()
    }

    /// Cross-pool tiles not taken by a registered image set.
    pub fn free_cross_tiles(&self) -> usize {
        let used: usize = self.sets.values().map(|s| s.map.held()).sum();
        self.cross_tiles - used
    }

    /// The first free range of `n` blocks in `1..=cross_tiles`.
    fn find_range(&self, n: usize) -> Option<usize> {
        let mut taken: Vec<(usize, usize)> = self.sets.values().map(|s| (s.start, s.start + s.map.held())).collect();
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
    /// e.g. [`super::encoder::CudaEncoded::states`](crate::vision::cuda::encoder::CudaEncoded::states)) of images
    /// with `num_tiles[i]` real tiles each under `key`, replacing an earlier set with that key. Every tile's K/V is
    /// computed, real tiles first ([`TileMap`]); [`trim`](Self::trim) later frees the padding ones.
    pub fn add_images_device(&mut self, key: u64, states: &CudaView<'_, bf16>, num_tiles: &[usize]) -> Result<()> {
        let t = &self.cfg.text.base;
        let (tiles, tpt) = (self.cfg.vision.max_num_tiles, self.cfg.vision.num_patches());
        let (hidden, kv_dim) = (t.hidden_size, t.kv_dim());
        let map = TileMap::new(num_tiles, tiles)?;
        let images = num_tiles.len();
        let rows = images * tiles * tpt;
        if states.len() != rows * hidden {
            return Err(Error::request(format!(
                "add_images: states hold {} values, expected {images} images x {tiles} tiles x {tpt} tokens x {hidden}",
                states.len()
            )));
        }
        self.sets.remove(&key);
        let start = self.find_range(map.columns()).ok_or_else(|| {
            Error::request(format!(
                "add_images: {} tiles do not fit in the cross-attention pool ({} of {} free, or fragmented)",
                map.columns(),
                self.free_cross_tiles(),
                self.cross_tiles
            ))
        })?;
        // One GEMM per run of tiles that are consecutive both in the states and in the pool.
        let runs = map.runs();
        let longest = runs.iter().map(|r| r.2).max().unwrap_or(0) * tpt;
        let mut tmp = alloc::<bf16>(&self.stream, longest * kv_dim)?;
        for layer in &mut self.layers {
            let Layer::Cross { wk, wv, k_norm, k_pool, v_pool, .. } = layer else { continue };
            for &(col, slot, n) in &runs {
                let (r0, m) = (col * tpt, n * tpt);
                let x = states.slice(r0 * hidden..(r0 + m) * hidden);
                let (off, len) = ((start + slot) * tpt * kv_dim, m * kv_dim);
                let mut kt = tmp.slice_mut(..len);
                gemm(&self.blas, &x, &wk.slice(..), (m, hidden, kv_dim), &mut kt)?;
                k::norm::rms_norm(
                    &self.stream,
                    &kt,
                    k_norm,
                    t.rms_norm_eps,
                    t.head_dim,
                    &mut k_pool.slice_mut(off..off + len),
                )?;
                gemm(&self.blas, &x, &wv.slice(..), (m, hidden, kv_dim), &mut v_pool.slice_mut(off..off + len))?;
            }
        }
        self.stream.synchronize().map_err(drv("compute cross-attention K/V"))?;
        self.sets.insert(key, ImageSet { start, map });
        Ok(())
    }

    /// Whether images with `num_tiles` real tiles each can be registered now (see
    /// [`crate::exec::Executor::images_fit`]): a free range of `images * max_num_tiles` blocks exists.
    pub fn fits(&self, num_tiles: &[usize]) -> Result<bool> {
        let need = num_tiles.len() * self.cfg.vision.max_num_tiles;
        if need > self.cross_tiles {
            return Err(Error::request(format!(
                "images of {need} tiles (padding tiles included) exceed the cross-attention pool of {} tiles \
                 (--cross-attention-tiles)",
                self.cross_tiles
            )));
        }
        Ok(self.find_range(need).is_some())
    }

    /// Frees the padding tiles of set `key` (the end of its block range); see [`crate::exec::Executor::trim_images`].
    /// Returns whether the set exists.
    pub fn trim(&mut self, key: u64) -> bool {
        match self.sets.get_mut(&key) {
            Some(set) => {
                set.map.trim();
                true
            }
            None => false,
        }
    }
}
