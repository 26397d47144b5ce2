//! Text <-> token ids for Llama 3.x, with two interchangeable backends behind [`Tokenizer`]:
//!
//! - a Hugging Face `tokenizer.json`, through the `tokenizers` crate;
//! - Meta's tiktoken `tokenizer.model` (`base64 rank` lines), with our own byte-level BPE, the Llama 3
//!   pre-tokenizer regex ([`LLAMA3_PATTERN`]) and the 256 special tokens that follow the base ranks
//!   (Hugging Face text-model names: `<|begin_of_text|>`, `<|eot_id|>`, `<|reserved_special_token_N|>`, ...).
//!
//! Both give the same ids and the same text. Special-token strings in the input are plain text unless
//! [`EncodeOptions::parse_special`] is set; special tokens are then split out the same way for both backends
//! (leftmost, longest match), and only the text between them goes through BPE.

mod byte_level;
mod hf;
mod tiktoken;

use crate::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use tiktoken::LLAMA3_PATTERN;

/// Name of the beginning-of-sequence token.
pub const BOS_TOKEN: &str = "<|begin_of_text|>";

/// Options for [`Tokenizer::encode`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Put `<|begin_of_text|>` at the front, exactly once: not added again when the ids already start with it
    /// (a parsed special token at the start of the text). For `tokenizer.json` the file's post-processor is run.
    pub add_bos: bool,
    /// Turn special-token strings (e.g. `<|eot_id|>`) in the text into their ids; otherwise they are encoded
    /// as ordinary text.
    pub parse_special: bool,
}

enum Backend {
    Tiktoken(tiktoken::Tiktoken),
    Hf(Box<hf::HfTokenizer>),
}

/// A loaded tokenizer (either backend). Cheap to share by reference; `Send + Sync`.
pub struct Tokenizer {
    path: PathBuf,
    backend: Backend,
    /// Decoded bytes of every id; `None` for holes in the id space.
    bytes: Vec<Option<Box<[u8]>>>,
    /// Whether each id is a special token.
    special: Vec<bool>,
    splitter: SpecialSplitter,
    bos: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("backend", &self.backend_name())
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Loads a tokenizer file: `*.json` is a Hugging Face `tokenizer.json`, anything else a tiktoken
    /// `tokenizer.model`. Errors name the file (and the line, for tiktoken files).
    pub fn from_file(path: &Path) -> Result<Self> {
        let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if is_json {
            Self::from_hf(path)
        } else {
            Self::from_tiktoken(path)
        }
    }

