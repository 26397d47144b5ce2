//! Server tests of structured outputs (OpenAI's `response_format`, vLLM's `guided_*` and `structured_outputs`) on
//! the tiny random-weight model: whatever the weights, every answer must match its grammar. A module of
//! tests/server.rs.

use super::*;

fn text_of(resp: &Value, i: usize) -> String {
    let c = &resp["choices"][i];
    c["text"].as_str().or_else(|| c["message"]["content"].as_str()).unwrap_or_else(|| panic!("no text: {resp}")).into()
}

/// Choices, a regex and JSON schemas (OpenAI's shape, vLLM's as object and as string, streamed chat): each
/// completion matches and stops there, with sampling at temperature 1 and several completions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_matches_its_grammar() {
    let Some(mut srv) = start("http-guided", 4096, EngineConfig::default(), ServerOptions::default()).await else {
        return;
    };
    let choices = ["yes", "no", "maybe not"];
    let body = json!({"model": "tiny", "prompt": "Answer:", "max_tokens": 16, "n": 4, "temperature": 1.0,
                      "seed": 5, "guided_choice": choices, "logprobs": 0});
    let (status, resp) = srv.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{resp}");
    for i in 0..4 {
        assert!(choices.contains(&text_of(&resp, i).as_str()), "{resp}");
        assert_eq!(resp["choices"][i]["finish_reason"], "stop", "{resp}");
        // The logprobs are the model's, of tokens the grammar allowed.
        let lps = resp["choices"][i]["logprobs"]["token_logprobs"].as_array().unwrap();
        assert!(lps.iter().all(|v| v.as_f64().is_some_and(|x| x <= 0.0)), "{resp}");
    }
    let so = with(body.clone(), json!({"guided_choice": null, "structured_outputs": {"choice": ["on", "off"]}}));
    let (status, resp) = srv.post("/v1/completions", &so).await;
    assert_eq!(status, 200, "{resp}");
    assert!((0..4).all(|i| ["on", "off"].contains(&text_of(&resp, i).as_str())), "{resp}");

    let rx = json!({"model": "tiny", "prompt": "Phone:", "max_tokens": 20, "temperature": 1.0, "seed": 9,
                    "guided_regex": "[0-9]{3}-[0-9]{4}"});
    let (status, resp) = srv.post("/v1/completions", &rx).await;
    assert_eq!(status, 200, "{resp}");
    let t = text_of(&resp, 0);
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    assert!(t.len() == 8 && digits(&t[..3]) && &t[3..4] == "-" && digits(&t[4..]), "{t:?}");

    let schema = json!({"type": "object", "properties": {
        "ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["ok", "color", "n"], "additionalProperties": false});
    let check = |t: &str| {
        let v: Value = serde_json::from_str(t).unwrap_or_else(|e| panic!("not JSON ({e}): {t:?}"));
        assert!(v["ok"].is_boolean() && ["red", "green"].contains(&v["color"].as_str().unwrap_or("")), "{t}");
        assert!(v["n"].as_u64().is_some_and(|n| n <= 99) && v.as_object().unwrap().len() == 3, "{t}");
    };
    let bodies = [
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}}),
        json!({"guided_json": schema}),
        json!({"guided_json": schema.to_string()}),
        json!({"structured_outputs": {"json": schema}}),
    ];
    for extra in bodies {
        let body = with(
            json!({"model": "tiny", "prompt": "JSON:", "max_tokens": 64, "temperature": 1.0, "seed": 3,
                                "n": 2}),
            extra.clone(),
        );
        let (status, resp) = srv.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{extra}: {resp}");
        for i in 0..2 {
            check(&text_of(&resp, i));
            assert_eq!(resp["choices"][i]["finish_reason"], "stop", "{resp}");
        }
    }
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "A color?"}], "max_tokens": 64,
                      "temperature": 1.0, "seed": 1, "stream": true,
                      "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}});
    let sse = stream_all(&srv, "/v1/chat/completions", &chat).await;
    assert!(sse.done && sse.error().is_none(), "{sse:?}");
    check(&sse.text(0));
    assert_eq!(sse.finish_reason(0).as_deref(), Some("stop"));
    // Any JSON object: the output starts as one (random weights may not finish it within max_tokens).
    let body = json!({"model": "tiny", "prompt": "JSON:", "max_tokens": 8, "response_format": {"type": "json_object"}});
    let (status, resp) = srv.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{resp}");
    assert!(text_of(&resp, 0).starts_with('{'), "{resp}");
    // A GBNF grammar (llama.cpp's format, vLLM's default), told from Lark by its `::=`.
    let gbnf = "# an id\nroot ::= \"id-\" digit{2} ( \"a\" | \"b\" )\ndigit ::= [0-9]\n";
    for extra in [json!({"guided_grammar": gbnf}), json!({"structured_outputs": {"grammar": gbnf}})] {
        let body =
            with(json!({"model": "tiny", "prompt": "Id:", "max_tokens": 16, "temperature": 1.0, "seed": 4}), extra);
        let (status, resp) = srv.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{resp}");
        let t = text_of(&resp, 0);
        let b = t.as_bytes();
        assert!(t.len() == 6 && t.starts_with("id-") && b[3..5].iter().all(u8::is_ascii_digit), "{t:?}");
        assert!(matches!(b[5], b'a' | b'b') && resp["choices"][0]["finish_reason"] == "stop", "{resp}");
    }
    // JSON Schema's `true`: any JSON value.
    let body = json!({"model": "tiny", "prompt": "JSON:", "max_tokens": 8, "guided_json": true});
    let (status, resp) = srv.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{resp}");
    srv.stop(Duration::from_secs(30)).await.expect("clean stop");
}

