//! Entropy decoding: Huffman tables, the bit reader over entropy-coded data (byte stuffing, markers, restarts)
//! and the decoding of one scan (sequential, or progressive DC/AC first and refinement passes) into coefficients.

use super::{corrupt, truncated, Decoder, Scan, ZIGZAG};
use crate::Result;

/// Huffman decoding table: a 9-bit lookup plus the canonical-code limits for longer codes.
#[derive(Clone)]
pub(super) struct Huffman {
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
    pub(super) fn new(counts: &[u8; 16], values: Vec<u8>) -> Result<Self> {
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

impl Decoder {
    /// Decodes one scan starting at `start`; returns the position of the marker that ends it.
    pub(super) fn decode_scan(&mut self, data: &[u8], start: usize, scan: &Scan) -> Result<usize> {
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
                if ri > 0 && mcu_count > 0 && mcu_count.is_multiple_of(ri) {
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
