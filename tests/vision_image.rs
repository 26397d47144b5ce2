//! Llama 3.2 Vision image preprocessing against transformers' `MllamaImageProcessor` (PIL backend):
//! geometry vectors from `$LLAMA32_TEST_DATA/test_vectors/mllama_image_geometry.json`, and pixel values, geometry
//! and Pillow resize outputs saved by `scripts/make_golden_pixels.py` in `tests/golden/mllama-pixels/`.

mod common;

use std::path::{Path, PathBuf};

use llama32::npy;
use llama32::vision::image::{
    aspect_ratio_id, decode_rgb, fit_to_canvas, optimal_canvas, resize_rgb, supported_aspect_ratios, DecodeOptions,
    Geometry, ImageProcessor, PreprocessorConfig, Resample, RgbImage,
};
use serde_json::Value;

fn golden() -> PathBuf {
    common::golden_dir("mllama-pixels")
}

fn reference() -> Value {
    let path = golden().join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference.json parses")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn uz(v: &Value) -> usize {
    v.as_u64().unwrap_or_else(|| panic!("expected an integer, got {v}")) as usize
}

fn pair(v: &Value) -> (usize, usize) {
    (uz(&v[0]), uz(&v[1]))
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().expect("an array").iter().map(|x| x.as_i64().expect("an integer")).collect()
}

/// The reference's Llama 3.2 Vision config with the tile size replaced by `tile`.
fn processor(reference: &Value, tile: usize) -> ImageProcessor {
    let mut cfg = reference["config"].clone();
    cfg["size"] = serde_json::json!({"height": tile, "width": tile});
    let cfg = PreprocessorConfig::from_json_str(&cfg.to_string(), Path::new("reference.json")).expect("config");
    ImageProcessor::new(cfg).expect("valid config")
}

// ------------------------------------------------------------------------------------------------------------------
// Geometry vectors (ollama's test cases, checked against transformers' algorithm)