/// vLLM's whitespace pattern: with the space token pushed up by a logit bias, an object with no free string under
/// the default compact grammar has no space, and one whose pattern allows spaces between JSON tokens has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whitespace_pattern_lets_spaces_in() {
    let Some(mut srv) = start("http-guided-ws", 4096, EngineConfig::default(), ServerOptions::default()).await else {
        return;
    };
    let (status, tok) =
        srv.post("/tokenize", &json!({"model": "tiny", "prompt": " ", "add_special_tokens": false})).await;
    assert_eq!(status, 200, "{tok}");
    let space = tok["tokens"][0].as_u64().unwrap_or_else(|| panic!("no token: {tok}"));
    // No free string anywhere (the key is fixed, the value an integer): a space can only be whitespace.
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                        "additionalProperties": false});
    let base = json!({"model": "tiny", "prompt": "JSON:", "max_tokens": 6, "logit_bias": {space.to_string(): 100},
                      "guided_json": schema});
    let (status, resp) = srv.post("/v1/completions", &base).await;
    assert_eq!(status, 200, "{resp}");
    let compact = text_of(&resp, 0);
    assert!(compact.starts_with('{') && !compact.contains(' '), "{compact:?}");
    for extra in
        [json!({"guided_whitespace_pattern": "[ ]+"}), json!({"structured_outputs": {"whitespace_pattern": "[ ]+"}})]
    {
        let (status, resp) = srv.post("/v1/completions", &with(base.clone(), extra.clone())).await;
        assert_eq!(status, 200, "{extra}: {resp}");
        let spaced = text_of(&resp, 0);
        assert!(spaced.starts_with('{') && spaced.contains(' '), "{extra}: {spaced:?}");
    }
    srv.stop(Duration::from_secs(30)).await.expect("clean stop");
}

/// Bad constraints are 400s naming their field; a model without a tokenizer has no structured outputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_constraints_are_named() {
    let Some(mut srv) = start("http-guided-bad", 4096, EngineConfig::default(), ServerOptions::default()).await else {
        return;
    };
    for (body, param, says) in [
        (json!({"guided_regex": "("}), "guided_regex", "unclosed group"),
        (json!({"guided_choice": []}), "guided_choice", "non-empty array"),
        (json!({"guided_json": "not json"}), "guided_json", "JSON schema"),
        (json!({"guided_json": {"type": "object"}, "guided_regex": "a"}), "guided_regex", "only one"),
        (json!({"response_format": {"type": "xml"}}), "response_format", "json_schema"),
        (json!({"response_format": {"type": "json_schema"}}), "response_format", "schema is missing"),
        (json!({"structured_outputs": {"yaml": "x"}}), "structured_outputs", "not supported"),
        (json!({"guided_choice": ["a"], "ignore_eos": true}), "ignore_eos", "cannot be combined"),
        (json!({"guided_choice": ["a"], "min_tokens": 2}), "min_tokens", "cannot be combined"),
        (json!({"guided_json": {"type": "object", "properties": {"a": {"type": "nope"}}}}), "guided_json", ""),
        (json!({"guided_json": {"$ref": "#"}}), "guided_json", "cannot produce any text"),
        (json!({"guided_grammar": "start: a\na: b\nb: a"}), "guided_grammar", "cannot produce any text"),
        (json!({"guided_grammar": "root ::= item"}), "guided_grammar", "GBNF line 1, column 10: the rule `item`"),
        (json!({"structured_outputs": {"grammar": "root ::= [z-a]"}}), "structured_outputs", "is reversed"),
        (json!({"guided_json": false}), "guided_json", "matches nothing"),
        (json!({"guided_regex": "a", "guided_whitespace_pattern": " "}), "guided_whitespace_pattern", "JSON outputs"),
        (json!({"guided_whitespace_pattern": " "}), "guided_whitespace_pattern", "asks for none"),
        (json!({"guided_json": true, "guided_whitespace_pattern": 3}), "guided_whitespace_pattern", "non-empty string"),
    ] {
        let body = with(json!({"model": "tiny", "prompt": "x", "max_tokens": 4}), body);
        let (status, resp) = srv.post("/v1/completions", &body).await;
        assert_eq!(status, 400, "{body}: {resp}");
        assert_eq!(resp["error"]["param"], param, "{body}: {resp}");
        assert!(resp["error"]["message"].as_str().unwrap().contains(says), "{body}: {resp}");
    }
    // A forced tool call's prefix and a grammar cannot both hold; vLLM's backend switches are accepted.
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
                      "tools": tools, "tool_choice": "required", "response_format": {"type": "json_object"}});
    let (status, resp) = srv.post("/v1/chat/completions", &chat).await;
    assert_eq!((status, resp["error"]["param"].as_str()), (400, Some("tool_choice")), "{resp}");
    let body = json!({"model": "tiny", "prompt": "x", "max_tokens": 4,
                      "structured_outputs": {"choice": ["a", "b"], "disable_fallback": true, "json": null}});
    let (status, resp) = srv.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{resp}");
    assert!(["a", "b"].contains(&text_of(&resp, 0).as_str()), "{resp}");
    srv.stop(Duration::from_secs(30)).await.expect("clean stop");
    let mut notok = start_without_tokenizer("guided").await;
    let (status, resp) =
        notok.post("/v1/completions", &json!({"model": "tiny", "prompt": [1, 2], "guided_choice": ["a"]})).await;
    assert_eq!(status, 400, "{resp}");
    assert!(resp["error"]["message"].as_str().unwrap().contains("need a tokenizer"), "{resp}");
    notok.stop(Duration::from_secs(30)).await.expect("clean stop");
}
