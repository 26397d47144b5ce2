//! Image preprocessing for Llama 3.2 Vision, identical to transformers' `MllamaImageProcessor` (PIL backend).
//!
//! The pipeline, per image:
//! 1. decode JPEG / PNG / WebP bytes ([`decode_rgb`]) and convert to 8-bit RGB the way Pillow's `Image.open` plus
//!    transformers' `convert_to_rgb` do: transparency is alpha-composited onto white with Pillow's integer formula,
//!    16-bit RGB(A)/LA keep the high byte, 16-bit gray is clamped at 255 (Pillow's `I;16` to `RGB`), 1/2/4-bit gray
//!    is expanded to 0..255;
//! 2. choose the tile canvas ([`optimal_canvas`]) among the [`supported_aspect_ratios`] and the size that fits it
//!    without distortion ([`fit_to_canvas`]);
//! 3. resize with Pillow's separable resampler ([`resize_rgb`]: fixed-point coefficients, two passes with uint8
//!    rounding between them, in Pillow 13's pass order), bit-exact with `PIL.Image.resize`;
//! 4. pad with zeros at the bottom and right up to the canvas, rescale (`x * rescale_factor`, in f64, then f32) and
//!    normalize (`(x - mean) / std` in f32, as numpy does), split into row-major `tile x tile` tiles;
//! 5. pad the tile dimension with zeros up to `max_image_tiles` ([`ProcessedImage`]); several images of one prompt
//!    are stacked by [`ImageProcessor::preprocess_batch`].
//!
//! From decoded pixels on, the output is bit-identical to transformers 5.24 with Pillow 13. Decoding: PNG and WebP
//! (lossless and lossy) match Pillow bit-exactly, and so does JPEG (decoded by [`super::jpeg`], which reproduces
//! libjpeg-turbo's integer IDCT, fancy upsampling and YCbCr tables; the `image` crate only reads the EXIF
//! orientation). EXIF
//! orientation is not applied by default (transformers does not apply it to PIL images given to the processor; its
//! `load_image` does), see [`DecodeOptions::apply_exif_orientation`]. Not reproduced: CMYK JPEGs (converted by the
//! JPEG decoder) and tRNS colour keys on 16-bit PNGs (Pillow compares them against 8-bit values).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegDecoder;
use image::codecs::png::PngDecoder;
use image::codecs::webp::WebPDecoder;
use image::{DynamicImage, ImageDecoder, Limits};
use rayon::prelude::*;
use serde_json::Value;

use crate::{Error, Result};

/// Default limit on the number of pixels of a decoded image (64 Mpixel, 2^26).
pub const DEFAULT_MAX_PIXELS: u64 = 1 << 26;

/// Upper bound on `max_image_tiles * tile_size^2` (the padded output of one image), 2^26 pixels.
pub const MAX_TILE_PIXELS: usize = 1 << 26;

/// `size.height` (= `size.width`) of the Llama 3.2 Vision preprocessor: the tile side in pixels.
pub const LLAMA32_TILE_SIZE: usize = 560;

/// The CLIP mean used by Llama 3.2 Vision, as written in `preprocessor_config.json` (used as f32, like numpy).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];

/// The CLIP standard deviation used by Llama 3.2 Vision, as written in `preprocessor_config.json`.
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Pillow's resampling filters (the `resample` field holds Pillow's integer code). `NEAREST` (0) is not supported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// `LANCZOS` (1): windowed sinc, support 3.
    Lanczos,
    /// `BILINEAR` (2): triangle filter, support 1 (what Llama 3.2 Vision uses).
    Bilinear,
    /// `BICUBIC` (3): cubic convolution with a = -0.5, support 2.
    Bicubic,
    /// `BOX` (4): box filter, support 0.5.
    Box,
    /// `HAMMING` (5): Hamming-windowed sinc, support 1.
    Hamming,
}