#[test]
fn geometry_vectors() {
    let Some(data) = common::data_dir() else { return };
    let path = data.join("test_vectors/mllama_image_geometry.json");
    let v: Value = serde_json::from_str(&String::from_utf8(read(&path)).expect("utf-8")).expect("json");
    let obj = v.as_object().expect("an object");
    let known = [
        "source",
        "supported_aspect_ratios",
        "optimal_tiled_canvas",
        "fit_to_canvas",
        "resize",
        "pad",
        "pixel_value_count",
        "aspect_ratio_id",
    ];
    for k in obj.keys() {
        assert!(known.contains(&k.as_str()), "unhandled section `{k}` in {}", path.display());
    }
    let mut checked = 0;

    for (max, list) in obj["supported_aspect_ratios"].as_object().expect("an object") {
        let max: usize = max.parse().expect("a tile count");
        let want: Vec<(usize, usize)> = list.as_array().expect("list").iter().map(pair).collect();
        assert_eq!(supported_aspect_ratios(max), want, "supported_aspect_ratios({max})");
        checked += 1;
    }
    for c in obj["optimal_tiled_canvas"].as_array().expect("list") {
        let got = optimal_canvas(uz(&c["image_h"]), uz(&c["image_w"]), uz(&c["max_tiles"]), uz(&c["tile_size"]));
        assert_eq!(got, (uz(&c["canvas_h"]), uz(&c["canvas_w"])), "optimal canvas {c}");
        checked += 1;
    }
    for c in obj["fit_to_canvas"].as_array().expect("list") {
        let got = fit_to_canvas(
            uz(&c["image_h"]),
            uz(&c["image_w"]),
            uz(&c["canvas_h"]),
            uz(&c["canvas_w"]),
            uz(&c["tile_size"]),
        );
        assert_eq!(got, (uz(&c["resized_h"]), uz(&c["resized_w"])), "fit to canvas {c}");
        checked += 1;
    }
    for c in obj["resize"].as_array().expect("list") {
        let g = Geometry::compute(uz(&c["image_h"]), uz(&c["image_w"]), uz(&c["max_tiles"]), uz(&c["tile_size"]))
            .expect("geometry");
        assert_eq!(g.resized, (uz(&c["resized_h"]), uz(&c["resized_w"])), "resize {c}");
        assert_eq!((g.tiles_h, g.tiles_w), (uz(&c["tiles_h"]), uz(&c["tiles_w"])), "tiles {c}");
        checked += 1;
    }
    for c in obj["pad"].as_array().expect("list") {
        // A flat grey image of that size, processed at that tile size: the canvas is the padded size, and every
        // pixel past the image is the padding value (0 rescaled and normalized).
        let (h, w, tile) = (uz(&c["image_h"]), uz(&c["image_w"]), uz(&c["tile_size"]));
        let cfg = PreprocessorConfig { tile_size: tile, ..PreprocessorConfig::default() };
        let p = ImageProcessor::new(cfg).expect("config");
        let out = p.preprocess_rgb(&RgbImage::new(w, h, vec![128; w * h * 3]).expect("image")).expect("preprocess");
        let g = out.geometry;
        assert_eq!((g.tiles_h, g.tiles_w), (uz(&c["tiles_h"]), uz(&c["tiles_w"])), "pad tiles {c}");
        assert_eq!(g.canvas, (uz(&c["padded_h"]), uz(&c["padded_w"])), "padded size {c}");
        assert_eq!(g.resized, (h, w), "{c}: no resize expected");
        let pad = (0.0 - p.config().image_mean[0]) / p.config().image_std[0];
        let img = (128.0 / 255.0f64) as f32;
        let img = (img - p.config().image_mean[0]) / p.config().image_std[0];
        let plane = tile * tile;
        for (ty, tx) in (0..g.tiles_h).flat_map(|y| (0..g.tiles_w).map(move |x| (y, x))) {
            let t = &out.pixel_values[(ty * g.tiles_w + tx) * 3 * plane..][..plane]; // channel 0
            for (i, &v) in t.iter().enumerate() {
                let (y, x) = (ty * tile + i / tile, tx * tile + i % tile);
                let want = if y < h && x < w { img } else { pad };
                assert_eq!(v, want, "{c}: pixel ({y}, {x})");
            }
        }
        checked += 1;
    }
    for c in obj["pixel_value_count"].as_array().expect("list") {
        let (th, tw) = (uz(&c["tiles_h"]), uz(&c["tiles_w"]));
        let p = ImageProcessor::new(PreprocessorConfig::default()).expect("config");
        let img = RgbImage::new(tw * 560, th * 560, vec![7; th * tw * 560 * 560 * 3]).expect("image");
        let out = p.preprocess_rgb(&img).expect("preprocess");
        assert_eq!((out.geometry.tiles_h, out.geometry.tiles_w), (th, tw), "{c}");
        assert_eq!(out.tiles().len(), uz(&c["values"]), "pixel value count {c}");
        checked += 1;
    }
    for c in obj["aspect_ratio_id"].as_array().expect("list") {
        let g = Geometry::compute(uz(&c["image_h"]), uz(&c["image_w"]), uz(&c["max_tiles"]), uz(&c["tile_size"]))
            .expect("geometry");
        assert_eq!(g.aspect_ratio_id, c["aspect_ratio_id"].as_i64().expect("id"), "aspect ratio id {c}");
        assert_eq!(aspect_ratio_id(g.tiles_h, g.tiles_w, uz(&c["max_tiles"])), Some(g.aspect_ratio_id));
        checked += 1;
    }
    eprintln!("geometry vectors: {checked} cases match");
    assert!(checked >= 30, "expected the full vector file, checked only {checked} cases");
}

// ------------------------------------------------------------------------------------------------------------------
// Pixel values from transformers

