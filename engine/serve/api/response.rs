//! OpenAI response objects from engine events: the non-streaming response ([`ResponseBuilder`]) and the streaming
//! chunks ([`StreamBuilder`]), with log-probabilities and tool calls in OpenAI's shapes.

use serde_json::{json, Map, Value as Json};

use super::{Endpoint, Prepared, ServeContext};
use crate::sampling::FinishReason;
use crate::serve::{Event, TokenLogprob, Usage};
use crate::tokenizer::Tokenizer;
use crate::tool_calls::{parse_tool_calls, ParsedOutput};

/// One completion as it accumulates.
#[derive(Clone, Debug, Default)]
struct Choice {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
}

fn token_json(tok: Option<&Tokenizer>, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.and_then(|t| t.token_bytes(id)).map(<[u8]>::to_vec).unwrap_or_default();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// Chat `logprobs.content` entries for `lps`.
fn chat_logprobs(tok: Option<&Tokenizer>, lps: &[TokenLogprob]) -> Json {
    let item = |id: u32, lp: f32| {
        let (t, b) = token_json(tok, id);
        json!({"token": t, "logprob": finite(lp), "bytes": b})
    };
    let content: Vec<Json> = lps
        .iter()
        .map(|l| {
            let mut e = item(l.id, l.logprob);
            e["top_logprobs"] = Json::Array(l.top.iter().map(|&(i, p)| item(i, p)).collect());
            e
        })
        .collect();
    json!({ "content": content })
}

/// Where the next token's text starts in a completion's text, in characters (completions `text_offset`), from
/// the tokens' bytes: a character whose bytes span several tokens counts once, when its last byte comes (the
/// tokens before that start where it does), and an invalid byte sequence counts as the one U+FFFD a lossy decoding
/// gives it.
#[derive(Clone, Debug, Default)]
struct TextOffsets {
    offset: usize,
    /// The bytes of a character not yet complete.
    carry: Vec<u8>,
}

impl TextOffsets {
    fn at(offset: usize) -> Self {
        TextOffsets { offset, carry: Vec::new() }
    }

    /// Returns where a token of `bytes` starts and moves past it.
    fn advance(&mut self, bytes: &[u8]) -> usize {
        let at = self.offset;
        self.carry.extend_from_slice(bytes);
        let mut rest: &[u8] = &self.carry;
        let mut chars = 0;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    chars += s.chars().count();
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    chars += std::str::from_utf8(valid).map_or(0, |v| v.chars().count());
                    match e.error_len() {
                        // An invalid sequence: one replacement character.
                        Some(n) => {
                            chars += 1;
                            rest = &after[n..];
                        }
                        // A character cut short: wait for its next bytes.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let left = rest.to_vec();
        self.carry = left;
        self.offset += chars;
        at
    }
}

/// Completions `logprobs` (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), moving `offsets` past the
/// tokens. Offsets count characters (Python string indices, as OpenAI's clients slice `text` with them); a special
/// token left out of the text (`skip_special`) takes no room. `top_logprobs` holds the alternatives and the sampled
/// token, up to `logprobs + 1` entries as OpenAI documents.
fn completion_logprobs(
    tok: Option<&Tokenizer>,
    lps: &[TokenLogprob],
    offsets: &mut TextOffsets,
    skip_special: bool,
) -> Json {
    let (mut tokens, mut lp, mut top, mut offs) = (vec![], vec![], vec![], vec![]);
    // A token's name: its text, or vLLM's `token_id:N` without a tokenizer (every text would be "").
    let name = |id: u32| if tok.is_some() { token_json(tok, id).0 } else { format!("token_id:{id}") };
    for l in lps {
        let (_, bytes) = token_json(tok, l.id);
        if skip_special && tok.is_some_and(|t| t.is_special(l.id)) {
            offs.push(offsets.offset);
        } else {
            offs.push(offsets.advance(&bytes));
        }
        tokens.push(Json::from(name(l.id)));
        lp.push(finite(l.logprob));
        // `top_logprobs` maps names to log-probabilities: two alternatives whose bytes decode to the same lossy
        // text would share a key, and one would be lost; the second takes its `token_id:N` name instead.
        let mut m = Map::new();
        let sampled = (!l.top.iter().any(|&(i, _)| i == l.id)).then_some((l.id, l.logprob));
        for &(i, p) in l.top.iter().chain(&sampled) {
            let key = name(i);
            let key = if m.contains_key(&key) { format!("token_id:{i}") } else { key };
            m.insert(key, finite(p));
        }
        top.push(Json::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": lp, "top_logprobs": top, "text_offset": offs})
}

/// The prompt's part of completions `logprobs` under `echo`: the first token with `null`s (nothing scores it),
/// then `scores` (prompt tokens `1..`) with at most `top` alternatives each. Offsets count from the start of the
/// echoed `text`: a first token the text does not show (the BOS the server adds to a text prompt) takes no room,
/// and no offset passes the text's end.
fn echo_logprobs(
    tok: Option<&Tokenizer>,
    prompt: &[u32],
    scores: &[TokenLogprob],
    top: usize,
    text: &str,
    skip_special: bool,
) -> Json {
    let Some(&first) = prompt.first() else {
        return completion_logprobs(tok, &[], &mut TextOffsets::default(), skip_special);
    };
    let (first_text, _) = token_json(tok, first);
    let shown = !(skip_special && tok.is_some_and(|t| t.is_special(first))) && text.starts_with(&first_text);
    let width = if shown { first_text.chars().count() } else { 0 };
    let name = if tok.is_some() { first_text } else { format!("token_id:{first}") };
    let head = json!({"tokens": [name], "token_logprobs": [null], "top_logprobs": [null], "text_offset": [0]});
    let trimmed: Vec<TokenLogprob> =
        scores.iter().map(|l| TokenLogprob { top: l.top.iter().take(top).copied().collect(), ..l.clone() }).collect();
    let mut lp = join_logprobs(head, completion_logprobs(tok, &trimmed, &mut TextOffsets::at(width), skip_special));
    let end = text.chars().count();
    if let Some(offs) = lp.get_mut("text_offset").and_then(Json::as_array_mut) {
        for o in offs.iter_mut() {
            if o.as_u64().is_some_and(|v| v as usize > end) {
                *o = json!(end);
            }
        }
    }
    lp
}

/// Completions `logprobs` objects `a` then `b`, their four lists concatenated.
fn join_logprobs(mut a: Json, b: Json) -> Json {
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(x), Some(y)) = (a.get_mut(key).and_then(Json::as_array_mut), b.get(key).and_then(Json::as_array)) {
            x.extend(y.iter().cloned());
        }
    }
    a
}

/// vLLM's `prompt_logprobs`: `null` for the first prompt token, then per token a map from token id (as a string)
/// to `{"logprob", "rank", "decoded_token"}` holding the prompt's token and its `top` most likely alternatives. As
/// in vLLM, an alternative's rank is its place, and it wins over the prompt token's own entry when they are the
/// same token.
fn vllm_prompt_logprobs(tok: Option<&Tokenizer>, scores: Option<&[TokenLogprob]>, top: usize) -> Json {
    let Some(scores) = scores else { return Json::Null };
    let entry = |id: u32, lp: f32, rank: usize| json!({"logprob": finite(lp), "rank": rank, "decoded_token": token_json(tok, id).0});
    let mut out = vec![Json::Null];
    for l in scores {
        let mut m = Map::new();
        m.insert(l.id.to_string(), entry(l.id, l.logprob, l.rank as usize));
        for (k, &(i, p)) in l.top.iter().take(top).enumerate() {
            m.insert(i.to_string(), entry(i, p, k + 1));
        }
        out.push(Json::Object(m));
    }
    Json::Array(out)
}

/// JSON has no infinities: `-inf` becomes -9999.0, as vLLM does.
fn finite(v: f32) -> Json {
    if v.is_finite() {
        json!(v)
    } else {
        json!(-9999.0)
    }
}

/// Adds one request's usage; with `prompt_only` (`max_tokens: 0`) its generated token is not counted.
fn add_usage(total: &mut Usage, u: &Usage, prompt_only: bool) {
    let completion = if prompt_only { 0 } else { u.completion_tokens };
    total.prompt_tokens += u.prompt_tokens;
    total.completion_tokens += completion;
    total.total_tokens += u.prompt_tokens + completion;
}

fn usage_json(u: &Usage) -> Json {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens})
}