impl Resample {
    /// The filter for Pillow's integer code (`PIL.Image.Resampling`), None for unsupported codes.
    pub fn from_pil_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(Resample::Lanczos),
            2 => Some(Resample::Bilinear),
            3 => Some(Resample::Bicubic),
            4 => Some(Resample::Box),
            5 => Some(Resample::Hamming),
            _ => None,
        }
    }

    /// Pillow's integer code.
    pub fn pil_code(self) -> i64 {
        match self {
            Resample::Lanczos => 1,
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
            Resample::Box => 4,
            Resample::Hamming => 5,
        }
    }

    fn support(self) -> f64 {
        match self {
            Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Resample::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Resample::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes these constants as C floats.
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Resample::Bicubic => {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// The fields of `preprocessor_config.json` that `MllamaImageProcessor` uses.
///
/// Fields missing from the file take transformers' class defaults (which are *not* the Llama 3.2 Vision values:
/// size 224, mean and std 0.5); [`Default`] gives the Llama 3.2 Vision values.
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessorConfig {
    /// Convert to RGB, compositing transparency onto white (`do_convert_rgb`).
    pub do_convert_rgb: bool,
    /// Normalize with `image_mean` / `image_std` (`do_normalize`).
    pub do_normalize: bool,
    /// Pad to the tile canvas (`do_pad`); transformers only supports `true`.
    pub do_pad: bool,
    /// Multiply by `rescale_factor` (`do_rescale`).
    pub do_rescale: bool,
    /// Resize onto the tile canvas (`do_resize`); transformers only supports `true`.
    pub do_resize: bool,
    /// Per-channel mean (`image_mean`; a single number applies to all channels).
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation (`image_std`).
    pub image_std: [f32; 3],
    /// Maximum number of tiles per image (`max_image_tiles`).
    pub max_image_tiles: usize,
    /// Resampling filter (`resample`, Pillow's integer code).
    pub resample: Resample,
    /// Rescale factor (`rescale_factor`), normally 1/255.
    pub rescale_factor: f64,
    /// Tile side in pixels: `size.height`, which must equal `size.width`.
    pub tile_size: usize,
}

impl Default for PreprocessorConfig {
    /// The Llama 3.2 Vision (11B and 90B) preprocessor: 560x560 tiles, at most 4, CLIP mean/std, bilinear.
    fn default() -> Self {
        PreprocessorConfig {
            do_convert_rgb: true,
            do_normalize: true,
            do_pad: true,
            do_rescale: true,
            do_resize: true,
            image_mean: CLIP_MEAN.map(|v| v as f32),
            image_std: CLIP_STD.map(|v| v as f32),
            max_image_tiles: 4,
            resample: Resample::Bilinear,
            rescale_factor: 1.0 / 255.0,
            tile_size: LLAMA32_TILE_SIZE,
        }
    }
}

impl PreprocessorConfig {
    /// Reads `<model_dir>/preprocessor_config.json`.
    pub fn from_model_dir(model_dir: &Path) -> Result<Self> {
        Self::from_file(&model_dir.join("preprocessor_config.json"))
    }

    /// Reads and validates a `preprocessor_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates `preprocessor_config.json` text; `path` names the file in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::config(path, "<json>", e.to_string()))?;
        let obj = v.as_object().ok_or_else(|| Error::config(path, "<json>", "expected a JSON object"))?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let err = |field: &str, msg: String| Error::config(path, field, msg);
        let boolean = |k: &str, default: bool| -> Result<bool> {
            match get(k) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| err(k, format!("expected true or false, got {v}"))),
            }
        };
        let triple = |k: &str| -> Result<[f32; 3]> {
            let Some(v) = get(k) else { return Ok([0.5; 3]) }; // IMAGENET_STANDARD_MEAN / _STD
            if let Some(x) = v.as_f64() {
                return Ok([x as f32; 3]);
            }
            let arr =
                v.as_array().ok_or_else(|| err(k, format!("expected a number or a list of 3 numbers, got {v}")))?;
            if arr.len() != 3 {
                return Err(err(k, format!("expected 3 values (one per RGB channel), got {}", arr.len())));
            }
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(arr) {
                *o = x.as_f64().ok_or_else(|| err(k, format!("expected numbers, got {x}")))? as f32;
            }
            Ok(out)
        };
        let max_image_tiles = match get("max_image_tiles") {
            None => 4,
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| err("max_image_tiles", format!("expected a positive integer, got {v}")))?,
        };
        let resample = match get("resample") {
            None => Resample::Bilinear,
            Some(v) => {
                let code = v.as_i64().ok_or_else(|| err("resample", format!("expected an integer, got {v}")))?;
                Resample::from_pil_code(code).ok_or_else(|| {
                    err(
                        "resample",
                        format!(
                            "unsupported filter {code} (supported: 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)"
                        ),
                    )
                })?
            }
        };
        let rescale_factor = match get("rescale_factor") {
            None => 1.0 / 255.0,
            Some(v) => v.as_f64().ok_or_else(|| err("rescale_factor", format!("expected a number, got {v}")))?,
        };
        let tile_size = match get("size") {
            None => 224,
            Some(v) => {
                let dim = |k: &str| -> Result<u64> {
                    let field = format!("size.{k}");
                    let d =
                        v.get(k).ok_or_else(|| err(&field, "missing (size must have `height` and `width`)".into()))?;
                    d.as_u64()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| err(&field, format!("expected a positive integer, got {d}")))
                };
                let (h, w) = (dim("height")?, dim("width")?);
                if h != w {
                    return Err(err("size", format!("height ({h}) and width ({w}) must be equal")));
                }
                usize::try_from(h).map_err(|_| err("size.height", format!("{h} is too large")))?
            }
        };
        let cfg = PreprocessorConfig {
            do_convert_rgb: boolean("do_convert_rgb", true)?,
            do_normalize: boolean("do_normalize", true)?,
            do_pad: boolean("do_pad", true)?,
            do_rescale: boolean("do_rescale", true)?,
            do_resize: boolean("do_resize", true)?,
            image_mean: triple("image_mean")?,
            image_std: triple("image_std")?,
            max_image_tiles,
            resample,
            rescale_factor,
            tile_size,
        };
        cfg.check().map_err(|(field, msg)| Error::config(path, field, msg))?;
        Ok(cfg)
    }

    /// Checks the values (also for a config built in code); errors name the field.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|(field, msg)| Error::config(PathBuf::from("<preprocessor config>"), field, msg))
    }

    fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if !self.do_pad {
            return Err(("do_pad", "MllamaImageProcessor only supports do_pad = true".into()));
        }
        if !self.do_resize {
            return Err(("do_resize", "MllamaImageProcessor only supports do_resize = true".into()));
        }
        if self.max_image_tiles == 0 || self.max_image_tiles > 64 {
            return Err(("max_image_tiles", format!("{} is out of range 1..=64", self.max_image_tiles)));
        }
        if self.tile_size == 0 || self.tile_size > 4096 {
            return Err(("size", format!("tile size {} is out of range 1..=4096", self.tile_size)));
        }
        if self.max_image_tiles * self.tile_size * self.tile_size > MAX_TILE_PIXELS {
            return Err((
                "max_image_tiles",
                format!(
                    "{} tiles of {}x{} pixels exceed the limit of {MAX_TILE_PIXELS} pixels per image",
                    self.max_image_tiles, self.tile_size, self.tile_size
                ),
            ));
        }
        if self.image_std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(("image_std", format!("{:?} must be finite and non-zero", self.image_std)));
        }
        if self.image_mean.iter().any(|m| !m.is_finite()) {
            return Err(("image_mean", format!("{:?} must be finite", self.image_mean)));
        }
        if !self.rescale_factor.is_finite() {
            return Err(("rescale_factor", format!("{} must be finite", self.rescale_factor)));
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Geometry

/// The tile grids `(rows, cols)` with `rows * cols <= max_tiles`, in transformers' order (rows outer, cols inner):
/// for 4, `(1,1) (1,2) (1,3) (1,4) (2,1) (2,2) (3,1) (4,1)`. `aspect_ratio_id` is 1 + the index in this list.
///
/// (transformers' docstring calls the pairs (width, height), but uses the first element for the canvas height.)
pub fn supported_aspect_ratios(max_tiles: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for rows in 1..=max_tiles {
        for cols in 1..=max_tiles {
            if rows * cols <= max_tiles {
                out.push((rows, cols));
            }
        }
    }
    out
}

/// The canvas `(height, width)` transformers' `get_optimal_tiled_canvas` picks for an `image_h x image_w` image:
/// for each grid the scale `min(canvas_h / image_h, canvas_w / image_w)`; the smallest scale >= 1 if any (the least
/// upscaling), else the largest (the least downscaling); ties go to the smallest area, then to the first grid.
/// Image sides must be positive and `max_tiles >= 1`; (0, 0) is returned otherwise.
pub fn optimal_canvas(image_h: usize, image_w: usize, max_tiles: usize, tile: usize) -> (usize, usize) {
    if image_h == 0 || image_w == 0 {
        return (0, 0);
    }
    let cands: Vec<(usize, usize, f64)> = supported_aspect_ratios(max_tiles)
        .into_iter()
        .map(|(r, c)| {
            let (ch, cw) = (r * tile, c * tile);
            let (sh, sw) = (ch as f64 / image_h as f64, cw as f64 / image_w as f64);
            (ch, cw, if sw > sh { sh } else { sw })
        })
        .collect();
    let up =
        cands.iter().map(|c| c.2).filter(|&s| s >= 1.0).fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.min(s))));
    let selected = match up {
        Some(s) => s,
        None => match cands.iter().map(|c| c.2).filter(|&s| s < 1.0).reduce(f64::max) {
            Some(s) => s,
            None => return (0, 0),
        },
    };
    let mut best: Option<(usize, usize)> = None;
    for &(ch, cw, s) in &cands {
        if s == selected && best.is_none_or(|(bh, bw)| ch * cw < bh * bw) {
            best = Some((ch, cw));
        }
    }
    best.unwrap_or((0, 0))
}

