//! Chat templates: an OpenAI chat-completions request rendered to prompt text the way transformers'
//! `apply_chat_template` renders it (Jinja with `trim_blocks`/`lstrip_blocks`, HF's `tojson`,
//! `raise_exception` and `strftime_now`, python string methods).
//!
//! Request parsing ([`ChatRequest::from_json`]) lives in this module too; it names the JSON path at fault.
//!
//! Deliberate differences from a bare `apply_chat_template` call, both what an OpenAI server needs:
//! assistant `tool_calls[].function.arguments` given as a JSON string is parsed into an object, and a message
//! whose `content` is an array of parts goes to a template that does not iterate over content (the text
//! models' template) as its text parts joined with `"\n"` (HF would render the Python repr of the list).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectExt, Rest, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde_json::{Map, Value as Json};

use crate::{Error, Result};

mod request;
pub use request::{
    ChatMessage, ChatRequest, ContentPart, FunctionSpec, ImageUrl, MessageContent, Role, StopSpec, ToolCallSpec,
};

/// A compiled chat template plus the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    templates: Vec<NamedTemplate>,
    special_tokens: Vec<(String, String)>,
    /// Where the templates came from (a file name and field, no directory: render errors reach API clients).
    origin: String,
}

struct NamedTemplate {
    name: String,
    /// Whether the template iterates over `message.content` (takes lists of content parts).
    takes_parts: bool,
}

/// Per-render switches.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// Append the assistant header so the model answers next (default true).
    pub add_generation_prompt: bool,
    /// `date_string` passed to the template; `None` leaves it undefined (Llama's template then uses today's date).
    pub date_string: Option<String>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions { add_generation_prompt: true, date_string: None }
    }
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.templates.iter().map(|t| t.name.as_str()).collect();
        f.debug_struct("ChatTemplate").field("templates", &names).field("special_tokens", &self.special_tokens).finish()
    }
}

/// Special-token keys of `tokenizer_config.json` that transformers passes to the template.
const SPECIAL_TOKEN_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

