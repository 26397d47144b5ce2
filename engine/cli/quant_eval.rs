//! `llama32 quant-eval`: logit error and greedy agreement of a quantization scheme.
//!
//! The baseline is the model with every weight rounded to bf16 (what a bf16 checkpoint holds), run by the f32 CPU
//! reference. Each scheme quantizes those same bf16 projections ([`ModelWeights::quantize_in_place`]; norms stay
//! bf16, and so do the embedding and `lm_head` unless `--embeddings int8` quantizes them per row too, as Meta's
//! quantized models hold them) and runs on the CPU reference too (W4A16: f32 GEMM over the exact dequantized
//! weights; W4A8: the int8 x int4 kernel). The same deterministic prompt is scored teacher-forced by both, then
//! decoded greedily by both.

use std::time::Instant;

use clap::Args;
use serde_json::{json, Value};

use super::load::{load_cpu_weights_as_stored, resolve_config, tables_int8, Device, Source};
use super::{run_scheduled, ModelArgs};
use crate::config::LlamaConfig;
use crate::exec::cpu::CpuExecutor;
use crate::exec::generate::{score, GenRequest};
use crate::quant::{ActQuant, Scheme};
use crate::sampling::SamplingParams;
use crate::weights::ModelWeights;
use crate::{Error, Result};

/// Arguments of the subcommand.
#[derive(Debug, Args)]
pub struct QuantEvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Scheme to evaluate (repeatable): w4a16-g32, w4a8-g32. Default: both.
    #[arg(long)]
    scheme: Vec<String>,
    /// Prompt length; ids are deterministic: `(7919 * i + 17) mod (vocab - 3) + 1`.
    #[arg(long, default_value_t = 64, value_parser = super::token_count())]
    prompt_tokens: usize,
    /// Greedy tokens decoded after the prompt.
    #[arg(long, default_value_t = 16, value_parser = super::token_count())]
    gen_tokens: usize,
}

/// The deterministic prompt of `quant-eval` for a vocabulary of `vocab` ids (ids in `[1, vocab - 2)`, so never the
/// golden checkpoints' end-of-sequence ids).
pub fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    let m = vocab.saturating_sub(3).max(1);
    (0..n).map(|i| ((i * 7919 + 17) % m + 1) as u32).collect()
}

/// Teacher-forced comparison of logits `[rows, vocab]` against a reference.
#[derive(Clone, Debug, PartialEq)]
pub struct LogitError {
    /// Largest |got - want|.
    pub max_abs_err: f64,
    /// Largest |want|.
    pub max_abs_logit: f64,
    /// Mean over rows of ||got - want||_2 / ||want||_2.
    pub mean_rel_l2: f64,
    /// Largest per-row relative L2 error.
    pub max_rel_l2: f64,
    /// Fraction of rows whose argmax agrees.
    pub top1_agreement: f64,
}

