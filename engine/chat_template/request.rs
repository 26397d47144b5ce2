//! The OpenAI chat-completions request body, parsed with errors that name the JSON path at fault.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::{Error, Result};

/// An OpenAI chat-completions request body (unknown top-level fields are ignored).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ChatRequest {
    /// The conversation.
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
    /// Tool (function) definitions, passed to the template unchanged.
    pub tools: Option<Vec<Json>>,
    /// `"none"`, `"auto"`, `"required"` or `{"type": "function", "function": {"name": ...}}`.
    pub tool_choice: Option<Json>,
    /// Model name (echoed back).
    pub model: Option<String>,
    /// Legacy limit on generated tokens.
    pub max_tokens: Option<u32>,
    /// Limit on generated tokens (takes precedence over `max_tokens`).
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Top-k cutoff (extension; <= 0 disables).
    pub top_k: Option<i32>,
    /// Min-p cutoff (extension).
    pub min_p: Option<f32>,
    /// Random seed.
    pub seed: Option<u64>,
    /// Stop string(s).
    pub stop: Option<StopSpec>,
    /// Number of choices.
    pub n: Option<u32>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options (`{"include_usage": bool}`).
    pub stream_options: Option<Json>,
    /// OpenAI frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// OpenAI presence penalty.
    pub presence_penalty: Option<f32>,
    /// Multiplicative repetition penalty (extension).
    pub repetition_penalty: Option<f32>,
    /// Return log-probabilities of the chosen tokens.
    pub logprobs: Option<bool>,
    /// Number of alternatives per position with `logprobs`.
    pub top_logprobs: Option<u32>,
    /// Token-id (as string) to bias map.
    pub logit_bias: Option<Map<String, Json>>,
    /// Requested response format (`{"type": "text"}` ...).
    pub response_format: Option<Json>,
    /// Whether several tool calls may be returned at once.
    pub parallel_tool_calls: Option<bool>,
    /// End-user identifier.
    pub user: Option<String>,
    /// Extra variables for the chat template (extension, as in vLLM), e.g. `{"tools_in_user_message": false}`.
    pub chat_template_kwargs: Option<Map<String, Json>>,
}

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum StopSpec {
    /// A single stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

impl StopSpec {
    /// The stop strings as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s.clone()],
            StopSpec::Many(v) => v.clone(),
        }
    }
}

/// A message author.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// System prompt (OpenAI's newer name for it, `developer`, is read as this).
    #[serde(alias = "developer")]
    System,
    /// The user.
    User,
    /// The model.
    Assistant,
    /// A tool result (OpenAI name).
    Tool,
    /// A tool result (Llama name).
    Ipython,
}

impl Role {
    /// The role as the template sees it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Ipython => "ipython",
        }
    }
}

/// One message of the conversation.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatMessage {
    /// Author.
    pub role: Role,
    /// Text, content parts, or absent/null (assistant messages with tool calls).
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Optional author name.
    #[serde(default)]
    pub name: Option<String>,
    /// Tool calls made by an assistant message.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallSpec>>,
    /// The call a tool message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// Any other fields, passed to the template as they are (e.g. `reasoning_content`).
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

/// Message content.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// A list of parts.
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// `{"type": "text", "text": ...}`
    Text {
        /// The text.
        text: String,
    },
    /// `{"type": "image_url", "image_url": {"url": ...}}` (an `https:`, `file:` or `data:` URL).
    ImageUrl {
        /// The image reference.
        image_url: ImageUrl,
    },
    /// `{"type": "image"}` (HF style), optionally with `"url"` or `"image"` naming the picture.
    Image {
        /// Where the picture is, if given.
        #[serde(default, alias = "image", skip_serializing_if = "Option::is_none")]
        url: Option<String>,
    },
}