    /// Loads the tokenizer of a model directory: `tokenizer.json`, else `tokenizer.model`, else
    /// `original/tokenizer.model`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        const CANDIDATES: [&str; 3] = ["tokenizer.json", "tokenizer.model", "original/tokenizer.model"];
        for name in CANDIDATES {
            let path = dir.join(name);
            if path.is_file() {
                return Self::from_file(&path);
            }
        }
        Err(Error::tokenizer(dir, format!("no tokenizer found; looked for {}", CANDIDATES.join(", "))))
    }

    fn from_tiktoken(path: &Path) -> Result<Self> {
        let (tok, decoder) = tiktoken::Tiktoken::load(path)?;
        let num_base = tok.num_base();
        let mut bytes: Vec<Option<Box<[u8]>>> = decoder.into_iter().map(|b| Some(b.into_boxed_slice())).collect();
        let mut special = vec![false; bytes.len()];
        let mut specials = Vec::with_capacity(tiktoken::NUM_SPECIAL as usize);
        for i in 0..tiktoken::NUM_SPECIAL {
            let name = tiktoken::llama3_special_name(i);
            bytes.push(Some(name.as_bytes().into()));
            special.push(true);
            specials.push((name, num_base + i));
        }
        let splitter = SpecialSplitter::new(path, specials)?;
        let bos = splitter.by_name.get(BOS_TOKEN).copied();
        Ok(Tokenizer { path: path.to_path_buf(), backend: Backend::Tiktoken(tok), bytes, special, splitter, bos })
    }

    fn from_hf(path: &Path) -> Result<Self> {
        let (tok, vocab) = hf::HfTokenizer::load(path)?;
        let mut special = vec![false; vocab.bytes.len()];
        for &(_, id) in &vocab.specials {
            if let Some(s) = special.get_mut(id as usize) {
                *s = true;
            }
        }
        let bos = tok.token_to_id(BOS_TOKEN);
        let splitter = SpecialSplitter::new(path, vocab.specials)?;
        Ok(Tokenizer {
            path: path.to_path_buf(),
            backend: Backend::Hf(Box::new(tok)),
            bytes: vocab.bytes,
            special,
            splitter,
            bos,
        })
    }

    /// The file this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `"tiktoken"` or `"tokenizer.json"`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Tiktoken(_) => "tiktoken",
            Backend::Hf(_) => "tokenizer.json",
        }
    }

    /// Encodes `text` (see [`EncodeOptions`]).
    pub fn encode(&self, text: &str, opts: EncodeOptions) -> Result<Vec<u32>> {
        let segments =
            if opts.parse_special { self.splitter.split(text, &self.path)? } else { vec![Segment::Text(text)] };
        let text_starts_with_bos = matches!(segments.first(), Some(Segment::Special(id, _)) if Some(*id) == self.bos);
        let mut ids = match &self.backend {
            Backend::Tiktoken(tok) => {
                let mut ids = Vec::with_capacity(text.len() / 3 + 2);
                for seg in &segments {
                    match *seg {
                        Segment::Text(s) => tok.encode_ordinary(s, &mut ids)?,
                        Segment::Special(id, _) => ids.push(id),
                    }
                }
                ids
            }
            Backend::Hf(tok) => {
                let mut parts = Vec::with_capacity(segments.len());
                for seg in &segments {
                    match *seg {
                        Segment::Text("") => {}
                        Segment::Text(s) => parts.push(tok.encode_ordinary(s)?),
                        Segment::Special(id, s) => parts.push(hf::HfTokenizer::special_encoding(id, s)),
                    }
                }
                if opts.add_bos && tok.has_post_processor() {
                    let mut ids = tok.post_process(parts)?;
                    if text_starts_with_bos && ids.len() >= 2 && Some(ids[0]) == self.bos && ids[0] == ids[1] {
                        ids.remove(0);
                    }
                    ids
                } else {
                    parts.iter().flat_map(|e| e.get_ids().iter().copied()).collect()
                }
            }
        };
        if opts.add_bos {
            let bos = self.bos.ok_or_else(|| {
                Error::tokenizer(&self.path, format!("add_bos requested but the vocabulary has no {BOS_TOKEN}"))
            })?;
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text (invalid UTF-8 becomes U+FFFD). `skip_special` drops special tokens.
    /// An id outside the vocabulary is an error naming it.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        for &id in ids {
            self.id_bytes(id)?;
        }
        match &self.backend {
            Backend::Hf(tok) => tok.decode(ids, skip_special),
            Backend::Tiktoken(_) => {
                let mut buf = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    if !(skip_special && self.is_special(id)) {
                        buf.extend_from_slice(self.id_bytes(id)?);
                    }
                }
                Ok(String::from_utf8_lossy(&buf).into_owned())
            }
        }
    }

    fn id_bytes(&self, id: u32) -> Result<&[u8]> {
        self.token_bytes(id).ok_or_else(|| {
            Error::tokenizer(
                &self.path,
                format!("token id {id} is not in the vocabulary (ids 0..{})", self.vocab_size()),
            )
        })
    }

    /// The raw bytes a token decodes to (special tokens: their name), or `None` for an unknown id.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize).and_then(|b| b.as_deref())
    }

    /// Id of a token, spelled as in `tokenizer.json` (byte-level chars, e.g. `"ĠHello"`) or a special name.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::Hf(tok) => tok.token_to_id(token),
            Backend::Tiktoken(tok) => self
                .splitter
                .by_name
                .get(token)
                .copied()
                .or_else(|| byte_level::token_to_bytes(token).and_then(|b| tok.rank_of(&b))),
        }
    }

    /// Spelling of a token as in `tokenizer.json` (byte-level chars; special tokens by name).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Hf(tok) => tok.id_to_token(id),
            Backend::Tiktoken(_) => {
                let bytes = self.token_bytes(id)?;
                if self.is_special(id) {
                    Some(String::from_utf8_lossy(bytes).into_owned())
                } else {
                    Some(byte_level::bytes_to_token(bytes))
                }
            }
        }
    }

    /// Number of ids, special tokens included (128256 for Llama 3).
    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    /// Id of `<|begin_of_text|>`, if the vocabulary has it.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// All special tokens as (name, id), by id.
    pub fn special_tokens(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self.splitter.by_name.iter().map(|(k, &v)| (k.clone(), v)).collect();
        v.sort_by_key(|&(_, id)| id);
        v
    }

    /// Incremental decoder for generated ids; see [`StreamDecoder`].
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder { tok: self, skip_special, pending: Vec::new() }
    }
}

/// A piece of input text: ordinary text, or a special token (id, matched text).
enum Segment<'t> {
    Text(&'t str),
    Special(u32, &'t str),
}

/// Finds special-token strings in text: leftmost match, longest name first.
struct SpecialSplitter {
    regex: Option<fancy_regex::Regex>,
    by_name: HashMap<String, u32>,
}

impl SpecialSplitter {
    fn new(path: &Path, specials: Vec<(String, u32)>) -> Result<Self> {
        let mut names: Vec<&str> = specials.iter().map(|(n, _)| n.as_str()).filter(|n| !n.is_empty()).collect();
        names.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        let regex = if names.is_empty() {
            None
        } else {
            let alternation: Vec<String> = names.iter().map(|n| fancy_regex::escape(n).into_owned()).collect();
            Some(
                fancy_regex::Regex::new(&alternation.join("|"))
                    .map_err(|e| Error::tokenizer(path, format!("special-token matcher: {e}")))?,
            )
        };
        Ok(SpecialSplitter { regex, by_name: specials.into_iter().collect() })
    }

    fn split<'t>(&self, text: &'t str, path: &Path) -> Result<Vec<Segment<'t>>> {
        let Some(regex) = &self.regex else { return Ok(vec![Segment::Text(text)]) };
        let mut out = Vec::new();
        let mut last = 0;
        for m in regex.find_iter(text) {
            let m = m.map_err(|e| Error::tokenizer(path, format!("special-token matcher failed: {e}")))?;
            let Some(&id) = self.by_name.get(m.as_str()) else { continue };
            if m.start() > last {
                out.push(Segment::Text(&text[last..m.start()]));
            }
            out.push(Segment::Special(id, m.as_str()));
            last = m.end();
        }
        if last < text.len() || out.is_empty() {
            out.push(Segment::Text(&text[last..]));
        }
        Ok(out)
    }
}