/// The resized `(height, width)` of an `image_h x image_w` image on a `canvas_h x canvas_w` canvas, as transformers'
/// `get_image_size_fit_to_canvas`: each target side is the image side clamped to `[tile, canvas side]`, then the
/// side with the smaller scale is kept and the other scaled by it (floored, at least 1, at most its target).
pub fn fit_to_canvas(image_h: usize, image_w: usize, canvas_h: usize, canvas_w: usize, tile: usize) -> (usize, usize) {
    if image_h == 0 || image_w == 0 {
        return (0, 0);
    }
    let target_w = image_w.max(tile).min(canvas_w);
    let target_h = image_h.max(tile).min(canvas_h);
    let scale_h = target_h as f64 / image_h as f64;
    let scale_w = target_w as f64 / image_w as f64;
    let scaled = |side: usize, scale: f64| -> usize {
        let v = (side as f64 * scale).floor();
        if v < 1.0 {
            1
        } else {
            v as usize
        }
    };
    if scale_w < scale_h {
        (scaled(image_h, scale_w).min(target_h), target_w)
    } else {
        (target_h, scaled(image_w, scale_h).min(target_w))
    }
}

/// 1 + the index of the `(rows, cols)` grid in [`supported_aspect_ratios`]`(max_tiles)`; None if not in it.
/// (0 marks a padded image slot in a batch.)
pub fn aspect_ratio_id(rows: usize, cols: usize, max_tiles: usize) -> Option<i64> {
    supported_aspect_ratios(max_tiles).iter().position(|&g| g == (rows, cols)).map(|i| i as i64 + 1)
}

