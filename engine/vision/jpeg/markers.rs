//! Marker parsing: the walk over the file's marker segments (SOI to EOI) and the frame (SOF), Huffman table
//! (DHT), quantization table (DQT), restart interval (DRI), APPn colour-space hints and scan (SOS) headers.

use super::entropy::Huffman;
use super::{corrupt, truncated, Component, Decoder, Scan, ScanComp, ZIGZAG};
use crate::Result;

fn be16(b: &[u8], p: usize) -> Result<usize> {
    match (b.get(p), b.get(p + 1)) {
        (Some(&x), Some(&y)) => Ok((usize::from(x) << 8) | usize::from(y)),
        _ => Err(truncated()),
    }
}

impl Decoder {
    pub(super) fn run(&mut self, b: &[u8], max_pixels: u64) -> Result<()> {
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
}
