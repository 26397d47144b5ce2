//! `llama32 plan`: the tensor-parallel performance model (see docs/parallelism.md and [`crate::tp::perf`]).

use clap::Args;

use crate::quant::format::EmbeddingQuant;
use crate::quant::Scheme;
use crate::tp::perf::{predict_stored, Gpu, ModelShape, Prediction, Storage, Workload};
use crate::tp::TpPlan;
use crate::{Error, Result};

/// Arguments of the subcommand.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Model: a preset (1b, 3b, 11b-vision, 90b-vision) or a Hugging Face model directory.
    #[arg(long, default_value = "90b-vision")]
    model: String,
    /// Tensor-parallel size to detail (the table shows 1, 2, 4, 8 and this one).
    #[arg(long, default_value_t = 8)]
    tp: usize,
    /// GPU whose figures to use (h100, h200).
    #[arg(long, default_value = "h100")]
    gpu: String,
    /// Sequences decoding together (their KV must fit, else the table says "no (KV)").
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Context tokens per sequence, up to the model's context length.
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// Images per sequence (vision models only: their cross-attention K/V are read every step).
    #[arg(long, default_value_t = 0)]
    images: usize,
    /// Override the per-collective latency (microseconds; the default is an assumption, see the output).
    #[arg(long)]
    collective_latency_us: Option<f64>,
    /// Override the NVLink bandwidth per direction (GB/s).
    #[arg(long)]
    link_gbps: Option<f64>,
    /// Quantize the language model's projections (w4a16-g32, w4a8-g32): int4 bytes, read at the int4 kernels'
    /// measured efficiency.
    #[arg(long)]
    quantize: Option<String>,
    /// How the embedding and lm_head are stored: bf16, or int8 (one byte per value, as `llama32 quantize
    /// --embeddings int8` writes them and the CUDA executors keep them).
    #[arg(long, default_value = "bf16")]
    embeddings: String,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

fn gb(b: f64) -> String {
    format!("{:.2} GB", b / 1e9)
}

