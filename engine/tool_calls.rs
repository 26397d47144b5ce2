//! Tool calls in a Llama 3.x answer, parsed into structured calls (formats from Meta's prompt-format docs):
//!
//! * JSON: `{"name": "f", "parameters": {...}}` (or `"arguments"`), several separated by `;` or newlines;
//! * pythonic list (3.2 text models): `[f(a=1, b='x'), g()]`;
//! * built-in tools after `<|python_tag|>`: `brave_search.call(query="...")`, `wolfram_alpha.call(...)`;
//! * `<|python_tag|>` followed by anything else: code for `code_interpreter`, as `{"code": ...}`;
//! * `<function=f>{...}</function>` (the custom format of the 3.1 docs).
//!
//! A trailing `<|eom_id|>`/`<|eot_id|>` is ignored. Anything else is plain text.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Map, Value as Json};

const PYTHON_TAG: &str = "<|python_tag|>";

/// One tool call: the function name and its arguments (a JSON object).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// Function (tool) name, e.g. `get_weather`, `brave_search`, `code_interpreter`.
    pub name: String,
    /// Arguments, a JSON object.
    pub arguments: Json,
}

/// What a model's answer turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum ParsedOutput {
    /// Plain text (returned unchanged).
    Text(String),
    /// One or more tool calls.
    ToolCalls(Vec<ToolCall>),
}

/// Parses a model answer (the decoded text, special tokens included or not) into tool calls or text.
pub fn parse_tool_calls(text: &str) -> ParsedOutput {
    let mut s = text.trim();
    for end in ["<|eom_id|>", "<|eot_id|>"] {
        if let Some(rest) = s.strip_suffix(end) {
            s = rest.trim_end();
        }
    }
    let (tagged, body) = match s.strip_prefix(PYTHON_TAG) {
        Some(rest) => (true, rest.trim()),
        None => (false, s),
    };
    let parsed = pythonic_list(body)
        .or_else(|| json_calls(body))
        .or_else(|| function_tags(body))
        .or_else(|| builtin_call(body).map(|c| vec![c]));
    match parsed {
        Some(calls) if !calls.is_empty() => ParsedOutput::ToolCalls(calls),
        _ if tagged && !body.is_empty() => ParsedOutput::ToolCalls(vec![ToolCall {
            name: "code_interpreter".into(),
            arguments: json!({"code": body}),
        }]),
        _ => ParsedOutput::Text(text.to_string()),
    }
}

/// OpenAI `tool_calls` for a response message: `[{"id", "type": "function", "function": {"name", "arguments"}}]`,
/// with `arguments` as a JSON string and fresh `call_...` ids.
pub fn to_openai_tool_calls(calls: &[ToolCall]) -> Json {
    Json::Array(calls.iter().map(|c| c.to_openai(&new_call_id())).collect())
}

impl ToolCall {
    /// This call as one OpenAI `tool_calls` entry with the given id.
    pub fn to_openai(&self, id: &str) -> Json {
        json!({
            "id": id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments.to_string()},
        })
    }
}

/// A fresh tool-call id, `call_` and 24 hex digits (unique within the process, unpredictable across runs).
pub fn new_call_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    };
    let seed = mix(nanos ^ u64::from(std::process::id()).rotate_left(32));
    // `mix` is a bijection, so the first part is unique per counter value; the tail is mixed from it (two parts
    // mixed from `seed + n` and `seed ^ n` were equal whenever `seed & n == 0`).
    let head = mix(seed.wrapping_add(n));
    format!("call_{head:016x}{:08x}", (mix(head ^ 0x9e37_79b9_7f4a_7c15) >> 32) as u32)
}

// ---------------------------------------------------------------------------------------------------------------
// JSON forms

/// `{"name": ..., "parameters"|"arguments": ...}` objects separated by `;` and/or whitespace.
fn json_calls(s: &str) -> Option<Vec<ToolCall>> {
    if !s.starts_with('{') {
        return None;
    }
    let mut calls = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if rest.is_empty() {
            break;
        }
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Json>();
        let value = stream.next()?.ok()?;
        rest = &rest[stream.byte_offset()..];
        calls.push(json_call(&value)?);
    }
    Some(calls)
}

