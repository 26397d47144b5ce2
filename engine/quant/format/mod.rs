//! Quantized checkpoints on disk: this engine's own layout (written by `llama32 quantize`), the
//! `quantization_config` of config.json, and reading a quantized projection back as a
//! [`QuantLinear`](super::QuantLinear).
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
//!
//! The reading side (quantized projections and tables) is in `read`, the quantizer that writes this layout in
//! `write`; both are re-exported here.

mod read;
mod write;

use std::path::Path;

use serde_json::{json, Map, Value};

use super::{ActQuant, Scheme};
use crate::{Error, Result};

pub(crate) use read::tensor;
pub use read::{pack_nibbles, read_linear, read_table_f32, read_table_int8, unpack_nibbles};
pub use write::{quantize_checkpoint, QuantizeOptions, QuantizeReport};

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
        // A null config counts as absent, as a null field does everywhere else.
        let present = |k: &str| root.get(k).filter(|v| !v.is_null());
        let Some(q) = present("quantization_config").or_else(|| present("compression_config")) else {
            return Ok(None);
        };
        let field = if present("quantization_config").is_some() { "quantization_config" } else { "compression_config" };
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
        // Typed reads: a present field of the wrong type is an error naming it, never its default.
        let field_of = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let int = |keys: &[&str]| -> Result<Option<i64>> {
            match keys.iter().find_map(|k| field_of(k).map(|v| (*k, v))) {
                None => Ok(None),
                Some((k, v)) => v.as_i64().map(Some).ok_or_else(|| err(k, format!("expected an integer, got {v}"))),
            }
        };
        let text = |k: &str| -> Result<Option<&str>> {
            field_of(k).map(|v| v.as_str().ok_or_else(|| err(k, format!("expected a string, got {v}")))).transpose()
        };
        let flag = |k: &str, default: bool| -> Result<bool> {
            field_of(k)
                .map_or(Ok(default), |v| v.as_bool().ok_or_else(|| err(k, format!("expected true or false, got {v}"))))
        };
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
                check_bits(int(&["bits"])?, "bits")?;
                let scheme_s =
                    obj.get("scheme").and_then(Value::as_str).ok_or_else(|| err("scheme", "missing".into()))?;
                let scheme = Scheme::parse(scheme_s).map_err(|e| err("scheme", e.to_string()))?;
                if let Some(g) = int(&["group_size"])? {
                    if g as usize != scheme.group {
                        return Err(err("group_size", format!("{g} disagrees with scheme `{scheme_s}`")));
                    }
                }
                if scheme.group % 2 != 0 || scheme.group < 2 {
                    return Err(err("scheme", format!("group size {} is not supported", scheme.group)));
                }
                if let Some(m) = text("weight_mapping")? {
                    if m != "symmetric" {
                        return Err(err("weight_mapping", format!("`{m}` is not supported (only symmetric)")));
                    }
                }
                let act = text("activation")?.unwrap_or(activation_name(scheme.act));
                if act != activation_name(scheme.act) {
                    return Err(err("activation", format!("`{act}` disagrees with scheme `{scheme_s}`")));
                }
                let embeddings = match text("embeddings")? {
                    None => EmbeddingQuant::Bf16,
                    Some(s) => EmbeddingQuant::parse(s).map_err(|e| err("embeddings", e.to_string()))?,
                };
                QuantizationConfig::llama32(scheme, embeddings, names(&["modules_not_converted"]))
            }
            "gptq" => {
                check_bits(int(&["bits"])?, "bits")?;
                let group = check_group(int(&["group_size"])?, "group_size")?;
                let fmt = match text("checkpoint_format")? {
                    Some(f) => f,
                    None => obj
                        .get("meta")
                        .and_then(|m| m.get("checkpoint_format"))
                        .and_then(Value::as_str)
                        .unwrap_or("gptq"),
                };
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
                QuantizationConfig {
                    format: QuantFormat::Gptq { sym: flag("sym", true)?, v2, desc_act: flag("desc_act", false)? },
                    scheme: w4a16(group),
                    embeddings: EmbeddingQuant::Bf16,
                    modules_not_converted: names(&["modules_not_converted", "modules_to_not_convert"]),
                }
            }
            "awq" => {
                check_bits(int(&["bits", "w_bit"])?, "bits")?;
                let group = check_group(int(&["group_size", "q_group_size"])?, "group_size")?;
                let version = text("version")?.unwrap_or("gemm");
                if !version.eq_ignore_ascii_case("gemm") {
                    return Err(err("version", format!("AWQ `{version}` layout is not supported (only GEMM)")));
                }
                if !flag("zero_point", true)? {
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
            let bool_of = |k: &str, default: bool| -> Result<bool> {
                get(k).filter(|v| !v.is_null()).map_or(Ok(default), |v| {
                    v.as_bool()
                        .ok_or_else(|| err(&sub(&format!("weights.{k}")), format!("expected true or false, got {v}")))
                })
            };
            if bool_of("dynamic", false)? {
                return Err(err(&sub("weights.dynamic"), "dynamic weight quantization is not supported".into()));
            }
            if let Some(a) = g.get("input_activations").filter(|a| !a.is_null()) {
                return Err(err(
                    &sub("input_activations"),
                    format!("quantized input activations ({a}) are not supported (only weight-only int4)"),
                ));
            }
            let symmetric = bool_of("symmetric", true)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(QuantizationConfig::from_config_json(&json!({"quantization_config": null}), p).unwrap(), None);
        // A field of the wrong type is refused by name, not read as its default.
        let gptq = |k: &str, v: Value| {
            let mut q = json!({"quant_method": "gptq", "bits": 4, "group_size": 32});
            q[k] = v;
            e(q)
        };
        for (k, v) in [("sym", json!("false")), ("desc_act", json!("yes")), ("bits", json!("4"))] {
            let msg = gptq(k, v);
            assert!(msg.contains(&format!("quantization_config.{k}")) && msg.contains("expected"), "{k}: {msg}");
        }
        let ct = e(json!({"quant_method": "compressed-tensors", "config_groups": {"g": {"format": "pack-quantized",
            "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": "false"}}}}));
        assert!(ct.contains("config_groups.g.weights.symmetric") && ct.contains("true or false"), "{ct}");
    }
}
