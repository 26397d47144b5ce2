//! Writing this engine's quantized layout (described in the parent module's doc): [`quantize_checkpoint`] turns
//! a bf16/f16/f32 Hugging Face checkpoint into int4 projections (and optionally int8 tables), shard by shard.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::bf16;
use serde_json::{json, Map, Value};

use super::{pack_nibbles, EmbeddingQuant, QuantizationConfig};
use crate::quant::numerics::{quantize_bf16_rounded, quantize_rows_int8, round_to_bf16};
use crate::quant::Scheme;
use crate::weights::{Checkpoint, DType};
use crate::{Error, Result};

/// Options of [`quantize_checkpoint`].
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    /// How to store embeddings and `lm_head`.
    pub embeddings: EmbeddingQuant,
    /// Overwrite a non-empty output directory.
    pub force: bool,
    /// Start a new safetensors shard once one would exceed this many bytes (default 4 GiB).
    pub max_shard_bytes: u64,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions { embeddings: EmbeddingQuant::Bf16, force: false, max_shard_bytes: 4 << 30 }
    }
}

/// What [`quantize_checkpoint`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuantizeReport {
    /// Projections quantized to int4.
    pub tensors_int4: usize,
    /// Tables (embeddings, `lm_head`) quantized to int8.
    pub tensors_int8: usize,
    /// Tensors copied unchanged.
    pub tensors_copied: usize,
    /// Tensor bytes read.
    pub bytes_in: u64,
    /// Tensor bytes written.
    pub bytes_out: u64,
    /// Safetensors files written.
    pub shards: usize,
    /// Other files copied (tokenizer, chat template, generation and preprocessor configs; `original/tokenizer.model`
    /// too, where the source has one).
    pub files_copied: Vec<String>,
    /// Symbolic links in the source that lead nowhere (a Hugging Face cache with a deleted or partial blob): not
    /// copied.
    pub broken_links: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arch {
    Llama,
    Mllama,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Int4,
    Int8,
    Copy,
}

fn arch_of(root: &Value, path: &Path) -> Result<Arch> {
    let archs: Vec<&str> = root
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let model_type = root.get("model_type").and_then(Value::as_str).unwrap_or("");
    if archs.contains(&"MllamaForConditionalGeneration") || model_type == "mllama" {
        Ok(Arch::Mllama)
    } else if archs.contains(&"LlamaForCausalLM") || model_type == "llama" {
        Ok(Arch::Llama)
    } else {
        Err(Error::config(
            path,
            "architectures",
            format!(
                "{archs:?} (model_type `{model_type}`): only LlamaForCausalLM and MllamaForConditionalGeneration \
                 can be quantized"
            ),
        ))
    }
}

/// The text decoder's layer prefixes (`...layers.`) for an architecture, in every naming the loaders accept.
fn layer_prefixes(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Llama => &["model.layers."],
        Arch::Mllama => &["language_model.model.layers.", "model.language_model.layers."],
    }
}

fn table_names(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Llama => &["model.embed_tokens.weight", "lm_head.weight"],
        Arch::Mllama => &[
            "language_model.model.embed_tokens.weight",
            "model.language_model.embed_tokens.weight",
            "language_model.lm_head.weight",
            "lm_head.weight",
        ],
    }
}

fn role_of(name: &str, arch: Arch, embeddings: EmbeddingQuant) -> Role {
    if table_names(arch).contains(&name) {
        return if embeddings == EmbeddingQuant::Int8 { Role::Int8 } else { Role::Copy };
    }
    for p in layer_prefixes(arch) {
        let Some(rest) = name.strip_prefix(p) else { continue };
        let Some((idx, tail)) = rest.split_once('.') else { continue };
        if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let proj = matches!(
            tail,
            "self_attn.q_proj.weight"
                | "self_attn.k_proj.weight"
                | "self_attn.v_proj.weight"
                | "self_attn.o_proj.weight"
                | "mlp.gate_proj.weight"
                | "mlp.up_proj.weight"
                | "mlp.down_proj.weight"
        );
        let cross = arch == Arch::Mllama
            && matches!(
                tail,
                "cross_attn.q_proj.weight"
                    | "cross_attn.k_proj.weight"
                    | "cross_attn.v_proj.weight"
                    | "cross_attn.o_proj.weight"
            );
        if proj || cross {
            return Role::Int4;
        }
    }
    Role::Copy
}

