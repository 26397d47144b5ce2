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

mod decode;
mod resample;

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;

use self::decode::{decode_dynamic, to_rgb};
pub use self::decode::{decode_rgb, DecodeOptions, ImageFormat, RgbImage};
pub use self::resample::{resize_rgb, Resample};
use crate::{Error, Result};

/// Default limit on the number of pixels of a decoded image (64 Mpixel, 2^26).
pub const DEFAULT_MAX_PIXELS: u64 = 1 << 26;

/// Upper bound on `max_image_tiles * tile_size^2` (the padded output of one image), 2^26 pixels.
pub const MAX_TILE_PIXELS: usize = 1 << 26;

/// `size.height` (= `size.width`) of the Llama 3.2 Vision preprocessor: the tile side in pixels.
pub const LLAMA32_TILE_SIZE: usize = 560;

/// The largest tile side the preprocessor (and so `vision_config.image_size`) accepts.
pub const MAX_TILE_SIZE: usize = 4096;

/// The CLIP mean used by Llama 3.2 Vision, as written in `preprocessor_config.json` (used as f32, like numpy).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];

/// The CLIP standard deviation used by Llama 3.2 Vision, as written in `preprocessor_config.json`.
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

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
        if self.tile_size == 0 || self.tile_size > MAX_TILE_SIZE {
            return Err(("size", format!("tile size {} is out of range 1..={MAX_TILE_SIZE}", self.tile_size)));
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
    use super::decode::over_white;
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
