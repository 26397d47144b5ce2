//! `llama32 batch` ([`llama32::serve::batch::run_batch`]) on the CPU engine with a tiny random-weight model: result
//! and error records in input order, results equal to direct engine runs, resuming after a torn write, a small
//! in-flight window over many requests, and file errors.

mod common;

use std::path::{Path, PathBuf};

use llama32::serve::api::{self, Endpoint, ResponseBuilder, ServeContext};
use llama32::serve::batch::{run_batch, BatchOptions, BatchSummary};
use llama32::serve::engine::{EngineConfig, EngineHandle};
use serde_json::{json, Value as Json};

/// A fresh scratch directory for `tag`.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llama32-batch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn setup(tag: &str) -> Option<(EngineHandle, ServeContext, PathBuf)> {
    let dir = common::tiny_model_dir(tag)?;
    let (e, ctx) = common::tiny_engine(&dir, 16384, EngineConfig { max_step_tokens: 512, ..Default::default() });
    Some((e, ctx, scratch(tag)))
}

fn opts(dir: &Path, input: &str, output: &str, max_in_flight: usize) -> BatchOptions {
    BatchOptions { input: dir.join(input), output: dir.join(output), max_in_flight, progress: false }
}

fn read_lines(path: &Path) -> Vec<Json> {
    let text = std::fs::read_to_string(path).expect("output file");
    assert!(text.is_empty() || text.ends_with('\n'), "output must end with a newline");
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad output line {l}: {e}"))).collect()
}

/// The response `prepare` + the engine give for `body` directly (streaming off, as in a batch).
fn direct(e: &EngineHandle, ctx: &ServeContext, endpoint: Endpoint, body: &Json) -> Json {
    let mut body = body.clone();
    body.as_object_mut().expect("object body").remove("stream");
    let prep = api::prepare(ctx, endpoint, &body).expect("valid body");
    let streams: Vec<_> = prep.requests.iter().map(|r| e.submit_blocking(r.clone()).expect("accepted")).collect();
    let mut b = ResponseBuilder::new(ctx, &prep);
    for (p, mut s) in streams.into_iter().enumerate() {
        while let Some(ev) = s.blocking_next() {
            b.push(p, ev).expect("no engine error");
        }
    }
    b.build()
}

/// What must agree between two runs of the same seeded body: each choice's text and finish reason, and usage.
fn essence(resp: &Json) -> Json {
    let choices: Vec<Json> = resp["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| {
            let text = if c.get("message").is_some() { c["message"]["content"].clone() } else { c["text"].clone() };
            json!({"index": c["index"], "text": text, "finish_reason": c["finish_reason"]})
        })
        .collect();
    json!({"object": resp["object"], "model": resp["model"], "choices": choices, "usage": resp["usage"]})
}

/// A result line without what differs between runs (`id`, `request_id`, the response's `id` and `created`).
fn stable(rec: &Json) -> Json {
    let mut r = rec.clone();
    r.as_object_mut().expect("record").remove("id");
    if let Some(resp) = r.get_mut("response").and_then(Json::as_object_mut) {
        resp.remove("request_id");
        if let Some(body) = resp.get_mut("body").and_then(Json::as_object_mut) {
            body.remove("id");
            body.remove("created");
        }
    }
    r
}

