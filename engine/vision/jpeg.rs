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

use rayon::prelude::*;

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

/// Huffman decoding table: a 9-bit lookup plus the canonical-code limits for longer codes.
#[derive(Clone)]
struct Huffman {
    /// `(length << 8) | value` for codes of at most `LOOKUP_BITS` bits, 0 where a longer code starts.
    lookup: Vec<u16>,
    /// Largest code of each length (-1 when none), index 1..=16.
    maxcode: [i32; 18],
    /// `index of first value of length l - first code of length l`.
    valoff: [i32; 17],
    values: Vec<u8>,
}

const LOOKUP_BITS: u32 = 9;

impl Huffman {
    fn new(counts: &[u8; 16], values: Vec<u8>) -> Result<Self> {
        let mut lookup = vec![0u16; 1 << LOOKUP_BITS];
        let mut maxcode = [-1i32; 18];
        let mut valoff = [0i32; 17];
        let mut code: i32 = 0;
        let mut k: usize = 0;
        for len in 1..=16usize {
            let n = counts[len - 1] as usize;
            valoff[len] = k as i32 - code;
            if n > 0 {
                for _ in 0..n {
                    if code >= (1 << len) {
                        return Err(corrupt("bogus Huffman table definition (code lengths overflow)"));
                    }
                    if len as u32 <= LOOKUP_BITS {
                        let shift = LOOKUP_BITS - len as u32;
                        let base = (code as usize) << shift;
                        for e in &mut lookup[base..base + (1 << shift)] {
                            *e = ((len as u16) << 8) | u16::from(values[k]);
                        }
                    }
                    code += 1;
                    k += 1;
                }
                maxcode[len] = code - 1;
            }
            code <<= 1;
        }
        Ok(Huffman { lookup, maxcode, valoff, values })
    }
}

/// Bit reader over entropy-coded data: removes stuffed zero bytes, stops at markers (then reads zero bits).
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    buf: u64,
    nbits: u32,
    /// A marker (or the end of the data) was reached: further bits are zeros.
    stopped: bool,
    /// The end of the data was reached without a marker.
    eof: bool,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Bits { data, pos, buf: 0, nbits: 0, stopped: false, eof: false }
    }

    #[inline]
    fn fill(&mut self) {
        while self.nbits <= 56 {
            let mut byte = 0u8;
            if !self.stopped {
                match self.data.get(self.pos) {
                    None => {
                        self.stopped = true;
                        self.eof = true;
                    }
                    Some(&0xFF) => {
                        if self.data.get(self.pos + 1) == Some(&0) {
                            byte = 0xFF;
                            self.pos += 2;
                        } else {
                            self.stopped = true;
                        }
                    }
                    Some(&b) => {
                        byte = b;
                        self.pos += 1;
                    }
                }
            }
            self.buf |= u64::from(byte) << (56 - self.nbits);
            self.nbits += 8;
        }
    }

    #[inline]
    fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        if self.nbits < n {
            self.fill();
        }
        let v = (self.buf >> (64 - n)) as u32;
        self.buf <<= n;
        self.nbits -= n;
        v
    }

    #[inline]
    fn bit(&mut self) -> bool {
        self.bits(1) != 0
    }

    #[inline]
    fn huff(&mut self, t: &Huffman) -> Result<u8> {
        if self.nbits < 16 {
            self.fill();
        }
        let e = t.lookup[(self.buf >> (64 - LOOKUP_BITS)) as usize];
        if e != 0 {
            let len = u32::from(e >> 8);
            self.buf <<= len;
            self.nbits -= len;
            return Ok(e as u8);
        }
        let code16 = (self.buf >> 48) as i32;
        for len in (LOOKUP_BITS as usize + 1)..=16 {
            let code = code16 >> (16 - len);
            if code <= t.maxcode[len] {
                self.buf <<= len;
                self.nbits -= len as u32;
                let idx = t.valoff[len] + code;
                return t.values.get(idx as usize).copied().ok_or_else(|| corrupt("bad Huffman code"));
            }
        }
        Err(corrupt("bad Huffman code in the entropy-coded data"))
    }

    /// `s` more bits as a signed coefficient value (T.81 EXTEND).
    #[inline]
    fn extend(&mut self, s: u32) -> i32 {
        if s == 0 {
            return 0;
        }
        let v = self.bits(s) as i32;
        if v < (1 << (s - 1)) {
            v - (1 << s) + 1
        } else {
            v
        }
    }

    /// Restart: drop buffered bits, skip to the next marker and consume it when it is an RSTn.
    fn restart(&mut self) {
        self.buf = 0;
        self.nbits = 0;
        self.stopped = false;
        let mut p = self.pos;
        while p + 1 < self.data.len() {
            if self.data[p] == 0xFF && self.data[p + 1] != 0 && self.data[p + 1] != 0xFF {
                break;
            }
            p += 1;
        }
        if p + 1 < self.data.len() && (0xD0..=0xD7).contains(&self.data[p + 1]) {
            p += 2;
        }
        self.pos = p.min(self.data.len());
    }
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

