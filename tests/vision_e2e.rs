//! Llama 3.2 Vision end to end on the CPU: the golden cases' PNG files through our preprocessing, vision encoder,
//! projector and text decoder, against transformers' float32 logits and greedy ids.

mod common;
use common::max_rel;

use llama32::sampling::SamplingParams;
use llama32::vision::pipeline::{is_mllama_dir, MllamaModel};

const CASES: [&str; 3] = ["mllama-noresize", "mllama-resize", "mllama-two-images"];

#[test]
fn images_to_logits_and_greedy_ids_match_transformers() {
    for case in CASES {
        let g = common::mllama_golden(case);
        let (dir, ids) = (&g.dir, &g.input_ids);
        assert!(is_mllama_dir(dir));
        let m = MllamaModel::load(dir).unwrap();
        let enc = m.encode(&g.images).unwrap();
        assert_eq!(enc.num_tiles, g.num_tiles, "{case}");
        let states = llama32::npy::read_f32(&dir.join("cross_attention_states.npy")).unwrap();
        let e = max_rel(&enc.states, &states.data);
        assert!(e <= 1e-4, "{case}: projector output from our preprocessing differs by {e:.2e} of the largest value");
        let logits = m.logits(ids, &enc).unwrap();
        let want = llama32::npy::read_f32(&dir.join("logits.npy")).unwrap();
        let e = max_rel(&logits, &want.data);
        assert!(e <= 1e-4, "{case}: logits differ by {e:.2e} of the largest logit");
        let greedy = &g.greedy_ids;
        let params = SamplingParams { max_tokens: greedy.len(), ignore_eos: true, ..SamplingParams::greedy() };
        let out = m.generate(ids, &enc, &params, &mut |_| Ok(String::new()), &mut |_| {}).unwrap();
        assert_eq!(&out.ids, greedy, "{case}: greedy ids");
        eprintln!("{case}: logits max error {e:.2e} of the largest; greedy ids equal");
    }
}

#[test]
fn image_count_must_match_the_image_tokens() {
    let g = common::mllama_golden("mllama-two-images");
    let m = MllamaModel::load(&g.dir).unwrap();
    let ids = g.input_ids;
    let one = m.encode(&g.images[..1]).unwrap();
    assert!(m.logits(&ids, &one).is_err(), "two <|image|> tokens, one image");
    let none = m.encode(&[]).unwrap();
    let err = m.logits(&ids, &none).unwrap_err().to_string();
    assert!(err.contains("no image"), "{err}");
    // Generation refuses it the same way (it used to run, the image tokens attending to nothing).
    let params = SamplingParams { max_tokens: 2, ..SamplingParams::greedy() };
    let err = m.generate(&ids, &none, &params, &mut |_| Ok(String::new()), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("2 <|image|> token(s) but no image"), "{err}");
    let one_err = m.generate(&ids, &one, &params, &mut |_| Ok(String::new()), &mut |_| {});
    assert!(one_err.is_err(), "two <|image|> tokens, one image");
    let bad = m.encode(&[("broken.png".into(), b"\x89PNG\r\n\x1a\nnope".to_vec())]).unwrap_err().to_string();
    assert!(bad.contains("broken.png"), "{bad}");
    // Text-only prompts run without images.
    let text: Vec<u32> = ids.iter().copied().filter(|&t| t != m.cfg.image_token_index).collect();
    assert_eq!(m.logits(&text, &none).unwrap().len(), text.len() * m.cfg.text.base.vocab_size);
}

#[test]
fn the_image_encoder_caches_images_by_content() {
    let g = common::mllama_golden("mllama-two-images");
    let files = &g.images;
    let m = MllamaModel::load(&g.dir).unwrap();
    let together = m.encode(files).unwrap();
    let (enc, _text) = MllamaModel::load(&g.dir).unwrap().split();
    let first = enc.encode(files).unwrap();
    assert_eq!(enc.cache_stats(), (0, 2));
    assert_eq!(first.states, together.states, "per-image encoding equals encoding the images together");
    assert_eq!(first.num_tiles, together.num_tiles);
    // The second image again, then both in the other order: all hits, same values.
    let again = enc.encode(&files[1..]).unwrap();
    let swapped = enc.encode(&[files[1].clone(), files[0].clone()]).unwrap();
    assert_eq!(enc.cache_stats(), (3, 2));
    let per_image = together.states.len() / 2;
    assert_eq!(again.states, together.states[per_image..]);
    assert_eq!(&swapped.states[..per_image], &together.states[per_image..]);
    assert_eq!(&swapped.states[per_image..], &together.states[..per_image]);
}
