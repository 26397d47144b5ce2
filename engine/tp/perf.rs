//! The tensor-parallel performance model behind `llama32 plan` (formulas in docs/parallelism.md).
//!
//! Decode is bandwidth-bound: a step reads every weight a rank holds (except the embedding table, which is only
//! gathered) and the KV of every sequence once. Per rank and step:
//!
//! ```text
//! t_mem  = (decode_weight_bytes_rank + batch * context * kv_bytes_per_token_rank
//!           + batch * images * cross_kv_bytes_per_image_rank) / (hbm_copy_gbps * decode_efficiency)
//! t_ar   = allreduces * (latency + 2 (N-1)/N * batch * hidden * 2 B / link_gbps_per_direction)
//! t_gath = latency + (N-1)/N * batch * vocab * 2 B / link_gbps_per_direction
//! t_step = t_mem + t_ar + t_gath            (no overlap of communication and compute: decode waits on each)
//! ```
//!
//! with `allreduces = 2 * num_hidden_layers + 1` (o and down of every layer, cross-attention layers included,
//! plus the vocab-parallel embedding) and the communication terms zero at tp = 1. With a quantization scheme
//! ([`predict_with`]) the language model's projections take int4 bytes and are read at the int4 kernels' measured
//! efficiency instead: `t_mem += int4_bytes_rank / (hbm_copy_gbps * int4_efficiency)`.

use std::path::Path;

use serde::Serialize;

use super::plan::{vision_split, Split, TpPlan};
use crate::config::{LlamaConfig, Preset};
use crate::quant::Scheme;
use crate::vision::config::{MllamaConfig, MllamaPreset};
use crate::{Error, Result};

/// Bytes per bf16 value.
const BF16: f64 = 2.0;

/// A number and where it comes from.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// The value.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// `measured`, `datasheet`, `derived` or `assumption`, with the source.
    pub source: String,
}

fn fig(value: f64, unit: &'static str, source: &str) -> Figure {
    Figure { value, unit, source: source.to_owned() }
}

/// The int4 projections' fraction of the copy bandwidth in a whole decode step, measured on an H200 and used for
/// both GPUs.
fn int4_efficiency() -> Figure {
    fig(
        0.48,
        "fraction",
        "measured on an H200 (bench/results/2026-11-27-h200-pdl-w4a16-defaults.md): 90B Vision W4A16 decode at \
         batch 1 with a 4-tile image, 24.9 ms/step for a step that reads 50.2 GB, whose int4 part this fraction \
         makes the model reproduce (the kernels alone reached 0.58-0.60 of the copy rate on the 90B shapes, the \
         rest is the step's other kernels and boundaries); applied as a fraction of this GPU's copy bandwidth \
         (W4A8 assumed the same)",
    )
}

/// The hardware inputs of the model.
#[derive(Clone, Debug, Serialize)]
pub struct Gpu {
    /// Short name.
    pub name: String,
    /// Device memory.
    pub memory_gb: Figure,
    /// Fraction of memory given to weights + KV + activations (the executor's `--gpu-memory-utilization`).
    pub memory_utilization: f64,
    /// Activations and workspaces set aside before the KV cache.
    pub activation_reserve_gb: Figure,
    /// HBM device-to-device copy bandwidth.
    pub hbm_copy_gbps: Figure,
    /// Achieved fraction of the copy bandwidth in a whole decode step.
    pub decode_efficiency: Figure,
    /// Achieved fraction of the copy bandwidth of the int4 projection kernels at decode batch sizes (W4A16, m <= 16).
    pub int4_efficiency: Figure,
    /// NVLink bandwidth per direction per GPU.
    pub link_gbps_per_direction: Figure,
    /// Fixed cost of one small all-reduce (or all-gather) across the group.
    pub collective_latency_us: Figure,
}

