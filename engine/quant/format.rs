//! Quantized checkpoints on disk: this engine's own layout (written by `llama32 quantize`), the
//! `quantization_config` of config.json, and reading a quantized projection back as a [`QuantLinear`].
//!
//! # Layout (`quant_method: "llama32"`)
//! A normal Hugging Face checkpoint directory (config.json, tokenizer and template files, `model.safetensors` or
//! shards with `model.safetensors.index.json`) in which every quantized projection `<prefix>.weight` (`[n, k]`,
//! `out = x @ w^T`) is replaced by two tensors:
//!
//! - `<prefix>.qweight`: `U8 [n, k / 2]`, two int4 values per byte, each stored as `q + 8` in `[0, 15]`; byte `c`
//!   of row `r` holds column `2c` in its low nibble and column `2c + 1` in its high nibble;
//! - `<prefix>.scales`: `BF16 [n, k / group]`, the symmetric per-group scales (zero point 0), so that
//!   `w[r, c] = scales[r, c / group] * q[r, c]`.
//!
//! With `--embeddings int8`, the token embedding and an untied `lm_head` (`<name>.weight`, `[rows, cols]`) become
//! `<name>.qweight_int8` (`I8 [rows, cols]`) and `<name>.scales` (`BF16 [rows]`): `w[r, c] = scales[r] * q[r, c]`.
//! Everything else (norms, the vision tower, the projector) is copied unchanged.
//!
//! config.json gets a `quantization_config` object:
//!
//! ```json
//! {"quant_method": "llama32", "format_version": 1, "scheme": "w4a8-g32", "bits": 4, "group_size": 32,
//!  "weight_mapping": "symmetric", "scale_dtype": "bfloat16",
//!  "activation": "int8-per-token-asymmetric", "embeddings": "bf16",
//!  "modules_not_converted": ["lm_head", "model.embed_tokens"]}
//! ```
//!
//! `activation` is `"none"` for W4A16. The numerics are torchao's 8da4w ([`super::numerics`]). The quantizer
//! rounds every weight to bf16 first (a no-op for bf16 checkpoints; f16/f32 inputs are accepted).
//!
//! [`QuantizationConfig::from_config_json`] also recognizes the Hugging Face int4 formats read by
//! [`super::hf`] (GPTQ, AWQ GEMM, compressed-tensors `pack-quantized`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::bf16;
use serde_json::{json, Map, Value};

use super::numerics::{quantize_matrix, quantize_rows_int8, round_to_bf16};
use super::{hf, ActQuant, QuantLinear, QuantMatrix, Scheme};
use crate::weights::{Checkpoint, DType, TensorView};
use crate::{Error, Result};

/// The `quant_method` of this engine's own format.
pub const QUANT_METHOD: &str = "llama32";

/// How the token embedding and `lm_head` are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EmbeddingQuant {
    /// Unquantized (as in the source checkpoint, normally bf16).
    Bf16,
    /// Symmetric int8 per row with a bf16 scale (Meta's 8-bit per-channel option).
    Int8,
}

impl EmbeddingQuant {
    /// Parses `bf16` or `int8`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(EmbeddingQuant::Bf16),
            "int8" => Ok(EmbeddingQuant::Int8),
            _ => Err(Error::request(format!("unknown embeddings mode `{s}` (expected bf16 or int8)"))),
        }
    }

    /// The name [`parse`](Self::parse) accepts.
    pub fn name(self) -> &'static str {
        match self {
            EmbeddingQuant::Bf16 => "bf16",
            EmbeddingQuant::Int8 => "int8",
        }
    }
}