/// The `image_url` object of an image part.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ImageUrl {
    /// The URL (`data:image/png;base64,...` included).
    pub url: String,
    /// OpenAI's detail hint (ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// An assistant message's tool call, OpenAI style.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ToolCallSpec {
    /// Call id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `"function"`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The function called.
    pub function: FunctionSpec,
}

/// The function of a tool call.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct FunctionSpec {
    /// Function name.
    pub name: String,
    /// Arguments: a JSON string (OpenAI) or an object (HF).
    #[serde(default)]
    pub arguments: Json,
}

impl FunctionSpec {
    /// The arguments as a JSON value: a string is parsed as JSON, anything else is returned as is.
    pub fn arguments_value(&self) -> std::result::Result<Json, String> {
        match &self.arguments {
            Json::String(s) => serde_json::from_str(s).map_err(|e| format!("not valid JSON ({e}): {s:?}")),
            Json::Null => Ok(Json::Object(Map::new())),
            other => Ok(other.clone()),
        }
    }
}

impl ChatRequest {
    /// Parses and validates a request body. Errors name the JSON path at fault, e.g.
    /// `messages[2].role: unknown variant ...`.
    pub fn from_json(text: &str) -> Result<Self> {
        let body: Json =
            serde_json::from_str(text).map_err(|e| Error::request(format!("request body is not valid JSON: {e}")))?;
        Self::from_value(body)
    }

    /// Like [`ChatRequest::from_json`], from an already parsed body.
    pub fn from_value(body: Json) -> Result<Self> {
        let Json::Object(mut obj) = body else {
            return Err(Error::request("request body: expected a JSON object"));
        };
        let messages = match obj.remove("messages") {
            Some(Json::Array(items)) => {
                items.iter().enumerate().map(|(i, m)| parse_message(i, m)).collect::<Result<Vec<_>>>()?
            }
            Some(_) => return Err(Error::request("messages: expected an array")),
            None => return Err(Error::request("messages: missing field")),
        };
        if messages.is_empty() {
            return Err(Error::request("messages: must not be empty"));
        }
        // Check field by field, so that the error names the field.
        for (k, v) in &obj {
            let one = Map::from_iter([(k.clone(), v.clone())]);
            if let Err(e) = serde_json::from_value::<ChatRequest>(Json::Object(one)) {
                return Err(Error::request(format!("{k}: {e}")));
            }
        }
        let mut req: ChatRequest =
            serde_json::from_value(Json::Object(obj)).map_err(|e| Error::request(format!("request body: {e}")))?;
        if let Some(tools) = &req.tools {
            for (i, t) in tools.iter().enumerate() {
                if !t.is_object() {
                    return Err(Error::request(format!("tools[{i}]: expected an object")));
                }
                // OpenAI's `{"type": "function", "function": {"name", ...}}`, or a bare function definition with
                // its `name` (as transformers' templates also take): a tool the model cannot name is refused.
                let (what, f) = match t.get("type") {
                    None | Some(Json::Null) => (format!("tools[{i}]"), Some(t)),
                    Some(Json::String(ty)) if ty == "function" => (format!("tools[{i}].function"), t.get("function")),
                    Some(ty) => {
                        return Err(Error::request(format!("tools[{i}].type: expected \"function\", got {ty}")))
                    }
                };
                let named = f.and_then(|f| f.get("name")).and_then(Json::as_str).is_some_and(|n| !n.is_empty());
                if !named {
                    return Err(Error::request(format!("{what}: expected an object with a non-empty `name`")));
                }
            }
        }
        req.messages = messages;
        Ok(req)
    }

    /// The image references of all image parts, in order (`None` for a bare `{"type": "image"}`).
    pub fn images(&self) -> Vec<Option<&str>> {
        let mut out = Vec::new();
        for m in &self.messages {
            if let Some(MessageContent::Parts(parts)) = &m.content {
                for p in parts {
                    match p {
                        ContentPart::ImageUrl { image_url } => out.push(Some(image_url.url.as_str())),
                        ContentPart::Image { url } => out.push(url.as_deref()),
                        ContentPart::Text { .. } => {}
                    }
                }
            }
        }
        out
    }

