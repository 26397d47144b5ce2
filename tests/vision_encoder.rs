//! The Llama 3.2 Vision encoder and projector (`llama32::vision::encoder`) against transformers' float32 eager
//! forward on the tiny golden checkpoints in `tests/golden/mllama-*` (no LLAMA32_TEST_DATA needed).

mod common;

use llama32::npy;
use llama32::vision::config::MllamaConfig;
use llama32::vision::encoder::{erf, gelu, project, vision_forward, vision_output_len};
use llama32::vision::weights::MllamaWeights;
use llama32::weights::Checkpoint;

const CASES: [&str; 3] = ["mllama-noresize", "mllama-resize", "mllama-two-images"];

/// One golden case: the model and the inputs transformers was fed, batch folded into the images.
struct Case {
    cfg: MllamaConfig,
    weights: MllamaWeights,
    pixels: Vec<f32>,
    num_images: usize,
    ids: Vec<i64>,
    mask: Vec<i64>,
}

fn load(name: &str) -> Case {
    let dir = common::golden_dir(name);
    let cfg = MllamaConfig::from_model_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let weights = MllamaWeights::load(&ckpt, &cfg).unwrap();
    let pixels = npy::read_f32(&dir.join("pixel_values.npy")).unwrap();
    let ids = npy::read_i64(&dir.join("aspect_ratio_ids.npy")).unwrap();
    let mask = npy::read_i64(&dir.join("aspect_ratio_mask.npy")).unwrap();
    let v = &cfg.vision;
    assert_eq!(pixels.shape.len(), 6, "{name}: pixel_values is [batch, images, tiles, channels, h, w]");
    assert_eq!(pixels.shape[0], 1, "{name}: batch of one");
    let num_images = pixels.shape[1];
    assert_eq!(&pixels.shape[2..], &[v.max_num_tiles, v.num_channels, v.image_size, v.image_size], "{name}");
    assert_eq!(ids.shape, vec![1, num_images], "{name}: aspect_ratio_ids shape");
    assert_eq!(mask.shape, vec![1, num_images, v.max_num_tiles], "{name}: aspect_ratio_mask shape");
    Case { cfg, weights, pixels: pixels.data, num_images, ids: ids.data, mask: mask.data }
}

fn run(c: &Case) -> Vec<f32> {
    vision_forward(&c.weights.vision, &c.cfg.vision, &c.pixels, c.num_images, &c.ids, &c.mask).unwrap()
}

/// Largest absolute difference and largest |reference|.
fn compare(what: &str, got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let max_ref = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let max_err = got.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(max_ref > 0.1, "{what}: degenerate reference");
    (max_err, max_ref)
}

#[test]
fn vision_encoder_and_projector_match_transformers() {
    for name in CASES {
        let c = load(name);
        let dir = common::golden_dir(name);
        let out = run(&c);
        let v = &c.cfg.vision;
        assert_eq!(out.len(), vision_output_len(v, c.num_images));

        let want = npy::read_f32(&dir.join("vision_output.npy")).unwrap();
        assert_eq!(
            want.shape,
            vec![1, c.num_images, v.max_num_tiles, v.num_patches(), v.vision_output_dim],
            "{name}: vision_output.npy shape"
        );
        let (err, max_ref) = compare(name, &out, &want.data);
        eprintln!("{name}: vision output max abs err {err:.3e}, max |ref| {max_ref:.3}, rel {:.3e}", err / max_ref);
        assert!(err <= 1e-4 * max_ref, "{name}: vision output differs by {err} (max |ref| {max_ref})");

        let states = project(&c.weights, &c.cfg, &out).unwrap();
        let want = npy::read_f32(&dir.join("cross_attention_states.npy")).unwrap();
        assert_eq!(
            want.shape,
            vec![c.num_images * v.max_num_tiles, v.num_patches(), c.cfg.text.base.hidden_size],
            "{name}: cross_attention_states.npy shape"
        );
        let (err, max_ref) = compare(name, &states, &want.data);
        eprintln!("{name}: projector output max abs err {err:.3e}, max |ref| {max_ref:.3}, rel {:.3e}", err / max_ref);
        assert!(err <= 1e-4 * max_ref, "{name}: projector output differs by {err} (max |ref| {max_ref})");
    }
}

#[test]
fn images_are_encoded_independently() {
    let c = load("mllama-two-images");
    let both = run(&c);
    let v = &c.cfg.vision;
    let per_pixels = c.pixels.len() / 2;
    let per_out = both.len() / 2;
    let tiles = v.max_num_tiles;
    for i in 0..2 {
        let one = vision_forward(
            &c.weights.vision,
            v,
            &c.pixels[i * per_pixels..(i + 1) * per_pixels],
            1,
            &c.ids[i..i + 1],
            &c.mask[i * tiles..(i + 1) * tiles],
        )
        .unwrap();
        assert_eq!(one, &both[i * per_out..(i + 1) * per_out], "image {i} alone vs in a batch of two");
    }
}

