//! Helpers shared by the integration tests (each test binary uses a subset).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use half::bf16;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The reference data folder named by `LLAMA32_TEST_DATA`, or None after printing that the test is skipped.
pub fn data_dir() -> Option<PathBuf> {
    match std::env::var_os("LLAMA32_TEST_DATA") {
        Some(d) => Some(PathBuf::from(d)),
        None => {
            eprintln!("skipped: LLAMA32_TEST_DATA not set");
            None
        }
    }
}

/// `tests/golden/<name>`; `LLAMA32_GOLDEN_DIR` overrides the folder (a test binary run away from its source tree,
/// as on the device machine, where `scripts/gpu-suite.sh` sets it).
pub fn golden_dir(name: &str) -> PathBuf {
    std::env::var_os("LLAMA32_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden"))
        .join(name)
}

/// A stream on device 0, or None (after printing that the test is skipped) where CUDA cannot run.
pub fn cuda_stream() -> Option<Arc<CudaStream>> {
    if let Err(e) = llama32::ops::cuda::probe() {
        eprintln!("skipped: no CUDA device ({e})");
        return None;
    }
    let ctx = CudaContext::new(0).expect("CUDA context on device 0");
    Some(ctx.new_stream().expect("a CUDA stream"))
}

/// Standard normal by Box-Muller.
pub fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// A generator for `seed`.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// bf16 values widened to f32.
pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Host to device.
pub fn upload<T: DeviceRepr>(stream: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    stream.clone_htod(v).expect("host to device copy")
}

/// Device to host.
pub fn download<T: DeviceRepr + ValidAsZeroBits + Default + Clone>(
    stream: &Arc<CudaStream>,
    v: &CudaSlice<T>,
) -> Vec<T> {
    stream.clone_dtoh(v).expect("device to host copy")
}

/// A tiny random-weight Llama in a fresh directory, with the real Llama 3 tokenizer and the genuine 3B-Instruct
/// `tokenizer_config.json` (chat template) from `LLAMA32_TEST_DATA`: config.json only, the weights are generated.
/// None (after printing that the test is skipped) without the test data.
pub fn tiny_model_dir(tag: &str) -> Option<PathBuf> {
    let data = data_dir()?;
    let dir = std::env::temp_dir().join(format!("llama32-tiny-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp model dir");
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 256, "rope_type": "llama3"},
        "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 128256
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config.json");
    std::fs::copy(data.join("tokenizer.model"), dir.join("tokenizer.model")).expect("copy tokenizer.model");
    std::fs::copy(data.join("Llama-3.2-3B-Instruct/tokenizer_config.json"), dir.join("tokenizer_config.json"))
        .expect("copy tokenizer_config.json");
    Some(dir)
}

/// The CPU executor [`tiny_engine`] serves: the tiny model in `dir` with random weights (seed 7), unit layer norms
/// and a final norm of 20, and a KV cache of `kv_tokens` tokens in blocks of 16.
pub fn tiny_executor(dir: &Path, kv_tokens: usize) -> llama32::Result<llama32::exec::cpu::CpuExecutor> {
    let cfg = llama32::config::LlamaConfig::from_model_dir(dir)?;
    let mut w = llama32::weights::ModelWeights::random(&cfg, 7)?;
    // Unit layer norms and a final norm of 20 give logits with a standard deviation near 3, so the next-token
    // distribution is peaked like a trained model's: rounding differences between batchings (chunk sizes,
    // recompute after preemption) then cannot flip a sampled token, and "same seed, same text" is testable.
    for l in &mut w.layers {
        l.attn_norm.fill(1.0);
        l.mlp_norm.fill(1.0);
    }
    w.final_norm.fill(20.0);
    llama32::exec::cpu::CpuExecutor::with_capacity(cfg, w, kv_tokens, 16)
}

/// A CPU engine over the tiny model in `dir` (random weights, seed 7) with a KV cache of `kv_tokens` tokens in
/// blocks of 16, and the handlers' context for it (served as `tiny`).
pub fn tiny_engine(
    dir: &Path,
    kv_tokens: usize,
    cfg: llama32::serve::engine::EngineConfig,
) -> (llama32::serve::engine::EngineHandle, llama32::serve::api::ServeContext) {
    use llama32::serve::engine::EngineHandle;
    let d = dir.to_path_buf();
    let make =
        move || -> llama32::Result<Box<dyn llama32::exec::Executor>> { Ok(Box::new(tiny_executor(&d, kv_tokens)?)) };
    let tok = Arc::new(llama32::tokenizer::Tokenizer::from_model_dir(dir).expect("tokenizer"));
    let engine = EngineHandle::start(make, Some(tok.clone()), cfg).expect("engine starts");
    let ctx =
        llama32::serve::context_for(Some(dir), Some(tok), engine.info().clone(), "tiny".into()).expect("serve context");
    (engine, ctx)
}