    /// The generation limit: `max_completion_tokens`, else `max_tokens`.
    pub fn max_new_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }
}

fn field<T: serde::de::DeserializeOwned>(path: &str, v: &Json) -> Result<T> {
    serde_json::from_value(v.clone()).map_err(|e| Error::request(format!("{path}: {e}")))
}

fn parse_message(i: usize, v: &Json) -> Result<ChatMessage> {
    let Json::Object(obj) = v else {
        return Err(Error::request(format!("messages[{i}]: expected an object")));
    };
    let role: Role = match obj.get("role") {
        Some(r) => field(&format!("messages[{i}].role"), r)?,
        None => return Err(Error::request(format!("messages[{i}].role: missing field"))),
    };
    let content = match obj.get("content") {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) => Some(MessageContent::Text(s.clone())),
        Some(Json::Array(parts)) => Some(MessageContent::Parts(
            parts.iter().enumerate().map(|(j, p)| parse_part(i, j, p)).collect::<Result<Vec<_>>>()?,
        )),
        Some(_) => {
            return Err(Error::request(format!(
                "messages[{i}].content: expected a string, an array of content parts, or null"
            )))
        }
    };
    let opt_string = |key: &str| -> Result<Option<String>> {
        match obj.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => field(&format!("messages[{i}].{key}"), v),
        }
    };
    let name = opt_string("name")?;
    let tool_call_id = opt_string("tool_call_id")?;
    let tool_calls = match obj.get("tool_calls") {
        None | Some(Json::Null) => None,
        Some(Json::Array(calls)) => {
            let mut out = Vec::with_capacity(calls.len());
            for (j, c) in calls.iter().enumerate() {
                let path = format!("messages[{i}].tool_calls[{j}]");
                let call: ToolCallSpec = field(&path, c)?;
                call.function
                    .arguments_value()
                    .map_err(|e| Error::request(format!("{path}.function.arguments: {e}")))?;
                out.push(call);
            }
            Some(out)
        }
        Some(_) => return Err(Error::request(format!("messages[{i}].tool_calls: expected an array"))),
    };
    let known = ["role", "content", "name", "tool_calls", "tool_call_id"];
    let extra = obj.iter().filter(|(k, _)| !known.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    Ok(ChatMessage { role, content, name, tool_calls, tool_call_id, extra })
}

fn parse_part(i: usize, j: usize, v: &Json) -> Result<ContentPart> {
    let path = format!("messages[{i}].content[{j}]");
    let Json::Object(obj) = v else {
        return Err(Error::request(format!("{path}: expected an object")));
    };
    match obj.get("type").and_then(Json::as_str) {
        Some("text") => match obj.get("text") {
            Some(Json::String(t)) => Ok(ContentPart::Text { text: t.clone() }),
            _ => Err(Error::request(format!("{path}.text: expected a string"))),
        },
        Some("image_url") => match obj.get("image_url") {
            Some(Json::String(url)) => {
                Ok(ContentPart::ImageUrl { image_url: ImageUrl { url: url.clone(), detail: None } })
            }
            Some(u) => Ok(ContentPart::ImageUrl { image_url: field(&format!("{path}.image_url"), u)? }),
            None => Err(Error::request(format!("{path}.image_url: missing field"))),
        },
        Some("image") => {
            let url =
                ["url", "image", "path"].iter().find_map(|k| obj.get(*k).and_then(Json::as_str)).map(String::from);
            Ok(ContentPart::Image { url })
        }
        Some(other) => Err(Error::request(format!(
            "{path}.type: unknown content part type {other:?} (expected \"text\", \"image_url\" or \"image\")"
        ))),
        None => Err(Error::request(format!("{path}.type: missing field"))),
    }
}
