//! Chat-template rendering, byte for byte against transformers' `apply_chat_template`
//! (tests/data/chat_rendered.json, made by scripts/make_chat_vectors.py), the computed vectors of
//! $LLAMA32_TEST_DATA/test_vectors, request parsing errors, and tool-call parsing on Meta's doc examples.

use std::path::PathBuf;

use llama32::chat_template::{ChatRequest, ChatTemplate, RenderOptions};
use llama32::tool_calls::{parse_tool_calls, to_openai_tool_calls, ParsedOutput, ToolCall};
use serde_json::{json, Value as Json};

mod common;
use common::data_dir;

const BOS: &str = "<|begin_of_text|>";
const EOT: &str = "<|eot_id|>";

fn text_template(dir: &std::path::Path) -> ChatTemplate {
    ChatTemplate::from_model_dir(&dir.join("Llama-3.2-3B-Instruct")).expect("3B-Instruct template")
}

fn vision_template(dir: &std::path::Path, model: &str) -> ChatTemplate {
    let path = dir.join(model).join("chat_template.reconstructed.json");
    let doc: Json = serde_json::from_str(&std::fs::read_to_string(&path).expect("vision template file")).unwrap();
    ChatTemplate::from_source(doc["chat_template"].as_str().unwrap(), BOS, EOT).expect("vision template compiles")
}

fn today() -> String {
    chrono::Local::now().format("%d %b %Y").to_string()
}

#[test]
fn renders_like_transformers() {
    let Some(dir) = data_dir() else { return };
    let text = text_template(&dir);
    let vision = vision_template(&dir, "Llama-3.2-90B-Vision-Instruct");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat_rendered.json");
    let doc: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let template = if case["template"] == "vision" { &vision } else { &text };
        let req = ChatRequest::from_value(case["request"].clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let opts = RenderOptions {
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
            date_string: case["date_string"].as_str().map(String::from),
        };
        let got = template.render(&req, &opts);
        match (case.get("expected").and_then(Json::as_str), case.get("expected_error").and_then(Json::as_str)) {
            (Some(expected), _) => {
                let expected = expected.replace("{DATE}", &today());
                match got {
                    Ok(got) if got == expected => {}
                    Ok(got) => failures.push(format!("{name}:\n--- expected\n{expected:?}\n--- got\n{got:?}")),
                    Err(e) => failures.push(format!("{name}: error {e}")),
                }
            }
            (None, Some(msg)) => match got {
                Err(e) if e.to_string().contains(msg) => {}
                other => failures.push(format!("{name}: expected error containing {msg:?}, got {other:?}")),
            },
            _ => panic!("{name}: case has neither expected nor expected_error"),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}

#[test]
fn renders_computed_vectors() {
    let Some(dir) = data_dir() else { return };
    let text = text_template(&dir);
    let vision = vision_template(&dir, "Llama-3.2-11B-Vision-Instruct");
    let path = dir.join("test_vectors/chat_template_rendered.computed.json");
    let doc: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let template = if case["template"].as_str().unwrap().contains("Vision") { &vision } else { &text };
        let kwargs = &case["kwargs"];
        let mut body = json!({ "messages": case["messages"] });
        if let Some(tools) = kwargs.get("tools") {
            body["tools"] = tools.clone();
        }
        let req = ChatRequest::from_value(body).unwrap_or_else(|e| panic!("{name}: {e}"));
        let opts = RenderOptions {
            add_generation_prompt: kwargs["add_generation_prompt"].as_bool().unwrap(),
            date_string: kwargs["date_string"].as_str().map(String::from),
        };
        let got = template.render(&req, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, case["rendered"].as_str().unwrap(), "{name}");
    }
}

#[test]
fn default_date_is_today() {
    let Some(dir) = data_dir() else { return };
    let req = ChatRequest::from_json(r#"{"messages": [{"role": "user", "content": "hi"}]}"#).unwrap();
    let got = text_template(&dir).render(&req, &RenderOptions::default()).unwrap();
    assert!(got.contains(&format!("Today Date: {}\n", today())), "{got}");
    assert!(got.starts_with(BOS) && got.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
}

#[test]
fn template_errors_carry_the_message() {
    let Some(dir) = data_dir() else { return };
    let text = text_template(&dir);
    let req = ChatRequest::from_json(
        r#"{"messages": [{"role": "system", "content": "s"}], "tools": [{"type": "function", "function": {"name": "f"}}]}"#,
    )
    .unwrap();
    let err = text.render(&req, &RenderOptions::default()).unwrap_err().to_string();
    assert!(err.contains("Cannot put tools in the first user message"), "{err}");

    // An image sent to the text-only template is refused (HF would print the Python repr of the list).
    let req = ChatRequest::from_json(
        r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]}"#,
    )
    .unwrap();
    let err = text.render(&req, &RenderOptions::default()).unwrap_err().to_string();
    assert!(err.contains("messages[0].content[0]"), "{err}");
}

#[test]
fn custom_template_features() {
    let src = "{{ bos_token }}{% for m in messages %}{{ m.content | trim | upper }}{% if not loop.last %}|{% endif %}\
               {% endfor %}{{ messages[0] | tojson }}{{ messages[0] | tojson(indent=2, sort_keys=true) }}\
               {{ '%s'|format('x') }}{{ ' a b '.strip().split(' ') | tojson }}{{ none }}{{ true }}\
               {% if add_generation_prompt %}>{% endif %}{{ eos_token }}";
    let t = ChatTemplate::from_source(src, "<s>", "</s>").unwrap();
    let req = ChatRequest::from_json(
        r#"{"messages": [{"role": "user", "content": " hi ", "zeta": 1.5e-7, "alpha": [true, null]}, {"role": "assistant", "content": "yo"}]}"#,
    )
    .unwrap();
    let got = t.render(&req, &RenderOptions { add_generation_prompt: false, date_string: None }).unwrap();
    let expected = "<s>HI|YO{\"role\": \"user\", \"content\": \" hi \", \"zeta\": 1.5e-07, \"alpha\": [true, null]}\
                    {\n  \"alpha\": [\n    true,\n    null\n  ],\n  \"content\": \" hi \",\n  \"role\": \"user\",\n  \
                    \"zeta\": 1.5e-07\n}x[\"a\", \"b\"]NoneTrue</s>";
    assert_eq!(got, expected);

    let t = ChatTemplate::from_source("{{ raise_exception('custom failure: ' + messages[0].role) }}", "", "").unwrap();
    let err = t.render(&req, &RenderOptions::default()).unwrap_err().to_string();
    assert!(err.contains("custom failure: user"), "{err}");

    assert!(ChatTemplate::from_source("{% if %}", "", "").is_err());
    let dir = std::env::temp_dir().join("llama32-no-template-here");
    let _ = std::fs::create_dir_all(&dir);
    let err = ChatTemplate::from_model_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("chat_template.jinja") && err.contains("tokenizer_config.json"), "{err}");
}