impl LogitError {
    /// Compares `got` with `want`, both `[rows, vocab]` (argmax ties go to the lowest id, as greedy sampling does).
    pub fn of(got: &[f32], want: &[f32], vocab: usize) -> Result<Self> {
        if vocab == 0 || got.len() != want.len() || !got.len().is_multiple_of(vocab) || got.is_empty() {
            return Err(Error::request(format!(
                "logit comparison: {} vs {} values for vocabulary {vocab}",
                got.len(),
                want.len()
            )));
        }
        let (mut max_abs_err, mut max_abs_logit, mut rel_sum, mut max_rel, mut agree) = (0.0f64, 0.0f64, 0.0, 0.0, 0);
        let rows = got.len() / vocab;
        for (g, w) in got.chunks(vocab).zip(want.chunks(vocab)) {
            let (mut d2, mut w2) = (0.0f64, 0.0f64);
            for (&a, &b) in g.iter().zip(w) {
                let d = a as f64 - b as f64;
                max_abs_err = max_abs_err.max(d.abs());
                max_abs_logit = max_abs_logit.max((b as f64).abs());
                d2 += d * d;
                w2 += b as f64 * b as f64;
            }
            let rel = if w2 > 0.0 { (d2 / w2).sqrt() } else { d2.sqrt() };
            rel_sum += rel;
            max_rel = f64::max(max_rel, rel);
            agree += usize::from(argmax(g) == argmax(w));
        }
        Ok(LogitError {
            max_abs_err,
            max_abs_logit,
            mean_rel_l2: rel_sum / rows as f64,
            max_rel_l2: max_rel,
            top1_agreement: agree as f64 / rows as f64,
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "max_abs_err": self.max_abs_err,
            "max_abs_logit": self.max_abs_logit,
            "max_abs_err_over_max_logit": self.max_abs_err / self.max_abs_logit.max(f64::MIN_POSITIVE),
            "mean_rel_l2": self.mean_rel_l2,
            "max_rel_l2": self.max_rel_l2,
            "top1_agreement": self.top1_agreement,
        })
    }
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Agreement of two greedy continuations: `(first divergence index, fraction identical before it, fraction
/// identical overall)`, over the reference's length.
pub fn greedy_agreement(got: &[u32], want: &[u32]) -> (usize, f64, f64) {
    let n = want.len().max(1);
    let first = got.iter().zip(want).take_while(|(a, b)| a == b).count();
    let same = got.iter().zip(want).filter(|(a, b)| a == b).count();
    (first, first as f64 / n as f64, same as f64 / n as f64)
}

struct RunOutput {
    logits: Vec<f32>,
    greedy: Vec<u32>,
    secs: f64,
}

fn run(cfg: &LlamaConfig, weights: ModelWeights, a: &QuantEvalArgs, prompt: &[u32]) -> Result<RunOutput> {
    let t0 = Instant::now();
    let tokens = prompt.len() + a.gen_tokens + 1;
    let mut exec = CpuExecutor::with_capacity(cfg.clone(), weights, tokens, a.model.block_size)?;
    let logits = score(&mut exec, prompt, 512)?;
    let req = GenRequest {
        prompt: prompt.to_vec(),
        params: SamplingParams { max_tokens: a.gen_tokens, ignore_eos: true, ..SamplingParams::greedy() },
    };
    let (mut nodetok, mut notext) = (|_: usize, _: u32| Ok(String::new()), |_: usize, _: &str| {});
    let greedy = if a.gen_tokens == 0 {
        Vec::new()
    } else {
        let mut out = run_scheduled(&mut exec, &[], &[req], 512, &mut nodetok, &mut notext)?;
        out.pop().map(|g| g.ids).unwrap_or_default()
    };
    Ok(RunOutput { logits, greedy, secs: t0.elapsed().as_secs_f64() })
}

/// Runs the subcommand: prints one JSON object.
pub fn cmd_quant_eval(a: QuantEvalArgs) -> Result<()> {
    a.model.check()?;
    if Device::parse(&a.model.device)? != Device::Cpu {
        return Err(Error::request("quant-eval runs on the CPU reference: use --device cpu"));
    }
    if a.model.quantize.is_some() {
        return Err(Error::request("quant-eval: use --scheme (repeatable), not --quantize"));
    }
    if a.prompt_tokens == 0 {
        return Err(Error::request("--prompt-tokens must be positive"));
    }
    let names: Vec<String> =
        if a.scheme.is_empty() { vec!["w4a16-g32".into(), "w4a8-g32".into()] } else { a.scheme.clone() };
    let schemes = names.iter().map(|s| Scheme::parse(s)).collect::<Result<Vec<_>>>()?;
    if let Some((i, s)) = schemes.iter().enumerate().find(|(i, s)| schemes[..*i].contains(s)) {
        return Err(Error::request(format!("--scheme {}: given twice (the second time as item {})", s.name(), i + 1)));
    }
    let (cfg, source) = resolve_config(&a.model)?;
    if let Source::Dir(dir) = &source {
        if super::load::checkpoint_quantization(dir)?.is_some() {
            return Err(Error::request(format!(
                "{}: quant-eval needs an unquantized checkpoint (this one has a quantization_config)",
                dir.display()
            )));
        }
    }
    let total = a.prompt_tokens + a.gen_tokens;
    if total > cfg.max_position_embeddings {
        return Err(Error::request(format!(
            "--prompt-tokens + --gen-tokens = {total} exceeds the model's context of {}",
            cfg.max_position_embeddings
        )));
    }
    let vocab = cfg.vocab_size;
    let prompt = prompt_ids(a.prompt_tokens, vocab);
    // The baseline keeps the tables as stored; --embeddings int8 applies to the quantized runs only.
    let int8_tables = tables_int8(&a.model)?;
    let load = || load_cpu_weights_as_stored(&a.model, &cfg, &source);
    let t_load = Instant::now();
    let stored = run(&cfg, load()?, &a, &prompt)?;
    let load_note = t_load.elapsed().as_secs_f64();
    let mut base_w = load()?;
    base_w.round_to_bf16();
    let base = run(&cfg, base_w, &a, &prompt)?;
    let bf16_err = LogitError::of(&base.logits, &stored.logits, vocab)?;
    let (d, pre, all) = greedy_agreement(&base.greedy, &stored.greedy);
    let mut results = Vec::new();
    let mut logits_of: Vec<(Scheme, Vec<f32>)> = Vec::new();
    for scheme in &schemes {
        let t0 = Instant::now();
        let mut w = load()?;
        w.round_to_bf16();
        w.quantize_in_place(*scheme)?;
        if int8_tables {
            w.quantize_tables_int8()?;
        }
        let quant_secs = t0.elapsed().as_secs_f64();
        let out = run(&cfg, w, &a, &prompt)?;
        let err = LogitError::of(&out.logits, &base.logits, vocab)?;
        let (first, prefix, overall) = greedy_agreement(&out.greedy, &base.greedy);
        results.push(json!({
            "scheme": scheme.name(),
            "embeddings": if int8_tables { "int8" } else { "bf16" },
            "teacher_forced": err.to_json(),
            "greedy": {
                "ids": out.greedy,
                "first_divergence": if first < base.greedy.len() { Some(first) } else { None },
                "agreement_before_first_divergence": prefix,
                "agreement_overall": overall,
            },
            "load_and_quantize_s": quant_secs,
            "run_s": out.secs,
        }));
        logits_of.push((*scheme, out.logits));
    }
    // The activation quantization alone: W4A8 against W4A16 with the same group (same int4 weights).
    let mut act_only = Vec::new();
    for (s8, l8) in logits_of.iter().filter(|(s, _)| s.act == ActQuant::Int8PerToken) {
        if let Some((s16, l16)) = logits_of.iter().find(|(s, _)| s.act == ActQuant::None && s.group == s8.group) {
            act_only.push(json!({
                "scheme": s8.name(), "against": s16.name(),
                "teacher_forced": LogitError::of(l8, l16, vocab)?.to_json(),
            }));
        }
    }
    let report = json!({
        "model": match &source {
            Source::Dir(d) if a.model.random_weights => format!("{} with random weights (seed {})", d.display(),
                a.model.seed()),
            Source::Dir(d) => d.display().to_string(),
            Source::Preset(p) => format!("preset {} with random weights (seed {})", p.name(), a.model.seed()),
        },
        "device": format!("cpu reference ({} threads)", rayon::current_num_threads()),
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "prompt_ids": "(7919 * i + 17) mod (vocab - 3) + 1",
        "baseline": "all weights rounded to bf16, f32 compute on the CPU reference",
        "baseline_greedy_ids": base.greedy,
        "bf16_rounding_vs_stored_weights": {
            "teacher_forced": bf16_err.to_json(),
            "greedy": {
                "first_divergence": if d < stored.greedy.len() { Some(d) } else { None },
                "agreement_before_first_divergence": pre,
                "agreement_overall": all,
            },
        },
        "schemes": results,
        "activation_quantization_alone": act_only,
        "baseline_load_and_run_s": load_note,
    });
    outln!("{report}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_agreement_counts_prefix_and_overall() {
        assert_eq!(greedy_agreement(&[1, 2, 3, 4], &[1, 2, 9, 4]), (2, 0.5, 0.75));
        assert_eq!(greedy_agreement(&[1, 2], &[1, 2]), (2, 1.0, 1.0));
    }

    #[test]
    fn logit_error_measures_rows() {
        let want = [1.0, 3.0, 0.0, 4.0];
        let got = [1.0, 3.0, 1.0, 0.0];
        let e = LogitError::of(&got, &want, 2).expect("same shapes");
        assert_eq!(e.max_abs_err, 4.0);
        assert_eq!(e.max_abs_logit, 4.0);
        assert_eq!(e.top1_agreement, 0.5);
        let rel2 = (17.0f64).sqrt() / 4.0;
        assert!((e.mean_rel_l2 - rel2 / 2.0).abs() < 1e-12);
        assert!(LogitError::of(&got, &want[..2], 2).is_err());
    }

    #[test]
    fn prompt_ids_stay_inside_the_vocabulary() {
        let ids = prompt_ids(500, 320);
        assert!(ids.iter().all(|&i| (1..318).contains(&i)));
        assert_ne!(ids[0], ids[1]);
    }
}
