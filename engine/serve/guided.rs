//! Structured outputs: a request's output constrained to a JSON schema, any JSON object, a regular expression, one
//! of a list of strings or a grammar, Lark or GBNF (OpenAI's `response_format`, vLLM's `guided_*` and
//! `structured_outputs`).
//!
//! The grammar engine is llguidance (the one vLLM, SGLang and llama.cpp use). [`Guides`] builds its token trie over
//! the tokenizer's vocabulary once, on the first guided request, and compiles each request's grammar into a
//! [`Guide`]. Every sequence keeps its own guide. Before each of its sampled rows the engine asks for a
//! [`TokenMask`] of the tokens the grammar allows next; the sampler sees the row's logits with every other token at
//! `-inf` (its logprobs stay the model's). After the pick, the guide advances by the token. Once the grammar is
//! complete, only the end-of-sequence tokens are allowed, so the sequence stops there.
//!
//! Special tokens never match a grammar (their trie entries start with the byte 0xFF, as llguidance expects), and
//! a JSON schema is compiled without free whitespace between tokens (compact JSON), unless the schema's own
//! `x-guidance` options say otherwise: a model left free there can pad with whitespace until `max_tokens`.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value as Json;

use super::gbnf;
use crate::sampling::TokenMask;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// What a request's output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum GuideSpec {
    /// A JSON value valid under this JSON schema.
    JsonSchema(Json),
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A match of this regular expression (Rust `regex` syntax), anchored at both ends.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
    /// A grammar in GBNF, llama.cpp's format (see [`crate::serve::gbnf`]).
    Gbnf(String),
}

impl GuideSpec {
    /// A grammar: GBNF when its first definition is `name ::= ...`, as vLLM tells them apart; Lark otherwise.
    pub fn grammar_text(text: String) -> Self {
        if gbnf::is_gbnf(&text) {
            GuideSpec::Gbnf(text)
        } else {
            GuideSpec::Lark(text)
        }
    }
}

impl GuideSpec {
    /// The llguidance grammar.
    fn grammar(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            GuideSpec::JsonSchema(schema) => {
                let mut schema = schema.clone();
                let obj =
                    schema.as_object_mut().ok_or_else(|| Error::request("a JSON schema must be a JSON object"))?;
                // Compact JSON unless the schema asks otherwise.
                obj.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
                TopLevelGrammar::from_json_schema(schema)
            }
            GuideSpec::JsonObject => TopLevelGrammar::from_json_schema(
                serde_json::json!({"type": "object", "x-guidance": {"whitespace_flexible": false}}),
            ),
            GuideSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GuideSpec::Choice(choices) => {
                if choices.is_empty() {
                    return Err(Error::request("a choice needs at least one string"));
                }
                let alts: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alts.join("|")))
            }
            GuideSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            GuideSpec::Gbnf(g) => TopLevelGrammar::from_lark(gbnf::to_lark(g).map_err(Error::request)?),
        })
    }
}

/// The grammar engine of one served model: built on first use (the token trie takes a moment), shared by every
/// request.
pub struct Guides {
    tokenizer: Option<Arc<Tokenizer>>,
    vocab_size: usize,
    eos_ids: Vec<u32>,
    factory: OnceLock<std::result::Result<Arc<ParserFactory>, String>>,
}

impl std::fmt::Debug for Guides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guides").field("vocab_size", &self.vocab_size).field("eos_ids", &self.eos_ids).finish()
    }
}

impl Guides {
    /// Guides over `tokenizer`'s tokens for a model of `vocab_size` logits whose generation ends at `eos_ids`.
    pub fn new(tokenizer: Option<Arc<Tokenizer>>, vocab_size: usize, eos_ids: &[u32]) -> Self {
        Guides { tokenizer, vocab_size, eos_ids: eos_ids.to_vec(), factory: OnceLock::new() }
    }