/// `tojson` of a tool whose schema has 200k keys takes linear time (each key's lookup was a scan of the object:
/// minutes of a prepare thread from one request).
#[test]
fn tojson_of_a_huge_object_is_linear() {
    let t = ChatTemplate::from_source("{{ tools[0] | tojson }}", "", "").unwrap();
    let keys: serde_json::Map<String, serde_json::Value> = (0..200_000).map(|i| (format!("k{i}"), i.into())).collect();
    let tools = serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": keys}}]);
    let body = serde_json::json!({"messages": [{"role": "user", "content": "x"}], "tools": tools});
    let req = ChatRequest::from_json(&body.to_string()).unwrap();
    let t0 = std::time::Instant::now();
    let got = t.render(&req, &RenderOptions::default()).unwrap();
    assert!(got.ends_with("\"k199999\": 199999}}}"), "{}", &got[got.len() - 60..]);
    assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[test]
fn request_errors_name_the_path() {
    let cases = [
        (r#"{"messages": [{"role": "user", "content": "hi"}"#, "not valid JSON"),
        (r#"[1, 2]"#, "expected a JSON object"),
        (r#"{"model": "x"}"#, "messages: missing field"),
        (r#"{"messages": []}"#, "messages: must not be empty"),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "robot", "content": "c"}]}"#,
            "messages[2].role: unknown variant `robot`",
        ),
        (r#"{"messages": [{"content": "a"}]}"#, "messages[0].role: missing field"),
        (r#"{"messages": [{"role": "user", "content": 5}]}"#, "messages[0].content: expected a string"),
        (r#"{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}"#, "messages[0].content[0].type: unknown"),
        (r#"{"messages": [{"role": "user", "content": [{"type": "text"}]}]}"#, "messages[0].content[0].text"),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"city\": "}}]}]}"#,
            "messages[1].tool_calls[0].function.arguments: not valid JSON",
        ),
        (r#"{"messages": [{"role": "user", "content": "a"}], "temperature": "hot"}"#, "temperature: invalid type"),
        (r#"{"messages": [{"role": "user", "content": "a"}], "stop": [1]}"#, "stop:"),
        (r#"{"messages": [{"role": "user", "content": "a"}], "tools": ["f"]}"#, "tools[0]: expected an object"),
        (
            r#"{"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}"#,
            "tools[0].function: expected",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function", "function": {}}]}"#,
            "tools[0].function: expected an object with a non-empty `name`",
        ),
        (r#"{"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "retrieval"}]}"#, "tools[0].type"),
        (r#"{"messages": [{"role": "user", "content": "a"}], "tools": [{"description": "d"}]}"#, "tools[0]: expected"),
    ];
    for (body, msg) in cases {
        let err = ChatRequest::from_json(body).unwrap_err().to_string();
        assert!(err.contains(msg), "{body}\n  error {err:?} does not contain {msg:?}");
    }
}

#[test]
fn request_fields() {
    let req = ChatRequest::from_json(
        r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}, {"type": "image"}]}],
            "max_tokens": 5, "max_completion_tokens": 7, "stop": "END", "temperature": 0.5, "top_k": 40, "seed": 1,
            "stream": true, "logprobs": true, "unknown_field": {"x": 1}}"#,
    )
    .unwrap();
    assert_eq!(req.max_new_tokens(), Some(7));
    assert_eq!(req.stop.as_ref().unwrap().to_vec(), vec!["END".to_string()]);
    assert_eq!(req.images(), vec![Some("data:image/png;base64,AA"), None]);
    assert_eq!((req.temperature, req.top_k, req.seed, req.stream), (Some(0.5), Some(40), Some(1), Some(true)));
}

// ---------------------------------------------------------------------------------------------------------------
// Tool-call parsing, on the outputs shown in Meta's prompt-format docs.

fn call(name: &str, arguments: Json) -> ToolCall {
    ToolCall { name: name.into(), arguments }
}

fn calls(text: &str) -> Vec<ToolCall> {
    match parse_tool_calls(text) {
        ParsedOutput::ToolCalls(c) => c,
        ParsedOutput::Text(t) => panic!("not parsed as tool calls: {t:?}"),
    }
}

#[test]
fn pythonic_list_calls() {
    // llama3_2_text_prompt_format.md, "Zero shot function calling".
    assert_eq!(
        calls("[get_weather(city='San Francisco', metric='celsius'), get_weather(city='Seattle', metric='celsius')]"),
        vec![
            call("get_weather", json!({"city": "San Francisco", "metric": "celsius"})),
            call("get_weather", json!({"city": "Seattle", "metric": "celsius"})),
        ]
    );
    assert_eq!(
        calls("[get_user_info(user_id=7890, special='black')]"),
        vec![call("get_user_info", json!({"user_id": 7890, "special": "black"}))]
    );
    // "Zero shot function calling E2E format": python_tag before the list.
    assert_eq!(
        calls("<|python_tag|>[get_weather(city=\"San Francisco\", metric=\"celsius\")]"),
        vec![call("get_weather", json!({"city": "San Francisco", "metric": "celsius"}))]
    );
    assert_eq!(
        calls(" [f(a=1.5, b=-2, c=True, d=None, e=[1, 'x'], g={'k': \"v\"}, h='it\\'s'), noargs()]\n"),
        vec![
            call("f", json!({"a": 1.5, "b": -2, "c": true, "d": null, "e": [1, "x"], "g": {"k": "v"}, "h": "it's"})),
            call("noargs", json!({}))
        ]
    );
}

#[test]
fn json_calls() {
    assert_eq!(
        calls(r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#),
        vec![call("get_weather", json!({"city": "Paris"}))]
    );
    // llama3_1_prompt_format.md: python_tag + JSON with "type".
    assert_eq!(
        calls("<|python_tag|>{\n    \"type\": \"function\",\n    \"name\": \"trending_songs\",\n    \"parameters\": {\n        \"n\": \"10\",\n        \"genre\": \"all\"\n    }\n}"),
        vec![call("trending_songs", json!({"n": "10", "genre": "all"}))]
    );
    assert_eq!(
        calls("  {\"name\": \"a\", \"arguments\": {\"x\": 1}}; {\"name\": \"b\", \"parameters\": {}}\n{\"name\": \"c\", \"arguments\": \"{\\\"y\\\": 2}\"}  "),
        vec![call("a", json!({"x": 1})), call("b", json!({})), call("c", json!({"y": 2}))]
    );
    // <function=...> form from the 3.1 docs.
    assert_eq!(
        calls(r#"<function=trending_songs>{"n": 10}</function>"#),
        vec![call("trending_songs", json!({"n": 10}))]
    );
}

#[test]
fn builtin_and_code_calls() {
    assert_eq!(
        calls("<|python_tag|>brave_search.call(query=\"latest price of 1oz gold\")"),
        vec![call("brave_search", json!({"query": "latest price of 1oz gold"}))]
    );
    assert_eq!(
        calls("<|python_tag|>wolfram_alpha.call(query=\"100th decimal of pi\")<|eom_id|>"),
        vec![call("wolfram_alpha", json!({"query": "100th decimal of pi"}))]
    );
    let code =
        "def is_prime(n):\n    if n <= 1:\n        return False\n    return True\n\nprint(is_prime(7))  # Output: True";
    assert_eq!(
        calls(&format!("<|python_tag|>{code}<|eom_id|>")),
        vec![call("code_interpreter", json!({"code": code}))]
    );
}

#[test]
fn plain_text_stays_text() {
    for text in [
        "I'm an AI assistant.",
        "The weather in San Francisco is 25 C.",
        "[1, 2, 3]",
        "[not a call]",
        "{\"city\": \"Paris\"}",
        "{\"name\": \"x\"} and then some prose",
        "",
    ] {
        assert_eq!(parse_tool_calls(text), ParsedOutput::Text(text.to_string()), "{text:?}");
    }
}

#[test]
fn openai_tool_calls_json() {
    let out = to_openai_tool_calls(&[call("get_weather", json!({"city": "Zürich", "n": 1}))]);
    let arr = out.as_array().unwrap();
    assert_eq!(arr.len(), 1);
    assert_eq!(arr[0]["type"], "function");
    assert_eq!(arr[0]["function"]["name"], "get_weather");
    assert_eq!(arr[0]["function"]["arguments"], "{\"city\":\"Zürich\",\"n\":1}");
    let id = arr[0]["id"].as_str().unwrap();
    assert!(id.starts_with("call_") && id.len() > 8, "{id}");
}

#[test]
fn model_dir_template_sources() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChatTemplate>();
    let root = std::env::temp_dir().join(format!("llama32-chat-template-test-{}", std::process::id()));
    let user = ChatRequest::from_json(r#"{"messages": [{"role": "user", "content": "q"}]}"#).unwrap();
    let with_tools =
        ChatRequest::from_json(r#"{"messages": [{"role": "user", "content": "q"}], "tools": [{"name": "f"}]}"#)
            .unwrap();
    let opts = RenderOptions::default();

    // A list of named templates; special tokens as {"content": ...} dicts; "tool_use" is picked when tools are given.
    let dir = root.join("list");
    std::fs::create_dir_all(&dir).unwrap();
    let config = json!({
        "bos_token": {"content": "<B>", "lstrip": false}, "eos_token": "<E>",
        "chat_template": [{"name": "default", "template": "D{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"},
                          {"name": "tool_use", "template": "T{{ tools | length }}"}]
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    let t = ChatTemplate::from_model_dir(&dir).unwrap();
    assert_eq!(t.render(&user, &opts).unwrap(), "D<B>q<E>");
    assert_eq!(t.render(&with_tools, &opts).unwrap(), "T1");

    // chat_template.jinja wins over tokenizer_config.json, as in transformers.
    std::fs::write(dir.join("chat_template.jinja"), "J{{ bos_token }}\n").unwrap();
    assert_eq!(ChatTemplate::from_model_dir(&dir).unwrap().render(&user, &opts).unwrap(), "J<B>");

    // chat_template.json (processor style) when tokenizer_config.json has none.
    let dir = root.join("json");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"bos_token": "<s>"}"#).unwrap();
    std::fs::write(dir.join("chat_template.json"), r#"{"chat_template": "P{{ bos_token }}{{ eos_token }}"}"#).unwrap();
    assert_eq!(ChatTemplate::from_model_dir(&dir).unwrap().render(&user, &opts).unwrap(), "P<s>");

    // Bad config values name the file and field.
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"bos_token": 5}"#).unwrap();
    let err = ChatTemplate::from_model_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("bos_token"), "{err}");

    // Template errors name where the template came from: at load (a syntax error), at render (an exception the
    // template raises), and an empty list of templates.
    let dir = root.join("errors");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), "{% if %}").unwrap();
    let err = ChatTemplate::from_model_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("chat_template.jinja") && err.contains("does not compile"), "{err}");
    std::fs::write(dir.join("chat_template.jinja"), "{{ raise_exception('boom') }}").unwrap();
    let err = ChatTemplate::from_model_dir(&dir).unwrap().render(&user, &opts).unwrap_err().to_string();
    assert!(err.contains("boom") && err.contains("chat_template.jinja"), "{err}");
    std::fs::remove_file(dir.join("chat_template.jinja")).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"chat_template": []}"#).unwrap();
    let err = ChatTemplate::from_model_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("chat_template") && err.contains("empty"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}
