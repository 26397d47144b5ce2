//! The structured-output fields of a request (see [`crate::serve::guided`]).

use serde_json::Value as Json;

use super::{ApiError, ApiResult, Fields};
use crate::serve::guided::GuideSpec;

/// The structured output a request asks for, and the field that asks: OpenAI's `response_format`
/// (`json_object`, or `json_schema` with its `schema`), vLLM's `guided_json` (a schema, as an object or a JSON
/// string), `guided_regex`, `guided_choice`, `guided_grammar` (llguidance's Lark dialect, or GBNF), or vLLM's
/// newer `structured_outputs` object with one of `json`, `regex`, `choice`, `grammar`, `json_object` (its boolean
/// backend switches `disable_any_whitespace`, `disable_fallback`, `disable_additional_properties` are accepted and
/// have no effect). At most one. A schema may be the boolean `true` (any JSON value); `false` matches nothing and is
/// refused. JSON is compact unless vLLM's `guided_whitespace_pattern` (or `structured_outputs.whitespace_pattern`)
/// gives the regular expression whitespace between JSON tokens must match; it applies to JSON outputs only.
pub(super) fn guide_spec(f: &Fields<'_>) -> ApiResult<Option<(GuideSpec, &'static str)>> {
    let mut found: Vec<(GuideSpec, &'static str)> = Vec::new();
    let bad = |field: &str, what: &str| ApiError::bad_request(Some(field), format!("{field}: expected {what}"));
    let schema = |v: &Json, field: &str| -> ApiResult<GuideSpec> {
        let what = "a JSON schema (an object or `true`, or a string holding one)";
        let parsed = match v {
            Json::String(s) => serde_json::from_str::<Json>(s).map_err(|_| bad(field, what))?,
            other => other.clone(),
        };
        match parsed {
            Json::Object(_) => Ok(GuideSpec::JsonSchema(parsed)),
            // JSON Schema's `true` is the empty schema: any JSON value.
            Json::Bool(true) => Ok(GuideSpec::JsonSchema(Json::Object(Default::default()))),
            Json::Bool(false) => Err(ApiError::bad_request(
                Some(field),
                format!("{field}: the schema `false` matches nothing, so no output could satisfy it"),
            )),
            _ => Err(bad(field, what)),
        }
    };
    let choice = |v: &Json, field: &str| -> ApiResult<GuideSpec> {
        let list: Option<Vec<String>> =
            v.as_array().and_then(|a| a.iter().map(|s| s.as_str().map(String::from)).collect());
        match list {
            Some(l) if !l.is_empty() => Ok(GuideSpec::Choice(l)),
            _ => Err(bad(field, "a non-empty array of strings")),
        }
    };
    let text = |v: &Json, field: &str, make: fn(String) -> GuideSpec| -> ApiResult<GuideSpec> {
        v.as_str()
            .filter(|s| !s.is_empty())
            .map(|s| make(s.to_string()))
            .ok_or_else(|| bad(field, "a non-empty string"))
    };
    if let Some(rf) = f.get("response_format") {
        match rf.get("type").and_then(Json::as_str) {
            Some("text") => {}
            Some("json_object") => found.push((GuideSpec::JsonObject, "response_format")),
            Some("json_schema") => {
                let s = rf.get("json_schema").and_then(|j| j.get("schema")).ok_or_else(|| {
                    ApiError::bad_request(Some("response_format"), "response_format: json_schema.schema is missing")
                })?;
                found.push((schema(s, "response_format")?, "response_format"));
            }
            _ => {
                return Err(ApiError::bad_request(
                    Some("response_format"),
                    "response_format: type must be \"text\", \"json_object\" or \"json_schema\"",
                ))
            }
        }
    }
    if let Some(v) = f.get("guided_json") {
        found.push((schema(v, "guided_json")?, "guided_json"));
    }
    if let Some(v) = f.get("guided_regex") {
        found.push((text(v, "guided_regex", GuideSpec::Regex)?, "guided_regex"));
    }
    if let Some(v) = f.get("guided_choice") {
        found.push((choice(v, "guided_choice")?, "guided_choice"));
    }
    if let Some(v) = f.get("guided_grammar") {
        found.push((text(v, "guided_grammar", GuideSpec::grammar_text)?, "guided_grammar"));
    }
    let mut whitespace: Option<(String, &'static str)> = None;
    let pattern = |v: &Json, field: &str| -> ApiResult<String> {
        v.as_str().filter(|s| !s.is_empty()).map(String::from).ok_or_else(|| bad(field, "a non-empty string"))
    };
    if let Some(v) = f.get("guided_whitespace_pattern").filter(|v| !v.is_null()) {
        whitespace = Some((pattern(v, "guided_whitespace_pattern")?, "guided_whitespace_pattern"));
    }
    if let Some(so) = f.get("structured_outputs") {
        let o = so.as_object().ok_or_else(|| bad("structured_outputs", "an object"))?;
        for (k, v) in o.iter().filter(|(_, v)| !v.is_null()) {
            let spec = match k.as_str() {
                "whitespace_pattern" => {
                    whitespace = Some((pattern(v, "structured_outputs")?, "structured_outputs"));
                    continue;
                }
                "json" => schema(v, "structured_outputs")?,
                "regex" => text(v, "structured_outputs", GuideSpec::Regex)?,
                "choice" => choice(v, "structured_outputs")?,
                "grammar" => text(v, "structured_outputs", GuideSpec::grammar_text)?,
                "json_object" if v.as_bool() == Some(true) => GuideSpec::JsonObject,
                "json_object" => continue,
                // vLLM's backend switches: JSON here is always compact and never falls back to another engine.
                "disable_any_whitespace" | "disable_fallback" | "disable_additional_properties" if v.is_boolean() => {
                    continue
                }
                other => {
                    return Err(ApiError::bad_request(
                        Some("structured_outputs"),
                        format!(
                            "structured_outputs: `{other}` is not supported (json, regex, choice, grammar, \
                             json_object, whitespace_pattern)"
                        ),
                    ))
                }
            };
            found.push((spec, "structured_outputs"));
        }
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(_, f)| *f).collect();
        return Err(ApiError::bad_request(
            Some(found[1].1),
            format!("{}: only one structured output per request, got {}", found[1].1, names.join(" and ")),
        ));
    }
    let Some((spec, field)) = found.pop() else {
        return match whitespace {
            Some((_, w)) => Err(ApiError::bad_request(
                Some(w),
                format!("{w}: a whitespace pattern applies to JSON outputs, and the request asks for none"),
            )),
            None => Ok(None),
        };
    };
    let spec = match (spec, whitespace) {
        (spec, None) => spec,
        (GuideSpec::JsonSchema(mut schema), Some((pattern, _))) => {
            if let Some(obj) = schema.as_object_mut() {
                let opts = obj.entry("x-guidance").or_insert_with(|| Json::Object(Default::default()));
                if let Some(o) = opts.as_object_mut() {
                    o.insert("whitespace_pattern".into(), Json::String(pattern));
                }
            }
            GuideSpec::JsonSchema(schema)
        }
        (GuideSpec::JsonObject, Some((pattern, _))) => {
            GuideSpec::JsonSchema(serde_json::json!({"type": "object", "x-guidance": {"whitespace_pattern": pattern}}))
        }
        (_, Some((_, w))) => {
            return Err(ApiError::bad_request(
                Some(w),
                format!("{w}: a whitespace pattern applies to JSON outputs, not to {field}'s kind of output"),
            ))
        }
    };
    Ok(Some((spec, field)))
}
