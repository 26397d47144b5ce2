//! `llama32 bench`: times prefill and decode over a sweep of batch sizes and tensor-parallel degrees, one JSON line
//! per run, with NVML telemetry per GPU on CUDA (see [`crate::telemetry`]).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use super::{load, load_model, run_scheduled, serve, Device, ModelArgs};
use crate::exec::generate::{build_step, GenRequest, LogitsWanted, SeqChunk};
use crate::exec::{Executor, StepInput};
use crate::ops::cuda::switch::KernelSwitch;
use crate::sampling::SamplingParams;
use crate::{Error, Result};

/// `llama32 bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128, value_parser = super::token_count())]
    prompt_tokens: usize,
    /// Generated tokens per sequence.
    #[arg(long, default_value_t = 16, value_parser = super::token_count())]
    gen_tokens: usize,
    /// Sequences decoded together; a comma list (e.g. 1,16,64) runs each, printing one JSON line per run.
    #[arg(long, default_value = "1")]
    batch: String,
    /// Tensor-parallel ranks; a comma list (e.g. 1,2,4) runs each with every --batch. On the CPU the ranks are
    /// in-process threads; on CUDA they run on --devices.
    #[arg(long, default_value = "1")]
    tensor_parallel: String,
    /// CUDA devices of the ranks when tp > 1, e.g. 0,1,2,3 or cuda:0,cuda:1 (rank r runs on entry r mod the
    /// count). Default: cuda:K..K+tp-1 for --device cuda:K when that many devices are visible, else cuda:K for all
    /// ranks.
    #[arg(long)]
    devices: Option<String>,
    /// Communicator of CUDA ranks when tp > 1: nccl, host-staged, or auto (nccl when every rank has its own
    /// device, host-staged when ranks share one).
    #[arg(long, default_value = "auto")]
    tp_comm: String,
    /// Append each result line (JSON) to this file as well.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Milliseconds between NVML telemetry samples (CUDA only).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    telemetry_interval_ms: u64,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// After each run, time this many decode steps (batch sequences at the prompt's length, in the shape their
    /// CUDA graph has) and prefill steps (up to 2048 prompt tokens) call by call: a table per step kind on stderr
    /// and a "profile" object in the JSON line. Eager, with an event around each call (see
    /// `engine/model/profile.rs`); 0 (the default) profiles nothing. Text models on the CPU or one GPU. With
    /// `--persistent-decode`, also that many decode steps with the stack's phases timed inside its launch: a
    /// "persistent_decode_phases" object.
    #[arg(long, default_value_t = 0, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=100_000))]
    profile: usize,
    /// Leave out every call under these comma-separated labels (the profile's op names, e.g. "add_rms_norm",
    /// "attention", "linear o" or linear_o), in graphs and eager steps alike: the step time against a run without --ablate is
    /// their marginal cost in the real pipeline. The generated tokens are then meaningless. Text models on the CPU
    /// or one GPU.
    #[arg(long)]
    ablate: Option<String>,
}

/// The largest value of a count list (`--batch`, `--tensor-parallel`).
const MAX_COUNT: usize = 1 << 27;

/// Parses a comma list of positive integers (each at most [`MAX_COUNT`]) for `flag`, naming the bad item (the list
/// syntax of [`super::parse_list`]: an empty item is an error).
fn parse_counts(s: &str, flag: &str) -> Result<Vec<usize>> {
    super::parse_list(s, flag, "positive integer")?
        .into_iter()
        .map(|n| match n as usize {
            // Bounded so that sequences x tokens cannot overflow the KV size computed from them.
            n @ 1..=MAX_COUNT => Ok(n),
            n => Err(Error::request(format!("{flag}: `{n}` is not an integer in 1..={MAX_COUNT}"))),
        })
        .collect()
}