/// Chat message fields and finish reason of a finished completion: parsed tool calls, or content.
fn chat_message(parse_tools: bool, text: &str, finish: Option<FinishReason>) -> (Json, Json, Option<&'static str>) {
    let reason = finish.map(FinishReason::as_str);
    if parse_tools {
        if let ParsedOutput::ToolCalls(calls) = parse_tool_calls(text) {
            return (Json::Null, crate::tool_calls::to_openai_tool_calls(&calls), Some("tool_calls"));
        }
    }
    (Json::from(text), Json::Null, reason)
}

/// Collects a request's events into the non-streaming response object.
pub struct ResponseBuilder<'a> {
    ctx: &'a ServeContext,
    prep: &'a Prepared,
    /// Per prompt, per completion.
    choices: Vec<Vec<Choice>>,
    /// Per prompt: its prompt log-probabilities, once they came.
    prompt_scores: Vec<Option<Vec<TokenLogprob>>>,
    usage: Usage,
}

impl<'a> ResponseBuilder<'a> {
    /// An empty response for `prep`.
    pub fn new(ctx: &'a ServeContext, prep: &'a Prepared) -> Self {
        let choices = prep.requests.iter().map(|_| vec![Choice::default(); prep.n]).collect();
        let prompt_scores = vec![None; prep.requests.len()];
        ResponseBuilder { ctx, prep, choices, prompt_scores, usage: Usage::default() }
    }