/// The on-disk format of a quantized checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuantFormat {
    /// This engine's layout (see the module doc).
    Llama32,
    /// GPTQ (AutoGPTQ / GPTQModel): `qweight I32 [k/8, n]`, `qzeros I32 [k/g, n/8]`, `scales F16 [k/g, n]`,
    /// optional `g_idx I32 [k]`.
    Gptq {
        /// `sym`: symmetric quantization (every zero point is 8).
        sym: bool,
        /// `checkpoint_format: "gptq_v2"` (GPTQModel): zero points stored as they are; otherwise (v1) they are
        /// stored minus one, the AutoGPTQ convention.
        v2: bool,
        /// `desc_act`: act-order; accepted only when every `g_idx` is the trivial `c / group`.
        desc_act: bool,
    },
    /// AutoAWQ GEMM: `qweight I32 [k, n/8]` and `qzeros I32 [k/g, n/8]` in AWQ's interleaved nibble order,
    /// `scales F16 [k/g, n]`.
    Awq,
    /// compressed-tensors `pack-quantized`: `weight_packed I32 [n, k/8]`, `weight_scale [n, k/g]`, optional
    /// `weight_zero_point`, `weight_shape`.
    CompressedTensors {
        /// `symmetric` weights (no zero points stored).
        symmetric: bool,
    },
}

impl QuantFormat {
    /// A short name for messages (`llama32`, `gptq`, `awq`, `compressed-tensors`).
    pub fn name(&self) -> &'static str {
        match self {
            QuantFormat::Llama32 => "llama32",
            QuantFormat::Gptq { .. } => "gptq",
            QuantFormat::Awq => "awq",
            QuantFormat::CompressedTensors { .. } => "compressed-tensors",
        }
    }
}

/// A checkpoint's `quantization_config`, as far as loading needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizationConfig {
    /// The tensor layout.
    pub format: QuantFormat,
    /// Group size and activation mode (the Hugging Face formats are weight-only: W4A16).
    pub scheme: Scheme,
    /// How embeddings / `lm_head` are stored (always bf16 for the Hugging Face formats).
    pub embeddings: EmbeddingQuant,
    /// Modules left unquantized, as the config lists them (`modules_not_converted`, `modules_to_not_convert`,
    /// compressed-tensors' `ignore`); informational.
    pub modules_not_converted: Vec<String>,
}

impl std::fmt::Display for QuantizationConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.format.name(), self.scheme.name())?;
        if self.embeddings == EmbeddingQuant::Int8 {
            write!(f, ", int8 embeddings")?;
        }
        Ok(())
    }
}

fn activation_name(act: ActQuant) -> &'static str {
    match act {
        ActQuant::None => "none",
        ActQuant::Int8PerToken => "int8-per-token-asymmetric",
    }
}

impl QuantizationConfig {
    /// This engine's config for `scheme`.
    pub fn llama32(scheme: Scheme, embeddings: EmbeddingQuant, modules_not_converted: Vec<String>) -> Self {
        QuantizationConfig { format: QuantFormat::Llama32, scheme, embeddings, modules_not_converted }
    }

    /// The `quantization_config` object written into config.json (this engine's format only).
    pub fn to_json(&self) -> Value {
        json!({
            "quant_method": QUANT_METHOD,
            "format_version": 1,
            "scheme": self.scheme.name(),
            "bits": 4,
            "group_size": self.scheme.group,
            "weight_mapping": "symmetric",
            "scale_dtype": "bfloat16",
            "activation": activation_name(self.scheme.act),
            "embeddings": self.embeddings.name(),
            "modules_not_converted": self.modules_not_converted,
        })
    }