/// Compares our real tiles with transformers' on the un-normalized scale (value * std): returns (max difference in
/// units of 1/255, number of values that are not bit-identical).
fn compare(ours: &[f32], theirs: &[f32], plane: usize, std: [f32; 3], what: &str) -> (f64, usize) {
    assert_eq!(ours.len(), theirs.len(), "{what}: value count");
    let (mut max, mut diff) = (0f64, 0usize);
    for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
        let ch = (i / plane) % 3;
        if a.to_bits() != b.to_bits() {
            diff += 1;
        }
        let d = (f64::from(a) - f64::from(b)).abs() * f64::from(std[ch]) * 255.0;
        max = max.max(d);
    }
    (max, diff)
}

/// Our processing of one reference case: geometry and ids checked, returns the processed image.
fn check_case(reference: &Value, c: &Value) -> llama32::vision::image::ProcessedImage {
    let name = c["name"].as_str().expect("name");
    let tile = uz(&c["tile"]);
    let p = processor(reference, tile);
    let out = p.preprocess_bytes(&read(&golden().join(c["file"].as_str().expect("file")))).expect(name);
    let g = out.geometry;
    assert_eq!(g.image, pair(&c["image_size"]), "{name}: decoded size");
    assert_eq!(g.canvas, pair(&c["canvas"]), "{name}: canvas");
    assert_eq!(g.resized, pair(&c["resized"]), "{name}: resized size");
    assert_eq!((g.tiles_h, g.tiles_w), pair(&c["tiles"]), "{name}: tile grid");
    assert_eq!(out.num_tiles, uz(&c["num_tiles"]), "{name}: num_tiles");
    assert_eq!(out.aspect_ratio_id, c["aspect_ratio_id"].as_i64().expect("id"), "{name}: aspect_ratio_id");
    assert_eq!(out.aspect_ratio_mask, ints(&c["aspect_ratio_mask"]), "{name}: aspect_ratio_mask");
    let padded: Vec<usize> = c["padded_shape"].as_array().expect("shape").iter().map(uz).collect();
    assert_eq!(out.shape().to_vec(), padded, "{name}: padded pixel_values shape");
    assert!(out.pixel_values[out.tiles().len()..].iter().all(|&v| v == 0.0), "{name}: padding tiles are zero");
    out
}

/// Our JPEG decoder (`vision::jpeg`) reproduces Pillow's libjpeg-turbo exactly. Bounds for JPEG cases, in levels
/// (1/255): the largest difference, and the mean absolute difference.
const JPEG_MAX_LEVELS: f64 = 0.0;
const JPEG_MEAN_LEVELS: f64 = 0.0;

/// Our decoding of a JPEG against Pillow's decoded pixels: (max, mean) absolute difference in levels.
fn jpeg_decoder_difference(jpeg: &Path, pil_png: &Path) -> (f64, f64) {
    let ours = decode_rgb(&read(jpeg), &DecodeOptions::default()).expect("JPEG");
    let pil = decode_rgb(&read(pil_png), &DecodeOptions::default()).expect("Pillow-decoded PNG");
    assert_eq!((ours.width, ours.height), (pil.width, pil.height), "{}", jpeg.display());
    let d: Vec<u8> = ours.data.iter().zip(&pil.data).map(|(a, b)| a.abs_diff(*b)).collect();
    let max = d.iter().copied().max().unwrap_or(0);
    (f64::from(max), d.iter().map(|&x| f64::from(x)).sum::<f64>() / d.len() as f64)
}

