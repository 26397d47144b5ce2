//! The Llama 3.2 Vision text decoder with cross-attention layers against transformers' golden cases: the
//! processor's cross-attention mask, whole-prompt logits, greedy decoding through the cached cross K/V, and errors
//! for bad inputs.

use llama32::npy;
use llama32::vision::config::MllamaConfig;
use llama32::vision::text::{
    cross_attention, cross_attention_decoder_layer, cross_kv, text_forward, text_step, CrossAttentionMask, TextCache,
};
use llama32::vision::weights::{MllamaWeights, TextLayerWeights};
use llama32::weights::Checkpoint;
use serde_json::Value;

mod common;

const GOLDEN: [&str; 3] = ["mllama-noresize", "mllama-resize", "mllama-two-images"];

struct Case {
    cfg: MllamaConfig,
    w: MllamaWeights,
    ids: Vec<u32>,
    greedy: Vec<u32>,
    num_tiles: Vec<usize>,
    states: Vec<f32>,
    mask: CrossAttentionMask,
    logits: Vec<f32>,
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn load(name: &'static str) -> Case {
    let dir = common::golden_dir(name);
    let cfg = MllamaConfig::from_model_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let w = MllamaWeights::load(&ckpt, &cfg).unwrap();
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let ids = ids_of(&reference["input_ids"]);
    let greedy = ids_of(&reference["greedy_ids"]);
    let num_tiles: Vec<usize> =
        reference["images"].as_array().unwrap().iter().map(|im| im["num_tiles"].as_u64().unwrap() as usize).collect();
    let states = npy::read_f32(&dir.join("cross_attention_states.npy")).unwrap();
    let (v, h) = (&cfg.vision, cfg.text.base.hidden_size);
    assert_eq!(states.shape, vec![num_tiles.len() * v.max_num_tiles, v.num_patches(), h], "{name}: states shape");
    let m = npy::read_i64(&dir.join("cross_attention_mask.npy")).unwrap();
    assert_eq!(m.shape, vec![1, ids.len(), num_tiles.len(), v.max_num_tiles], "{name}: mask shape");
    let mask = CrossAttentionMask::from_i64(&m.data, m.shape[1], m.shape[2], m.shape[3]).unwrap();
    let logits = npy::read_f32(&dir.join("logits.npy")).unwrap();
    assert_eq!(logits.shape, vec![ids.len(), cfg.text.base.vocab_size], "{name}: logits shape");
    Case { cfg, w, ids, greedy, num_tiles, states: states.data, mask, logits: logits.data }
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // NaN anywhere makes the result NaN, which fails every `<=` check.
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d > m || d.is_nan() {
            d
        } else {
            m
        }
    })
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn err_of<T: std::fmt::Debug>(r: llama32::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn processor_mask_matches_the_golden_masks() {
    for name in GOLDEN {
        let c = load(name);
        let built = CrossAttentionMask::from_image_tokens(
            &c.ids,
            c.cfg.image_token_index,
            &c.num_tiles,
            c.cfg.vision.max_num_tiles,
        )
        .unwrap();
        assert_eq!(built, c.mask, "{name}");
        // The golden masks are not trivial: some row sees an image, and resize/two-images have rows that see none.
        assert!((0..c.mask.tokens()).any(|t| c.mask.row(t).contains(&1)), "{name}");
    }
}

#[test]
fn processor_mask_rules() {
    const I: u32 = 9;
    let build = |ids: &[u32], tiles: &[usize]| CrossAttentionMask::from_image_tokens(ids, I, tiles, 3).unwrap();
    // Two separate images: each is seen from its token up to the next image token.
    let m = build(&[1, I, 2, 3, I, 4], &[2, 1]);
    let want: Vec<u8> = [
        [0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0, 0],
    ]
    .concat();
    assert_eq!((m.tokens(), m.num_images(), m.max_tiles()), (6, 2, 3));
    assert_eq!(m.data(), &want[..]);
    // Consecutive image tokens share the range of the last one of the run (to the end here).
    let m = build(&[I, I, 5, 6], &[1, 3]);
    let want: Vec<u8> = [[1, 0, 0, 0, 0, 0], [1, 0, 0, 1, 1, 1], [1, 0, 0, 1, 1, 1], [1, 0, 0, 1, 1, 1]].concat();
    assert_eq!(m.data(), &want[..]);
    // A run followed by another image: the run stops at that image.
    let m = build(&[I, I, 5, I, 6], &[1, 1, 1]);
    let col = |img: usize| (0..5).map(|t| m.row(t)[img * 3]).collect::<Vec<u8>>();
    assert_eq!((col(0), col(1), col(2)), (vec![1, 1, 1, 0, 0], vec![0, 1, 1, 0, 0], vec![0, 0, 0, 1, 1]));
    // No image: no columns.
    let m = build(&[1, 2, 3], &[]);
    assert_eq!((m.tokens(), m.num_images(), m.data().len()), (3, 0, 0));
    // Extending repeats the last row.
    let m = build(&[1, I, 2], &[2]).extended(5).unwrap();
    assert_eq!(m.data(), &[0, 0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0][..]);
    // Errors.
    let e = err_of(CrossAttentionMask::from_image_tokens(&[1, I, I], I, &[1], 3));
    assert!(e.contains("2 image token(s)") && e.contains("1 image(s)"), "{e}");
    let e = err_of(CrossAttentionMask::from_image_tokens(&[I], I, &[4], 3));
    assert!(e.contains("4 tiles"), "{e}");
    let e = err_of(CrossAttentionMask::from_image_tokens(&[I], I, &[0], 3));
    assert!(e.contains("0 tiles"), "{e}");
    let e = err_of(CrossAttentionMask::from_i64(&[0, 1, 2, 0], 2, 1, 2));
    assert!(e.contains("value 2 at index 2"), "{e}");
    let e = err_of(CrossAttentionMask::new(vec![0; 5], 2, 1, 2));
    assert!(e.contains("5 values"), "{e}");
    let e = err_of(build(&[I, 1, 2], &[1]).extended(2));
    assert!(e.contains("cannot extend 3 rows to 2"), "{e}");
}

#[test]
fn logits_match_transformers() {
    for name in GOLDEN {
        let c = load(name);
        let got = text_forward(&c.w.text, &c.cfg, &c.ids, Some(&c.states), Some(&c.mask)).unwrap();
        let scale = max_abs(&c.logits);
        let err = max_diff(&got, &c.logits);
        println!("{name}: max |logit err| {err:.3e} = {:.3e} of max |logit| {scale:.3}", err / scale);
        assert!(err <= 1e-4 * scale, "{name}: max abs error {err} vs max |logit| {scale}");
        // Every row's argmax agrees as well.
        let v = c.cfg.text.base.vocab_size;
        for (t, (a, b)) in got.chunks(v).zip(c.logits.chunks(v)).enumerate() {
            assert_eq!(argmax(a), argmax(b), "{name}: row {t}");
        }
        // The cross-attention path matters: without the images (text-only, cross layers skipped) the logits differ.
        let text_only = text_forward(&c.w.text, &c.cfg, &c.ids, None, None).unwrap();
        assert!(max_diff(&text_only, &c.logits) > 1e-2 * scale, "{name}: images do not change the logits");
    }
}

#[test]
fn greedy_decoding_matches_transformers() {
    for name in GOLDEN {
        let c = load(name);
        let (cfg, w) = (&c.cfg, &c.w.text);
        let v = cfg.text.base.vocab_size;
        // Cached path: cross K/V computed image by image, prompt prefilled once, then one token per step with the
        // prompt's last mask row (as `generate` extends the mask).
        let mut cache = TextCache::new(w, &cfg.text).unwrap();
        let per_image = cfg.vision_tokens_per_image() * cfg.text.base.hidden_size;
        for image in c.states.chunks(per_image) {
            cache.add_image(w, cfg, image).unwrap();
        }
        assert_eq!(cache.num_images(), c.num_tiles.len());
        let prompt_logits = text_step(w, &cfg.text, &mut cache, &c.ids, Some(c.mask.data())).unwrap();
        let scale = max_abs(&c.logits);
        assert!(max_diff(&prompt_logits, &c.logits) <= 1e-4 * scale, "{name}: prefill logits");
        let last_row = c.mask.row(c.mask.tokens() - 1).to_vec();
        let mut next = argmax(&prompt_logits[(c.ids.len() - 1) * v..]);
        let mut cached = Vec::new();
        let mut step_logits = Vec::new();
        for _ in 0..c.greedy.len() {
            cached.push(next);
            let lg = text_step(w, &cfg.text, &mut cache, &[next], Some(&last_row)).unwrap();
            next = argmax(&lg);
            step_logits.push(lg);
        }
        assert_eq!(cached, c.greedy, "{name}: cached greedy ids");
        assert_eq!(cache.len(), c.ids.len() + c.greedy.len());

        // Uncached path: the whole sequence recomputed each step with the extended mask.
        let mut seq = c.ids.clone();
        for step in 0..c.greedy.len() {
            let mask = c.mask.extended(seq.len()).unwrap();
            let lg = text_forward(w, cfg, &seq, Some(&c.states), Some(&mask)).unwrap();
            let last = &lg[(seq.len() - 1) * v..];
            seq.push(argmax(last));
            if step > 0 {
                // The cached decode step for the same position gave (nearly) the same logits.
                let err = max_diff(last, &step_logits[step - 1]);
                assert!(err <= 1e-5 * scale, "{name}: step {step} cached vs uncached logits differ by {err}");
            }
        }
        assert_eq!(&seq[c.ids.len()..], &c.greedy[..], "{name}: uncached greedy ids");
        println!("{name}: greedy {:?} reproduced (cached and uncached)", c.greedy);
    }
}

#[test]
fn cross_kv_per_image_equals_all_images_at_once() {
    let c = load("mllama-two-images");
    let tpt = c.cfg.vision.num_patches();
    let per_image = c.cfg.vision_tokens_per_image() * c.cfg.text.base.hidden_size;
    let mut checked = 0;
    for (l, layer) in c.w.text.layers.iter().enumerate() {
        let TextLayerWeights::CrossAttention(cl) = layer else { continue };
        let all = cross_kv(cl, &c.cfg.text, &c.states, tpt).unwrap();
        let mut parts = cross_kv(cl, &c.cfg.text, &c.states[..per_image], tpt).unwrap();
        parts.append(&cross_kv(cl, &c.cfg.text, &c.states[per_image..], tpt).unwrap()).unwrap();
        assert_eq!(all, parts, "layer {l}");
        assert_eq!(all.tiles(), 2 * c.cfg.vision.max_num_tiles);
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn rows_without_an_image_attend_unmasked_and_skip_the_mlp() {
    // resize: the first 4 tokens come before the image token, so their mask rows are all zero.
    let c = load("mllama-resize");
    let (cfg, hidden) = (&c.cfg.text, c.cfg.text.base.hidden_size);
    let l = cfg.cross_attention_layers[0];
    let TextLayerWeights::CrossAttention(cl) = &c.w.text.layers[l] else { panic!("layer {l}") };
    let kv = cross_kv(cl, cfg, &c.states, c.cfg.vision.num_patches()).unwrap();
    let rows = 6;
    let h: Vec<f32> = (0..rows * hidden).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
    let mask = c.mask.rows(0, rows);
    assert!(mask[..4 * kv.tiles()].iter().all(|&m| m == 0) && mask[4 * kv.tiles()..].iter().all(|&m| m == 1));
    let masked = cross_attention(cl, cfg, &h, &kv, Some(mask)).unwrap();
    let unmasked = cross_attention(cl, cfg, &h, &kv, None).unwrap();
    // Zero rows equal the unmasked attention; rows that see the image's 4 tiles ignore the tokens of no tile
    // here (all 4 are real), so they equal it too; a row limited to one tile does not.
    assert_eq!(masked, unmasked);
    let mut one_tile = mask.to_vec();
    one_tile[4 * kv.tiles() + 1..5 * kv.tiles()].fill(0);
    let limited = cross_attention(cl, cfg, &h, &kv, Some(&one_tile)).unwrap();
    assert_eq!(limited[..4 * hidden], unmasked[..4 * hidden]);
    assert!(max_diff(&limited[4 * hidden..5 * hidden], &unmasked[4 * hidden..5 * hidden]) > 1e-3);
    assert_eq!(limited[5 * hidden..], unmasked[5 * hidden..]);
    // Through the whole layer: rows that see nothing get only the gated attention, no MLP.
    let mut x = h.clone();
    cross_attention_decoder_layer(cl, cfg, &mut x, &kv, Some(mask)).unwrap();
    let mut norm = vec![0.0; h.len()];
    llama32::ops::cpu::norm::rms_norm(&h, &cl.attn_norm, cfg.base.rms_norm_eps, hidden, &mut norm);
    let attn = cross_attention(cl, cfg, &norm, &kv, Some(mask)).unwrap();
    let g = cl.attn_gate.tanh();
    for i in 0..4 * hidden {
        assert_eq!(x[i], h[i] + g * attn[i], "row {}", i / hidden);
    }
    let mlp_part = (4 * hidden..rows * hidden).map(|i| (x[i] - (h[i] + g * attn[i])).abs()).fold(0.0f32, f32::max);
    assert!(mlp_part > 1e-3, "rows that see the image get an MLP contribution");
}

#[test]
fn bad_inputs_are_errors() {
    let c = load("mllama-two-images");
    let (cfg, w) = (&c.cfg, &c.w.text);
    let fwd = |ids: &[u32], states: Option<&[f32]>, mask: Option<&CrossAttentionMask>| {
        err_of(text_forward(w, cfg, ids, states, mask))
    };
    let states = Some(&c.states[..]);
    let rows = cfg.text.embed_rows() as u32;

    let mut ids = c.ids.clone();
    ids[2] = rows;
    let e = fwd(&ids, states, Some(&c.mask));
    assert!(e.contains("input_ids[2]") && e.contains(&rows.to_string()), "{e}");
    let e = fwd(&[], None, None);
    assert!(e.contains("no tokens"), "{e}");
    // The image token id itself (vocab_size, one of the 8 extra rows) is in range.
    text_forward(w, cfg, &[cfg.image_token_index], None, None).unwrap();

    let e = fwd(&c.ids, Some(&c.states[..c.states.len() - 1]), Some(&c.mask));
    assert!(e.contains("cross_attention_states") && e.contains("not a positive multiple"), "{e}");
    let half = c.states.len() / 2;
    let e = fwd(&c.ids, Some(&c.states[..half]), Some(&c.mask));
    assert!(e.contains("covers 2 image(s)") && e.contains("hold 1"), "{e}");
    let e = fwd(&c.ids, None, Some(&c.mask));
    assert!(e.contains("no cross_attention_states"), "{e}");
    let short = CrossAttentionMask::new(c.mask.rows(0, 3).to_vec(), 3, 2, cfg.vision.max_num_tiles).unwrap();
    let e = fwd(&c.ids, states, Some(&short));
    assert!(e.contains("has 3 rows") && e.contains(&format!("{} input ids", c.ids.len())), "{e}");
    let narrow = CrossAttentionMask::from_image_tokens(&c.ids, cfg.image_token_index, &[1, 2], 2).unwrap();
    let e = fwd(&c.ids, states, Some(&narrow));
    assert!(e.contains("2 tiles per image"), "{e}");

    let too_long = vec![1u32; cfg.text.base.max_position_embeddings + 1];
    let e = fwd(&too_long, None, None);
    assert!(e.contains("max_position_embeddings"), "{e}");

    // text_step: mask rows of the wrong width, or a mask with no images in the cache.
    let mut cache = TextCache::new(w, &cfg.text).unwrap();
    let e = err_of(text_step(w, &cfg.text, &mut cache, &[1, 2], Some(&[1, 0])));
    assert!(e.contains("expected 0 per token"), "{e}");
    let per_image = cfg.vision_tokens_per_image() * cfg.text.base.hidden_size;
    let e = err_of(cache.add_image(w, cfg, &c.states[..per_image - 1]));
    assert!(e.contains("image 0") && e.contains("expected max_num_tiles"), "{e}");
    cache.add_image(w, cfg, &c.states[..per_image]).unwrap();
    let e = err_of(text_step(w, &cfg.text, &mut cache, &[1, 2], Some(&[1, 0, 0, 0])));
    assert!(e.contains("4 values for 2 tokens") && e.contains("expected 4 per token"), "{e}");
    let e = err_of(text_step(w, &cfg.text, &mut cache, &[1], Some(&[1, 0, 2, 0])));
    assert!(e.contains("not 0 or 1"), "{e}");
    assert!(cache.is_empty(), "failed steps leave the cache untouched");

    // Weights that do not fit the config.
    let mut bad = w.clone();
    bad.layers.pop();
    let e = err_of(text_forward(&bad, cfg, &c.ids, None, None));
    assert!(e.contains("layers, expected"), "{e}");
    let mut bad = w.clone();
    bad.layers.swap(0, 1);
    let e = err_of(TextCache::new(&bad, &cfg.text));
    assert!(e.contains("layer 0 is a cross-attention layer"), "{e}");
}