/// transformers' aspect-ratio mask of one image: 1 for its `num_tiles` real tiles, 0 for the padding, and tile 0
/// always 1; `max_tiles` entries.
pub fn aspect_ratio_mask(num_tiles: usize, max_tiles: usize) -> Vec<i64> {
    (0..max_tiles).map(|i| i64::from(i == 0 || i < num_tiles)).collect()
}

/// Where an image goes: its canvas, its resized size and its tile grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Input `(height, width)`.
    pub image: (usize, usize),
    /// Canvas `(height, width)`, a multiple of the tile size.
    pub canvas: (usize, usize),
    /// Resized `(height, width)`, at most the canvas.
    pub resized: (usize, usize),
    /// Tile rows (`canvas.0 / tile`).
    pub tiles_h: usize,
    /// Tile columns (`canvas.1 / tile`).
    pub tiles_w: usize,
    /// 1-based aspect ratio id.
    pub aspect_ratio_id: i64,
}

impl Geometry {
    /// The geometry of an `image_h x image_w` image for `max_tiles` tiles of `tile` pixels.
    pub fn compute(image_h: usize, image_w: usize, max_tiles: usize, tile: usize) -> Result<Self> {
        if image_h == 0 || image_w == 0 {
            return Err(Error::request(format!("image has an empty size {image_w}x{image_h}")));
        }
        if max_tiles == 0 || tile == 0 {
            return Err(Error::request(format!("invalid tiling: {max_tiles} tiles of {tile} pixels")));
        }
        let canvas = optimal_canvas(image_h, image_w, max_tiles, tile);
        let resized = fit_to_canvas(image_h, image_w, canvas.0, canvas.1, tile);
        let (tiles_h, tiles_w) = (canvas.0 / tile, canvas.1 / tile);
        let aspect_ratio_id = aspect_ratio_id(tiles_h, tiles_w, max_tiles)
            .ok_or_else(|| Error::request(format!("no aspect ratio id for a {tiles_h}x{tiles_w} tile grid")))?;
        Ok(Geometry { image: (image_h, image_w), canvas, resized, tiles_h, tiles_w, aspect_ratio_id })
    }

    /// Number of tiles (`tiles_h * tiles_w`).
    pub fn num_tiles(&self) -> usize {
        self.tiles_h * self.tiles_w
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Decoding

/// Limits and options for [`decode_rgb`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Largest accepted `width * height` (checked from the header, before decoding).
    pub max_pixels: u64,
    /// Rotate/flip by the EXIF orientation tag (as transformers' `load_image` does via `exif_transpose`). Off by
    /// default: `MllamaImageProcessor` given a PIL image from `Image.open` (the model card usage) does not.
    pub apply_exif_orientation: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions { max_pixels: DEFAULT_MAX_PIXELS, apply_exif_orientation: false }
    }
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps `data` (`height * width * 3` bytes, RGB row-major).
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if width.checked_mul(height).and_then(|n| n.checked_mul(3)) != Some(data.len()) {
            return Err(Error::request(format!(
                "RGB image of {width}x{height} needs {} bytes, got {}",
                width.saturating_mul(height).saturating_mul(3),
                data.len()
            )));
        }
        Ok(RgbImage { width, height, data })
    }

    /// The pixel at `(x, y)`, None outside the image.
    pub fn get(&self, x: usize, y: usize) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y * self.width + x) * 3;
        self.data.get(i..i + 3).map(|p| [p[0], p[1], p[2]])
    }
}

/// The container formats [`decode_rgb`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// JPEG (baseline or progressive).
    Jpeg,
    /// PNG.
    Png,
    /// WebP (lossy or lossless).
    WebP,
}

impl ImageFormat {
    /// Detects the format from the first bytes (magic numbers).
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageFormat::Png)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageFormat::Jpeg)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(ImageFormat::WebP)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Png => "PNG",
            ImageFormat::WebP => "WebP",
        }
    }
}

/// Decodes JPEG, PNG or WebP bytes into 8-bit RGB as Pillow + transformers' `convert_to_rgb` would (see the module
/// docs). Errors (all [`Error::Request`]) say what is wrong: empty data, unknown format, a size over
/// `opts.max_pixels` (checked before decoding), corrupt or truncated data.
pub fn decode_rgb(bytes: &[u8], opts: &DecodeOptions) -> Result<RgbImage> {
    let img = decode_dynamic(bytes, opts)?;
    to_rgb(img, true)
}

