//! Checkpoint loading: memory-mapped safetensors (single file or sharded), checked tensor by tensor against the
//! config, converted into a backend's layout. Also generates random weights at a preset's real shapes.

mod check;
pub mod safetensors;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::Value;

pub(crate) use self::check::tensor_mismatch;
pub use self::check::{check_checkpoint, check_quantized_checkpoint, expected_tensors};
pub use self::safetensors::{DType, SafeTensorsFile, TensorInfo, TensorView};
use crate::config::LlamaConfig;
use crate::quant::format::{read_linear, read_table_f32, read_table_int8, QuantizationConfig};
use crate::quant::numerics::quantize_bf16_rounded;
use crate::quant::{Int8Table, QuantLinear, QuantMatrix, Scheme};
use crate::{Error, Result};

/// All tensors of a checkpoint directory, across shards.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<SafeTensorsFile>,
    index: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens `model.safetensors.index.json` and its shards, or a single `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        // Every (tensor, shard) pair of the index, checked against the shards' headers below.
        let mut listed: Vec<(String, String)> = Vec::new();
        let shard_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let root: Value =
                serde_json::from_str(&text).map_err(|e| Error::weights(&index_path, format!("not valid JSON: {e}")))?;
            let map = root
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::weights(&index_path, "missing `weight_map` object"))?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| Error::weights(&index_path, format!("weight_map[`{tensor}`] is not a file name")))?;
                if file.is_empty() || file.contains('/') || file.contains('\\') || file.starts_with("..") {
                    return Err(Error::weights(&index_path, format!("weight_map[`{tensor}`]: bad file name `{file}`")));
                }
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_owned());
                }
                listed.push((tensor.clone(), file.to_owned()));
            }
            names.sort();
            names
        } else if dir.join("model.safetensors").exists() {
            vec!["model.safetensors".into()]
        } else {
            return Err(Error::weights(dir, "no model.safetensors or model.safetensors.index.json in this directory"));
        };
        let files: Vec<SafeTensorsFile> =
            shard_names.iter().map(|n| SafeTensorsFile::open(&dir.join(n))).collect::<Result<_>>()?;
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.tensors().keys() {
                if let Some(prev) = index.insert(name.clone(), i) {
                    return Err(Error::weights(
                        f.path(),
                        format!("tensor `{name}` also appears in {}", files[prev].path().display()),
                    ));
                }
            }
        }
        // A tensor the index places in another shard than the one holding it means shards from different writes.
        // Entries no shard holds are tolerated, as transformers and vLLM do: Hugging Face's safetensors conversion
        // copies the index of the PyTorch files but drops shared tensors (a tied lm_head) from the shards. Tensors
        // the index leaves out are read too (loaders read every tensor of every listed shard).
        let problems: Vec<String> = listed
            .iter()
            .filter_map(|(tensor, want)| {
                let i = *index.get(tensor)?;
                (shard_names[i] != *want)
                    .then(|| format!("lists `{tensor}` in {want}, but it is in {}", shard_names[i]))
            })
            .collect();
        if !problems.is_empty() {
            let n = problems.len();
            let shown: Vec<String> = problems.into_iter().take(10).collect();
            let more = if n > 10 { format!("\n  ... and {} more", n - 10) } else { String::new() };
            return Err(Error::weights(
                &index_path,
                format!("{n} disagreement(s) with the shards:\n  {}{more}", shown.join("\n  ")),
            ));
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), files, index })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// A tensor's view and the file holding it.
    pub fn get(&self, name: &str) -> Option<(TensorView<'_>, &Path)> {
        let f = &self.files[*self.index.get(name)?];
        Some((f.get(name)?, f.path()))
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().flat_map(|f| f.tensors().values()).map(|t| t.range.len() as u64).sum()
    }
}

/// Refuses a model whose f32 host copy (what [`ModelWeights`] keeps: 4 bytes per parameter) exceeds the memory
/// the kernel reports available (`MemAvailable` in /proc/meminfo; where that cannot be read, nothing is checked),
/// with an error that gives both sizes, instead of an allocation failure that aborts the process part way.
pub fn check_host_memory(cfg: &LlamaConfig) -> Result<()> {
    check_host_f32("the model's", cfg.num_parameters(), || {
        format!(
            "hidden_size {}, intermediate_size {}, {} layers, vocabulary {}",
            cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
        )
    })
}

/// [`check_host_memory`] for `params` parameters of `what` ("the model's"), `sizes` naming the config's sizes.
pub fn check_host_f32(what: &str, params: u64, sizes: impl FnOnce() -> String) -> Result<()> {
    match host_shortfall(params.saturating_mul(4)) {
        Some((need, avail)) => Err(Error::Request(format!(
            "{what} f32 weights need {need:.1} GiB of host memory ({params} parameters: {}), but only {avail:.1} GiB \
             is available; run it on a GPU (--device cuda), quantized, or on a machine with more memory",
            sizes()
        ))),
        None => Ok(()),
    }
}

/// `Some((need, available))` in GiB when `need` bytes exceed the host's `MemAvailable`; None when they fit or
/// where /proc/meminfo cannot be read (nothing is checked there).
pub(crate) fn host_shortfall(need: u64) -> Option<(f64, f64)> {
    let avail = host_memory_available().filter(|&a| need > a)?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Some((gib(need), gib(avail)))
}

/// `MemAvailable` of /proc/meminfo in bytes, or None where it cannot be read.
fn host_memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Where weight values come from: a checked checkpoint, or seeded random values at the config's shapes.
#[derive(Clone, Copy, Debug)]
pub enum WeightSource<'a> {
    /// A checkpoint already passed through [`check_checkpoint`].
    Checkpoint(&'a Checkpoint),
    /// Random values from a seed: projections uniform with standard deviation 0.02 (HF's initializer range),
    /// norms at 1. For benchmarking and smoke runs only.
    Random(u64),
}

/// A backend tensor assembled from one or more checkpoint tensors stacked along rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FusedSpec {
    /// Checkpoint tensor names, stacked in this order.
    pub names: Vec<String>,
    /// Total element count.
    pub numel: usize,
    /// True for RMSNorm weights (random source: ones).
    pub is_norm: bool,
    /// Random stream id, distinct per tensor.
    pub stream: u64,
}

impl FusedSpec {
    fn new(cfg_names: &[(String, Vec<usize>)], names: &[String], is_norm: bool, stream: u64) -> Self {
        let numel = names
            .iter()
            .map(|n| cfg_names.iter().find(|(e, _)| e == n).map(|(_, s)| s.iter().product::<usize>()).unwrap_or(0))
            .sum();
        FusedSpec { names: names.to_vec(), numel, is_norm, stream }
    }
}

/// The fused tensors of one decoder layer.
#[derive(Clone, Debug)]
pub struct LayerSpecs {
    /// `input_layernorm`.
    pub attn_norm: FusedSpec,
    /// q, k, v stacked.
    pub wqkv: FusedSpec,
    /// `o_proj`.
    pub wo: FusedSpec,
    /// `post_attention_layernorm`.
    pub mlp_norm: FusedSpec,
    /// gate, up stacked.
    pub w_gate_up: FusedSpec,
    /// `down_proj`.
    pub w_down: FusedSpec,
}

/// Every tensor a backend holds, in fused form.
#[derive(Clone, Debug)]
pub struct ModelSpecs {
    /// Embedding table.
    pub embed: FusedSpec,
    /// Per layer.
    pub layers: Vec<LayerSpecs>,
    /// Final norm.
    pub final_norm: FusedSpec,
    /// Untied `lm_head`, if any.
    pub lm_head: Option<FusedSpec>,
}

impl ModelSpecs {
    /// The fused layout of `cfg`.
    pub fn of(cfg: &LlamaConfig) -> Self {
        let all = expected_tensors(cfg);
        let spec = |names: &[String], norm: bool, stream: u64| FusedSpec::new(&all, names, norm, stream);
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let s = 16 * (l as u64 + 1);
                LayerSpecs {
                    attn_norm: spec(&[format!("{p}.input_layernorm.weight")], true, s + 4),
                    wqkv: spec(
                        &[
                            format!("{p}.self_attn.q_proj.weight"),
                            format!("{p}.self_attn.k_proj.weight"),
                            format!("{p}.self_attn.v_proj.weight"),
                        ],
                        false,
                        s,
                    ),
                    wo: spec(&[format!("{p}.self_attn.o_proj.weight")], false, s + 1),
                    mlp_norm: spec(&[format!("{p}.post_attention_layernorm.weight")], true, s + 5),
                    w_gate_up: spec(
                        &[format!("{p}.mlp.gate_proj.weight"), format!("{p}.mlp.up_proj.weight")],
                        false,
                        s + 2,
                    ),
                    w_down: spec(&[format!("{p}.mlp.down_proj.weight")], false, s + 3),
                }
            })
            .collect();
        ModelSpecs {
            embed: spec(&["model.embed_tokens.weight".into()], false, 1),
            layers,
            final_norm: spec(&["model.norm.weight".into()], true, 3),
            lm_head: (!cfg.tie_word_embeddings).then(|| spec(&["lm_head.weight".into()], false, 2)),
        }
    }
}

impl WeightSource<'_> {
    /// The values of `spec` as f32, calling `progress(bytes)` with the checkpoint bytes read.
    pub fn read_f32(&self, spec: &FusedSpec, progress: &(dyn Fn(u64) + Sync)) -> Result<Vec<f32>> {
        match *self {
            WeightSource::Random(_) if spec.is_norm => Ok(vec![1.0; spec.numel]),
            WeightSource::Random(seed) => Ok(random_values(spec.numel, seed, spec.stream)),
            WeightSource::Checkpoint(ckpt) => {
                let mut out = vec![0.0f32; spec.numel];
                let mut rest = out.as_mut_slice();
                for n in &spec.names {
                    let (v, _) = ckpt.get(n).ok_or_else(|| Error::weights(ckpt.dir(), format!("missing `{n}`")))?;
                    if v.numel() > rest.len() {
                        return Err(Error::weights(
                            ckpt.dir(),
                            format!("tensor `{n}` is larger than its config shape"),
                        ));
                    }
                    let (head, tail) = rest.split_at_mut(v.numel());
                    v.to_f32_into(head);
                    rest = tail;
                    progress(v.bytes.len() as u64);
                }
                Ok(out)
            }
        }
    }
}

/// `n` values uniform in `[-a, a]` with standard deviation 0.02, reproducible from `(seed, stream)`.
pub fn random_values(n: usize, seed: u64, stream: u64) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(RANDOM_CHUNK).enumerate().for_each(|(chunk, o)| random_chunk(seed, stream, chunk, o));
    out
}

/// Elements per independently seeded chunk of [`random_values`]'s stream.
pub const RANDOM_CHUNK: usize = 1 << 16;

/// Fills `out` (at most [`RANDOM_CHUNK`] values) with the first values of chunk `chunk` of the stream
/// `(seed, stream)`: element `i` of `out` is element `chunk * RANDOM_CHUNK + i` of [`random_values`].
pub fn random_chunk(seed: u64, stream: u64, chunk: usize, out: &mut [f32]) {
    debug_assert!(out.len() <= RANDOM_CHUNK);
    let a = 0.02f32 * 3f32.sqrt();
    let mut s = splitmix(seed ^ splitmix(stream.wrapping_mul(0x9E37_79B9) ^ chunk as u64));
    for v in out {
        s = splitmix(s);
        *v = ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a;
    }
}

/// A projection weight in the CPU layout: the f32 row-major `[out, in]` matrix, plus its quantized form when the
/// checkpoint is quantized (then `dense` holds the exactly dequantized values). Derefs to the f32 slice.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinearWeight {
    /// Row-major `[out, in]` f32 values.
    pub dense: Vec<f32>,
    /// The quantized form, for a quantized checkpoint.
    pub quant: Option<Arc<QuantLinear>>,
}

impl From<Vec<f32>> for LinearWeight {
    fn from(dense: Vec<f32>) -> Self {
        LinearWeight { dense, quant: None }
    }
}

impl LinearWeight {
    /// A quantized projection: `dense` is its exact dequantization (the W4A16 reference on the CPU).
    pub fn quantized(q: QuantLinear) -> Self {
        LinearWeight { dense: q.matrix.dequantize(), quant: Some(Arc::new(q)) }
    }

    /// A quantized projection without its dense f32 copy (`dense` empty): for weights bound for a device, whose
    /// kernels read only the quantized form, so a host never holds both. The CPU GEMM of
    /// [`crate::ops::cpu::quant::linear_weight`] dequantizes such a weight on every call.
    pub fn quantized_only(q: QuantLinear) -> Self {
        LinearWeight { dense: Vec::new(), quant: Some(Arc::new(q)) }
    }

    /// `(out, in)` features of a quantized projection, or `None` for a dense one (whose shape the caller knows).
    pub fn quant_shape(&self) -> Option<(usize, usize)> {
        self.quant.as_ref().map(|q| (q.matrix.n, q.matrix.k))
    }

    /// Splits a `[n, k]` projection at output row `at` into rows `..at` and `at..` (both forms when present).
    pub fn split_rows(&self, at: usize, k: usize) -> Result<(LinearWeight, LinearWeight)> {
        let cut = at * k;
        if cut > self.dense.len() && (self.quant.is_none() || !self.dense.is_empty()) {
            return Err(Error::request(format!("split_rows: row {at} of a projection of {} values", self.dense.len())));
        }
        let (d0, d1) = if self.dense.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            (self.dense[..cut].to_vec(), self.dense[cut..].to_vec())
        };
        match &self.quant {
            Some(q) => {
                let (q0, q1) = q.split_rows(at)?;
                Ok((
                    LinearWeight { dense: d0, quant: Some(Arc::new(q0)) },
                    LinearWeight { dense: d1, quant: Some(Arc::new(q1)) },
                ))
            }
            None => Ok((d0.into(), d1.into())),
        }
    }

    /// Values of the projection: `n * k` (from the quantized form when `dense` was left out).
    pub fn numel(&self) -> usize {
        match (&self.quant, self.dense.is_empty()) {
            (Some(q), true) => q.matrix.n * q.matrix.k,
            _ => self.dense.len(),
        }
    }
}

impl std::ops::Deref for LinearWeight {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.dense
    }
}

/// One decoder layer's weights in the CPU layout: f32, row-major `[out, in]`, projections fused.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// `input_layernorm` `[hidden]`.
    pub attn_norm: Vec<f32>,
    /// q, k and v projections stacked: `[q_dim + 2 * kv_dim, hidden]`.
    pub wqkv: LinearWeight,
    /// Output projection `[hidden, q_dim]`.
    pub wo: LinearWeight,
    /// `post_attention_layernorm` `[hidden]`.
    pub mlp_norm: Vec<f32>,
    /// Gate and up projections stacked: `[2 * intermediate, hidden]`.
    pub w_gate_up: LinearWeight,
    /// Down projection `[hidden, intermediate]`.
    pub w_down: LinearWeight,
}

/// All weights of a text model in the CPU layout.
#[derive(Clone, Debug)]
pub struct ModelWeights {
    /// Embedding table `[vocab, hidden]`.
    pub embed: Vec<f32>,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm `[hidden]`.
    pub final_norm: Vec<f32>,
    /// Untied output projection `[vocab, hidden]`; `None` when tied to `embed`.
    pub lm_head: Option<Vec<f32>>,
    /// The embedding table in int8 (an int8-embeddings checkpoint, or
    /// [`quantize_tables_int8`](Self::quantize_tables_int8)); `embed` is then exactly its dequantization. The CUDA
    /// executor keeps this form.
    pub embed_int8: Option<Int8Table>,
    /// The untied `lm_head` in int8, as `embed_int8`.
    pub lm_head_int8: Option<Int8Table>,
}

impl ModelWeights {
    /// The output projection (`lm_head`, or the embedding table when tied).
    pub fn lm_head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    /// Loads and checks a checkpoint into f32, calling `progress(bytes_done)` as tensors are converted.
    pub fn load(ckpt: &Checkpoint, cfg: &LlamaConfig, progress: &(dyn Fn(u64) + Sync)) -> Result<Self> {
        check_checkpoint(ckpt, cfg)?;
        let done = std::sync::atomic::AtomicU64::new(0);
        let tick = |bytes: u64| {
            let total = done.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed) + bytes;
            progress(total);
        };
        Self::from_source(WeightSource::Checkpoint(ckpt), cfg, &tick)
    }

    /// Random weights at the config's shapes, reproducible from `seed` (see [`WeightSource::Random`]).
    pub fn random(cfg: &LlamaConfig, seed: u64) -> Result<Self> {
        Self::from_source(WeightSource::Random(seed), cfg, &|_| {})
    }

    /// Loads a quantized checkpoint (one with a `quantization_config`): each projection is read with
    /// [`read_linear`] (q;k;v and gate;up stacked along rows, as the dense layout fuses them) and kept both
    /// quantized and exactly dequantized; norms are read as in [`load`](Self::load), and the embedding table and
    /// an untied `lm_head` with [`read_table_f32`] (bf16, or int8 rows in an int8-embeddings checkpoint).
    pub fn load_quantized(
        ckpt: &Checkpoint,
        cfg: &LlamaConfig,
        qcfg: &QuantizationConfig,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Self> {
        check_quantized_checkpoint(ckpt, cfg)?;
        check_host_memory(cfg)?;
        let done = std::sync::atomic::AtomicU64::new(0);
        let tick = |bytes: u64| {
            let total = done.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed) + bytes;
            progress(total);
        };
        let src = WeightSource::Checkpoint(ckpt);
        let specs = ModelSpecs::of(cfg);
        let read = |s: &FusedSpec| src.read_f32(s, &tick);
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
        let proj = |prefixes: &[(String, usize)], k: usize| -> Result<LinearWeight> {
            let parts = prefixes
                .iter()
                .map(|(p, n)| read_linear(ckpt, p, qcfg, *n, k))
                .collect::<Result<Vec<QuantLinear>>>()?;
            let q = stack_rows(parts, &prefixes[0].0)?;
            tick(quantized_bytes(&q.matrix));
            Ok(LinearWeight::quantized(q))
        };
        let layers = specs
            .layers
            .par_iter()
            .enumerate()
            .map(|(l, ls)| {
                let p = format!("model.layers.{l}");
                let attn = |x: &str| format!("{p}.self_attn.{x}_proj");
                let mlp = |x: &str| format!("{p}.mlp.{x}_proj");
                Ok(LayerWeights {
                    attn_norm: read(&ls.attn_norm)?,
                    wqkv: proj(&[(attn("q"), q_dim), (attn("k"), kv_dim), (attn("v"), kv_dim)], h)?,
                    wo: proj(&[(attn("o"), h)], q_dim)?,
                    mlp_norm: read(&ls.mlp_norm)?,
                    w_gate_up: proj(&[(mlp("gate"), inter), (mlp("up"), inter)], h)?,
                    w_down: proj(&[(mlp("down"), h)], inter)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        // A table as f32, with its int8 form when the checkpoint stores it so.
        let table = |name: &str| -> Result<(Vec<f32>, Option<Int8Table>)> {
            let t = match read_table_int8(ckpt, name, v, h)? {
                Some(q) => (q.dequantize(), Some(q)),
                None => (read_table_f32(ckpt, name, v, h)?, None),
            };
            tick((t.0.len() * 2) as u64);
            Ok(t)
        };
        let (embed, embed_int8) = table("model.embed_tokens.weight")?;
        let (lm_head, lm_head_int8) = match specs.lm_head {
            Some(_) => {
                let (t, q) = table("lm_head.weight")?;
                (Some(t), q)
            }
            None => (None, None),
        };
        Ok(ModelWeights { embed, layers, final_norm: read(&specs.final_norm)?, lm_head, embed_int8, lm_head_int8 })
    }

    /// Quantizes the embedding table and an untied `lm_head` to int8 per row, as `llama32 quantize --embeddings
    /// int8` writes them ([`Int8Table::quantize`]): the f32 tables become their exact dequantizations and the int8
    /// forms are kept for the CUDA executor. Tables already in int8 are left as they are. For `--embeddings int8`.
    pub fn quantize_tables_int8(&mut self) -> Result<()> {
        let cols = self.final_norm.len();
        if cols == 0 {
            return Err(Error::request("cannot quantize the tables of a model with hidden size 0"));
        }
        Int8Table::quantize_in_place(&mut self.embed, &mut self.embed_int8, cols, "model.embed_tokens.weight")?;
        if let Some(h) = self.lm_head.as_mut() {
            Int8Table::quantize_in_place(h, &mut self.lm_head_int8, cols, "lm_head.weight")?;
        }
        Ok(())
    }

    /// The int8 form of the output projection (`lm_head_int8`, or `embed_int8` when tied), if it has one.
    pub fn lm_head_int8(&self) -> Option<&Int8Table> {
        match self.lm_head {
            Some(_) => self.lm_head_int8.as_ref(),
            None => self.embed_int8.as_ref(),
        }
    }

    /// Quantizes every decoder projection with `scheme` (torchao numerics, see [`quantize_bf16_rounded`]), after
    /// rounding its values to bf16 as a bf16 checkpoint would hold them; `dense` becomes the exact dequantization.
    /// Embeddings, norms and `lm_head` are left as they are. For `--quantize` and `quant-eval`.
    pub fn quantize_in_place(&mut self, scheme: Scheme) -> Result<()> {
        let hidden = self.final_norm.len();
        if hidden == 0 {
            return Err(Error::request("cannot quantize a model with hidden size 0"));
        }
        let mut all: Vec<(usize, &str, &mut LinearWeight, usize)> = Vec::new();
        for (l, lw) in self.layers.iter_mut().enumerate() {
            let inner = lw.w_down.len() / hidden;
            let o_in = lw.wo.len() / hidden;
            all.push((l, "wqkv", &mut lw.wqkv, hidden));
            all.push((l, "wo", &mut lw.wo, o_in));
            all.push((l, "w_gate_up", &mut lw.w_gate_up, hidden));
            all.push((l, "w_down", &mut lw.w_down, inner));
        }
        all.into_par_iter().try_for_each(|(l, name, w, k)| {
            let n = w.dense.len() / k.max(1);
            let matrix = quantize_bf16_rounded(w.dense.clone(), n, k, scheme.group)
                .map_err(|e| Error::request(format!("layer {l} {name} [{n}, {k}]: {e}")))?;
            *w = LinearWeight::quantized(QuantLinear { matrix, scheme });
            Ok(())
        })
    }

    /// Rounds every weight to bf16 (round to nearest even), in place: the unquantized baseline `quant-eval`
    /// compares against. Quantized projections are left alone (their values are already bf16 scale multiples).
    pub fn round_to_bf16(&mut self) {
        let round = |v: &mut [f32]| v.par_iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
        // Rounded, the tables are no longer their int8 forms' dequantizations.
        self.embed_int8 = None;
        self.lm_head_int8 = None;
        round(&mut self.embed);
        round(&mut self.final_norm);
        if let Some(h) = self.lm_head.as_mut() {
            round(h);
        }
        for lw in &mut self.layers {
            round(&mut lw.attn_norm);
            round(&mut lw.mlp_norm);
            for w in [&mut lw.wqkv, &mut lw.wo, &mut lw.w_gate_up, &mut lw.w_down] {
                if w.quant.is_none() {
                    round(&mut w.dense);
                }
            }
        }
    }

    /// The quantization scheme of the projections, if any is quantized (the first found).
    pub fn quant_scheme(&self) -> Option<Scheme> {
        self.layers
            .iter()
            .flat_map(|l| [&l.wqkv, &l.wo, &l.w_gate_up, &l.w_down])
            .find_map(|w| w.quant.as_ref().map(|q| q.scheme))
    }

    fn from_source(src: WeightSource<'_>, cfg: &LlamaConfig, tick: &(dyn Fn(u64) + Sync)) -> Result<Self> {
        check_host_memory(cfg)?;
        let specs = ModelSpecs::of(cfg);
        let read = |s: &FusedSpec| src.read_f32(s, tick);
        let layers = specs
            .layers
            .par_iter()
            .map(|l| {
                Ok(LayerWeights {
                    attn_norm: read(&l.attn_norm)?,
                    wqkv: read(&l.wqkv)?.into(),
                    wo: read(&l.wo)?.into(),
                    mlp_norm: read(&l.mlp_norm)?,
                    w_gate_up: read(&l.w_gate_up)?.into(),
                    w_down: read(&l.w_down)?.into(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelWeights {
            embed: read(&specs.embed)?,
            layers,
            final_norm: read(&specs.final_norm)?,
            lm_head: specs.lm_head.as_ref().map(read).transpose()?,
            embed_int8: None,
            lm_head_int8: None,
        })
    }
}

/// Bytes of a quantized matrix in a packed layout: two int4 values per byte, a bf16 scale per group and, when
/// present, an int4 zero point per group (rounded up to whole bytes).
pub fn quantized_bytes(m: &QuantMatrix) -> u64 {
    let groups = (m.n * m.groups()) as u64;
    (m.n * m.k) as u64 / 2 + groups * 2 + m.zeros.as_ref().map_or(0, |_| groups.div_ceil(2))
}

/// Stacks quantized matrices with the same `k`, group and scheme along rows (q;k;v, gate;up).
pub(crate) fn stack_rows(parts: Vec<QuantLinear>, what: &str) -> Result<QuantLinear> {
    let mut it = parts.into_iter();
    let first = it.next().ok_or_else(|| Error::request(format!("{what}: nothing to stack")))?;
    let (scheme, k, group) = (first.scheme, first.matrix.k, first.matrix.group);
    let mut m = first.matrix;
    for p in it {
        if p.scheme != scheme || p.matrix.k != k || p.matrix.group != group {
            return Err(Error::request(format!(
                "{what}: fused projections disagree (scheme {} vs {}, k {k} vs {}, group {group} vs {})",
                scheme.name(),
                p.scheme.name(),
                p.matrix.k,
                p.matrix.group
            )));
        }
        let groups_before = m.n * m.groups();
        let pg = p.matrix.n * p.matrix.groups();
        m.zeros = match (m.zeros.take(), p.matrix.zeros) {
            (None, None) => None,
            (a, b) => {
                let mut z = a.unwrap_or_else(|| vec![0; groups_before]);
                z.extend(b.unwrap_or_else(|| vec![0; pg]));
                Some(z)
            }
        };
        m.n += p.matrix.n;
        m.q.extend(p.matrix.q);
        m.scales.extend(p.matrix.scales);
    }
    Ok(QuantLinear { matrix: m, scheme })
}

pub(crate) fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