fn json_call(v: &Json) -> Option<ToolCall> {
    let obj = v.as_object()?;
    let name = obj.get("name")?.as_str()?.to_string();
    let args = obj.get("parameters").or_else(|| obj.get("arguments"))?;
    Some(ToolCall { name, arguments: arguments_object(args)? })
}

fn arguments_object(args: &Json) -> Option<Json> {
    match args {
        Json::Object(_) => Some(args.clone()),
        Json::String(s) => serde_json::from_str::<Json>(s).ok().filter(Json::is_object),
        Json::Null => Some(Json::Object(Map::new())),
        _ => None,
    }
}

/// `<function=name>{...}</function>` calls, possibly several.
fn function_tags(s: &str) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if rest.is_empty() {
            break;
        }
        let after = rest.strip_prefix("<function=")?;
        let (name, after) = after.split_once('>')?;
        let (body, after) = after.split_once("</function>")?;
        let name = name.trim();
        if !is_name(name) {
            return None;
        }
        let arguments = serde_json::from_str::<Json>(body.trim()).ok().filter(Json::is_object)?;
        calls.push(ToolCall { name: name.to_string(), arguments });
        rest = after;
    }
    Some(calls)
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '.' || c == '-')
}

// ---------------------------------------------------------------------------------------------------------------
// Python forms

/// `[f(a=1), g(b='x')]`.
fn pythonic_list(s: &str) -> Option<Vec<ToolCall>> {
    let mut p = Py::new(s);
    p.expect('[')?;
    let mut calls = Vec::new();
    p.ws();
    if p.peek() == Some(']') {
        return None; // `[]` is not a call
    }
    loop {
        p.ws();
        let (name, args) = p.call()?;
        calls.push(ToolCall { name, arguments: args });
        p.ws();
        match p.next()? {
            ',' => continue,
            ']' => break,
            _ => return None,
        }
    }
    p.ws();
    p.at_end().then_some(calls)
}

/// `tool.call(query="...")`, a built-in tool call; the name is the part before `.call`.
fn builtin_call(s: &str) -> Option<ToolCall> {
    let mut p = Py::new(s);
    let (name, arguments) = p.call()?;
    p.ws();
    if !p.at_end() {
        return None;
    }
    let name = name.strip_suffix(".call")?.to_string();
    (!name.contains('.')).then_some(ToolCall { name, arguments })
}

/// How deep lists, tuples and dicts may nest in a Python-form call (serde_json's limit for the JSON forms): a
/// model's output is read on a server thread, and deeper text would overflow its stack.
const MAX_DEPTH: usize = 128;

/// A tiny parser for Python call syntax with literal keyword arguments.
struct Py<'a> {
    s: &'a str,
    pos: usize,
    /// Containers open at `pos`.
    depth: usize,
}