fn decode_dynamic(bytes: &[u8], opts: &DecodeOptions) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(Error::request("image data is empty"));
    }
    let format = ImageFormat::sniff(bytes).ok_or_else(|| {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Error::request(format!(
            "image data is not a JPEG, PNG or WebP file (unrecognized header {}, {} bytes)",
            head.join(" "),
            bytes.len()
        ))
    })?;
    let name = format.name();
    let corrupt = |e: image::ImageError| Error::request(format!("cannot decode {name} image: {e}"));
    if format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes)?;
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(opts.max_pixels.saturating_mul(16).saturating_add(64 << 20));
    let cursor = Cursor::new(bytes);
    match format {
        ImageFormat::Png => {
            finish_decode(PngDecoder::with_limits(cursor, limits.clone()).map_err(corrupt)?, name, opts, limits)
        }
        ImageFormat::Jpeg => {
            let j = super::jpeg::decode_jpeg(bytes, opts.max_pixels)?;
            let (w, h) = (j.width as u32, j.height as u32);
            let wrong_size = || Error::request("JPEG decoder returned a buffer of the wrong size");
            let mut img = if j.components == 1 {
                DynamicImage::ImageLuma8(image::ImageBuffer::from_raw(w, h, j.data).ok_or_else(wrong_size)?)
            } else {
                DynamicImage::ImageRgb8(image::ImageBuffer::from_raw(w, h, j.data).ok_or_else(wrong_size)?)
            };
            if opts.apply_exif_orientation {
                let mut dec = JpegDecoder::new(cursor).map_err(corrupt)?;
                img.apply_orientation(dec.orientation().map_err(corrupt)?);
            }
            Ok(img)
        }
        ImageFormat::WebP => finish_decode(WebPDecoder::new(cursor).map_err(corrupt)?, name, opts, limits),
    }
}

fn finish_decode(mut dec: impl ImageDecoder, name: &str, opts: &DecodeOptions, limits: Limits) -> Result<DynamicImage> {
    let corrupt = |e: image::ImageError| Error::request(format!("cannot decode {name} image: {e}"));
    let (w, h) = dec.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::request(format!("{name} image has an empty size {w}x{h}")));
    }
    let pixels = u64::from(w) * u64::from(h);
    if pixels > opts.max_pixels {
        return Err(Error::request(format!(
            "{name} image is too large: {w}x{h} = {pixels} pixels, over the limit of {} pixels",
            opts.max_pixels
        )));
    }
    dec.set_limits(limits).map_err(corrupt)?;
    let orientation = if opts.apply_exif_orientation { Some(dec.orientation().map_err(corrupt)?) } else { None };
    let mut img = DynamicImage::from_decoder(dec).map_err(corrupt)?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(img)
}

/// A JPEG whose data ends before the end-of-image marker that follows the last scan is truncated (Pillow refuses
/// it; the JPEG decoder would fill the rest in grey).
fn check_jpeg_complete(bytes: &[u8]) -> Result<()> {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let complete = match last_sos {
        Some(p) => bytes[p..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    };
    if complete {
        Ok(())
    } else {
        Err(Error::request(format!(
            "cannot decode JPEG image: the data is truncated (no end-of-image marker after the last scan, {} bytes)",
            bytes.len()
        )))
    }
}

/// Pillow's `alpha_composite` of `(c, a)` over opaque white, then dropping alpha.
#[inline]
fn over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    const PRECISION_BITS: u32 = 7;
    let (c, a) = (u32::from(c), u32::from(a));
    let blend = 255 * (255 - a); // destination alpha 255
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    ((((tmp >> 8) + tmp) >> 8) >> PRECISION_BITS) as u8
}

/// Converts a decoded image to RGB like Pillow's modes + `convert_to_rgb`. With `convert == false` only images that
/// are RGB already are accepted (transformers would fail later on other channel counts).
fn to_rgb(img: DynamicImage, convert: bool) -> Result<RgbImage> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let rgb_already = matches!(img, DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgb16(_));
    if !convert && !rgb_already {
        return Err(Error::request(format!(
            "image has colour type {:?} and do_convert_rgb is false (only RGB images can be used without conversion)",
            img.color()
        )));
    }
    let mut out = Vec::with_capacity(w * h * 3);
    match img {
        DynamicImage::ImageRgb8(b) => out = b.into_raw(),
        DynamicImage::ImageLuma8(b) => out.extend(b.as_raw().iter().flat_map(|&l| [l; 3])),
        DynamicImage::ImageLumaA8(b) => {
            out.extend(b.as_raw().chunks_exact(2).flat_map(|p| [over_white(p[0], p[1]); 3]));
        }
        DynamicImage::ImageRgba8(b) => out.extend(
            b.as_raw()
                .chunks_exact(4)
                .flat_map(|p| [over_white(p[0], p[3]), over_white(p[1], p[3]), over_white(p[2], p[3])]),
        ),
        // Pillow: 16-bit gray is mode I;16, and I;16 -> RGB clamps at 255.
        DynamicImage::ImageLuma16(b) => out.extend(b.as_raw().iter().flat_map(|&l| [l.min(255) as u8; 3])),
        // Pillow reads 16-bit RGB/RGBA/LA PNGs into 8-bit modes keeping the high byte.
        DynamicImage::ImageRgb16(b) => out.extend(b.as_raw().iter().map(|&v| (v >> 8) as u8)),
        DynamicImage::ImageLumaA16(b) => {
            out.extend(b.as_raw().chunks_exact(2).flat_map(|p| [over_white((p[0] >> 8) as u8, (p[1] >> 8) as u8); 3]))
        }
        DynamicImage::ImageRgba16(b) => out.extend(b.as_raw().chunks_exact(4).flat_map(|p| {
            let a = (p[3] >> 8) as u8;
            [over_white((p[0] >> 8) as u8, a), over_white((p[1] >> 8) as u8, a), over_white((p[2] >> 8) as u8, a)]
        })),
        other => return Err(Error::request(format!("unsupported pixel format {:?}", other.color()))),
    }
    RgbImage::new(w, h, out)
}

