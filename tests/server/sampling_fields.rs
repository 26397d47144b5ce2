//! Server tests of the fields that steer or expose tokens (`return_token_ids`, `logit_bias`, `min_tokens`), on the
//! tiny test model; a module of tests/server.rs (its helpers come from there).

use super::*;

/// The token ids of the chunks of choice `index`, in order, and how many chunks carried some.
fn streamed_ids(sse: &Sse, index: u64) -> (Vec<u64>, usize) {
    let lists: Vec<Vec<u64>> = sse
        .choices(index)
        .filter_map(|c| c["token_ids"].as_array())
        .map(|a| a.iter().map(|v| v.as_u64().expect("token id")).collect())
        .collect();
    let carrying = lists.iter().filter(|l| !l.is_empty()).count();
    (lists.concat(), carrying)
}

fn id_list(v: &Value) -> Vec<u64> {
    v.as_array().unwrap_or_else(|| panic!("not an id list: {v}")).iter().map(|x| x.as_u64().expect("id")).collect()
}

/// A model without a tokenizer returns its output as token ids (its text is empty): every choice carries
/// `token_ids` and `prompt_token_ids`, and a stream sends one chunk per generated token with its id, the same ids
/// as the non-streamed answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_a_tokenizer_returns_token_ids() {
    let mut srv = start_without_tokenizer("ids").await;
    let body =
        json!({"model": "tiny", "prompt": [1, 17, 99, 300], "max_tokens": 6, "temperature": 0, "ignore_eos": true});
    let (status, resp) = srv.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{resp}");
    let c = &resp["choices"][0];
    assert_eq!(c["text"], "", "{resp}");
    let ids = id_list(&c["token_ids"]);
    assert_eq!(ids.len(), 6, "{resp}");
    assert!(ids.iter().all(|&t| t < 512), "{resp}");
    assert_eq!(id_list(&c["prompt_token_ids"]), vec![1, 17, 99, 300], "{resp}");
    assert_eq!(resp["usage"]["completion_tokens"], 6, "{resp}");

    let sse = stream_all(&srv, "/v1/completions", &with(body, json!({"stream": true}))).await;
    let (streamed, carrying) = streamed_ids(&sse, 0);
    assert_eq!(streamed, ids, "the stream's ids are the answer's: {sse:?}");
    assert_eq!(carrying, 6, "one chunk per token: {sse:?}");
    let first = sse.choices(0).next().expect("a first chunk");
    assert_eq!(id_list(&first["prompt_token_ids"]), vec![1, 17, 99, 300], "{sse:?}");
    assert_eq!(sse.finish_reason(0).as_deref(), Some("length"));
    srv.stop(Duration::from_secs(30)).await.expect("clean stop");
}

/// `return_token_ids` on a model with a tokenizer: the ids decode to the text, the chat prompt's ids are the
/// rendered prompt (as many as `usage.prompt_tokens`), the stream's ids equal the answer's, and without the field
/// no ids are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_token_ids_gives_the_ids_of_text_and_prompt() {
    let Some(mut srv) = start("http-ids", 4096, EngineConfig::default(), ServerOptions::default()).await else {
        return;
    };
    let tok = llama32::tokenizer::Tokenizer::from_model_dir(&common::data_dir().expect("data")).expect("tokenizer");
    let body = json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                      "ignore_eos": true, "return_token_ids": true});
    let (status, resp) = srv.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{resp}");
    let c = &resp["choices"][0];
    let ids: Vec<u32> = id_list(&c["token_ids"]).into_iter().map(|t| t as u32).collect();
    assert_eq!(ids.len(), 8, "{resp}");
    assert_eq!(tok.decode(&ids, true).expect("decode"), choice_text(&resp, 0), "{resp}");
    let prompt_ids = id_list(&c["prompt_token_ids"]);
    assert_eq!(prompt_ids.len() as u64, resp["usage"]["prompt_tokens"].as_u64().unwrap(), "{resp}");
    assert_eq!(prompt_ids[0], 128000, "the prompt starts with BOS: {resp}");
    let sse = stream_all(&srv, "/v1/completions", &with(body.clone(), json!({"stream": true}))).await;
    let want: Vec<u64> = ids.iter().map(|&t| u64::from(t)).collect();
    assert_eq!(streamed_ids(&sse, 0).0, want, "{sse:?}");

    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                      "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let (status, resp) = srv.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(id_list(&resp["choices"][0]["token_ids"]).len(), 4, "{resp}");
    let prompt_ids = id_list(&resp["prompt_token_ids"]);
    assert_eq!(prompt_ids.len() as u64, resp["usage"]["prompt_tokens"].as_u64().unwrap(), "{resp}");
    let sse = stream_all(&srv, "/v1/chat/completions", &with(chat.clone(), json!({"stream": true}))).await;
    assert_eq!(id_list(&sse.chunks[0]["prompt_token_ids"]), prompt_ids, "{sse:?}");
    assert_eq!(streamed_ids(&sse, 0).0, id_list(&resp["choices"][0]["token_ids"]), "{sse:?}");

    let mut plain = chat;
    plain.as_object_mut().unwrap().remove("return_token_ids");
    let (_, resp) = srv.post("/v1/chat/completions", &plain).await;
    assert!(resp["choices"][0].get("token_ids").is_none() && resp.get("prompt_token_ids").is_none(), "{resp}");
    srv.stop(Duration::from_secs(30)).await.expect("clean stop");
}

