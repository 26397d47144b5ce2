//! Llama 3.2 Vision behind `serve`/`batch` (the engine with its image encoder), and `logits --image` as CUDA
//! tensor-parallel ranks.

use std::path::PathBuf;
use std::sync::Arc;

use super::nodes::{lead_nodes, Lead};
use super::ranks::{cuda_rank_placement, tp_comm_kind};
use super::{EngineArgs, CPU_DEFAULT_KV_TOKENS};
use crate::cli::{load, load_tokenizer, ModelArgs};
use crate::serve::engine::EngineHandle;
use crate::serve::{api::ServeContext, context_for};
use crate::{Error, Result};

/// [`start_engine`] for a Llama 3.2 Vision checkpoint: the text decoder runs in the engine's batched executor (CPU
/// reference, CPU tensor-parallel ranks, CUDA, or CUDA tensor-parallel ranks), the image encoder in the request
/// handlers (on the CUDA device too with `--device cuda`, on the first rank's GPU with tensor parallelism, else the
/// CPU reference). On CUDA without `--kv-tokens`, the self-attention KV cache gets what the device memory holds
/// under `--gpu-memory-utilization` (ranks sharing a GPU split it). With `lead` (node 0 of a multi-node run) the
/// text decoder is this node's ranks of the global group, driving the other nodes' ranks; the image encoder runs
/// on node 0 only, and the encoded images travel to the other nodes with the executor calls.
///
/// [`start_engine`]: super::start_engine
pub(super) fn start_vision_engine(
    a: &ModelArgs,
    e: &EngineArgs,
    dir: &std::path::Path,
    lead: Option<Lead>,
) -> Result<(EngineHandle, ServeContext)> {
    let tok = load_tokenizer(a)?.map(Arc::new);
    let tp = e.tensor_parallel;
    let device = load::Device::parse(&a.device)?;
    // CUDA ranks: the degree and the placement are checked before anything loads (a multi-node run's in
    // `node_role`).
    let cuda_tp = match (device, &lead) {
        (load::Device::Cuda(_), Some(lead)) => Some((lead.placement.clone(), crate::tp::cuda::TpCommKind::Nccl)),
        (load::Device::Cuda(_), None) if tp > 1 => {
            let cfg = crate::vision::config::MllamaConfig::from_model_dir(dir)?;
            crate::tp::TpPlan::new(&cfg.text.base, tp)?;
            let placement = cuda_rank_placement(&a.device, tp, e.devices.as_deref(), false)?;
            let kind = tp_comm_kind("auto", &placement)?;
            Some((placement, kind))
        }
        _ => None,
    };
    let t0 = std::time::Instant::now();
    // With tensor parallelism the ranks read their own slices of the checkpoint, so only the vision half is
    // converted here.
    // The CPU reference converts the whole model (its projections quantized by --quantize); the CUDA decoder reads
    // the checkpoint one layer at a time in the engine thread (`cli::vision::cuda_text_decoder`).
    let (mut encoder, text) = if tp == 1 && cuda_tp.is_none() && device == load::Device::Cpu {
        let at_load = load::at_load(a)?;
        let model = if a.random_weights {
            crate::vision::pipeline::MllamaModel::random(dir, a.seed(), at_load)?
        } else {
            crate::vision::pipeline::MllamaModel::load_with(dir, at_load)?
        };
        let (encoder, text) = model.split();
        (encoder, Some(text))
    } else {
        let encoder = if a.random_weights {
            crate::vision::pipeline::ImageEncoder::random(dir, a.seed())?
        } else {
            crate::vision::pipeline::ImageEncoder::load(dir)?
        };
        (encoder, None)
    };
    eprintln!("loaded {} (Llama 3.2 Vision) in {:.1} s", dir.display(), t0.elapsed().as_secs_f64());
    let cfg = encoder.cfg.clone();
    // The image encoder on the text decoder's GPU (its first rank's), on a stream of its own.
    let cuda_device = match (&cuda_tp, device) {
        (Some((placement, _)), _) => Some(placement[0]),
        (None, load::Device::Cuda(ordinal)) => Some(ordinal),
        (None, load::Device::Cpu) => None,
    };
    if let Some(d) = cuda_device {
        encoder.use_cuda(d)?;
        eprintln!("image encoder on cuda:{d} (bf16)");
    }
    let kv_tokens = a.kv_tokens.unwrap_or(CPU_DEFAULT_KV_TOKENS);
    let block = a.block_size;
    let ckpt_dir = dir.to_path_buf();
    // The CUDA text decoder: `--kv-tokens` exactly, or what fits under --gpu-memory-utilization.
    let cuda_opts = vision_cuda_options(a, e, cuda_device.unwrap_or(0));
    let at_load = load::at_load(a)?;
    let random_seed = a.random_weights.then_some(a.seed());
    let make = move || -> Result<Box<dyn crate::exec::Executor>> {
        use crate::exec::Executor as _;
        if let Some((placement, kind)) = cuda_tp {
            let t0 = std::time::Instant::now();
            let ckpt = crate::weights::Checkpoint::open(&ckpt_dir)?;
            if let Some(lead) = &lead {
                let spec = lead.node.group_spec();
                let exec = crate::tp::cuda_vision::TpMllamaCudaExecutor::join_node(
                    cfg,
                    (&ckpt, at_load),
                    &placement,
                    &spec,
                    &cuda_opts,
                )?;
                eprintln!(
                    "Llama 3.2 Vision text decoder as {} on {:?} (nccl; vision encoder on node 0's cuda:{}) in {:.1} \
                     s: KV cache {} blocks of {} tokens per rank",
                    lead.node.describe(),
                    placement,
                    placement[0],
                    t0.elapsed().as_secs_f64(),
                    exec.num_blocks(),
                    exec.block_size()
                );
                return lead_nodes(exec, lead);
            }
            let exec = crate::tp::cuda_vision::TpMllamaCudaExecutor::new_quantized(
                cfg,
                &ckpt,
                tp,
                (&placement, kind),
                &cuda_opts,
                at_load,
            )?;
            let mut gpus: Vec<String> = Vec::new();
            for d in &placement {
                let name = format!("cuda:{d}");
                if !gpus.contains(&name) {
                    gpus.push(name);
                }
            }
            eprintln!(
                "Llama 3.2 Vision text decoder as {tp} tensor-parallel CUDA ranks on {} ({}; vision encoder \
                 replicated, on cuda:{}) in {:.1} s: KV cache {} blocks of {} tokens ({} tokens) per rank",
                gpus.join(","),
                exec.comm_name(),
                placement[0],
                t0.elapsed().as_secs_f64(),
                exec.num_blocks(),
                exec.block_size(),
                exec.num_blocks() * exec.block_size()
            );
            return Ok(Box::new(exec));
        }
        match text {
            None if matches!(device, load::Device::Cuda(_)) => {
                let exec = crate::cli::vision::cuda_text_decoder((at_load, random_seed), &ckpt_dir, &cfg, &cuda_opts)?;
                eprintln!(
                    "Llama 3.2 Vision text decoder on cuda:{}: KV cache {} blocks of {} tokens ({} tokens{}), {} \
                     cross-attention tiles",
                    cuda_opts.device,
                    exec.num_blocks(),
                    exec.block_size(),
                    exec.num_blocks() * exec.block_size(),
                    match cuda_opts.gpu_memory_utilization {
                        Some(u) => format!(", sized under --gpu-memory-utilization {u}"),
                        None => String::new(),
                    },
                    cuda_opts.cross_tiles
                );
                Ok(Box::new(exec))
            }
            Some(text) => Ok(Box::new(crate::vision::exec::MllamaCpuExecutor::new(cfg, text, kv_tokens, block)?)),
            None => {
                let ckpt = crate::weights::Checkpoint::open(&ckpt_dir)?;
                let exec =
                    crate::tp::vision::TpMllamaCpuExecutor::new_quantized(cfg, &ckpt, tp, (kv_tokens, block), at_load)?;
                eprintln!(
                    "Llama 3.2 Vision text decoder as {tp} tensor-parallel CPU ranks (vision encoder replicated)"
                );
                Ok(Box::new(exec))
            }
        }
    };
    let engine = EngineHandle::start(make, tok.clone(), e.engine_config())?;
    let name = e
        .served_model_name
        .clone()
        .unwrap_or_else(|| dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()));
    let mut ctx = context_for(Some(dir), tok, engine.info().clone(), name)?;
    ctx.vision = Some(Arc::new(encoder));
    Ok((engine, ctx))
}