// ------------------------------------------------------------------------------------------------------------------
// Resampling (Pillow's ImagingResample, 8 bits per channel)

/// Fixed-point precision of the coefficients (Pillow: 32 - 8 - 2).
const PRECISION_BITS: u32 = 22;

/// Per output pixel: the first input index, the number of taps and `ksize` fixed-point coefficients.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the full input range `[0, in_size)`.
fn precompute_coeffs(in_size: usize, out_size: usize, filter: Resample) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            *wx = filter.weight(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        for x in 0..n {
            let v = if ww != 0.0 { w[x] / ww } else { w[x] };
            let f = v * f64::from(1u32 << PRECISION_BITS);
            k[xx * ksize + x] = if v < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
        }
        bounds.push((xmin as usize, n));
    }
    Coeffs { ksize, bounds, k }
}

#[inline]
fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image to `width x height` exactly as Pillow's `Image.resize(size, resample=filter)` does for an
/// `RGB` image: 8-bit fixed-point coefficients, two separable passes, each rounded and clamped to uint8. As in
/// Pillow 13 (the version the golden data was made with), the vertical pass runs first when the height shrinks by
/// more than twice as many pixels as the width (older Pillow always ran the horizontal pass first, which can change
/// some pixels by one level).
pub fn resize_rgb(img: &RgbImage, width: usize, height: usize, filter: Resample) -> Result<RgbImage> {
    if width == 0 || height == 0 || img.width == 0 || img.height == 0 {
        return Err(Error::request(format!("cannot resize a {}x{} image to {width}x{height}", img.width, img.height)));
    }
    if img.data.len() != img.width * img.height * 3 {
        return Err(Error::request("RGB image buffer does not match its size"));
    }
    let (in_w, in_h) = (img.width, img.height);
    let (need_h, need_v) = (width != in_w, height != in_h);
    if !need_h && !need_v {
        return Ok(img.clone());
    }
    let shrink_h = in_h as i64 - height as i64;
    let horizontal_first = !(shrink_h > 0 && shrink_h > (in_w as i64 - width as i64) * 2);
    let horiz = precompute_coeffs(in_w, width, filter);
    let vert = precompute_coeffs(in_h, height, filter);
    let out = if horizontal_first {
        // The horizontal pass only computes the rows the vertical pass reads.
        let (first, last) = if need_v {
            let (l, n) = vert.bounds[height - 1];
            (vert.bounds[0].0, l + n)
        } else {
            (0, in_h)
        };
        let rows = &img.data[first * in_w * 3..last * in_w * 3];
        let tmp;
        let (src, w) = if need_h {
            tmp = horizontal_pass(rows, in_w, &horiz);
            (&tmp[..], width)
        } else {
            (rows, in_w)
        };
        if need_v {
            vertical_pass(src, w, &vert, first)
        } else {
            src.to_vec()
        }
    } else {
        let tmp = vertical_pass(&img.data, in_w, &vert, 0);
        if need_h {
            horizontal_pass(&tmp, in_w, &horiz)
        } else {
            tmp
        }
    };
    RgbImage::new(width, height, out)
}

/// Pillow's `ImagingResampleHorizontal_8bpc` on RGB rows of `in_w` pixels.
fn horizontal_pass(src: &[u8], in_w: usize, c: &Coeffs) -> Vec<u8> {
    let out_w = c.bounds.len();
    let rows = src.len() / (in_w * 3);
    let init: i64 = 1 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; rows * out_w * 3];
    out.par_chunks_mut(out_w * 3).enumerate().for_each(|(r, orow)| {
        let row = &src[r * in_w * 3..(r + 1) * in_w * 3];
        for (xx, o) in orow.chunks_exact_mut(3).enumerate() {
            let (xmin, n) = c.bounds[xx];
            let k = &c.k[xx * c.ksize..xx * c.ksize + n];
            let (mut s0, mut s1, mut s2) = (init, init, init);
            for (x, &kx) in k.iter().enumerate() {
                let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                let kx = i64::from(kx);
                s0 += i64::from(p[0]) * kx;
                s1 += i64::from(p[1]) * kx;
                s2 += i64::from(p[2]) * kx;
            }
            o.copy_from_slice(&[clip8(s0), clip8(s1), clip8(s2)]);
        }
    });
    out
}