/// A Llama 3.2 Vision golden case (`tests/golden/mllama-*`, from scripts/make_golden_mllama.py).
pub struct MllamaGolden {
    /// The case directory (an HF checkpoint).
    pub dir: PathBuf,
    /// `reference.json`.
    pub reference: serde_json::Value,
    /// The prompt ids (with `<|image|>` ids).
    pub input_ids: Vec<u32>,
    /// transformers' greedy continuation.
    pub greedy_ids: Vec<u32>,
    /// The image files, named, in prompt order.
    pub images: Vec<(String, Vec<u8>)>,
    /// Real tiles per image.
    pub num_tiles: Vec<usize>,
}

/// Reads the golden case `name`.
pub fn mllama_golden(name: &str) -> MllamaGolden {
    let dir = golden_dir(name);
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    let reference: serde_json::Value = serde_json::from_str(&text).expect("reference.json is JSON");
    let ids = |k: &str| -> Vec<u32> {
        reference[k].as_array().expect("id list").iter().map(|v| v.as_u64().expect("id") as u32).collect()
    };
    let (input_ids, greedy_ids) = (ids("input_ids"), ids("greedy_ids"));
    let list = reference["images"].as_array().expect("images").clone();
    let images = list
        .iter()
        .map(|im| {
            let f = im["file"].as_str().expect("file");
            (f.to_string(), std::fs::read(dir.join(f)).expect("image file"))
        })
        .collect();
    let num_tiles = list.iter().map(|im| im["num_tiles"].as_u64().expect("num_tiles") as usize).collect();
    MllamaGolden { dir, reference, input_ids, greedy_ids, images, num_tiles }
}

/// Every row's logits of `ids` (a sequence whose KV blocks are `table`) run through `ex` as prefill chunks of
/// `chunk` tokens, with the image set `key` and the prompt's cross-attention mask rows (`row` bytes per token).
pub fn chunked_prefill_with_images(
    ex: &mut dyn llama32::exec::Executor,
    ids: &[u32],
    table: &[u32],
    (key, mask, row): (u64, &[u8], usize),
    chunk: usize,
) -> Vec<f32> {
    use llama32::exec::generate::{build_step, LogitsWanted, SeqChunk};
    let mut logits = Vec::new();
    for start in (0..ids.len()).step_by(chunk) {
        let end = (start + chunk).min(ids.len());
        let c = SeqChunk { tokens: &ids[start..end], start_pos: start, block_table: table, logits: LogitsWanted::All };
        let step = build_step(&[c], ex.block_size()).unwrap();
        let im = llama32::vision::exec::SeqImages { key, mask: &mask[start * row..end * row] };
        logits.extend(ex.step_with_images(&step, &[Some(im)]).unwrap().logits);
    }
    logits
}

/// max |got - want| / max |want|; NaN when any difference is NaN, wherever it is (so both `<=` and `>` checks fail
/// on it). `f32::max` returns its other operand when one is NaN, so the NaN has to be kept explicitly.
pub fn max_rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, sticky_nan_max) / scale
}

/// `m.max(d)`, except that a NaN on either side gives NaN: a fold with it keeps a NaN met anywhere.
pub fn sticky_nan_max(m: f32, d: f32) -> f32 {
    if m.is_nan() || d.is_nan() {
        f32::NAN
    } else {
        m.max(d)
    }
}

/// max |got - want| / max |want| with a NaN difference counted as infinite: for worst-case folds with `f32::max`,
/// which would drop a NaN.
pub fn max_rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "logits length");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = got.iter().zip(want).fold(0.0f32, |m, (g, w)| {
        let d = (g - w).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    });
    worst / scale
}

/// Block tables for a text-only sequence (0) and a vision sequence (1) with room for `lens[s]` tokens each; the
/// vision sequence's blocks are allocated first, so the two tables interleave in the pool.
pub fn interleaved_tables(alloc: &mut llama32::kv::BlockAllocator, lens: [usize; 2]) -> [Vec<u32>; 2] {
    let mut tables = [Vec::new(), Vec::new()];
    alloc.ensure(&mut tables[1], lens[1]).unwrap();
    alloc.ensure(&mut tables[0], lens[0]).unwrap();
    tables
}

/// One step of sequences 0 and 1: `tokens[s]` from position `start[s]` over `tables[s]`, with `logits` rows.
pub fn two_seq_step(
    tokens: [&[u32]; 2],
    start: [usize; 2],
    tables: &[Vec<u32>; 2],
    logits: llama32::exec::generate::LogitsWanted,
    block: usize,
) -> llama32::exec::StepInput {
    let chunks = [0, 1].map(|s| llama32::exec::generate::SeqChunk {
        tokens: tokens[s],
        start_pos: start[s],
        block_table: &tables[s],
        logits,
    });
    llama32::exec::generate::build_step(&chunks, block).unwrap()
}

