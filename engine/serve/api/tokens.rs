//! vLLM's `/tokenize` and `/detokenize`: the prompt ids a request would run, and text from ids.

use serde_json::{json, Map, Value as Json};

use super::{prepare_within, unknown_model, ApiError, ApiResult, Endpoint, Fields, ServeContext};

/// vLLM's `POST /tokenize`: the token ids the server would run for a completions `prompt` (one string or id
/// list; `add_special_tokens: false` leaves out the BOS) or a chat `messages` list (rendered by the chat template,
/// tools included), as `{"count", "max_model_len", "tokens"}`. The prompt is validated as a generation request
/// would be, except against the context length: a longer one is counted, not refused.
pub fn tokenize(ctx: &ServeContext, body: &Json) -> ApiResult<Json> {
    let Json::Object(obj) = body else {
        return Err(ApiError::bad_request(None, "request body: expected a JSON object"));
    };
    let f = Fields(obj);
    let endpoint = match (f.get("messages").is_some(), f.get("prompt").is_some()) {
        (true, false) => Endpoint::Chat,
        (false, true) => Endpoint::Completions,
        _ => return Err(ApiError::bad_request(None, "request body: give exactly one of `prompt` and `messages`")),
    };
    let add_special = f.bool("add_special_tokens")?.unwrap_or(true);
    // Only the prompt's fields: nothing is generated, and the prompt may be longer than the context (vLLM does not
    // check it here either: clients count tokens to decide how to cut).
    let keep = ["model", "messages", "prompt", "tools", "tool_choice", "chat_template_kwargs"];
    let mut req: Map<String, Json> =
        obj.iter().filter(|(k, _)| keep.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    req.insert("max_tokens".into(), Json::from(1));
    let prep = prepare_within(ctx, endpoint, &Json::Object(req), usize::MAX)?;
    let [r] = prep.requests.as_slice() else {
        return Err(ApiError::bad_request(Some("prompt"), "prompt: one prompt at a time"));
    };
    let mut tokens = r.prompt.clone();
    // The BOS the server adds to a text prompt (a token-id prompt is taken as given).
    let text_prompt = f.get("prompt").is_some_and(Json::is_string);
    let bos = ctx.info.config.bos_token_id;
    if text_prompt && !add_special && bos.is_some_and(|b| tokens.first() == Some(&b)) {
        tokens.remove(0);
    }
    Ok(json!({"count": tokens.len(), "max_model_len": ctx.info.max_model_len, "tokens": tokens}))
}

/// vLLM's `POST /detokenize`: `{"tokens": [ids]}` to `{"prompt": text}` (special tokens kept).
pub fn detokenize(ctx: &ServeContext, body: &Json) -> ApiResult<Json> {
    let tok = ctx
        .tokenizer
        .as_deref()
        .ok_or_else(|| ApiError::bad_request(None, "detokenize needs a tokenizer, and this model has none"))?;
    let bad = || ApiError::bad_request(Some("tokens"), "tokens: expected an array of token ids");
    let ids: Vec<u32> = body
        .get("tokens")
        .and_then(Json::as_array)
        .ok_or_else(bad)?
        .iter()
        .map(|x| x.as_u64().filter(|&t| t <= u32::MAX as u64).map(|t| t as u32))
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    // Only ids the tokenizer has, checked here so that the error names no server file; a vision model's image
    // token reads as `<|image|>`, as its prompts write it.
    let image = ctx.vision.as_ref().map(|v| v.cfg.image_token_index);
    if let Some(t) = ids.iter().find(|&&t| Some(t) != image && tok.token_bytes(t).is_none()) {
        return Err(ApiError::bad_request(Some("tokens"), format!("tokens: token id {t} is not in the vocabulary")));
    }
    if let Some(m) = body.get("model").and_then(Json::as_str).filter(|m| *m != ctx.model_name) {
        return Err(unknown_model(ctx, m));
    }
    let mut text = String::new();
    for (k, part) in ids.split(|&t| Some(t) == image).enumerate() {
        if k > 0 {
            text.push_str("<|image|>");
        }
        let piece = tok.decode(part, false);
        text.push_str(&piece.map_err(|e| ApiError::bad_request(Some("tokens"), format!("tokens: {}", e.detail())))?);
    }
    Ok(json!({ "prompt": text }))
}
