//! Hugging Face `tokenizer.json` backend, through the `tokenizers` crate.

use super::byte_level::hf_byte_level_bytes;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::Encoding;

/// A loaded `tokenizer.json`.
pub(crate) struct HfTokenizer {
    path: PathBuf,
    tk: tokenizers::Tokenizer,
}

/// What the generic layer needs to know about each id, read out of the `tokenizer.json`.
pub(crate) struct HfVocab {
    /// Decoded bytes of every id (`None` for holes in the id space).
    pub bytes: Vec<Option<Box<[u8]>>>,
    /// Special (added, `special: true`) tokens: (content, id).
    pub specials: Vec<(String, u32)>,
}

impl HfTokenizer {
    /// Loads `path`. Requires a `ByteLevel` decoder (Llama 3 style byte-level BPE), drops any truncation or
    /// padding settings, and turns off the crate's own special-token matching (we split special tokens ourselves).
    pub(crate) fn load(path: &Path) -> Result<(Self, HfVocab)> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut tk = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::tokenizer(path, format!("cannot parse tokenizer.json: {e}")))?;
        match tk.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => {}
            other => {
                let found = other.map_or("none".to_string(), |d| {
                    serde_json::to_string(d).unwrap_or_else(|_| "?".into()).chars().take(80).collect()
                });
                return Err(Error::tokenizer(
                    path,
                    format!("decoder must be ByteLevel (byte-level BPE as in Llama 3); found {found}"),
                ));
            }
        }
        tk.with_truncation(None).map_err(|e| Error::tokenizer(path, format!("cannot disable truncation: {e}")))?;
        tk.with_padding(None);
        tk.set_encode_special_tokens(true);

        // The tokenizers crate gives an added token whose declared id is taken or past the vocabulary the next free
        // id instead, silently: a model would then see other ids than it was trained with. Refuse that.
        let raw: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::tokenizer(path, format!("cannot parse tokenizer.json: {e}")))?;
        for (i, t) in raw.get("added_tokens").and_then(serde_json::Value::as_array).into_iter().flatten().enumerate() {
            let (Some(id), Some(content)) =
                (t.get("id").and_then(serde_json::Value::as_u64), t.get("content").and_then(serde_json::Value::as_str))
            else {
                return Err(Error::tokenizer(
                    path,
                    format!("added_tokens[{i}]: expected an integer `id` and a string `content`"),
                ));
            };
            if tk.token_to_id(content).map(u64::from) != Some(id) {
                return Err(Error::tokenizer(
                    path,
                    format!(
                        "added_tokens[{i}] `{content}` declares id {id}, but the vocabulary gives it {:?} (an id out \
                         of order or already taken)",
                        tk.token_to_id(content)
                    ),
                ));
            }
        }
        let n = tk.get_vocab_size(true);
        let added = tk.get_added_tokens_decoder();
        let mut specials: Vec<(String, u32)> =
            added.iter().filter(|(_, t)| t.special).map(|(&id, t)| (t.content.clone(), id)).collect();
        specials.sort_by_key(|&(_, id)| id);
        let max_id = added.keys().copied().max().map_or(0, |m| m as usize + 1);
        let mut table: Vec<Option<Box<[u8]>>> = vec![None; n.max(max_id)];
        for (id, slot) in table.iter_mut().enumerate() {
            *slot = tk.id_to_token(id as u32).map(|t| hf_byte_level_bytes(&t).into_boxed_slice());
        }
        Ok((HfTokenizer { path: path.to_path_buf(), tk }, HfVocab { bytes: table, specials }))
    }

    /// Encodes text that is to contain no special tokens (they are matched as plain text).
    pub(crate) fn encode_ordinary(&self, text: &str) -> Result<Encoding> {
        self.tk.encode_fast(text, false).map_err(|e| Error::tokenizer(&self.path, format!("encode failed: {e}")))
    }

    /// One-token encoding for a special token found in the text.
    pub(crate) fn special_encoding(id: u32, content: &str) -> Encoding {
        std::iter::once((id, content.to_string(), (0, content.len()), None, 0)).collect()
    }

    /// Joins per-segment encodings and runs the post-processor (which is what adds BOS for Llama 3).
    pub(crate) fn post_process(&self, parts: Vec<Encoding>) -> Result<Vec<u32>> {
        let merged = Encoding::merge(parts, true);
        let done = self
            .tk
            .post_process(merged, None, true)
            .map_err(|e| Error::tokenizer(&self.path, format!("post-processor failed: {e}")))?;
        Ok(done.get_ids().to_vec())
    }

    /// Whether the file has a post-processor at all.
    pub(crate) fn has_post_processor(&self) -> bool {
        self.tk.get_post_processor().is_some()
    }

    /// Decodes known ids through the file's decoder.
    pub(crate) fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tk.decode(ids, skip_special).map_err(|e| Error::tokenizer(&self.path, format!("decode failed: {e}")))
    }

    /// The file's spelling of a token.
    pub(crate) fn id_to_token(&self, id: u32) -> Option<String> {
        self.tk.id_to_token(id)
    }

    /// Id of a token spelled as in the file.
    pub(crate) fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tk.token_to_id(token)
    }
}
