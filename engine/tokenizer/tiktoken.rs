//! Meta's tiktoken `tokenizer.model` (lines `base64(bytes) rank`) with a byte-level BPE of our own.

use super::byte_level::FxBuild;
use crate::{Error, Result};
use base64::Engine as _;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};

/// Llama 3's pre-tokenizer regex (`pat_str` in Meta's tokenizer.py). It needs negative lookahead.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Number of special-token slots after the base ranks.
pub(crate) const NUM_SPECIAL: u32 = 256;

/// Pieces longer than this (in bytes) use the heap-based merge instead of the quadratic scan.
const HEAP_MERGE_MIN_LEN: usize = 128;

/// Name of special token `index` (id = number of base ranks + index), Hugging Face text-model naming.
pub(crate) fn llama3_special_name(index: u32) -> String {
    let name = match index {
        0 => "begin_of_text",
        1 => "end_of_text",
        2 => "reserved_special_token_0",
        3 => "reserved_special_token_1",
        4 => "finetune_right_pad_id",
        5 => "reserved_special_token_2",
        6 => "start_header_id",
        7 => "end_header_id",
        8 => "eom_id",
        9 => "eot_id",
        10 => "python_tag",
        _ => return format!("<|reserved_special_token_{}|>", index - 8),
    };
    format!("<|{name}|>")
}

/// The tiktoken backend: rank table, its inverse, and the pre-tokenizer.
pub(crate) struct Tiktoken {
    path: PathBuf,
    ranks: HashMap<Vec<u8>, u32, FxBuild>,
    num_base: u32,
    regex: fancy_regex::Regex,
}