/// One output tensor: name, dtype, shape, byte length.
struct OutTensor {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    len: usize,
}

/// One source tensor and what it becomes.
struct Plan {
    src: String,
    role: Role,
    outs: Vec<OutTensor>,
    bytes_in: u64,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, "", format!("not valid JSON: {e}")))
}

fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name == "model.safetensors.index.json"
        || name == "config.json"
        || [".bin", ".pt", ".pth", ".gguf", ".ckpt"].iter().any(|e| name.ends_with(e))
        || name.starts_with('.')
}

/// Quantizes the checkpoint in `src` into a new checkpoint directory `out` (see the module doc for the layout):
/// tensor by tensor, so at most one source tensor is held in f32 at a time. Works for `LlamaForCausalLM` (the
/// seven projections of every decoder layer) and `MllamaForConditionalGeneration` (the language model's
/// self-attention, cross-attention and MLP projections; the vision tower and projector are copied). Weights are
/// rounded to bf16 before quantizing. Refuses an already-quantized input and a non-empty `out` without `force`.
/// `progress(done, total)` reports source tensor bytes.
pub fn quantize_checkpoint(
    src: &Path,
    out: &Path,
    scheme: Scheme,
    opts: &QuantizeOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<QuantizeReport> {
    if scheme.group == 0 || !scheme.group.is_multiple_of(2) {
        return Err(Error::request(format!("quantization group {} must be even and positive", scheme.group)));
    }
    let cfg_path = src.join("config.json");
    let mut root = read_json(&cfg_path)?;
    if root.get("quantization_config").is_some() || root.get("compression_config").is_some() {
        return Err(Error::request(format!(
            "{}: the checkpoint is already quantized (config.json has a quantization_config); quantize the \
             original bf16 checkpoint instead",
            src.display()
        )));
    }
    let arch = arch_of(&root, &cfg_path)?;
    let same = match (src.canonicalize(), out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(Error::request(format!("--out {} is the input checkpoint directory", out.display())));
    }
    if out.exists() {
        if !out.is_dir() {
            return Err(Error::request(format!("--out {} exists and is not a directory", out.display())));
        }
        let non_empty = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?.next().is_some();
        if non_empty && !opts.force {
            return Err(Error::request(format!(
                "output directory {} is not empty (pass --force to overwrite it)",
                out.display()
            )));
        }
    }
    let ckpt = Checkpoint::open(src)?;
    if let Some(name) = ckpt.names().find(|n| n.ends_with(".qweight") || n.ends_with(".weight_packed")) {
        return Err(Error::request(format!(
            "{}: tensor `{name}` is already quantized; quantize the original bf16 checkpoint instead",
            src.display()
        )));
    }
    // The source must be the model its config.json describes, as the loaders check it: quantizing a checkpoint
    // they would refuse (a layer more or fewer, a transposed matrix, the wrong vocabulary) would write one they
    // might not.
    match arch {
        Arch::Llama => crate::weights::check_checkpoint(&ckpt, &crate::config::LlamaConfig::from_model_dir(src)?)?,
        Arch::Mllama => {
            let cfg = crate::vision::config::MllamaConfig::from_model_dir(src)?;
            crate::vision::weights::check_mllama_checkpoint(&ckpt, &cfg)?;
        }
    }

    // Plan every output tensor (and so every shard's header) before writing anything.
    let mut plans = Vec::new();
    let mut not_converted: Vec<String> = Vec::new();
    for name in ckpt.names() {
        let (view, path) = ckpt.get(name).ok_or_else(|| Error::weights(src, format!("tensor `{name}` vanished")))?;
        let role = role_of(name, arch, opts.embeddings);
        let prefix = name.strip_suffix(".weight").unwrap_or(name);
        let float = matches!(view.dtype, DType::BF16 | DType::F16 | DType::F32);
        if role != Role::Copy && (!float || view.shape.len() != 2) {
            return Err(Error::weights(
                path,
                format!(
                    "tensor `{name}`: {} {:?}; a quantized weight must be a 2-D BF16/F16/F32 matrix",
                    view.dtype.name(),
                    view.shape
                ),
            ));
        }
        let outs = match role {
            Role::Int4 => {
                let (n, k) = (view.shape[0], view.shape[1]);
                if k % scheme.group != 0 {
                    return Err(Error::weights(
                        path,
                        format!("tensor `{name}`: input size {k} is not a multiple of the group size {}", scheme.group),
                    ));
                }
                vec![
                    OutTensor {
                        name: format!("{prefix}.qweight"),
                        dtype: DType::U8,
                        shape: vec![n, k / 2],
                        len: n * k / 2,
                    },
                    OutTensor {
                        name: format!("{prefix}.scales"),
                        dtype: DType::BF16,
                        shape: vec![n, k / scheme.group],
                        len: n * (k / scheme.group) * 2,
                    },
                ]
            }
            Role::Int8 => {
                let (n, k) = (view.shape[0], view.shape[1]);
                vec![
                    OutTensor {
                        name: format!("{prefix}.qweight_int8"),
                        dtype: DType::I8,
                        shape: vec![n, k],
                        len: n * k,
                    },
                    OutTensor { name: format!("{prefix}.scales"), dtype: DType::BF16, shape: vec![n], len: n * 2 },
                ]
            }
            Role::Copy => {
                if table_names(arch).contains(&name) {
                    not_converted.push(prefix.to_owned());
                }
                vec![OutTensor {
                    name: name.to_owned(),
                    dtype: view.dtype,
                    shape: view.shape.to_vec(),
                    len: view.bytes.len(),
                }]
            }
        };
        plans.push(Plan { src: name.to_owned(), role, outs, bytes_in: view.bytes.len() as u64 });
    }
    if !plans.iter().any(|p| p.role == Role::Int4) {
        return Err(Error::weights(src, "no decoder projection to quantize (unexpected tensor names?)"));
    }
    if arch == Arch::Mllama && plans.iter().any(|p| p.src.contains("vision_model.")) {
        not_converted.push("vision_model".into());
    }
    if arch == Arch::Mllama && plans.iter().any(|p| p.src.contains("multi_modal_projector.")) {
        not_converted.push("multi_modal_projector".into());
    }

    // Assign source tensors to shards, in order.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0u64;
    for (i, p) in plans.iter().enumerate() {
        let len: u64 = p.outs.iter().map(|o| o.len as u64).sum();
        if cur > 0 && cur + len > opts.max_shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        cur += len;
        if let Some(last) = shards.last_mut() {
            last.push(i);
        }
    }
    let nshards = shards.len();
    let shard_name = |i: usize| {
        if nshards == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{nshards:05}.safetensors", i + 1)
        }
    };

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // Stale weights of an earlier run (with --force) would confuse the loader.
    for entry in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
        let entry = entry.map_err(|e| Error::io(out, e))?;
        let fname = entry.file_name().to_string_lossy().into_owned();
        if fname.ends_with(".safetensors") || fname == "model.safetensors.index.json" {
            std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        }
    }

    let qcfg = QuantizationConfig::llama32(scheme, opts.embeddings, not_converted);
    let total: u64 = plans.iter().map(|p| p.bytes_in).sum();
    let mut report = QuantizeReport { shards: nshards, ..Default::default() };
    let mut weight_map = Map::new();
    let mut done = 0u64;
    progress(0, total);
    for (si, members) in shards.iter().enumerate() {
        let fname = shard_name(si);
        let path = out.join(&fname);
        let mut header = Map::new();
        let mut meta = Map::new();
        meta.insert("format".into(), json!("pt"));
        meta.insert("quantization".into(), json!(format!("llama32 {}", scheme.name())));
        header.insert("__metadata__".into(), Value::Object(meta));
        let mut offset = 0usize;
        for &i in members {
            for o in &plans[i].outs {
                header.insert(
                    o.name.clone(),
                    json!({"dtype": o.dtype.name(), "shape": o.shape, "data_offsets": [offset, offset + o.len]}),
                );
                weight_map.insert(o.name.clone(), json!(fname));
                offset += o.len;
            }
        }
        let mut head = serde_json::to_vec(&Value::Object(header))
            .map_err(|e| Error::weights(&path, format!("cannot encode the header: {e}")))?;
        while head.len() % 8 != 0 {
            head.push(b' ');
        }
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 22, file);
        let io = |e| Error::io(&path, e);
        w.write_all(&(head.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&head).map_err(io)?;
        let mut written = 0usize;
        for &i in members {
            let p = &plans[i];
            let (view, vpath) =
                ckpt.get(&p.src).ok_or_else(|| Error::weights(src, format!("tensor `{}` vanished", p.src)))?;
            let chunks: Vec<Vec<u8>> = match p.role {
                Role::Copy => {
                    w.write_all(view.bytes).map_err(io)?;
                    written += view.bytes.len();
                    report.tensors_copied += 1;
                    Vec::new()
                }
                Role::Int4 => {
                    let (n, k) = (view.shape[0], view.shape[1]);
                    let m = quantize_bf16_rounded(view.to_f32(), n, k, scheme.group)
                        .map_err(|e| Error::weights(vpath, format!("tensor `{}`: {e}", p.src)))?;
                    report.tensors_int4 += 1;
                    vec![pack_nibbles(&m.q), bf16_bytes(&m.scales)]
                }
                Role::Int8 => {
                    let (n, k) = (view.shape[0], view.shape[1]);
                    let mut vals = view.to_f32();
                    vals.iter_mut().for_each(|v| *v = round_to_bf16(*v));
                    let (q, s) = quantize_rows_int8(&vals, n, k)
                        .map_err(|e| Error::weights(vpath, format!("tensor `{}`: {e}", p.src)))?;
                    report.tensors_int8 += 1;
                    vec![q.iter().map(|&v| v as u8).collect(), bf16_bytes(&s)]
                }
            };
            for (c, o) in chunks.iter().zip(&p.outs) {
                debug_assert_eq!(c.len(), o.len, "{}", o.name);
                w.write_all(c).map_err(io)?;
                written += c.len();
            }
            done += p.bytes_in;
            progress(done, total);
        }
        if written != offset {
            return Err(Error::weights(&path, format!("wrote {written} tensor bytes, the header promised {offset}")));
        }
        w.flush().map_err(io)?;
        report.bytes_out += written as u64;
    }
    report.bytes_in = total;
    if nshards > 1 {
        let index = json!({"metadata": {"total_size": report.bytes_out}, "weight_map": Value::Object(weight_map)});
        write_json(&out.join("model.safetensors.index.json"), &index)?;
    }
    if let Some(obj) = root.as_object_mut() {
        obj.insert("quantization_config".into(), qcfg.to_json());
    }
    write_json(&out.join("config.json"), &root)?;

    // Every other top-level file, followed through symbolic links (a Hugging Face cache snapshot is all links).
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let fname = entry.file_name().to_string_lossy().into_owned();
        let meta = match std::fs::metadata(entry.path()) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && ft_is_link(&entry) => {
                report.broken_links.push(fname);
                continue;
            }
            Err(e) => return Err(Error::io(entry.path(), e)),
        };
        if !meta.is_file() || is_weight_file(&fname) {
            continue;
        }
        let dst: PathBuf = out.join(&fname);
        std::fs::copy(entry.path(), &dst).map_err(|e| Error::io(&dst, e))?;
        report.files_copied.push(fname);
    }
    // Meta's tiktoken tokenizer where a checkpoint keeps it only under original/ (the rest of that folder is
    // Meta's own copy of the weights, not copied).
    const ORIGINAL_TOKENIZER: &str = "original/tokenizer.model";
    if src.join(ORIGINAL_TOKENIZER).is_file() {
        let dst = out.join(ORIGINAL_TOKENIZER);
        if let Some(dir) = dst.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::copy(src.join(ORIGINAL_TOKENIZER), &dst).map_err(|e| Error::io(&dst, e))?;
        report.files_copied.push(ORIGINAL_TOKENIZER.into());
    }
    report.files_copied.sort();
    Ok(report)
}

/// Whether a directory entry is itself a symbolic link.
fn ft_is_link(entry: &std::fs::DirEntry) -> bool {
    entry.file_type().is_ok_and(|t| t.is_symlink())
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect()
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).map_err(|e| Error::config(path, "", e.to_string()))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        let r = |n| role_of(n, Arch::Mllama, EmbeddingQuant::Bf16);
        assert_eq!(r("language_model.model.layers.3.cross_attn.k_proj.weight"), Role::Int4);
        assert_eq!(r("model.language_model.layers.0.mlp.down_proj.weight"), Role::Int4);
        assert_eq!(r("vision_model.transformer.layers.0.self_attn.q_proj.weight"), Role::Copy);
        assert_eq!(r("language_model.model.layers.3.cross_attn.q_norm.weight"), Role::Copy);
        assert_eq!(role_of("model.layers.1.cross_attn.q_proj.weight", Arch::Llama, EmbeddingQuant::Bf16), Role::Copy);
        assert_eq!(role_of("lm_head.weight", Arch::Llama, EmbeddingQuant::Int8), Role::Int8);
    }
}