    /// Adds one event of prompt `prompt`'s request. Returns the error message of an [`Event::Error`].
    pub fn push(&mut self, prompt: usize, ev: Event) -> std::result::Result<(), String> {
        let prompt_only = self.prep.prompt_only;
        match ev {
            Event::Delta { .. } if prompt_only => {}
            Event::Delta { index, text, ids, logprobs } => {
                if let Some(c) = self.choices.get_mut(prompt).and_then(|p| p.get_mut(index)) {
                    c.text.push_str(&text);
                    c.ids.extend(ids);
                    c.logprobs.extend(logprobs);
                }
            }
            Event::PromptLogprobs(scores) => {
                if let Some(p) = self.prompt_scores.get_mut(prompt) {
                    *p = Some(scores);
                }
            }
            Event::Finished { index, reason } => {
                if let Some(c) = self.choices.get_mut(prompt).and_then(|p| p.get_mut(index)) {
                    c.finish = Some(if prompt_only { FinishReason::Length } else { reason });
                }
            }
            Event::Done(u) => add_usage(&mut self.usage, &u, prompt_only),
            Event::Error(e) => return Err(e),
        }
        Ok(())
    }

    /// The response object.
    pub fn build(self) -> Json {
        let tok = self.ctx.tokenizer.as_deref();
        let p = self.prep;
        let mut out = Vec::new();
        for (pi, cs) in self.choices.iter().enumerate() {
            let prefix = &p.prefixes[pi];
            for (i, c) in cs.iter().enumerate() {
                let index = pi * p.n + i;
                let text = format!("{prefix}{}", c.text);
                match p.endpoint {
                    Endpoint::Chat => {
                        let (content, calls, reason) = chat_message(p.parse_tools, &text, c.finish);
                        let mut message = json!({"role": "assistant", "content": content});
                        if !calls.is_null() {
                            message["tool_calls"] = calls;
                        }
                        let lp = if p.logprobs { chat_logprobs(tok, &c.logprobs) } else { Json::Null };
                        let mut choice =
                            json!({"index": index, "message": message, "logprobs": lp, "finish_reason": reason});
                        if p.return_token_ids {
                            choice["token_ids"] = json!(c.ids);
                        }
                        out.push(choice);
                    }
                    Endpoint::Completions => {
                        let req = &p.requests[pi];
                        let skip = req.skip_special_tokens;
                        let mut offsets = TextOffsets::at(prefix.chars().count());
                        let scores = self.prompt_scores[pi].as_deref();
                        let mut lp = if p.logprobs {
                            completion_logprobs(tok, &c.logprobs, &mut offsets, skip)
                        } else {
                            Json::Null
                        };
                        if let Some(top) = p.echo_logprobs {
                            let echo = echo_logprobs(tok, &req.prompt, scores.unwrap_or_default(), top, prefix, skip);
                            lp = join_logprobs(echo, lp);
                        }
                        let reason = c.finish.map(FinishReason::as_str);
                        let mut choice = json!({"index": index, "text": text, "logprobs": lp, "finish_reason": reason});
                        if let Some(top) = p.vllm_prompt_logprobs {
                            choice["prompt_logprobs"] = vllm_prompt_logprobs(tok, scores, top);
                        }
                        if p.return_token_ids {
                            choice["token_ids"] = json!(c.ids);
                            choice["prompt_token_ids"] = json!(req.prompt);
                        }
                        out.push(choice);
                    }
                }
            }
        }
        let object = if p.endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" };
        let mut resp = json!({
            "id": p.id, "object": object, "created": p.created, "model": p.model,
            "choices": out, "usage": usage_json(&self.usage),
        });
        if p.return_token_ids && p.endpoint == Endpoint::Chat {
            resp["prompt_token_ids"] = p.requests.first().map_or(Json::Null, |r| json!(r.prompt));
        }
        if let (Some(top), Endpoint::Chat) = (p.vllm_prompt_logprobs, p.endpoint) {
            let scores = self.prompt_scores.first().and_then(Option::as_deref);
            resp["prompt_logprobs"] = vllm_prompt_logprobs(tok, scores, top);
        }
        resp
    }
}

