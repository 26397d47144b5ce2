//! The OpenAI request and response formats (`serve::api`) without HTTP: validation into engine requests, tool
//! handling, and the response / stream objects built from engine events.

mod common;

use llama32::sampling::FinishReason;
use llama32::serve::api::{prepare, Endpoint, ResponseBuilder, ServeContext, StreamBuilder};
use llama32::serve::engine::EngineConfig;
use llama32::serve::{Event, TokenLogprob, Usage};
use serde_json::{json, Value};

fn ctx(tag: &str, with_generation_config: bool) -> Option<ServeContext> {
    let dir = common::tiny_model_dir(tag)?;
    if with_generation_config {
        let data = common::data_dir()?;
        std::fs::copy(data.join("Llama-3.2-3B-Instruct/generation_config.json"), dir.join("generation_config.json"))
            .unwrap();
    }
    let (engine, ctx) = common::tiny_engine(&dir, 2048, EngineConfig::default());
    engine.shutdown(None);
    Some(ctx)
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
}

fn err(ctx: &ServeContext, ep: Endpoint, body: Value) -> (String, Option<String>) {
    let e = prepare(ctx, ep, &body).expect_err("must be refused");
    assert_eq!(e.status, 400);
    assert_eq!(e.body()["error"]["type"], "invalid_request_error");
    (e.message, e.param)
}