    /// Reads `quantization_config` from a parsed config.json (`path` is named in errors). `Ok(None)` when the
    /// checkpoint is not quantized; an error for a quantization this engine cannot run (naming the field).
    pub fn from_config_json(root: &Value, path: &Path) -> Result<Option<QuantizationConfig>> {
        let Some(q) = root.get("quantization_config").or_else(|| root.get("compression_config")) else {
            return Ok(None);
        };
        let field =
            if root.get("quantization_config").is_some() { "quantization_config" } else { "compression_config" };
        let err = |sub: &str, msg: String| Error::config(path, format!("{field}.{sub}"), msg);
        let obj = q.as_object().ok_or_else(|| Error::config(path, field, "not an object"))?;
        let method = obj
            .get("quant_method")
            .and_then(Value::as_str)
            .ok_or_else(|| err("quant_method", "missing or not a string".into()))?;
        let names = |keys: &[&str]| -> Vec<String> {
            keys.iter()
                .filter_map(|k| obj.get(*k).and_then(Value::as_array))
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        let int = |keys: &[&str]| -> Option<i64> { keys.iter().find_map(|k| obj.get(*k).and_then(Value::as_i64)) };
        let check_bits = |bits: Option<i64>, key: &str| -> Result<()> {
            match bits {
                Some(4) => Ok(()),
                Some(b) => Err(err(key, format!("{b}-bit weights are not supported (only 4-bit)"))),
                None => Err(err(key, "missing".into())),
            }
        };
        let check_group = |g: Option<i64>, key: &str| -> Result<usize> {
            match g {
                Some(g @ (32 | 128)) => Ok(g as usize),
                Some(g) => Err(err(
                    key,
                    format!("group size {g} is not supported (supported: 32 and 128; -1 means per-channel)"),
                )),
                None => Err(err(key, "missing".into())),
            }
        };
        let w4a16 = |group| Scheme { group, act: ActQuant::None };
        let cfg = match method {
            QUANT_METHOD => {
                check_bits(int(&["bits"]), "bits")?;
                let scheme_s =
                    obj.get("scheme").and_then(Value::as_str).ok_or_else(|| err("scheme", "missing".into()))?;
                let scheme = Scheme::parse(scheme_s).map_err(|e| err("scheme", e.to_string()))?;
                if let Some(g) = int(&["group_size"]) {
                    if g as usize != scheme.group {
                        return Err(err("group_size", format!("{g} disagrees with scheme `{scheme_s}`")));
                    }
                }
                if scheme.group % 2 != 0 || scheme.group < 2 {
                    return Err(err("scheme", format!("group size {} is not supported", scheme.group)));
                }
                if let Some(m) = obj.get("weight_mapping").and_then(Value::as_str) {
                    if m != "symmetric" {
                        return Err(err("weight_mapping", format!("`{m}` is not supported (only symmetric)")));
                    }
                }
                let act = obj.get("activation").and_then(Value::as_str).unwrap_or(activation_name(scheme.act));
                if act != activation_name(scheme.act) {
                    return Err(err("activation", format!("`{act}` disagrees with scheme `{scheme_s}`")));
                }
                let embeddings = match obj.get("embeddings").and_then(Value::as_str) {
                    None => EmbeddingQuant::Bf16,
                    Some(s) => EmbeddingQuant::parse(s).map_err(|e| err("embeddings", e.to_string()))?,
                };
                QuantizationConfig::llama32(scheme, embeddings, names(&["modules_not_converted"]))
            }
            "gptq" => {
                check_bits(int(&["bits"]), "bits")?;
                let group = check_group(int(&["group_size"]), "group_size")?;
                let fmt = obj
                    .get("checkpoint_format")
                    .or_else(|| obj.get("meta").and_then(|m| m.get("checkpoint_format")))
                    .and_then(Value::as_str)
                    .unwrap_or("gptq");
                let v2 = match fmt {
                    "gptq" => false,
                    "gptq_v2" => true,
                    other => {
                        return Err(err(
                            "checkpoint_format",
                            format!("`{other}` is not supported (supported: gptq, gptq_v2)"),
                        ))
                    }
                };
                let flag = |k: &str, default: bool| obj.get(k).and_then(Value::as_bool).unwrap_or(default);
                QuantizationConfig {
                    format: QuantFormat::Gptq { sym: flag("sym", true), v2, desc_act: flag("desc_act", false) },
                    scheme: w4a16(group),
                    embeddings: EmbeddingQuant::Bf16,
                    modules_not_converted: names(&["modules_not_converted", "modules_to_not_convert"]),
                }
            }
            "awq" => {
                check_bits(int(&["bits", "w_bit"]), "bits")?;
                let group = check_group(int(&["group_size", "q_group_size"]), "group_size")?;
                let version = obj.get("version").and_then(Value::as_str).unwrap_or("gemm");
                if !version.eq_ignore_ascii_case("gemm") {
                    return Err(err("version", format!("AWQ `{version}` layout is not supported (only GEMM)")));
                }
                if obj.get("zero_point").and_then(Value::as_bool) == Some(false) {
                    return Err(err("zero_point", "AWQ without zero points is not supported".into()));
                }
                QuantizationConfig {
                    format: QuantFormat::Awq,
                    scheme: w4a16(group),
                    embeddings: EmbeddingQuant::Bf16,
                    modules_not_converted: names(&["modules_to_not_convert", "modules_not_converted"]),
                }
            }
            "compressed-tensors" => Self::compressed_tensors(obj, &err, &names(&["ignore"]))?,
            other => {
                return Err(err(
                    "quant_method",
                    format!("`{other}` is not supported (supported: llama32, gptq, awq, compressed-tensors)"),
                ))
            }
        };
        Ok(Some(cfg))
    }

    fn compressed_tensors(
        obj: &Map<String, Value>,
        err: &dyn Fn(&str, String) -> Error,
        ignore: &[String],
    ) -> Result<QuantizationConfig> {
        let top_format = obj.get("format").and_then(Value::as_str);
        let groups = obj
            .get("config_groups")
            .and_then(Value::as_object)
            .filter(|g| !g.is_empty())
            .ok_or_else(|| err("config_groups", "missing or empty".into()))?;
        let mut found: Option<(usize, bool)> = None;
        for (gname, g) in groups {
            let sub = |k: &str| format!("config_groups.{gname}.{k}");
            let format = g.get("format").and_then(Value::as_str).or(top_format).unwrap_or("");
            if format != "pack-quantized" {
                return Err(err(
                    &sub("format"),
                    format!("compressed-tensors format `{format}` is not supported (only pack-quantized)"),
                ));
            }
            let w = g.get("weights").ok_or_else(|| err(&sub("weights"), "missing".into()))?;
            let get = |k: &str| w.get(k);
            match get("num_bits").and_then(Value::as_i64) {
                Some(4) => {}
                other => return Err(err(&sub("weights.num_bits"), format!("{other:?}: only 4-bit is supported"))),
            }
            let ty = get("type").and_then(Value::as_str).unwrap_or("int");
            if ty != "int" {
                return Err(err(&sub("weights.type"), format!("`{ty}` is not supported (only int)")));
            }
            let strategy = get("strategy").and_then(Value::as_str).unwrap_or("");
            if strategy != "group" {
                return Err(err(&sub("weights.strategy"), format!("`{strategy}` is not supported (only group)")));
            }
            let group = match get("group_size").and_then(Value::as_i64) {
                Some(g @ (32 | 128)) => g as usize,
                other => {
                    return Err(err(&sub("weights.group_size"), format!("{other:?} is not supported (32 or 128)")))
                }
            };
            match get("actorder") {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) if s == "weight" => {}
                Some(v) => {
                    return Err(err(
                        &sub("weights.actorder"),
                        format!("{v} is not supported (group act-order needs a g_idx permutation)"),
                    ))
                }
            }
            if get("dynamic").and_then(Value::as_bool) == Some(true) {
                return Err(err(&sub("weights.dynamic"), "dynamic weight quantization is not supported".into()));
            }
            if let Some(a) = g.get("input_activations").filter(|a| !a.is_null()) {
                return Err(err(
                    &sub("input_activations"),
                    format!("quantized input activations ({a}) are not supported (only weight-only int4)"),
                ));
            }
            let symmetric = get("symmetric").and_then(Value::as_bool).unwrap_or(true);
            if let Some(prev) = found {
                if prev != (group, symmetric) {
                    return Err(err("config_groups", "groups with different weight settings are not supported".into()));
                }
            }
            found = Some((group, symmetric));
        }
        let (group, symmetric) = found.ok_or_else(|| err("config_groups", "empty".into()))?;
        Ok(QuantizationConfig {
            format: QuantFormat::CompressedTensors { symmetric },
            scheme: Scheme { group, act: ActQuant::None },
            embeddings: EmbeddingQuant::Bf16,
            modules_not_converted: ignore.to_vec(),
        })
    }
}

