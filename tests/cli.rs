//! The command line as outside checks use it: exact flag forms, output formats and error messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

mod common;
use common::data_dir;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llama32"))
}

fn golden(name: &str) -> PathBuf {
    common::golden_dir(name)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn llama32");
    if !out.status.success() {
        panic!("llama32 failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

fn fails_with(cmd: &mut Command, needles: &[&str]) {
    let out = cmd.output().expect("spawn llama32");
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    assert!(!err.contains("panicked"), "panic: {err}");
}

fn reference(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

fn id_list(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn csv(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn logits_writes_npy_matching_transformers() {
    let dir = golden("untied-gqa2-sharded");
    let r = reference(&dir);
    let ids = id_list(&r["prompt_ids"]);
    let out = std::env::temp_dir().join(format!("llama32-cli-logits-{}.npy", std::process::id()));
    run(bin().args(["logits", "--model"]).arg(&dir).args(["--ids", &csv(&ids), "--device", "cpu", "--out"]).arg(&out));
    let got = llama32::npy::read_f32(&out).unwrap();
    let want = llama32::npy::read_f32(&dir.join("logits.npy")).unwrap();
    std::fs::remove_file(&out).ok();
    assert_eq!(got.shape, want.shape);
    let scale = want.data.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = got.data.iter().zip(&want.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1e-4 * scale, "max diff {worst} vs scale {scale}");
}

#[test]
fn generate_json_gives_greedy_ids() {
    let dir = golden("gqa3-f16");
    let r = reference(&dir);
    let out = run(bin().args(["generate", "--model"]).arg(&dir).args([
        "--ids",
        &csv(&id_list(&r["prompt_ids"])),
        "--max-tokens",
        "24",
        "--json",
    ]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(id_list(&v["ids"]), id_list(&r["greedy_ids"]));
    assert_eq!(v["finish_reason"], "length");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let dir = golden("tied-gqa4");
    let gen = |seed: &str| {
        let out = run(bin().args(["generate", "--model"]).arg(&dir).args([
            "--ids",
            "5,6,7",
            "--max-tokens",
            "12",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--json",
        ]));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["ids"].clone()
    };
    assert_eq!(gen("7"), gen("7"));
    assert_ne!(gen("7"), gen("8"));
}

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = golden("tied-gqa4");
    fails_with(
        bin().args(["logits", "--model", "/nonexistent/model", "--ids", "1", "--out", "/tmp/x.npy"]),
        &["/nonexistent/model/config.json"],
    );
    fails_with(
        bin().args(["logits", "--model"]).arg(&dir).args(["--ids", "1,x", "--out", "/tmp/x.npy"]),
        &["--ids", "`x`"],
    );
    fails_with(
        bin().args(["logits", "--model"]).arg(&dir).args(["--ids", "1,512", "--out", "/tmp/x.npy"]),
        &["token id 512", "vocabulary"],
    );
    fails_with(bin().args(["generate", "--model"]).arg(&dir).args(["--ids", "1", "--top-p", "1.5"]), &["top_p"]);
    fails_with(bin().args(["generate", "--model"]).arg(&dir).args(["--prompt", "hi"]), &["tokenizer"]);
    fails_with(bin().args(["generate", "--model"]).arg(&dir).args(["--ids", "1", "--device", "tpu"]), &["--device"]);
    // A prompt that fills the context is refused; max_tokens past the context finishes with "length" there.
    let long: Vec<String> = (0..256).map(|i| (i % 300).to_string()).collect();
    fails_with(bin().args(["generate", "--model"]).arg(&dir).args(["--ids", &long.join(",")]), &["context length"]);
    let out = run(bin().args(["generate", "--json", "--model"]).arg(&dir).args([
        "--ids",
        "1,2",
        "--max-tokens",
        "1000",
        "--ignore-eos",
    ]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["finish_reason"], "length");
    let ctx = serde_json::from_str::<Value>(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
        ["max_position_embeddings"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(v["ids"].as_array().unwrap().len(), ctx - 2);
}

/// A config with sizes no Llama has (a typo, a corrupted file) ends in an error naming the file and field, or the
/// memory it would need, before anything is allocated: it used to make the loader enumerate a billion layers'
/// tensors (no answer in minutes), abort in the allocator, or panic on a capacity overflow.
#[test]
fn absurd_sizes_get_clear_errors_not_aborts() {
    let base: Value =
        serde_json::from_str(&std::fs::read_to_string(golden("tied-gqa4").join("config.json")).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("llama32-cli-absurd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (wide, huge) = (1_048_576, 4_294_967_295u64);
    let cases: [(Value, &[&str]); 5] = [
        (json!({"num_hidden_layers": 1_000_000_000u64}), &["config.json", "num_hidden_layers", "at most 1024"]),
        (json!({"hidden_size": 2_147_483_648u64, "head_dim": 16}), &["config.json", "hidden_size"]),
        (json!({"intermediate_size": huge}), &["config.json", "intermediate_size"]),
        // Every width within bounds, but 3 x 2^20 x 2^10 x 1000 parameters in all.
        (json!({"intermediate_size": wide, "hidden_size": 1024, "num_hidden_layers": 1000}), &["parameters in all"]),
        // Within every bound, but 3 x 2^20 x 2^10 x 100 f32 parameters: 1.2 TiB of host memory.
        (json!({"intermediate_size": wide, "hidden_size": 1024, "num_hidden_layers": 100}), &["GiB of host memory"]),
    ];
    for (over, needles) in cases {
        if needles[0].contains("host memory") && !Path::new("/proc/meminfo").exists() {
            eprintln!("skipped {over}: no /proc/meminfo here, so the host-memory check does not run");
            continue;
        }
        let mut cfg = base.clone();
        for (k, v) in over.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let started = std::time::Instant::now();
        fails_with(
            bin().args(["logits", "--random-weights", "--model"]).arg(&dir).args(["--ids", "1", "--out", "/tmp/x.npy"]),
            needles,
        );
        assert!(started.elapsed().as_secs() < 30, "{over}: took {:?}", started.elapsed());
    }
    let _ = std::fs::remove_dir_all(&dir);
    // A KV cache past the host's memory: `bench --batch 10^8` asked the allocator for 64 GB and aborted.
    if Path::new("/proc/meminfo").exists() {
        let model = golden("tied-gqa4");
        fails_with(
            bin().args(["bench", "--model"]).arg(&model).args(["--batch", "100000000", "--prompt-tokens", "4"]),
            &["KV cache", "GiB of host memory", "--kv-tokens"],
        );
        fails_with(
            bin().args(["generate", "--model"]).arg(&model).args(["--ids", "1", "--kv-tokens", "18446744073709551615"]),
            &["KV cache", "too large"],
        );
    }
    // Token counts are bounded where they are parsed: sums of them wrapped to small numbers that passed the checks
    // after them (a panic in bench, an abort in bench-serve).
    let model = golden("tied-gqa4");
    for (cmd, flag) in [("bench", "--prompt-tokens"), ("bench", "--gen-tokens"), ("generate", "--max-tokens")] {
        let ids: &[&str] = if cmd == "generate" { &["--ids", "1"] } else { &[] };
        fails_with(
            bin().args([cmd, "--random-weights", "--model"]).arg(&model).args(ids).args([flag, "18446744073709551615"]),
            &[flag],
        );
    }
}

/// Flag values that used to be ignored or silently changed are refused before anything loads, naming the flag.
#[test]
fn flags_that_would_be_ignored_or_changed_are_refused() {
    let model = golden("tied-gqa4");
    let m = model.to_str().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["generate", "--model", m, "--ids", "1,,2"], &["--ids", "item 2 of 3 is empty"]),
        (&["generate", "--model", m, "--prompt", "hi", "--system", "be brief"], &["--system", "--chat"]),
        (&["generate", "--model", m, "--ids", "1,2", "--chat"], &["--chat", "--prompt"]),
        (&["logits", "--model", m, "--ids", "1", "--out", "/tmp/never.npy", "--block-size", "0"], &["--block-size 0"]),
        (
            &["logits", "--model", m, "--ids", "1", "--out", "/tmp/never.npy", "--tokenizer", "/nonexistent"],
            &["--tokenizer"],
        ),
        (&["serve", "--model", m, "--kv-tokens", "0"], &["--kv-tokens 0", "one block"]),
        (
            &["batch", "--model", m, "--kv-tokens", "8", "--input", "/x.jsonl", "--output", "/y.jsonl"],
            &["--kv-tokens 8"],
        ),
        (&["info", "--model", m, "--device", "bogus"], &["bogus"]),
        (
            &["logits", "--model", m, "--ids", "1", "--out", "/tmp/never.npy", "--weights-seed", "3"],
            &["--weights-seed 3", "--random-weights"],
        ),
        (&["serve", "--model", m, "--weights-seed", "3"], &["--weights-seed 3"]),
        (&["bench", "--model", m, "--random-weights", "--batch", "1,,2"], &["--batch", "item 2 of 3 is empty"]),
        (&["bench", "--model", m, "--random-weights", "--batch", "0"], &["--batch", "`0` is not an integer in 1..="]),
        (&["bench", "--model", m, "--random-weights", "--tensor-parallel", "x"], &["--tensor-parallel", "`x`"]),
        (&["info", "--model", m, "--gpu-memory-utilization", "nan"], &["--gpu-memory-utilization"]),
        (
            &["bench", "--model", m, "--random-weights", "--prompt-tokens", "300", "--gen-tokens", "4"],
            &["context length (256)"],
        ),
        (
            &["bench", "--model", m, "--random-weights", "--batch", "8", "--kv-tokens", "32", "--prompt-tokens", "4"],
            &["--kv-tokens 32", "--batch 8"],
        ),
        (&["bench", "--model", m, "--random-weights", "--devices", "0"], &["--devices", "--device cuda"]),
        (&["bench", "--model", m, "--random-weights", "--telemetry-interval-ms", "0"], &["--telemetry-interval-ms"]),
        (&["bench-serve", "--model", m, "--clients", "4294967295"], &["--clients", "1..=16384"]),
        (
            &[
                "bench-serve",
                "--url",
                "127.0.0.1:1",
                "--served-model-name",
                "x",
                "--kv-tokens",
                "64",
                "--max-num-seqs",
                "4",
            ],
            &["--url", "--kv-tokens, --max-num-seqs"],
        ),
        (&["bench-serve", "--url", "127.0.0.1:1", "--served-model-name", "x", "--block-size", "32"], &["--block-size"]),
        (&["serve", "--model", m, "--max-body-bytes", "68719476736"], &["--max-body-bytes", "1 GiB"]),
        (&["serve", "--model", m, "--api-key", "has space"], &["--api-key"]),
        (&["bench-serve", "--model", m, "--api-key", "k"], &["--api-key", "--url"]),
        (&["bench-serve", "--model", m, "--extra-body", "[1]"], &["--extra-body", "JSON object"]),
        (&["bench-serve", "--model", m, "--extra-body", "{\"stream\": false}"], &["--extra-body", "`stream` is set"]),
        (&["serve", "--model", m, "--scheduling-policy", "lifo"], &["--scheduling-policy", "fcfs"]),
        (&["plan", "--batch", "0"], &["--batch"]),
        (&["plan", "--model", "1b", "--images", "2"], &["--images", "text model"]),
        (&["plan", "--model", "1b", "--context", "1000000"], &["--context 1000000", "131072"]),
        (&["serve", "--model", m, "--served-model-name", ""], &["--served-model-name"]),
        (&["serve", "--model", m, "--max-num-seqs", "0"], &["--max-num-seqs must be at least 1"]),
        (&["serve", "--model", m, "--max-body-bytes", "0"], &["--max-body-bytes 0"]),
        (&["serve", "--model", m, "--shutdown-timeout", "-1"], &["--shutdown-timeout must be"]),
        (&["quant-eval", "--model", m, "--scheme", "w4a16-g32", "--scheme", "w4a16-g32"], &["given twice"]),
        (&["tokenize", "--model", m, "--tokenizer", "/t.model", "--text", "x"], &["--tokenizer", "cannot be used"]),
        (&["info", "--preset", "90b-vision", "--quantize", "bogus"], &["bogus"]),
        (&["info", "--preset", "90b-vision", "--embeddings", "int4"], &["--embeddings"]),
    ];
    for (args, needles) in cases {
        let started = std::time::Instant::now();
        fails_with(bin().args(*args), needles);
        assert!(started.elapsed().as_secs() < 20, "{args:?} took {:?}", started.elapsed());
    }
    // One generated token measures no decode rate: null, not a rate over an empty window.
    let out = run(bin().args(["bench", "--model", m, "--random-weights", "--prompt-tokens", "4", "--gen-tokens", "1"]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["decode_tok_per_s"].is_null() && v["decode_ms_per_step"].is_null(), "{v}");
    assert!(v["prefill_tok_per_s"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    // The CUDA switches are null on the CPU, where they change nothing.
    assert!(v["fused_rope"].is_null() && v["persistent_decode"].is_null(), "{v}");
    // Vision `info` reports the quantization it is asked for (it used to ignore the flags).
    let out = run(bin().args(["info", "--preset", "90b-vision", "--quantize", "w4a16-g32", "--embeddings", "int8"]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let q = &v["quantization"];
    assert_eq!((q["scheme"].as_str(), q["embeddings"].as_str()), (Some("w4a16-g32"), Some("int8")), "{v}");
    let gb = q["weights_bytes_total"].as_f64().unwrap_or(0.0) / 1e9;
    assert!((45.0..60.0).contains(&gb), "90B in W4A16: {gb} GB");
    // `bench-serve --url` reads a vision checkpoint's vocabulary too (a closed port: every request fails, not the
    // config).
    let vision = golden("mllama-resize");
    let mut cmd = bin();
    cmd.args(["bench-serve", "--url", "127.0.0.1:1", "--served-model-name", "x", "--model"]).arg(&vision);
    cmd.args(["--clients", "1", "--requests-per-client", "1", "--prompt-tokens", "4", "--max-tokens", "2"]);
    fails_with(&mut cmd, &["no request succeeded"]);
    // A port already taken fails before the model loads.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    fails_with(bin().args(["serve", "--model", m, "--port", &port]), &["cannot listen on 127.0.0.1:", "--port"]);
    // `plan` with a batch whose KV does not fit says so in the table.
    let out = run(bin().args(["plan", "--batch", "100000"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("| 8 | 23.77 GB | no (KV) |") && text.contains("does not fit"), "{text}");
}

/// Output to a full or closed stdout is an error naming stdout (it was a panic); a pipe whose reader has gone ends
/// the process quietly. Negative values reach the sampling flags that take them.
#[test]
fn stdout_errors_and_negative_flag_values() {
    let model = golden("tied-gqa4");
    if Path::new("/dev/full").exists() {
        let full = std::fs::File::options().write(true).open("/dev/full").unwrap();
        let out = bin().args(["info", "--random-weights", "--model"]).arg(&model).stdout(full).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("<stdout>") && !err.contains("panicked"), "{err}");
    }
    let out = run(bin().args(["generate", "--random-weights", "--model"]).arg(&model).args([
        "--ids",
        "1,2",
        "--max-tokens",
        "2",
        "--frequency-penalty",
        "-0.5",
        "--presence-penalty",
        "-1",
        "--json",
    ]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ids"].as_array().map(Vec::len), Some(2), "{v}");
}

/// `bench-serve` on a small model: its prompts start with the model's own BOS (a vocabulary of 512 refused the
/// Llama 3 BOS, 128000, so every request failed and the run still exited 0); every request succeeds, and a run in
/// which none succeeds fails, naming the level and the error.
#[test]
fn bench_serve_runs_on_a_small_model_and_fails_when_nothing_succeeds() {
    let model = golden("tied-gqa4");
    let args = ["--requests-per-client", "1", "--prompt-tokens", "4", "--max-tokens", "2"];
    let out = run(bin().args(["bench-serve", "--model"]).arg(&model).args(["--clients", "2"]).args(args));
    let v: Value = serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!((v["ok"].as_u64(), v["errors"].as_u64()), (Some(2), Some(0)), "{v}");
    // The model has no tokenizer: its stream carries token ids, so every request has a first token and each later
    // token an inter-token latency (before, the empty texts left no token to time and TTFT read 0).
    let tokens = v["output_tokens"].as_u64().unwrap();
    assert_eq!(v["ttft_ms"]["count"].as_u64(), Some(2), "{v}");
    assert_eq!(v["itl_ms"]["count"].as_u64(), Some(tokens - 2), "{v}");
    assert!(v["ttft_ms"]["mean"].as_f64().unwrap() > 0.0, "{v}");
    // --extra-body goes into every request (sampled, with logprobs here) and is echoed in the level's line.
    let extra = r#"{"logprobs": 2, "temperature": 1.0, "seed": 3}"#;
    let out = run(bin()
        .args(["bench-serve", "--model"])
        .arg(&model)
        .args(["--clients", "2", "--extra-body", extra])
        .args(args));
    let v: Value = serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!((v["ok"].as_u64(), v["extra_body"]["logprobs"].as_u64()), (Some(2), Some(2)), "{v}");
    // A field the server refuses fails every request, and so the run.
    fails_with(
        bin()
            .args(["bench-serve", "--model"])
            .arg(&model)
            .args(["--clients", "1", "--extra-body", r#"{"top_p": 7}"#])
            .args(args),
        &["no request succeeded at 1 client(s)", "top_p"],
    );
    // A --url whose server answers nothing useful: no request succeeds, and the run fails.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    fails_with(
        bin()
            .args(["bench-serve", "--url", &format!("127.0.0.1:{port}"), "--served-model-name", "x", "--clients", "1"])
            .args(args),
        &["no request succeeded at 1 client(s)"],
    );
}

#[test]
fn multi_node_flags_exist_on_serve_batch_and_bench_serve() {
    for cmd in ["serve", "batch", "bench-serve"] {
        let out = run(bin().args([cmd, "--help"]));
        let help = String::from_utf8_lossy(&out.stdout);
        for flag in ["--nnodes <NNODES>", "--node-rank <NODE_RANK>", "--master-addr <MASTER_ADDR>"] {
            assert!(help.contains(flag), "{cmd} --help lacks {flag}: {help}");
        }
        for flag in ["--master-port <MASTER_PORT>", "--node-timeout <NODE_TIMEOUT>"] {
            assert!(help.contains(flag), "{cmd} --help lacks {flag}: {help}");
        }
        assert!(help.contains("[default: 29500]") && help.contains("[default: 600]"), "{cmd}: {help}");
    }
    // batch needs its files on node 0 (and on a one-node run), not on a follower.
    let dir = golden("tied-gqa4");
    fails_with(bin().args(["batch", "--model"]).arg(&dir).args(["--output", "/tmp/x.jsonl"]), &["--input FILE"]);
    fails_with(bin().args(["batch", "--model"]).arg(&dir).args(["--input", "/tmp/x.jsonl"]), &["--output FILE"]);
    let follower = ["--nnodes", "2", "--node-rank", "1", "--master-addr", "h", "--tensor-parallel", "2"];
    fails_with(bin().args(["batch", "--model"]).arg(&dir).args(follower), &["--nnodes 2", "--device cuda"]);
}

#[test]
fn info_reports_parameters_and_memory() {
    let out = run(bin().args(["info", "--preset", "3b"]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["parameters"], 3_212_749_824u64);
    assert_eq!(v["memory_plan"]["kv_bytes_per_token_bf16"], 2 * 28 * 8 * 128 * 2);
    for (preset, params) in [("11b-vision", 10_670_220_835u64), ("90b-vision", 88_593_355_323)] {
        let v: Value = serde_json::from_slice(&run(bin().args(["info", "--preset", preset])).stdout).unwrap();
        assert_eq!(v["parameters"], params, "{preset}");
    }
    let v: Value = serde_json::from_slice(&run(bin().args(["info", "--preset", "11b-vision"])).stdout).unwrap();
    assert_eq!(v["memory_plan"]["kv_bytes_per_token_bf16"], 2 * 32 * 8 * 128 * 2);
    assert_eq!(v["memory_plan"]["cross_kv_bytes_per_image_bf16"], 2 * 8 * 8 * 128 * 2 * 4 * 1601);
    let out = run(bin().args(["info", "--model"]).arg(golden("mllama-resize")));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["memory_plan"]["checkpoint_bytes"].as_u64().unwrap() > 0);
    let out = run(bin().args(["info", "--model"]).arg(golden("tied-gqa4")));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["memory_plan"]["checkpoint_bytes"].as_u64().unwrap() > 0);
    // The quantization object: none for bf16; the 1B's tied 128256 x 2048 table in bf16 or, with --embeddings
    // int8, one byte per value plus a bf16 scale per row.
    let info = |extra: &[&str]| -> Value {
        serde_json::from_slice(&run(bin().args(["info", "--preset", "1b"]).args(extra)).stdout).unwrap()
    };
    assert!(info(&[])["quantization"].is_null());
    let q = info(&["--quantize", "w4a16-g32"]);
    assert_eq!(q["quantization"]["scheme"], "w4a16-g32");
    assert_eq!(q["quantization"]["embeddings"], "bf16");
    assert_eq!(q["quantization"]["table_bytes"], 128_256u64 * 2048 * 2);
    let i8 = info(&["--quantize", "w4a16-g32", "--embeddings", "int8"]);
    assert_eq!(i8["quantization"]["embeddings"], "int8");
    assert_eq!(i8["quantization"]["table_bytes"], 128_256u64 * 2048 + 128_256 * 2);
    let saved = q["quantization"]["weights_bytes_total"].as_u64().unwrap()
        - i8["quantization"]["weights_bytes_total"].as_u64().unwrap();
    assert_eq!(saved, 128_256 * 2048 - 128_256 * 2);
    let tables_only = info(&["--embeddings", "int8"]);
    assert!(tables_only["quantization"]["scheme"].is_null());
    assert_eq!(tables_only["quantization"]["quantized_projection_bytes"], 0);
    assert_eq!(
        tables_only["quantization"]["weights_bytes_total"].as_u64().unwrap(),
        2 * 1_235_814_400 - 128_256 * 2048 + 128_256 * 2
    );
}

#[test]
fn tokenize_prints_ids() {
    let Some(data) = data_dir() else { return };
    let out = run(bin()
        .args(["tokenize", "--tokenizer"])
        .arg(data.join("tokenizer.model"))
        .args(["--text", "The capital of France is"]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // These ids are also the built-in default prompt of `llama32 generate` (after BOS).
    assert_eq!(id_list(&v["ids"]), vec![791, 6864, 315, 9822, 374]);
    let out = run(bin().args(["tokenize", "--tokenizer"]).arg(data.join("tokenizer.computed.json")).args([
        "--text",
        "<|eot_id|>",
        "--special",
    ]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(id_list(&v["ids"]), vec![128009]);
}

#[test]
fn render_matches_meta_prompt_format() {
    let Some(data) = data_dir() else { return };
    let req = std::env::temp_dir().join(format!("llama32-cli-req-{}.json", std::process::id()));
    std::fs::write(
        &req,
        r#"{"model": "x", "messages": [{"role": "system", "content": "You are a helpful assistant"},
            {"role": "user", "content": "Who are you?"}]}"#,
    )
    .unwrap();
    let out = run(bin()
        .args(["render", "--model"])
        .arg(data.join("Llama-3.2-3B-Instruct"))
        .arg("--request")
        .arg(&req)
        .args(["--date", "26 Jul 2024"]));
    std::fs::remove_file(&req).ok();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\
         Today Date: 26 Jul 2024\n\nYou are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n\
         Who are you?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

/// `POST path` with a JSON body over a fresh connection; returns (status, body).
fn http_post(port: u16, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[test]
fn serve_answers_and_shuts_down_on_sigterm() {
    use std::io::BufRead;
    let Some(dir) = common::tiny_model_dir("cli-serve") else { return };
    let mut child = bin()
        .args([
            "serve",
            "--random-weights",
            "--port",
            "0",
            "--kv-tokens",
            "2048",
            "--shutdown-timeout",
            "10",
            "--model",
        ])
        .arg(&dir)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn llama32 serve");
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let port: u16 = loop {
        let line = lines.next().expect("serve exited before listening").unwrap();
        if let Some(rest) = line.strip_prefix("listening on http://127.0.0.1:") {
            break rest.trim().parse().unwrap();
        }
    };
    let (status, body) = http_post(port, "/v1/completions", r#"{"prompt": "Hello", "max_tokens": 5, "seed": 1}"#);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["model"], dir.file_name().unwrap().to_str().unwrap());
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        v["usage"]["total_tokens"].as_u64().unwrap() as usize - v["usage"]["prompt_tokens"].as_u64().unwrap() as usize
    );
    let (status, body) = http_post(port, "/v1/completions", r#"{"prompt": "Hello", "temperature": -2}"#);
    assert_eq!(status, 400);
    assert!(body.contains("temperature"), "{body}");
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed().as_secs() < 20, "serve did not exit after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
    assert!(status.success(), "exit status {status:?}: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("shutting down")), "{rest:?}");
}

#[test]
fn batch_writes_results_in_input_order_and_resumes() {
    let Some(dir) = common::tiny_model_dir("cli-batch") else { return };
    let input = dir.join("requests.jsonl");
    let output = dir.join("results.jsonl");
    let lines = [
        r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "seed": 1}}"#,
        r#"{"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once", "max_tokens": 3}}"#,
        r#"{"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {}}"#,
        r#"not json"#,
        r#"{"custom_id": "e", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "top_p": 7}}"#,
    ];
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let run_batch = || {
        run(bin()
            .args(["batch", "--random-weights", "--kv-tokens", "2048", "--no-progress", "--model"])
            .arg(&dir)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output))
    };
    let out = run_batch();
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (summary["total"].as_u64(), summary["succeeded"].as_u64(), summary["failed"].as_u64()),
        (Some(5), Some(2), Some(3))
    );
    let text = std::fs::read_to_string(&output).unwrap();
    let rows: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: Vec<&Value> = rows.iter().map(|r| &r["custom_id"]).collect();
    assert_eq!(ids, [&json!("a"), &json!("b"), &json!("c"), &Value::Null, &json!("e")]);
    assert_eq!(rows[0]["response"]["status_code"], 200);
    assert_eq!(rows[0]["response"]["body"]["object"], "chat.completion");
    assert_eq!(rows[1]["response"]["body"]["usage"]["completion_tokens"], 3);
    assert!(rows[2]["error"]["message"].as_str().unwrap().contains("/v1/embeddings"));
    assert_eq!(rows[3]["response"], Value::Null);
    assert_eq!(rows[4]["response"]["status_code"], 400);
    assert!(rows[4]["response"]["body"]["error"]["message"].as_str().unwrap().contains("top_p"));
    // A second run has nothing left to do and leaves the file as it was.
    let again: Value = serde_json::from_slice(&run_batch().stdout).unwrap();
    assert_eq!(again["skipped"], 5);
    assert_eq!(std::fs::read_to_string(&output).unwrap(), text);
}

#[test]
fn vision_logits_and_generate_with_images() {
    let dir = golden("mllama-two-images");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let ids: Vec<String> = reference["input_ids"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
    let ids = ids.join(",");
    let out = std::env::temp_dir().join(format!("llama32-vision-logits-{}.npy", std::process::id()));
    let with_images = |cmd: &mut Command| {
        cmd.arg("--model")
            .arg(&dir)
            .arg("--image")
            .arg(dir.join("image0.png"))
            .arg("--image")
            .arg(dir.join("image1.png"));
    };
    let mut cmd = bin();
    cmd.args(["logits", "--ids", &ids, "--out"]).arg(&out);
    with_images(&mut cmd);
    run(&mut cmd);
    let got = llama32::npy::read_f32(&out).unwrap();
    let want = llama32::npy::read_f32(&dir.join("logits.npy")).unwrap();
    assert_eq!(got.shape, want.shape);
    let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.data.iter().zip(&want.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err <= 1e-4 * scale, "logits differ by {err}");
    let _ = std::fs::remove_file(&out);

    let mut cmd = bin();
    cmd.args(["generate", "--json", "--ignore-eos", "--max-tokens", "12", "--ids", &ids]);
    with_images(&mut cmd);
    let v: Value = serde_json::from_slice(&run(&mut cmd).stdout).unwrap();
    assert_eq!(v["ids"], reference["greedy_ids"]);

    // Wrong uses are named.
    let mut cmd = bin();
    cmd.args(["generate", "--ids", &ids, "--device", "cuda"]);
    with_images(&mut cmd);
    fails_with(&mut cmd, &["runs on the CPU reference"]);
    let mut cmd = bin();
    cmd.args(["logits", "--ids", &ids, "--device", "gpu", "--out", "unused.npy"]);
    with_images(&mut cmd);
    fails_with(&mut cmd, &["--device"]);
    let mut cmd = bin();
    cmd.args(["generate", "--ids", &ids]).arg("--model").arg(&dir).arg("--image").arg(dir.join("image0.png"));
    fails_with(&mut cmd, &["image"]);
    fails_with(
        bin().args(["generate", "--ids", "1", "--image", "x.png", "--model"]).arg(golden("tied-gqa4")),
        &["--image needs a Llama 3.2 Vision model"],
    );
    let mut cmd = bin();
    cmd.args(["logits", "--ids", &ids, "--out", "/tmp/never.npy", "--image", "/nonexistent.png", "--model"]).arg(&dir);
    fails_with(&mut cmd, &["/nonexistent.png"]);
    let mut cmd = bin();
    cmd.args(["generate", "--ids", &ids, "--persistent-decode"]);
    with_images(&mut cmd);
    fails_with(&mut cmd, &["--persistent-decode", "cross-attention"]);
}

/// `--random-weights` for a Llama 3.2 Vision directory that holds only its config: `logits --image` runs the
/// random model (the library's `MllamaModel::random` with the same seed, bit for bit), a different seed changes
/// it, and tensor parallelism refuses it (the ranks read their slices from the checkpoint).
#[test]
fn vision_random_weights_need_only_the_config() {
    let g = golden("mllama-noresize");
    let dir = std::env::temp_dir().join(format!("llama32-vision-random-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(g.join(f), dir.join(f)).unwrap();
    }
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(g.join("reference.json")).unwrap()).unwrap();
    let ids: Vec<u32> = reference["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let ids_arg: Vec<String> = ids.iter().map(u32::to_string).collect();
    let image = g.join("image0.png");
    let logits = |seed: &str, extra: &[&str]| -> Output {
        let out = dir.join(format!("seed{seed}.npy"));
        bin()
            .args(["logits", "--random-weights", "--weights-seed", seed, "--ids", &ids_arg.join(","), "--out"])
            .arg(&out)
            .arg("--model")
            .arg(&dir)
            .arg("--image")
            .arg(&image)
            .args(extra)
            .output()
            .unwrap()
    };
    let read = |seed: &str| llama32::npy::read_f32(&dir.join(format!("seed{seed}.npy"))).unwrap().data;
    let o = logits("7", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = llama32::vision::pipeline::MllamaModel::random(&dir, 7, None).unwrap();
    let enc = m.encode(&[("image0.png".into(), std::fs::read(&image).unwrap())]).unwrap();
    let want = m.logits(&ids, &enc).unwrap();
    let got = read("7");
    assert_eq!(
        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert!(logits("8", &[]).status.success());
    assert_ne!(read("8"), got);
    let o = logits("7", &["--tensor-parallel", "2"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--random-weights"), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `llama32 plan --quantize`: 90B Vision in W4A16 fits one H100 (in bf16 it needs four), with int4 bytes for the
/// projections and the int4 kernels' measured efficiency among the inputs, and with `--embeddings int8` the tables
/// in one byte per value; a bad scheme or embeddings mode is named.
#[test]
fn plan_models_quantized_projections() {
    let plan = |extra: &[&str]| run(bin().args(["plan", "--model", "90b-vision", "--tp", "1", "--json"]).args(extra));
    let v: Value = serde_json::from_slice(&plan(&["--quantize", "w4a16-g32"]).stdout).unwrap();
    assert_eq!(v["quantize"], "w4a16-g32");
    assert_eq!(v["detail"]["fits"], true);
    assert!(v["gpu"]["int4_efficiency"]["source"].as_str().unwrap().contains("measured"));
    let bf16: Value = serde_json::from_slice(&plan(&[]).stdout).unwrap();
    assert_eq!(bf16["detail"]["fits"], false);
    let (q, b) =
        (v["detail"]["weight_bytes_total"].as_f64().unwrap(), bf16["detail"]["weight_bytes_total"].as_f64().unwrap());
    assert!(q < b * 0.35 && q > b * 0.25, "{q} vs {b}");
    let o = bin().args(["plan", "--model", "90b-vision", "--quantize", "w3a16"]).output().unwrap();
    assert!(!o.status.success());
    // Link and latency overrides that would print infinities are refused by flag.
    fails_with(bin().args(["plan", "--model", "1b", "--link-gbps", "0"]), &["--link-gbps", "> 0"]);
    fails_with(
        bin().args(["plan", "--model", "1b", "--collective-latency-us=-1"]),
        &["--collective-latency-us", ">= 0"],
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("w3a16"), "{}", String::from_utf8_lossy(&o.stderr));
    // --embeddings int8: the two 128k x 8192 tables in one byte per value, so more KV fits.
    let i8: Value = serde_json::from_slice(&plan(&["--quantize", "w4a16-g32", "--embeddings", "int8"]).stdout).unwrap();
    assert_eq!(i8["embeddings"], "int8");
    let saved = q - i8["detail"]["weight_bytes_total"].as_f64().unwrap();
    assert!((saved / 1e9 - 2.1).abs() < 0.1, "{saved}");
    assert!(i8["detail"]["kv_capacity_tokens"].as_f64().unwrap() > v["detail"]["kv_capacity_tokens"].as_f64().unwrap());
    let o = bin().args(["plan", "--embeddings", "int4"]).output().unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--embeddings `int4`"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
