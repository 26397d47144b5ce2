//! `logits` and `generate` for Llama 3.2 Vision checkpoints (`--image`), on the CPU reference.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{build_prompt, load_tokenizer, sampling_params, GenerateArgs, ModelArgs};
use crate::vision::pipeline::{is_mllama_dir, EncodedImages, MllamaModel};
use crate::{Error, Result};

/// The model directory when `--model` is a Llama 3.2 Vision checkpoint; an error when `--image` is given for a
/// text model or the vision model is asked for something it cannot do yet.
pub fn vision_dir(m: &ModelArgs, has_images: bool) -> Result<Option<PathBuf>> {
    match &m.model {
        Some(dir) if is_mllama_dir(dir) => {
            if m.device != "cpu" {
                return Err(Error::request(format!(
                    "--device {}: Llama 3.2 Vision runs on the CPU reference only so far (--device cpu)",
                    m.device
                )));
            }
            if m.random_weights || m.preset.is_some() {
                return Err(Error::request("--random-weights / --preset are not supported for vision models yet"));
            }
            Ok(Some(dir.clone()))
        }
        _ if has_images => Err(Error::request(
            "--image needs a Llama 3.2 Vision model: --model DIR whose config.json is MllamaForConditionalGeneration",
        )),
        _ => Ok(None),
    }
}

fn load(dir: &Path, images: &[PathBuf]) -> Result<(MllamaModel, EncodedImages)> {
    let t0 = Instant::now();
    let model = MllamaModel::load(dir)?;
    let files = images
        .iter()
        .map(|p| Ok((p.display().to_string(), std::fs::read(p).map_err(|e| Error::io(p, e))?)))
        .collect::<Result<Vec<_>>>()?;
    let enc = model.encode(&files)?;
    eprintln!(
        "loaded {} and encoded {} image(s) ({:?} tiles) in {:.2} s",
        dir.display(),
        enc.len(),
        enc.num_tiles,
        t0.elapsed().as_secs_f64()
    );
    Ok((model, enc))
}

/// `llama32 logits --image ...`: float32 logits `[T, vocab]` of `ids` with the images as .npy.
pub fn logits(_m: &ModelArgs, dir: &Path, ids: &[u32], images: &[PathBuf], out: &Path) -> Result<()> {
    let (model, enc) = load(dir, images)?;
    let vocab = model.cfg.text.base.vocab_size;
    let logits = model.logits(ids, &enc)?;
    crate::npy::write_f32(out, &[ids.len(), vocab], &logits)?;
    eprintln!("wrote logits [{}, {vocab}] to {}", ids.len(), out.display());
    Ok(())
}

/// `llama32 generate --image ...`.
pub fn generate(a: &GenerateArgs, dir: &Path) -> Result<()> {
    let tok = load_tokenizer(&a.model)?;
    let prompt = build_prompt(a, tok.as_ref(), a.image.len())?;
    let params = sampling_params(a);
    if tok.is_none() && !a.stop.is_empty() {
        return Err(Error::request("--stop needs a tokenizer to see text"));
    }
    let (model, enc) = load(dir, &a.image)?;
    let mut decoder = tok.as_ref().map(|t| t.stream_decoder(true));
    let mut detok = |id: u32| match decoder.as_mut() {
        Some(d) => d.push(id),
        None => Ok(String::new()),
    };
    let json = a.json;
    let mut on_text = |s: &str| {
        if !json {
            print!("{s}");
            let _ = std::io::stdout().flush();
        }
    };
    let t0 = Instant::now();
    let g = model.generate(&prompt, &enc, &params, &mut detok, &mut on_text)?;
    let secs = t0.elapsed().as_secs_f64();
    if json {
        let text = if tok.is_some() { serde_json::Value::from(g.text.clone()) } else { serde_json::Value::Null };
        println!("{}", serde_json::json!({"ids": g.ids, "text": text, "finish_reason": g.finish.as_str()}));
    } else {
        if tok.is_none() {
            print!("(no tokenizer: generated ids) {:?}", g.ids);
        }
        println!();
    }
    eprintln!("{} prompt + {} generated tokens in {secs:.2} s, finish_reason={}", prompt.len(), g.ids.len(), g.finish);
    Ok(())
}
