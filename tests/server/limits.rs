//! The server's limits on what one client may cost the others: headers and bodies that stall (and steady slow
//! ones that must still be served), a declared body far over what is sent, a full queue (429 with Retry-After),
//! and the API key on the `/v1` routes.

use super::*;

/// Writes `head` and then `body` in `pieces` pieces, `gap` apart, on a raw connection to `srv`, and returns what
/// the server answered (all of it, up to its close or 10 s).
async fn trickle(srv: &Server, head: &str, body: &[u8], pieces: usize, gap: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = srv.base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(head.as_bytes()).await.expect("write head");
    for piece in body.chunks(body.len().div_ceil(pieces.max(1)).max(1)) {
        tokio::time::sleep(gap).await;
        if tcp.write_all(piece).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_timed_out_and_steady_ones_served() {
    // A limit far over any body sent here: what a client declares must not be reserved up front.
    let opts = ServerOptions {
        header_timeout: Duration::from_millis(500),
        body_timeout: Duration::from_millis(800),
        max_body_bytes: 1 << 40,
        ..Default::default()
    };
    let Some(mut srv) = start("http-slow", 4096, EngineConfig::default(), opts).await else { return };
    let body = json!({"prompt": ids(3, 6), "max_tokens": 2}).to_string();
    let head = |len: usize| {
        format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n")
    };

    // Headers that never end: the connection is closed after the header timeout, not held.
    let t = Instant::now();
    let answer = trickle(&srv, "POST /v1/completions HTTP/1.1\r\nhost: x\r\n", b"", 0, Duration::ZERO).await;
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(5), "a stalled header held its connection for {waited:?}: {answer:?}");
    assert!(!answer.contains(" 200 "), "{answer}");

    // A body that stops halfway: 408 after the idle timeout.
    let half = &body.as_bytes()[..body.len() / 2];
    let t = Instant::now();
    let answer = trickle(&srv, &head(body.len()), half, 1, Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("no data for"), "{answer}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // A declared length of 64 GiB within that limit, one byte sent: a 408, not 64 GiB reserved (which aborted).
    let answer = trickle(&srv, &head(1 << 36), b"{", 1, Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // A body sent steadily in pieces 300 ms apart, 2.4 s in all (three times the idle timeout): served.
    let answer = trickle(&srv, &head(body.len()), body.as_bytes(), 8, Duration::from_millis(300)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"completion_tokens\":2"), "{answer}");
    srv.stop(Duration::from_secs(5)).await.expect("serve returns Ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let cfg = EngineConfig { max_seqs: 1, max_waiting: 1, ..EngineConfig::default() };
    let Some(mut srv) = start("http-429", 4096, cfg, ServerOptions::default()).await else { return };
    let long = |seed| json!({"prompt": ids(seed, 8), "max_tokens": 900, "ignore_eos": true, "stream": true});
    // One running (its first tokens are out), one waiting: the queue is full.
    let running = srv.client.post(srv.url("/v1/completions")).json(&long(1)).send().await.expect("request sent");
    let (_, running) = read_sse(running, 2).await;
    let waiting = srv.client.post(srv.url("/v1/completions")).json(&long(2)).send().await.expect("request sent");
    assert_eq!(waiting.status(), 200);
    let r = srv.client.post(srv.url("/v1/completions")).json(&long(3)).send().await.expect("request sent");
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let body: Value = r.json().await.expect("JSON error body");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("queue is full")), "{body}");
    drop((running, waiting));
    srv.stop(Duration::from_secs(10)).await.expect("serve returns Ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_guards_the_v1_routes_only() {
    let opts = ServerOptions { api_key: Some("s3cret-key".into()), ..Default::default() };
    let Some(mut srv) = start("http-key", 4096, EngineConfig::default(), opts).await else { return };
    let body = json!({"prompt": ids(4, 5), "max_tokens": 2});
    for auth in [None, Some("Bearer wrong"), Some("Bearer s3cret-ke"), Some("Basic s3cret-key"), Some("s3cret-key")] {
        let mut r = srv.client.post(srv.url("/v1/completions")).json(&body);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let r = r.send().await.expect("request sent");
        assert_eq!(r.status(), 401, "{auth:?}");
        assert_eq!(r.headers().get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Bearer"));
        let e: Value = r.json().await.expect("JSON error body");
        assert!(e["error"]["message"].as_str().is_some_and(|m| m.contains("API key")), "{e}");
    }
    let r = srv.client.get(srv.url("/v1/models")).send().await.expect("request sent");
    assert_eq!(r.status(), 401);
    // The right key, any case of the scheme.
    for scheme in ["Bearer", "bearer"] {
        let r = srv.client.post(srv.url("/v1/completions")).header("authorization", format!("{scheme} s3cret-key"));
        let r = r.json(&body).send().await.expect("request sent");
        assert_eq!(r.status(), 200, "{scheme}");
    }
    // Probes and scrapers need no key.
    assert_eq!(srv.get("/health").await.status(), 200);
    assert_eq!(srv.get("/metrics").await.status(), 200);
    srv.stop(Duration::from_secs(5)).await.expect("serve returns Ok");
}