/// `logit_bias`: +100 on a token makes greedy decoding pick it every step; -100 on the token greedy decoding picks
/// first makes it pick another, in a stream too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_steers_greedy_decoding() {
    let mut srv = start_without_tokenizer("bias").await;
    let body =
        json!({"model": "tiny", "prompt": [1, 17, 99, 300], "max_tokens": 5, "temperature": 0, "ignore_eos": true});
    let (_, plain) = srv.post("/v1/completions", &body).await;
    let first = id_list(&plain["choices"][0]["token_ids"])[0];
    let forced = if first == 7 { 8 } else { 7 };
    let (status, resp) =
        srv.post("/v1/completions", &with(body.clone(), json!({"logit_bias": {forced.to_string(): 100}}))).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(id_list(&resp["choices"][0]["token_ids"]), vec![forced; 5], "{resp}");
    let banned = with(body, json!({"logit_bias": {first.to_string(): -100}, "stream": true}));
    let sse = stream_all(&srv, "/v1/completions", &banned).await;
    let (ids, _) = streamed_ids(&sse, 0);
    assert_eq!(ids.len(), 5, "{sse:?}");
    assert!(!ids.contains(&first), "token {first} was banned: {ids:?}");
    srv.stop(Duration::from_secs(30)).await.expect("clean stop");
}

/// `min_tokens`: with EOS made the argmax (`logit_bias` +100 on it), a completion ends at its first token; with
/// `min_tokens` it generates that many tokens first (none of them EOS), then ends with EOS, streamed alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_tokens_holds_back_eos() {
    let mut srv = start_without_tokenizer("min-tokens").await;
    let body = json!({"model": "tiny", "prompt": [1, 17, 99], "max_tokens": 10, "temperature": 0,
                      "logit_bias": {"2": 100}});
    let (status, resp) = srv.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(id_list(&resp["choices"][0]["token_ids"]), vec![2], "EOS first: {resp}");
    assert_eq!(resp["choices"][0]["finish_reason"], "stop", "{resp}");
    for stream in [false, true] {
        let req = with(body.clone(), json!({"min_tokens": 4, "stream": stream}));
        let ids = if stream {
            let sse = stream_all(&srv, "/v1/completions", &req).await;
            assert_eq!(sse.finish_reason(0).as_deref(), Some("stop"), "{sse:?}");
            streamed_ids(&sse, 0).0
        } else {
            let (status, resp) = srv.post("/v1/completions", &req).await;
            assert_eq!(status, 200, "{resp}");
            assert_eq!(resp["choices"][0]["finish_reason"], "stop", "{resp}");
            id_list(&resp["choices"][0]["token_ids"])
        };
        assert_eq!(ids.len(), 5, "4 tokens, then EOS: {ids:?}");
        assert!(ids[..4].iter().all(|&t| t != 2) && ids[4] == 2, "{ids:?}");
    }
    let (status, resp) = srv.post("/v1/completions", &with(body, json!({"min_tokens": 11}))).await;
    assert_eq!(status, 400, "{resp}");
    assert_eq!(resp["error"]["param"], "min_tokens", "{resp}");
    srv.stop(Duration::from_secs(30)).await.expect("clean stop");
}

/// A padded vocabulary (config `vocab_size` past the tokenizer's ids, as in many fine-tunes): an id the tokenizer
/// lacks, forced by `logit_bias`, is returned among the ids and adds no text, and the request running beside it
/// is untouched (it used to fail every request in the engine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_past_the_tokenizer_fails_nothing() {
    let Some(dir) = common::tiny_model_dir("http-padded") else { return };
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["vocab_size"] = json!(128_320);
    std::fs::write(&path, config.to_string()).unwrap();
    let (engine, ctx) = tokio::task::spawn_blocking(move || common::tiny_engine(&dir, 4096, EngineConfig::default()))
        .await
        .expect("engine");
    let mut srv = serve_on(engine, ctx, ServerOptions::default()).await;
    let padded = 128_300u64;
    let forced = json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0,
                        "ignore_eos": true, "return_token_ids": true, "logit_bias": {padded.to_string(): 100}});
    let beside = json!({"model": "tiny", "prompt": "Hello", "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let (a, b) = tokio::join!(srv.post("/v1/completions", &forced), srv.post("/v1/completions", &beside));
    assert_eq!(a.0, 200, "{}", a.1);
    assert_eq!(id_list(&a.1["choices"][0]["token_ids"]), vec![padded; 3], "{}", a.1);
    assert_eq!(choice_text(&a.1, 0), "", "{}", a.1);
    assert_eq!((b.0, b.1["usage"]["completion_tokens"].as_u64()), (200, Some(24)), "{}", b.1);
    let sse = stream_all(&srv, "/v1/completions", &with(forced, json!({"stream": true}))).await;
    assert!(sse.done && sse.error().is_none(), "{sse:?}");
    assert_eq!(streamed_ids(&sse, 0).0, vec![padded; 3], "{sse:?}");
    srv.stop(Duration::from_secs(30)).await.expect("clean stop");
}
