//! `llama32 bench` sweeps: every --batch × --tensor-parallel combination gives one JSON line.

use std::path::PathBuf;
use std::process::Command;

/// A config.json-only model directory (weights come from --random-weights) whose heads split over 1, 2 and 4 ranks.
fn tiny_config_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llama32-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 1024,
        "tie_word_embeddings": false, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    dir
}

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_llama32")).arg("bench").args(args).output().unwrap()
}

#[test]
fn bench_sweeps_batch_and_tensor_parallel() {
    let dir = tiny_config_dir("sweep");
    let out_file = dir.join("results.jsonl");
    std::fs::write(&out_file, "{\"earlier\": true}\n").unwrap(); // --json-out appends.
    let o = bench(&[
        "--model",
        dir.to_str().unwrap(),
        "--random-weights",
        "--device",
        "cpu",
        "--batch",
        "1,2",
        "--tensor-parallel",
        "1,2",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--block-size",
        "4",
        "--json-out",
        out_file.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> =
        stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let combos: Vec<(u64, u64)> =
        lines.iter().map(|v| (v["tp"].as_u64().unwrap(), v["batch"].as_u64().unwrap())).collect();
    assert_eq!(combos, vec![(1, 1), (1, 2), (2, 1), (2, 2)]);
    for v in &lines {
        for field in ["prefill_tok_per_s", "decode_ms_per_step", "decode_tok_per_s", "output_tok_per_s"] {
            let x = v[field].as_f64().unwrap_or_else(|| panic!("{field} missing in {v}"));
            assert!(x.is_finite() && x > 0.0, "{field} = {x} in {v}");
        }
        assert_eq!(v["prompt_tokens"], 8);
        assert_eq!(v["gen_tokens"], 4);
        assert!(v.get("telemetry").is_none(), "no GPU telemetry on the CPU: {v}");
        // The steady decode timing runs on GPUs only: its fields are there, null, without an error.
        assert_eq!(v["steady_decode_context"], 8 + 4 / 2 + 1, "{v}");
        for field in ["steady_decode_ms_per_step", "steady_decode_tok_per_s", "steady_decode_error"] {
            assert!(v.get(field).is_some_and(serde_json::Value::is_null), "{field} in {v}");
        }
    }
    let file = std::fs::read_to_string(&out_file).unwrap();
    let file_lines: Vec<&str> = file.lines().collect();
    assert_eq!(file_lines.len(), 5, "{file}");
    assert_eq!(file_lines[0], "{\"earlier\": true}");
    assert_eq!(file_lines[1..].join("\n"), stdout.trim_end());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_rejects_bad_lists_and_degrees() {
    let dir = tiny_config_dir("bad");
    let model = dir.to_str().unwrap();
    let err = |extra: &[&str]| {
        let mut args = vec!["--model", model, "--random-weights", "--prompt-tokens", "4", "--gen-tokens", "2"];
        args.extend_from_slice(extra);
        let o = bench(&args);
        assert!(!o.status.success(), "{extra:?} should fail");
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(e.contains("error: ") && !e.contains("panicked"), "{extra:?}: {e}");
        e
    };
    let e = err(&["--batch", "1,x"]);
    assert!(e.contains("--batch") && e.contains("`x`"), "{e}");
    let e = err(&["--batch", "0"]);
    assert!(e.contains("--batch"), "{e}");
    let e = err(&["--tensor-parallel", "1,0"]);
    assert!(e.contains("--tensor-parallel"), "{e}");
    // 3 ranks cannot split 4 heads: refused before anything runs.
    let e = err(&["--tensor-parallel", "1,3"]);
    assert!(e.contains("num_attention_heads"), "{e}");
    // CUDA placement flags are checked before anything loads, on any machine.
    let e = err(&["--device", "cuda", "--tensor-parallel", "1,2", "--devices", "0,x"]);
    assert!(e.contains("--devices: `x` is not a CUDA device"), "{e}");
    let e = err(&["--device", "cuda", "--tensor-parallel", "1,2", "--tp-comm", "gloo"]);
    assert!(e.contains("--tp-comm") && e.contains("`gloo`"), "{e}");
    let e = err(&["--device", "cuda", "--tensor-parallel", "2", "--quantize", "w4a8-g32"]);
    assert!(e.contains("--tensor-parallel 2") && e.contains("does not support w4a8-g32"), "{e}");
    let e = err(&["--tensor-parallel", "1,2", "--profile", "2"]);
    assert!(e.contains("--profile") && e.contains("--tensor-parallel"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_cuda_ranks_without_a_device_fail_clearly() {
    if llama32::ops::cuda::probe().is_ok() {
        eprintln!("skipped: a CUDA device is present (the CUDA ranks are exercised on it)");
        return;
    }
    let dir = tiny_config_dir("nodevice");
    let o = bench(&[
        "--model",
        dir.to_str().unwrap(),
        "--random-weights",
        "--prompt-tokens",
        "4",
        "--gen-tokens",
        "2",
        "--device",
        "cuda",
        "--tensor-parallel",
        "2",
        "--devices",
        "0",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(e.contains("no usable CUDA device for --tensor-parallel 2") && !e.contains("panicked"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_ablate_leaves_out_the_named_calls_and_refuses_unknown_ones() {
    let dir = tiny_config_dir("ablate");
    let args = ["--random-weights", "--device", "cpu", "--batch", "2", "--prompt-tokens", "9", "--gen-tokens", "3"];
    let mut all = vec!["--model", dir.to_str().unwrap(), "--block-size", "4", "--profile", "1"];
    all.extend_from_slice(&args);
    all.extend_from_slice(&["--ablate", " attention, linear o ,attention"]);
    let o = bench(&all);
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["ablate"], serde_json::json!(["attention", "linear o"]), "{v}");
    // The profiled steps ran without them, and with everything else.
    for kind in ["decode", "prefill"] {
        let ops = v["profile"][kind]["ops"].as_array().unwrap_or_else(|| panic!("{kind}: no ops in {v}"));
        let names: Vec<&str> = ops.iter().filter_map(|o| o["op"].as_str()).collect();
        assert!(!names.contains(&"attention") && !names.contains(&"linear o"), "{kind}: {names:?}");
        assert!(names.contains(&"linear down") && names.contains(&"add_rms_norm"), "{kind}: {names:?}");
    }
    let mut bad = vec!["--model", dir.to_str().unwrap(), "--ablate", "attention,begin_step"];
    bad.extend_from_slice(&args);
    let o = bench(&bad);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "begin_step cannot be left out");
    assert!(
        stderr.contains("--ablate") && stderr.contains("\"begin_step\"") && stderr.contains("add_rms_norm"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_profile_times_decode_and_prefill_calls() {
    let dir = tiny_config_dir("profile");
    let args = ["--random-weights", "--device", "cpu", "--batch", "3", "--prompt-tokens", "9", "--gen-tokens", "3"];
    let mut all = vec!["--model", dir.to_str().unwrap(), "--block-size", "4", "--profile", "2"];
    all.extend_from_slice(&args);
    let o = bench(&all);
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let layers = 2;
    for (kind, tokens, seqs) in [("decode", 3, 3), ("prefill", 27, 3)] {
        let p = &v["profile"][kind];
        assert_eq!(
            (p["tokens"].as_u64(), p["seqs"].as_u64(), p["steps"].as_u64()),
            (Some(tokens), Some(seqs), Some(2))
        );
        let ops = p["ops"].as_array().unwrap_or_else(|| panic!("{kind}: no ops in {p}"));
        let find = |name: &str| ops.iter().find(|o| o["op"] == name).unwrap_or_else(|| panic!("{kind}: no {name}"));
        assert_eq!(find("attention")["calls"], layers);
        assert_eq!(find("linear lm_head")["calls"], 1);
        let step = p["step_seconds"].as_f64().unwrap();
        let in_calls: f64 = ops.iter().map(|o| o["seconds"].as_f64().unwrap()).sum();
        assert!(step > 0.0 && in_calls <= step * (1.0 + 1e-9), "{kind}: {p}");
        assert!(stderr.contains(&format!("profile: {kind} step")), "{stderr}");
    }
    assert!(stderr.contains("linear down") && stderr.contains("(between calls)"), "{stderr}");
    assert!(v.get("persistent_decode_phases").is_none() && v.get("persistent_decode_phases_error").is_none(), "{v}");
    // With --persistent-decode on the CPU (no stack there) the profile still runs and the line says why the stack's
    // phases are missing, without failing the run.
    all.push("--persistent-decode");
    let o = bench(&all);
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(v["profile"]["decode"]["ops"].is_array(), "{v}");
    let why = v["persistent_decode_phases_error"].as_str().unwrap_or_default();
    assert!(why.contains("did not take the persistent decode stack"), "{v}");
    std::fs::remove_dir_all(&dir).ok();
}