/// The CUDA text decoder options of `serve`/`batch` for a Llama 3.2 Vision checkpoint (the same on every node of a
/// multi-node run): `--kv-tokens` exactly, or what fits under `--gpu-memory-utilization`; step and logits buffers
/// sized by the engine limits.
pub(super) fn vision_cuda_options(
    a: &ModelArgs,
    e: &EngineArgs,
    device: usize,
) -> crate::vision::cuda::text::MllamaCudaOptions {
    let block = a.block_size;
    crate::vision::cuda::text::MllamaCudaOptions {
        device,
        block_size: block,
        kv_tokens: a.kv_tokens.unwrap_or(block.max(1)),
        gpu_memory_utilization: if a.kv_tokens.is_some() { None } else { Some(a.gpu_memory_utilization) },
        max_step_tokens: e.max_num_batched_tokens.max(1),
        // One sampled row per sequence, and the rows of prompt log-probabilities.
        max_logits_rows: e.max_num_seqs.max(1) + crate::sched::DEFAULT_PROMPT_LOGITS_ROWS,
        skinny_gemm: !a.no_skinny_gemm,
        fuse_swiglu: !a.no_fused_swiglu,
        fuse_norm: a.fused_norm,
        max_graph_batch: a.cuda_graph_max_batch,
        cross_tiles: e.cross_attention_tiles,
    }
}

