//! `llama32 quantize`: writes a 4-bit checkpoint (layout in `engine/quant/format.rs` and docs/quantization.md).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::quant::format::{quantize_checkpoint, EmbeddingQuant, QuantizeOptions};
use crate::quant::Scheme;
use crate::Result;

/// Arguments of the subcommand.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The bf16 (or f16/f32) Hugging Face checkpoint directory (LlamaForCausalLM or MllamaForConditionalGeneration).
    #[arg(long)]
    pub model: PathBuf,
    /// `w4a16-g32` (weight-only) or `w4a8-g32` (int8 per-token dynamic activations, torchao 8da4w).
    #[arg(long, default_value = "w4a16-g32")]
    pub scheme: String,
    /// The output directory (created; must be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Embeddings and lm_head: `bf16` (unchanged) or `int8` (per-row symmetric int8 with bf16 scales).
    #[arg(long, default_value = "bf16")]
    pub embeddings: String,
    /// Write into a non-empty output directory, replacing its weights.
    #[arg(long)]
    pub force: bool,
}

/// Runs the subcommand.
pub fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    let scheme = Scheme::parse(&a.scheme)?;
    let opts =
        QuantizeOptions { embeddings: EmbeddingQuant::parse(&a.embeddings)?, force: a.force, ..Default::default() };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("quantizing {bar:40} {binary_bytes}/{binary_total_bytes} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let result = quantize_checkpoint(&a.model, &a.out, scheme, &opts, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let r = result?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    outln!(
        "quantized {} projections to {}{} and copied {} tensors in {:.1}s: {} bytes ({:.2} GiB) -> {} bytes ({:.2} GiB, \
         {:.1}%) in {} file{}; wrote {}",
        r.tensors_int4,
        scheme.name(),
        if r.tensors_int8 > 0 { format!(" ({} tables to int8)", r.tensors_int8) } else { String::new() },
        r.tensors_copied,
        t0.elapsed().as_secs_f64(),
        r.bytes_in,
        gib(r.bytes_in),
        r.bytes_out,
        gib(r.bytes_out),
        100.0 * r.bytes_out as f64 / r.bytes_in.max(1) as f64,
        r.shards,
        if r.shards == 1 { "" } else { "s" },
        a.out.display()
    )?;
    if !r.broken_links.is_empty() {
        eprintln!(
            "warning: not copied, symbolic links to nothing in {}: {}",
            a.model.display(),
            r.broken_links.join(", ")
        );
    }
    Ok(())
}