impl<'a> Py<'a> {
    fn new(s: &'a str) -> Self {
        Py { s, pos: 0, depth: 0 }
    }
    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }
    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }
    fn at_end(&self) -> bool {
        self.pos == self.s.len()
    }
    fn ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += self.peek().map_or(0, char::len_utf8);
        }
    }
    fn expect(&mut self, c: char) -> Option<()> {
        (self.next()? == c).then_some(())
    }
    fn ident(&mut self) -> Option<&'a str> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            self.next();
        }
        let id = &self.s[start..self.pos];
        (!id.is_empty() && !id.starts_with(|c: char| c.is_ascii_digit())).then_some(id)
    }
    /// `name(.name)*(kw=value, ...)`
    fn call(&mut self) -> Option<(String, Json)> {
        let mut name = self.ident()?.to_string();
        while self.peek() == Some('.') {
            self.next();
            name.push('.');
            name.push_str(self.ident()?);
        }
        self.ws();
        self.expect('(')?;
        let mut args = Map::new();
        loop {
            self.ws();
            if self.peek() == Some(')') {
                self.next();
                break;
            }
            let key = self.ident()?.to_string();
            self.ws();
            self.expect('=')?;
            self.ws();
            let value = self.value()?;
            args.insert(key, value);
            self.ws();
            match self.next()? {
                ',' => continue,
                ')' => break,
                _ => return None,
            }
        }
        Some((name, Json::Object(args)))
    }
    /// A Python (or JSON) literal; `None` past [`MAX_DEPTH`] nested containers.
    fn value(&mut self) -> Option<Json> {
        match self.peek()? {
            '[' | '(' | '{' if self.depth < MAX_DEPTH => {
                self.depth += 1;
                let v = self.container();
                self.depth -= 1;
                v
            }
            '[' | '(' | '{' => None,
            '\'' | '"' => self.string().map(Json::String),
            c if c == '-' || c == '+' || c == '.' || c.is_ascii_digit() => self.number(),
            _ => match self.ident()? {
                "True" | "true" => Some(Json::Bool(true)),
                "False" | "false" => Some(Json::Bool(false)),
                "None" | "null" => Some(Json::Null),
                _ => None,
            },
        }
    }
    /// A list, tuple or dict.
    fn container(&mut self) -> Option<Json> {
        match self.peek()? {
            '[' | '(' => {
                let close = if self.next()? == '[' { ']' } else { ')' };
                let mut items = Vec::new();
                loop {
                    self.ws();
                    if self.peek() == Some(close) {
                        self.next();
                        break;
                    }
                    items.push(self.value()?);
                    self.ws();
                    match self.next()? {
                        ',' => continue,
                        c if c == close => break,
                        _ => return None,
                    }
                }
                Some(Json::Array(items))
            }
            '{' => {
                self.next();
                let mut map = Map::new();
                loop {
                    self.ws();
                    if self.peek() == Some('}') {
                        self.next();
                        break;
                    }
                    let key = match self.value()? {
                        Json::String(s) => s,
                        other => other.to_string(),
                    };
                    self.ws();
                    self.expect(':')?;
                    self.ws();
                    map.insert(key, self.value()?);
                    self.ws();
                    match self.next()? {
                        ',' => continue,
                        '}' => break,
                        _ => return None,
                    }
                }
                Some(Json::Object(map))
            }
            _ => None,
        }
    }
    fn number(&mut self) -> Option<Json> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | '.' | '_')) {
            let c = self.next()?;
            // A sign is only part of the number at the start or right after an exponent marker.
            if matches!(c, '-' | '+')
                && self.pos - 1 != start
                && !matches!(self.s.as_bytes()[self.pos - 2], b'e' | b'E')
            {
                return None;
            }
        }
        let text: String = self.s[start..self.pos].chars().filter(|c| *c != '_').collect();
        let text = text.strip_prefix('+').unwrap_or(&text);
        if let Ok(i) = text.parse::<i64>() {
            return Some(Json::from(i));
        }
        let f: f64 = text.parse().ok()?;
        serde_json::Number::from_f64(f).map(Json::Number)
    }
    fn string(&mut self) -> Option<String> {
        let quote = self.next()?;
        let mut out = String::new();
        loop {
            match self.next()? {
                c if c == quote => return Some(out),
                '\\' => match self.next()? {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    '0' => out.push('\0'),
                    'u' => {
                        let hex = self.s.get(self.pos..self.pos + 4)?;
                        out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
                        self.pos += 4;
                    }
                    c @ ('\\' | '\'' | '"') => out.push(c),
                    c => {
                        out.push('\\');
                        out.push(c);
                    }
                },
                c => out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_literals() {
        let mut p = Py::new("[1, -2.5e3, 'a\\'b', \"\\u00e9\", (1, 2), {'k': None}, +3, 1_000]");
        assert_eq!(p.value(), Some(json!([1, -2500.0, "a'b", "é", [1, 2], {"k": null}, 3, 1000])));
        assert_eq!(Py::new("1-2").value(), None);
        assert_eq!(Py::new("foo").value(), None);
        // Nesting is bounded: deep text is no call (and no stack overflow), shallower text still parses.
        let deep = |n: usize| format!("f(a={}1{})", "[".repeat(n), "]".repeat(n));
        assert!(Py::new(&deep(MAX_DEPTH)).call().is_some());
        assert!(Py::new(&deep(MAX_DEPTH + 1)).call().is_none());
        assert!(Py::new(&deep(1_000_000)).call().is_none());
        assert!(matches!(parse_tool_calls(&format!("[{}]", deep(1_000_000))), ParsedOutput::Text(_)));
    }

    #[test]
    fn call_ids_are_unique() {
        let a = new_call_id();
        let b = new_call_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), "call_".len() + 24);
    }
}