/// A tensor of `ckpt`, checked for dtype and shape; errors name the tensor, the file and what was expected.
pub(crate) fn tensor<'a>(
    ckpt: &'a Checkpoint,
    name: &str,
    dtypes: &[DType],
    shape: &[usize],
    why: &str,
) -> Result<(TensorView<'a>, &'a Path)> {
    let (view, path) =
        ckpt.get(name).ok_or_else(|| Error::weights(ckpt.dir(), format!("missing tensor `{name}` ({why})")))?;
    if !dtypes.contains(&view.dtype) {
        let want: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
        return Err(Error::weights(
            path,
            format!("tensor `{name}`: dtype {}, expected {} ({why})", view.dtype.name(), want.join(" or ")),
        ));
    }
    if view.shape != shape {
        return Err(Error::weights(
            path,
            format!("tensor `{name}`: shape {:?}, expected {shape:?} ({why})", view.shape),
        ));
    }
    Ok((view, path))
}

/// Reads the quantized projection `prefix` (e.g. `model.layers.0.self_attn.q_proj`; a trailing `.weight` is
/// ignored) of an `[n, k]` weight from a checkpoint in any format [`QuantizationConfig`] recognizes.
pub fn read_linear(
    ckpt: &Checkpoint,
    prefix: &str,
    qcfg: &QuantizationConfig,
    n: usize,
    k: usize,
) -> Result<QuantLinear> {
    let prefix = prefix.strip_suffix(".weight").unwrap_or(prefix);
    let group = qcfg.scheme.group;
    if group == 0 || k % group != 0 {
        return Err(Error::weights(
            ckpt.dir(),
            format!("`{prefix}`: input size {k} is not a multiple of the quantization group {group}"),
        ));
    }
    let matrix = match &qcfg.format {
        QuantFormat::Llama32 => read_llama32(ckpt, prefix, n, k, group)?,
        QuantFormat::Gptq { sym, v2, desc_act } => hf::read_gptq(ckpt, prefix, n, k, group, *sym, *v2, *desc_act)?,
        QuantFormat::Awq => hf::read_awq(ckpt, prefix, n, k, group)?,
        QuantFormat::CompressedTensors { symmetric } => hf::read_compressed(ckpt, prefix, n, k, group, *symmetric)?,
    };
    Ok(QuantLinear { matrix, scheme: qcfg.scheme })
}