/// `llama32 logits --image ... --tensor-parallel N --device cuda[:K] [--devices LIST]`: the images encoded once on
/// the first rank's GPU (bf16; the encoder and projector are replicated, not sharded), the text decoder as N CUDA
/// ranks ([`crate::tp::cuda_vision::TpMllamaCudaExecutor`], placed as for text models) in one prefill step; writes
/// every row's logits `[T, vocab]` as .npy. The degree and the placement are checked before anything loads.
pub(crate) fn vision_logits_tp_cuda(
    m: &ModelArgs,
    dir: &std::path::Path,
    ids: &[u32],
    images: &[PathBuf],
    out: &std::path::Path,
    (tp, devices): (usize, Option<&str>),
) -> Result<()> {
    use crate::exec::generate::{build_step, LogitsWanted, SeqChunk};
    use crate::exec::Executor as _;
    if ids.is_empty() {
        return Err(Error::request("--ids: no tokens"));
    }
    let cfg = crate::vision::config::MllamaConfig::from_model_dir(dir)?;
    crate::tp::TpPlan::new(&cfg.text.base, tp)?;
    let placement = cuda_rank_placement(&m.device, tp, devices, false)?;
    let kind = tp_comm_kind("auto", &placement)?;
    let t0 = std::time::Instant::now();
    let (cfg, enc, mask) = if images.is_empty() {
        cfg.refuse_image_tokens_without_images(ids)?;
        (cfg, crate::vision::pipeline::EncodedImages { states: Vec::new(), num_tiles: Vec::new() }, None)
    } else {
        let mut encoder = crate::vision::pipeline::ImageEncoder::load(dir)?;
        encoder.use_cuda(placement[0])?;
        let files = images
            .iter()
            .map(|p| Ok((p.display().to_string(), std::fs::read(p).map_err(|e| Error::io(p, e))?)))
            .collect::<Result<Vec<_>>>()?;
        let enc = encoder.encode(&files)?;
        let c = encoder.cfg.clone();
        let mask = crate::vision::text::CrossAttentionMask::from_image_tokens(
            ids,
            c.image_token_index,
            &enc.num_tiles,
            c.vision.max_num_tiles,
        )?;
        eprintln!(
            "encoded {} image(s) ({:?} tiles) on cuda:{} in {:.2} s",
            enc.len(),
            enc.num_tiles,
            placement[0],
            t0.elapsed().as_secs_f64()
        );
        (c, enc, Some(mask))
    };
    let opts = crate::vision::cuda::text::MllamaCudaOptions {
        device: placement[0],
        block_size: m.block_size,
        kv_tokens: m.kv_tokens.unwrap_or(ids.len()).max(ids.len()),
        gpu_memory_utilization: None,
        max_step_tokens: ids.len(),
        max_logits_rows: ids.len(),
        cross_tiles: (enc.len() * cfg.vision.max_num_tiles).max(1),
        skinny_gemm: !m.no_skinny_gemm,
        fuse_swiglu: !m.no_fused_swiglu,
        fuse_norm: m.fused_norm,
        max_graph_batch: 0,
    };
    let t0 = std::time::Instant::now();
    let ckpt = crate::weights::Checkpoint::open(dir)?;
    let at_load = load::at_load(m)?;
    let mut exec = crate::tp::cuda_vision::TpMllamaCudaExecutor::new_quantized(
        cfg.clone(),
        &ckpt,
        tp,
        (&placement, kind),
        &opts,
        at_load,
    )?;
    eprintln!(
        "loaded the text decoder as {tp} tensor-parallel CUDA ranks on {:?} ({}) in {:.2} s",
        placement,
        exec.comm_name(),
        t0.elapsed().as_secs_f64()
    );
    let block = m.block_size;
    let table: Vec<u32> = (0..ids.len().div_ceil(block) as u32).collect();
    let chunk = SeqChunk { tokens: ids, start_pos: 0, block_table: &table, logits: LogitsWanted::All };
    let step = build_step(&[chunk], block)?;
    let logits = match &mask {
        Some(mask) => {
            exec.add_images(0, &enc)?;
            let seq = crate::vision::exec::SeqImages { key: 0, mask: mask.data() };
            exec.step_with_images(&step, &[Some(seq)])?.logits
        }
        None => exec.step(&step)?.logits,
    };
    let vocab = exec.config().vocab_size;
    crate::npy::write_f32(out, &[ids.len(), vocab], &logits)?;
    eprintln!("wrote logits [{}, {vocab}] to {} (tensor-parallel {tp} on CUDA)", ids.len(), out.display());
    Ok(())
}