#[test]
fn pixels_match_transformers() {
    let r = reference();
    let std = processor(&r, 16).config().image_std;
    let mut report = Vec::new();
    let cases = r["cases"].as_array().expect("cases");
    assert!(cases.len() >= 20, "reference.json lists {} cases", cases.len());
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let out = check_case(&r, c);
        let want = npy::read_f32(&golden().join(c["pixel_values"].as_str().expect("npy"))).expect("npy");
        let t = uz(&c["tile"]);
        assert_eq!(want.shape, [out.num_tiles, 3, t, t], "{name}: reference shape");
        let (max, diff) = compare(out.tiles(), &want.data, t * t, std, name);
        report.push(format!("{name}: max |diff| {max:.3}/255, {diff} of {} values differ", want.data.len()));
        if c["exact_decode"].as_bool().expect("exact_decode") {
            assert_eq!(diff, 0, "{name}: expected bit-identical pixel values (max diff {max:.3}/255)");
            continue;
        }
        // JPEG: our decoder and Pillow's agree exactly, and so does the preprocessing of Pillow's decoded pixels.
        let pil = golden().join(c["pil_decoded"].as_str().expect("pil_decoded"));
        let (dmax, dmean) = jpeg_decoder_difference(&golden().join(c["file"].as_str().expect("file")), &pil);
        report.push(format!("{name}: JPEG decoder vs Pillow: max {dmax} levels, mean {dmean:.3}"));
        assert!(dmax <= JPEG_MAX_LEVELS && dmean <= JPEG_MEAN_LEVELS, "{name}: decoder differs by {dmax} / {dmean}");
        assert_eq!(diff, 0, "{name}: max diff {max:.3}/255 after preprocessing");
        let rgb = decode_rgb(&read(&pil), &DecodeOptions::default()).expect("Pillow-decoded PNG");
        let from_pil = processor(&r, t).preprocess_rgb(&rgb).expect("preprocess");
        let (max, diff) = compare(from_pil.tiles(), &want.data, t * t, std, name);
        assert_eq!(diff, 0, "{name}: preprocessing of Pillow's decoded pixels differs (max {max:.3}/255)");
        report.push(format!("{name}: from Pillow's decoded pixels: bit-identical"));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn full_size_pixels_match_transformers() {
    let r = reference();
    let std = processor(&r, 560).config().image_std;
    let cases = r["full_size"].as_array().expect("full_size");
    assert!(!cases.is_empty());
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let out = check_case(&r, c);
        assert_eq!(out.tile_size, 560);
        // Statistics over all real tiles (a single differing value changes the sum by >= ~0.014).
        let tiles = out.tiles();
        let sum: f64 = tiles.iter().map(|&v| f64::from(v)).sum();
        let sum_sq: f64 = tiles.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let s = &c["stats"];
        let (want_sum, want_sq) = (s["sum"].as_f64().expect("sum"), s["sum_sq"].as_f64().expect("sum_sq"));
        assert!((sum - want_sum).abs() <= 1e-3, "{name}: sum {sum} vs {want_sum}");
        assert!(
            (sum_sq - want_sq).abs() <= 1e-9 * want_sq.abs() + 1e-3,
            "{name}: sum of squares {sum_sq} vs {want_sq}"
        );
        let min = tiles.iter().copied().fold(f32::INFINITY, f32::min);
        let max = tiles.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(
            (f64::from(min), f64::from(max)),
            (s["min"].as_f64().unwrap(), s["max"].as_f64().unwrap()),
            "{name}"
        );

        let stride = uz(&c["subsample"]["stride"]);
        let want = npy::read_f32(&golden().join(c["subsample"]["file"].as_str().expect("file"))).expect("npy");
        let m = 560usize.div_ceil(stride);
        assert_eq!(want.shape, [out.num_tiles, 3, m, m], "{name}: subsample shape");
        let mut sub = Vec::with_capacity(want.data.len());
        for plane in tiles.chunks_exact(560 * 560) {
            for y in (0..560).step_by(stride) {
                sub.extend((0..560).step_by(stride).map(|x| plane[y * 560 + x]));
            }
        }
        let (maxd, diff) = compare(&sub, &want.data, m * m, std, name);
        assert_eq!(diff, 0, "{name}: subsample differs (max {maxd:.3}/255)");

        let cr = &c["crop"];
        let (t, y0, x0, n) = (uz(&cr["tile"]), uz(&cr["y"]), uz(&cr["x"]), uz(&cr["size"]));
        let want = npy::read_f32(&golden().join(cr["file"].as_str().expect("file"))).expect("npy");
        assert_eq!(want.shape, [3, n, n]);
        let mut crop = Vec::with_capacity(3 * n * n);
        for ch in 0..3 {
            let plane = &tiles[(t * 3 + ch) * 560 * 560..][..560 * 560];
            for y in y0..y0 + n {
                crop.extend_from_slice(&plane[y * 560 + x0..y * 560 + x0 + n]);
            }
        }
        let (maxd, diff) = compare(&crop, &want.data, n * n, std, name);
        assert_eq!(diff, 0, "{name}: crop differs (max {maxd:.3}/255)");
        eprintln!(
            "{name}: {} tiles, sum {sum:.6} (reference {want_sum:.6}), subsample and crop identical",
            out.num_tiles
        );
    }
}

