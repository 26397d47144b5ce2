//! KV-cache block management (host-side bookkeeping only; the backends own the memory).
//!
//! The cache is a pool of fixed-size blocks. Each sequence owns a block table: logical block `i` of the sequence
//! lives in physical block `table[i]`, so token position `p` is stored at slot `table[p / bs] * bs + p % bs`.

pub mod prefix;

use crate::{Error, Result};

/// A free-list allocator over `num_blocks` physical blocks of `block_size` tokens.
#[derive(Clone, Debug)]
pub struct BlockAllocator {
    block_size: usize,
    num_blocks: usize,
    free: Vec<u32>,
}

impl BlockAllocator {
    /// A pool of `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        BlockAllocator { block_size, num_blocks, free: (0..num_blocks as u32).rev().collect() }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks currently free.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Grows `table` so that it covers `num_tokens` tokens. On failure nothing is allocated.
    pub fn ensure(&mut self, table: &mut Vec<u32>, num_tokens: usize) -> Result<()> {
        let need = num_tokens.div_ceil(self.block_size).saturating_sub(table.len());
        if need > self.free.len() {
            return Err(Error::request(format!(
                "KV cache full: {num_tokens} tokens need {need} more blocks of {} tokens, {} free of {}",
                self.block_size,
                self.free.len(),
                self.num_blocks
            )));
        }
        for _ in 0..need {
            // `need <= free.len()` was checked above.
            table.extend(self.free.pop());
        }
        Ok(())
    }

    /// Returns every block of `table` to the pool and clears it.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
    }

    /// The cache slot of token position `pos` for a sequence with block table `table`.
    pub fn slot(&self, table: &[u32], pos: usize) -> Option<u32> {
        table.get(pos / self.block_size).map(|b| b * self.block_size as u32 + (pos % self.block_size) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_and_release() {
        let mut a = BlockAllocator::new(4, 16);
        let mut t = Vec::new();
        a.ensure(&mut t, 17).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(a.num_free(), 2);
        assert_eq!(a.slot(&t, 16), Some(t[1] * 16));
        let mut u = Vec::new();
        let e = a.ensure(&mut u, 100).unwrap_err().to_string();
        assert!(e.contains("KV cache full"), "{e}");
        assert!(u.is_empty() && a.num_free() == 2, "a failed ensure allocates nothing");
        a.release(&mut t);
        assert_eq!(a.num_free(), 4);
        assert!(t.is_empty());
    }
}
