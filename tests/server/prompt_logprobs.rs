//! Server tests of prompt log-probabilities: OpenAI's `echo` with `logprobs` (and `max_tokens: 0`), the way
//! lm-evaluation-harness scores log-likelihoods, and vLLM's `prompt_logprobs`; a module of tests/server.rs.

use super::*;

fn ids_of(v: &Value) -> Vec<u64> {
    v.as_array().unwrap_or_else(|| panic!("not an id list: {v}")).iter().map(|x| x.as_u64().expect("id")).collect()
}

fn floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}")).iter().map(Value::as_f64).collect()
}

/// Scoring a greedy continuation with `echo` gives the log-probabilities its generation reported, and each of its
/// tokens is the most likely one (lm-evaluation-harness's `is_greedy`): the prompt is scored row by row as the
/// generation saw it. `max_tokens: 0` returns the prompt alone, as text, logprobs and usage; a stream sends the
/// same logprobs in its first chunk; vLLM's `prompt_logprobs` holds the same values with ranks; a repeat (whose
/// prefix is now cached) gives the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_scores_a_greedy_continuation_as_its_generation_did() {
    let Some(mut srv) = start(
        "http-echo-lp",
        4096,
        EngineConfig { max_step_tokens: 16, ..Default::default() },
        ServerOptions::default(),
    )
    .await
    else {
        return;
    };
    let gen = json!({"model": "tiny", "prompt": "The quick brown fox jumps over", "max_tokens": 6,
                     "temperature": 0, "ignore_eos": true, "logprobs": 2, "return_token_ids": true});
    let (status, resp) = srv.post("/v1/completions", &gen).await;
    assert_eq!(status, 200, "{resp}");
    let c = &resp["choices"][0];
    let mut ids = ids_of(&c["prompt_token_ids"]);
    let prompt_len = ids.len();
    let generated = ids_of(&c["token_ids"]);
    let gen_lps = floats(&c["logprobs"]["token_logprobs"]);
    assert_eq!((generated.len(), gen_lps.len()), (6, 6), "{resp}");
    ids.extend(&generated);

    let score = json!({"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": true, "logprobs": 1});
    let (status, resp) = srv.post("/v1/completions", &score).await;
    assert_eq!(status, 200, "{resp}");
    let c = &resp["choices"][0];
    let lp = &c["logprobs"];
    let token_lps = floats(&lp["token_logprobs"]);
    assert_eq!(token_lps.len(), ids.len(), "one entry per prompt token: {resp}");
    assert_eq!(token_lps[0], None, "the first token has no log-probability: {resp}");
    assert!(lp["top_logprobs"][0].is_null(), "{resp}");
    assert_eq!(lp["tokens"].as_array().unwrap().len(), ids.len(), "{resp}");
    for (k, (got, want)) in token_lps[prompt_len..].iter().zip(&gen_lps).enumerate() {
        let (got, want) = (got.expect("a scored token"), want.expect("a generated token's logprob"));
        assert!((got - want).abs() < 2e-3, "token {k}: scored {got}, generated with {want}: {resp}");
        // is_greedy: the token's log-probability is the largest of its position's top_logprobs.
        let top = lp["top_logprobs"][prompt_len + k].as_object().expect("top_logprobs entry");
        let best = top.values().filter_map(Value::as_f64).fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(best, got, "token {k} was picked greedily: {top:?}");
    }
    assert!(token_lps[1..].iter().all(|v| v.is_some_and(|x| x <= 0.0)), "{resp}");
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]) && offsets[0] == 0, "{offsets:?}");
    let text = c["text"].as_str().unwrap();
    assert!(text.starts_with("The quick brown fox jumps over"), "the prompt alone is the text: {text:?}");
    assert_eq!(c["finish_reason"], "length", "{resp}");
    assert_eq!(resp["usage"]["completion_tokens"], 0, "{resp}");
    assert_eq!(resp["usage"]["prompt_tokens"], ids.len(), "{resp}");
    assert_eq!(resp["usage"]["total_tokens"], ids.len(), "{resp}");

    // Again: its blocks are cached now, and the answer is the same (the prompt is computed in full).
    let (_, again) = srv.post("/v1/completions", &score).await;
    assert_eq!(again["choices"][0]["logprobs"], *lp, "a cached prefix changed the scores");

    let sse = stream_all(&srv, "/v1/completions", &with(score.clone(), json!({"stream": true}))).await;
    assert!(sse.done && sse.error().is_none(), "{sse:?}");
    let first = sse.choices(0).next().expect("a first chunk");
    assert_eq!(first["text"], *text, "{sse:?}");
    assert_eq!(first["logprobs"], *lp, "{sse:?}");
    assert_eq!(sse.text(0), text, "nothing generated is streamed: {sse:?}");
    assert_eq!(sse.finish_reason(0).as_deref(), Some("length"));

    // vLLM's prompt_logprobs: null, then {id: {logprob, rank, decoded_token}} holding the prompt's token.
    let vllm = json!({"model": "tiny", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2, "temperature": 0});
    let (status, resp) = srv.post("/v1/completions", &vllm).await;
    assert_eq!(status, 200, "{resp}");
    let pl = resp["choices"][0]["prompt_logprobs"].as_array().expect("prompt_logprobs").clone();
    assert_eq!(pl.len(), ids.len(), "{resp}");
    assert!(pl[0].is_null());
    for (k, entry) in pl.iter().enumerate().skip(1) {
        let e = &entry[ids[k].to_string()];
        assert_eq!(e["logprob"].as_f64(), token_lps[k], "position {k}: {entry}");
        let rank = e["rank"].as_u64().expect("rank");
        assert!(rank >= 1 && entry.as_object().unwrap().len() <= 3, "{entry}");
        if k >= prompt_len {
            assert_eq!(rank, 1, "a greedy token ranks first: {entry}");
        }
    }
    assert!(resp["choices"][0]["logprobs"].is_null(), "{resp}");
    srv.stop(Duration::from_secs(30)).await.expect("clean stop");
}

