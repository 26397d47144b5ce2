//! The prompts of a generation request: a chat request's messages rendered through the model's template (with its
//! images and tool choice), or a completions request's prompt strings or token ids.

use serde_json::Value as Json;

use super::{data_url_bytes, ApiError, ApiResult, Fields, ServeContext, MAX_IMAGES, MAX_PROMPTS};
use crate::chat_template::{ChatRequest, RenderOptions};
use crate::tokenizer::{EncodeOptions, Tokenizer};

/// A prompt with its request field (`messages` or `prompt`): ids, and the text that leads the answer (a forced
/// tool call's start, or the echoed prompt).
pub(super) type Prompt = (Vec<u32>, String, &'static str);

/// A chat request's prompt.
pub(super) struct ChatPrompt {
    /// The rendered conversation's ids, the forced prefix included.
    pub ids: Vec<u32>,
    /// The start of the answer a required or named tool choice forces (part of `ids`).
    pub forced: String,
    /// Whether the answer is parsed into tool calls.
    pub parse_tools: bool,
    /// The images of the messages, in order: `(name, encoded bytes)`.
    pub images: Vec<(String, Vec<u8>)>,
}

fn need_tok<'a>(ctx: &'a ServeContext, what: &str) -> ApiResult<&'a Tokenizer> {
    ctx.tokenizer
        .as_deref()
        .ok_or_else(|| ApiError::bad_request(None, format!("{what} needs a tokenizer, and this model has none")))
}

/// Renders a chat request's messages (and tools) through the model's template and encodes them; a tool choice
/// that forces the answer's start is appended.
pub(super) fn chat(ctx: &ServeContext, body: &Json) -> ApiResult<ChatPrompt> {
    let mut parse_tools = false;
    let mut images: Vec<(String, Vec<u8>)> = Vec::new();
    let mut req = ChatRequest::from_value(body.clone()).map_err(|e| ApiError::from_request_error(&e))?;
    let urls = req.images();
    if !urls.is_empty() && ctx.vision.is_none() {
        return Err(ApiError::bad_request(
            Some("messages"),
            "messages: image content needs a vision model; this server serves a text model",
        ));
    }
    if urls.len() > MAX_IMAGES {
        return Err(ApiError::bad_request(
            Some("messages"),
            format!("messages: {} images, at most {MAX_IMAGES} per request", urls.len()),
        ));
    }
    for (k, url) in urls.iter().enumerate() {
        images.push((format!("image {k}"), data_url_bytes(k, *url)?));
    }
    let template = ctx.template.as_deref().ok_or_else(|| {
        ApiError::bad_request(None, "/v1/chat/completions needs a chat template, and this model has none")
    })?;
    let tok = need_tok(ctx, "/v1/chat/completions")?;
    let tools_given = req.tools.as_ref().is_some_and(|t| !t.is_empty());
    let choice = req.tool_choice.clone();
    let mut forced = String::new();
    match &choice {
        None => parse_tools = tools_given,
        Some(Json::String(s)) if s == "none" => req.tools = None,
        Some(Json::String(s)) if s == "auto" => parse_tools = tools_given,
        Some(Json::String(s)) if s == "required" => {
            if !tools_given {
                return Err(ApiError::bad_request(Some("tool_choice"), "tool_choice: \"required\" needs tools"));
            }
            parse_tools = true;
            forced = "{\"name\": \"".into();
        }
        Some(Json::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Json::as_str)
                .ok_or_else(|| ApiError::bad_request(Some("tool_choice"), "tool_choice.function.name: missing"))?;
            // The forced prefix is prompt text encoded with special tokens parsed: the name goes in
            // JSON-escaped, and special-token text (`<|eot_id|>`) is refused.
            if name.contains("<|") {
                return Err(ApiError::bad_request(
                    Some("tool_choice"),
                    "tool_choice.function.name: must not contain special-token text (`<|`)",
                ));
            }
            let known = req
                .tools
                .iter()
                .flatten()
                .any(|t| t.get("function").unwrap_or(t).get("name").and_then(Json::as_str) == Some(name));
            if !known {
                return Err(ApiError::bad_request(
                    Some("tool_choice"),
                    format!("tool_choice: function `{name}` is not in tools"),
                ));
            }
            parse_tools = true;
            let quoted = serde_json::to_string(name).unwrap_or_default();
            forced = format!("{{\"name\": {quoted}, \"parameters\": ");
        }
        Some(other) => {
            return Err(ApiError::bad_request(
                Some("tool_choice"),
                format!("tool_choice: expected \"none\", \"auto\", \"required\" or a function, got {other}"),
            ))
        }
    }
    let opts = RenderOptions::default();
    let rendered = template.render(&req, &opts).map_err(|e| {
        // A template that fails only with the request's chat_template_kwargs fails because of them.
        let kwargs = req.chat_template_kwargs.as_ref().is_some_and(|k| !k.is_empty())
            && template.render(&ChatRequest { chat_template_kwargs: None, ..req.clone() }, &opts).is_ok();
        let field = if kwargs { "chat_template_kwargs" } else { "messages" };
        let detail = e.detail();
        let msg = if detail.starts_with(field) { detail } else { format!("{field}: {detail}") };
        ApiError::bad_request(Some(field), msg)
    })?;
    let text = format!("{rendered}{forced}");
    let ids = match &ctx.vision {
        Some(v) => crate::vision::pipeline::encode_with_images(tok, &text, v.cfg.image_token_index),
        None => tok.encode(&text, EncodeOptions { add_bos: false, parse_special: true }),
    }
    .map_err(|e| ApiError::bad_request(Some("messages"), format!("messages: {e}")))?;
    if let Some(v) = &ctx.vision {
        // Checked here, before any image is decoded: `<|image|>` typed as text, or an image part the template
        // leaves out (Llama 3.2's drops images outside user messages), would otherwise fail later under an
        // internal name.
        let tokens = ids.iter().filter(|&&t| t == v.cfg.image_token_index).count();
        if tokens != images.len() {
            return Err(ApiError::bad_request(
                Some("messages"),
                format!(
                    "messages: the rendered prompt holds {tokens} `<|image|>` token(s) but the request has {} \
                     image(s) (images go in user messages; `<|image|>` is not text)",
                    images.len()
                ),
            ));
        }
    }
    Ok(ChatPrompt { ids, forced, parse_tools, images })
}