impl ChatTemplate {
    /// Loads the template of a model directory, with transformers' priority: `chat_template.jinja`, then
    /// `tokenizer_config.json` `"chat_template"` (a string, or a list of `{name, template}`), then
    /// `chat_template.json` `{"chat_template": ...}`. Special tokens come from `tokenizer_config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<Map<String, Json>> = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            match serde_json::from_str(&text) {
                Ok(Json::Object(m)) => Some(m),
                Ok(_) => return Err(Error::config(&config_path, "", "expected a JSON object")),
                Err(e) => return Err(Error::config(&config_path, "", format!("invalid JSON: {e}"))),
            }
        } else {
            None
        };
        let mut special_tokens = Vec::new();
        if let Some(cfg) = &config {
            for key in SPECIAL_TOKEN_KEYS {
                let token = match cfg.get(key) {
                    None | Some(Json::Null) => continue,
                    Some(Json::String(s)) => s.clone(),
                    Some(Json::Object(o)) => match o.get("content") {
                        Some(Json::String(s)) => s.clone(),
                        _ => {
                            return Err(Error::config(&config_path, key, "expected a string or {\"content\": string}"))
                        }
                    },
                    Some(_) => {
                        return Err(Error::config(&config_path, key, "expected a string or {\"content\": string}"))
                    }
                };
                special_tokens.push((key.to_string(), token));
            }
        }

        let jinja_path = dir.join("chat_template.jinja");
        let json_path = dir.join("chat_template.json");
        let (sources, origin): (Vec<(String, String)>, &str) = if jinja_path.exists() {
            let text = std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?;
            (vec![("default".to_string(), text)], "chat_template.jinja")
        } else if let Some(t) = config.as_ref().and_then(|c| c.get("chat_template")).filter(|t| !t.is_null()) {
            let sources = template_sources(t).map_err(|msg| Error::config(&config_path, "chat_template", msg))?;
            (sources, "tokenizer_config.json `chat_template`")
        } else if json_path.exists() {
            let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
            let value: Json =
                serde_json::from_str(&text).map_err(|e| Error::config(&json_path, "", format!("invalid JSON: {e}")))?;
            let t = value
                .get("chat_template")
                .ok_or_else(|| Error::config(&json_path, "chat_template", "missing field"))?;
            (
                template_sources(t).map_err(|msg| Error::config(&json_path, "chat_template", msg))?,
                "chat_template.json `chat_template`",
            )
        } else {
            return Err(Error::Template(format!(
                "no chat template in {}: looked for chat_template.jinja, \"chat_template\" in tokenizer_config.json, \
                 and chat_template.json",
                dir.display()
            )));
        };
        Self::build(sources, special_tokens, origin.into())
    }

    /// Compiles one template source with the given BOS and EOS tokens.
    pub fn from_source(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let special = vec![("bos_token".into(), bos_token.into()), ("eos_token".into(), eos_token.into())];
        Self::build(vec![("default".into(), source.into())], special, "the given chat template".into())
    }

    fn build(sources: Vec<(String, String)>, special_tokens: Vec<(String, String)>, origin: String) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(py_formatter);
        env.add_filter("tojson", tojson_filter);
        env.add_filter("trim", trim_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        let mut templates = Vec::new();
        for (name, source) in sources {
            let takes_parts = iterates_content(&source);
            env.add_template_owned(name.clone(), source)
                .map_err(|e| Error::Template(format!("{origin}: template {name:?} does not compile: {e}")))?;
            templates.push(NamedTemplate { name, takes_parts });
        }
        Ok(ChatTemplate { env, templates, special_tokens, origin })
    }

    /// Renders `req` to prompt text (BOS included when the template emits it, as Llama's does).
    pub fn render(&self, req: &ChatRequest, opts: &RenderOptions) -> Result<String> {
        if req.messages.is_empty() {
            return Err(Error::request("messages: must not be empty"));
        }
        let tpl = self.select(req.tools.is_some())?;
        let messages = req
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| message_value(i, m, tpl.takes_parts))
            .collect::<Result<Vec<_>>>()?;
        let mut ctx: Vec<(Value, Value)> = Vec::new();
        let mut set = |k: &str, v: Value| match ctx.iter_mut().find(|(key, _)| key.as_str() == Some(k)) {
            Some(slot) => slot.1 = v,
            None => ctx.push((Value::from(k), v)),
        };
        for (k, v) in &self.special_tokens {
            set(k, Value::from(v.as_str()));
        }
        if let Some(kwargs) = &req.chat_template_kwargs {
            for (k, v) in kwargs {
                if matches!(k.as_str(), "messages" | "tools" | "documents" | "add_generation_prompt") {
                    return Err(Error::request(format!("chat_template_kwargs.{k}: reserved name")));
                }
                set(k, json_to_value(v));
            }
        }
        if let Some(date) = &opts.date_string {
            set("date_string", Value::from(date.as_str()));
        }
        set("messages", Value::from(messages));
        set(
            "tools",
            req.tools
                .as_ref()
                .map_or(Value::from(()), |t| Value::from(t.iter().map(json_to_value).collect::<Vec<_>>())),
        );
        set("documents", Value::from(()));
        set("add_generation_prompt", Value::from(opts.add_generation_prompt));
        let in_origin = |msg: String| Error::Template(format!("{msg} (chat template from {})", self.origin));
        let template = self.env.get_template(&tpl.name).map_err(|e| in_origin(e.to_string()))?;
        template.render(Value::from_object(OrderedMap::new(ctx))).map_err(|e| in_origin(render_error(&e)))
    }

    fn select(&self, has_tools: bool) -> Result<&NamedTemplate> {
        let find = |n: &str| self.templates.iter().find(|t| t.name == n);
        let chosen = if has_tools { find("tool_use").or_else(|| find("default")) } else { find("default") };
        chosen.ok_or_else(|| {
            let names: Vec<&str> = self.templates.iter().map(|t| t.name.as_str()).collect();
            Error::Template(format!("{}: chat templates {names:?}, none named \"default\"", self.origin))
        })
    }
}

/// Template sources from a `chat_template` JSON value: a string, or a list of `{name, template}`.
fn template_sources(t: &Json) -> std::result::Result<Vec<(String, String)>, String> {
    match t {
        Json::String(s) => Ok(vec![("default".to_string(), s.clone())]),
        Json::Array(items) if items.is_empty() => Err("an empty list of templates".into()),
        Json::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match (item.get("name"), item.get("template")) {
                (Some(Json::String(n)), Some(Json::String(s))) => Ok((n.clone(), s.clone())),
                _ => Err(format!("[{i}]: expected {{\"name\": string, \"template\": string}}")),
            })
            .collect(),
        _ => Err("expected a string or a list of {name, template}".into()),
    }
}

/// Whether a template loops over a message's content (so it takes lists of content parts).
fn iterates_content(source: &str) -> bool {
    let s: String = source.split_whitespace().collect::<Vec<_>>().join(" ");
    ["in message['content']", "in message[\"content\"]", "in message.content", "in msg['content']", "in msg.content"]
        .iter()
        .any(|p| s.contains(p))
}

fn render_error(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(msg, ": {s}");
        source = s.source();
    }
    msg
}

