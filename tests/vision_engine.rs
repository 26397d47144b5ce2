//! Llama 3.2 Vision requests through the serving engine (scheduler, paged KV, prefix cache, preemption) on the
//! batched CPU executor, against transformers' greedy ids and the dense reference.

mod common;

use std::path::Path;

use llama32::sampling::{FinishReason, SamplingParams};
use llama32::serve::engine::{EngineConfig, EngineHandle, RequestStream};
use llama32::serve::{Event, GenerateRequest, RequestImages};
use llama32::vision::exec::MllamaCpuExecutor;
use llama32::vision::pipeline::{EncodedImages, MllamaModel};

fn engine(dir: &Path, kv_tokens: usize, block: usize, cfg: EngineConfig) -> EngineHandle {
    let d = dir.to_path_buf();
    let make = move || -> llama32::Result<Box<dyn llama32::exec::Executor>> {
        let m = MllamaModel::load(&d)?;
        Ok(Box::new(MllamaCpuExecutor::new(m.cfg, m.weights, kv_tokens, block)?))
    };
    EngineHandle::start(make, None, cfg).unwrap()
}

struct Case {
    model: MllamaModel,
    ids: Vec<u32>,
    images: EncodedImages,
    greedy: Vec<u32>,
}

fn case(name: &str) -> Case {
    let g = common::mllama_golden(name);
    let model = MllamaModel::load(&g.dir).unwrap();
    let images = model.encode(&g.images).unwrap();
    Case { ids: g.input_ids, greedy: g.greedy_ids, model, images }
}

fn request(c: &Case, params: SamplingParams) -> GenerateRequest {
    let mut r = GenerateRequest::new(c.ids.clone(), params);
    let im =
        RequestImages::new(c.images.clone(), &c.ids, c.model.cfg.image_token_index, c.model.cfg.vision.max_num_tiles)
            .unwrap();
    r.images = Some(im);
    r
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams { max_tokens: n, ignore_eos: true, ..SamplingParams::greedy() }
}

fn drain(mut s: RequestStream) -> (Vec<u32>, Option<FinishReason>, Option<String>) {
    let (mut ids, mut fin, mut err) = (Vec::new(), None, None);
    while let Some(e) = s.blocking_next() {
        match e {
            Event::Delta { ids: i, .. } => ids.extend(i),
            Event::Finished { reason, .. } => fin = Some(reason),
            Event::Error(m) => err = Some(m),
            Event::Done(_) => {}
        }
    }
    (ids, fin, err)
}

#[test]
fn vision_requests_match_transformers_and_share_steps_with_text() {
    let c = case("mllama-two-images");
    let e = engine(&c.model.dir, 1024, 4, EngineConfig { max_step_tokens: 7, ..Default::default() });
    let text: Vec<u32> = c.ids.iter().copied().filter(|&t| t != c.model.cfg.image_token_index).collect();
    // A vision request, the same again (prefix cache), and a text-only one, all at once, in 7-token chunks.
    let a = e.submit_blocking(request(&c, greedy(c.greedy.len()))).unwrap();
    let b = e.submit_blocking(request(&c, greedy(c.greedy.len()))).unwrap();
    let t = e.submit_blocking(GenerateRequest::new(text.clone(), greedy(8))).unwrap();
    let (ra, rb, rt) = (drain(a), drain(b), drain(t));
    assert_eq!(ra.2, None);
    assert_eq!(ra.0, c.greedy, "vision request through the engine");
    assert_eq!(rb.0, c.greedy);
    let none = EncodedImages { states: Vec::new(), num_tiles: Vec::new() };
    let want = c.model.generate(&text, &none, &greedy(8), &mut |_| Ok(String::new()), &mut |_| {}).unwrap();
    assert_eq!(rt.0, want.ids, "the text-only request must not see the images");
    // A later identical request hits the salted prefix blocks; the text-only prompt (same text tokens, no images)
    // must not have shared them.
    let hits0 = e.metrics().snapshot().sched.kv.hit_tokens;
    let again = drain(e.submit_blocking(request(&c, greedy(3))).unwrap());
    assert_eq!(again.0, c.greedy[..3]);
    assert!(e.metrics().snapshot().sched.kv.hit_tokens > hits0, "same images, same prefix: cache hit");
}

#[test]
fn vision_requests_survive_preemption() {
    let c = case("mllama-resize");
    // 12 blocks of 4 tokens; each request needs 18 + 12 tokens -> 8 blocks at the end, so 4 at once must preempt.
    let e = engine(&c.model.dir, 48, 4, EngineConfig { max_step_tokens: 16, ..Default::default() });
    let streams: Vec<RequestStream> =
        (0..4).map(|_| e.submit_blocking(request(&c, greedy(c.greedy.len()))).unwrap()).collect();
    for s in streams {
        let (ids, fin, err) = drain(s);
        assert_eq!(err, None);
        assert_eq!(fin, Some(FinishReason::Length));
        assert_eq!(ids, c.greedy);
    }
    assert!(e.metrics().snapshot().sched.preemptions > 0, "the test must force preemption");
}

#[test]
fn text_models_refuse_images_and_bad_masks_are_named() {
    let c = case("mllama-noresize");
    let e = engine(&c.model.dir, 256, 4, EngineConfig::default());
    let mut bad = request(&c, greedy(2));
    if let Some(im) = bad.images.as_mut() {
        im.mask = std::sync::Arc::new(vec![1; 3]);
    }
    let err = e.submit_blocking(bad).err().unwrap().to_string();
    assert!(err.contains("cross-attention mask"), "{err}");
    // The engine goes on serving.
    assert_eq!(drain(e.submit_blocking(request(&c, greedy(c.greedy.len()))).unwrap()).0, c.greedy);
    let Some(dir) = common::tiny_model_dir("vision-refuse") else { return };
    let (text_engine, _) = common::tiny_engine(&dir, 256, EngineConfig::default());
    let err = text_engine.submit_blocking(request(&c, greedy(2))).err().unwrap().to_string();
    assert!(err.contains("takes no images"), "{err}");
}

#[test]
fn requests_with_the_same_images_share_one_image_set() {
    let c = case("mllama-resize");
    let e = engine(&c.model.dir, 512, 4, EngineConfig::default());
    // The short request finishes first and drops its reference; the long one must keep the shared set.
    let short = e.submit_blocking(request(&c, greedy(2))).unwrap();
    let long = e.submit_blocking(request(&c, greedy(c.greedy.len()))).unwrap();
    let (s, l) = (drain(short), drain(long));
    assert_eq!((s.2, l.2), (None, None));
    assert_eq!(s.0, c.greedy[..2]);
    assert_eq!(l.0, c.greedy);
    // After both are done the set is gone; a new request registers it again.
    assert_eq!(drain(e.submit_blocking(request(&c, greedy(4))).unwrap()).0, c.greedy[..4]);
}