fn be16(b: &[u8], p: usize) -> Result<usize> {
    match (b.get(p), b.get(p + 1)) {
        (Some(&x), Some(&y)) => Ok((usize::from(x) << 8) | usize::from(y)),
        _ => Err(truncated()),
    }
}

impl Decoder {
    fn run(&mut self, b: &[u8], max_pixels: u64) -> Result<()> {
        if b.len() < 2 || b[0] != 0xFF || b[1] != 0xD8 {
            return Err(corrupt("not a JPEG file (no start-of-image marker)"));
        }
        let mut pos = 2;
        loop {
            // Find the next marker, skipping garbage and fill bytes.
            while pos < b.len() && b[pos] != 0xFF {
                pos += 1;
            }
            while pos < b.len() && b[pos] == 0xFF {
                pos += 1;
            }
            let Some(&code) = b.get(pos) else {
                return Err(truncated());
            };
            pos += 1;
            match code {
                0xD9 => {
                    self.eoi = true;
                    return Ok(());
                }
                0xD0..=0xD7 | 0x01 | 0x00 => continue,
                0xD8 => return Err(corrupt("unexpected second start-of-image marker")),
                _ => {}
            }
            let len = be16(b, pos)?;
            if len < 2 {
                return Err(corrupt(format!("marker 0xFF{code:02X} has an invalid length {len}")));
            }
            let end = pos + len;
            if end > b.len() {
                return Err(truncated());
            }
            let seg = &b[pos + 2..end];
            match code {
                0xC0..=0xC2 => self.parse_sof(code, seg, max_pixels)?,
                0xC3 | 0xC5..=0xC7 | 0xCB | 0xCD..=0xCF => {
                    return Err(corrupt(format!(
                        "unsupported JPEG process (SOF marker 0xFF{code:02X}: lossless or hierarchical)"
                    )))
                }
                0xC9 | 0xCA | 0xCC => {
                    return Err(corrupt("arithmetic-coded JPEG images are not supported"));
                }
                0xC4 => self.parse_dht(seg)?,
                0xDB => self.parse_dqt(seg)?,
                0xDD => {
                    if seg.len() < 2 {
                        return Err(corrupt("DRI marker is too short"));
                    }
                    self.restart_interval = be16(seg, 0)?;
                }
                0xE0 if seg.starts_with(b"JFIF\0") => self.jfif = true,
                0xEE if seg.len() >= 12 && seg.starts_with(b"Adobe") => self.adobe_transform = Some(seg[11]),
                0xDC => return Err(corrupt("DNL markers are not supported")),
                0xDA => {
                    let scan = self.parse_sos(seg)?;
                    pos = self.decode_scan(b, end, &scan)?;
                    self.scans += 1;
                    continue;
                }
                _ => {}
            }
            pos = end;
        }
    }

