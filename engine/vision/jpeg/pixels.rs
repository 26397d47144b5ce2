//! From coefficients to pixels: libjpeg's `JDCT_ISLOW` integer IDCT, chroma upsampling (fancy triangle filters
//! or replication) and YCbCr to RGB conversion with libjpeg's fixed-point tables.

use rayon::prelude::*;

use super::{corrupt, Component, Decoder, JpegImage};
use crate::Result;

impl Decoder {
    pub(super) fn output(&self) -> Result<JpegImage> {
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