#[test]
fn batch_of_one_prompt_matches_transformers() {
    let r = reference();
    let b = &r["batch"];
    let p = processor(&r, uz(&b["tile"]));
    let files: Vec<Vec<u8>> =
        b["files"].as_array().expect("files").iter().map(|f| read(&golden().join(f.as_str().expect("file")))).collect();
    let out = p.preprocess_batch(&files).expect("batch");
    let want = npy::read_f32(&golden().join(b["pixel_values"].as_str().expect("npy"))).expect("npy");
    assert_eq!(want.shape[0], 1);
    assert_eq!(out.shape().to_vec(), want.shape[1..].to_vec());
    assert_eq!(out.aspect_ratio_ids, ints(&b["aspect_ratio_ids"]));
    let mask: Vec<i64> = b["aspect_ratio_mask"].as_array().expect("mask").iter().flat_map(ints).collect();
    assert_eq!(out.aspect_ratio_mask, mask);
    assert_eq!(out.num_tiles, b["num_tiles"].as_array().expect("n").iter().map(uz).collect::<Vec<_>>());
    let mismatches = out.pixel_values.iter().zip(&want.data).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(mismatches, 0, "batched pixel_values differ");
    // The same as the images processed one by one, stacked.
    let single = p.preprocess_bytes(&files[1]).expect("single");
    let per_image = out.pixel_values.len() / 2;
    assert_eq!(&out.pixel_values[per_image..], &single.pixel_values[..]);
}

#[test]
fn resize_is_bit_exact_with_pillow() {
    let r = reference();
    let s = &r["resize_sweep"];
    let src = decode_rgb(&read(&golden().join(s["source"].as_str().expect("src"))), &DecodeOptions::default())
        .expect("sweep source");
    let blob = read(&golden().join(s["data"].as_str().expect("data")));
    let outputs = s["outputs"].as_array().expect("outputs");
    let mut failures = Vec::new();
    for o in outputs {
        let (w, h, off) = (uz(&o["width"]), uz(&o["height"]), uz(&o["offset"]));
        let filter = match o["filter"].as_str().expect("filter") {
            "bilinear" => Resample::Bilinear,
            "bicubic" => Resample::Bicubic,
            "lanczos" => Resample::Lanczos,
            "box" => Resample::Box,
            "hamming" => Resample::Hamming,
            f => panic!("unknown filter {f}"),
        };
        let got = resize_rgb(&src, w, h, filter).expect("resize");
        let want = &blob[off..off + w * h * 3];
        let diff = got.data.iter().zip(want).filter(|(a, b)| a != b).count();
        let max = got.data.iter().zip(want).map(|(&a, &b)| a.abs_diff(b)).max().unwrap_or(0);
        if diff > 0 {
            failures
                .push(format!("{filter:?} {}x{} -> {w}x{h}: {diff} values differ, max {max}", src.width, src.height));
        }
    }
    assert!(failures.is_empty(), "resize differs from Pillow:\n{}", failures.join("\n"));
    eprintln!("{} Pillow resize outputs reproduced bit-exactly", outputs.len());
}

// ------------------------------------------------------------------------------------------------------------------
// Decoding details and bad input