/// Pillow's `ImagingResampleVertical_8bpc` on RGB rows of `w` pixels; `src` starts at input row `first_row`.
fn vertical_pass(src: &[u8], w: usize, c: &Coeffs, first_row: usize) -> Vec<u8> {
    let stride = w * 3;
    let init: i64 = 1 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; c.bounds.len() * stride];
    out.par_chunks_mut(stride).enumerate().for_each(|(yy, orow)| {
        let (ymin, n) = c.bounds[yy];
        let ymin = ymin - first_row;
        let k = &c.k[yy * c.ksize..yy * c.ksize + n];
        for (i, o) in orow.iter_mut().enumerate() {
            let mut s = init;
            for (y, &ky) in k.iter().enumerate() {
                s += i64::from(src[(ymin + y) * stride + i]) * i64::from(ky);
            }
            *o = clip8(s);
        }
    });
    out
}

// ------------------------------------------------------------------------------------------------------------------
// The processor

/// One preprocessed image, as transformers' `pixel_values[b, i]`, `aspect_ratio_ids[b, i]`,
/// `aspect_ratio_mask[b, i]` and `num_tiles[b][i]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessedImage {
    /// `[max_tiles, 3, tile, tile]` f32, row-major tiles first; tiles past `num_tiles` are zero.
    pub pixel_values: Vec<f32>,
    /// Real tiles (`tiles_h * tiles_w`).
    pub num_tiles: usize,
    /// 1-based aspect ratio id (see [`supported_aspect_ratios`]).
    pub aspect_ratio_id: i64,
    /// `max_tiles` entries: 1 for real tiles (and tile 0), 0 for padding.
    pub aspect_ratio_mask: Vec<i64>,
    /// Canvas, resized size and tile grid.
    pub geometry: Geometry,
    /// Tile side in pixels.
    pub tile_size: usize,
    /// The padded tile count (`max_image_tiles`).
    pub max_tiles: usize,
}

impl ProcessedImage {
    /// Shape of [`Self::pixel_values`]: `[max_tiles, 3, tile, tile]`.
    pub fn shape(&self) -> [usize; 4] {
        [self.max_tiles, 3, self.tile_size, self.tile_size]
    }

    /// The real tiles only: `[num_tiles, 3, tile, tile]`.
    pub fn tiles(&self) -> &[f32] {
        &self.pixel_values[..self.num_tiles * 3 * self.tile_size * self.tile_size]
    }
}

/// The images of one prompt, stacked like transformers' per-sample outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchedImages {
    /// `[num_images, max_tiles, 3, tile, tile]` f32.
    pub pixel_values: Vec<f32>,
    /// `[num_images]` aspect ratio ids.
    pub aspect_ratio_ids: Vec<i64>,
    /// `[num_images, max_tiles]`.
    pub aspect_ratio_mask: Vec<i64>,
    /// Real tiles per image.
    pub num_tiles: Vec<usize>,
    /// Tile side in pixels.
    pub tile_size: usize,
    /// The padded tile count (`max_image_tiles`).
    pub max_tiles: usize,
}

impl BatchedImages {
    /// Shape of [`Self::pixel_values`]: `[num_images, max_tiles, 3, tile, tile]`.
    pub fn shape(&self) -> [usize; 5] {
        [self.num_tiles.len(), self.max_tiles, 3, self.tile_size, self.tile_size]
    }
}

/// Preprocesses images for Llama 3.2 Vision with a [`PreprocessorConfig`] and [`DecodeOptions`].
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    config: PreprocessorConfig,
    decode: DecodeOptions,
}

impl ImageProcessor {
    /// A processor for `config` (validated) with default [`DecodeOptions`].
    pub fn new(config: PreprocessorConfig) -> Result<Self> {
        config.validate()?;
        Ok(ImageProcessor { config, decode: DecodeOptions::default() })
    }

