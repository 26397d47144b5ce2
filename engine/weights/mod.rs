//! Checkpoint loading: memory-mapped safetensors (single file or sharded), checked tensor by tensor against the
//! config, converted into a backend's layout. Also generates random weights at a preset's real shapes.

pub mod safetensors;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;

pub use self::safetensors::{DType, SafeTensorsFile, TensorInfo, TensorView};
use crate::config::LlamaConfig;
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
                if file.contains('/') || file.contains('\\') || file.starts_with("..") {
                    return Err(Error::weights(&index_path, format!("weight_map[`{tensor}`]: bad file name `{file}`")));
                }
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_owned());
                }
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
            Some((view, path)) if view.shape != shape.as_slice() => problems.push(format!(
                "tensor `{name}` in {} has shape {:?}, expected {shape:?}",
                path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default(),
                view.shape
            )),
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    for name in ckpt.names() {
        let ignorable = name.ends_with(".rotary_emb.inv_freq") || (cfg.tie_word_embeddings && name == "lm_head.weight");
        if !known.contains(name) && !ignorable {
            problems.push(format!("unexpected tensor `{name}` (not part of LlamaForCausalLM with this config)"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        let n = problems.len();
        let shown: Vec<String> = problems.into_iter().take(20).collect();
        let more = if n > 20 { format!("\n  ... and {} more", n - 20) } else { String::new() };
        Err(Error::weights(ckpt.dir(), format!("{n} tensor problem(s):\n  {}{more}", shown.join("\n  "))))
    }
}

/// One decoder layer's weights in the CPU layout: f32, row-major `[out, in]`, projections fused.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// `input_layernorm` `[hidden]`.
    pub attn_norm: Vec<f32>,
    /// q, k and v projections stacked: `[q_dim + 2 * kv_dim, hidden]`.
    pub wqkv: Vec<f32>,
    /// Output projection `[hidden, q_dim]`.
    pub wo: Vec<f32>,
    /// `post_attention_layernorm` `[hidden]`.
    pub mlp_norm: Vec<f32>,
    /// Gate and up projections stacked: `[2 * intermediate, hidden]`.
    pub w_gate_up: Vec<f32>,
    /// Down projection `[hidden, intermediate]`.
    pub w_down: Vec<f32>,
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
        let read = |names: &[String]| -> Result<Vec<f32>> {
            let views: Vec<TensorView<'_>> = names
                .iter()
                .map(|n| {
                    ckpt.get(n).map(|(v, _)| v).ok_or_else(|| Error::weights(ckpt.dir(), format!("missing `{n}`")))
                })
                .collect::<Result<_>>()?;
            let mut out = vec![0.0f32; views.iter().map(TensorView::numel).sum()];
            let mut rest = out.as_mut_slice();
            for v in &views {
                let (head, tail) = rest.split_at_mut(v.numel());
                v.to_f32_into(head);
                rest = tail;
                let total = done.fetch_add(v.bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                progress(total + v.bytes.len() as u64);
            }
            Ok(out)
        };
        let one = |n: &str| read(&[n.to_string()]);
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|l| {
                let p = format!("model.layers.{l}");
                Ok(LayerWeights {
                    attn_norm: one(&format!("{p}.input_layernorm.weight"))?,
                    wqkv: read(&[
                        format!("{p}.self_attn.q_proj.weight"),
                        format!("{p}.self_attn.k_proj.weight"),
                        format!("{p}.self_attn.v_proj.weight"),
                    ])?,
                    wo: one(&format!("{p}.self_attn.o_proj.weight"))?,
                    mlp_norm: one(&format!("{p}.post_attention_layernorm.weight"))?,
                    w_gate_up: read(&[format!("{p}.mlp.gate_proj.weight"), format!("{p}.mlp.up_proj.weight")])?,
                    w_down: one(&format!("{p}.mlp.down_proj.weight"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelWeights {
            embed: one("model.embed_tokens.weight")?,
            layers,
            final_norm: one("model.norm.weight")?,
            lm_head: if cfg.tie_word_embeddings { None } else { Some(one("lm_head.weight")?) },
        })
    }

    /// Random weights at the config's shapes, reproducible from `seed`: projections uniform with standard
    /// deviation 0.02 (HF's initializer range), norms at 1. Meant for benchmarking and smoke runs only.
    pub fn random(cfg: &LlamaConfig, seed: u64) -> Self {
        let fill = |n: usize, stream: u64| -> Vec<f32> {
            let mut out = vec![0.0f32; n];
            out.par_chunks_mut(1 << 16).enumerate().for_each(|(chunk, o)| {
                let mut s = splitmix(seed ^ splitmix(stream.wrapping_mul(0x9E37_79B9) ^ chunk as u64));
                let a = 0.02f32 * 3f32.sqrt();
                for v in o {
                    s = splitmix(s);
                    *v = ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a;
                }
            });
            out
        };
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let s = 16 * (l as u64 + 1);
                LayerWeights {
                    attn_norm: vec![1.0; h],
                    wqkv: fill((cfg.q_dim() + 2 * cfg.kv_dim()) * h, s),
                    wo: fill(h * cfg.q_dim(), s + 1),
                    mlp_norm: vec![1.0; h],
                    w_gate_up: fill(2 * i * h, s + 2),
                    w_down: fill(h * i, s + 3),
                }
            })
            .collect();
        ModelWeights {
            embed: fill(v * h, 1),
            layers,
            final_norm: vec![1.0; h],
            lm_head: (!cfg.tie_word_embeddings).then(|| fill(v * h, 2)),
        }
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
