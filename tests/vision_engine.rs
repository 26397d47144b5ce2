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
            Event::Done(_) | Event::PromptLogprobs(_) => {}
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

/// Prompt log-probabilities of a vision request (its prompt split into 5-token chunks, the images' prefix blocks
/// cached by an earlier request) are the log-softmax of transformers' logits; an `<|image|>` token, outside the
/// output vocabulary, is impossible (-inf, ranked last).
#[test]
fn vision_prompt_logprobs_match_transformers() {
    let c = case("mllama-two-images");
    let e = engine(&c.model.dir, 1024, 4, EngineConfig { max_step_tokens: 5, ..Default::default() });
    assert_eq!(drain(e.submit_blocking(request(&c, greedy(2))).unwrap()).0, c.greedy[..2]);
    let mut r = request(&c, greedy(2));
    r.prompt_logprobs = Some(2);
    let scores = common::prompt_logprobs_of(e.submit_blocking(r).unwrap(), "vision request");
    assert_eq!(scores.len(), c.ids.len() - 1);
    let want = llama32::npy::read_f32(&c.model.dir.join("logits.npy")).unwrap();
    let vocab = want.shape[1];
    let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let image = c.model.cfg.image_token_index;
    let mut images = 0;
    for (i, lp) in scores.iter().enumerate() {
        assert_eq!(lp.id, c.ids[i + 1]);
        if lp.id == image {
            assert_eq!((lp.logprob, lp.rank as usize), (f32::NEG_INFINITY, vocab + 1), "position {}", i + 1);
            images += 1;
            continue;
        }
        let row = &want.data[i * vocab..(i + 1) * vocab];
        let ls = common::log_softmax(row);
        let hf = ls[lp.id as usize];
        assert!((lp.logprob as f64 - hf).abs() <= 3e-4 * scale, "position {}: {} against {hf}", i + 1, lp.logprob);
        let best = row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (k, &x)| if x > b.1 { (k, x) } else { b });
        assert!((lp.top[0].1 as f64 - ls[best.0]).abs() <= 3e-4 * scale, "position {}", i + 1);
    }
    assert_eq!(images, c.ids[1..].iter().filter(|&&t| t == image).count());
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

#[test]
fn image_sets_drop_their_padding_tiles_after_prefill_and_come_back_when_needed() {
    let c = case("mllama-noresize");
    let real: usize = c.images.num_tiles.iter().sum();
    assert!(real < c.images.len() * c.model.cfg.vision.max_num_tiles, "the image must have padding tiles");
    // Another prompt with the same image, with different tokens before its image token: those rows see no image,
    // so they need the padding tiles again.
    let at = c.ids.iter().position(|&t| t == c.model.cfg.image_token_index).unwrap();
    let mut other = c.ids[..at].to_vec();
    other.extend([17, 42, 99]);
    other.extend_from_slice(&c.ids[at..]);
    let other_req = |n: usize| {
        let mut r = GenerateRequest::new(other.clone(), greedy(n));
        let max_tiles = c.model.cfg.vision.max_num_tiles;
        r.images =
            Some(RequestImages::new(c.images.clone(), &other, c.model.cfg.image_token_index, max_tiles).unwrap());
        r
    };
    let alone = engine(&c.model.dir, 512, 4, EngineConfig::default());
    let want_other = drain(alone.submit_blocking(other_req(6)).unwrap());
    assert_eq!(want_other.2, None);
    let e = engine(&c.model.dir, 512, 4, EngineConfig::default());
    let mut a = e.submit_blocking(request(&c, greedy(c.greedy.len()))).unwrap();
    // The first token means the prompt ran: the set was trimmed after that step.
    let mut ids = Vec::new();
    while ids.is_empty() {
        match a.blocking_next() {
            Some(Event::Delta { ids: i, .. }) => ids.extend(i),
            Some(Event::Error(m)) => panic!("{m}"),
            Some(_) => {}
            None => panic!("the request ended without a token"),
        }
    }
    let snap = e.metrics().snapshot();
    assert_eq!((snap.image_sets, snap.image_sets_trimmed, snap.image_sets_readded), (1, 1, 0));
    let b = e.submit_blocking(other_req(6)).unwrap();
    let (ra, rb) = (drain(a), drain(b));
    ids.extend(ra.0);
    assert_eq!((ra.2, rb.2), (None, None));
    assert_eq!(ids, c.greedy, "the request that ran on the trimmed set");
    assert_eq!(rb.0, want_other.0, "the request that needed the padding tiles back");
    let snap = e.metrics().snapshot();
    assert!(snap.image_sets_readded >= 1 && snap.image_sets_trimmed >= 2, "{snap:?}");
    assert_eq!(snap.image_sets, 0, "both requests are done");
}

