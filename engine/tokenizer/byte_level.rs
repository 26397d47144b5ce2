//! Byte-level helpers shared by both backends: GPT-2's byte <-> printable-char map (the token spelling used by
//! `tokenizer.json` files), and a small Fx hasher for the rank table.

use std::hash::{BuildHasherDefault, Hasher};

use std::sync::OnceLock;

fn printable(b: u8) -> bool {
    matches!(b, 33..=126 | 161..=172 | 174..=255)
}

/// The printable char GPT-2's `bytes_to_unicode` assigns to each byte, and the inverse for chars 0..324.
struct Tables {
    byte_to_char: [char; 256],
    char_to_byte: [Option<u8>; 324],
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut t = Tables { byte_to_char: ['\0'; 256], char_to_byte: [None; 324] };
        let mut extra = 0u32;
        for b in 0..=255u8 {
            let code = if printable(b) {
                u32::from(b)
            } else {
                extra += 1;
                255 + extra
            };
            t.byte_to_char[b as usize] = char::from_u32(code).unwrap_or('\u{FFFD}');
            t.char_to_byte[code as usize] = Some(b);
        }
        t
    })
}

/// Spells raw token bytes the way byte-level BPE vocabularies do (e.g. `b" Hello"` -> `"ĠHello"`).
pub(crate) fn bytes_to_token(bytes: &[u8]) -> String {
    let t = tables();
    bytes.iter().map(|&b| t.byte_to_char[b as usize]).collect()
}

/// The byte a byte-level char stands for, if any.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    tables().char_to_byte.get(c as usize).copied().flatten()
}

/// Inverse of [`bytes_to_token`]: `None` if some char is not a byte-level char.
pub(crate) fn token_to_bytes(token: &str) -> Option<Vec<u8>> {
    token.chars().map(char_to_byte).collect()
}

/// Bytes of a token as the Hugging Face `ByteLevel` decoder produces them: every char mapped back to its byte,
/// or, when some char has no byte (added tokens with spaces, say), the token's UTF-8 as is.
pub(crate) fn hf_byte_level_bytes(token: &str) -> Vec<u8> {
    token_to_bytes(token).unwrap_or_else(|| token.as_bytes().to_vec())
}

/// FxHash (as in rustc): fast, non-cryptographic; the keys are a fixed vocabulary.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// `BuildHasher` for [`FxHasher`].
pub(crate) type FxBuild = BuildHasherDefault<FxHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_map_is_a_bijection() {
        let all: Vec<u8> = (0..=255).collect();
        let spelled = bytes_to_token(&all);
        assert_eq!(spelled.chars().count(), 256);
        assert_eq!(token_to_bytes(&spelled), Some(all));
        assert_eq!(bytes_to_token(b" Hello\n"), "ĠHelloĊ");
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(hf_byte_level_bytes("a b"), b"a b".to_vec());
    }
}