#[test]
fn exif_orientation_is_optional() {
    let bytes = read(&golden().join("exif_rot.jpg"));
    let plain = decode_rgb(&bytes, &DecodeOptions::default()).expect("decode");
    assert_eq!((plain.width, plain.height), (64, 24));
    let opts = DecodeOptions { apply_exif_orientation: true, ..DecodeOptions::default() };
    let rot = decode_rgb(&bytes, &opts).expect("decode");
    assert_eq!((rot.width, rot.height), (24, 64));
    assert_eq!(rot.get(24, 0), None);
    // Orientation 6: displayed = stored rotated 90 degrees clockwise.
    for (x, y) in [(0, 0), (5, 17), (23, 63), (11, 40)] {
        assert_eq!(rot.get(x, y), plain.get(y, plain.height - 1 - x), "({x}, {y})");
        assert!(rot.get(x, y).is_some());
    }
}

fn err_of<T: std::fmt::Debug>(r: llama32::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

/// A PNG whose header claims `w x h` pixels, with a tiny (invalid) IDAT chunk (CRCs computed).
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let ihdr = [&w.to_be_bytes()[..], &h.to_be_bytes(), &[8, 2, 0, 0, 0]].concat();
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(&b"IHDR"[..], ihdr), (b"IDAT", vec![0x78, 0x9c, 0x03, 0x00]), (b"IEND", vec![])] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let body = [kind, &data[..]].concat();
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    out
}

#[test]
fn bad_input_gets_clear_errors() {
    let p = ImageProcessor::new(PreprocessorConfig::default()).expect("config");
    let png = read(&golden().join("rgb_down.png"));
    let jpg = read(&golden().join("photo420.jpg"));
    let webp = read(&golden().join("lossy.webp"));

    let e = err_of(p.preprocess_bytes(&[]));
    assert!(e.contains("empty"), "{e}");
    let e = err_of(p.preprocess_bytes(b"this is not an image at all"));
    assert!(e.contains("not a JPEG, PNG or WebP"), "{e}");
    let e = err_of(p.preprocess_bytes(&png[..png.len() / 2]));
    assert!(e.contains("cannot decode PNG image"), "{e}");
    let e = err_of(p.preprocess_bytes(&png[..20]));
    assert!(e.contains("PNG"), "{e}");
    let e = err_of(p.preprocess_bytes(&jpg[..jpg.len() * 2 / 3]));
    assert!(e.contains("JPEG") && e.contains("truncated"), "{e}");
    let e = err_of(p.preprocess_bytes(&webp[..webp.len() / 2]));
    assert!(e.contains("cannot decode WebP image"), "{e}");
    let mut garbage = png.clone();
    for b in garbage.iter_mut().skip(100).step_by(7) {
        *b ^= 0x5A;
    }
    let e = err_of(p.preprocess_bytes(&garbage));
    assert!(e.contains("cannot decode PNG image"), "{e}");

    // Over the pixel limit: a configured small limit, and a header claiming 100000x100000 (refused before decoding).
    let small = p.clone().with_decode_options(DecodeOptions { max_pixels: 10_000, ..DecodeOptions::default() });
    let e = err_of(small.preprocess_bytes(&png));
    assert!(e.contains("too large") && e.contains("161x119") && e.contains("10000"), "{e}");
    let e = err_of(p.preprocess_bytes(&png_header_only(100_000, 100_000)));
    assert!(e.contains("too large") && e.contains("100000x100000"), "{e}");
    assert!(small.preprocess_bytes(&read(&golden().join("rgb_up.png"))).is_ok(), "small images pass the limit");

    // Several images: the error names the image.
    let e = err_of(p.preprocess_batch(&[png.clone(), Vec::new()]));
    assert!(e.contains("image 1") && e.contains("empty"), "{e}");

    // Without RGB conversion only RGB images are accepted.
    let cfg = PreprocessorConfig { do_convert_rgb: false, ..PreprocessorConfig::default() };
    let raw = ImageProcessor::new(cfg).expect("config");
    let e = err_of(raw.preprocess_bytes(&read(&golden().join("rgba.png"))));
    assert!(e.contains("do_convert_rgb"), "{e}");
    assert!(raw.preprocess_bytes(&png).is_ok());

    // Bad RGB buffers.
    assert!(RgbImage::new(2, 2, vec![0; 11]).is_err());
    assert!(resize_rgb(&RgbImage::new(2, 2, vec![0; 12]).expect("image"), 0, 3, Resample::Bilinear).is_err());
}