/// [`engine`] whose executor holds at most `tiles` cross-attention tiles at once, as a device pool does.
fn bounded_engine(dir: &Path, tiles: usize) -> EngineHandle {
    let d = dir.to_path_buf();
    let make = move || -> llama32::Result<Box<dyn llama32::exec::Executor>> {
        let m = MllamaModel::load(&d)?;
        let mut ex = MllamaCpuExecutor::new(m.cfg, m.weights, 512, 4)?;
        ex.limit_cross_tiles(Some(tiles));
        Ok(Box::new(ex))
    };
    EngineHandle::start(make, None, EngineConfig::default()).unwrap()
}

#[test]
fn requests_wait_for_room_in_a_bounded_cross_attention_pool() {
    let c = case("mllama-noresize");
    let (max_tiles, image_token) = (c.model.cfg.vision.max_num_tiles, c.model.cfg.image_token_index);
    // A second picture (another golden's), encoded by this model.
    let y = c.model.encode(&common::mllama_golden("mllama-resize").images).unwrap();
    let with = |ids: &[u32], im: &EncodedImages, n: usize| {
        let mut r = GenerateRequest::new(ids.to_vec(), greedy(n));
        r.images = Some(RequestImages::new(im.clone(), ids, image_token, max_tiles).unwrap());
        r
    };
    let want_y =
        drain(engine(&c.model.dir, 512, 4, EngineConfig::default()).submit_blocking(with(&c.ids, &y, 8)).unwrap());
    assert_eq!(want_y.2, None);
    // Room for one whole set and a little more: the second request waits until the first set is gone, instead of
    // being refused.
    let e = bounded_engine(&c.model.dir, max_tiles + 1);
    let a = e.submit_blocking(with(&c.ids, &c.images, c.greedy.len())).unwrap();
    let b = e.submit_blocking(with(&c.ids, &y, 8)).unwrap();
    let (ra, rb) = (drain(a), drain(b));
    assert_eq!((ra.2, rb.2), (None, None));
    assert_eq!(ra.0, c.greedy);
    assert_eq!(rb.0, want_y.0, "the request that waited for room");
    let snap = e.metrics().snapshot();
    assert_eq!((snap.image_sets, snap.image_waits), (0, 1), "{snap:?}");
    assert!(snap.image_sets_trimmed >= 2, "{snap:?}");
    // Images that can never fit are refused at once, naming the pool; the engine goes on serving.
    let at = c.ids.iter().position(|&t| t == image_token).unwrap();
    let mut two = c.ids.clone();
    two.insert(at, image_token);
    let both = EncodedImages {
        states: [c.images.states.clone(), y.states.clone()].concat(),
        num_tiles: vec![c.images.num_tiles[0], y.num_tiles[0]],
    };
    let err = e.submit_blocking(with(&two, &both, 2)).err().unwrap().to_string();
    assert!(err.contains("exceed the cross-attention pool"), "{err}");
    assert_eq!(drain(e.submit_blocking(with(&c.ids, &c.images, 3)).unwrap()).0, c.greedy[..3]);
}