#[test]
fn validation_errors_name_the_field() {
    let Some(c) = ctx("api-validate", false) else { return };
    let chat = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let cases: Vec<(Value, &str, &str)> = vec![
        (chat(json!({"temperature": -1})), "temperature", "temperature"),
        (chat(json!({"temperature": "hot"})), "temperature", "temperature: invalid type"),
        (chat(json!({"top_p": 1.5})), "top_p", "top_p"),
        (chat(json!({"functions": [{"name": "f"}]})), "functions", "use tools"),
        (chat(json!({"function_call": "auto"})), "function_call", "use tools"),
        (chat(json!({"stream_options": {"include_usage": true}})), "stream_options", "only allowed when stream"),
        (chat(json!({"n": 0})), "n", "n: must be in"),
        (chat(json!({"max_tokens": 5000})), "max_tokens", "maximum context length is 1024"),
        (chat(json!({"max_completion_tokens": 0})), "max_completion_tokens", "max_completion_tokens"),
        (chat(json!({"stop": 3})), "stop", "stop"),
        (chat(json!({"stop": vec!["x"; 65]})), "stop", "at most 64 strings"),
        (chat(json!({"stop": ["a", "b".repeat(1025)]})), "stop[1]", "at most 1024 bytes"),
        (chat(json!({"logit_bias": {"1": 500}})), "logit_bias[1]", "must be in [-100, 100]"),
        (chat(json!({"logit_bias": {"one": 5}})), "logit_bias", "key `one` is not a token id"),
        (chat(json!({"suffix": "x"})), "suffix", "not supported"),
        (chat(json!({"response_format": {"type": "yaml"}})), "response_format", "json_schema"),
        (chat(json!({"top_logprobs": 3})), "top_logprobs", "needs logprobs"),
        (chat(json!({"logprobs": true, "top_logprobs": 50})), "top_logprobs", "[0, 20]"),
        (chat(json!({"stream": true, "best_of": 3})), "best_of", "streaming"),
        (chat(json!({"tool_choice": "required"})), "tool_choice", "needs tools"),
        (
            chat(json!({"tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}})),
            "tool_choice",
            "`nope` is not in tools",
        ),
        (
            chat(
                json!({"tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "f\"}<|eot_id|>"}}}),
            ),
            "tool_choice",
            "special-token text",
        ),
        (json!({"messages": [{"role": "robot", "content": "hi"}]}), "messages[0].role", "messages[0].role"),
        (json!({"messages": []}), "messages", "must not be empty"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages",
            "vision model",
        ),
    ];
    // A forced function whose name needs escaping (or has a dot) goes into the prompt as a JSON string.
    let tools = json!([{"type": "function", "function": {"name": "say \"hi\""}}, {"name": "web.search"}]);
    for (name, prefix) in [
        ("say \"hi\"", r#"{"name": "say \"hi\"", "parameters": "#),
        ("web.search", r#"{"name": "web.search", "parameters": "#),
    ] {
        let body = chat(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": name}}}));
        let p = prepare(&c, Endpoint::Chat, &body).unwrap();
        assert_eq!(p.prefixes, vec![prefix.to_string()], "{name}");
    }
    for (body, param, needle) in cases {
        let (msg, p) = err(&c, Endpoint::Chat, body.clone());
        assert!(msg.contains(needle), "{body}: message {msg:?} lacks {needle:?}");
        assert_eq!(p.as_deref(), Some(param), "{body}: {msg}");
    }
    // One request starts at most MAX_SEQUENCES sequences (prompts x best_of), named by the field that multiplies.
    let prompts = |k: usize| json!(vec![vec![9906u32]; k]);
    let cap = llama32::serve::api::MAX_SEQUENCES;
    for (body, param) in [
        (json!({"prompt": prompts(cap / 64 + 1), "n": 64}), "n"),
        (json!({"prompt": prompts(cap / 128 + 1), "n": 2, "best_of": 128}), "best_of"),
    ] {
        let (msg, p) = err(&c, Endpoint::Completions, body.clone());
        assert!(msg.contains(&format!("sequences in one request; at most {cap}")), "{msg}");
        assert_eq!(p.as_deref(), Some(param), "{msg}");
    }
    let p = prepare(&c, Endpoint::Completions, &json!({"prompt": prompts(cap / 64), "n": 64})).unwrap();
    assert_eq!((p.requests.len(), p.requests[0].n), (cap / 64, 64));
    // Prompt log-probabilities, counted as every choice carries them: 100 x 1000 tokens x 21 x 2 choices is past
    // MAX_PROMPT_LOGPROBS (4194304), 99 prompts are not; echo with logprobs counts the same, named `logprobs`.
    let long = |k: usize| json!(vec![vec![9906u32; 1000]; k]);
    let body = |k: usize, extra: Value| {
        let mut b = json!({"prompt": long(k), "n": 2, "max_tokens": 1});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let (msg, p) = err(&c, Endpoint::Completions, body(100, json!({"prompt_logprobs": 20})));
    assert!(msg.contains("4200000 prompt log-probabilities") && msg.contains("at most 4194304"), "{msg}");
    assert_eq!(p.as_deref(), Some("prompt_logprobs"));
    let (msg, p) = err(&c, Endpoint::Completions, body(100, json!({"echo": true, "logprobs": 20})));
    assert!(msg.contains("4200000"), "{msg}");
    assert_eq!(p.as_deref(), Some("logprobs"));
    assert!(prepare(&c, Endpoint::Completions, &body(99, json!({"prompt_logprobs": 20}))).is_ok());
    // Both lists when both are asked for: 50 x 1000 x (21 + 21) x 2 is past it.
    let both = json!({"echo": true, "logprobs": 20, "prompt_logprobs": 20});
    let (msg, p) = err(&c, Endpoint::Completions, body(50, both));
    assert!(msg.contains("4200000") && p.as_deref() == Some("prompt_logprobs"), "{msg}");
    assert!(prepare(&c, Endpoint::Completions, &body(50, json!({"prompt_logprobs": 20}))).is_ok());
    // An unknown model is a 404, as OpenAI and vLLM answer (the OpenAI client raises NotFoundError).
    let e = prepare(&c, Endpoint::Chat, &chat(json!({"model": "gpt-4"}))).expect_err("unknown model");
    assert_eq!((e.status, e.param.as_deref()), (404, Some("model")), "{}", e.message);
    assert!(e.message.contains("does not exist"), "{}", e.message);
    // OpenAI's top_p range includes 0: the most likely token alone (top-k 1).
    let p = prepare(&c, Endpoint::Chat, &chat(json!({"top_p": 0, "temperature": 1}))).unwrap();
    assert_eq!((p.requests[0].params.top_p, p.requests[0].params.top_k), (1.0, 1));
    let (msg, _) = err(&c, Endpoint::Chat, chat(json!({"top_p": 1.5})));
    assert!(msg.contains("[0, 1]"), "{msg}");
    // An empty stream_options is no option: accepted without stream, as vLLM does.
    assert!(prepare(&c, Endpoint::Chat, &chat(json!({"stream_options": {}}))).is_ok());
    // OpenAI's `developer` role is the system prompt.
    let dev = json!({"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]});
    let sys = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]});
    let (a, b) = (prepare(&c, Endpoint::Chat, &dev).unwrap(), prepare(&c, Endpoint::Chat, &sys).unwrap());
    assert_eq!(a.requests[0].prompt, b.requests[0].prompt);
    let long: Vec<u32> = (0..1100).map(|i| 1000 + i).collect();
    let (msg, p) = err(&c, Endpoint::Completions, json!({"prompt": long}));
    assert!(msg.contains("maximum context length is 1024") && msg.contains("1100"), "{msg}");
    assert_eq!(p.as_deref(), Some("prompt"));
    let (msg, _) = err(&c, Endpoint::Completions, json!({"prompt": [1, 2, 200000]}));
    assert!(msg.contains("outside the vocabulary"), "{msg}");
    let (msg, _) = err(&c, Endpoint::Completions, json!({"prompt": [[1, 2], "x"]}));
    assert!(msg.contains("prompt: expected"), "{msg}");
    let (msg, _) = err(&c, Endpoint::Completions, json!({"prompt": "a", "suffix": "b"}));
    assert!(msg.contains("suffix"), "{msg}");
    let (msg, p) = err(&c, Endpoint::Completions, json!({"prompt": "a", "max_tokens": 0}));
    assert!(msg.contains("only with echo"), "{msg}");
    assert_eq!(p.as_deref(), Some("max_tokens"));
    let (msg, p) = err(&c, Endpoint::Completions, json!({"prompt": "a", "prompt_logprobs": 21}));
    assert!(msg.contains("[0, 20]"), "{msg}");
    assert_eq!(p.as_deref(), Some("prompt_logprobs"));
    let (msg, _) = err(&c, Endpoint::Completions, json!({}));
    assert!(msg.contains("prompt: missing"), "{msg}");
    let (msg, p) = err(&c, Endpoint::Completions, json!({"prompt": vec![vec![1, 2]; 1025]}));
    assert!(msg.contains("1025 prompts") && msg.contains("at most 1024"), "{msg}");
    assert_eq!(p.as_deref(), Some("prompt"));
}

#[test]
fn sampling_fields_defaults_and_limits() {
    let Some(c) = ctx("api-defaults", true) else { return };
    // generation_config.json gives temperature 0.6 and top_p 0.9; the request overrides them.
    let p = prepare(&c, Endpoint::Chat, &json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap();
    let r = &p.requests[0];
    assert_eq!((r.params.temperature, r.params.top_p), (0.6, 0.9));
    assert_eq!(r.params.max_tokens, 1024 - r.prompt.len(), "chat defaults to the rest of the context");
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "top_k": -1, "seed": 5,
        "stop": ["a", "b"], "stop_token_ids": [7], "ignore_eos": true, "n": 2, "best_of": 3, "priority": 4,
        "logprobs": true, "top_logprobs": 2, "max_completion_tokens": 9, "max_tokens": 100,
        "frequency_penalty": 0.5, "presence_penalty": -0.5, "repetition_penalty": 1.1, "min_p": 0.05});
    // `priority` only under --scheduling-policy priority; vLLM's lower-first becomes the scheduler's higher-first.
    let (msg, param) = err(&c, Endpoint::Chat, body.clone());
    assert!(msg.contains("--scheduling-policy priority") && param.as_deref() == Some("priority"), "{msg}");
    let mut c = c;
    c.priority_scheduling = true;
    let p = prepare(&c, Endpoint::Chat, &body).unwrap();
    let r = &p.requests[0];
    assert_eq!(r.params.temperature, 0.0);
    assert_eq!(r.params.top_k, 0);
    assert_eq!(r.params.seed, Some(5));
    assert_eq!(r.params.stop, vec!["a", "b"]);
    assert_eq!(r.params.stop_token_ids, vec![7]);
    assert!(r.params.ignore_eos);
    assert_eq!(r.params.max_tokens, 9, "max_completion_tokens wins over max_tokens");
    assert_eq!((r.n, r.best_of, r.priority, r.logprobs), (2, 3, -4, Some(2)));
    let mut urgent = body.clone();
    urgent["priority"] = json!(i64::MIN);
    let urgent = prepare(&c, Endpoint::Chat, &urgent).unwrap();
    assert_eq!(urgent.requests[0].priority, i32::MAX);
    assert_eq!((r.params.frequency_penalty, r.params.presence_penalty), (0.5, -0.5));
    // Completions: BOS + text, default max_tokens 16, several prompts.
    let p =
        prepare(&c, Endpoint::Completions, &json!({"prompt": ["Hello", "Bonjour"], "n": 2, "logprobs": 3})).unwrap();
    assert_eq!(p.requests.len(), 2);
    assert_eq!(p.requests[0].prompt[0], 128000);
    assert_eq!(p.requests[0].params.max_tokens, 16);
    assert_eq!(p.requests[1].logprobs, Some(3));
    let p = prepare(&c, Endpoint::Completions, &json!({"prompt": [128000, 9906], "echo": true})).unwrap();
    assert_eq!(p.prefixes[0], "Hello", "echo decodes a token prompt (special tokens skipped)");
    assert_eq!(p.requests[0].prompt_logprobs, None, "echo alone scores nothing");
    // echo + logprobs scores the prompt; max_tokens 0 asks for the prompt alone (one token generated, dropped).
    let body = json!({"prompt": [128000, 9906], "echo": true, "logprobs": 2, "max_tokens": 0});
    let p = prepare(&c, Endpoint::Completions, &body).unwrap();
    assert_eq!((p.requests[0].prompt_logprobs, p.requests[0].logprobs), (Some(2), Some(2)));
    assert_eq!((p.echo_logprobs, p.vllm_prompt_logprobs, p.prompt_only), (Some(2), None, true));
    assert_eq!(p.requests[0].params.max_tokens, 1);
    let p = prepare(&c, Endpoint::Chat, &json!({"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 0}))
        .unwrap();
    assert_eq!(p.requests[0].prompt_logprobs, Some(0));
    assert_eq!((p.echo_logprobs, p.vllm_prompt_logprobs, p.prompt_only, p.logprobs), (None, Some(0), false, false));
}

#[test]
fn tool_choice_controls_rendering_and_parsing() {
    let Some(c) = ctx("api-tools", false) else { return };
    let msgs = json!([{"role": "user", "content": "Weather in Paris?"}]);
    let plain = prepare(&c, Endpoint::Chat, &json!({"messages": msgs})).unwrap();
    let auto = prepare(&c, Endpoint::Chat, &json!({"messages": msgs, "tools": weather_tools()})).unwrap();
    let none = prepare(&c, Endpoint::Chat, &json!({"messages": msgs, "tools": weather_tools(), "tool_choice": "none"}))
        .unwrap();
    assert!(auto.parse_tools && !none.parse_tools && !plain.parse_tools);
    assert!(auto.requests[0].prompt.len() > plain.requests[0].prompt.len() + 20, "tools are rendered");
    assert_eq!(none.requests[0].prompt, plain.requests[0].prompt, "tool_choice none leaves the tools out");
    assert!(!auto.requests[0].skip_special_tokens, "<|python_tag|> must survive detokenization");
    let named = prepare(
        &c,
        Endpoint::Chat,
        &json!({"messages": msgs, "tools": weather_tools(),
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    )
    .unwrap();
    assert_eq!(named.prefixes[0], "{\"name\": \"get_weather\", \"parameters\": ");
    assert!(named.requests[0].prompt.len() > auto.requests[0].prompt.len(), "the call's start is forced");

    // The answer `{"city": "Paris"}}` completes the forced prefix into a call.
    let events = |text: &str| {
        vec![
            Event::Delta { index: 0, text: text.to_string(), ids: vec![1, 2], logprobs: vec![] },
            Event::Finished { index: 0, reason: FinishReason::Stop },
            Event::Done(Usage { prompt_tokens: 10, completion_tokens: 2, total_tokens: 12 }),
        ]
    };
    let mut rb = ResponseBuilder::new(&c, &named);
    for e in events("{\"city\": \"Paris\"}}") {
        rb.push(0, e).unwrap();
    }
    let v = rb.build();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(v["usage"]["total_tokens"], 12);
    assert_eq!(v["object"], "chat.completion");

    // Streaming with tools: the text is held back and sent as one tool_calls delta before the finish chunk.
    let mut sb = StreamBuilder::new(&c, &auto);
    let mut chunks = Vec::new();
    for e in events("{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}") {
        chunks.extend(sb.push(0, e).unwrap());
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let calls: Vec<&Value> = chunks.iter().filter(|c| !c["choices"][0]["delta"]["tool_calls"].is_null()).collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["choices"][0]["delta"]["tool_calls"][0]["index"], 0);
    assert_eq!(calls[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));

    // Plain text with tools on stays content, finish_reason from the engine.
    let mut rb = ResponseBuilder::new(&c, &auto);
    for e in events("It is sunny.") {
        rb.push(0, e).unwrap();
    }
    let v = rb.build();
    assert_eq!(v["choices"][0]["message"]["content"], "It is sunny.");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[test]
fn completions_objects_index_choices_and_report_logprobs() {
    let Some(c) = ctx("api-objects", false) else { return };
    let p = prepare(
        &c,
        Endpoint::Completions,
        &json!({"prompt": ["a", "b"], "n": 2, "logprobs": 1, "stream": true, "stream_options": {"include_usage": true}}),
    )
    .unwrap();
    let lp = |id: u32| TokenLogprob { id, logprob: -0.5, rank: 1, top: vec![(id, -0.5)] };
    let mut sb = StreamBuilder::new(&c, &p);
    let mut chunks = Vec::new();
    for prompt in 0..2 {
        for index in 0..2 {
            let ev = Event::Delta { index, text: "x".into(), ids: vec![87], logprobs: vec![lp(87)] };
            chunks.extend(sb.push(prompt, ev).unwrap());
            chunks.extend(sb.push(prompt, Event::Finished { index, reason: FinishReason::Length }).unwrap());
        }
        let u = Usage { prompt_tokens: 2, completion_tokens: 2, total_tokens: 4 };
        chunks.extend(sb.push(prompt, Event::Done(u)).unwrap());
    }
    let indexes: Vec<u64> =
        chunks.iter().filter_map(|c| c["choices"].get(0)).filter_map(|c| c["index"].as_u64()).collect();
    assert_eq!(indexes, vec![0, 0, 1, 1, 2, 2, 3, 3]);
    let first = &chunks[0]["choices"][0];
    assert_eq!(first["text"], "x");
    assert_eq!(first["logprobs"]["tokens"], json!(["x"]));
    assert_eq!(first["logprobs"]["token_logprobs"], json!([-0.5]));
    assert_eq!(first["logprobs"]["top_logprobs"], json!([{"x": -0.5}]));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["total_tokens"], 8, "usage sums over prompts");
    assert!(sb.push(0, Event::Error("boom".into())).is_err());

    // Two alternatives whose bytes are lone non-UTF-8 bytes both read as U+FFFD: the second keeps its own entry
    // under vLLM's `token_id:N` name instead of overwriting the first.
    let tok = c.tokenizer.clone().expect("tokenizer");
    let lone: Vec<u32> =
        (0..100_000u32).filter(|&i| tok.token_bytes(i).is_some_and(|b| b.len() == 1 && b[0] >= 0x80)).take(2).collect();
    let p = prepare(&c, Endpoint::Completions, &json!({"prompt": "a", "logprobs": 2})).unwrap();
    let mut sb = StreamBuilder::new(&c, &p);
    let top = vec![(lone[0], -1.0), (lone[1], -2.0)];
    let ev = Event::Delta {
        index: 0,
        text: String::new(),
        ids: vec![lone[0]],
        logprobs: vec![TokenLogprob { id: lone[0], logprob: -1.0, rank: 1, top }],
    };
    let chunk = &sb.push(0, ev).unwrap()[0];
    let want = json!([{"\u{FFFD}": -1.0, format!("token_id:{}", lone[1]): -2.0}]);
    assert_eq!(chunk["choices"][0]["logprobs"]["top_logprobs"], want, "{chunk}");
}

/// `generation_config.json` defaults out of range are refused when the server starts, naming the file and the field,
/// instead of failing every request that relies on them as if the request were at fault.
#[test]
fn bad_generation_config_defaults_are_refused_by_field() {
    use llama32::serve::api::SamplingDefaults;
    let dir = std::env::temp_dir().join(format!("llama32-genconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (body, field) in [
        (r#"{"temperature": 1e39}"#, "temperature"),
        (r#"{"temperature": 0.6, "top_p": -5}"#, "top_p"),
        (r#"{"repetition_penalty": 0}"#, "repetition_penalty"),
    ] {
        std::fs::write(dir.join("generation_config.json"), body).unwrap();
        let e = SamplingDefaults::from_model_dir(&dir).expect_err(body).to_string();
        assert!(e.contains("generation_config.json") && e.contains(field), "{body}: {e}");
    }
    std::fs::write(dir.join("generation_config.json"), r#"{"temperature": 0.6, "top_p": 0.9}"#).unwrap();
    let d = SamplingDefaults::from_model_dir(&dir).unwrap();
    assert_eq!((d.temperature, d.top_p), (Some(0.6), Some(0.9)));
    std::fs::remove_dir_all(&dir).ok();
}

/// Completions `text_offset` counts characters (Python string indices) of the text as returned, so a special token
/// left out of it takes no room, and it runs on across stream chunks; `top_logprobs` holds the sampled token too
/// (OpenAI: up to `logprobs + 1` entries).
#[test]
fn completions_logprobs_offsets_count_characters_and_include_the_sampled_token() {
    let Some(c) = ctx("api-offsets", false) else { return };
    let tok = c.tokenizer.clone().expect("tokenizer");
    let find = |s: &str| (0..128_000u32).find(|&i| tok.token_bytes(i) == Some(s.as_bytes())).expect(s);
    let (e_acute, x) = (find("\u{e9}"), find("x"));
    let eot = 128009; // <|eot_id|>, special: not in the text
    assert!(tok.is_special(eot));
    let ids = [e_acute, eot, x];
    let lp = |id: u32| TokenLogprob { id, logprob: -1.0, rank: 2, top: vec![(find("y"), -0.5)] };
    let body = json!({"prompt": "a", "logprobs": 1});
    let p = prepare(&c, Endpoint::Completions, &body).unwrap();
    let mut rb = ResponseBuilder::new(&c, &p);
    let ev = Event::Delta { index: 0, text: "\u{e9}x".into(), ids: ids.to_vec(), logprobs: ids.map(lp).to_vec() };
    rb.push(0, ev).unwrap();
    rb.push(0, Event::Finished { index: 0, reason: FinishReason::Length }).unwrap();
    rb.push(0, Event::Done(Usage { prompt_tokens: 1, completion_tokens: 3, total_tokens: 4 })).unwrap();
    let out = rb.build();
    let l = &out["choices"][0]["logprobs"];
    assert_eq!(l["text_offset"], json!([0, 1, 1]), "{out}");
    assert_eq!(l["top_logprobs"][0], json!({"y": -0.5, "\u{e9}": -1.0}), "{out}");
    // Streamed one token a chunk: the offsets go on from chunk to chunk.
    let p = prepare(&c, Endpoint::Completions, &json!({"prompt": "a", "logprobs": 1, "stream": true})).unwrap();
    let mut sb = StreamBuilder::new(&c, &p);
    let mut offsets = Vec::new();
    for (id, text) in ids.iter().zip(["\u{e9}", "", "x"]) {
        let ev = Event::Delta { index: 0, text: text.into(), ids: vec![*id], logprobs: vec![lp(*id)] };
        for chunk in sb.push(0, ev).unwrap() {
            offsets.extend(chunk["choices"][0]["logprobs"]["text_offset"].as_array().cloned().unwrap_or_default());
        }
    }
    assert_eq!(offsets, vec![json!(0), json!(1), json!(1)]);
}