    fn parse_sof(&mut self, code: u8, s: &[u8], max_pixels: u64) -> Result<()> {
        if self.frame_seen {
            return Err(corrupt("more than one frame header (SOF marker)"));
        }
        self.frame_seen = true;
        if s.len() < 6 {
            return Err(corrupt("frame header (SOF) is too short"));
        }
        if s[0] != 8 {
            return Err(corrupt(format!("{}-bit samples are not supported (only 8-bit)", s[0])));
        }
        self.progressive = code == 0xC2;
        let height = be16(s, 1)?;
        let width = be16(s, 3)?;
        let n = usize::from(s[5]);
        if height == 0 {
            return Err(corrupt("image height 0 (set by a DNL marker) is not supported"));
        }
        if width == 0 {
            return Err(corrupt("image width is 0"));
        }
        let pixels = width as u64 * height as u64;
        if pixels > max_pixels {
            return Err(corrupt(format!(
                "image is too large: {width}x{height} = {pixels} pixels, over the limit of {max_pixels} pixels"
            )));
        }
        if n != 1 && n != 3 {
            return Err(corrupt(format!(
                "{n}-component images are not supported (only grayscale and 3-component YCbCr/RGB)"
            )));
        }
        if s.len() < 6 + 3 * n {
            return Err(corrupt("frame header (SOF) is too short for its components"));
        }
        for i in 0..n {
            let c = &s[6 + 3 * i..9 + 3 * i];
            let (h, v, tq) = (usize::from(c[1] >> 4), usize::from(c[1] & 15), usize::from(c[2]));
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) {
                return Err(corrupt(format!("component {i} has invalid sampling factors {h}x{v}")));
            }
            if tq > 3 {
                return Err(corrupt(format!("component {i} uses quantization table {tq} (at most 3)")));
            }
            if self.comps.iter().any(|o| o.id == c[0]) {
                return Err(corrupt(format!("duplicate component id {}", c[0])));
            }
            self.comps.push(Component { id: c[0], h, v, tq, ..Default::default() });
        }
        self.width = width;
        self.height = height;
        self.hmax = self.comps.iter().map(|c| c.h).max().unwrap_or(1);
        self.vmax = self.comps.iter().map(|c| c.v).max().unwrap_or(1);
        self.mcux = width.div_ceil(8 * self.hmax);
        self.mcuy = height.div_ceil(8 * self.vmax);
        let (hmax, vmax, mcux, mcuy) = (self.hmax, self.vmax, self.mcux, self.mcuy);
        for c in &mut self.comps {
            if hmax % c.h != 0 || vmax % c.v != 0 {
                return Err(corrupt(format!(
                    "fractional sampling ratios are not supported (component {} is {}x{} of {hmax}x{vmax})",
                    c.id, c.h, c.v
                )));
            }
            c.bw = mcux * c.h;
            c.bh = mcuy * c.v;
            c.ds_w = (width * c.h).div_ceil(hmax);
            c.ds_h = (height * c.v).div_ceil(vmax);
            c.coefs = vec![0; c.bw * c.bh * 64];
        }
        Ok(())
    }

    fn parse_dht(&mut self, mut s: &[u8]) -> Result<()> {
        while !s.is_empty() {
            if s.len() < 17 {
                return Err(corrupt("Huffman table (DHT) is too short"));
            }
            let (tc, th) = (s[0] >> 4, usize::from(s[0] & 15));
            if tc > 1 || th > 3 {
                return Err(corrupt(format!("invalid Huffman table class/id 0x{:02X}", s[0])));
            }
            let mut counts = [0u8; 16];
            counts.copy_from_slice(&s[1..17]);
            let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
            if total > 256 || s.len() < 17 + total {
                return Err(corrupt("Huffman table (DHT) has a bad symbol count"));
            }
            let t = Huffman::new(&counts, s[17..17 + total].to_vec())?;
            if tc == 0 {
                self.dc_tables[th] = Some(t);
            } else {
                self.ac_tables[th] = Some(t);
            }
            s = &s[17 + total..];
        }
        Ok(())
    }

    fn parse_dqt(&mut self, mut s: &[u8]) -> Result<()> {
        while !s.is_empty() {
            let (pq, tq) = (s[0] >> 4, usize::from(s[0] & 15));
            if pq > 1 || tq > 3 {
                return Err(corrupt(format!("invalid quantization table precision/id 0x{:02X}", s[0])));
            }
            let size = if pq == 0 { 64 } else { 128 };
            if s.len() < 1 + size {
                return Err(corrupt("quantization table (DQT) is too short"));
            }
            let mut q = [0u16; 64];
            for (k, &nat) in ZIGZAG.iter().enumerate() {
                q[nat] = if pq == 0 { u16::from(s[1 + k]) } else { u16::from_be_bytes([s[1 + 2 * k], s[2 + 2 * k]]) };
            }
            self.qts[tq] = Some(q);
            s = &s[1 + size..];
        }
        Ok(())
    }

    fn parse_sos(&mut self, s: &[u8]) -> Result<Scan> {
        if !self.frame_seen {
            return Err(corrupt("scan (SOS) before the frame header (SOF)"));
        }
        let n = usize::from(*s.first().ok_or_else(|| corrupt("scan header (SOS) is empty"))?);
        if n == 0 || n > 4 || s.len() < 4 + 2 * n {
            return Err(corrupt("scan header (SOS) is malformed"));
        }
        let mut comps: Vec<ScanComp> = Vec::with_capacity(n);
        for i in 0..n {
            let (id, t) = (s[1 + 2 * i], s[2 + 2 * i]);
            let ci = self
                .comps
                .iter()
                .position(|c| c.id == id)
                .ok_or_else(|| corrupt(format!("scan refers to unknown component id {id}")))?;
            if comps.iter().any(|c| c.ci == ci) {
                return Err(corrupt(format!("scan lists component id {id} twice")));
            }
            comps.push(ScanComp { ci, td: usize::from(t >> 4), ta: usize::from(t & 15) });
        }
        let p = 1 + 2 * n;
        let (ss, se, ah, al) =
            (usize::from(s[p]), usize::from(s[p + 1]), u32::from(s[p + 2] >> 4), u32::from(s[p + 2] & 15));
        if self.progressive {
            let bad = if ss == 0 { se != 0 } else { se < ss || se > 63 || n != 1 };
            if bad || al > 13 || ah > 13 {
                return Err(corrupt(format!("invalid progressive scan parameters Ss={ss} Se={se} Ah={ah} Al={al}")));
            }
        }
        if n > 1 {
            let blocks: usize = comps.iter().map(|c| self.comps[c.ci].h * self.comps[c.ci].v).sum();
            if blocks > 10 {
                return Err(corrupt("scan has more than 10 blocks per MCU"));
            }
        }
        for sc in &comps {
            if sc.td > 3 || sc.ta > 3 {
                return Err(corrupt("scan uses a Huffman table id over 3"));
            }
            let c = &mut self.comps[sc.ci];
            if c.qt.is_none() {
                c.qt = Some(self.qts[c.tq].ok_or_else(|| {
                    corrupt(format!("component id {} uses quantization table {} which is not defined", c.id, c.tq))
                })?);
            }
            let need_dc = !self.progressive || (ss == 0 && ah == 0);
            let need_ac = !self.progressive || ss > 0;
            if need_dc && self.dc_tables[sc.td].is_none() {
                return Err(corrupt(format!("scan uses DC Huffman table {} which is not defined", sc.td)));
            }
            if need_ac && self.ac_tables[sc.ta].is_none() {
                return Err(corrupt(format!("scan uses AC Huffman table {} which is not defined", sc.ta)));
            }
        }
        if self.progressive {
            Ok(Scan { comps, ss, se, ah, al })
        } else {
            Ok(Scan { comps, ss: 0, se: 63, ah: 0, al: 0 })
        }
    }

    /// Decodes one scan starting at `start`; returns the position of the marker that ends it.
    fn decode_scan(&mut self, data: &[u8], start: usize, scan: &Scan) -> Result<usize> {
        let mut bits = Bits::new(data, start);
        let mut preds = [0i32; 4];
        let mut eobrun: u32 = 0;
        let ri = self.restart_interval;
        let mut mcu_count = 0usize;
        let single = scan.comps.len() == 1;
        let (units_x, units_y) = if single {
            let c = &self.comps[scan.comps[0].ci];
            (c.ds_w.div_ceil(8), c.ds_h.div_ceil(8))
        } else {
            (self.mcux, self.mcuy)
        };
        let dc_tables = &self.dc_tables;
        let ac_tables = &self.ac_tables;
        let progressive = self.progressive;
        for uy in 0..units_y {
            if bits.eof {
                return Err(truncated());
            }
            for ux in 0..units_x {
                if ri > 0 && mcu_count > 0 && mcu_count % ri == 0 {
                    bits.restart();
                    preds = [0; 4];
                    eobrun = 0;
                }
                mcu_count += 1;
                for (k, sc) in scan.comps.iter().enumerate() {
                    let comp = &mut self.comps[sc.ci];
                    let (bh_n, bv_n) = if single { (1, 1) } else { (comp.h, comp.v) };
                    for v in 0..bv_n {
                        for h in 0..bh_n {
                            let (bx, by) = if single { (ux, uy) } else { (ux * comp.h + h, uy * comp.v + v) };
                            let off = (by * comp.bw + bx) * 64;
                            let block = &mut comp.coefs[off..off + 64];
                            if !progressive {
                                decode_baseline(
                                    &mut bits,
                                    block,
                                    dc_tables[sc.td].as_ref(),
                                    ac_tables[sc.ta].as_ref(),
                                    &mut preds[k],
                                )?;
                            } else if scan.ss == 0 {
                                if scan.ah == 0 {
                                    let t = dc_tables[sc.td].as_ref().ok_or_else(|| corrupt("missing DC table"))?;
                                    let s = u32::from(bits.huff(t)?);
                                    if s > 16 {
                                        return Err(corrupt("bad DC difference category"));
                                    }
                                    preds[k] = preds[k].wrapping_add(bits.extend(s));
                                    block[0] = (preds[k].wrapping_shl(scan.al)) as i16;
                                } else if bits.bit() {
                                    block[0] |= (1i32 << scan.al) as i16;
                                }
                            } else if scan.ah == 0 {
                                let t = ac_tables[sc.ta].as_ref().ok_or_else(|| corrupt("missing AC table"))?;
                                decode_ac_first(&mut bits, block, t, scan, &mut eobrun)?;
                            } else {
                                let t = ac_tables[sc.ta].as_ref().ok_or_else(|| corrupt("missing AC table"))?;
                                decode_ac_refine(&mut bits, block, t, scan, &mut eobrun)?;
                            }
                        }
                    }
                }
            }
        }
        if bits.eof {
            return Err(truncated());
        }
        // The scan ends at the next marker (skip any leftover entropy bytes, as libjpeg does).
        let mut p = bits.pos;
        while p + 1 < data.len() && !(data[p] == 0xFF && data[p + 1] != 0 && !(0xD0..=0xD7).contains(&data[p + 1])) {
            p += 1;
        }
        if p + 1 >= data.len() {
            return Err(truncated());
        }
        Ok(p)
    }

    fn output(&self) -> Result<JpegImage> {
        if !self.eoi || self.scans == 0 {
            return Err(corrupt("the file has no image data (no scan)"));
        }
        let (w, h) = (self.width, self.height);
        let planes: Vec<Vec<u8>> = self.comps.par_iter().map(|c| self.component_plane(c)).collect();
        let nc = self.comps.len();
        if nc == 1 {
            return Ok(JpegImage {
                width: w,
                height: h,
                components: 1,
                data: planes.into_iter().next().unwrap_or_default(),
            });
        }
        let rgb = if self.jfif {
            false
        } else if let Some(t) = self.adobe_transform {
            t == 0
        } else {
            self.comps[0].id == b'R' && self.comps[1].id == b'G' && self.comps[2].id == b'B'
        };
        let mut data = vec![0u8; w * h * 3];
        let t = ColorTables::new();
        data.par_chunks_mut(3 * w).enumerate().for_each(|(row, out)| {
            let r = row * w..(row + 1) * w;
            let (p0, p1, p2) = (&planes[0][r.clone()], &planes[1][r.clone()], &planes[2][r]);
            let pixels = out.chunks_exact_mut(3).zip(p0.iter().zip(p1.iter().zip(p2)));
            if rgb {
                for (px, (&a, (&b, &c))) in pixels {
                    px.copy_from_slice(&[a, b, c]);
                }
            } else {
                for (px, (&y, (&cb, &cr))) in pixels {
                    let (y, cb, cr) = (i32::from(y), usize::from(cb), usize::from(cr));
                    px[0] = clamp8(y + t.cr_r[cr]);
                    px[1] = clamp8(y + ((t.cb_g[cb] + t.cr_g[cr]) >> 16));
                    px[2] = clamp8(y + t.cb_b[cb]);
                }
            }
        });
        Ok(JpegImage { width: w, height: h, components: 3, data })
    }

    /// IDCT of one component and upsampling to the full `width x height`.
    fn component_plane(&self, c: &Component) -> Vec<u8> {
        let q = c.qt.unwrap_or([0; 64]);
        let nbx = c.ds_w.div_ceil(8);
        let nby = c.ds_h.div_ceil(8);
        let stride = nbx * 8;
        let mut plane = vec![0u8; stride * nby * 8];
        plane.par_chunks_mut(8 * stride).enumerate().for_each(|(by, rows)| {
            for bx in 0..nbx {
                let off = (by * c.bw + bx) * 64;
                let mut blk = [0i16; 64];
                blk.copy_from_slice(&c.coefs[off..off + 64]);
                idct_islow(&blk, &q, &mut rows[bx * 8..], stride);
            }
        });
        upsample(&plane, stride, c.ds_w, c.ds_h, self.hmax / c.h, self.vmax / c.v, self.width, self.height)
    }
}