impl Gpu {
    /// The built-in figures for `name` (`h100`: H100 SXM 80 GB; `h200`: H200 SXM 141 GB).
    pub fn by_name(name: &str) -> Result<Gpu> {
        match name.to_ascii_lowercase().as_str() {
            "h100" | "h100-sxm" => Ok(Gpu {
                name: "h100".into(),
                memory_gb: fig(80.0, "GB", "datasheet (H100 SXM 80 GB)"),
                memory_utilization: 0.9,
                activation_reserve_gb: fig(1.0, "GB", "assumption (the CUDA executor's reserve for 2048 step tokens)"),
                hbm_copy_gbps: fig(
                    3019.0,
                    "GB/s",
                    "measured: H100 device-to-device copy, /work/shared/device-notes.md",
                ),
                decode_efficiency: fig(
                    2.13 / 3.03,
                    "fraction",
                    "measured: 3B bf16 decode at batch 1, 3.03 ms/step vs its 2.13 ms copy roofline \
                     (bench/results/2026-11-26-h100-suite-graphs-gemv-sampling.md)",
                ),
                int4_efficiency: int4_efficiency(),
                link_gbps_per_direction: fig(
                    450.0,
                    "GB/s",
                    "datasheet: NVLink 4, 900 GB/s total bidirectional per H100 SXM GPU",
                ),
                collective_latency_us: fig(
                    8.0,
                    "us",
                    "assumption: neither measured here (one GPU lent) nor a datasheet figure; override with \
                     --collective-latency-us",
                ),
            }),
            "h200" | "h200-sxm" => Ok(Gpu {
                name: "h200".into(),
                memory_gb: fig(150.75, "GB", "measured: nvidia-smi memory.total 143771 MiB on the lent H200"),
                memory_utilization: 0.9,
                activation_reserve_gb: fig(1.0, "GB", "assumption (the CUDA executor's reserve for 2048 step tokens)"),
                hbm_copy_gbps: fig(
                    4188.0,
                    "GB/s",
                    "measured: H200 device-to-device copy, mean of 4203.5 and 4171.6 in two calls \
                     (bench/results/2026-11-27-h200-suite-quant-vision-tp.md)",
                ),
                decode_efficiency: fig(
                    2.13 * 3019.0 / 4188.0 / 2.441,
                    "fraction",
                    "measured: 3B bf16 decode at batch 1, 2.441 ms/step on an H200 (PDL and the SwiGLU epilogue \
                     fusion on) vs its 1.54 ms copy roofline (bench/results/2026-11-27-h200-pdl-w4a16-defaults.md)",
                ),
                int4_efficiency: int4_efficiency(),
                link_gbps_per_direction: fig(
                    450.0,
                    "GB/s",
                    "datasheet: NVLink 4, 900 GB/s total bidirectional per H200 SXM GPU",
                ),
                collective_latency_us: fig(
                    8.0,
                    "us",
                    "assumption: neither measured here (one GPU lent) nor a datasheet figure; override with \
                     --collective-latency-us",
                ),
            }),
            other => Err(Error::request(format!("--gpu: unknown GPU `{other}`; known: h100, h200"))),
        }
    }
}

/// The shapes the model needs, for a text or a vision checkpoint.
#[derive(Clone, Debug)]
pub struct ModelShape {
    /// Name for output.
    pub name: String,
    /// The text decoder's config (for a vision model, its `text_config`).
    pub text: LlamaConfig,
    /// Cross-attention layers (0 for a text model).
    pub cross_layers: usize,
    /// Cross-attention K/V tokens per image (0 for a text model).
    pub vision_tokens_per_image: usize,
    /// The full model's vision config, if any.
    pub vision: Option<MllamaConfig>,
}

impl ModelShape {
    /// `1b`, `3b`, `11b-vision`, `90b-vision`, or a Hugging Face model directory.
    pub fn resolve(model: &str) -> Result<ModelShape> {
        if let Ok(p) = Preset::from_name(model) {
            return Ok(Self::text(model, p.config()));
        }
        if let Ok(p) = MllamaPreset::from_name(model) {
            return Ok(Self::vision(model, p.config()));
        }
        let dir = Path::new(model);
        if !dir.join("config.json").exists() {
            return Err(Error::request(format!(
                "--model: `{model}` is neither a preset (1b, 3b, 11b-vision, 90b-vision) nor a directory with a \
                 config.json"
            )));
        }
        if crate::vision::pipeline::is_mllama_dir(dir) {
            Ok(Self::vision(model, MllamaConfig::from_model_dir(dir)?))
        } else {
            Ok(Self::text(model, LlamaConfig::from_model_dir(dir)?))
        }
    }

    fn text(name: &str, cfg: LlamaConfig) -> ModelShape {
        ModelShape { name: name.into(), text: cfg, cross_layers: 0, vision_tokens_per_image: 0, vision: None }
    }

