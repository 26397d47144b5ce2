//! The tensor list of a `MllamaForConditionalGeneration` checkpoint and the checks of a checkpoint against it
//! (see the parent module's "Tensor names").

use std::collections::HashSet;

use super::{is_table, text_layer_prefix, MllamaLayout};
use crate::quant::format::{EmbeddingQuant, QuantizationConfig};
use crate::vision::config::MllamaConfig;
use crate::weights::Checkpoint;
use crate::{Error, Result};

/// Every tensor of a `MllamaForConditionalGeneration` checkpoint with its shape, in canonical (original) names.
pub fn expected_tensors(cfg: &MllamaConfig) -> Vec<(String, Vec<usize>)> {
    let v = &cfg.vision;
    let (vh, vi) = (v.hidden_size, v.intermediate_size);
    let (np, tiles, ar_rows) = (v.num_patches(), v.max_num_tiles, v.max_aspect_ratio_id() + 1);
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| out.push((name, shape));

    let pv = "vision_model";
    add(format!("{pv}.patch_embedding.weight"), vec![vh, v.num_channels, v.patch_size, v.patch_size]);
    add(format!("{pv}.class_embedding"), vec![vh]);
    add(format!("{pv}.gated_positional_embedding.embedding"), vec![np, vh]);
    add(format!("{pv}.gated_positional_embedding.gate"), vec![1]);
    add(format!("{pv}.gated_positional_embedding.tile_embedding.weight"), vec![ar_rows, tiles * np * vh]);
    for which in ["pre", "post"] {
        add(format!("{pv}.{which}_tile_positional_embedding.embedding.weight"), vec![ar_rows, tiles * vh]);
        add(format!("{pv}.{which}_tile_positional_embedding.gate"), vec![1]);
    }
    for which in ["pre", "post"] {
        add(format!("{pv}.layernorm_{which}.weight"), vec![vh]);
        add(format!("{pv}.layernorm_{which}.bias"), vec![vh]);
    }
    for (encoder, n, gated) in
        [("transformer", v.num_hidden_layers, false), ("global_transformer", v.num_global_layers, true)]
    {
        for l in 0..n {
            let p = format!("{pv}.{encoder}.layers.{l}");
            for proj in ["q", "k", "v", "o"] {
                add(format!("{p}.self_attn.{proj}_proj.weight"), vec![vh, vh]);
            }
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                add(format!("{p}.{norm}.weight"), vec![vh]);
                add(format!("{p}.{norm}.bias"), vec![vh]);
            }
            add(format!("{p}.mlp.fc1.weight"), vec![vi, vh]);
            add(format!("{p}.mlp.fc1.bias"), vec![vi]);
            add(format!("{p}.mlp.fc2.weight"), vec![vh, vi]);
            add(format!("{p}.mlp.fc2.bias"), vec![vh]);
            if gated {
                add(format!("{p}.gate_attn"), vec![1]);
                add(format!("{p}.gate_ffn"), vec![1]);
            }
        }
    }

    let t = &cfg.text.base;
    let (h, i) = (t.hidden_size, t.intermediate_size);
    add("multi_modal_projector.weight".into(), vec![h, v.vision_output_dim]);
    add("multi_modal_projector.bias".into(), vec![h]);
    add("language_model.model.embed_tokens.weight".into(), vec![cfg.text.embed_rows(), h]);
    for l in 0..t.num_hidden_layers {
        let p = text_layer_prefix(l);
        add(format!("{p}.input_layernorm.weight"), vec![h]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        add(format!("{p}.mlp.gate_proj.weight"), vec![i, h]);
        add(format!("{p}.mlp.up_proj.weight"), vec![i, h]);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, i]);
        let attn = if cfg.text.is_cross_attention_layer(l) {
            add(format!("{p}.cross_attn.q_norm.weight"), vec![t.head_dim]);
            add(format!("{p}.cross_attn.k_norm.weight"), vec![t.head_dim]);
            add(format!("{p}.cross_attn_attn_gate"), vec![1]);
            add(format!("{p}.cross_attn_mlp_gate"), vec![1]);
            "cross_attn"
        } else {
            "self_attn"
        };
        add(format!("{p}.{attn}.q_proj.weight"), vec![t.q_dim(), h]);
        add(format!("{p}.{attn}.k_proj.weight"), vec![t.kv_dim(), h]);
        add(format!("{p}.{attn}.v_proj.weight"), vec![t.kv_dim(), h]);
        add(format!("{p}.{attn}.o_proj.weight"), vec![h, t.q_dim()]);
    }
    add("language_model.model.norm.weight".into(), vec![h]);
    add("language_model.lm_head.weight".into(), vec![t.vocab_size, h]);
    out
}