fn decode_baseline(
    bits: &mut Bits,
    block: &mut [i16],
    dc: Option<&Huffman>,
    ac: Option<&Huffman>,
    pred: &mut i32,
) -> Result<()> {
    let (dc, ac) = match (dc, ac) {
        (Some(d), Some(a)) => (d, a),
        _ => return Err(corrupt("missing Huffman table")),
    };
    let s = u32::from(bits.huff(dc)?);
    if s > 16 {
        return Err(corrupt("bad DC difference category"));
    }
    *pred = pred.wrapping_add(bits.extend(s));
    block[0] = *pred as i16;
    let mut k = 1;
    while k < 64 {
        let rs = bits.huff(ac)?;
        let (r, s) = (usize::from(rs >> 4), u32::from(rs & 15));
        if s != 0 {
            k += r;
            if k > 63 {
                return Err(corrupt("AC coefficient index past 63"));
            }
            block[ZIGZAG[k]] = bits.extend(s) as i16;
            k += 1;
        } else if r == 15 {
            k += 16;
        } else {
            break;
        }
    }
    Ok(())
}

fn decode_ac_first(bits: &mut Bits, block: &mut [i16], t: &Huffman, scan: &Scan, eobrun: &mut u32) -> Result<()> {
    if *eobrun > 0 {
        *eobrun -= 1;
        return Ok(());
    }
    let mut k = scan.ss;
    while k <= scan.se {
        let rs = bits.huff(t)?;
        let (r, s) = (u32::from(rs >> 4), u32::from(rs & 15));
        if s != 0 {
            k += r as usize;
            if k > 63 {
                return Err(corrupt("AC coefficient index past 63"));
            }
            block[ZIGZAG[k]] = bits.extend(s).wrapping_shl(scan.al) as i16;
        } else if r == 15 {
            k += 15;
        } else {
            *eobrun = (1u32 << r) + bits.bits(r) - 1;
            break;
        }
        k += 1;
    }
    Ok(())
}

