//! Randomized request bodies against the server: valid chat and completion requests with one to three fields
//! (top-level, or inside the first message) replaced by values of the wrong type or range (null, booleans,
//! negative, huge and fractional numbers, strings, arrays, objects, long and non-ASCII text) or by plausible ones
//! (so that valid combinations of sampling, log-probability, echo, stop and tool fields run too), on the tiny test
//! model; a fifth of them stream. Every answer must be a 200 with choices (or an event stream ending in `[DONE]`),
//! a 400 whose message is a non-empty string or a 404 for an unknown `model`: never a 500, a hang or a dropped connection. The server must
//! still serve a plain request afterwards. Seeded, so a failure replays; the seed and body are in the message.
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

/// The fields the endpoints read (api/mod.rs), with the message-level ones of chat.
const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "best_of",
    "stop",
    "stop_token_ids",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "min_tokens",
    "ignore_eos",
    "skip_special_tokens",
    "return_token_ids",
    "echo",
    "user",
    "suffix",
    "priority",
    "response_format",
    "tools",
    "tool_choice",
    "chat_template_kwargs",
    "stream_options",
];

/// Fields inside the first chat message (JSON pointers).
const MESSAGE_FIELDS: &[&str] =
    &["/messages/0/content", "/messages/0/role", "/messages/0/name", "/messages/0/tool_calls"];

/// A plausible value of `field`, or `None` for a field with none worth drawing.
fn plausible(rng: &mut ChaCha8Rng, field: &str) -> Option<Value> {
    Some(match field {
        "temperature" => json!(rng.random_range(0.0..2.0)),
        "top_p" => json!(rng.random_range(0.05..=1.0)),
        "top_k" => json!(rng.random_range(-1..50)),
        "min_p" => json!(rng.random_range(0.0..0.5)),
        "n" | "best_of" => json!(rng.random_range(1..=3)),
        "max_tokens" | "max_completion_tokens" | "min_tokens" => json!(rng.random_range(0..=4)),
        "stop" => json!(["l", "\n"]),
        "stop_token_ids" => json!([rng.random_range(0..128_000)]),
        "seed" => json!(rng.random::<u32>()),
        "frequency_penalty" | "presence_penalty" => json!(rng.random_range(-2.0..=2.0)),
        "repetition_penalty" => json!(rng.random_range(0.5..2.0)),
        "logit_bias" => json!({ rng.random_range(0..128_000).to_string(): rng.random_range(-100.0..=100.0) }),
        "logprobs" => json!(if rng.random_bool(0.5) { json!(true) } else { json!(rng.random_range(0..=5)) }),
        "top_logprobs" | "prompt_logprobs" => json!(rng.random_range(0..=5)),
        "ignore_eos" | "skip_special_tokens" | "return_token_ids" | "echo" => json!(rng.random_bool(0.5)),
        "tools" => json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]),
        "tool_choice" => json!(["none", "auto", "required"][rng.random_range(0..3)]),
        "response_format" => [json!({"type": "text"}), json!({"type": "json_object"})][rng.random_range(0..2)].clone(),
        "priority" => json!(rng.random_range(-5..5)),
        "/messages/0/content" => json!([{"type": "text", "text": "hi"}, {"type": "text", "text": " there"}]),
        "/messages/0/role" => json!(["system", "user", "assistant", "tool", "ipython"][rng.random_range(0..5)]),
        _ => return None,
    })
}