    fn vision(name: &str, cfg: MllamaConfig) -> ModelShape {
        ModelShape {
            name: name.into(),
            text: cfg.text.base.clone(),
            cross_layers: cfg.text.cross_attention_layers.len(),
            vision_tokens_per_image: cfg.vision_tokens_per_image(),
            vision: Some(cfg),
        }
    }

    /// Every checkpoint tensor: its values in all and on rank 0 under `plan`, whether decode reads it, and whether
    /// `llama32 quantize` turns it into int4 (the language model's q/k/v/o/gate/up/down projections).
    fn rank_tensors(&self, plan: &TpPlan) -> Result<Vec<RankTensor>> {
        let rows: Vec<(String, Vec<usize>, Split)> = match &self.vision {
            None => plan.tensor_shards(0)?.into_iter().map(|s| (s.name, s.shape, s.split)).collect(),
            Some(v) => crate::vision::weights::expected_tensors(v)
                .into_iter()
                .map(|(n, s)| vision_split(plan, 0, &n, &s).map(|sp| (n, s, sp)))
                .collect::<Result<_>>()?,
        };
        let tied = self.vision.is_none() && self.text.tie_word_embeddings;
        Ok(rows
            .into_iter()
            .map(|(name, shape, split)| {
                let full: usize = shape.iter().product();
                let mine = super::plan::TensorShard { name: name.clone(), shape, split }.numel();
                // A tied embedding table is read whole by lm_head every step; an untied one is only gathered.
                let decode_reads = !((name.ends_with("embed_tokens.weight") && !tied)
                    || name.starts_with("vision_model.")
                    || name.starts_with("multi_modal_projector."));
                let projection = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                    .iter()
                    .any(|p| name.ends_with(&format!(".{p}.weight")));
                let quantizable = projection && !name.starts_with("vision_model.");
                let table = name.ends_with("embed_tokens.weight") || name.ends_with("lm_head.weight");
                RankTensor { full: full as f64, mine: mine as f64, decode_reads, quantizable, table }
            })
            .collect())
    }
}

/// One checkpoint tensor as the model counts it.
struct RankTensor {
    /// Values in the whole model.
    full: f64,
    /// Values on rank 0.
    mine: f64,
    /// Whether decode reads it every step.
    decode_reads: bool,
    /// Whether `llama32 quantize` turns it into int4.
    quantizable: bool,
    /// The embedding table or `lm_head` (int8 with `--embeddings int8`).
    table: bool,
}

/// How the weights are stored: the projections' scheme (`None`: bf16) and whether the embedding and `lm_head` are
/// int8 per row (`--embeddings int8`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Storage {
    /// The language model's projections.
    pub projections: Option<Scheme>,
    /// Int8 tables (one byte per value and a bf16 scale per row, read at the bf16 rate).
    pub int8_tables: bool,
}

/// What the batch looks like.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Workload {
    /// Sequences decoding together.
    pub batch: usize,
    /// Tokens of context each sequence attends to.
    pub context: usize,
    /// Images per sequence (vision models: cross-attention K/V read each step).
    pub images: usize,
}

/// The model's predictions for one tensor-parallel size.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    /// Ranks.
    pub tp: usize,
    /// Weight bytes one rank holds (bf16, quantized projections in int4), replicated parts included.
    pub weight_bytes_per_rank: f64,
    /// Weight bytes of the whole model.
    pub weight_bytes_total: f64,
    /// Weight bytes one rank reads per decode step.
    pub decode_weight_bytes_per_rank: f64,
    /// Self-attention KV bytes per token on one rank.
    pub kv_bytes_per_token_per_rank: f64,
    /// Cross-attention KV bytes per image on one rank.
    pub cross_kv_bytes_per_image_per_rank: f64,
    /// Whether weights + reserve fit in the usable memory.
    pub fits: bool,
    /// KV tokens one rank can hold (= tokens the group can hold; each rank holds its heads of every token).
    pub kv_capacity_tokens: f64,
    /// Whether the workload fits too: the weights, and the batch's self-attention KV (batch x context tokens)
    /// plus its images' cross-attention KV in what the weights leave.
    pub workload_fits: bool,
    /// All-reduces per step.
    pub allreduces_per_step: usize,
    /// All-reduce payload per token per step (bytes summed over the all-reduces).
    pub allreduce_bytes_per_token: f64,
    /// Bytes each GPU sends per step in the ring all-reduces.
    pub allreduce_ring_bytes_per_gpu_per_step: f64,
    /// Logits all-gather bytes each GPU receives per step.
    pub logits_gather_bytes_per_step: f64,
    /// Memory time per step.
    pub t_memory_ms: f64,
    /// Communication time per step.
    pub t_comm_ms: f64,
    /// Predicted decode step time (= per-token latency).
    pub step_ms: f64,
    /// Predicted output tokens per second for the batch.
    pub tokens_per_s: f64,
}