fn refine(bits: &mut Bits, c: &mut i16, p1: i16) {
    if bits.bit() && (*c & p1) == 0 {
        *c = if *c >= 0 { c.wrapping_add(p1) } else { c.wrapping_sub(p1) };
    }
}

fn decode_ac_refine(bits: &mut Bits, block: &mut [i16], t: &Huffman, scan: &Scan, eobrun: &mut u32) -> Result<()> {
    let p1 = (1i32 << scan.al) as i16;
    let mut k = scan.ss;
    if *eobrun == 0 {
        while k <= scan.se {
            let rs = bits.huff(t)?;
            let (mut r, s) = (i32::from(rs >> 4), rs & 15);
            let mut value = 0i16;
            if s != 0 {
                value = if bits.bit() { p1 } else { p1.wrapping_neg() };
            } else if r != 15 {
                *eobrun = (1u32 << r) + bits.bits(r as u32);
                break;
            }
            while k <= scan.se {
                let c = &mut block[ZIGZAG[k]];
                if *c != 0 {
                    refine(bits, c, p1);
                } else {
                    r -= 1;
                    if r < 0 {
                        break;
                    }
                }
                k += 1;
            }
            if value != 0 && k <= scan.se {
                block[ZIGZAG[k]] = value;
            }
            k += 1;
        }
    }
    if *eobrun > 0 {
        while k <= scan.se {
            let c = &mut block[ZIGZAG[k]];
            if *c != 0 {
                refine(bits, c, p1);
            }
            k += 1;
        }
        *eobrun -= 1;
    }
    Ok(())
}

