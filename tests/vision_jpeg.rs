//! The libjpeg-turbo-exact JPEG decoder (`llama32::vision::jpeg`) against Pillow 13's decoded pixels: the JPEGs of
//! `tests/golden/mllama-pixels/` (made by `scripts/make_golden_pixels.py`) and of `tests/golden/jpeg/` (made by
//! `scripts/make_golden_jpeg.py`), each with Pillow's output stored losslessly as PNG. Byte-identical output is
//! required. Also: corrupt and truncated inputs give errors (never panics), and the pixel limit is enforced.

mod common;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::ImageDecoder;
use llama32::vision::jpeg::{decode_jpeg, JpegImage};

const LIMIT: u64 = 1 << 26;

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Pillow's pixels from a PNG: (width, height, channels, data).
fn read_png(path: &Path) -> (usize, usize, usize, Vec<u8>) {
    let bytes = read(path);
    let dec = image::codecs::png::PngDecoder::new(Cursor::new(bytes)).expect("png header");
    let (w, h) = dec.dimensions();
    let channels = match dec.color_type() {
        image::ColorType::L8 => 1,
        image::ColorType::Rgb8 => 3,
        other => panic!("{}: unexpected PNG colour type {other:?}", path.display()),
    };
    let mut data = vec![0u8; dec.total_bytes() as usize];
    dec.read_image(&mut data).expect("png data");
    (w as usize, h as usize, channels, data)
}

/// Expands gray to RGB the way Pillow's `convert("RGB")` does (replication).
fn as_channels(img: &JpegImage, channels: usize) -> Vec<u8> {
    match (img.components, channels) {
        (a, b) if a == b => img.data.clone(),
        (1, 3) => img.data.iter().flat_map(|&l| [l; 3]).collect(),
        (a, b) => panic!("cannot compare a {a}-component image with {b} channels"),
    }
}

/// Checks that our decoding of `jpg` equals Pillow's pixels in `png`; returns a description of the mismatch.
fn compare(jpg: &Path, png: &Path) -> Result<(), String> {
    let ours = decode_jpeg(&read(jpg), LIMIT).map_err(|e| format!("{}: {e}", jpg.display()))?;
    let (w, h, c, pil) = read_png(png);
    if (ours.width, ours.height) != (w, h) {
        return Err(format!("{}: size {}x{} vs Pillow {w}x{h}", jpg.display(), ours.width, ours.height));
    }
    assert_eq!(ours.data.len(), ours.width * ours.height * ours.components);
    let ours = as_channels(&ours, c);
    let diffs: Vec<usize> = (0..pil.len()).filter(|&i| ours[i] != pil[i]).collect();
    if diffs.is_empty() {
        return Ok(());
    }
    let max = diffs.iter().map(|&i| (i32::from(ours[i]) - i32::from(pil[i])).abs()).max().unwrap_or(0);
    let first = diffs[0];
    let (px, ch) = (first / c, first % c);
    Err(format!(
        "{}: {} of {} samples differ (max {max} levels); first at x={} y={} channel {ch}: ours {} Pillow {}",
        jpg.display(),
        diffs.len(),
        pil.len(),
        px % w,
        px / w,
        ours[first],
        pil[first]
    ))
}

fn golden(name: &str) -> PathBuf {
    common::golden_dir(name)
}

/// The pairs (jpg, pil png) of a golden folder.
fn jpeg_cases(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("jpg") {
            continue;
        }
        let stem = path.file_stem().and_then(|s| s.to_str()).expect("file stem").to_string();
        // gray.jpg's Pillow pixels are stored as gray_jpeg.pil.png (gray.png is another case).
        let png = [format!("{stem}.pil.png"), format!("{stem}_jpeg.pil.png")]
            .into_iter()
            .map(|n| dir.join(n))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no Pillow pixels for {}", path.display()));
        out.push((path, png));
    }
    out.sort();
    out
}

fn check_folder(name: &str, min_cases: usize) {
    let cases = jpeg_cases(&golden(name));
    assert!(cases.len() >= min_cases, "{name}: only {} JPEG cases", cases.len());
    let failures: Vec<String> = cases.iter().filter_map(|(j, p)| compare(j, p).err()).collect();
    for (j, _) in &cases {
        eprintln!("checked {}", j.display());
    }
    assert!(failures.is_empty(), "not bit-exact with Pillow:\n{}", failures.join("\n"));
}

#[test]
fn mllama_pixel_jpegs_match_pillow_exactly() {
    check_folder("mllama-pixels", 5);
}

#[test]
fn generated_jpegs_match_pillow_exactly() {
    check_folder("jpeg", 20);
}

#[test]
fn the_comparison_can_fail() {
    // A 4:2:0 JPEG against the pixels of a different case must be reported as different.
    let dir = golden("mllama-pixels");
    assert!(compare(&dir.join("photo420.jpg"), &dir.join("progressive.pil.png")).is_err());
    let jpg = read(&dir.join("photo420.jpg"));
    let img = decode_jpeg(&jpg, LIMIT).expect("decodes");
    let (_, _, _, pil) = read_png(&dir.join("photo420.pil.png"));
    let mut wrong = img.clone();
    wrong.data[7] ^= 1;
    assert_ne!(wrong.data, pil);
    assert_eq!(img.data, pil);
}