/// Predicts decode for `shape` over `tp` ranks of `gpu` in bf16.
pub fn predict(shape: &ModelShape, tp: usize, gpu: &Gpu, w: &Workload) -> Result<Prediction> {
    predict_with(shape, tp, gpu, w, None)
}

/// Bytes per value of a quantized projection: int4 plus the group scales (bf16 for W4A16; the W4A8 kernels keep
/// f32 scales).
fn int4_bytes(scheme: Scheme) -> f64 {
    let scale = if scheme.act == crate::quant::ActQuant::None { 2.0 } else { 4.0 };
    0.5 + scale / scheme.group as f64
}

/// [`predict`] with the language model's projections quantized by `quant`: they take `int4_bytes` per value and
/// are read at the int4 kernels' efficiency ([`Gpu::int4_efficiency`]), everything else as in bf16. Decode batch
/// sizes only (the W4A16 path dequantizes to bf16 above 64 rows, which this does not model).
pub fn predict_with(
    shape: &ModelShape,
    tp: usize,
    gpu: &Gpu,
    w: &Workload,
    quant: Option<Scheme>,
) -> Result<Prediction> {
    predict_stored(shape, tp, gpu, w, Storage { projections: quant, int8_tables: false })
}

/// [`predict_with`] for any [`Storage`]: with `int8_tables` the embedding and `lm_head` take one byte per value
/// (plus a bf16 scale per row) and are read at the bf16 rate.
pub fn predict_stored(shape: &ModelShape, tp: usize, gpu: &Gpu, w: &Workload, st: Storage) -> Result<Prediction> {
    let quant = st.projections;
    let plan = TpPlan::new(&shape.text, tp)?;
    let tensors = shape.rank_tensors(&plan)?;
    let int8_row = 1.0 + BF16 / shape.text.hidden_size.max(1) as f64;
    let per_value = |t: &RankTensor| match (t.quantizable, quant) {
        (true, Some(s)) => int4_bytes(s),
        _ if t.table && st.int8_tables => int8_row,
        _ => BF16,
    };
    let total: f64 = tensors.iter().map(|t| t.full * per_value(t)).sum();
    let mine: f64 = tensors.iter().map(|t| t.mine * per_value(t)).sum();
    let read = |q: bool| -> f64 {
        tensors
            .iter()
            .filter(|t| t.decode_reads && (t.quantizable && quant.is_some()) == q)
            .map(|t| t.mine * per_value(t))
            .sum()
    };
    let (decode_dense, decode_int4) = (read(false), read(true));
    let decode = decode_dense + decode_int4;
    let c = &shape.text;
    let kv_heads = plan.kv_heads_per_rank() as f64;
    let per_layer_token = 2.0 * kv_heads * c.head_dim as f64 * BF16;
    let self_layers = (c.num_hidden_layers - shape.cross_layers) as f64;
    let kv_tok = self_layers * per_layer_token;
    let cross_img = shape.cross_layers as f64 * per_layer_token * shape.vision_tokens_per_image as f64;
    let usable = gpu.memory_gb.value * 1e9 * gpu.memory_utilization - gpu.activation_reserve_gb.value * 1e9;
    let free = usable - mine;
    let fits = free > 0.0;
    let kv_capacity = if fits { (free / kv_tok).floor() } else { 0.0 };
    let workload_kv = w.batch as f64 * (w.context as f64 * kv_tok + w.images as f64 * cross_img);
    let workload_fits = fits && workload_kv <= free;

    let (b, n) = (w.batch as f64, tp as f64);
    let bw = gpu.hbm_copy_gbps.value * 1e9 * gpu.decode_efficiency.value;
    let kv_read = b * w.context as f64 * kv_tok + b * w.images as f64 * cross_img;
    let int4_bw = gpu.hbm_copy_gbps.value * 1e9 * gpu.int4_efficiency.value;
    let t_mem = (decode_dense + kv_read) / bw + decode_int4 / int4_bw;
    let allreduces = 2 * c.num_hidden_layers + 1;
    let payload_token = allreduces as f64 * c.hidden_size as f64 * BF16;
    let link = gpu.link_gbps_per_direction.value * 1e9;
    let lat = gpu.collective_latency_us.value * 1e-6;
    let ring = if tp > 1 { 2.0 * (n - 1.0) / n * b * payload_token } else { 0.0 };
    let gather = if tp > 1 { (n - 1.0) / n * b * c.vocab_size as f64 * BF16 } else { 0.0 };
    let t_comm = if tp > 1 { (allreduces + 1) as f64 * lat + (ring + gather) / link } else { 0.0 };
    let step = t_mem + t_comm;
    Ok(Prediction {
        tp,
        weight_bytes_per_rank: mine,
        weight_bytes_total: total,
        decode_weight_bytes_per_rank: decode,
        kv_bytes_per_token_per_rank: kv_tok,
        cross_kv_bytes_per_image_per_rank: cross_img,
        fits,
        kv_capacity_tokens: kv_capacity,
        workload_fits,
        allreduces_per_step: if tp > 1 { allreduces } else { 0 },
        allreduce_bytes_per_token: if tp > 1 { payload_token } else { 0.0 },
        allreduce_ring_bytes_per_gpu_per_step: ring,
        logits_gather_bytes_per_step: gather,
        t_memory_ms: t_mem * 1e3,
        t_comm_ms: t_comm * 1e3,
        step_ms: step * 1e3,
        tokens_per_s: b / step,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ninety_b_needs_four_h100s_and_scales_sublinearly() {
        let shape = ModelShape::resolve("90b-vision").unwrap();
        let gpu = Gpu::by_name("h100").unwrap();
        let w = Workload { batch: 1, context: 2048, images: 0 };
        let p: Vec<Prediction> = [1, 2, 4, 8].iter().map(|&tp| predict(&shape, tp, &gpu, &w).unwrap()).collect();
        // 88.6 B parameters in bf16.
        assert!((p[0].weight_bytes_total / 1e9 - 177.2).abs() < 1.0, "{}", p[0].weight_bytes_total);
        assert!(!p[0].fits && !p[1].fits && p[2].fits && p[3].fits);
        // Memory time halves with each doubling (up to the replicated vision encoder); communication grows.
        assert!(p[3].t_memory_ms < p[2].t_memory_ms * 0.55);
        assert!(p[3].t_comm_ms > p[2].t_comm_ms);
        assert!(p[3].step_ms < p[2].step_ms);
        // 100 layers: 201 all-reduces of 8192 bf16 values per token.
        assert_eq!(p[3].allreduces_per_step, 201);
        assert_eq!(p[3].allreduce_bytes_per_token, 201.0 * 8192.0 * 2.0);
        // tp = 8 holds one KV head per rank: 80 self-attention layers x 2 x 128 x 2 bytes.
        assert_eq!(p[3].kv_bytes_per_token_per_rank, 80.0 * 2.0 * 128.0 * 2.0);
    }

    #[test]
    fn h200_figures_against_its_measured_decode() {
        let gpu = Gpu::by_name("h200").unwrap();
        // Calibrated on the measured 3B step, as for the H100.
        let w = Workload { batch: 1, context: 0, images: 0 };
        let p3 = predict(&ModelShape::resolve("3b").unwrap(), 1, &gpu, &w).unwrap();
        assert!((p3.step_ms - 2.441).abs() < 0.1, "{}", p3.step_ms);
        // 11B Vision with one 4-tile image measured 6.09-6.19 ms/token on the same card: the model, calibrated on the
        // smaller 3B matrices, is conservative for 11B but within 25 %.
        let w = Workload { batch: 1, context: 256, images: 1 };
        let p11 = predict(&ModelShape::resolve("11b-vision").unwrap(), 1, &gpu, &w).unwrap();
        assert!(p11.step_ms > 6.09 && p11.step_ms < 6.19 * 1.25, "{}", p11.step_ms);
        // 90B in bf16 needs two H200s (four H100s).
        let w = Workload { batch: 1, context: 2048, images: 0 };
        let shape = ModelShape::resolve("90b-vision").unwrap();
        assert!(!predict(&shape, 1, &gpu, &w).unwrap().fits && predict(&shape, 2, &gpu, &w).unwrap().fits);
        // 90B in W4A16 on one H200 measured 24.9 ms/step at batch 1 (128-token prompt, up to 32 generated, one
        // 4-tile image), which calibrates the int4 efficiency: the model must reproduce it within 5 %.
        let w = Workload { batch: 1, context: 144, images: 1 };
        let q = predict_with(&shape, 1, &gpu, &w, Some(Scheme::W4A16_G32)).unwrap();
        assert!((q.step_ms / 24.9 - 1.0).abs() < 0.05, "{}", q.step_ms);
    }

    #[test]
    fn int8_tables_free_memory_and_step_time() {
        let shape = ModelShape::resolve("90b-vision").unwrap();
        let gpu = Gpu::by_name("h100").unwrap();
        let w = Workload { batch: 1, context: 2048, images: 1 };
        let w4 = Storage { projections: Some(Scheme::W4A16_G32), int8_tables: false };
        let (a, b) = (
            predict_stored(&shape, 1, &gpu, &w, w4).unwrap(),
            predict_stored(&shape, 1, &gpu, &w, Storage { int8_tables: true, ..w4 }).unwrap(),
        );
        // Two tables of about 128k x 8192 values: half of their 4.2 GB saved, and the lm_head read halved.
        let saved = a.weight_bytes_per_rank - b.weight_bytes_per_rank;
        assert!((saved / 1e9 - 2.1).abs() < 0.1, "{saved}");
        let read = a.decode_weight_bytes_per_rank - b.decode_weight_bytes_per_rank;
        assert!((read / 1e9 - 1.05).abs() < 0.05, "{read}");
        assert!(b.kv_capacity_tokens > a.kv_capacity_tokens + 6_000.0 && b.step_ms < a.step_ms);
        // The same as predict_with without int8 tables.
        let c = predict_with(&shape, 1, &gpu, &w, Some(Scheme::W4A16_G32)).unwrap();
        assert_eq!(c.weight_bytes_per_rank, a.weight_bytes_per_rank);
    }

    #[test]
    fn ninety_b_vision_in_w4a16_fits_one_h100() {
        let shape = ModelShape::resolve("90b-vision").unwrap();
        let gpu = Gpu::by_name("h100").unwrap();
        let w = Workload { batch: 1, context: 2048, images: 1 };
        let bf16 = predict(&shape, 1, &gpu, &w).unwrap();
        let q = predict_with(&shape, 1, &gpu, &w, Some(Scheme::W4A16_G32)).unwrap();
        assert!(!bf16.fits && q.fits, "{} GB", q.weight_bytes_per_rank / 1e9);
        // About 86 B projection values at 0.5625 B, plus 2.1 B bf16 values (embeddings, lm_head, the vision tower).
        assert!((q.weight_bytes_total / 1e9 - 53.0).abs() < 3.0, "{}", q.weight_bytes_total / 1e9);
        assert!(q.kv_capacity_tokens > 20_000.0, "{}", q.kv_capacity_tokens);
        // Reading 48 GB of int4 at 0.48 of 3019 GB/s dominates: over the 20 ms target until the kernels improve.
        assert!(q.step_ms > 25.0 && q.step_ms < 40.0, "{}", q.step_ms);
        // Nothing but the projections changes: the 1B's tied embedding is read in bf16 either way.
        let one = ModelShape::resolve("1b").unwrap();
        let (a, b) =
            (predict(&one, 1, &gpu, &w).unwrap(), predict_with(&one, 1, &gpu, &w, Some(Scheme::W4A16_G32)).unwrap());
        assert!(b.decode_weight_bytes_per_rank < a.decode_weight_bytes_per_rank * 0.5);
        assert!(b.decode_weight_bytes_per_rank > a.decode_weight_bytes_per_rank * 0.25);
    }

    #[test]
    fn text_presets_and_bad_sizes() {
        let shape = ModelShape::resolve("3b").unwrap();
        let gpu = Gpu::by_name("h100").unwrap();
        let w = Workload { batch: 1, context: 0, images: 0 };
        let p1 = predict(&shape, 1, &gpu, &w).unwrap();
        // The tied embedding table is read once per step, as lm_head; at tp = 1 the model reproduces the measured
        // 3B step it was calibrated on.
        assert!((p1.step_ms - 3.03).abs() < 0.1, "{}", p1.step_ms);
        let e = predict(&shape, 16, &gpu, &w).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
        assert!(Gpu::by_name("a100").is_err());
        assert!(ModelShape::resolve("/nonexistent").is_err());
    }
}