/// Checks that `ckpt` holds exactly the tensors of `cfg` with the right shapes, in either [`MllamaLayout`], and
/// returns the layout. Every missing, unexpected or misshapen tensor is reported at once, by its name in the file.
pub fn check_mllama_checkpoint(ckpt: &Checkpoint, cfg: &MllamaConfig) -> Result<MllamaLayout> {
    check_tensors(ckpt, cfg, None)
}

/// The stored-name prefix (`... .weight` cut) of a tensor that a quantized checkpoint stores in quantized form:
/// the language model's projections (self-attention, MLP, cross-attention) and, with int8 embeddings, the tables.
fn quantized_prefix<'a>(canonical: &'a str, q: &QuantizationConfig) -> Option<&'a str> {
    let proj = canonical.starts_with("language_model.model.layers.") && canonical.ends_with("_proj.weight");
    let table = q.embeddings == EmbeddingQuant::Int8 && is_table(canonical);
    (proj || table).then(|| canonical.strip_suffix(".weight").unwrap_or(canonical))
}

/// [`check_mllama_checkpoint`], where with a quantization config the quantized tensors are only required to
/// exist under their prefix (their shapes are checked by [`read_linear`](crate::quant::format::read_linear) /
/// [`read_table_int8`](crate::quant::format::read_table_int8) as they are read).
pub(crate) fn check_tensors(
    ckpt: &Checkpoint,
    cfg: &MllamaConfig,
    q: Option<&QuantizationConfig>,
) -> Result<MllamaLayout> {
    let layout = MllamaLayout::detect(ckpt);
    let mut quantized: Vec<String> = Vec::new();
    let expected: Vec<(String, Vec<usize>)> = expected_tensors(cfg)
        .into_iter()
        .filter(|(n, _)| match q.and_then(|q| quantized_prefix(n, q)) {
            Some(prefix) => {
                quantized.push(format!("{}.", layout.tensor_name(prefix)));
                false
            }
            None => true,
        })
        .map(|(n, s)| (layout.tensor_name(&n), s))
        .collect();
    let (mut missing, mut misshapen, mut unexpected) = (Vec::new(), Vec::new(), Vec::new());
    for (name, shape) in &expected {
        match ckpt.get(name) {
            None => missing.push(format!("missing tensor `{name}` (expected shape {shape:?})")),
            Some((view, path)) => misshapen.extend(crate::weights::tensor_mismatch(name, shape, &view, path)),
        }
    }
    let known: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let other = match layout {
        MllamaLayout::Original => MllamaLayout::Transformers5,
        MllamaLayout::Transformers5 => MllamaLayout::Original,
    };
    let other_names: HashSet<String> = expected_tensors(cfg).iter().map(|(n, _)| other.tensor_name(n)).collect();
    let mut in_other_layout = 0;
    for prefix in &quantized {
        if !ckpt.names().any(|n| n.starts_with(prefix.as_str())) {
            missing.push(format!("missing quantized tensors `{prefix}*`"));
        }
    }
    for name in ckpt.names() {
        let is_quantized = quantized.iter().any(|p| name.starts_with(p.as_str()));
        if !known.contains(name) && !is_quantized && !name.ends_with(".rotary_emb.inv_freq") {
            in_other_layout += other_names.contains(name) as usize;
            unexpected.push(format!(
                "unexpected tensor `{name}` (not part of MllamaForConditionalGeneration with this config, {layout:?} layout)"
            ));
        }
    }
    let n = missing.len() + misshapen.len() + unexpected.len();
    if n == 0 {
        return Ok(layout);
    }
    let mut summary = format!(
        "{n} tensor problem(s) ({} missing, {} misshapen, {} unexpected)",
        missing.len(),
        misshapen.len(),
        unexpected.len()
    );
    if in_other_layout > 0 {
        summary +=
            &format!("; {in_other_layout} tensor(s) are named in the {other:?} layout while others use {layout:?}");
    }
    // Show some of each kind, so one long list cannot hide the others.
    let shown: Vec<String> =
        [missing, misshapen, unexpected].into_iter().flat_map(|v| v.into_iter().take(10)).collect();
    let more = if n > shown.len() { format!("\n  ... and {} more", n - shown.len()) } else { String::new() };
    Err(Error::weights(ckpt.dir(), format!("{summary}:\n  {}{more}", shown.join("\n  "))))
}