#[test]
fn padding_tiles_and_aspect_ratio_ids_matter() {
    // transformers lets real tokens attend to padding tiles, so their pixels change real outputs, and the
    // aspect-ratio id selects the tile embeddings: both must reach the output.
    let c = load("mllama-noresize");
    assert_eq!(c.mask, vec![1, 1, 0, 0]);
    let base = run(&c);
    let v = &c.cfg.vision;
    let tile_len = v.num_channels * v.image_size * v.image_size;
    let real_len = 2 * v.num_patches() * v.vision_output_dim; // outputs of the two real tiles
    let mut pixels = c.pixels.clone();
    pixels[3 * tile_len..].iter_mut().for_each(|p| *p = 1.0);
    let changed = vision_forward(&c.weights.vision, v, &pixels, 1, &c.ids, &c.mask).unwrap();
    assert_ne!(&base[..real_len], &changed[..real_len]);
    let other_id = vision_forward(&c.weights.vision, v, &c.pixels, 1, &[5], &c.mask).unwrap();
    assert_ne!(&base[..real_len], &other_id[..real_len]);
}

#[test]
fn bad_inputs_are_errors() {
    let c = load("mllama-two-images");
    let (w, v) = (&c.weights.vision, &c.cfg.vision);
    let err = |r: llama32::Result<Vec<f32>>| r.unwrap_err().to_string();

    let e = err(vision_forward(w, v, &c.pixels[1..], 2, &c.ids, &c.mask));
    assert!(e.contains("pixel_values"), "{e}");
    let e = err(vision_forward(w, v, &c.pixels, 1, &c.ids, &c.mask));
    assert!(e.contains("pixel_values"), "{e}");
    let e = err(vision_forward(w, v, &c.pixels, 2, &c.ids[..1], &c.mask));
    assert!(e.contains("aspect_ratio_ids"), "{e}");
    let max_id = v.max_aspect_ratio_id() as i64;
    for bad in [max_id + 1, -1] {
        let e = err(vision_forward(w, v, &c.pixels, 2, &[1, bad], &c.mask));
        assert!(e.contains("aspect_ratio_ids[1]"), "{e}");
    }
    let e = err(vision_forward(w, v, &c.pixels, 2, &c.ids, &c.mask[1..]));
    assert!(e.contains("aspect_ratio_mask"), "{e}");
    let mut mask = c.mask.clone();
    mask[5] = 2;
    let e = err(vision_forward(w, v, &c.pixels, 2, &c.ids, &mask));
    assert!(e.contains("aspect_ratio_mask[1][1]"), "{e}");
    let mut pixels = c.pixels.clone();
    pixels[17] = f32::NAN;
    let e = err(vision_forward(w, v, &pixels, 2, &c.ids, &c.mask));
    assert!(e.contains("pixel_values[17]"), "{e}");

    let mut broken = w.clone();
    broken.class_embedding.pop();
    let e = err(vision_forward(&broken, v, &c.pixels, 2, &c.ids, &c.mask));
    assert!(e.contains("class_embedding"), "{e}");
    let mut broken = w.clone();
    broken.global_layers.pop();
    let e = err(vision_forward(&broken, v, &c.pixels, 2, &c.ids, &c.mask));
    assert!(e.contains("global_transformer"), "{e}");
    let mut cfg = v.clone();
    cfg.intermediate_layers_indices.push(cfg.num_hidden_layers);
    let e = err(vision_forward(w, &cfg, &c.pixels, 2, &c.ids, &c.mask));
    assert!(e.contains("intermediate_layers_indices"), "{e}");

    let out = run(&c);
    let e = err(project(&c.weights, &c.cfg, &out[1..]));
    assert!(e.contains("vision output"), "{e}");

    // No images: nothing to do.
    assert!(vision_forward(w, v, &[], 0, &[], &[]).unwrap().is_empty());
}

#[test]
fn gelu_is_the_exact_erf_form() {
    // erf(x) at a few points (Python's math.erf), and GELU's tails.
    for (x, want) in [(0.3, 0.3286267594591274), (1.7, 0.9837904585907745), (-2.9, -0.9999589021219005)] {
        assert!((erf(x) - want).abs() < 1e-14, "erf({x})");
    }
    let x = -6.0f32; // 0.5 * x * erfc(6 / sqrt 2) = -5.9195e-9; the tanh form gives -8.4e-11
    let want = -5.919_525_8e-9f32;
    assert!(((gelu(x) - want) / want).abs() < 1e-5, "gelu(-6) = {}", gelu(x));
}