/// Parses `--devices` (`0,1` or `cuda:0,cuda:1`) into CUDA ordinals.
pub(crate) fn parse_devices(s: &str) -> Result<Vec<usize>> {
    let v: Vec<usize> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let n = t.strip_prefix("cuda:").unwrap_or(t);
            n.parse::<usize>()
                .map_err(|_| Error::request(format!("--devices: `{t}` is not a CUDA device (N or cuda:N)")))
        })
        .collect::<Result<_>>()?;
    if v.is_empty() {
        return Err(Error::request("--devices: no devices given"));
    }
    Ok(v)
}

/// One model loaded for a tensor-parallel degree of the bench sweep.
struct BenchModel {
    exec: Box<dyn Executor>,
    device_name: String,
    source_desc: String,
    load_secs: f64,
    /// The CUDA devices the ranks run on (empty on the CPU).
    gpus: Vec<usize>,
}

/// Loads the model of `a` as `tp` ranks with KV room for `kv_tokens` tokens (per rank).
fn bench_model(
    a: &BenchArgs,
    model_args: &ModelArgs,
    tp: usize,
    kv_tokens: usize,
    min_tokens: usize,
) -> Result<BenchModel> {
    let device = Device::parse(&a.model.device)?;
    if tp == 1 {
        let m = load_model(model_args, min_tokens)?;
        let gpus = match device {
            Device::Cuda(o) => vec![o],
            Device::Cpu => Vec::new(),
        };
        return Ok(BenchModel {
            exec: m.exec,
            device_name: m.device_name,
            source_desc: m.source_desc,
            load_secs: m.load_secs,
            gpus,
        });
    }
    if device == Device::Cpu {
        let (_, source) = load::resolve_config(model_args)?;
        let mut desc = source.describe();
        if model_args.random_weights {
            desc.push_str(" with random weights");
        }
        let t0 = Instant::now();
        let exec = serve::tp_cpu_executor(model_args, tp, kv_tokens)?;
        return Ok(BenchModel {
            exec: Box::new(exec),
            device_name: format!("cpu ({} threads)", rayon::current_num_threads()),
            source_desc: desc,
            load_secs: t0.elapsed().as_secs_f64(),
            gpus: Vec::new(),
        });
    }
    let ranks = serve::CudaRanks {
        devices: a.devices.as_deref(),
        comm: &a.tp_comm,
        share_when_short: true,
        kv_tokens: model_args.kv_tokens,
        min_tokens,
    };
    let m = serve::tp_cuda_executor(model_args, tp, &ranks)?;
    Ok(BenchModel {
        exec: Box::new(m.exec),
        device_name: m.device_name,
        source_desc: m.source_desc,
        load_secs: m.load_secs,
        gpus: m.gpus,
    })
}