// ---------------------------------------------------------------------------------------------------------------
// Template values

/// A JSON object as a template value that keeps its key order (Python dicts do; minijinja's maps sort). Lookups
/// go through a hash index: `tojson` looks up every key, and a request's tool schema may have a million.
#[derive(Debug)]
struct OrderedMap {
    entries: Vec<(Value, Value)>,
    /// Each key's first entry.
    index: HashMap<Value, usize>,
}

impl OrderedMap {
    fn new(entries: Vec<(Value, Value)>) -> Self {
        let mut index = HashMap::with_capacity(entries.len());
        for (i, (k, _)) in entries.iter().enumerate() {
            index.entry(k.clone()).or_insert(i);
        }
        OrderedMap { entries, index }
    }
}

impl Object for OrderedMap {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.index.get(key).map(|&i| self.entries[i].1.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_enumerator(|this| Box::new(this.entries.iter().map(|(k, _)| k.clone())))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.entries.len())
    }
}

fn ordered_map(entries: Vec<(&str, Value)>) -> Value {
    Value::from_object(OrderedMap::new(entries.into_iter().map(|(k, v)| (Value::from(k), v)).collect()))
}

/// A JSON value as a template value (objects keep their key order).
fn json_to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(items) => Value::from(items.iter().map(json_to_value).collect::<Vec<_>>()),
        Json::Object(m) => Value::from_object(OrderedMap::new(
            m.iter().map(|(k, v)| (Value::from(k.as_str()), json_to_value(v))).collect(),
        )),
    }
}

/// The dict transformers would see for message `index` (keys with null values dropped, as HF does).
fn message_value(index: usize, m: &ChatMessage, takes_parts: bool) -> Result<Value> {
    let mut entries: Vec<(&str, Value)> = vec![("role", Value::from(m.role.as_str()))];
    match &m.content {
        None => {}
        Some(MessageContent::Text(s)) => entries.push(("content", Value::from(s.as_str()))),
        Some(MessageContent::Parts(parts)) if takes_parts => {
            let parts = parts
                .iter()
                .map(|p| match p {
                    ContentPart::Text { text } => {
                        ordered_map(vec![("type", "text".into()), ("text", text.as_str().into())])
                    }
                    ContentPart::ImageUrl { .. } | ContentPart::Image { .. } => {
                        ordered_map(vec![("type", "image".into())])
                    }
                })
                .collect::<Vec<_>>();
            entries.push(("content", Value::from(parts)));
        }
        Some(MessageContent::Parts(parts)) => {
            let mut texts = Vec::new();
            for (j, p) in parts.iter().enumerate() {
                match p {
                    ContentPart::Text { text } => texts.push(text.as_str()),
                    _ => {
                        return Err(Error::request(format!(
                            "messages[{index}].content[{j}]: this model's chat template takes text only, not images"
                        )))
                    }
                }
            }
            entries.push(("content", Value::from(texts.join("\n"))));
        }
    }
    if let Some(name) = &m.name {
        entries.push(("name", Value::from(name.as_str())));
    }
    if let Some(calls) = &m.tool_calls {
        let mut values = Vec::with_capacity(calls.len());
        for (j, call) in calls.iter().enumerate() {
            let args = call
                .function
                .arguments_value()
                .map_err(|e| Error::request(format!("messages[{index}].tool_calls[{j}].function.arguments: {e}")))?;
            let mut e: Vec<(&str, Value)> = Vec::new();
            if let Some(id) = &call.id {
                e.push(("id", id.as_str().into()));
            }
            if let Some(t) = &call.kind {
                e.push(("type", t.as_str().into()));
            }
            let function =
                ordered_map(vec![("name", call.function.name.as_str().into()), ("arguments", json_to_value(&args))]);
            e.push(("function", function));
            values.push(ordered_map(e));
        }
        entries.push(("tool_calls", Value::from(values)));
    }
    if let Some(id) = &m.tool_call_id {
        entries.push(("tool_call_id", Value::from(id.as_str())));
    }
    let mut all: Vec<(Value, Value)> = entries.into_iter().map(|(k, v)| (Value::from(k), v)).collect();
    for (k, v) in &m.extra {
        if !v.is_null() {
            all.push((Value::from(k.as_str()), json_to_value(v)));
        }
    }
    Ok(Value::from_object(OrderedMap::new(all)))
}

// ---------------------------------------------------------------------------------------------------------------
// Template globals and filters with Python / transformers semantics

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format {format:?}")));
    }
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format_with_items(items.iter())).map_err(|_| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format {format:?}"))
    })?;
    Ok(out)
}

