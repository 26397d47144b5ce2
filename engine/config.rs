//! Model configuration for `LlamaForCausalLM`, read from a Hugging Face `config.json` or taken from a built-in preset.
//!
//! Both spellings of the RoPE settings are accepted: `rope_theta` + `rope_scaling` (the published Llama 3.2
//! checkpoints) and `rope_parameters` (transformers 5). The llama3 frequency scaling is computed exactly as
//! transformers' `_compute_llama3_parameters` does, in f32.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Error, Result};

/// How RoPE frequencies are scaled.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type: "default"` or no scaling).
    None,
    /// Llama 3 frequency-dependent scaling (`rope_type: "llama3"`).
    Llama3 {
        /// Scale applied to low frequencies.
        factor: f32,
        /// Wavelength threshold numerator for low frequencies.
        low_freq_factor: f32,
        /// Wavelength threshold numerator for high frequencies.
        high_freq_factor: f32,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: u32,
    },
}

/// Rotary position embedding settings.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// Base of the geometric frequency progression.
    pub theta: f32,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// Inverse frequencies for a rotary dimension of `head_dim` (length `head_dim / 2`), as transformers computes them.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base: Vec<f32> =
            (0..head_dim).step_by(2).map(|i| 1.0f32 / self.theta.powf(i as f32 / head_dim as f32)).collect();
        match self.scaling {
            RopeScaling::None => base,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old_ctx = original_max_position_embeddings as f32;
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                        let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                        if medium {
                            let smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The architecture of a Llama 3.2 text model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of the embedding table).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE settings.
    pub rope: RopeConfig,
    /// Longest supported context.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-text id, when the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids (any of them stops generation).
    pub eos_token_ids: Vec<u32>,
    /// The checkpoint's stored dtype as the config names it (`bfloat16`, ...), if any.
    pub dtype: Option<String>,
}

/// A named built-in architecture, for `--preset` and `--random-weights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// Llama 3.2 1B (16 layers, hidden 2048, 32/8 heads, tied embeddings).
    Llama32_1B,
    /// Llama 3.2 3B (28 layers, hidden 3072, 24/8 heads, tied embeddings).
    Llama32_3B,
}

impl Preset {
    /// Every preset, for listings.
    pub const ALL: [Preset; 2] = [Preset::Llama32_1B, Preset::Llama32_3B];

    /// The preset's short name (`1b`, `3b`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::Llama32_1B => "1b",
            Preset::Llama32_3B => "3b",
        }
    }

    /// Looks a preset up by its short name.
    pub fn from_name(name: &str) -> Result<Self> {
        Preset::ALL.into_iter().find(|p| p.name().eq_ignore_ascii_case(name)).ok_or_else(|| {
            Error::request(format!(
                "unknown preset `{name}`; known presets: {}",
                Preset::ALL.map(|p| p.name()).join(", ")
            ))
        })
    }

    /// The preset's configuration, with the real dimensions of the published model.
    pub fn config(self) -> LlamaConfig {
        let (hidden, inter, layers, heads, head_dim) = match self {
            Preset::Llama32_1B => (2048, 8192, 16, 32, 64),
            Preset::Llama32_3B => (3072, 8192, 28, 24, 128),
        };
        LlamaConfig {
            vocab_size: 128256,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: 8,
            head_dim,
            rms_norm_eps: 1e-5,
            rope: RopeConfig {
                theta: 500000.0,
                scaling: RopeScaling::Llama3 {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                },
            },
            max_position_embeddings: 131072,
            tie_word_embeddings: true,
            bos_token_id: Some(128000),
            eos_token_ids: vec![128001, 128008, 128009],
            dtype: Some("bfloat16".into()),
        }
    }
}

/// Reads fields out of a JSON object, naming the file and the field in every error.
struct Fields<'a> {
    path: &'a Path,
    prefix: &'a str,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::config(self.path, format!("{}{field}", self.prefix), msg)
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0 && n <= u32::MAX as u64)
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(field, format!("expected a positive integer, got {v}"))),
        }
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.usize_opt(field)?.ok_or_else(|| self.err(field, "missing"))
    }

    fn f32_opt(&self, field: &str) -> Result<Option<f32>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => {
                let x = v.as_f64().ok_or_else(|| self.err(field, format!("expected a number, got {v}")))?;
                // Checked after the conversion: 1e300 is a finite f64 but an infinite f32, and 1e-300 a zero one.
                let f = x as f32;
                if !f.is_finite() || (f == 0.0 && x != 0.0) {
                    return Err(self.err(field, format!("{v} is out of the range of a 32-bit float")));
                }
                Ok(Some(f))
            }
        }
    }

    fn positive_f32(&self, field: &str) -> Result<f32> {
        let v = self.f32_opt(field)?.ok_or_else(|| self.err(field, "missing"))?;
        if v > 0.0 {
            Ok(v)
        } else {
            Err(self.err(field, format!("must be positive, got {v}")))
        }
    }

    fn bool_opt(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.err(field, format!("expected true or false, got {v}"))),
        }
    }

    fn ids(&self, field: &str) -> Result<Vec<u32>> {
        let one = |v: &Value| v.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| n as u32);
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| one(v).ok_or_else(|| self.err(field, format!("expected token ids, got {v}"))))
                .collect(),
            Some(v) => {
                one(v).map(|id| vec![id]).ok_or_else(|| self.err(field, format!("expected a token id, got {v}")))
            }
        }
    }
}