pub fn cmd_bench(a: BenchArgs) -> Result<()> {
    a.model.check()?;
    let batches = parse_counts(&a.batch, "--batch")?;
    let tps = parse_counts(&a.tensor_parallel, "--tensor-parallel")?;
    if a.prompt_tokens == 0 {
        return Err(Error::request("--prompt-tokens and --batch must be positive"));
    }
    if a.gen_tokens == 0 {
        return Err(Error::request("--gen-tokens must be at least 1"));
    }
    let device = Device::parse(&a.model.device)?;
    // Fail before loading anything on a bad placement flag or when a degree cannot shard the model.
    if let Some(d) = &a.devices {
        if device == Device::Cpu {
            return Err(Error::request("--devices places CUDA ranks: it needs --device cuda[:N]"));
        }
        parse_devices(d)?;
    }
    serve::tp_comm_kind(&a.tp_comm, &[])?;
    if a.profile > 0 && tps.iter().any(|&tp| tp > 1) {
        return Err(Error::request("--profile: profiles one rank only; leave --tensor-parallel at 1"));
    }
    let ablate = crate::model::profile::parse_ablation(a.ablate.as_deref().unwrap_or(""))?;
    if !ablate.is_empty() && tps.iter().any(|&tp| tp > 1) {
        return Err(Error::request("--ablate: text models on one rank only; leave --tensor-parallel at 1"));
    }
    let (cfg, _) = load::resolve_config(&a.model)?;
    for &tp in &tps {
        if tp > 1 {
            crate::tp::TpPlan::new(&cfg, tp)?;
        }
    }
    let total = a.prompt_tokens + a.gen_tokens;
    if total > cfg.max_position_embeddings {
        return Err(Error::request(format!(
            "--prompt-tokens + --gen-tokens ({total}) exceed the model's context length ({})",
            cfg.max_position_embeddings
        )));
    }
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    // The steady decode steps (and a profiled one) put every sequence on whole blocks of its own, up to the prompt's
    // length plus half the generated tokens (at least one).
    let per_seq = total.max(a.prompt_tokens + 1).next_multiple_of(a.model.block_size);
    let need = per_seq.checked_mul(max_batch).ok_or_else(|| Error::request("--batch: too large"))?;
    // A smaller cache would run the batch a few sequences at a time while the line reports it as one batch.
    if let Some(k) = a.model.kv_tokens.filter(|&k| k < need) {
        return Err(Error::request(format!(
            "--kv-tokens {k}: --batch {max_batch} sequences of {total} tokens need {need} (whole blocks of {}); \
             leave --kv-tokens out to size the cache for the run",
            a.model.block_size
        )));
    }
    let kv_tokens = a.model.kv_tokens.unwrap_or(need + 64);
    let model_args = ModelArgs { kv_tokens: Some(kv_tokens), ..a.model.clone() };
    let mut json_out = match &a.json_out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::request(format!("--json-out {}: {e}", p.display())))?,
        ),
        None => None,
    };
    for &tp in &tps {
        let mut m = bench_model(&a, &model_args, tp, kv_tokens, total)?;
        m.exec.set_ablation(ablate.clone())?;
        let telemetry = match device {
            Device::Cuda(_) => {
                let interval = std::time::Duration::from_millis(a.telemetry_interval_ms);
                let t = crate::telemetry::Telemetry::start(&m.gpus, interval);
                if let crate::telemetry::Telemetry::Unavailable(why) = &t {
                    eprintln!("GPU telemetry unavailable: {why}");
                }
                Some(t)
            }
            Device::Cpu => None,
        };
        for &batch in &batches {
            let (out, profile_err) = bench_one(&a, &mut m, (tp, batch), &ablate, telemetry.as_ref())?;
            let line = out.to_string();
            outln!("{line}")?;
            if let (Some(f), Some(p)) = (json_out.as_mut(), &a.json_out) {
                writeln!(f, "{line}").map_err(|e| Error::request(format!("--json-out {}: {e}", p.display())))?;
            }
            // The run's figures are out; a failed profile still fails the command.
            if let Some(e) = profile_err {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Times prefill and decode of `batch` sequences on `m` (`tp` ranks); the result line. With `telemetry`, adds each
/// GPU's window summary over the full run and the energy per generated token. With `--profile`, adds the step
/// profiles, or `profile_error` and the error (returned beside the line, so that the run's figures are not lost).
/// `ablate` is the parsed `--ablate` list the executor was given, reported in the line.
fn bench_one(
    a: &BenchArgs,
    m: &mut BenchModel,
    (tp, batch): (usize, usize),
    ablate: &[&'static str],
    telemetry: Option<&crate::telemetry::Telemetry>,
) -> Result<(serde_json::Value, Option<Error>)> {
    use crate::telemetry::Telemetry;
    let vocab = m.exec.config().vocab_size as u32;
    let reqs: Vec<GenRequest> = (0..batch)
        .map(|b| GenRequest {
            prompt: (0..a.prompt_tokens).map(|i| ((i * 7919 + b * 104729) as u32 % (vocab - 1).max(1)) + 1).collect(),
            params: SamplingParams {
                max_tokens: a.gen_tokens,
                ignore_eos: true,
                temperature: a.temperature,
                top_p: a.top_p,
                seed: Some(b as u64),
                ..SamplingParams::greedy()
            },
        })
        .collect();
    // Prefill alone (one token generated) for the prefill figure, then the full run; decode time is measured inside
    // the full run, from the moment every sequence has its first token to the end (a difference of two separate
    // runs is noise-dominated on small models and can come out negative).
    let prefill_reqs: Vec<GenRequest> = reqs
        .iter()
        .map(|r| GenRequest { prompt: r.prompt.clone(), params: SamplingParams { max_tokens: 1, ..r.params.clone() } })
        .collect();
    let (mut nodetok, mut notext) = (|_: usize, _: u32| Ok(String::new()), |_: usize, _: &str| {});
    // Warm-up (first-call costs: module loading, GEMM heuristics, allocator pools) stays out of the figures.
    let warm: Vec<GenRequest> = reqs
        .iter()
        .map(|r| GenRequest { prompt: r.prompt.clone(), params: SamplingParams { max_tokens: 3, ..r.params.clone() } })
        .collect();
    run_scheduled(m.exec.as_mut(), &[], &warm, 2048, &mut nodetok, &mut notext)?;
    let sampler = match telemetry {
        Some(Telemetry::Sampling(s)) => Some(s),
        _ => None,
    };
    let mark = |fallback: Instant| sampler.map_or(fallback, |s| s.mark());
    let p0 = mark(Instant::now());
    let t0 = Instant::now();
    run_scheduled(m.exec.as_mut(), &[], &prefill_reqs, 2048, &mut nodetok, &mut notext)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let p1 = mark(Instant::now());
    let t1 = Instant::now();
    // Counts each sequence's tokens as they are emitted; notes when the last sequence got its first one.
    let (mut started, mut seen, mut decode_t0) = (0usize, vec![false; batch], None::<Instant>);
    let mut first_tokens = |seq: usize, _: u32| {
        if let Some(s) = seen.get_mut(seq).filter(|s| !**s) {
            *s = true;
            started += 1;
            if started == batch {
                decode_t0 = Some(Instant::now());
            }
        }
        Ok(String::new())
    };
    run_scheduled(m.exec.as_mut(), &[], &reqs, 2048, &mut first_tokens, &mut notext)?;
    let end = Instant::now();
    let full_s = (end - t1).as_secs_f64();
    let decode_s = decode_t0.map_or(0.0, |t| (end - t).as_secs_f64());
    let f1 = mark(Instant::now());
    // The steps after every sequence's first token: none with --gen-tokens 1, where no decode rate is measured.
    let decode_steps = a.gen_tokens.saturating_sub(1) as f64;
    let decode_measured = decode_steps > 0.0 && decode_s > 0.0;
    let cuda = !m.gpus.is_empty();
    // Read before the steady steps below add theirs.
    let stack_steps = m.exec.fused_decode_steps();
    // On GPUs only (null on the CPU, the reference backend, where the extra steps would double a short run); every
    // sequence at context steady_start + 1.
    let steady_start = a.prompt_tokens + a.gen_tokens / 2;
    let steady = (!m.gpus.is_empty()).then(|| steady_decode(m.exec.as_mut(), batch, steady_start));
    let steady_s = steady.as_ref().and_then(|r| r.as_ref().ok()).copied();
    let mut out = serde_json::json!({
        "device": m.device_name,
        "threads": rayon::current_num_threads(),
        "model": m.source_desc,
        "batch": batch, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
        "temperature": a.temperature, "top_p": a.top_p,
        "load_s": m.load_secs,
        "prefill_s": prefill_s,
        "prefill_tok_per_s": (batch * a.prompt_tokens) as f64 / prefill_s,
        "decode_ms_per_step": decode_measured.then(|| decode_s * 1e3 / decode_steps),
        "decode_tok_per_s": decode_measured.then(|| batch as f64 * decode_steps / decode_s),
        "total_s": full_s,
        "output_tok_per_s": (batch * a.gen_tokens) as f64 / full_s,
        "tp": tp,
        "embeddings": a.model.embeddings,
        // The CUDA switches under test: the W4A16 decode kernel (LLAMA32_W4A16_KERNEL), the W4A8 kernel
        // (LLAMA32_W4A8_KERNEL), the large-m W4A16 path, where it starts and its forced K splits (LLAMA32_W4A16_LARGE,
        // LLAMA32_W4A16_LARGE_MIN_M, LLAMA32_W4A16_LARGE_SPLITS; 0 is the heuristic), the prefill attention
        // kernel (LLAMA32_PREFILL_KERNEL), the direct W4A16 kernel's L2 prefetch (LLAMA32_W4A16_PREFETCH), the tiled
        // one's ring depth (LLAMA32_W4A16_TILED_STAGES), the decode split merge (LLAMA32_DECODE_MERGE),
        // programmatic dependent launch (LLAMA32_PDL), the SwiGLU fusion
        // (--no-fused-swiglu), the RoPE fusion (--fused-rope) and the norm fusion (--fused-norm).
        "w4a16_kernel": crate::ops::cuda::quant::W4A16Kernel::setting().ok(),
        "w4a8_kernel": crate::ops::cuda::quant::W4A8Kernel::setting().ok(),
        "w4a16_large": crate::ops::cuda::quant::W4A16LargeKernel::setting().ok(),
        "w4a16_large_min_m": crate::ops::cuda::quant::large_min_m().ok(),
        "w4a16_large_splits": crate::ops::cuda::quant::large_splits_setting().ok(),
        "w4a16_prefetch": crate::ops::cuda::quant::w4a16_l2_prefetch_setting().ok(),
        "w4a16_blocks_per_sm": crate::ops::cuda::quant::w4a16_blocks_per_sm().ok(),
        "w4a16_chunk_mib": crate::ops::cuda::quant::w4a16_chunk_mib().ok(),
        "w4a16_tiled_stages": crate::ops::cuda::quant::w4a16_tiled_stages().ok(),
        "prefill_kernel": crate::ops::cuda::attention::PrefillKernel::setting().ok(),
        "pdl": crate::ops::cuda::programmatic_launch(),
        "gemv_prefetch": if crate::ops::cuda::gemv_prefetch_whole_on() { "whole" } else { "first" },
        "decode_split_positions": crate::ops::cuda::attention::decode_split_positions().ok(),
        "decode_merge": crate::ops::cuda::attention::decode_fused_merge().ok().map(|f| if f { "fused" } else { "kernel" }),
        "decode_stages": crate::ops::cuda::attention::decode_stages().ok(),
        // CUDA switches: null on the CPU, where they change nothing.
        "fused_swiglu": cuda.then_some(!a.model.no_fused_swiglu),
        "fused_rope": cuda.then_some(a.model.fused_rope),
        "fused_norm": cuda.then_some(a.model.fused_norm),
        "persistent_decode": cuda.then_some(a.model.persistent_decode),
        "persistent_decode_steps": stack_steps,
        "ablate": ablate,
    });
    // Added after the object (json! above is at the macro's recursion limit).
    let more_fields = [
        ("steady_decode_context", serde_json::json!(steady_start + 1)),
        ("steady_decode_ms_per_step", serde_json::json!(steady_s.map(|s| s * 1e3))),
        ("steady_decode_tok_per_s", serde_json::json!(steady_s.map(|s| batch as f64 / s.max(1e-12)))),
        (
            "steady_decode_error",
            serde_json::json!(steady.as_ref().and_then(|r| r.as_ref().err()).map(|e| e.to_string())),
        ),
        // The quantized decode kernels' loads before the wait (LLAMA32_QUANT_PREWAIT), beside the switches above.
        ("quant_prewait", serde_json::json!(crate::ops::cuda::quant::quant_prewait().ok())),
    ];
    if let Some(obj) = out.as_object_mut() {
        for (key, value) in more_fields {
            obj.insert(key.into(), value);
        }
    }
    let tele = match telemetry {
        None => None,
        Some(Telemetry::Unavailable(why)) => Some(serde_json::json!({ "unavailable": why })),
        Some(Telemetry::Sampling(s)) => {
            let prefill = s.window(p0, p1);
            let full = s.window(p1, f1);
            s.forget_before(f1);
            // Each window's energy comes only from its own samples, or is null with the reason in "note" (windows
            // shorter than a few sampling intervals or energy counter updates get none).
            let e = crate::telemetry::run_energy(
                &prefill,
                &full,
                batch * a.gen_tokens,
                batch * a.gen_tokens.saturating_sub(1),
            );
            Some(serde_json::json!({
                "interval_ms": a.telemetry_interval_ms,
                "prefill_window_s": p1.saturating_duration_since(p0).as_secs_f64(),
                "window_s": f1.saturating_duration_since(p1).as_secs_f64(),
                "energy_j": e.energy_j,
                "j_per_token": e.j_per_token,
                "prefill_energy_j": e.prefill_energy_j,
                "decode_j_per_token": e.decode_j_per_token,
                "decode_rel_uncertainty": e.decode_rel_uncertainty,
                "window_too_short": e.window_too_short,
                "note": e.note,
                "gpus": full,
                "prefill_gpus": prefill,
            }))
        }
    };
    if let (Some(t), Some(obj)) = (tele, out.as_object_mut()) {
        obj.insert("telemetry".into(), t);
    }
    let mut profile_err = None;
    if a.profile > 0 {
        let profile = profile_steps(m.exec.as_mut(), batch, a.prompt_tokens, a.profile);
        put_result(&mut out, &mut profile_err, "profile", profile);
        // Where this batch's decode steps take the stack (one GPU, up to 8 sequences); elsewhere the line says why
        // not, without failing the run (a sweep's other batches may take it).
        if a.model.persistent_decode && profile_err.is_none() {
            match stack_phases(m.exec.as_mut(), batch, a.prompt_tokens, a.profile) {
                Ok(Some(phases)) => put_result(&mut out, &mut profile_err, "persistent_decode_phases", Ok(phases)),
                Ok(None) => {
                    let why = format!("decode steps of {batch} sequences did not take the persistent decode stack");
                    out["persistent_decode_phases_error"] = why.into();
                }
                Err(e) => put_result(&mut out, &mut profile_err, "persistent_decode_phases", Err(e)),
            }
        }
    }
    Ok((out, profile_err))
}

/// Puts `r` into the JSON object `out` under `key`, or its error's text under `key_error`, and that error into `err`.
fn put_result(out: &mut serde_json::Value, err: &mut Option<Error>, key: &str, r: Result<serde_json::Value>) {
    let (key, value) = match r {
        Ok(v) => (key.to_string(), v),
        Err(e) => {
            let v = serde_json::Value::String(e.to_string());
            *err = Some(e);
            (format!("{key}_error"), v)
        }
    };
    if let Some(obj) = out.as_object_mut() {
        obj.insert(key, value);
    }
}

/// With `--profile` and `--persistent-decode`: `steps` decode steps of `batch` sequences with the stack's phase
/// timing on (each step as a run replays it, from its CUDA graph where it has one), and the last launch's phases
/// as JSON: per kind of phase summed over the layers, the span, the mean and slowest block's work and the grid
/// barrier's release after it.
/// `None` when those steps did not take the stack (more sequences than it takes, or no stack: the CPU).
fn stack_phases(
    exec: &mut dyn Executor,
    batch: usize,
    prompt: usize,
    steps: usize,
) -> Result<Option<serde_json::Value>> {
    match exec.set_fused_decode_timing(true) {
        // No stack to time (the CPU, or the stack off).
        Err(Error::Request(_)) => return Ok(None),
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    let phases = synthetic_step(exec, batch, prompt, 1).and_then(|step| {
        let before = exec.fused_decode_steps();
        for _ in 0..steps.max(1) {
            exec.step(&step)?;
        }
        if exec.fused_decode_steps() == before {
            return Ok(None);
        }
        let phases = exec.fused_decode_phases()?;
        phases
            .map(|p| p.to_json())
            .ok_or_else(|| Error::Backend("persistent decode phases: timing was off".into()))
            .map(Some)
    });
    exec.set_fused_decode_timing(false)?;
    phases
}

/// Decode steps in the steady-decode timing ([`steady_decode`]), after three untimed ones.
const STEADY_DECODE_STEPS: usize = 16;

/// Seconds per decode step of `batch` sequences all at context `start + 1`, every step alike: three untimed steps
/// (they capture the step's CUDA graph where the executor has one), then the mean of [`STEADY_DECODE_STEPS`], each
/// as a run takes it (greedy picks read back). The run's own decode figure is the window from the last sequence's
/// first token to the end: where the prompts take more than one step's token budget, the first sequences are
/// decoding (or done) before the last ones start, so that window holds a falling batch and prefill chunks; this one
/// is the batch alone.
fn steady_decode(exec: &mut dyn Executor, batch: usize, start: usize) -> Result<f64> {
    let step = synthetic_step(exec, batch, start, 1)?;
    for _ in 0..3 {
        exec.step_greedy(&step)?;
    }
    let t0 = Instant::now();
    for _ in 0..STEADY_DECODE_STEPS {
        exec.step_greedy(&step)?;
    }
    Ok(t0.elapsed().as_secs_f64() / STEADY_DECODE_STEPS as f64)
}

/// The most new tokens of the profiled prefill step (the scheduler's default step budget).
const PROFILE_PREFILL_TOKENS: usize = 2048;

/// A step of `seqs` sequences with `new` new tokens each, at positions `start..start + new`, every sequence on
/// its own blocks from block 0 up, asking for each sequence's last logits row. The KV cache holds whatever earlier
/// steps left there, which is all a timing needs.
fn synthetic_step(exec: &dyn Executor, seqs: usize, start: usize, new: usize) -> Result<StepInput> {
    let bs = exec.block_size();
    let per_seq = (start + new).div_ceil(bs);
    if seqs * per_seq > exec.num_blocks() {
        return Err(Error::request(format!(
            "bench: {seqs} sequences of {} tokens need {} KV blocks, the cache has {}",
            start + new,
            seqs * per_seq,
            exec.num_blocks()
        )));
    }
    let vocab = exec.config().vocab_size as u64;
    let tables: Vec<Vec<u32>> = (0..seqs).map(|s| (0..per_seq).map(|j| (s * per_seq + j) as u32).collect()).collect();
    let tokens: Vec<Vec<u32>> = (0..seqs)
        .map(|s| {
            (start..start + new).map(|pos| ((pos as u64 * 7919 + s as u64 * 104729) % (vocab - 1) + 1) as u32).collect()
        })
        .collect();
    let chunks: Vec<SeqChunk<'_>> = tokens
        .iter()
        .zip(&tables)
        .map(|(t, table)| SeqChunk { tokens: t, start_pos: start, block_table: table, logits: LogitsWanted::Last })
        .collect();
    build_step(&chunks, bs)
}

/// Profiles `steps` decode steps of `batch` sequences after `prompt` tokens, and `steps` prefill steps of as many
/// whole prompts as fit in [`PROFILE_PREFILL_TOKENS`] (one prompt cut to that length if it is longer); prints each
/// table to stderr and returns both profiles as JSON.
fn profile_steps(exec: &mut dyn Executor, batch: usize, prompt: usize, steps: usize) -> Result<serde_json::Value> {
    use crate::model::profile::StepProfile;
    let prefill_len = prompt.min(PROFILE_PREFILL_TOKENS);
    let prefill_seqs = batch.min((PROFILE_PREFILL_TOKENS / prefill_len).max(1));
    let kinds = [
        ("decode", synthetic_step(exec, batch, prompt, 1)?),
        ("prefill", synthetic_step(exec, prefill_seqs, 0, prefill_len)?),
    ];
    let mut out = serde_json::Map::new();
    for (kind, step) in kinds {
        // One unrecorded step first: it sizes buffers and sets the device's head start.
        exec.profile_step(&step, &mut StepProfile::default())?;
        let mut p = StepProfile::new(step.num_tokens(), step.num_seqs());
        for _ in 0..steps {
            exec.profile_step(&step, &mut p)?;
        }
        eprint!("profile: {kind} step\n{}", p.table());
        let v = serde_json::to_value(&p).map_err(|e| Error::Backend(format!("profile to JSON: {e}")))?;
        out.insert(kind.into(), v);
    }
    Ok(serde_json::Value::Object(out))
}