    /// Replaces the decoding options.
    pub fn with_decode_options(mut self, decode: DecodeOptions) -> Self {
        self.decode = decode;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &PreprocessorConfig {
        &self.config
    }

    /// The decoding options.
    pub fn decode_options(&self) -> &DecodeOptions {
        &self.decode
    }

    /// The geometry an `image_h x image_w` image gets with this configuration.
    pub fn geometry(&self, image_h: usize, image_w: usize) -> Result<Geometry> {
        Geometry::compute(image_h, image_w, self.config.max_image_tiles, self.config.tile_size)
    }

    /// Decodes and preprocesses one encoded image (JPEG, PNG or WebP).
    pub fn preprocess_bytes(&self, bytes: &[u8]) -> Result<ProcessedImage> {
        let img = to_rgb(decode_dynamic(bytes, &self.decode)?, self.config.do_convert_rgb)?;
        self.preprocess_rgb(&img)
    }

    /// Preprocesses an already decoded RGB image.
    pub fn preprocess_rgb(&self, img: &RgbImage) -> Result<ProcessedImage> {
        let c = &self.config;
        if img.data.len() != img.width.saturating_mul(img.height).saturating_mul(3) {
            return Err(Error::request("RGB image buffer does not match its size"));
        }
        let g = self.geometry(img.height, img.width)?;
        let (rh, rw) = g.resized;
        let resized;
        let src = if (rh, rw) == (img.height, img.width) {
            img
        } else {
            resized = resize_rgb(img, rw, rh, c.resample)?;
            &resized
        };
        // Output value of each uint8 level per channel: pad (0) -> rescale (f64, then f32) -> normalize (f32).
        let mut lut = [[0f32; 256]; 3];
        for (ch, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                let mut x = if c.do_rescale { (v as f64 * c.rescale_factor) as f32 } else { v as f32 };
                if c.do_normalize {
                    x = (x - c.image_mean[ch]) / c.image_std[ch];
                }
                *out = x;
            }
        }
        let t = c.tile_size;
        let plane = t * t;
        let n = g.num_tiles();
        let mut pv = vec![0f32; c.max_image_tiles * 3 * plane];
        pv[..n * 3 * plane].par_chunks_mut(3 * plane).enumerate().for_each(|(tile, out)| {
            let (ty, tx) = (tile / g.tiles_w, tile % g.tiles_w);
            for ch in 0..3 {
                let pad = lut[ch][0];
                for y in 0..t {
                    let row = &mut out[ch * plane + y * t..ch * plane + (y + 1) * t];
                    let sy = ty * t + y;
                    for (x, o) in row.iter_mut().enumerate() {
                        let sx = tx * t + x;
                        *o = if sy < src.height && sx < src.width {
                            lut[ch][src.data[(sy * src.width + sx) * 3 + ch] as usize]
                        } else {
                            pad
                        };
                    }
                }
            }
        });
        Ok(ProcessedImage {
            pixel_values: pv,
            num_tiles: n,
            aspect_ratio_id: g.aspect_ratio_id,
            aspect_ratio_mask: aspect_ratio_mask(n, c.max_image_tiles),
            geometry: g,
            tile_size: t,
            max_tiles: c.max_image_tiles,
        })
    }

    /// Decodes and preprocesses the images of one prompt and stacks them (transformers' sample of a batch).
    /// Errors name the image by its index.
    pub fn preprocess_batch<B: AsRef<[u8]>>(&self, images: &[B]) -> Result<BatchedImages> {
        let processed = images
            .iter()
            .enumerate()
            .map(|(i, b)| self.preprocess_bytes(b.as_ref()).map_err(|e| at_index(i, e)))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.stack(processed))
    }

    /// Stacks already preprocessed images of one prompt.
    pub fn stack(&self, images: Vec<ProcessedImage>) -> BatchedImages {
        let (t, max_tiles) = (self.config.tile_size, self.config.max_image_tiles);
        let mut out = BatchedImages {
            pixel_values: Vec::with_capacity(images.len() * max_tiles * 3 * t * t),
            aspect_ratio_ids: Vec::with_capacity(images.len()),
            aspect_ratio_mask: Vec::with_capacity(images.len() * max_tiles),
            num_tiles: Vec::with_capacity(images.len()),
            tile_size: t,
            max_tiles,
        };
        for p in images {
            out.pixel_values.extend_from_slice(&p.pixel_values);
            out.aspect_ratio_ids.push(p.aspect_ratio_id);
            out.aspect_ratio_mask.extend_from_slice(&p.aspect_ratio_mask);
            out.num_tiles.push(p.num_tiles);
        }
        out
    }
}

fn at_index(i: usize, e: Error) -> Error {
    match e {
        Error::Request(m) => Error::Request(format!("image {i}: {m}")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aspect_ratios_follow_transformers_order() {
        let four = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)];
        assert_eq!(supported_aspect_ratios(4), four);
        assert_eq!(aspect_ratio_id(2, 2, 4), Some(6));
        assert_eq!(aspect_ratio_id(2, 3, 4), None);
        assert_eq!(aspect_ratio_mask(1, 4), [1, 0, 0, 0]);
        assert_eq!(aspect_ratio_mask(3, 4), [1, 1, 1, 0]);
    }

    #[test]
    fn composite_matches_pillow_corners() {
        assert_eq!(over_white(0, 0), 255);
        assert_eq!(over_white(0, 255), 0);
        assert_eq!(over_white(17, 255), 17);
        assert_eq!(over_white(0, 128), 127);
    }

    #[test]
    fn geometry_notes_examples() {
        // (h, w) -> canvas, resized, id (docs/mllama_preprocessing_notes.md).
        for (img, canvas, resized, id) in [
            ((480, 640), (560, 1120), (480, 640), 2),
            ((768, 1024), (1120, 1120), (768, 1024), 6),
            ((1080, 1920), (1120, 1120), (630, 1120), 6),
            ((200, 1320), (560, 1680), (200, 1320), 3),
            ((3000, 4000), (1120, 1120), (840, 1120), 6),
            ((100, 100), (560, 560), (560, 560), 1),
            ((561, 560), (1120, 560), (561, 560), 5),
        ] {
            let g = Geometry::compute(img.0, img.1, 4, 560).unwrap();
            assert_eq!((g.canvas, g.resized, g.aspect_ratio_id), (canvas, resized, id), "{img:?}");
        }
    }
}