/// A fresh temporary directory (`llama32-{tag}-{pid}`) holding a random Llama 3.2 Vision checkpoint: golden case
/// `golden`'s config (and so its vision encoder) with an 8-query / 2-KV-head text model of `hidden` x `inter`,
/// 4 layers, cross-attention at layers 1 and 3, weights drawn from `seed` (see [`write_random_vision_checkpoint`]).
pub fn random_gqa4_vision_dir(golden: &str, tag: &str, (hidden, inter): (usize, usize), seed: u64) -> PathBuf {
    let text = std::fs::read_to_string(golden_dir(golden).join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    let t = &mut config["text_config"];
    t["num_attention_heads"] = serde_json::json!(8);
    t["num_key_value_heads"] = serde_json::json!(2);
    t["hidden_size"] = serde_json::json!(hidden);
    t["intermediate_size"] = serde_json::json!(inter);
    t["num_hidden_layers"] = serde_json::json!(4);
    t["cross_attention_layers"] = serde_json::json!([1, 3]);
    let dir = std::env::temp_dir().join(format!("llama32-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_random_vision_checkpoint(&dir, &config, seed);
    dir
}

/// Writes `config` as `dir/config.json` and a random f32 checkpoint for it: gates 0.8, norm weights 1 + noise,
/// everything else uniform noise with standard deviation 0.1 (from `seed`, a stream per tensor).
pub fn write_random_vision_checkpoint(dir: &Path, config: &serde_json::Value, seed: u64) {
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    let cfg = llama32::vision::config::MllamaConfig::from_model_dir(dir).unwrap();
    let tensors = llama32::vision::weights::expected_tensors(&cfg);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let noise = llama32::weights::random_values(n, seed, k as u64);
            let is_norm = name.contains("norm") || name.contains("layernorm");
            let vals: Vec<f32> = if name.ends_with("gate") || name.ends_with("gate_attn") || name.ends_with("gate_ffn")
            {
                vec![0.8; n]
            } else if is_norm && name.ends_with(".weight") {
                noise.iter().map(|v| 1.0 + 5.0 * v).collect()
            } else {
                // Std 0.1: logits with a spread like a trained model's, so the comparison measures something.
                noise.iter().map(|v| 5.0 * v).collect()
            };
            (name.clone(), shape.clone(), vals.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    let refs: Vec<(&str, llama32::weights::DType, &[usize], &[u8])> =
        data.iter().map(|(n, s, b)| (n.as_str(), llama32::weights::DType::F32, s.as_slice(), b.as_slice())).collect();
    std::fs::write(dir.join("model.safetensors"), llama32::weights::safetensors::serialize(&refs)).unwrap();
}

/// The exit status of a test the [`Watchdog`] ended (not timeout's 124, which the suite reads as TIME).
pub const WATCHDOG_EXIT: i32 = 125;

/// A GPU test's guard against a kernel that never finishes (a new kernel's barrier protocol, say). Each
/// [`at`](Watchdog::at) names the step about to run and restarts the clock; when no step follows within the stall
/// limit (`LLAMA32_TEST_STALL_S`, default 60 seconds), a thread prints the test and the step that hung and ends
/// the process with [`WATCHDOG_EXIT`]. A test runner's timeout would end it too, but later, and without saying which launch hung.
/// Dropping the guard stops the thread.
pub struct Watchdog {
    state: Arc<WatchState>,
}

struct WatchState {
    step: std::sync::Mutex<(String, std::time::Instant)>,
    done: std::sync::atomic::AtomicBool,
}

impl Watchdog {
    /// Starts the guard for `test`, at step "start".
    pub fn start(test: &str) -> Watchdog {
        let limit = std::env::var("LLAMA32_TEST_STALL_S").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(60);
        let state = Arc::new(WatchState {
            step: std::sync::Mutex::new(("start".to_string(), std::time::Instant::now())),
            done: std::sync::atomic::AtomicBool::new(false),
        });
        let (watched, test) = (state.clone(), test.to_string());
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if watched.done.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let (step, since) = {
                let s = watched.step.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                (s.0.clone(), s.1)
            };
            if since.elapsed().as_secs() >= limit {
                eprintln!("HANG: {test}: no progress for {limit} s after `{step}` (LLAMA32_TEST_STALL_S); ending it");
                // _exit, not exit or abort: exit's handlers (the CUDA runtime's among them) could wait on the hung
                // device, and abort could write a core dump of a process that maps GPU memory.
                // SAFETY: _exit ends the process at once; nothing of this process runs after it.
                unsafe { libc::_exit(WATCHDOG_EXIT) };
            }
        });
        Watchdog { state }
    }

    /// Names the step about to run and restarts the clock.
    pub fn at(&self, step: impl Into<String>) {
        *self.state.step.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) =
            (step.into(), std::time::Instant::now());
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state.done.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs its closure when dropped, also when a test panics: `let _reset = OnDrop(|| set_something(None));` puts a
/// process-wide setting a test changed back for the tests after it.
pub struct OnDrop<F: FnMut()>(pub F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Log-softmax of a logits row, in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// The prompt log-probabilities a request's events carry (`what` names the request in a failure).
pub fn prompt_logprobs_of(
    mut s: llama32::serve::engine::RequestStream,
    what: &str,
) -> Vec<llama32::serve::TokenLogprob> {
    let mut scores = None;
    while let Some(ev) = s.blocking_next() {
        match ev {
            llama32::serve::Event::PromptLogprobs(p) => scores = Some(p),
            llama32::serve::Event::Error(m) => panic!("{what}: {m}"),
            _ => {}
        }
    }
    scores.unwrap_or_else(|| panic!("{what}: no prompt log-probabilities"))
}
