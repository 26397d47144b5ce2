//! The cross-attention image-set pool: registering an image set's cross K/V in blocks of every cross layer's pool
//! (one block per tile, taken from a free list, so sets trimmed to their real tiles leave no holes that a later set
//! cannot use), trimming and the pool's bookkeeping.

use cudarc::driver::CudaView;
use half::bf16;

use super::super::drv;
use super::{alloc, ImageSet, Layer, MllamaCudaExecutor};
use crate::exec::cuda::quant_bufs::project;
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
        self.free_tiles.len()
    }

    /// Registers projected states already on the device (`[images * max_num_tiles * num_patches, hidden]` bf16,
    /// e.g. [`super::encoder::CudaEncoded::states`](crate::vision::cuda::encoder::CudaEncoded::states)) of images
    /// with `num_tiles[i]` real tiles each under `key`, replacing an earlier set with that key. Every tile's K/V is
    /// computed, real tiles first ([`TileMap`]); [`trim`](Self::trim) later frees the padding ones.
    pub fn add_images_device(&mut self, key: u64, states: &CudaView<'_, bf16>, num_tiles: &[usize]) -> Result<()> {
        let t = self.cfg.text.base.clone();
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
        // The set this one replaces gives its tiles back, but only once the new one is known to fit: a refused
        // registration leaves the old set (a trimmed one, still read by its running sequences) in place.
        let need = map.columns();
        let own = self.sets.get(&key).map_or(0, |s| s.blocks.len());
        if need > self.free_tiles.len() + own {
            return Err(Error::request(format!(
                "add_images: {need} tiles do not fit in the cross-attention pool ({} of {} free)",
                self.free_tiles.len() + own,
                self.cross_tiles
            )));
        }
        self.release_set(key);
        // The lowest free blocks, in order: a set added to an empty pool gets consecutive blocks.
        let blocks: Vec<u32> = self.free_tiles.iter().take(need).copied().collect();
        for b in &blocks {
            self.free_tiles.remove(b);
        }
        // One GEMM per run of tiles that are consecutive in the states, in the storage order and in the pool.
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (col, slot, n) in map.runs() {
            for i in 0..n {
                let (c, sl) = (col + i, slot + i);
                match runs.last_mut() {
                    Some((c0, s0, len)) if *c0 + *len == c && blocks[*s0] as usize + *len == blocks[sl] as usize => {
                        *len += 1
                    }
                    _ => runs.push((c, sl, 1)),
                }
            }
        }
        let longest = runs.iter().map(|r| r.2).max().unwrap_or(0) * tpt;
        let mut tmp = alloc::<bf16>(&self.stream, longest * kv_dim)?;
        let (stream, blas, qbufs) = (&self.stream, &self.blas, &mut self.qbufs);
        let mode = (false, self.num_sms, false);
        let mut moved = false;
        for layer in &mut self.layers {
            let Layer::Cross { wk, wv, k_norm, k_pool, v_pool, .. } = layer else { continue };
            for &(col, slot, n) in &runs {
                let (r0, m) = (col * tpt, n * tpt);
                let x = states.slice(r0 * hidden..(r0 + m) * hidden);
                let (off, len) = (blocks[slot] as usize * tpt * kv_dim, m * kv_dim);
                let mut kt = tmp.slice_mut(..len);
                moved |= project(stream, blas, mode, (wk, &mut *qbufs), (&x, m, hidden, kv_dim), &mut kt)?;
                k::norm::rms_norm(
                    &self.stream,
                    &kt,
                    k_norm,
                    t.rms_norm_eps,
                    t.head_dim,
                    &mut k_pool.slice_mut(off..off + len),
                )?;
                let mut vt = v_pool.slice_mut(off..off + len);
                moved |= project(stream, blas, mode, (wv, &mut *qbufs), (&x, m, hidden, kv_dim), &mut vt)?;
            }
        }
        if moved {
            // The quantized projections' buffers moved: graphs captured before read the old ones.
            self.generation += 1;
        }
        self.stream.synchronize().map_err(drv("compute cross-attention K/V"))?;
        self.sets.insert(key, ImageSet { blocks, map });
        Ok(())
    }

    /// Whether images with `num_tiles` real tiles each can be registered now (see
    /// [`crate::exec::Executor::images_fit`]): `images * max_num_tiles` blocks are free.
    pub fn fits(&self, num_tiles: &[usize]) -> Result<bool> {
        let need = num_tiles.len() * self.cfg.vision.max_num_tiles;
        if need > self.cross_tiles {
            return Err(Error::request(format!(
                "images of {need} tiles (padding tiles included) exceed the cross-attention pool of {} tiles \
                 (--cross-attention-tiles)",
                self.cross_tiles
            )));
        }
        Ok(need <= self.free_tiles.len())
    }

    /// Frees the padding tiles of set `key` (the blocks after its real tiles); see
    /// [`crate::exec::Executor::trim_images`]. Returns whether the set exists.
    pub fn trim(&mut self, key: u64) -> bool {
        let Some(set) = self.sets.get_mut(&key) else { return false };
        set.map.trim();
        let real = set.map.real();
        self.free_tiles.extend(set.blocks.drain(real..));
        true
    }

    /// Forgets set `key` and frees its blocks; returns whether it existed.
    pub(super) fn release_set(&mut self, key: u64) -> bool {
        match self.sets.remove(&key) {
            Some(set) => {
                self.free_tiles.extend(set.blocks);
                true
            }
            None => false,
        }
    }
}
