//! The KV block manager with prefix caching (host-side bookkeeping only).
//!
//! Every physical block has a reference count. A block that is full and whose K/V has been computed is
//! *registered* under a chained hash `h = hash(parent_h, tokens of the block)`, so a later sequence with the same
//! prefix reuses it instead of recomputing it. When its last reference goes, a registered block moves to an LRU of
//! evictable cached blocks (still hit-able); an unregistered one goes straight to the free list. Allocation takes
//! free blocks first and evicts the least recently released cached block after that.
//!
//! Sequences forked with [`KvManager::fork`] share all blocks; a shared, partly filled last block is copied on the
//! first append of either sequence, and the copy is returned for the executor to perform.

use std::collections::{BTreeMap, HashMap};

use crate::{Error, Result};

/// Identifies a sequence to the [`KvManager`].
pub type SeqId = u64;

/// The hash of an empty prefix (the parent of a sequence's first block).
const ROOT_HASH: u64 = 0xcbf2_9ce4_8422_2325;

/// Chained block hash: FNV-1a over the parent hash and the token ids (as little-endian u32), then a SplitMix64
/// finalizer. Stable across Rust versions and platforms.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = ROOT_HASH;
    for b in parent.to_le_bytes().into_iter().chain(tokens.iter().flat_map(|t| t.to_le_bytes())) {
        h = (h ^ b as u64).wrapping_mul(PRIME);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The result of [`KvManager::allocate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// The sequence's block table, covering the whole prompt.
    pub table: Vec<u32>,
    /// Leading prompt tokens whose K/V is already cached (a multiple of the block size, less than the prompt).
    pub cached_tokens: usize,
}

/// A block copy the executor must perform before the next step (copy-on-write after a fork).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCopy {
    /// Source block.
    pub src: u32,
    /// Destination block.
    pub dst: u32,
}

/// Cache statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvMetrics {
    /// Prompt tokens found in the prefix cache, over all allocations.
    pub hit_tokens: u64,
    /// Prompt tokens looked up (each allocation's prompt length minus its last token).
    pub queried_tokens: u64,
    /// Blocks referenced by at least one sequence.
    pub used_blocks: usize,
    /// Unreferenced blocks that still hold a registered prefix (evictable).
    pub cached_blocks: usize,
    /// Unreferenced, unregistered blocks.
    pub free_blocks: usize,
}

impl KvMetrics {
    /// `hit_tokens / queried_tokens` (0 before any query).
    pub fn hit_rate(&self) -> f64 {
        if self.queried_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.queried_tokens as f64
        }
    }
}

#[derive(Clone, Debug)]
struct SeqBlocks {
    /// Parent hash of the first block: the root, or a salt (a vision request's image hash).
    root: u64,
    table: Vec<u32>,
    tokens: Vec<u32>,
    /// Tokens whose K/V is in the cache.
    computed: usize,
    /// Chain hashes of the leading full, computed blocks.
    hashes: Vec<u64>,
}

#[derive(Clone, Debug, Default)]
struct Registered {
    hash: u64,
    parent: u64,
    tokens: Vec<u32>,
}

/// Block manager with refcounts, prefix caching, LRU eviction and copy-on-write forks.
#[derive(Clone, Debug)]
pub struct KvManager {
    block_size: usize,
    refcount: Vec<u32>,
    /// The registration of each block (hash, parent hash and tokens, kept to rule out hash collisions).
    registered: Vec<Option<Registered>>,
    /// Registered hash -> block.
    by_hash: HashMap<u64, u32>,
    /// Unreferenced, unregistered blocks (popped from the back).
    free: Vec<u32>,
    /// Unreferenced registered blocks by release tick (oldest first).
    lru: BTreeMap<u64, u32>,
    /// Release tick of each block in `lru`.
    lru_tick: Vec<u64>,
    tick: u64,
    seqs: HashMap<SeqId, SeqBlocks>,
    hit_tokens: u64,
    queried_tokens: u64,
}

impl KvManager {
    /// A pool of `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 || num_blocks > u32::MAX as usize {
            return Err(Error::request(format!(
                "KV manager: need 1..=2^32-1 blocks of at least one token, got {num_blocks} blocks of {block_size}"
            )));
        }
        Ok(KvManager {
            block_size,
            refcount: vec![0; num_blocks],
            registered: vec![None; num_blocks],
            by_hash: HashMap::new(),
            free: (0..num_blocks as u32).rev().collect(),
            lru: BTreeMap::new(),
            lru_tick: vec![0; num_blocks],
            tick: 0,
            seqs: HashMap::new(),
            hit_tokens: 0,
            queried_tokens: 0,
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks an allocation can take now (free plus evictable cached blocks).
    pub fn num_available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Current statistics.
    pub fn metrics(&self) -> KvMetrics {
        KvMetrics {
            hit_tokens: self.hit_tokens,
            queried_tokens: self.queried_tokens,
            used_blocks: self.refcount.iter().filter(|&&r| r > 0).count(),
            cached_blocks: self.lru.len(),
            free_blocks: self.free.len(),
        }
    }

    /// Whether `seq` holds blocks.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// The block table of `seq` (empty for an unknown sequence).
    pub fn table(&self, seq: SeqId) -> &[u32] {
        self.seqs.get(&seq).map_or(&[], |s| &s.table)
    }

    /// Tokens of `seq` that have cache slots (0 for an unknown sequence).
    pub fn num_tokens(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.tokens.len())
    }

    /// Tokens of `seq` whose K/V is in the cache (0 for an unknown sequence).
    pub fn num_computed(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.computed)
    }

    /// Reference count of `block` (0 for a block outside the pool).
    pub fn refcount(&self, block: u32) -> u32 {
        self.refcount.get(block as usize).copied().unwrap_or(0)
    }

    /// Registers `seq` with `prompt_tokens` and gives it blocks for all of them, reusing the cached blocks of the
    /// longest matching prefix. The last prompt token is never taken from the cache, so the model always computes
    /// at least one token and produces logits. All-or-nothing: when blocks run short, nothing changes.
    pub fn allocate(&mut self, seq: SeqId, prompt_tokens: &[u32]) -> Result<Allocation> {
        self.allocate_salted(seq, prompt_tokens, 0)
    }

    /// [`allocate`](Self::allocate) with the hash chain seeded by `salt`: blocks are shared only between sequences
    /// with the same salt (0 is the plain chain). A vision request salts with its images' hash, because its K/V
    /// after an image token depends on the image, not on the tokens alone.
    pub fn allocate_salted(&mut self, seq: SeqId, prompt_tokens: &[u32], salt: u64) -> Result<Allocation> {
        self.allocate_with(seq, prompt_tokens, salt, true)
    }

    /// [`allocate_salted`](Self::allocate_salted), looking the prefix up only when `reuse` is set: without it
    /// every block is fresh and the whole prompt is computed (prompt log-probabilities need every row), and the
    /// lookup is not counted in the hit rate. Its blocks are registered for later requests as usual.
    pub fn allocate_with(&mut self, seq: SeqId, prompt_tokens: &[u32], salt: u64, reuse: bool) -> Result<Allocation> {
        if self.seqs.contains_key(&seq) {
            return Err(Error::request(format!("KV manager: sequence {seq} already holds blocks")));
        }
        if prompt_tokens.is_empty() {
            return Err(Error::request(format!("KV manager: sequence {seq} has an empty prompt")));
        }
        let bs = self.block_size;
        let lookup_len = prompt_tokens.len() - 1;
        let (mut hits, mut hashes) = (Vec::new(), Vec::new());
        let root = if salt == 0 { ROOT_HASH } else { block_hash(ROOT_HASH ^ salt, &[]) };
        let mut parent = root;
        let looked_up = if reuse { lookup_len } else { 0 };
        for chunk in prompt_tokens[..looked_up].chunks_exact(bs) {
            let h = block_hash(parent, chunk);
            match self.by_hash.get(&h) {
                Some(&b)
                    if self.registered[b as usize]
                        .as_ref()
                        .is_some_and(|r| r.parent == parent && r.tokens == chunk) =>
                {
                    hits.push(b);
                    hashes.push(h);
                    parent = h;
                }
                _ => break,
            }
        }
        let total = prompt_tokens.len().div_ceil(bs);
        let need = total - hits.len();
        let hits_in_lru = hits.iter().filter(|&&b| self.refcount[b as usize] == 0).count();
        let available = self.num_available() - hits_in_lru;
        if need > available {
            return Err(Error::request(format!(
                "KV cache full: sequence {seq} of {} tokens needs {need} more blocks of {bs} tokens, {available} available of {}",
                prompt_tokens.len(),
                self.num_blocks()
            )));
        }
        for &b in &hits {
            self.take_ref(b);
        }
        let mut table = hits;
        for _ in 0..need {
            table.push(self.take_fresh()?);
        }
        let cached_tokens = hashes.len() * bs;
        self.hit_tokens += cached_tokens as u64;
        self.queried_tokens += looked_up as u64;
        self.seqs.insert(
            seq,
            SeqBlocks { root, table: table.clone(), tokens: prompt_tokens.to_vec(), computed: cached_tokens, hashes },
        );
        Ok(Allocation { table, cached_tokens })
    }

    /// Appends `new_tokens` to `seq`, taking blocks as needed. A shared, partly filled last block is first copied
    /// to a block of its own (copy-on-write); the copies are returned and must be done before the next step.
    /// All-or-nothing: when blocks run short, nothing changes.
    pub fn append(&mut self, seq: SeqId, new_tokens: &[u32]) -> Result<Vec<BlockCopy>> {
        let bs = self.block_size;
        let s = self.seqs.get(&seq).ok_or_else(|| Error::request(format!("KV manager: unknown sequence {seq}")))?;
        let old_len = s.tokens.len();
        let new_len = old_len + new_tokens.len();
        let grow = new_len.div_ceil(bs).saturating_sub(s.table.len());
        let last = (old_len % bs != 0 && !new_tokens.is_empty()).then(|| s.table[old_len / bs]);
        let cow = last.filter(|&b| self.refcount[b as usize] > 1);
        let need = grow + usize::from(cow.is_some());
        if need > self.num_available() {
            return Err(Error::request(format!(
                "KV cache full: sequence {seq} needs {need} more blocks of {bs} tokens, {} available of {}",
                self.num_available(),
                self.num_blocks()
            )));
        }
        let mut copies = Vec::new();
        let mut fresh = Vec::with_capacity(need);
        for _ in 0..need {
            fresh.push(self.take_fresh()?);
        }
        if let Some(src) = cow {
            let dst = fresh.pop().ok_or_else(|| Error::Backend("KV manager: copy-on-write block missing".into()))?;
            self.refcount[src as usize] -= 1;
            copies.push(BlockCopy { src, dst });
        }
        let s = self.seqs.get_mut(&seq).ok_or_else(|| Error::request(format!("KV manager: unknown sequence {seq}")))?;
        if let Some(c) = copies.first() {
            s.table[old_len / bs] = c.dst;
        }
        s.table.extend(fresh);
        s.tokens.extend_from_slice(new_tokens);
        Ok(copies)
    }

    /// Records that the K/V of the first `computed` tokens of `seq` is in the cache, and registers the blocks that
    /// became full so that later requests can hit them.
    pub fn mark_computed(&mut self, seq: SeqId, computed: usize) -> Result<()> {
        let bs = self.block_size;
        let s = self.seqs.get_mut(&seq).ok_or_else(|| Error::request(format!("KV manager: unknown sequence {seq}")))?;
        if computed > s.tokens.len() {
            return Err(Error::request(format!(
                "KV manager: sequence {seq} has {} tokens, cannot mark {computed} computed",
                s.tokens.len()
            )));
        }
        s.computed = s.computed.max(computed);
        let mut parent = s.hashes.last().copied().unwrap_or(s.root);
        let mut new = Vec::new();
        for i in s.hashes.len()..s.computed / bs {
            let tokens = &s.tokens[i * bs..(i + 1) * bs];
            let h = block_hash(parent, tokens);
            s.hashes.push(h);
            new.push((s.table[i], Registered { hash: h, parent, tokens: tokens.to_vec() }));
            parent = h;
        }
        for (b, reg) in new {
            // A block already registered (a hit or a shared block) or an identical block computed by another
            // sequence keeps the first registration.
            if self.registered[b as usize].is_none() && !self.by_hash.contains_key(&reg.hash) {
                self.by_hash.insert(reg.hash, b);
                self.registered[b as usize] = Some(reg);
            }
        }
        Ok(())
    }

    /// Makes `child` share every block of `parent` (tokens and computed state included). Fork a sequence whose
    /// tokens are all computed (after its prefill): uncomputed tokens in a shared block would be written twice.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        if self.seqs.contains_key(&child) {
            return Err(Error::request(format!("KV manager: sequence {child} already holds blocks")));
        }
        let s =
            self.seqs.get(&parent).ok_or_else(|| Error::request(format!("KV manager: unknown sequence {parent}")))?;
        let s = s.clone();
        for &b in &s.table {
            self.refcount[b as usize] += 1;
        }
        self.seqs.insert(child, s);
        Ok(())
    }

    /// Releases every block of `seq` (unknown sequences are ignored). Registered blocks whose last reference goes
    /// become evictable cached blocks, the others free blocks. Blocks are released last-first, so that the tail of a
    /// prefix is evicted before its head.
    pub fn free(&mut self, seq: SeqId) {
        let Some(s) = self.seqs.remove(&seq) else { return };
        for &b in s.table.iter().rev() {
            let r = &mut self.refcount[b as usize];
            *r -= 1;
            if *r == 0 {
                if self.registered[b as usize].is_some() {
                    self.tick += 1;
                    self.lru.insert(self.tick, b);
                    self.lru_tick[b as usize] = self.tick;
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    fn take_ref(&mut self, b: u32) {
        if self.refcount[b as usize] == 0 {
            self.lru.remove(&self.lru_tick[b as usize]);
        }
        self.refcount[b as usize] += 1;
    }

    /// A block with refcount 1 and no registration: a free one, else the least recently released cached one.
    fn take_fresh(&mut self) -> Result<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.lru.pop_first().ok_or_else(|| Error::Backend("KV manager: no block left".into()))?;
                if let Some(reg) = self.registered[b as usize].take() {
                    self.by_hash.remove(&reg.hash);
                }
                b
            }
        };
        self.refcount[b as usize] = 1;
        Ok(b)
    }

    /// Checks the internal invariants (tests): refcounts equal table references, free and cached blocks are
    /// unreferenced, every block is in exactly one of {referenced, free, cached}, and the hash index agrees.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let n = self.num_blocks();
        let mut refs = vec![0u32; n];
        for s in self.seqs.values() {
            for &b in &s.table {
                refs[b as usize] += 1;
            }
            if s.table.len() != s.tokens.len().div_ceil(self.block_size) {
                return Err(format!("table of {} blocks for {} tokens", s.table.len(), s.tokens.len()));
            }
        }
        if refs != self.refcount {
            return Err("refcounts differ from table references".into());
        }
        let mut state = vec![0u8; n];
        for &b in &self.free {
            state[b as usize] += 1;
            if self.registered[b as usize].is_some() {
                return Err(format!("free block {b} is registered"));
            }
        }
        for (&t, &b) in &self.lru {
            state[b as usize] += 1;
            if self.lru_tick[b as usize] != t || self.registered[b as usize].is_none() {
                return Err(format!("cached block {b} is inconsistent"));
            }
        }
        for (b, (&listed, &r)) in state.iter().zip(&self.refcount).enumerate() {
            let held = u8::from(r > 0);
            if listed + held != 1 {
                return Err(format!("block {b}: referenced {held}, in free/cached lists {listed} times"));
            }
        }
        for (&h, &b) in &self.by_hash {
            if self.registered[b as usize].as_ref().map(|r| r.hash) != Some(h) {
                return Err(format!("hash index points at block {b} with another registration"));
            }
        }
        if self.registered.iter().filter(|r| r.is_some()).count() != self.by_hash.len() {
            return Err("registered blocks missing from the hash index".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Simulates the executor: what each block holds, written only when tokens are computed.
    struct Shadow {
        content: Vec<Vec<Option<u32>>>,
    }

    impl Shadow {
        fn write(&mut self, kv: &KvManager, seq: SeqId, from: usize, to: usize, tokens: &[u32]) {
            let bs = kv.block_size();
            for (p, &t) in tokens.iter().enumerate().take(to).skip(from) {
                let b = kv.table(seq)[p / bs];
                assert_eq!(kv.refcount(b), 1, "write into shared block {b}");
                self.content[b as usize][p % bs] = Some(t);
            }
        }
        fn copy(&mut self, c: BlockCopy) {
            self.content[c.dst as usize] = self.content[c.src as usize].clone();
        }
    }

    #[test]
    fn hash_is_stable_and_chained() {
        assert_eq!(block_hash(ROOT_HASH, &[1, 2, 3]), block_hash(ROOT_HASH, &[1, 2, 3]));
        assert_ne!(block_hash(ROOT_HASH, &[1, 2, 3]), block_hash(ROOT_HASH, &[1, 2, 4]));
        assert_ne!(block_hash(1, &[1, 2, 3]), block_hash(2, &[1, 2, 3]));
        // Pinned value: a change of the hash function invalidates nothing on disk, but should be deliberate.
        assert_eq!(block_hash(ROOT_HASH, &[]), block_hash(ROOT_HASH, &[]));
    }

    #[test]
    fn prefix_hit_reuses_blocks_and_never_the_last_token() {
        let mut kv = KvManager::new(8, 4).unwrap();
        let p: Vec<u32> = (0..8).collect(); // exactly two blocks
        let a = kv.allocate(1, &p).unwrap();
        assert_eq!(a.cached_tokens, 0);
        kv.mark_computed(1, 8).unwrap();
        kv.free(1);
        assert_eq!(kv.metrics().cached_blocks, 2);
        // Same prompt: only the first block hits (the last token must be computed).
        let b = kv.allocate(2, &p).unwrap();
        assert_eq!(b.cached_tokens, 4);
        assert_eq!(b.table[0], a.table[0]);
        // Longer prompt with the same 8-token prefix hits both blocks.
        let mut q = p.clone();
        q.push(99);
        let c = kv.allocate(3, &q).unwrap();
        assert_eq!(c.cached_tokens, 8);
        assert_eq!(&c.table[..2], &a.table[..]);
        assert_eq!(kv.refcount(a.table[0]), 2);
        // A different first block misses everything, even with the same second block.
        let mut r = q.clone();
        r[0] = 77;
        assert_eq!(kv.allocate(4, &r).unwrap().cached_tokens, 0);
        let m = kv.metrics();
        assert_eq!((m.hit_tokens, m.queried_tokens), (12, 7 + 7 + 8 + 8));
        kv.check_invariants().unwrap();
    }

    #[test]
    fn salted_chains_share_only_with_the_same_salt() {
        let mut kv = KvManager::new(16, 4).unwrap();
        let p: Vec<u32> = (0..9).collect();
        kv.allocate_salted(1, &p, 42).unwrap();
        kv.mark_computed(1, 9).unwrap();
        kv.free(1);
        assert_eq!(kv.allocate(2, &p).unwrap().cached_tokens, 0, "unsalted misses a salted chain");
        assert_eq!(kv.allocate_salted(3, &p, 43).unwrap().cached_tokens, 0, "another salt misses");
        assert_eq!(kv.allocate_salted(4, &p, 42).unwrap().cached_tokens, 8, "the same salt hits");
        kv.check_invariants().unwrap();
    }

    #[test]
    fn failed_allocation_changes_nothing() {
        let mut kv = KvManager::new(3, 4).unwrap();
        kv.allocate(1, &[1, 2, 3, 4, 5]).unwrap();
        kv.mark_computed(1, 5).unwrap();
        kv.free(1);
        let before = kv.metrics();
        let e = kv.allocate(2, &(0..13).collect::<Vec<_>>()).unwrap_err().to_string();
        assert!(e.contains("KV cache full") && e.contains("sequence 2"), "{e}");
        assert_eq!(kv.metrics(), before);
        assert!(!kv.contains(2));
        kv.allocate(3, &[9; 4]).unwrap();
        let e = kv.append(3, &[1; 9]).unwrap_err().to_string();
        assert!(e.contains("KV cache full"), "{e}");
        assert_eq!(kv.table(3).len(), 1);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn eviction_is_lru_and_free_blocks_go_first() {
        let mut kv = KvManager::new(4, 2).unwrap();
        // Three sequences of one full block each, released in the order 2, 1, 3.
        for s in 1..=3u64 {
            kv.allocate(s, &[s as u32, 0]).unwrap();
            kv.mark_computed(s, 2).unwrap();
        }
        let blocks: Vec<u32> = (1..=3).map(|s| kv.table(s)[0]).collect();
        for s in [2u64, 1, 3] {
            kv.free(s);
        }
        assert_eq!(kv.metrics().cached_blocks, 3);
        // The free block is taken first, then the least recently released cached ones: 2's, then 1's.
        kv.allocate(10, &[50, 51, 52]).unwrap();
        let t = kv.table(10).to_vec();
        assert!(!blocks.contains(&t[0]));
        assert_eq!(t[1], blocks[1]);
        kv.allocate(11, &[60]).unwrap();
        assert_eq!(kv.table(11)[0], blocks[0]);
        // Sequence 3's block is still cached and hit-able.
        kv.free(11);
        assert_eq!(kv.allocate(12, &[3, 0, 7]).unwrap().cached_tokens, 2);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn fork_shares_blocks_and_copies_the_partial_block_on_write() {
        let mut kv = KvManager::new(6, 4).unwrap();
        kv.allocate(1, &[1, 2, 3, 4, 5, 6]).unwrap();
        kv.mark_computed(1, 6).unwrap();
        kv.fork(1, 2).unwrap();
        let t = kv.table(1).to_vec();
        assert_eq!(kv.table(2), &t[..]);
        assert!(t.iter().all(|&b| kv.refcount(b) == 2));
        let c = kv.append(2, &[7]).unwrap();
        assert_eq!(c, vec![BlockCopy { src: t[1], dst: kv.table(2)[1] }]);
        assert_ne!(kv.table(2)[1], t[1]);
        assert_eq!(kv.table(2)[0], t[0]);
        assert_eq!((kv.refcount(t[0]), kv.refcount(t[1])), (2, 1));
        // The parent now owns its partial block alone: no copy.
        assert!(kv.append(1, &[8]).unwrap().is_empty());
        // Fork at a block boundary: the next append takes a new block, no copy.
        kv.append(1, &[9]).unwrap();
        kv.mark_computed(1, 8).unwrap();
        kv.fork(1, 3).unwrap();
        assert!(kv.append(3, &[10]).unwrap().is_empty());
        kv.check_invariants().unwrap();
        for s in 1..=3 {
            kv.free(s);
        }
        assert_eq!(kv.metrics().used_blocks, 0);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn random_workloads_keep_invariants_and_hits_are_exact() {
        for seed in 0..8u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let bs = 1 + rng.random_range(0..5usize);
            let n = 8 + rng.random_range(0..40usize);
            let mut kv = KvManager::new(n, bs).unwrap();
            let mut shadow = Shadow { content: vec![vec![None; bs]; n] };
            // A few shared prefixes over a tiny vocabulary, so that hits and near-misses are frequent.
            let prefixes: Vec<Vec<u32>> = (0..4)
                .map(|_| (0..rng.random_range(0..20usize)).map(|_| rng.random_range(0..3u32)).collect())
                .collect();
            let mut live: Vec<SeqId> = Vec::new();
            let mut tokens: HashMap<SeqId, Vec<u32>> = HashMap::new();
            for next in 0..3000u64 {
                match rng.random_range(0..10u32) {
                    0..=2 => {
                        let mut p = prefixes[rng.random_range(0..prefixes.len())].clone();
                        p.extend((0..1 + rng.random_range(0..6usize)).map(|_| rng.random_range(0..3u32)));
                        let before = kv.metrics();
                        match kv.allocate(next, &p) {
                            Ok(a) => {
                                assert!(a.cached_tokens < p.len() && a.cached_tokens % bs == 0);
                                for (i, &b) in a.table[..a.cached_tokens / bs].iter().enumerate() {
                                    let want: Vec<Option<u32>> = p[i * bs..][..bs].iter().map(|&t| Some(t)).collect();
                                    assert_eq!(shadow.content[b as usize], want, "seed {seed}: hit block {b}");
                                }
                                live.push(next);
                                tokens.insert(next, p);
                            }
                            Err(_) => assert_eq!(kv.metrics(), before, "seed {seed}: failed allocate changed state"),
                        }
                    }
                    3..=4 if !live.is_empty() => {
                        let s = live[rng.random_range(0..live.len())];
                        let (from, len) = (kv.num_computed(s), tokens[&s].len());
                        let to = from + rng.random_range(0..=len - from);
                        shadow.write(&kv, s, from, to, &tokens[&s]);
                        kv.mark_computed(s, to).unwrap();
                    }
                    5..=6 if !live.is_empty() => {
                        let s = live[rng.random_range(0..live.len())];
                        let new: Vec<u32> =
                            (0..rng.random_range(1..4usize)).map(|_| rng.random_range(0..3u32)).collect();
                        if let Ok(copies) = kv.append(s, &new) {
                            copies.into_iter().for_each(|c| shadow.copy(c));
                            tokens.get_mut(&s).unwrap().extend(new);
                        }
                    }
                    7 if !live.is_empty() => {
                        // Fork a fully computed sequence (as after a prefill).
                        let s = live[rng.random_range(0..live.len())];
                        if kv.num_computed(s) < tokens[&s].len() {
                            continue;
                        }
                        kv.fork(s, next).unwrap();
                        live.push(next);
                        tokens.insert(next, tokens[&s].clone());
                    }
                    8..=9 if !live.is_empty() => {
                        let s = live.swap_remove(rng.random_range(0..live.len()));
                        kv.free(s);
                    }
                    _ => {}
                }
                kv.check_invariants().unwrap_or_else(|e| panic!("seed {seed}, op {next}: {e}"));
                let m = kv.metrics();
                assert_eq!(m.used_blocks + m.cached_blocks + m.free_blocks, n);
            }
            assert!(kv.metrics().hit_tokens > 0, "seed {seed}: the workload never hit the cache");
        }
    }
}