impl LlamaConfig {
    /// Reads `config.json` from a model directory.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses config JSON; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let root: Value =
            serde_json::from_str(text).map_err(|e| Error::config(path, "<json>", format!("not valid JSON: {e}")))?;
        let obj = root.as_object().ok_or_else(|| Error::config(path, "<root>", "expected a JSON object"))?;
        let top = Fields { path, prefix: "", obj };
        if let Some(arch) = top.get("architectures").and_then(|a| a.as_array()) {
            let names: Vec<&str> = arch.iter().filter_map(|a| a.as_str()).collect();
            if !names.is_empty() && !names.contains(&"LlamaForCausalLM") {
                let hint = if names.iter().any(|n| n.starts_with("Mllama")) {
                    " (a Llama 3.2 Vision model: `llama32 logits`, `generate`, `serve`, `batch`, `info`, `plan` and `quantize` take it, on the CPU or CUDA; this command takes text models only)"
                } else {
                    ""
                };
                return Err(top.err("architectures", format!("expected LlamaForCausalLM, got {names:?}{hint}")));
            }
        }
        if let Some(act) = top.get("hidden_act") {
            if act.as_str() != Some("silu") {
                return Err(top.err("hidden_act", format!("only silu is supported, got {act}")));
            }
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if top.bool_opt(flag)? == Some(true) {
                return Err(top.err(flag, "biases are not used by Llama 3.2 and are not supported"));
            }
        }

