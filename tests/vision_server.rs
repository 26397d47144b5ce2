//! Image chat requests through the HTTP server: a tiny random-weight Llama 3.2 Vision model with the real 128K
//! vocabulary, tokenizer and vision chat template, images sent as `data:` URLs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use llama32::serve::api::ServeContext;
use llama32::serve::engine::{EngineConfig, EngineHandle};
use llama32::serve::http::{serve, ServerOptions};
use llama32::vision::config::MllamaConfig;
use llama32::vision::exec::MllamaCpuExecutor;
use llama32::vision::image::{ImageProcessor, PreprocessorConfig};
use llama32::vision::pipeline::MllamaModel;
use llama32::vision::weights::MllamaWeights;
use serde_json::{json, Value};

/// The tiny model directory (config, tokenizer, vision chat template) and a model with random weights.
fn tiny_vision() -> Option<(std::path::PathBuf, MllamaModel)> {
    let data = common::data_dir()?;
    let dir = std::env::temp_dir().join(format!("llama32-tiny-vision-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let golden = common::golden_dir("mllama-two-images");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(golden.join("config.json")).unwrap()).unwrap();
    cfg["image_token_index"] = json!(128256);
    cfg["text_config"]["vocab_size"] = json!(128256);
    cfg["text_config"]["bos_token_id"] = json!(128000);
    cfg["text_config"]["eos_token_id"] = json!([128001, 128008, 128009]);
    cfg["text_config"]["pad_token_id"] = json!(128004);
    cfg["text_config"]["max_position_embeddings"] = json!(1024);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(data.join("tokenizer.model"), dir.join("tokenizer.model")).unwrap();
    let template: Value = serde_json::from_str(
        &std::fs::read_to_string(data.join("Llama-3.2-11B-Vision-Instruct/chat_template.reconstructed.json")).unwrap(),
    )
    .unwrap();
    let tc = json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template["chat_template"]});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let cfg = MllamaConfig::from_model_dir(&dir).unwrap();
    let weights = MllamaWeights::random(&cfg, 3).unwrap();
    let pre = PreprocessorConfig {
        tile_size: cfg.vision.image_size,
        max_image_tiles: cfg.vision.max_num_tiles,
        ..Default::default()
    };
    let processor = ImageProcessor::new(pre).unwrap();
    Some((dir.clone(), MllamaModel { cfg, weights, processor, dir }))
}

fn start(dir: &std::path::Path, model: MllamaModel) -> (EngineHandle, ServeContext) {
    let (encoder, text) = model.split();
    let cfg = encoder.cfg.clone();
    let make = move || -> llama32::Result<Box<dyn llama32::exec::Executor>> {
        Ok(Box::new(MllamaCpuExecutor::new(cfg, text, 2048, 16)?))
    };
    let tok = Arc::new(llama32::tokenizer::Tokenizer::from_model_dir(dir).unwrap());
    let engine = EngineHandle::start(make, Some(tok.clone()), EngineConfig::default()).unwrap();
    let mut ctx =
        llama32::serve::context_for(Some(dir), Some(tok), engine.info().clone(), "tiny-vision".into()).unwrap();
    ctx.vision = Some(Arc::new(encoder));
    (engine, ctx)
}

fn data_url(dir: &std::path::Path, file: &str) -> String {
    let bytes = std::fs::read(common::golden_dir(dir.to_str().unwrap()).join(file)).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_chat_requests_over_http() {
    let Some((dir, model)) = tokio::task::spawn_blocking(tiny_vision).await.unwrap() else { return };
    let (engine, ctx) = tokio::task::spawn_blocking(move || start(&dir, model)).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = ServerOptions { port: addr.port(), shutdown_timeout: Duration::from_secs(5), ..Default::default() };
    let server = tokio::spawn(serve(listener, engine, Arc::new(ctx), opts, async move {
        let _ = stop_rx.await;
    }));
    let url = format!("http://{addr}/v1/chat/completions");
    let client = reqwest::Client::new();
    let two = std::path::Path::new("mllama-two-images");
    let img0 = data_url(two, "image0.png");
    let img1 = data_url(two, "image1.png");
    let ask = |content: Value, stream: bool| {
        json!({"messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0,
               "ignore_eos": true, "stream": stream})
    };
    let content = json!([
        {"type": "image_url", "image_url": {"url": img0}},
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": img1}},
        {"type": "text", "text": "with this."}
    ]);
    let r = client.post(&url).json(&ask(content.clone(), false)).send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 6);
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    // The same request streamed gives the same text.
    let body = client.post(&url).json(&ask(content.clone(), true)).send().await.unwrap().text().await.unwrap();
    let streamed: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(String::from))
        .collect();
    assert_eq!(streamed, text);
    let plain = json!([{"type": "text", "text": "Compare"}, {"type": "text", "text": "with this."}]);
    let v2: Value = client.post(&url).json(&ask(plain, false)).send().await.unwrap().json().await.unwrap();
    assert_eq!(v2["usage"]["completion_tokens"], 6);
    // (The vision template adds its default system block only without images, so prompt lengths differ anyway.)
    assert_ne!(v2["usage"]["prompt_tokens"], v["usage"]["prompt_tokens"]);
    // Only data: URLs, valid base64, decodable images.
    for (bad, needle) in [
        ("https://example.com/cat.png", "only data: URLs"),
        ("file:///etc/passwd", "only data: URLs"),
        ("data:image/png;base64,@@@", "invalid base64"),
        ("data:image/png;base64,aGVsbG8=", "image 0"),
    ] {
        let c = json!([{"type": "image_url", "image_url": {"url": bad}}, {"type": "text", "text": "hi"}]);
        let r = client.post(&url).json(&ask(c, false)).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let e: Value = r.json().await.unwrap();
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{bad}: {msg}");
    }
    // `<|image|>` typed as text with no image, and an image in a system message (which the template drops): the
    // token and image counts disagree, named before any image is decoded.
    let sys_image = json!({"messages": [
        {"role": "system", "content": [{"type": "image_url", "image_url": {"url": img0}}]},
        {"role": "user", "content": "hi"}], "max_tokens": 2});
    for (body, counts) in [
        (ask(json!("<|image|>What is this?"), false), "1 `<|image|>` token(s) but the request has 0"),
        (sys_image, "0 `<|image|>` token(s) but the request has 1"),
    ] {
        let r = client.post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.unwrap();
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(counts) && e["error"]["param"] == "messages", "{body}: {e}");
    }
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
