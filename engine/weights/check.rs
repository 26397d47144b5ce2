//! Checking a text checkpoint's tensors against its config before any value is read: every missing, unexpected,
//! misshapen or non-float tensor at once, each by name.

use std::collections::HashSet;
use std::path::Path;

use super::{Checkpoint, TensorView};
use crate::config::LlamaConfig;
#[cfg(doc)]
use crate::quant::format::{read_linear, read_table_f32};
use crate::{Error, Result};

/// What is wrong with a found tensor `name` expected at `shape` (read from `path`), if anything: another shape, or
/// an integer type (a dense weight would convert by value). Shared with the Mllama checker.
pub(crate) fn tensor_mismatch(name: &str, shape: &[usize], view: &TensorView<'_>, path: &Path) -> Option<String> {
    let file = path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default();
    if view.shape != shape {
        Some(format!("tensor `{name}` in {file} has shape {:?}, expected {shape:?}", view.shape))
    } else if !view.dtype.is_float() {
        Some(format!("tensor `{name}` in {file} is {}, expected BF16, F16 or F32", view.dtype.name()))
    } else {
        None
    }
}

/// `problems` as one error naming the checkpoint directory (the first 20 listed), or Ok when there are none.
fn report(ckpt: &Checkpoint, problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    let shown: Vec<String> = problems.into_iter().take(20).collect();
    let more = if n > 20 { format!("\n  ... and {} more", n - 20) } else { String::new() };
    Err(Error::weights(ckpt.dir(), format!("{n} tensor problem(s):\n  {}{more}", shown.join("\n  "))))
}

/// The tensors a `LlamaForCausalLM` checkpoint must hold, with their shapes.
pub fn expected_tensors(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![cfg.q_dim(), h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![cfg.kv_dim(), h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![cfg.kv_dim(), h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, cfg.q_dim()]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    out.push(("model.norm.weight".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, h]));
    }
    out
}

/// Checks that the checkpoint holds exactly the expected tensors with the expected shapes.
///
/// Every problem is reported at once: missing tensors, unexpected ones and wrong shapes, each by name.
pub fn check_checkpoint(ckpt: &Checkpoint, cfg: &LlamaConfig) -> Result<()> {
    let expected = expected_tensors(cfg);
    let mut problems = Vec::new();
    for (name, shape) in &expected {
        match ckpt.get(name) {
            None => problems.push(format!("missing tensor `{name}` (expected shape {shape:?})")),
            Some((view, path)) => problems.extend(tensor_mismatch(name, shape, &view, path)),
        }
    }
    let known: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    for name in ckpt.names() {
        let ignorable = name.ends_with(".rotary_emb.inv_freq") || (cfg.tie_word_embeddings && name == "lm_head.weight");
        if !known.contains(name) && !ignorable {
            problems.push(format!("unexpected tensor `{name}` (not part of LlamaForCausalLM with this config)"));
        }
    }
    report(ckpt, problems)
}

/// Checks a quantized checkpoint against the config, all at once: the norms' shapes and dtypes, and that it holds
/// no tensor the model does not read (a layer past `num_hidden_layers`, a dense `weight` left beside a projection's
/// quantized tensors, a stray name), as [`check_checkpoint`] does for a dense one. The projections and tables are
/// checked by [`read_linear`] and [`read_table_f32`] as they are read.
pub fn check_quantized_checkpoint(ckpt: &Checkpoint, cfg: &LlamaConfig) -> Result<()> {
    let mut problems = Vec::new();
    let mut known = HashSet::new();
    for (name, shape) in expected_tensors(cfg) {
        if !name.ends_with("norm.weight") {
            continue;
        }
        match ckpt.get(&name) {
            None => problems.push(format!("missing tensor `{name}` (expected shape {shape:?})")),
            Some((view, path)) => problems.extend(tensor_mismatch(&name, &shape, &view, path)),
        }
        known.insert(name);
    }
    // Projections: `<prefix>.<suffix>` for any suffix of the quantized formats, but not a dense `weight`, and a
    // `bias` only when it is all zeros (GPTQ-for-LLaMa and older AutoGPTQ write such buffers; a non-zero one would
    // be dropped silently). Tables: the bf16 `weight`, or the int8 form's `qweight_int8` and `scales`; a tied
    // model's `lm_head` in any of those forms is ignored, as a dense checkpoint's `lm_head.weight` is. Ignored as
    // other loaders do: rotary caches and the KV-cache scales of checkpoints made for an fp8 cache.
    let mut projections = HashSet::new();
    for l in 0..cfg.num_hidden_layers {
        for x in ["q", "k", "v", "o"] {
            projections.insert(format!("model.layers.{l}.self_attn.{x}_proj"));
        }
        for x in ["gate", "up", "down"] {
            projections.insert(format!("model.layers.{l}.mlp.{x}_proj"));
        }
    }
    let tables = ["model.embed_tokens", "lm_head"];
    let zero_bias =
        |name: &str| ckpt.get(name).is_some_and(|(v, _)| v.dtype.is_float() && v.to_f32().iter().all(|&x| x == 0.0));
    for name in ckpt.names() {
        let (prefix, suffix) = name.rsplit_once('.').unwrap_or(("", name));
        let read = known.contains(name)
            || (projections.contains(prefix) && suffix != "weight" && (suffix != "bias" || zero_bias(name)))
            || (tables.contains(&prefix) && matches!(suffix, "weight" | "qweight_int8" | "scales"))
            || name.contains(".rotary_emb.")
            || (name.starts_with("model.layers.")
                && (name.ends_with(".self_attn.k_scale") || name.ends_with(".self_attn.v_scale")));
        if !read {
            problems.push(format!(
                "unexpected tensor `{name}` (not read by a quantized LlamaForCausalLM with this config)"
            ));
        }
    }
    report(ckpt, problems)
}