/// A completions request's prompts: a string, strings, token ids or lists of token ids (at most [`MAX_PROMPTS`]),
/// each with its text when `echo` asks for it back.
pub(super) fn completions(
    ctx: &ServeContext,
    f: &Fields<'_>,
    echo: bool,
    skip_special: bool,
) -> ApiResult<Vec<Prompt>> {
    let mut prompts = Vec::new();
    let p = f.get("prompt").ok_or_else(|| ApiError::bad_request(Some("prompt"), "prompt: missing field"))?;
    let bad = || {
        ApiError::bad_request(
            Some("prompt"),
            "prompt: expected a string, an array of strings, an array of token ids, or an array of arrays of token ids",
        )
    };
    let ids_of = |v: &Json| -> Option<Vec<u32>> {
        v.as_array()?.iter().map(|x| x.as_u64().filter(|&t| t <= u32::MAX as u64).map(|t| t as u32)).collect()
    };
    let mut texts: Vec<std::result::Result<String, Vec<u32>>> = Vec::new();
    match p {
        Json::String(s) => texts.push(Ok(s.clone())),
        Json::Array(items) if items.is_empty() => return Err(bad()),
        Json::Array(items) if items.iter().all(Json::is_string) => {
            texts.extend(items.iter().filter_map(Json::as_str).map(|s| Ok(s.to_string())))
        }
        Json::Array(items) if items.iter().all(Json::is_number) => texts.push(Err(ids_of(p).ok_or_else(bad)?)),
        Json::Array(items) if items.iter().all(Json::is_array) => {
            for it in items {
                texts.push(Err(ids_of(it).ok_or_else(bad)?));
            }
        }
        _ => return Err(bad()),
    }
    if texts.len() > MAX_PROMPTS {
        return Err(ApiError::bad_request(
            Some("prompt"),
            format!("prompt: {} prompts in one request; at most {MAX_PROMPTS}", texts.len()),
        ));
    }
    for t in texts {
        let (ids, text) = match t {
            Ok(s) => {
                let tok = need_tok(ctx, "a text prompt")?;
                let ids = tok
                    .encode(&s, EncodeOptions { add_bos: true, parse_special: false })
                    .map_err(|e| ApiError::bad_request(Some("prompt"), format!("prompt: {e}")))?;
                (ids, s)
            }
            Err(ids) => {
                let text = if echo {
                    need_tok(ctx, "echo")?
                        .decode(&ids, skip_special)
                        .map_err(|e| ApiError::bad_request(Some("prompt"), format!("prompt: {e}")))?
                } else {
                    String::new()
                };
                (ids, text)
            }
        };
        prompts.push((ids, if echo { text } else { String::new() }, "prompt"));
    }
    Ok(prompts)
}