fn read_llama32(ckpt: &Checkpoint, prefix: &str, n: usize, k: usize, group: usize) -> Result<QuantMatrix> {
    if k % 2 != 0 {
        return Err(Error::weights(ckpt.dir(), format!("`{prefix}`: odd input size {k} cannot hold packed int4")));
    }
    let why = "llama32 int4 layout";
    let (qw, _) = tensor(ckpt, &format!("{prefix}.qweight"), &[DType::U8], &[n, k / 2], why)?;
    let (sc, _) = tensor(ckpt, &format!("{prefix}.scales"), &[DType::BF16], &[n, k / group], why)?;
    Ok(QuantMatrix { n, k, group, q: unpack_nibbles(qw.bytes), scales: sc.to_f32(), zeros: None })
}

/// Packs int4 values (`[-8, 7]`, even length) two per byte as `q + 8`, the even column in the low nibble.
pub fn pack_nibbles(q: &[i8]) -> Vec<u8> {
    q.chunks_exact(2).map(|p| ((p[0] + 8) as u8 & 0xF) | (((p[1] + 8) as u8 & 0xF) << 4)).collect()
}

/// The inverse of [`pack_nibbles`].
pub fn unpack_nibbles(bytes: &[u8]) -> Vec<i8> {
    let mut q = Vec::with_capacity(bytes.len() * 2);
    for &b in bytes {
        q.push((b & 0xF) as i8 - 8);
        q.push((b >> 4) as i8 - 8);
    }
    q
}