        let hidden_size = top.usize("hidden_size")?;
        let num_attention_heads = top.usize("num_attention_heads")?;
        let num_key_value_heads = top.usize_opt("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(top.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match top.usize_opt("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(top.err(
                    "head_dim",
                    format!("missing, and hidden_size {hidden_size} is not a multiple of {num_attention_heads} heads"),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(top.err("head_dim", format!("must be even for RoPE, got {head_dim}")));
        }
        let rope = parse_rope(&top)?;
        let dtype = top.get("dtype").or_else(|| top.get("torch_dtype")).and_then(|v| v.as_str()).map(str::to_owned);
        let cfg = LlamaConfig {
            vocab_size: top.usize("vocab_size")?,
            hidden_size,
            intermediate_size: top.usize("intermediate_size")?,
            num_hidden_layers: top.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: top.positive_f32("rms_norm_eps")?,
            rope,
            max_position_embeddings: top.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: top.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: top.ids("bos_token_id")?.first().copied(),
            eos_token_ids: top.ids("eos_token_id")?,
            dtype,
        };
        cfg.check_sizes(&top)?;
        Ok(cfg)
    }

    /// Refuses sizes no Llama has, before anything is allocated or enumerated from them: more than [`MAX_LAYERS`]
    /// layers, a width (hidden, intermediate, q or kv) over [`MAX_WIDTH`], a vocabulary over [`MAX_VOCAB`], or
    /// more than [`MAX_PARAMETERS`] parameters in all. Without this an absurd config (a typo, a corrupted file)
    /// made a loader enumerate billions of tensors or ask the allocator for terabytes and abort.
    fn check_sizes(&self, top: &Fields<'_>) -> Result<()> {
        if let Some(msg) = too_many_layers(self.num_hidden_layers) {
            return Err(top.err("num_hidden_layers", msg));
        }
        let widths = [
            ("hidden_size", self.hidden_size, ""),
            ("intermediate_size", self.intermediate_size, ""),
            ("num_attention_heads", self.num_attention_heads * self.head_dim, " (heads x head_dim)"),
            ("num_key_value_heads", self.num_key_value_heads * self.head_dim, " (heads x head_dim)"),
        ];
        for (field, w, what) in widths {
            if let Some(msg) = too_wide(w, what) {
                return Err(top.err(field, msg));
            }
        }
        if self.vocab_size > MAX_VOCAB {
            return Err(top.err("vocab_size", format!("{}, at most {MAX_VOCAB} is supported", self.vocab_size)));
        }
        // Within those bounds the count stays below 2^56: no overflow.
        let params = self.num_parameters();
        if params > MAX_PARAMETERS {
            let msg = format!(
                "{params} parameters in all (hidden_size {}, intermediate_size {}, {} layers, vocabulary {}), at most \
                 {MAX_PARAMETERS} are supported",
                self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
            );
            return Err(top.err("num_hidden_layers", msg));
        }
        Ok(())
    }

    /// Query heads per key/value head.
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Width of the fused q projection output.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of each of the k and v projection outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Total parameter count (the tied `lm_head` counted once).
    pub fn num_parameters(&self) -> u64 {
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let per_layer = h * (self.q_dim() as u64 + 2 * self.kv_dim() as u64) // q, k, v
            + self.q_dim() as u64 * h // o
            + 3 * h * i // gate, up, down
            + 2 * h; // two norms
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + h + per_layer * self.num_hidden_layers as u64
    }

    /// Bytes of K and V cached per token for all layers, at `bytes_per_elem` bytes per element.
    pub fn kv_bytes_per_token(&self, bytes_per_elem: usize) -> usize {
        2 * self.num_hidden_layers * self.kv_dim() * bytes_per_elem
    }

    /// Merges `eos_token_id` from `generation_config.json` in `dir`, if present, into the stop ids.
    pub fn merge_generation_config(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let root: Value =
            serde_json::from_str(&text).map_err(|e| Error::config(&path, "<json>", format!("not valid JSON: {e}")))?;
        let obj = root.as_object().ok_or_else(|| Error::config(&path, "<root>", "expected a JSON object"))?;
        let fields = Fields { path: &path, prefix: "", obj };
        for id in fields.ids("eos_token_id")? {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        Ok(())
    }
}

fn parse_rope(top: &Fields<'_>) -> Result<RopeConfig> {
    // transformers 5: everything under `rope_parameters`; 4.x: `rope_theta` at the top, scaling in `rope_scaling`.
    let (params, prefix) = match top.get("rope_parameters") {
        Some(Value::Object(p)) => (Some(p), "rope_parameters."),
        Some(v) => return Err(top.err("rope_parameters", format!("expected an object, got {v}"))),
        None => match top.get("rope_scaling") {
            Some(Value::Object(p)) => (Some(p), "rope_scaling."),
            Some(v) => return Err(top.err("rope_scaling", format!("expected an object or null, got {v}"))),
            None => (None, ""),
        },
    };
    let scoped = params.map(|obj| Fields { path: top.path, prefix, obj });
    let theta = match scoped.as_ref().map(|s| s.f32_opt("rope_theta")).transpose()?.flatten() {
        Some(t) => t,
        None => top.f32_opt("rope_theta")?.unwrap_or(10000.0),
    };
    if theta <= 1.0 {
        return Err(top.err("rope_theta", format!("must be greater than 1, got {theta}")));
    }
    let Some(s) = scoped else {
        return Ok(RopeConfig { theta, scaling: RopeScaling::None });
    };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    let scaling = match kind {
        "default" => RopeScaling::None,
        "llama3" => {
            let low = s.positive_f32("low_freq_factor")?;
            let high = s.positive_f32("high_freq_factor")?;
            if high <= low {
                return Err(s.err("high_freq_factor", format!("must exceed low_freq_factor {low}, got {high}")));
            }
            let orig = s.usize("original_max_position_embeddings")?;
            RopeScaling::Llama3 {
                factor: s.positive_f32("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: orig as u32,
            }
        }
        other => {
            return Err(s.err("rope_type", format!("unsupported RoPE type `{other}` (supported: default, llama3)")))
        }
    };
    Ok(RopeConfig { theta, scaling })
}

/// The most decoder layers a config may give (Llama 3.2 90B has 100, Llama 3.1 405B 126).
pub const MAX_LAYERS: usize = 1024;
/// The widest hidden, intermediate, q or kv width a config may give (Llama 3.1 405B: 53248).
pub const MAX_WIDTH: usize = 1 << 20;
/// The largest vocabulary a config may give (Llama 3: 128256).
pub const MAX_VOCAB: usize = 1 << 24;
/// The most parameters a config may describe (Llama 3.1 405B: 4.1e11).
pub const MAX_PARAMETERS: u64 = 1 << 40;

/// The refusal of `n` layers past [`MAX_LAYERS`], or None (the text and vision configs share it).
pub(crate) fn too_many_layers(n: usize) -> Option<String> {
    (n > MAX_LAYERS).then(|| format!("{n} layers, at most {MAX_LAYERS} are supported"))
}

/// The refusal of a width `w` past [`MAX_WIDTH`] (`what` says what it is made of, or is empty), or None.
pub(crate) fn too_wide(w: usize, what: &str) -> Option<String> {
    (w > MAX_WIDTH).then(|| format!("a width of {w}{what}, at most {MAX_WIDTH} is supported"))
}

/// Where a model comes from: a checkpoint directory or a preset with generated weights.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// A Hugging Face model directory.
    Dir(PathBuf),
    /// A built-in preset with random weights drawn from `seed`.
    Random {
        /// The architecture.
        preset: Preset,
        /// RNG seed for the weights.
        seed: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LlamaConfig> {
        LlamaConfig::from_json_str(text, Path::new("config.json"))
    }

    const BASE: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,"vocab_size":100"#;

    #[test]
    fn both_rope_spellings_agree() {
        let old = parse(&format!(
            r#"{BASE},"rope_theta":500000.0,"rope_scaling":{{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":32}}}}"#
        ))
        .unwrap();
        let new = parse(&format!(
            r#"{BASE},"rope_parameters":{{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":32}}}}"#
        ))
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(old.head_dim, 16);
        assert!(!old.tie_word_embeddings);
    }

    #[test]
    fn llama3_scaling_regions() {
        // Wavelengths below old_ctx/high are kept, above old_ctx/low are divided by factor, between are blended.
        let rope = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 32,
            },
        };
        let plain = RopeConfig { theta: 10000.0, scaling: RopeScaling::None }.inv_freq(16);
        let scaled = rope.inv_freq(16);
        let mut seen = [false; 3];
        for (p, s) in plain.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f32::consts::PI / p;
            if wavelen < 8.0 {
                assert_eq!(p, s);
                seen[0] = true;
            } else if wavelen > 32.0 {
                assert_eq!(p / 8.0, *s);
                seen[2] = true;
            } else {
                assert!(*s < *p && *s > p / 8.0);
                seen[1] = true;
            }
        }
        assert_eq!(seen, [true, true, true]);
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(r#"{"hidden_size":64}"#).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads") && e.contains("missing"), "{e}");
        let e = parse(&format!(r#"{BASE},"rms_norm_eps":"x"}}"#)).unwrap_err().to_string();
        assert!(e.contains("rms_norm_eps"), "{e}");
        let e = parse(&format!(r#"{BASE},"num_key_value_heads":3}}"#)).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e =
            parse(&format!(r#"{BASE},"rope_scaling":{{"rope_type":"yarn","factor":2.0}}}}"#)).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.rope_type") && e.contains("yarn"), "{e}");
        let e = parse(&format!(r#"{BASE},"rope_scaling":{{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0}}}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_scaling.original_max_position_embeddings"), "{e}");
        let e = parse("[1]").unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
        // Finite as JSON numbers (f64), but not as f32: infinite or flushed to zero.
        for (field, v) in [("rms_norm_eps", "1e300"), ("rope_theta", "-1e39"), ("rms_norm_eps", "1e-300")] {
            let e = parse(&format!(r#"{BASE},"{field}":{v}}}"#)).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains("range of a 32-bit float"), "{field} {v}: {e}");
        }
    }

    #[test]
    fn sizes_no_llama_has_are_refused_by_field() {
        let cases: [(&str, &str); 5] = [
            (r#""num_hidden_layers":1000000000"#, "num_hidden_layers"),
            (r#""hidden_size":2147483648,"head_dim":16"#, "hidden_size"),
            (r#""num_attention_heads":1048576,"num_key_value_heads":1,"head_dim":16"#, "num_attention_heads"),
            (r#""vocab_size":33554432"#, "vocab_size"),
            // Every width within bounds, but 2^20 x 2^20 x 3 x 1024 parameters.
            (
                r#""hidden_size":1048576,"intermediate_size":1048576,"num_hidden_layers":1024,"head_dim":16"#,
                "parameters",
            ),
        ];
        for (fields, needle) in cases {
            // The case's fields override BASE's (serde_json keeps the last of repeated keys).
            let e = parse(&format!(r#"{BASE},{fields}}}"#)).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("supported"), "{fields}: {e}");
            assert!(e.contains("config.json"), "{e}");
        }
        // The largest published Llama shapes pass.
        let ok = r#""hidden_size":16384,"intermediate_size":53248,"num_hidden_layers":126,"num_attention_heads":128,
            "num_key_value_heads":8,"vocab_size":128256"#;
        let cfg = parse(&format!(r#"{BASE},{ok}}}"#)).unwrap();
        assert!(cfg.num_parameters() > 400_000_000_000);
    }

    #[test]
    fn preset_parameter_counts() {
        // Published sizes: 1.24B and 3.21B parameters.
        let p1 = Preset::Llama32_1B.config().num_parameters();
        let p3 = Preset::Llama32_3B.config().num_parameters();
        assert_eq!(p1, 1_235_814_400);
        assert_eq!(p3, 3_212_749_824);
    }
}
