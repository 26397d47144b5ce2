//! A baseline/progressive JPEG decoder that reproduces libjpeg-turbo's default decompression (as used by Pillow)
//! bit-exactly, written from ITU T.81 and the documented libjpeg algorithms.
//!
//! What it reproduces (libjpeg-turbo defaults, which Pillow does not change):
//! * entropy decoding: SOF0/SOF1 sequential and SOF2 progressive Huffman coding (DC first/refine, AC first/refine
//!   with EOB runs), restart intervals (DRI/RSTn), 8-bit samples, 1 or 3 components; a marker met inside entropy
//!   data ends it and the rest of the scan reads zero bits, as in libjpeg;
//! * dequantization with the quantization table in effect when a component first appears in a scan;
//! * the `JDCT_ISLOW` integer IDCT (13-bit constants, 2 extra bits after the column pass, rounding right shifts,
//!   output clamped to 0..255);
//! * chroma upsampling: the "fancy" triangle filters for components subsampled by exactly 2 horizontally (h2v1,
//!   when the subsampled width is over 2), both ways (h2v2, same condition) or vertically (h1v2), with the edge
//!   rows/columns replicated; otherwise pixel replication (every other integer ratio);
//! * YCbCr to RGB with 16-bit fixed-point tables (`ONE_HALF` rounding, arithmetic right shifts, clamping); the
//!   colour space is chosen like libjpeg: JFIF marker means YCbCr, else an Adobe APP14 transform flag (0 = RGB,
//!   otherwise YCbCr), else component ids `R`,`G`,`B` mean RGB, else YCbCr.
//!
//! Refused with an error: arithmetic coding, lossless and hierarchical JPEG, 12/16-bit samples, 2- and 4-component
//! (CMYK/YCCK) images, fractional sampling ratios, images over `max_pixels`, frames whose height is given by a
//! DNL marker, and any file that ends before its end-of-image marker. Corrupt data gives an error, never a panic.
//!
//! Not reproduced: libjpeg's block smoothing of progressive JPEGs whose scans leave some of the first AC
//! coefficients unrefined (a file that stops refining early); such files decode without smoothing.
//!
//! The stages live in submodules: `markers` (marker segments: frame, tables, scan headers), `entropy` (Huffman
//! decoding of the sequential and progressive scans into coefficients) and `pixels` (IDCT, upsampling and colour
//! conversion).

mod entropy;
mod markers;
mod pixels;

use entropy::Huffman;

use crate::{Error, Result};

/// A decoded JPEG: 8-bit gray or RGB pixels, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JpegImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// 1 (gray) or 3 (RGB).
    pub components: usize,
    /// `height * width * components` bytes, interleaved.
    pub data: Vec<u8>,
}

/// Zigzag position -> natural (row-major) index.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54,
    47, 55, 62, 63,
];

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::request(format!("cannot decode JPEG image: {msg}"))
}

fn truncated() -> Error {
    corrupt("the data is truncated (it ends before the end-of-image marker)")
}

/// Decodes a JPEG file (`bytes`) to gray or RGB pixels exactly as libjpeg-turbo does with its default settings
/// (what Pillow's `Image.open(...).load()` returns). Images with more than `max_pixels` pixels are refused before
/// any large allocation.
pub fn decode_jpeg(bytes: &[u8], max_pixels: u64) -> Result<JpegImage> {
    let mut dec = Decoder::default();
    dec.run(bytes, max_pixels)?;
    dec.output()
}

#[derive(Clone, Default)]
struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Allocated blocks per row / column (whole MCUs).
    bw: usize,
    bh: usize,
    /// Subsampled size in samples.
    ds_w: usize,
    ds_h: usize,
    coefs: Vec<i16>,
    /// Quantization table (natural order), latched at the component's first scan.
    qt: Option<[u16; 64]>,
}

#[derive(Default)]
struct Decoder {
    width: usize,
    height: usize,
    progressive: bool,
    frame_seen: bool,
    comps: Vec<Component>,
    hmax: usize,
    vmax: usize,
    mcux: usize,
    mcuy: usize,
    qts: [Option<[u16; 64]>; 4],
    dc_tables: [Option<Huffman>; 4],
    ac_tables: [Option<Huffman>; 4],
    restart_interval: usize,
    jfif: bool,
    adobe_transform: Option<u8>,
    eoi: bool,
    scans: usize,
}

struct ScanComp {
    ci: usize,
    td: usize,
    ta: usize,
}

struct Scan {
    comps: Vec<ScanComp>,
    ss: usize,
    se: usize,
    ah: u32,
    al: u32,
}