impl Tiktoken {
    /// Parses a tiktoken file: every non-empty line is `base64 rank`; ranks must be 0..n without gaps or
    /// duplicates, and all 256 single bytes must be present. Also returns the token bytes by rank.
    pub(crate) fn load(path: &Path) -> Result<(Self, Vec<Vec<u8>>)> {
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = String::from_utf8(text)
            .map_err(|e| Error::tokenizer(path, format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to())))?;
        let mut entries: Vec<(Vec<u8>, u32)> = Vec::with_capacity(128_000);
        for (lineno, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                continue;
            }
            let bad = |msg: String| Error::tokenizer(path, format!("line {}: {msg}", lineno + 1));
            let mut fields = line.split(' ');
            let (Some(b64), Some(rank), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(bad(format!("expected `<base64> <rank>`, got {:?}", truncate(line))));
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| bad(format!("bad base64 {:?}: {e}", truncate(b64))))?;
            if bytes.is_empty() {
                return Err(bad("empty token".into()));
            }
            let rank: u32 = rank.parse().map_err(|_| bad(format!("bad rank {:?}", truncate(rank))))?;
            entries.push((bytes, rank));
        }
        if entries.is_empty() {
            return Err(Error::tokenizer(path, "no ranks found (empty file?)"));
        }
        let n = entries.len();
        if n as u64 + u64::from(NUM_SPECIAL) > u64::from(u32::MAX) {
            return Err(Error::tokenizer(path, "too many ranks"));
        }
        let mut decoder: Vec<Option<Vec<u8>>> = vec![None; n];
        let mut ranks: HashMap<Vec<u8>, u32, FxBuild> = HashMap::with_capacity_and_hasher(n, FxBuild::default());
        for (bytes, rank) in entries {
            let slot = decoder.get_mut(rank as usize).ok_or_else(|| {
                Error::tokenizer(path, format!("rank {rank} out of range: ranks must be 0..{n} without gaps"))
            })?;
            if slot.is_some() {
                return Err(Error::tokenizer(path, format!("rank {rank} appears twice")));
            }
            if let Some(old) = ranks.insert(bytes.clone(), rank) {
                return Err(Error::tokenizer(path, format!("token bytes {bytes:?} have ranks {old} and {rank}")));
            }
            *slot = Some(bytes);
        }
        let decoder: Vec<Vec<u8>> = decoder.into_iter().flatten().collect();
        if decoder.len() != n {
            return Err(Error::tokenizer(path, "ranks have gaps"));
        }
        if let Some(b) = (0..=255u8).find(|b| !ranks.contains_key(&[*b][..])) {
            return Err(Error::tokenizer(path, format!("no token for the single byte 0x{b:02x}")));
        }
        let regex = fancy_regex::Regex::new(LLAMA3_PATTERN)
            .map_err(|e| Error::tokenizer(path, format!("pre-tokenizer regex: {e}")))?;
        let tok = Tiktoken { path: path.to_path_buf(), ranks, num_base: n as u32, regex };
        Ok((tok, decoder))
    }

    /// Number of base (BPE) tokens; special ids start here.
    pub(crate) fn num_base(&self) -> u32 {
        self.num_base
    }

    /// Rank of exactly these bytes.
    pub(crate) fn rank_of(&self, bytes: &[u8]) -> Option<u32> {
        self.ranks.get(bytes).copied()
    }

    /// Encodes text that contains no special tokens, appending the ids to `out`.
    pub(crate) fn encode_ordinary(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        for m in self.regex.find_iter(text) {
            let m = m.map_err(|e| Error::tokenizer(&self.path, format!("pre-tokenizer regex failed: {e}")))?;
            let piece = m.as_str().as_bytes();
            match self.ranks.get(piece) {
                Some(&id) => out.push(id),
                None => self.bpe(piece, out)?,
            }
        }
        Ok(())
    }

    fn rank(&self, bytes: &[u8]) -> u32 {
        self.ranks.get(bytes).copied().unwrap_or(u32::MAX)
    }

    fn id_of(&self, bytes: &[u8]) -> Result<u32> {
        self.ranks
            .get(bytes)
            .copied()
            .ok_or_else(|| Error::tokenizer(&self.path, format!("no token for bytes {bytes:?}")))
    }

    /// Byte-pair merge of one pre-token: repeatedly merge the adjacent pair whose concatenation has the lowest
    /// rank (leftmost on ties), as tiktoken does.
    fn bpe(&self, piece: &[u8], out: &mut Vec<u32>) -> Result<()> {
        if piece.len() >= HEAP_MERGE_MIN_LEN {
            self.bpe_heap(piece, out)
        } else {
            self.bpe_scan(piece, out)
        }
    }

    /// The quadratic merge loop (fast for the short pieces that make up almost all text).
    fn bpe_scan(&self, piece: &[u8], out: &mut Vec<u32>) -> Result<()> {
        if piece.len() < 2 {
            for &b in piece {
                out.push(self.id_of(&[b])?);
            }
            return Ok(());
        }
        // parts[i] = (start offset of part i, rank of part i merged with part i+1); two sentinels at the end.
        let mut parts: Vec<(usize, u32)> = Vec::with_capacity(piece.len() + 1);
        let mut min = (u32::MAX, usize::MAX);
        for i in 0..piece.len() - 1 {
            let r = self.rank(&piece[i..i + 2]);
            if r < min.0 {
                min = (r, i);
            }
            parts.push((i, r));
        }
        parts.push((piece.len() - 1, u32::MAX));
        parts.push((piece.len(), u32::MAX));
        let pair_rank = |parts: &[(usize, u32)], i: usize| {
            if i + 3 < parts.len() {
                self.rank(&piece[parts[i].0..parts[i + 3].0])
            } else {
                u32::MAX
            }
        };
        while min.0 != u32::MAX {
            let i = min.1;
            if i > 0 {
                parts[i - 1].1 = pair_rank(&parts, i - 1);
            }
            parts[i].1 = pair_rank(&parts, i);
            parts.remove(i + 1);
            min = (u32::MAX, usize::MAX);
            for (j, &(_, r)) in parts[..parts.len() - 1].iter().enumerate() {
                if r < min.0 {
                    min = (r, j);
                }
            }
        }
        for w in parts.windows(2) {
            out.push(self.id_of(&piece[w[0].0..w[1].0])?);
        }
        Ok(())
    }

    /// Same merges as [`Self::bpe_scan`] in O(n log n): a min-heap of (rank, start) over a linked list of parts
    /// (parts are named by their start offset); stale heap entries are skipped.
    fn bpe_heap(&self, piece: &[u8], out: &mut Vec<u32>) -> Result<()> {
        let n = piece.len();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut dead = vec![false; n];
        let pair_rank = |next: &[usize], i: usize| {
            let j = next[i];
            if j >= n {
                u32::MAX
            } else {
                self.rank(&piece[i..next[j]])
            }
        };
        let mut rank: Vec<u32> = (0..n).map(|i| pair_rank(&next, i)).collect();
        let mut heap: BinaryHeap<Reverse<(u32, usize)>> =
            rank.iter().enumerate().filter(|(_, &r)| r != u32::MAX).map(|(i, &r)| Reverse((r, i))).collect();
        while let Some(Reverse((r, i))) = heap.pop() {
            if dead[i] || rank[i] != r {
                continue;
            }
            let j = next[i];
            dead[j] = true;
            next[i] = next[j];
            if next[j] < n {
                prev[next[j]] = i;
            }
            rank[i] = pair_rank(&next, i);
            if rank[i] != u32::MAX {
                heap.push(Reverse((rank[i], i)));
            }
            let p = prev[i];
            if p < n {
                rank[p] = pair_rank(&next, p);
                if rank[p] != u32::MAX {
                    heap.push(Reverse((rank[p], p)));
                }
            }
        }
        let mut i = 0;
        while i < n {
            out.push(self.id_of(&piece[i..next[i]])?);
            i = next[i];
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn from_ranks(tokens: &[&[u8]]) -> (Self, Vec<Vec<u8>>) {
        let mut ranks = HashMap::with_hasher(FxBuild::default());
        let mut decoder = Vec::new();
        for b in 0..=255u8 {
            ranks.insert(vec![b], decoder.len() as u32);
            decoder.push(vec![b]);
        }
        for t in tokens {
            ranks.insert(t.to_vec(), decoder.len() as u32);
            decoder.push(t.to_vec());
        }
        let regex = fancy_regex::Regex::new(LLAMA3_PATTERN).unwrap();
        let num_base = decoder.len() as u32;
        (Tiktoken { path: PathBuf::from("<test>"), ranks, num_base, regex }, decoder)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_names_follow_hf_text_naming() {
        assert_eq!(llama3_special_name(0), "<|begin_of_text|>");
        assert_eq!(llama3_special_name(5), "<|reserved_special_token_2|>");
        assert_eq!(llama3_special_name(9), "<|eot_id|>");
        assert_eq!(llama3_special_name(11), "<|reserved_special_token_3|>");
        assert_eq!(llama3_special_name(255), "<|reserved_special_token_247|>");
    }

    #[test]
    fn heap_merge_equals_scan_merge() {
        // A toy vocabulary with overlapping merges, so merge order matters.
        let (tok, decoder) =
            Tiktoken::from_ranks(&[b"ab", b"bc", b"abc", b"cd", b"bcd", b"aa", b"aaa", b"aaaa", b"dab"]);
        let mut seed = 0x1234_5678_u64;
        for len in [2usize, 3, 5, 17, 64, 200] {
            for _ in 0..50 {
                let s: Vec<u8> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        b"abcd"[(seed >> 33) as usize % 4]
                    })
                    .collect();
                let (mut a, mut b) = (Vec::new(), Vec::new());
                tok.bpe_scan(&s, &mut a).unwrap();
                tok.bpe_heap(&s, &mut b).unwrap();
                assert_eq!(a, b, "{}", String::from_utf8_lossy(&s));
                let back: Vec<u8> = a.iter().flat_map(|&id| decoder[id as usize].clone()).collect();
                assert_eq!(back, s);
            }
        }
    }
}