#[inline]
fn clamp8(x: i32) -> u8 {
    x.clamp(0, 255) as u8
}

/// libjpeg's YCbCr -> RGB tables (SCALEBITS 16).
struct ColorTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i32; 256],
    cb_g: [i32; 256],
}

impl ColorTables {
    fn new() -> Self {
        const ONE_HALF: i64 = 1 << 15;
        let fix = |x: f64| (x * 65536.0 + 0.5) as i64;
        let mut t = ColorTables { cr_r: [0; 256], cb_b: [0; 256], cr_g: [0; 256], cb_g: [0; 256] };
        for i in 0..256 {
            let x = i as i64 - 128;
            t.cr_r[i] = ((fix(1.40200) * x + ONE_HALF) >> 16) as i32;
            t.cb_b[i] = ((fix(1.77200) * x + ONE_HALF) >> 16) as i32;
            t.cr_g[i] = (-fix(0.71414) * x) as i32;
            t.cb_g[i] = (-fix(0.34414) * x + ONE_HALF) as i32;
        }
        t
    }
}

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;
const FIX_0_298631336: i64 = 2446;
const FIX_0_390180644: i64 = 3196;
const FIX_0_541196100: i64 = 4433;
const FIX_0_765366865: i64 = 6270;
const FIX_0_899976223: i64 = 7373;
const FIX_1_175875602: i64 = 9633;
const FIX_1_501321110: i64 = 12299;
const FIX_1_847759065: i64 = 15137;
const FIX_1_961570560: i64 = 16069;
const FIX_2_053119869: i64 = 16819;
const FIX_2_562915447: i64 = 20995;
const FIX_3_072711026: i64 = 25172;

