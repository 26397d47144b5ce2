//! Where a registered image set keeps each tile's cross-attention K/V ([`TileMap`]), shared by the CPU and CUDA
//! decoders.
//!
//! The processor's cross-attention mask has one column per (image, tile) slot, `max_num_tiles` per image, and
//! the encoder produces states for every slot, padding tiles included. Rows that see an image attend only to that
//! image's real tiles, but rows that see none (the tokens before a prompt's first `<|image|>`) attend over every
//! slot, padding included, as transformers does; so a set needs its padding tiles' K/V only until the prompt rows
//! before its first image token have run. The K/V of a set are therefore stored with the real tiles first (image
//! by image, in mask order) and the padding tiles after them: freeing the padding ([`TileMap::trim`]) keeps a
//! prefix, and a set is then sized by its real tile count.

use crate::{Error, Result};

/// The storage order of one image set's tiles and whether its padding tiles are still held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TileMap {
    /// Per mask column (`image * max_tiles + tile`): the tile's index in the stored K/V.
    slot: Vec<usize>,
    /// Real tiles of every image together: they hold slots `0..real`.
    real: usize,
    /// Whether the padding tiles' K/V have been freed.
    trimmed: bool,
    /// Mask columns per image.
    max_tiles: usize,
}

/// The tiles one token row attends to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowTiles {
    /// The row sees these stored tiles (in mask-column order).
    Sees(Vec<usize>),
    /// The row sees no image: it attends over every stored tile (all slots, padding included) with a row scale of
    /// 0 on the MLP.
    None,
}

impl TileMap {
    /// The map of a set of images with `num_tiles[i]` real tiles each (1 to `max_tiles`).
    pub fn new(num_tiles: &[usize], max_tiles: usize) -> Result<Self> {
        if num_tiles.is_empty() {
            return Err(Error::request("add_images: no images"));
        }
        if let Some((i, &n)) = num_tiles.iter().enumerate().find(|(_, &n)| n == 0 || n > max_tiles) {
            return Err(Error::request(format!("add_images: image {i} has {n} tiles, expected 1 to {max_tiles}")));
        }
        let real: usize = num_tiles.iter().sum();
        let mut slot = vec![0; num_tiles.len() * max_tiles];
        let (mut next_real, mut next_pad) = (0, real);
        for (i, &n) in num_tiles.iter().enumerate() {
            for t in 0..max_tiles {
                let s = if t < n { &mut next_real } else { &mut next_pad };
                slot[i * max_tiles + t] = *s;
                *s += 1;
            }
        }
        Ok(TileMap { slot, real, trimmed: false, max_tiles })
    }

    /// Mask columns (`images * max_tiles`).
    pub fn columns(&self) -> usize {
        self.slot.len()
    }

    /// Real tiles of all images.
    pub fn real(&self) -> usize {
        self.real
    }

    /// Tiles whose K/V are held now: every slot, or only the real ones once trimmed.
    pub fn held(&self) -> usize {
        if self.trimmed {
            self.real
        } else {
            self.slot.len()
        }
    }

    /// Whether the padding tiles have been freed.
    pub fn trimmed(&self) -> bool {
        self.trimmed
    }

    /// Frees the padding tiles: afterwards only slots `0..real()` are held.
    pub fn trim(&mut self) {
        self.trimmed = true;
    }

    /// Per stored slot (`0..columns()`), the mask column it holds: the order in which to lay out the states.
    pub fn storage_order(&self) -> Vec<usize> {
        let mut order = vec![0; self.slot.len()];
        for (col, &s) in self.slot.iter().enumerate() {
            order[s] = col;
        }
        order
    }

    /// Runs of consecutive mask columns stored at consecutive slots: `(first column, first slot, length)`, in
    /// column order (one real and at most one padding run per image).
    pub fn runs(&self) -> Vec<(usize, usize, usize)> {
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (col, &s) in self.slot.iter().enumerate() {
            match runs.last_mut() {
                Some((c0, s0, n)) if *c0 + *n == col && *s0 + *n == s => *n += 1,
                _ => runs.push((col, s, 1)),
            }
        }
        runs
    }

    /// The tiles mask row `row` (`columns()` 0/1 values) attends to. Fails when the row sees a padding tile, or
    /// sees no image after [`trim`](Self::trim) (such rows need the padding tiles); `what` names the row.
    pub fn row(&self, row: &[u8], what: &dyn Fn() -> String) -> Result<RowTiles> {
        if row.len() != self.slot.len() {
            return Err(Error::request(format!(
                "{}: mask row has {} values, expected {}",
                what(),
                row.len(),
                self.slot.len()
            )));
        }
        let mut seen = Vec::new();
        for (col, &v) in row.iter().enumerate() {
            if v == 1 {
                let s = self.slot[col];
                if s >= self.real {
                    return Err(Error::request(format!(
                        "{}: the mask sees tile {} of image {}, which is a padding tile",
                        what(),
                        col % self.max_tiles,
                        col / self.max_tiles
                    )));
                }
                seen.push(s);
            }
        }
        if !seen.is_empty() {
            return Ok(RowTiles::Sees(seen));
        }
        if self.trimmed {
            return Err(Error::request(format!(
                "{}: the row sees no image, so it attends over every tile including the padding ones, but the \
                 image set was trimmed to its real tiles; register the images again",
                what()
            )));
        }
        Ok(RowTiles::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_tiles_come_first_and_trimming_keeps_a_prefix() {
        let mut m = TileMap::new(&[2, 4, 1], 4).unwrap();
        assert_eq!((m.columns(), m.real(), m.held()), (12, 7, 12));
        // Columns: image 0 tiles 0..4, image 1 tiles 0..4, image 2 tiles 0..4.
        assert_eq!(m.storage_order(), vec![0, 1, 4, 5, 6, 7, 8, 2, 3, 9, 10, 11]);
        assert_eq!(m.runs(), vec![(0, 0, 2), (2, 7, 2), (4, 2, 5), (9, 9, 3)]);
        let row = [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0];
        assert_eq!(m.row(&row, &|| "r".into()).unwrap(), RowTiles::Sees(vec![2, 3, 4, 5, 6]));
        assert_eq!(m.row(&[0; 12], &|| "r".into()).unwrap(), RowTiles::None);
        let pad = [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let e = m.row(&pad, &|| "sequence 3".into()).unwrap_err().to_string();
        assert!(e.contains("sequence 3") && e.contains("tile 2 of image 0") && e.contains("padding"), "{e}");
        m.trim();
        assert_eq!((m.held(), m.trimmed()), (7, true));
        assert_eq!(m.row(&row, &|| "r".into()).unwrap(), RowTiles::Sees(vec![2, 3, 4, 5, 6]));
        let e = m.row(&[0; 12], &|| "sequence 1 token 0".into()).unwrap_err().to_string();
        assert!(e.contains("sequence 1 token 0") && e.contains("trimmed"), "{e}");
        assert!(m.row(&[0; 11], &|| "r".into()).is_err());
    }

    #[test]
    fn bad_tile_counts_are_refused() {
        assert!(TileMap::new(&[], 4).is_err());
        let e = TileMap::new(&[4, 0], 4).unwrap_err().to_string();
        assert!(e.contains("image 1 has 0 tiles"), "{e}");
        assert!(TileMap::new(&[5], 4).unwrap_err().to_string().contains("1 to 4"));
        let full = TileMap::new(&[4, 4], 4).unwrap();
        assert_eq!(full.storage_order(), (0..8).collect::<Vec<_>>());
        assert_eq!(full.runs(), vec![(0, 0, 8)]);
    }
}