/// Runs the subcommand.
pub fn cmd_plan(a: PlanArgs) -> Result<()> {
    let shape = ModelShape::resolve(&a.model)?;
    let mut gpu = Gpu::by_name(&a.gpu)?;
    if let Some(l) = a.collective_latency_us {
        if !(l.is_finite() && l >= 0.0) {
            return Err(Error::request(format!("--collective-latency-us: must be a finite number >= 0, got {l}")));
        }
        gpu.collective_latency_us.value = l;
        gpu.collective_latency_us.source = "given with --collective-latency-us".into();
    }
    if let Some(l) = a.link_gbps {
        if !(l.is_finite() && l > 0.0) {
            return Err(Error::request(format!("--link-gbps: must be a finite number > 0, got {l}")));
        }
        gpu.link_gbps_per_direction.value = l;
        gpu.link_gbps_per_direction.source = "given with --link-gbps".into();
    }
    if a.batch == 0 || a.context == 0 {
        return Err(Error::request("--batch and --context must be at least 1"));
    }
    let max_ctx = shape.text.max_position_embeddings;
    if a.context > max_ctx {
        return Err(Error::request(format!(
            "--context {}: over {}'s context length of {max_ctx} tokens",
            a.context, shape.name
        )));
    }
    if a.images > 0 && shape.cross_layers == 0 {
        return Err(Error::request(format!("--images: {} is a text model (no cross-attention)", shape.name)));
    }
    let w = Workload { batch: a.batch, context: a.context, images: a.images };
    let quant = a.quantize.as_deref().map(Scheme::parse).transpose()?;
    let int8_tables = match EmbeddingQuant::parse(&a.embeddings) {
        Ok(e) => e == EmbeddingQuant::Int8,
        Err(_) => {
            return Err(Error::request(format!("--embeddings `{}`: expected bf16 or int8", a.embeddings)));
        }
    };
    let st = Storage { projections: quant, int8_tables };
    let detail = predict_stored(&shape, a.tp, &gpu, &w, st)?;
    let plan = TpPlan::new(&shape.text, a.tp)?;
    // 1, 2, 4, 8, and the detailed degree where it is another.
    let mut sizes = vec![1, 2, 4, 8];
    if !sizes.contains(&a.tp) {
        sizes.push(a.tp);
        sizes.sort_unstable();
    }
    let table: Vec<std::result::Result<Prediction, String>> =
        sizes.iter().map(|&tp| predict_stored(&shape, tp, &gpu, &w, st).map_err(|e| e.to_string())).collect();
    if a.json {
        let rows: Vec<serde_json::Value> = table
            .iter()
            .zip(&sizes)
            .map(|(p, tp)| match p {
                Ok(p) => serde_json::to_value(p).unwrap_or_default(),
                Err(e) => serde_json::json!({"tp": tp, "error": e}),
            })
            .collect();
        let out = serde_json::json!({
            "model": shape.name,
            "gpu": gpu,
            "workload": w,
            "quantize": quant.map(|q| q.name()),
            "embeddings": if int8_tables { "int8" } else { "bf16" },
            "plan": {
                "tp": a.tp,
                "heads_per_rank": plan.heads_per_rank(),
                "kv_heads_per_rank": plan.kv_heads_per_rank(),
                "kv_replication": plan.kv_replication(),
                "intermediate_per_rank": shape.text.intermediate_size / a.tp,
                "vocab_per_rank": shape.text.vocab_size / a.tp,
            },
            "detail": detail,
            "table": rows,
        });
        outln!("{}", serde_json::to_string_pretty(&out).unwrap_or_default())?;
        return Ok(());
    }
    let p = &detail;
    outln!(
        "model {} on {} x {}, batch {}, context {}, images {}",
        shape.name,
        a.tp,
        gpu.name,
        w.batch,
        w.context,
        w.images
    )?;
    outln!(
        "  per rank: {} query heads, {} KV heads (each KV head on {} rank(s)), intermediate {}, vocab {}",
        plan.heads_per_rank(),
        plan.kv_heads_per_rank(),
        plan.kv_replication(),
        shape.text.intermediate_size / a.tp,
        shape.text.vocab_size / a.tp
    )?;
    outln!(
        "  weights: {} per rank of {} ({}{}); decode reads {} per rank per step",
        gb(p.weight_bytes_per_rank),
        gb(p.weight_bytes_total),
        quant.map_or_else(|| "bf16".to_string(), |q| format!("bf16, projections {}", q.name())),
        if int8_tables { ", int8 embedding and lm_head" } else { "" },
        gb(p.decode_weight_bytes_per_rank)
    )?;
    outln!(
        "  KV: {:.0} B per token per rank; capacity {} tokens at {} of {} GB minus {} GB reserve{}",
        p.kv_bytes_per_token_per_rank,
        p.kv_capacity_tokens,
        gpu.memory_utilization,
        gpu.memory_gb.value,
        gpu.activation_reserve_gb.value,
        if p.fits { "" } else { " (weights do not fit)" }
    )?;
    if p.fits && !p.workload_fits {
        outln!(
            "  the workload does not fit: batch {} x context {} needs {:.0} KV tokens{}",
            w.batch,
            w.context,
            w.batch as f64 * w.context as f64,
            if w.images > 0 { format!(" and {} image(s) per sequence", w.images) } else { String::new() }
        )?;
    }
    if p.cross_kv_bytes_per_image_per_rank > 0.0 {
        outln!("  cross-attention KV: {} per image per rank", gb(p.cross_kv_bytes_per_image_per_rank))?;
    }
    outln!(
        "  all-reduce: {} per step, {:.0} B payload per token; ring sends {:.0} B per GPU per step; logits all-gather {:.0} B",
        p.allreduces_per_step, p.allreduce_bytes_per_token, p.allreduce_ring_bytes_per_gpu_per_step, p.logits_gather_bytes_per_step
    )?;
    outln!()?;
    outln!("| tp | weights/rank | fits | KV capacity (tokens) | t_mem ms | t_comm ms | step ms | tok/s |")?;
    outln!("|---|---|---|---|---|---|---|---|")?;
    for (r, tp) in table.iter().zip(&sizes) {
        match r {
            Ok(p) => outln!(
                "| {tp} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} |",
                gb(p.weight_bytes_per_rank),
                match (p.fits, p.workload_fits) {
                    (true, true) => "yes",
                    (true, false) => "no (KV)",
                    _ => "no (weights)",
                },
                p.kv_capacity_tokens,
                p.t_memory_ms,
                p.t_comm_ms,
                p.step_ms,
                p.tokens_per_s
            )?,
            Err(e) => outln!("| {tp} | {e} |  |  |  |  |  |  |")?,
        }
    }
    if quant.is_some_and(|q| q.act != crate::quant::ActQuant::None) {
        outln!("(tensor parallelism refuses W4A8: the rows with tp > 1 are predictions only)")?;
    }
    outln!()?;
    outln!("inputs:")?;
    let int4 = quant.map(|_| ("int4 projection efficiency", &gpu.int4_efficiency));
    for (what, f) in [
        ("HBM copy", &gpu.hbm_copy_gbps),
        ("decode efficiency", &gpu.decode_efficiency),
        ("NVLink per direction", &gpu.link_gbps_per_direction),
        ("collective latency", &gpu.collective_latency_us),
        ("memory", &gpu.memory_gb),
        ("activation reserve", &gpu.activation_reserve_gb),
    ]
    .into_iter()
    .chain(int4)
    {
        outln!("  {what}: {:.3} {} ({})", f.value, f.unit, f.source)?;
    }
    Ok(())
}