// ------------------------------------------------------------------------------------------------------------------
// preprocessor_config.json

#[test]
fn config_parsing_and_errors() {
    let dir = std::env::temp_dir().join(format!("llama32-vision-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let r = reference();
    let path = dir.join("preprocessor_config.json");
    std::fs::write(&path, r["config"].to_string()).expect("write");
    assert_eq!(PreprocessorConfig::from_model_dir(&dir).expect("config"), PreprocessorConfig::default());

    // Missing fields take transformers' class defaults (224, mean/std 0.5), not the Llama 3.2 Vision values.
    let d = PreprocessorConfig::from_json_str("{}", &path).expect("empty config");
    assert_eq!((d.tile_size, d.image_mean, d.image_std, d.max_image_tiles), (224, [0.5; 3], [0.5; 3], 4));
    assert_eq!(d.resample, Resample::Bilinear);

    let bad = |patch: Value| -> String {
        let mut v = r["config"].clone();
        for (k, x) in patch.as_object().expect("object") {
            v[k] = x.clone();
        }
        std::fs::write(&path, v.to_string()).expect("write");
        err_of(PreprocessorConfig::from_file(&path))
    };
    for (patch, field, msg) in [
        (serde_json::json!({"size": {"height": 560, "width": 448}}), "size", "must be equal"),
        (serde_json::json!({"size": {"shortest_edge": 560}}), "size.height", "missing"),
        (serde_json::json!({"resample": 0}), "resample", "unsupported filter 0"),
        (serde_json::json!({"do_pad": false}), "do_pad", "only supports"),
        (serde_json::json!({"do_resize": false}), "do_resize", "only supports"),
        (serde_json::json!({"image_mean": [0.5, 0.5]}), "image_mean", "expected 3 values"),
        (serde_json::json!({"image_std": [0.5, 0.0, 0.5]}), "image_std", "non-zero"),
        (serde_json::json!({"max_image_tiles": 0}), "max_image_tiles", "positive integer"),
        (
            serde_json::json!({"size": {"height": 4096, "width": 4096}, "max_image_tiles": 8}),
            "max_image_tiles",
            "exceed the limit",
        ),
        (serde_json::json!({"max_image_tiles": 65}), "max_image_tiles", "out of range"),
        (serde_json::json!({"do_normalize": "yes"}), "do_normalize", "true or false"),
        (serde_json::json!({"rescale_factor": "1/255"}), "rescale_factor", "a number"),
    ] {
        let e = bad(patch);
        assert!(e.contains("preprocessor_config.json") && e.contains(field) && e.contains(msg), "{e}");
    }
    std::fs::write(&path, "{not json").expect("write");
    let e = err_of(PreprocessorConfig::from_file(&path));
    assert!(e.contains("preprocessor_config.json"), "{e}");
    let e = err_of(PreprocessorConfig::from_file(&dir.join("missing.json")));
    assert!(e.contains("missing.json"), "{e}");
    std::fs::remove_dir_all(&dir).expect("cleanup");

    // The published Llama 3.2 Vision file (from the docs) equals the default.
    if let Some(data) = common::data_dir() {
        for m in ["Llama-3.2-11B-Vision-Instruct", "Llama-3.2-90B-Vision-Instruct"] {
            let f = data.join(m).join("preprocessor_config.from-docs.json");
            assert_eq!(PreprocessorConfig::from_file(&f).expect("config"), PreprocessorConfig::default(), "{m}");
        }
    }
}