/// A value of some type or range a field may not take.
fn odd_value(rng: &mut ChaCha8Rng) -> Value {
    match rng.random_range(0..26) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(false),
        3 => json!(0),
        4 => json!(-1),
        5 => json!(1),
        6 => json!(3),
        7 => json!(0.5),
        8 => json!(-0.5),
        9 => json!(1e9),
        10 => json!(-1e300),
        11 => json!(u64::MAX),
        12 => json!(i64::MIN),
        13 => json!(""),
        14 => json!("x"),
        15 => json!("7"),
        16 => json!([]),
        17 => json!([1, 2]),
        18 => json!(["a", "b"]),
        19 => json!([[1], [2, [3]]]),
        20 => json!({}),
        21 => json!({"a": 1, "50": "x"}),
        22 => json!("\u{1F600}\u{0301}\u{200B} é \u{FFFD}"),
        23 => json!("z".repeat(3000)),
        24 => json!([{"role": "user", "content": [{"type": "image_url"}]}]),
        _ => json!({"type": "function", "function": {"name": 5}}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_bad_fields_get_200s_or_400s() {
    let Some(srv) = start("http-fuzz", 4096, EngineConfig::default(), ServerOptions::default()).await else {
        return;
    };
    let seed = 0x5eed_f023_u64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut ok, mut refused) = (0, 0);
    for i in 0..400 {
        let chat = rng.random_bool(0.5);
        let (path, mut body) = if chat {
            ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        } else {
            ("/v1/completions", json!({"prompt": "hello", "max_tokens": 2}))
        };
        for _ in 0..rng.random_range(1..=3) {
            let nested = chat && rng.random_bool(0.25);
            let field = if nested {
                MESSAGE_FIELDS[rng.random_range(0..MESSAGE_FIELDS.len())]
            } else {
                FIELDS[rng.random_range(0..FIELDS.len())]
            };
            let value = match plausible(&mut rng, field) {
                Some(v) if rng.random_bool(0.5) => v,
                _ => odd_value(&mut rng),
            };
            match field.strip_prefix("/messages/0/") {
                // Only while the first message is still an object (an earlier draw may have replaced `messages`).
                Some(key) => {
                    if let Some(Value::Object(m)) = body.pointer_mut("/messages/0") {
                        m.insert(key.to_string(), value);
                    }
                }
                None => body[field] = value,
            }
        }
        // A fifth of the requests stream: a 200 is then an event stream ending in `[DONE]`.
        let stream = rng.random_bool(0.2);
        if stream {
            body["stream"] = json!(true);
        }
        // Keep the generation short whatever the fields say: a valid large max_tokens is only slow.
        if body["max_tokens"].as_u64().is_some_and(|m| m > 8) {
            body["max_tokens"] = json!(8);
        }
        let what = format!("seed {seed:#x} request {i} {path}: {body}");
        let sent = srv.client.post(srv.url(path)).json(&body).timeout(Duration::from_secs(30)).send().await;
        let r = sent.unwrap_or_else(|e| panic!("{what}: no answer ({e})"));
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_else(|e| panic!("{what}: body not read ({e})"));
        if stream && status == 200 {
            assert!(text.trim_end().ends_with("data: [DONE]"), "{what}: the stream did not end with [DONE]: {text}");
            assert!(!text.contains("\"error\""), "{what}: the stream carried an error: {text}");
            ok += 1;
            continue;
        }
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {status} not JSON ({e}): {text}"));
        match status {
            200 => {
                assert!(v["choices"].as_array().is_some_and(|c| !c.is_empty()), "{what}: 200 without choices: {v}");
                ok += 1;
            }
            // 404: a `model` that is not the served one, as OpenAI answers.
            404 if v["error"]["param"] == "model" => refused += 1,
            400 => {
                let msg = v["error"]["message"].as_str().unwrap_or_default();
                assert!(!msg.trim().is_empty(), "{what}: 400 without a message: {v}");
                assert_eq!(v["error"]["type"], "invalid_request_error", "{what}: {v}");
                refused += 1;
            }
            _ => panic!("{what}: status {status}: {v}"),
        }
    }
    eprintln!("randomized requests: {ok} answered, {refused} refused with a message");
    assert!(ok > 0 && refused > 0, "the mutations should hit both outcomes ({ok} / {refused})");
    // Still serving.
    let (status, resp) = srv.post("/v1/completions", &json!({"prompt": "hello", "max_tokens": 2})).await;
    assert_eq!(status, 200, "{resp}");
}