#[test]
fn pixel_limit_is_enforced() {
    let jpg = read(&golden("mllama-pixels").join("photo420.jpg"));
    let img = decode_jpeg(&jpg, LIMIT).expect("decodes");
    let pixels = (img.width * img.height) as u64;
    assert!(decode_jpeg(&jpg, pixels).is_ok());
    let e = decode_jpeg(&jpg, pixels - 1).expect_err("over the limit").to_string();
    assert!(e.contains("too large"), "{e}");
}

#[test]
fn refuses_unsupported_and_malformed_input() {
    let e = decode_jpeg(b"", LIMIT).expect_err("empty").to_string();
    assert!(e.contains("not a JPEG"), "{e}");
    let e = decode_jpeg(b"\x89PNG\r\n\x1a\n", LIMIT).expect_err("png").to_string();
    assert!(e.contains("not a JPEG"), "{e}");
    let jpg = read(&golden("mllama-pixels").join("photo420.jpg"));
    // Truncated after the scan header: an error naming truncation.
    let e = decode_jpeg(&jpg[..jpg.len() - 40], LIMIT).expect_err("truncated").to_string();
    assert!(e.contains("truncated"), "{e}");
    // The SOF0 marker turned into SOF9 (arithmetic coding) or SOF3 (lossless).
    let sof = jpg.windows(2).position(|w| w == [0xFF, 0xC0]).expect("SOF0");
    let mut arith = jpg.clone();
    arith[sof + 1] = 0xC9;
    let e = decode_jpeg(&arith, LIMIT).expect_err("arithmetic").to_string();
    assert!(e.contains("arithmetic"), "{e}");
    let mut lossless = jpg.clone();
    lossless[sof + 1] = 0xC3;
    assert!(decode_jpeg(&lossless, LIMIT).is_err());
    // 12-bit precision.
    let mut p12 = jpg.clone();
    p12[sof + 4] = 12;
    let e = decode_jpeg(&p12, LIMIT).expect_err("12-bit").to_string();
    assert!(e.contains("12-bit"), "{e}");
}

/// A small deterministic generator (xorshift) for the corruption test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn corrupt_and_truncated_inputs_never_panic() {
    let mut files = jpeg_cases(&golden("mllama-pixels"));
    files.extend(jpeg_cases(&golden("jpeg")));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut ok, mut err) = (0usize, 0usize);
    let mut tally = |r: llama32::Result<JpegImage>| match r {
        Ok(img) => {
            assert_eq!(img.data.len(), img.width * img.height * img.components);
            ok += 1
        }
        Err(_) => err += 1,
    };
    for (path, _) in &files {
        let jpg = read(path);
        // Every truncation point in the headers, then a sample of points in the data.
        let step = (jpg.len() / 60).max(1);
        for cut in (0..jpg.len().min(700)).chain((700..jpg.len()).step_by(step)) {
            tally(decode_jpeg(&jpg[..cut], LIMIT));
        }
        for _ in 0..150 {
            let mut bad = jpg.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(bad.len());
                bad[i] = match rng.below(3) {
                    0 => rng.next() as u8,
                    1 => bad[i] ^ (1 << rng.below(8)),
                    _ => 0xFF,
                };
            }
            tally(decode_jpeg(&bad, LIMIT));
        }
    }
    eprintln!("corruption test: {ok} decoded, {err} refused");
    assert!(err > 0 && ok > 0);
}

/// Extra check for development: `LLAMA32_JPEG_CHECK_DIR=<dir>` compares every `<case>.jpg` there with its
/// `<case>.pil.png` (e.g. large photos written by Pillow) and prints the decode time of each.
#[test]
fn extra_folder_from_env_matches_pillow() {
    let Some(dir) = std::env::var_os("LLAMA32_JPEG_CHECK_DIR") else {
        eprintln!("skipped: LLAMA32_JPEG_CHECK_DIR is not set");
        return;
    };
    let cases = jpeg_cases(Path::new(&dir));
    let mut failures = Vec::new();
    for (jpg, png) in &cases {
        let bytes = read(jpg);
        let runs = 5;
        let t = std::time::Instant::now();
        for _ in 0..runs {
            decode_jpeg(&bytes, LIMIT).expect("decodes");
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / f64::from(runs);
        let t = std::time::Instant::now();
        for _ in 0..runs {
            image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).expect("image crate decodes");
        }
        let ms_image = t.elapsed().as_secs_f64() * 1e3 / f64::from(runs);
        let r = compare(jpg, png);
        eprintln!(
            "{}: {ms:.2} ms (image crate {ms_image:.2} ms) {}",
            jpg.display(),
            if r.is_ok() { "exact" } else { "DIFFERS" }
        );
        if let Err(e) = r {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "not bit-exact with Pillow:\n{}", failures.join("\n"));
}