/// Turns ids into text one at a time, never splitting a UTF-8 character: bytes of an unfinished character
/// are held back until it completes. The concatenated output equals [`Tokenizer::decode`] of all ids (which refuses an
/// unknown id, where this decoder skips it).
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    skip_special: bool,
    pending: Vec<u8>,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the text it completes (possibly ""). An id the tokenizer lacks (a row of a padded
    /// vocabulary, which a model may still pick) decodes to nothing, as HF tokenizers' `decode` skips it: one odd
    /// generated id must not fail the engine's other sequences.
    pub fn push(&mut self, id: u32) -> Result<String> {
        let Some(bytes) = self.tok.token_bytes(id) else { return Ok(String::new()) };
        if self.skip_special && self.tok.is_special(id) {
            return Ok(String::new());
        }
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..start + valid]));
                    match e.error_len() {
                        // Invalid bytes: replaced exactly as `String::from_utf8_lossy` does.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            start += valid + bad;
                        }
                        // An unfinished character at the end: wait for more bytes.
                        None => {
                            start += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        Ok(out)
    }

    /// Flushes what is left; an unfinished character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Tokenizer {
        let (tok, decoder) = tiktoken::Tiktoken::from_ranks(&[b"ab", "é".as_bytes()]);
        let n = decoder.len() as u32;
        let mut bytes: Vec<Option<Box<[u8]>>> = decoder.into_iter().map(|b| Some(b.into_boxed_slice())).collect();
        let mut special = vec![false; bytes.len()];
        let specials = vec![(BOS_TOKEN.to_string(), n), ("<|eot_id|>".to_string(), n + 1)];
        for (name, _) in &specials {
            bytes.push(Some(name.as_bytes().into()));
            special.push(true);
        }
        let splitter = SpecialSplitter::new(Path::new("<toy>"), specials).unwrap();
        let path = PathBuf::from("<toy>");
        Tokenizer { path, backend: Backend::Tiktoken(tok), bytes, special, splitter, bos: Some(n) }
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
    }

    #[test]
    fn bos_added_exactly_once_and_specials_split() {
        let t = toy();
        let bos = t.bos_id().unwrap();
        let plain = EncodeOptions::default();
        let with_bos = EncodeOptions { add_bos: true, parse_special: false };
        let parsed = EncodeOptions { add_bos: true, parse_special: true };
        assert_eq!(t.encode("ab", plain).unwrap(), vec![256]);
        assert_eq!(t.encode("ab", with_bos).unwrap(), vec![bos, 256]);
        assert_eq!(t.encode("", with_bos).unwrap(), vec![bos]);
        assert_eq!(t.encode("<|begin_of_text|>ab<|eot_id|>", parsed).unwrap(), vec![bos, 256, bos + 1]);
        let as_text = t.encode("<|eot_id|>", plain).unwrap();
        assert!(as_text.len() > 1 && as_text.iter().all(|&id| !t.is_special(id)));
        assert_eq!(t.decode(&as_text, false).unwrap(), "<|eot_id|>");
    }

    #[test]
    fn stream_decoder_holds_back_partial_chars() {
        let t = toy();
        let e = "é".as_bytes();
        let mut s = t.stream_decoder(false);
        assert_eq!(s.push(u32::from(e[0])).unwrap(), "");
        assert_eq!(s.push(u32::from(e[1])).unwrap(), "é");
        assert_eq!(s.push(u32::from(e[0])).unwrap(), "");
        assert_eq!(s.push(u32::from(b'a')).unwrap(), "\u{FFFD}a");
        assert_eq!(s.push(0xE2).unwrap(), "");
        assert_eq!(s.finish(), "\u{FFFD}");
        assert_eq!(t.decode(&[u32::from(e[0]), 97, 0xE2], false).unwrap(), "\u{FFFD}a\u{FFFD}");
        assert_eq!(s.push(100_000).unwrap(), "");
        assert_eq!(s.push(u32::from(b'b')).unwrap(), "b");
        let err = t.decode(&[7, 99_999], false).unwrap_err().to_string();
        assert!(err.contains("99999"), "{err}");
    }
}