/// What one input line should produce.
#[derive(Clone, Debug)]
enum Expect {
    /// Blank: no output line.
    Blank,
    /// A 200 whose response equals the direct run of `body`.
    Ok(Endpoint, Json),
    /// An error record with `code`, `custom_id` and a message containing `needle`.
    Error(&'static str, Option<&'static str>, &'static str),
    /// A response with status 400 whose error message contains `needle`.
    Status400(&'static str),
}

const SHARED: &str = "You are a careful assistant for the municipal library of a small coastal town. The library \
    keeps records of every book lent since 1952, a collection of nautical charts, and the diaries of three \
    lighthouse keepers. Answer questions about the collection briefly and politely, and say when you do not know.";

/// ~40 input lines: valid chat and completions requests (some sharing a long prefix, some asking to stream), every
/// kind of bad line, a duplicate id and blank lines.
fn mixed_input() -> Vec<(String, Expect)> {
    let mut v: Vec<(String, Expect)> = Vec::new();
    let line = |id: &str, url: &str, body: &Json| json!({"custom_id": id, "method": "POST", "url": url, "body": body});
    for k in 0..30u64 {
        let max_tokens = 4 + (k * 5) % 9;
        let (endpoint, body) = match k % 5 {
            0 | 1 => (
                Endpoint::Chat,
                json!({"model": "tiny", "seed": k, "temperature": 0.7, "max_tokens": max_tokens, "messages": [
                    {"role": "system", "content": SHARED},
                    {"role": "user", "content": format!("Question {k}: which charts cover the bay?")}]}),
            ),
            2 => (
                Endpoint::Completions,
                json!({"seed": k, "temperature": 0.7, "max_tokens": max_tokens,
                       "prompt": format!("{SHARED} Visitor {k} asks:")}),
            ),
            3 => (
                Endpoint::Chat,
                json!({"seed": k, "temperature": 0.7, "max_completion_tokens": max_tokens, "stream": true,
                       "messages": [{"role": "user", "content": format!("Say hello number {k}.")}]}),
            ),
            _ => (
                Endpoint::Completions,
                json!({"seed": k, "temperature": 0.7, "max_tokens": max_tokens, "n": 2,
                       "prompt": [format!("Short prompt {k}"), format!("Another prompt {k}")]}),
            ),
        };
        let id = format!("req-{k}");
        v.push((line(&id, endpoint.path(), &body).to_string(), Expect::Ok(endpoint, body)));
        match k {
            3 => v.push((
                r#"{"custom_id": "broken", "method": "POST", "url": "/v1/completions", "body": {"#.into(),
                Expect::Error("invalid_request", None, "invalid JSON"),
            )),
            5 => v.push((String::new(), Expect::Blank)),
            7 => v.push((
                json!({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}).to_string(),
                Expect::Error("invalid_request", None, "custom_id"),
            )),
            9 => v.push((
                line("bad-url", "/v1/embeddings", &json!({"input": "x"})).to_string(),
                Expect::Error("invalid_url", Some("bad-url"), "/v1/embeddings"),
            )),
            12 => v.push((
                json!({"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}})
                    .to_string(),
                Expect::Error("invalid_method", Some("get"), "GET"),
            )),
            15 => v.push((
                line("neg-temp", "/v1/completions", &json!({"prompt": "hi", "temperature": -1, "max_tokens": 4}))
                    .to_string(),
                Expect::Status400("temperature"),
            )),
            18 => v.push(("   \t".into(), Expect::Blank)),
            // Structured outputs and prompt scoring work in a batch as on the server.
            10 => {
                let body =
                    json!({"prompt": "Pick:", "max_tokens": 8, "seed": 3, "guided_choice": ["port", "starboard"]});
                v.push((line("guided", "/v1/completions", &body).to_string(), Expect::Ok(Endpoint::Completions, body)))
            }
            14 => {
                let body = json!({"prompt": "Charts of the bay", "max_tokens": 0, "echo": true, "logprobs": 2});
                v.push((line("scored", "/v1/completions", &body).to_string(), Expect::Ok(Endpoint::Completions, body)))
            }
            20 => {
                let ids: Vec<u32> = (0..1100).map(|i| 1000 + i % 3000).collect();
                v.push((
                    line("too-long", "/v1/completions", &json!({"prompt": ids, "max_tokens": 4})).to_string(),
                    Expect::Status400("maximum context length"),
                ))
            }
            24 => v.push((
                line("req-2", "/v1/completions", &json!({"prompt": "dup", "max_tokens": 4})).to_string(),
                Expect::Error("duplicate_custom_id", Some("req-2"), "req-2"),
            )),
            26 => v.push(("[1, 2, 3]".into(), Expect::Error("invalid_request", None, "object"))),
            28 => v.push((
                json!({"custom_id": 77, "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}})
                    .to_string(),
                Expect::Error("invalid_request", None, "custom_id: expected a string, got 77"),
            )),
            _ => {}
        }
    }
    v
}

fn write_input(path: &Path, lines: &[(String, Expect)]) {
    let text: String = lines.iter().map(|(l, _)| format!("{l}\n")).collect();
    std::fs::write(path, text).expect("write input");
}

#[test]
fn mixed_batch_writes_every_result_in_input_order() {
    let Some((e, ctx, dir)) = setup("mixed") else { return };
    let input = mixed_input();
    write_input(&dir.join("in.jsonl"), &input);
    let o = opts(&dir, "in.jsonl", "out.jsonl", 8);
    let summary = run_batch(&e, &ctx, &o).expect("batch runs");
    let out = read_lines(&o.output);
    let expected: Vec<(usize, &Expect)> = input
        .iter()
        .enumerate()
        .filter(|(_, (_, x))| !matches!(x, Expect::Blank))
        .map(|(i, (_, x))| (i + 1, x))
        .collect();
    assert_eq!(out.len(), expected.len(), "one output line per non-blank input line");
    let (mut ok, mut failed, mut prompt_tokens, mut completion_tokens) = (0, 0, 0, 0);
    let mut ids = std::collections::HashSet::new();
    for (rec, &(line_no, x)) in out.iter().zip(&expected) {
        let rid = rec["id"].as_str().expect("id");
        assert!(rid.starts_with("batch_req_") && ids.insert(rid.to_string()), "unique batch ids: {rid}");
        match x {
            Expect::Blank => unreachable!(),
            Expect::Ok(endpoint, body) => {
                ok += 1;
                let inp: Json = serde_json::from_str(&input[line_no - 1].0).unwrap();
                assert_eq!(rec["custom_id"], inp["custom_id"], "line {line_no}: results are in input order");
                assert_eq!(rec["error"], Json::Null);
                let resp = &rec["response"];
                assert_eq!(resp["status_code"], 200, "line {line_no}: {rec}");
                assert_eq!(resp["request_id"], resp["body"]["id"]);
                let want = direct(&e, &ctx, *endpoint, body);
                assert_eq!(essence(&resp["body"]), essence(&want), "line {line_no}: batch differs from a direct run");
                let n = want["choices"].as_array().unwrap().len();
                let prompt_only = body["max_tokens"] == 0;
                assert!(n >= 1 && (prompt_only || want["usage"]["completion_tokens"].as_u64().unwrap() > 0));
                if prompt_only {
                    let scored = resp["body"]["choices"][0]["logprobs"]["token_logprobs"].as_array().map(Vec::len);
                    assert_eq!(scored, want["usage"]["prompt_tokens"].as_u64().map(|p| p as usize), "{rec}");
                }
                prompt_tokens += want["usage"]["prompt_tokens"].as_u64().unwrap();
                completion_tokens += want["usage"]["completion_tokens"].as_u64().unwrap();
            }
            Expect::Error(code, custom_id, needle) => {
                failed += 1;
                assert_eq!(rec["response"], Json::Null, "line {line_no}: {rec}");
                assert_eq!(rec["error"]["code"], *code, "line {line_no}: {rec}");
                assert_eq!(rec["custom_id"], json!(custom_id), "line {line_no}: {rec}");
                let msg = rec["error"]["message"].as_str().unwrap();
                assert!(msg.starts_with(&format!("line {line_no}:")), "line {line_no}: message `{msg}`");
                assert!(msg.contains(needle) && msg.contains("in.jsonl"), "line {line_no}: message `{msg}`");
            }
            Expect::Status400(needle) => {
                failed += 1;
                assert_eq!(rec["error"], Json::Null);
                assert_eq!(rec["response"]["status_code"], 400, "line {line_no}: {rec}");
                assert!(rec["response"]["request_id"].is_string());
                let msg = rec["response"]["body"]["error"]["message"].as_str().unwrap();
                assert!(msg.contains(needle), "line {line_no}: message `{msg}`");
                assert_eq!(rec["response"]["body"]["error"]["type"], "invalid_request_error");
            }
        }
    }
    // The duplicate's message names the line of the first occurrence.
    let first_req2 = input.iter().position(|(l, _)| l.contains("\"req-2\"")).unwrap() + 1;
    let dup = out.iter().find(|r| r["error"]["code"] == "duplicate_custom_id").unwrap();
    assert!(dup["error"]["message"].as_str().unwrap().contains(&format!("line {first_req2}")), "{dup}");
    assert_eq!(
        (summary.total, summary.skipped, summary.succeeded, summary.failed),
        (expected.len(), 0, ok, failed),
        "{summary:?}"
    );
    assert_eq!((summary.prompt_tokens, summary.completion_tokens), (prompt_tokens, completion_tokens));
    assert!(summary.seconds > 0.0);
    let js = serde_json::to_value(&summary).unwrap();
    assert!(js["output_tokens_per_s"].as_f64().unwrap() > 0.0, "{js}");
}

#[test]
fn resume_after_a_torn_write_completes_the_file() {
    let Some((e, ctx, dir)) = setup("resume") else { return };
    let input = mixed_input();
    write_input(&dir.join("in.jsonl"), &input);
    let full = opts(&dir, "in.jsonl", "full.jsonl", 16);
    let s = run_batch(&e, &ctx, &full).expect("uninterrupted run");
    let full_text = std::fs::read_to_string(&full.output).unwrap();
    let full_lines: Vec<&str> = full_text.lines().collect();
    let reference: Vec<Json> = read_lines(&full.output).iter().map(stable).collect();
    assert_eq!(reference.len(), s.total);

    for k in [0, 3, 9, 17, full_lines.len() - 1] {
        let o = opts(&dir, "in.jsonl", &format!("part-{k}.jsonl"), 16);
        // The first k results, then half of the next one (a crash in the middle of a write).
        let next = full_lines[k];
        let mut text: String = full_lines[..k].iter().map(|l| format!("{l}\n")).collect();
        text.push_str(&next[..next.len() / 2]);
        std::fs::write(&o.output, text).unwrap();
        let s = run_batch(&e, &ctx, &o).expect("resumed run");
        assert_eq!((s.total, s.skipped, s.succeeded + s.failed), (reference.len(), k, reference.len() - k), "k={k}");
        let got: Vec<Json> = read_lines(&o.output).iter().map(stable).collect();
        assert_eq!(got.len(), reference.len(), "k={k}: every line exactly once");
        for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
            assert_eq!(a, b, "k={k}: line {}", i + 1);
        }
        // The kept lines are untouched.
        let after = std::fs::read_to_string(&o.output).unwrap();
        assert!(after.starts_with(&full_lines[..k].iter().map(|l| format!("{l}\n")).collect::<String>()));
    }

    // A complete last line that lost only its newline is kept, not run again.
    let o = opts(&dir, "in.jsonl", "nonl.jsonl", 16);
    let mut text: String = full_lines[..5].iter().map(|l| format!("{l}\n")).collect();
    text.push_str(full_lines[5]);
    std::fs::write(&o.output, text).unwrap();
    let s = run_batch(&e, &ctx, &o).expect("resumed run");
    assert_eq!(s.skipped, 6);
    assert_eq!(read_lines(&o.output).iter().map(stable).collect::<Vec<_>>(), reference);

    // A finished file: nothing to do, nothing changes.
    let before = std::fs::read(&full.output).unwrap();
    let s = run_batch(&e, &ctx, &full).expect("re-run of a finished file");
    assert_eq!((s.total, s.skipped, s.succeeded, s.failed), (reference.len(), reference.len(), 0, 0));
    assert_eq!((s.prompt_tokens, s.completion_tokens), (0, 0));
    assert_eq!(std::fs::read(&full.output).unwrap(), before);

    // A bad line before the end is not a torn write: refused, the file untouched.
    let o = opts(&dir, "in.jsonl", "corrupt.jsonl", 16);
    let text = format!("{}\nnot json\n{}\n", full_lines[0], full_lines[1]);
    std::fs::write(&o.output, &text).unwrap();
    let err = run_batch(&e, &ctx, &o).expect_err("a corrupt middle line is refused").to_string();
    assert!(err.contains("corrupt.jsonl") && err.contains("line 2"), "{err}");
    assert_eq!(std::fs::read_to_string(&o.output).unwrap(), text);

    // Only what an interrupted write leaves is cut: a last line that is not the start of a result line, with or
    // without results before it, is someone's data and is refused, the file untouched.
    // The input file itself copied as the output (its lines have `custom_id`s but are requests, not results).
    let o = opts(&dir, "in.jsonl", "copy.jsonl", 16);
    std::fs::copy(&full.input, &o.output).unwrap();
    let text = std::fs::read_to_string(&o.output).unwrap();
    let err = run_batch(&e, &ctx, &o).expect_err("requests are not results").to_string();
    assert!(err.contains("copy.jsonl") && err.contains("line 1 is not a batch result"), "{err}");
    assert_eq!(std::fs::read_to_string(&o.output).unwrap(), text, "copy.jsonl untouched");
    for (name, text) in [
        ("notes.txt", "my important notes".to_string()),
        (
            "tail.jsonl",
            format!(
                "{}
{}
see above",
                full_lines[0], full_lines[1]
            ),
        ),
    ] {
        let o = opts(&dir, "in.jsonl", name, 16);
        std::fs::write(&o.output, &text).unwrap();
        let err = run_batch(&e, &ctx, &o).expect_err("not a torn write").to_string();
        assert!(err.contains(name) && err.contains("not a torn result line"), "{name}: {err}");
        assert_eq!(std::fs::read_to_string(&o.output).unwrap(), text, "{name} untouched");
    }

    // The input under another name (a hard link) is refused as the output, before anything is read or cut.
    let o = opts(&dir, "in.jsonl", "link.jsonl", 16);
    std::fs::hard_link(&full.input, &o.output).unwrap();
    let before = std::fs::read(&full.input).unwrap();
    let err = run_batch(&e, &ctx, &o).expect_err("the input as the output").to_string();
    assert!(err.contains("is the input file"), "{err}");
    assert_eq!(std::fs::read(&full.input).unwrap(), before);
}

#[test]
fn many_requests_through_a_small_window_keep_input_order() {
    let Some((e, ctx, dir)) = setup("many") else { return };
    let bodies: Vec<Json> = (0..300u64)
        .map(|i| {
            let prompt = if i % 3 == 0 { format!("{SHARED} Entry {i}") } else { format!("Entry {i} of the catalogue") };
            json!({"prompt": prompt, "seed": i, "temperature": 0.7, "max_tokens": 1 + i % 4, "ignore_eos": true})
        })
        .collect();
    let text: String = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "{}\n",
                json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/completions", "body": b})
            )
        })
        .collect();
    std::fs::write(dir.join("in.jsonl"), text).unwrap();
    let o = opts(&dir, "in.jsonl", "out.jsonl", 16);
    let before = e.metrics().snapshot();
    let s = run_batch(&e, &ctx, &o).expect("batch runs");
    let after = e.metrics().snapshot();
    let out = read_lines(&o.output);
    assert_eq!(out.len(), 300);
    // Requests ran together: far fewer engine steps than generated tokens (750 one at a time); the shared prefix
    // came from the prefix cache.
    let steps = after.steps - before.steps;
    assert!(steps * 4 < s.completion_tokens, "{steps} steps for {} tokens", s.completion_tokens);
    assert!(after.sched.kv.hit_tokens > before.sched.kv.hit_tokens);
    assert_eq!(after.sched.running + after.sched.waiting, 0, "nothing left in the engine");
    assert_eq!((s.total, s.skipped, s.succeeded, s.failed), (300, 0, 300, 0));
    let mut completion_tokens = 0;
    for (i, (rec, body)) in out.iter().zip(&bodies).enumerate() {
        assert_eq!(rec["custom_id"], format!("c{i}"), "results in input order");
        assert_eq!(rec["response"]["status_code"], 200);
        let body_out = &rec["response"]["body"];
        assert_eq!(body_out["usage"]["completion_tokens"], 1 + i as u64 % 4, "line {}: {rec}", i + 1);
        completion_tokens += body_out["usage"]["completion_tokens"].as_u64().unwrap();
        if i % 10 == 0 {
            assert_eq!(essence(body_out), essence(&direct(&e, &ctx, Endpoint::Completions, body)), "line {}", i + 1);
        }
    }
    assert_eq!(s.completion_tokens, completion_tokens);
}

#[test]
fn file_errors_name_the_file() {
    let Some((e, ctx, dir)) = setup("files") else { return };
    let o = opts(&dir, "missing.jsonl", "out.jsonl", 4);
    let err = run_batch(&e, &ctx, &o).expect_err("missing input").to_string();
    assert!(err.contains("missing.jsonl"), "{err}");
    assert!(!o.output.exists(), "no output for a missing input");

    std::fs::write(dir.join("in.jsonl"), "{\"custom_id\": \"a\"}\n").unwrap();
    let o = opts(&dir, "in.jsonl", "no-such-dir/out.jsonl", 4);
    let err = run_batch(&e, &ctx, &o).expect_err("missing output directory").to_string();
    assert!(err.contains("no-such-dir"), "{err}");

    let o = opts(&dir, "in.jsonl", "out.jsonl", 0);
    let err = run_batch(&e, &ctx, &o).expect_err("max_in_flight 0").to_string();
    assert!(err.contains("max_in_flight"), "{err}");

    // From inside a tokio runtime: a clear error, not a panic.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let o = opts(&dir, "in.jsonl", "out.jsonl", 4);
    let err = rt.block_on(async { run_batch(&e, &ctx, &o) }).expect_err("inside a runtime").to_string();
    assert!(err.contains("tokio runtime"), "{err}");

    let summary: BatchSummary = run_batch(&e, &ctx, &o).expect("a one-line batch");
    assert_eq!((summary.total, summary.failed), (1, 1));
}