/// Turns a request's events into streaming chunk objects (each sent as one `data:` line).
///
/// Chat: a first chunk per completion with `{"role": "assistant", "content": ""}`, content deltas, then a chunk
/// with the finish reason. When tools are parsed, a completion's text is held back until it finishes and then sent
/// as one `tool_calls` delta or one content delta. Completions: text chunks, the echoed prompt first. With
/// [`Prepared::return_token_ids`] every delta carries its `token_ids` (a delta with ids but no text is sent too) and
/// the first chunk of a choice the prompt's `prompt_token_ids`.
pub struct StreamBuilder<'a> {
    ctx: &'a ServeContext,
    prep: &'a Prepared,
    started: Vec<Vec<bool>>,
    held: Vec<Vec<Choice>>,
    /// Per prompt, per completion: where the next token's text starts (completions `text_offset`).
    offsets: Vec<Vec<TextOffsets>>,
    /// Per prompt: its prompt log-probabilities, once they came (they come before its first delta).
    prompt_scores: Vec<Option<Vec<TokenLogprob>>>,
    usage: Usage,
    done: usize,
}

impl<'a> StreamBuilder<'a> {
    /// A stream for `prep`.
    pub fn new(ctx: &'a ServeContext, prep: &'a Prepared) -> Self {
        StreamBuilder {
            ctx,
            prep,
            started: prep.requests.iter().map(|_| vec![false; prep.n]).collect(),
            held: prep.requests.iter().map(|_| vec![Choice::default(); prep.n]).collect(),
            offsets: prep.prefixes.iter().map(|pre| vec![TextOffsets::at(pre.chars().count()); prep.n]).collect(),
            prompt_scores: vec![None; prep.requests.len()],
            usage: Usage::default(),
            done: 0,
        }
    }

    fn chunk(&self, choice: Json) -> Json {
        let p = self.prep;
        let object = if p.endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut c = json!({"id": p.id, "object": object, "created": p.created, "model": p.model, "choices": [choice]});
        if p.include_usage {
            c["usage"] = Json::Null;
        }
        c
    }

    fn first(&mut self, prompt: usize, i: usize, out: &mut Vec<Json>) {
        if self.started[prompt][i] {
            return;
        }
        self.started[prompt][i] = true;
        let index = prompt * self.prep.n + i;
        let prefix = self.prep.prefixes[prompt].clone();
        let p = self.prep;
        let ids = p.return_token_ids;
        let req = &p.requests[prompt];
        let tok = self.ctx.tokenizer.as_deref();
        let scores = self.prompt_scores[prompt].as_deref();
        match p.endpoint {
            Endpoint::Chat => {
                let mut c = self.chunk(json!({
                    "index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null,
                    "finish_reason": null
                }));
                if ids {
                    c["prompt_token_ids"] = json!(req.prompt);
                }
                if let Some(top) = p.vllm_prompt_logprobs {
                    c["prompt_logprobs"] = vllm_prompt_logprobs(tok, scores, top);
                }
                out.push(c);
            }
            Endpoint::Completions
                if !prefix.is_empty() || ids || p.echo_logprobs.is_some() || p.vllm_prompt_logprobs.is_some() =>
            {
                let lp = match p.echo_logprobs {
                    Some(top) => {
                        let skip = req.skip_special_tokens;
                        echo_logprobs(tok, &req.prompt, scores.unwrap_or_default(), top, &prefix, skip)
                    }
                    None => Json::Null,
                };
                let mut choice = json!({"index": index, "text": prefix, "logprobs": lp, "finish_reason": null});
                if let Some(top) = p.vllm_prompt_logprobs {
                    choice["prompt_logprobs"] = vllm_prompt_logprobs(tok, scores, top);
                }
                if ids {
                    choice["token_ids"] = json!([]);
                    choice["prompt_token_ids"] = json!(req.prompt);
                }
                out.push(self.chunk(choice));
            }
            Endpoint::Completions => {}
        }
    }

