//! Decoding JPEG / PNG / WebP bytes to 8-bit RGB the way Pillow's `Image.open` plus transformers' `convert_to_rgb` do.

use std::io::Cursor;

use image::codecs::jpeg::JpegDecoder;
use image::codecs::png::PngDecoder;
use image::codecs::webp::WebPDecoder;
use image::{DynamicImage, ImageDecoder, Limits};

use super::DEFAULT_MAX_PIXELS;
use crate::{Error, Result};

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

pub(super) fn decode_dynamic(bytes: &[u8], opts: &DecodeOptions) -> Result<DynamicImage> {
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
            let j = crate::vision::jpeg::decode_jpeg(bytes, opts.max_pixels)?;
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
pub(super) fn over_white(c: u8, a: u8) -> u8 {
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
pub(super) fn to_rgb(img: DynamicImage, convert: bool) -> Result<RgbImage> {
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