    fn factory(&self) -> Result<Arc<ParserFactory>> {
        let built = self.factory.get_or_init(|| self.build().map(Arc::new).map_err(|e| e.to_string()));
        built.clone().map_err(Error::request)
    }

    fn build(&self) -> Result<ParserFactory> {
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| Error::request("structured outputs need a tokenizer, and this model has none"))?;
        let eos_ids: Vec<u32> = self.eos_ids.iter().copied().filter(|&e| (e as usize) < self.vocab_size).collect();
        let eos = *eos_ids.first().ok_or_else(|| Error::request("structured outputs need an EOS token"))?;
        // Special tokens (and ids the tokenizer lacks) get a 0xFF-led name that no grammar matches.
        let words: Vec<Vec<u8>> = (0..self.vocab_size as u32)
            .map(|id| match tok.token_bytes(id) {
                Some(b) if !tok.is_special(id) && !b.is_empty() => b.to_vec(),
                other => {
                    let mut w = vec![0xFF];
                    w.extend_from_slice(other.filter(|b| !b.is_empty()).unwrap_or(format!("<|id_{id}|>").as_bytes()));
                    w
                }
            })
            .collect();
        // Every EOS id ends a grammar (Llama 3.2 Instruct has three).
        let trie = TokTrie::from(&TokRxInfo::new(self.vocab_size as u32, eos), &words).with_eos_tokens(&eos_ids);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| Error::Backend(format!("structured outputs: {e}")))?;
        factory.quiet();
        Ok(factory)
    }

    /// Compiles `spec` into a fresh guide; a grammar that does not compile is a request error naming the reason.
    pub fn compile(&self, spec: &GuideSpec) -> Result<Guide> {
        let factory = self.factory()?;
        let parser = factory.create_parser(spec.grammar()?).map_err(|e| Error::request(format!("{e}")))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::request(e));
        }
        // A grammar that compiles may still produce nothing (a schema whose $ref loops back to itself): its first
        // mask fails. Found here, it is the client's 400 rather than a failed generation.
        if matcher.compute_mask().is_err() {
            return Err(Error::request(
                "the grammar cannot produce any text (for example, a schema or rule that only refers back to itself)",
            ));
        }
        Ok(Guide { matcher, eos_ids: self.eos_ids.clone(), vocab_size: self.vocab_size })
    }
}

/// A grammar failure mid-generation, by the first line of llguidance's report (the rest is its parser dump).
fn failed(e: &impl std::fmt::Display) -> Error {
    let msg = e.to_string();
    Error::Backend(format!("structured output: {}", msg.lines().next().unwrap_or("the grammar failed")))
}

/// One sequence's grammar state.
pub struct Guide {
    matcher: Matcher,
    eos_ids: Vec<u32>,
    vocab_size: usize,
}

impl Clone for Guide {
    /// An independent copy (the parser state is not shared).
    fn clone(&self) -> Self {
        Guide { matcher: self.matcher.deep_clone(), eos_ids: self.eos_ids.clone(), vocab_size: self.vocab_size }
    }
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Guide {
    /// The tokens the grammar allows next; every EOS id when the grammar is complete (or may end here).
    pub fn mask(&mut self) -> Result<TokenMask> {
        let vob = self.matcher.compute_mask_or_eos().map_err(|e| failed(&e))?;
        let mut mask = TokenMask::new(self.vocab_size);
        vob.iter_set_entries(|i| mask.allow(i as u32));
        if self.eos_ids.iter().any(|&e| mask.allows(e)) {
            for &e in &self.eos_ids {
                mask.allow(e);
            }
        }
        Ok(mask)
    }

    /// Advances by the picked token (an EOS id ends the sequence and is not fed to the grammar).
    pub fn advance(&mut self, id: u32) -> Result<()> {
        if self.eos_ids.contains(&id) {
            return Ok(());
        }
        self.matcher.consume_token(id).map_err(|e| failed(&e))
    }
}