#[inline]
fn descale(x: i64, n: u32) -> i64 {
    (x + (1 << (n - 1))) >> n
}

/// One 1-D 8-point inverse DCT (the LL&M flow graph of jidctint.c), before descaling: returns the 8 outputs
/// scaled by 2^CONST_BITS relative to the inputs (the even part's `tmp0/tmp1` shifts included).
#[inline]
fn idct_1d(i: [i64; 8]) -> [i64; 8] {
    // Even part.
    let (z2, z3) = (i[2], i[6]);
    let z1 = (z2 + z3) * FIX_0_541196100;
    let tmp2 = z1 - z3 * FIX_1_847759065;
    let tmp3 = z1 + z2 * FIX_0_765366865;
    let tmp0 = (i[0] + i[4]) << CONST_BITS;
    let tmp1 = (i[0] - i[4]) << CONST_BITS;
    let (tmp10, tmp13, tmp11, tmp12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);
    // Odd part.
    let (t0, t1, t2, t3) = (i[7], i[5], i[3], i[1]);
    let z1 = t0 + t3;
    let z2 = t1 + t2;
    let z3 = t0 + t2;
    let z4 = t1 + t3;
    let z5 = (z3 + z4) * FIX_1_175875602;
    let t0 = t0 * FIX_0_298631336;
    let t1 = t1 * FIX_2_053119869;
    let t2 = t2 * FIX_3_072711026;
    let t3 = t3 * FIX_1_501321110;
    let z1 = -z1 * FIX_0_899976223;
    let z2 = -z2 * FIX_2_562915447;
    let z3 = -z3 * FIX_1_961570560 + z5;
    let z4 = -z4 * FIX_0_390180644 + z5;
    let t0 = t0 + z1 + z3;
    let t1 = t1 + z2 + z4;
    let t2 = t2 + z2 + z3;
    let t3 = t3 + z1 + z4;
    [tmp10 + t3, tmp11 + t2, tmp12 + t1, tmp13 + t0, tmp13 - t0, tmp12 - t1, tmp11 - t2, tmp10 - t3]
}