/// Prints `none` and booleans as Python's `str()` does (`None`, `True`, `False`).
fn py_formatter(
    out: &mut minijinja::Output<'_>,
    state: &mut minijinja::State<'_, '_>,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out.write_str("None").map_err(minijinja::Error::from),
        ValueKind::Bool => {
            out.write_str(if value.is_true() { "True" } else { "False" }).map_err(minijinja::Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Python's `str.isspace`: Unicode whitespace plus the ASCII separators U+001C..U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Jinja's `trim` filter: `str(value).strip(chars)` with Python's idea of whitespace.
fn trim_filter(value: &Value, chars: Option<String>) -> String {
    let s = match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => (if value.is_true() { "True" } else { "False" }).into(),
        _ => value.to_string(),
    };
    match chars {
        Some(chars) => s.trim_matches(|c| chars.contains(c)).to_string(),
        None => s.trim_matches(py_isspace).to_string(),
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson_filter(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let bad = |msg: String| minijinja::Error::new(ErrorKind::InvalidOperation, msg);
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > NAMES.len() {
        return Err(bad(format!("tojson takes at most {} arguments", NAMES.len())));
    }
    let mut opts: [Option<Value>; 4] = Default::default();
    for (slot, v) in opts.iter_mut().zip(args.iter()) {
        *slot = Some(v.clone());
    }
    for (slot, name) in opts.iter_mut().zip(NAMES) {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            if slot.is_some() {
                return Err(bad(format!("tojson got multiple values for argument {name:?}")));
            }
            *slot = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = opts;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
        Some(v) => match i64::try_from(v.clone()) {
            Ok(n) => Some(" ".repeat(n.max(0) as usize)),
            Err(_) => return Err(bad(format!("tojson: indent must be an int or a string, not {}", v.kind()))),
        },
    };
    let (item_sep, key_sep) = match separators.filter(|v| !v.is_none()) {
        None => ((if indent.is_some() { "," } else { ", " }).to_string(), ": ".to_string()),
        Some(v) => {
            let parts: Vec<Value> = v.try_iter().map(|it| it.collect()).unwrap_or_default();
            match (parts.first().and_then(|p| p.as_str()), parts.get(1).and_then(|p| p.as_str()), parts.len()) {
                (Some(a), Some(b), 2) => (a.to_string(), b.to_string()),
                _ => return Err(bad("tojson: separators must be a pair of strings".into())),
            }
        }
    };
    let dumper = PyJson {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    dumper.dump(value, 0, &mut out)?;
    Ok(out)
}

/// Python's `json.dumps` over template values.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn dump(&self, v: &Value, level: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
        let not_serializable = |what: &str| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("Object of type {what} is not JSON serializable"),
            )
        };
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&py_number(v)),
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.dump(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in v.try_iter()? {
                    let item = v.get_item(&key)?;
                    let key = match key.kind() {
                        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                        ValueKind::Number => py_number(&key),
                        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
                        ValueKind::None => "null".to_string(),
                        k => {
                            return Err(minijinja::Error::new(
                                ErrorKind::InvalidOperation,
                                format!("keys must be str, int, float, bool or None, not {k}"),
                            ))
                        }
                    };
                    entries.push((key, item));
                }
                if entries.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.string(key, out);
                    out.push_str(&self.key_sep);
                    self.dump(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            ValueKind::Undefined => return Err(not_serializable("Undefined")),
            ValueKind::Bytes => return Err(not_serializable("bytes")),
            other => return Err(not_serializable(&other.to_string())),
        }
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && (c as u32) > 0x7e => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A number as Python prints it: integers in full, floats as `repr(float)`.
fn py_number(v: &Value) -> String {
    if v.is_integer() {
        if let Ok(i) = i128::try_from(v.clone()) {
            return i.to_string();
        }
    }
    py_float_repr(f64::try_from(v.clone()).unwrap_or(f64::NAN))
}

/// `repr(x)` for a Python float (and `json.dumps`' spelling of NaN and the infinities).
pub(crate) fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // Shortest round-trip digits from Rust, re-laid-out with Python's rules.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let n = digits.len() as i32;
    let decpt = exp + 1;
    let sign = if x.is_sign_negative() { "-" } else { "" };
    let body = if -4 < decpt && decpt <= 16 {
        if decpt <= 0 {
            format!("0.{}{}", "0".repeat((-decpt) as usize), digits)
        } else if decpt >= n {
            format!("{}{}.0", digits, "0".repeat((decpt - n) as usize))
        } else {
            format!("{}.{}", &digits[..decpt as usize], &digits[decpt as usize..])
        }
    } else {
        let frac = if n > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits.clone() };
        let e = decpt - 1;
        format!("{frac}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    };
    format!("{sign}{body}")
}