/// Reads an `[rows, cols]` table stored as `<prefix>.weight` (any float dtype) or, in an int8-embeddings
/// checkpoint, as `<prefix>.qweight_int8` + `<prefix>.scales`, dequantized to f32 (exactly: int8 times a bf16
/// scale). `name` is the unquantized tensor name, e.g. `model.embed_tokens.weight`.
pub fn read_table_f32(ckpt: &Checkpoint, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let prefix = name.strip_suffix(".weight").unwrap_or(name);
    let qname = format!("{prefix}.qweight_int8");
    if ckpt.get(&qname).is_some() {
        let why = "llama32 int8 table";
        let (q, _) = tensor(ckpt, &qname, &[DType::I8], &[rows, cols], why)?;
        let (s, _) = tensor(ckpt, &format!("{prefix}.scales"), &[DType::BF16], &[rows], why)?;
        let scales = s.to_f32();
        let mut out = vec![0.0f32; rows * cols];
        for ((o, qr), sc) in out.chunks_exact_mut(cols.max(1)).zip(q.bytes.chunks_exact(cols.max(1))).zip(&scales) {
            for (x, &b) in o.iter_mut().zip(qr) {
                *x = (b as i8) as f32 * sc;
            }
        }
        return Ok(out);
    }
    let (v, _) = tensor(ckpt, name, &[DType::BF16, DType::F16, DType::F32], &[rows, cols], "unquantized table")?;
    Ok(v.to_f32())
}

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
    /// Other files copied (tokenizer, chat template, generation and preprocessor configs).
    pub files_copied: Vec<String>,
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
    if scheme.group == 0 || scheme.group % 2 != 0 {
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
                    let mut vals = view.to_f32();
                    vals.iter_mut().for_each(|v| *v = round_to_bf16(*v));
                    let m = quantize_matrix(&vals, n, k, scheme.group)
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

    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let fname = entry.file_name().to_string_lossy().into_owned();
        let ft = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
        if !ft.is_file() || is_weight_file(&fname) {
            continue;
        }
        let dst: PathBuf = out.join(&fname);
        std::fs::copy(entry.path(), &dst).map_err(|e| Error::io(&dst, e))?;
        report.files_copied.push(fname);
    }
    report.files_copied.sort();
    Ok(report)
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
    fn nibbles_roundtrip() {
        let q: Vec<i8> = (-8..8).chain((-8..8).rev()).collect();
        let packed = pack_nibbles(&q);
        assert_eq!(packed[0], 0x10); // -8 -> 0 (low), -7 -> 1 (high)
        assert_eq!(unpack_nibbles(&packed), q);
    }

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

    #[test]
    fn config_errors_name_the_field() {
        let p = Path::new("config.json");
        let e = |v: Value| {
            QuantizationConfig::from_config_json(&json!({"quantization_config": v}), p).unwrap_err().to_string()
        };
        assert!(e(json!({"quant_method": "gptq", "bits": 8, "group_size": 128})).contains("quantization_config.bits"));
        assert!(e(json!({"quant_method": "gptq", "bits": 4, "group_size": 64})).contains("group size 64"));
        assert!(e(json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"})).contains("GEMM"));
        assert!(e(json!({"quant_method": "bitsandbytes"})).contains("not supported"));
        let c = QuantizationConfig::llama32(Scheme::W4A8_G32, EmbeddingQuant::Int8, vec!["lm_head".into()]);
        let back = QuantizationConfig::from_config_json(&json!({"quantization_config": c.to_json()}), p).unwrap();
        assert_eq!(back, Some(c));
        assert_eq!(QuantizationConfig::from_config_json(&json!({}), p).unwrap(), None);
    }
}