/// libjpeg's `jpeg_idct_islow`: dequantize, columns (kept with PASS1_BITS extra bits), then rows, level shift
/// and clamp; writes 8 rows of 8 samples at `out[row * stride ..]`.
fn idct_islow(coef: &[i16; 64], q: &[u16; 64], out: &mut [u8], stride: usize) {
    if coef[1..].iter().all(|&c| c == 0) {
        // DC only: the full computation reduces to one constant (exactly).
        let dc = (i64::from(coef[0]) * i64::from(q[0])) << PASS1_BITS;
        let v = (descale(dc, PASS1_BITS + 3) + 128).clamp(0, 255) as u8;
        for row in 0..8 {
            out[row * stride..row * stride + 8].fill(v);
        }
        return;
    }
    let mut ws = [0i64; 64];
    for col in 0..8 {
        let d = |r: usize| i64::from(coef[r * 8 + col]) * i64::from(q[r * 8 + col]);
        if (1..8).all(|r| coef[r * 8 + col] == 0) {
            let dc = d(0) << PASS1_BITS;
            for r in 0..8 {
                ws[r * 8 + col] = dc;
            }
            continue;
        }
        let o = idct_1d([d(0), d(1), d(2), d(3), d(4), d(5), d(6), d(7)]);
        for r in 0..8 {
            ws[r * 8 + col] = descale(o[r], CONST_BITS - PASS1_BITS);
        }
    }
    for row in 0..8 {
        let w = &ws[row * 8..row * 8 + 8];
        let dst = &mut out[row * stride..row * stride + 8];
        if w[1..].iter().all(|&x| x == 0) {
            // Equal to the full row transform: (w0 << CONST_BITS) descaled by CONST_BITS + PASS1_BITS + 3.
            dst.fill((descale(w[0], PASS1_BITS + 3) + 128).clamp(0, 255) as u8);
            continue;
        }
        let o = idct_1d([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        for x in 0..8 {
            dst[x] = (descale(o[x], CONST_BITS + PASS1_BITS + 3) + 128).clamp(0, 255) as u8;
        }
    }
}

/// Upsamples a `ds_w x ds_h` plane (row stride `stride`) by `hx x vy` to `w x h` the way libjpeg-turbo does.
#[allow(clippy::too_many_arguments)]
fn upsample(p: &[u8], stride: usize, ds_w: usize, ds_h: usize, hx: usize, vy: usize, w: usize, h: usize) -> Vec<u8> {
    let mut out = vec![0u8; w * h];
    let row = |y: usize| &p[y * stride..y * stride + ds_w];
    // libjpeg-turbo's context rows replicate the first and last real rows.
    let above = |r: usize| row(r.saturating_sub(1));
    let below = |r: usize| row((r + 1).min(ds_h - 1));
    let init = || (vec![0u32; ds_w], vec![0u8; 2 * ds_w]);
    out.par_chunks_mut(w).enumerate().for_each_init(init, |(colsum, tmp), (y, dst)| match (hx, vy) {
        (1, 1) => dst.copy_from_slice(&row(y)[..w]),
        (2, 1) if ds_w > 2 => {
            h2v1_fancy(row(y), tmp);
            dst.copy_from_slice(&tmp[..w]);
        }
        (1, 2) => {
            let r = y / 2;
            let (near, far, bias) = if y % 2 == 0 { (row(r), above(r), 1) } else { (row(r), below(r), 2) };
            for x in 0..w {
                dst[x] = ((u32::from(near[x]) * 3 + u32::from(far[x]) + bias) >> 2) as u8;
            }
        }
        (2, 2) if ds_w > 2 => {
            let r = y / 2;
            let (near, far) = if y % 2 == 0 { (row(r), above(r)) } else { (row(r), below(r)) };
            for x in 0..ds_w {
                colsum[x] = u32::from(near[x]) * 3 + u32::from(far[x]);
            }
            h2v2_fancy_row(colsum, tmp);
            dst.copy_from_slice(&tmp[..w]);
        }
        _ => {
            let src = row(y / vy);
            for x in 0..w {
                dst[x] = src[x / hx];
            }
        }
    });
    out
}

/// h2v1 triangle filter over one row (`inp.len() > 2`), output `2 * inp.len()` samples.
fn h2v1_fancy(inp: &[u8], out: &mut [u8]) {
    let n = inp.len();
    let v = |i: usize| u32::from(inp[i]);
    out[0] = inp[0];
    out[1] = ((v(0) * 3 + v(1) + 2) >> 2) as u8;
    for i in 1..n - 1 {
        let t = v(i) * 3;
        out[2 * i] = ((t + v(i - 1) + 1) >> 2) as u8;
        out[2 * i + 1] = ((t + v(i + 1) + 2) >> 2) as u8;
    }
    out[2 * n - 2] = ((v(n - 1) * 3 + v(n - 2) + 1) >> 2) as u8;
    out[2 * n - 1] = inp[n - 1];
}

/// h2v2 triangle filter's horizontal step over column sums `3 * near + far` (`cs.len() > 2`).
fn h2v2_fancy_row(cs: &[u32], out: &mut [u8]) {
    let n = cs.len();
    out[0] = ((cs[0] * 4 + 8) >> 4) as u8;
    out[1] = ((cs[0] * 3 + cs[1] + 7) >> 4) as u8;
    for i in 1..n - 1 {
        let t = cs[i] * 3;
        out[2 * i] = ((t + cs[i - 1] + 8) >> 4) as u8;
        out[2 * i + 1] = ((t + cs[i + 1] + 7) >> 4) as u8;
    }
    out[2 * n - 2] = ((cs[n - 1] * 3 + cs[n - 2] + 8) >> 4) as u8;
    out[2 * n - 1] = ((cs[n - 1] * 4 + 7) >> 4) as u8;
}