/// Chat takes vLLM's `prompt_logprobs` (at the top level of the answer and of the first chunk); the fields'
/// limits are 400s naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_prompt_logprobs_and_bad_values() {
    let Some(mut srv) = start("http-chat-plp", 4096, EngineConfig::default(), ServerOptions::default()).await else {
        return;
    };
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                      "prompt_logprobs": 0, "n": 2, "temperature": 0});
    let (status, resp) = srv.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{resp}");
    let pl = resp["prompt_logprobs"].as_array().expect("prompt_logprobs");
    assert_eq!(pl.len() as u64, resp["usage"]["prompt_tokens"].as_u64().unwrap(), "{resp}");
    assert!(pl[0].is_null() && pl[1..].iter().all(|e| e.as_object().is_some_and(|m| m.len() == 1)), "{resp}");
    let sse = stream_all(&srv, "/v1/chat/completions", &with(chat.clone(), json!({"stream": true}))).await;
    let firsts: Vec<&Value> = sse.chunks.iter().filter(|c| c.get("prompt_logprobs").is_some()).collect();
    assert_eq!(firsts.len(), 2, "one first chunk per choice: {sse:?}");
    assert_eq!(firsts[0]["prompt_logprobs"], resp["prompt_logprobs"], "{sse:?}");

    // The echo part keeps `logprobs` alternatives (at most logprobs + 1 entries) when prompt_logprobs asks for
    // more; a prompt whose echo is empty text still streams its logprobs; a text prompt's offsets start after the
    // BOS the server adds even when special tokens are shown, and never pass the text.
    let body = json!({"model": "tiny", "prompt": "Hi there", "max_tokens": 2, "echo": true, "logprobs": 1,
                      "prompt_logprobs": 5, "skip_special_tokens": false});
    let (status, resp) = srv.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{resp}");
    let c = &resp["choices"][0];
    let tops = c["logprobs"]["top_logprobs"].as_array().unwrap();
    assert!(tops[1..].iter().all(|t| t.as_object().is_some_and(|m| m.len() <= 2)), "{resp}");
    assert!(c["prompt_logprobs"][1].as_object().is_some_and(|m| m.len() >= 5), "{resp}");
    let offsets: Vec<u64> =
        c["logprobs"]["text_offset"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let text_len = c["text"].as_str().unwrap().chars().count() as u64;
    assert_eq!(offsets[..3], [0, 0, 2], "{resp}");
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]) && offsets.iter().all(|&o| o <= text_len), "{offsets:?}");
    let body = json!({"model": "tiny", "prompt": [128000, 128006], "max_tokens": 0, "echo": true, "logprobs": 1,
                      "stream": true});
    let sse = stream_all(&srv, "/v1/completions", &body).await;
    let first = sse.choices(0).next().expect("a first chunk");
    assert_eq!((first["text"].as_str(), first["logprobs"]["tokens"].as_array().map(Vec::len)), (Some(""), Some(2)));

    for (body, param) in [
        (json!({"prompt": "a", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "a", "max_tokens": 0, "echo": true, "min_tokens": 1}), "min_tokens"),
        (json!({"prompt": "a", "prompt_logprobs": 21}), "prompt_logprobs"),
        (json!({"prompt": "a", "prompt_logprobs": -1}), "prompt_logprobs"),
    ] {
        let (status, resp) = srv.post("/v1/completions", &body).await;
        assert_eq!(status, 400, "{body}: {resp}");
        assert_eq!(resp["error"]["param"], param, "{body}: {resp}");
    }
    srv.stop(Duration::from_secs(30)).await.expect("clean stop");
}