    /// The chunks for one event of prompt `prompt`'s request. Returns the message of an [`Event::Error`].
    pub fn push(&mut self, prompt: usize, ev: Event) -> std::result::Result<Vec<Json>, String> {
        let tok = self.ctx.tokenizer.as_deref();
        let p = self.prep;
        let mut out = Vec::new();
        match ev {
            Event::PromptLogprobs(scores) => {
                if let Some(slot) = self.prompt_scores.get_mut(prompt) {
                    *slot = Some(scores);
                }
            }
            Event::Delta { index: i, .. } if p.prompt_only => self.first(prompt, i, &mut out),
            Event::Delta { index: i, text, ids, logprobs } => {
                self.first(prompt, i, &mut out);
                let index = prompt * p.n + i;
                if p.parse_tools {
                    let h = &mut self.held[prompt][i];
                    h.text.push_str(&text);
                    h.ids.extend(ids);
                    h.logprobs.extend(logprobs);
                    return Ok(out);
                }
                let sends_ids = p.return_token_ids && !ids.is_empty();
                if text.is_empty() && logprobs.is_empty() && !sends_ids {
                    return Ok(out);
                }
                let mut choice = match p.endpoint {
                    Endpoint::Chat => {
                        let lp = if p.logprobs { chat_logprobs(tok, &logprobs) } else { Json::Null };
                        json!({"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": null})
                    }
                    Endpoint::Completions => {
                        let lp = if p.logprobs {
                            let skip = p.requests[prompt].skip_special_tokens;
                            completion_logprobs(tok, &logprobs, &mut self.offsets[prompt][i], skip)
                        } else {
                            Json::Null
                        };
                        json!({"index": index, "text": text, "logprobs": lp, "finish_reason": null})
                    }
                };
                if p.return_token_ids {
                    choice["token_ids"] = json!(ids);
                }
                out.push(self.chunk(choice));
            }
            Event::Finished { index: i, reason } => {
                let reason = if p.prompt_only { FinishReason::Length } else { reason };
                self.first(prompt, i, &mut out);
                let index = prompt * p.n + i;
                match p.endpoint {
                    Endpoint::Chat => {
                        let mut reason = Some(reason.as_str());
                        if p.parse_tools {
                            let h = std::mem::take(&mut self.held[prompt][i]);
                            let text = format!("{}{}", p.prefixes[prompt], h.text);
                            let (content, calls, r) = chat_message(true, &text, Some(FinishReason::Stop));
                            if r == Some("tool_calls") {
                                reason = r;
                            }
                            let mut delta = json!({});
                            if calls.is_null() {
                                delta["content"] = content;
                            } else {
                                let indexed: Vec<Json> = calls
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .enumerate()
                                    .map(|(k, c)| {
                                        let mut c = c.clone();
                                        c["index"] = json!(k);
                                        c
                                    })
                                    .collect();
                                delta["tool_calls"] = Json::Array(indexed);
                            }
                            let lp = if p.logprobs { chat_logprobs(tok, &h.logprobs) } else { Json::Null };
                            let mut choice =
                                json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": null});
                            if p.return_token_ids {
                                choice["token_ids"] = json!(h.ids);
                            }
                            out.push(self.chunk(choice));
                        }
                        out.push(
                            self.chunk(json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason})),
                        );
                    }
                    Endpoint::Completions => out.push(self.chunk(
                        json!({"index": index, "text": "", "logprobs": null, "finish_reason": reason.as_str()}),
                    )),
                }
            }
            Event::Done(u) => {
                add_usage(&mut self.usage, &u, p.prompt_only);
                self.done += 1;
                if self.done == p.requests.len() && p.include_usage {
                    let object = if p.endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
                    out.push(json!({
                        "id": p.id, "object": object, "created": p.created, "model": p.model,
                        "choices": [], "usage": usage_json(&self.usage),
                    }));
                }
            }
            Event::Error(e) => return Err(e),
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::TextOffsets;

    #[test]
    fn text_offsets_count_a_split_character_once() {
        // "a€b" with the euro sign's three bytes over two tokens, then an invalid byte and a cut-short character.
        let mut o = TextOffsets::at(5);
        let starts: Vec<usize> =
            [&b"a"[..], &[0xE2, 0x82], &[0xAC], b"b", &[0xFF], b"c", &[0xC3]].iter().map(|b| o.advance(b)).collect();
        assert_eq!(starts, vec![5, 6, 6, 7, 8, 9, 10]);
        assert_eq!(o.offset, 10, "the cut-short character waits for its next byte");
        assert_eq!(o.advance(&[0xA9]), 10);
        assert_eq!(o.offset, 11);
        assert_eq!("a€b\u{FFFD}cé".chars().count() + 5, o.offset);
    }
}
