//! 4-bit group-wise weight quantization (W4A16 and W4A8, group 32 by default) with the numerics of torchao's
//! `8da4w`: symmetric int4 weights per group of `group` input columns with a bf16 scale, and, for W4A8, int8
//! activations quantized per token (asymmetric, dynamic) at run time.
//!
//! The in-memory form shared by every backend is [`QuantMatrix`] (unpacked int4 values, f32 scales); the on-disk
//! layouts (this engine's own and the Hugging Face int4 formats) are read and written by the submodules.

pub mod format;
pub mod hf;
pub mod numerics;

use crate::{Error, Result};

/// Default quantization group size along the input dimension (K).
pub const GROUP_SIZE: usize = 32;

/// How activations are fed to a quantized projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActQuant {
    /// Activations stay bf16 (CUDA) / f32 (CPU): W4A16.
    None,
    /// Activations are quantized per token to int8, asymmetric, with a dynamic scale and zero point: W4A8.
    Int8PerToken,
}

/// A quantization scheme: 4-bit weights in groups of `group` input columns, and an activation mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Scheme {
    /// Input columns per weight scale.
    pub group: usize,
    /// Activation handling.
    pub act: ActQuant,
}

impl Scheme {
    /// W4A16 with group 32.
    pub const W4A16_G32: Scheme = Scheme { group: GROUP_SIZE, act: ActQuant::None };
    /// W4A8 with group 32 (torchao 8da4w).
    pub const W4A8_G32: Scheme = Scheme { group: GROUP_SIZE, act: ActQuant::Int8PerToken };

    /// Parses `w4a16-g32`, `w4a8-g32` (and other group sizes spelled `-gN`).
    pub fn parse(s: &str) -> Result<Scheme> {
        let bad = || Error::request(format!("unknown quantization scheme `{s}` (expected w4a16-g32 or w4a8-g32)"));
        let (act, rest) = if let Some(r) = s.strip_prefix("w4a16-g") {
            (ActQuant::None, r)
        } else if let Some(r) = s.strip_prefix("w4a8-g") {
            (ActQuant::Int8PerToken, r)
        } else {
            return Err(bad());
        };
        let group: usize = rest.parse().map_err(|_| bad())?;
        if group == 0 || !group.is_multiple_of(2) {
            return Err(bad());
        }
        Ok(Scheme { group, act })
    }

    /// The name [`parse`](Scheme::parse) accepts.
    pub fn name(&self) -> String {
        match self.act {
            ActQuant::None => format!("w4a16-g{}", self.group),
            ActQuant::Int8PerToken => format!("w4a8-g{}", self.group),
        }
    }
}

/// What a model load converts on the host before the weights reach the executor: the decoder projections to int4
/// (`--quantize`, [`Scheme`]) and the vocabulary tables to int8 per row (`--embeddings int8`, [`Int8Table`]), each
/// with the numerics of `llama32 quantize`. A checkpoint that already stores either form keeps it; asking to
/// quantize already quantized projections is refused where the checkpoint is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AtLoad {
    /// Quantize the projections with this scheme.
    pub scheme: Option<Scheme>,
    /// Quantize the token embedding and `lm_head` to int8 per row.
    pub tables_int8: bool,
}

impl AtLoad {
    /// Nothing converted at load time.
    pub const NONE: AtLoad = AtLoad { scheme: None, tables_int8: false };
}

impl From<Option<Scheme>> for AtLoad {
    fn from(scheme: Option<Scheme>) -> Self {
        AtLoad { scheme, tables_int8: false }
    }
}

/// A quantized weight matrix `[n, k]` (`out = x @ w^T`), unpacked: `w[r, c] = scales[r, c / group] * (q[r, c] -
/// zeros[r, c / group])`, with `zeros` absent (zero) for the symmetric formats.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantMatrix {
    /// Output features (rows).
    pub n: usize,
    /// Input features (columns); a multiple of `group`.
    pub k: usize,
    /// Columns per scale.
    pub group: usize,
    /// `[n, k]` int4 values in `[-8, 7]`.
    pub q: Vec<i8>,
    /// `[n, k / group]` scales (bf16-representable for this engine's format).
    pub scales: Vec<f32>,
    /// `[n, k / group]` integer zero points in `[-8, 8]` (asymmetric Hugging Face formats only; 8 occurs only in
    /// GPTQ v1 checkpoints, whose stored zero point is off by one).
    pub zeros: Option<Vec<i8>>,
}

impl QuantMatrix {
    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.k / self.group
    }

    /// Random symmetric int4 weights `[n, k]` for benchmarks at real shapes, generated straight in quantized form
    /// (no f32 matrix is made): values uniform in `[-8, 7]` (standard deviation 4.6) and per-group bf16 scales
    /// uniform in `[0.5, 1.5) x 0.0043`, so the weights' standard deviation is about 0.02 like the dense random
    /// weights'. Reproducible from `(seed, stream)`; rows are generated in parallel.
    pub fn random(n: usize, k: usize, group: usize, seed: u64, stream: u64) -> Result<QuantMatrix> {
        use rayon::prelude::*;
        if group == 0 || !k.is_multiple_of(group) {
            return Err(Error::request(format!("random int4 weights: k = {k} is not a multiple of group {group}")));
        }
        let mix = crate::weights::splitmix;
        let groups = k / group;
        let mut q = vec![0i8; n * k];
        let mut scales = vec![0.0f32; n * groups];
        q.par_chunks_mut(k.max(1)).zip(scales.par_chunks_mut(groups.max(1))).enumerate().for_each(|(r, (qr, sr))| {
            let mut s = mix(seed ^ mix(stream.wrapping_mul(0x9E37_79B9) ^ (r as u64).wrapping_mul(0x2545_F491)));
            for chunk in qr.chunks_mut(16) {
                s = mix(s);
                for (i, v) in chunk.iter_mut().enumerate() {
                    *v = ((s >> (4 * i)) & 0xF) as i8 - 8;
                }
            }
            for sc in sr.iter_mut() {
                s = mix(s);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                *sc = half::bf16::from_f32(0.0043 * (0.5 + u)).to_f32();
            }
        });
        Ok(QuantMatrix { n, k, group, q, scales, zeros: None })
    }

    /// The sub-matrix of rows `rows` and columns `cols` (zero points sliced alike): a tensor-parallel rank's part of
    /// a column-parallel (rows) or row-parallel (columns) projection. Rows may be any range; `cols` must start and
    /// end on group boundaries, so that every group keeps its scale.
    pub fn slice(&self, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) -> Result<QuantMatrix> {
        let shape = format!("[{}, {}]", self.n, self.k);
        if rows.start > rows.end || rows.end > self.n || cols.start > cols.end || cols.end > self.k {
            return Err(Error::request(format!(
                "quantized {shape} matrix: rows {rows:?} / columns {cols:?} are out of range"
            )));
        }
        if self.group == 0 || !cols.start.is_multiple_of(self.group) || !cols.end.is_multiple_of(self.group) {
            return Err(Error::request(format!(
                "quantized {shape} matrix: columns {}..{} do not start and end on a boundary of the quantization \
                 group {}",
                cols.start, cols.end, self.group
            )));
        }
        let (g, k) = (self.groups(), cols.len());
        let (g0, g1) = (cols.start / self.group, cols.end / self.group);
        let mut q = Vec::with_capacity(rows.len() * k);
        let mut scales = Vec::with_capacity(rows.len() * (g1 - g0));
        let mut zeros = self.zeros.as_ref().map(|_| Vec::with_capacity(rows.len() * (g1 - g0)));
        for r in rows.clone() {
            q.extend_from_slice(&self.q[r * self.k + cols.start..r * self.k + cols.end]);
            scales.extend_from_slice(&self.scales[r * g + g0..r * g + g1]);
            if let (Some(out), Some(z)) = (zeros.as_mut(), self.zeros.as_ref()) {
                out.extend_from_slice(&z[r * g + g0..r * g + g1]);
            }
        }
        Ok(QuantMatrix { n: rows.len(), k, group: self.group, q, scales, zeros })
    }

    /// The dequantized `[n, k]` matrix in f32 (exact: a bf16 scale times a small integer).
    pub fn dequantize(&self) -> Vec<f32> {
        let g = self.groups();
        let mut out = vec![0.0f32; self.n * self.k];
        for r in 0..self.n {
            for c in 0..self.k {
                let gi = r * g + c / self.group;
                let z = self.zeros.as_ref().map_or(0, |z| z[gi]);
                out[r * self.k + c] = self.scales[gi] * (self.q[r * self.k + c] as i32 - z as i32) as f32;
            }
        }
        out
    }
}

/// An `[rows, cols]` table (the token embedding or `lm_head`) in symmetric int8 with one scale per row (Meta's
/// 8-bit per-channel option, [`numerics::quantize_rows_int8`]): `w[r, c] = scales[r] * q[r, c]`. The scales are
/// bf16 values held as f32, so every dequantized value is exact in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Table {
    /// Rows (vocabulary entries).
    pub rows: usize,
    /// Columns (the hidden size).
    pub cols: usize,
    /// `[rows, cols]` int8 values.
    pub q: Vec<i8>,
    /// `[rows]` scales (bf16-representable).
    pub scales: Vec<f32>,
}

impl Int8Table {
    /// Quantizes an f32 `[rows, cols]` table the way `llama32 quantize --embeddings int8` does: each value rounded
    /// to bf16 first, then [`numerics::quantize_rows_int8`]. Errors name the table (`what`) and the bad value.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, what: &str) -> Result<Int8Table> {
        let rounded: Vec<f32> = w.iter().map(|&v| numerics::round_to_bf16(v)).collect();
        let (q, scales) =
            numerics::quantize_rows_int8(&rounded, rows, cols).map_err(|e| Error::request(format!("{what}: {e}")))?;
        Ok(Int8Table { rows, cols, q, scales })
    }

    /// [`quantize`](Self::quantize) with the table's exact dequantization beside it: the f32 values a table held in
    /// int8 keeps for the CPU reference.
    pub fn quantize_with_f32(w: &[f32], rows: usize, cols: usize, what: &str) -> Result<(Vec<f32>, Int8Table)> {
        let t = Int8Table::quantize(w, rows, cols, what)?;
        Ok((t.dequantize(), t))
    }

    /// A model's f32 table `values` (`cols` columns) held in int8 too, for `--embeddings int8`: quantized
    /// ([`quantize_with_f32`](Self::quantize_with_f32)) into `int8`, `values` becoming its exact dequantization;
    /// nothing changes when `int8` already holds the table's int8 form (an int8-embeddings checkpoint's).
    pub fn quantize_in_place(
        values: &mut Vec<f32>,
        int8: &mut Option<Int8Table>,
        cols: usize,
        what: &str,
    ) -> Result<()> {
        if cols == 0 {
            return Err(Error::request(format!("{what}: cannot quantize a table of 0 columns")));
        }
        if int8.is_none() {
            let (f32s, t) = Int8Table::quantize_with_f32(values, values.len() / cols, cols, what)?;
            *values = f32s;
            *int8 = Some(t);
        }
        Ok(())
    }

    /// Checks the shape and that every scale is a finite bf16 value; errors name the table (`what`).
    pub fn check(&self, what: &str) -> Result<()> {
        let fail = |msg: String| Err(Error::request(format!("{what} (int8 [{}, {}]): {msg}", self.rows, self.cols)));
        if self.q.len() != self.rows * self.cols {
            return fail(format!("{} values, expected {}", self.q.len(), self.rows * self.cols));
        }
        if self.scales.len() != self.rows {
            return fail(format!("{} scales, expected {}", self.scales.len(), self.rows));
        }
        if let Some(r) = self.scales.iter().position(|&s| !s.is_finite() || numerics::round_to_bf16(s) != s) {
            return fail(format!("scale of row {r} is {}, not a finite bf16 value", self.scales[r]));
        }
        Ok(())
    }

    /// Rows `rows` of the table (a tensor-parallel rank's vocabulary slice); errors name the table (`what`).
    pub fn slice_rows(&self, rows: std::ops::Range<usize>, what: &str) -> Result<Int8Table> {
        if rows.start > rows.end || rows.end > self.rows {
            return Err(Error::request(format!("{what}: rows {rows:?} of an int8 table of {}", self.rows)));
        }
        Ok(Int8Table {
            rows: rows.len(),
            cols: self.cols,
            q: self.q[rows.start * self.cols..rows.end * self.cols].to_vec(),
            scales: self.scales[rows.clone()].to_vec(),
        })
    }

    /// The `[rows, cols]` table in f32 (exact: an int8 times a bf16 scale).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        if self.cols == 0 {
            return out;
        }
        for ((o, q), &s) in out.chunks_exact_mut(self.cols).zip(self.q.chunks_exact(self.cols)).zip(&self.scales) {
            for (x, &v) in o.iter_mut().zip(q) {
                *x = f32::from(v) * s;
            }
        }
        out
    }

    /// Bytes of the table as the GPU keeps it: the int8 values and a bf16 scale per row.
    pub fn device_bytes(&self) -> usize {
        self.rows * self.cols + 2 * self.rows
    }
}

/// A quantized projection: its matrix and the scheme its activations follow.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantLinear {
    /// The weights.
    pub matrix: QuantMatrix,
    /// The scheme (group size and activation mode).
    pub scheme: Scheme,
}

impl QuantLinear {
    /// Splits the output rows at `at`: rows `..at` and `at..` as two projections of the same scheme (rows are
    /// quantized independently, so nothing changes in either half).
    pub fn split_rows(&self, at: usize) -> Result<(QuantLinear, QuantLinear)> {
        let m = &self.matrix;
        if at > m.n {
            return Err(Error::request(format!("split_rows: row {at} of a [{}, {}] matrix", m.n, m.k)));
        }
        let g = m.groups();
        let part = |rows: std::ops::Range<usize>| QuantLinear {
            matrix: QuantMatrix {
                n: rows.len(),
                k: m.k,
                group: m.group,
                q: m.q[rows.start * m.k..rows.end * m.k].to_vec(),
                scales: m.scales[rows.start * g..rows.end * g].to_vec(),
                zeros: m.zeros.as_ref().map(|z| z[rows.start * g..rows.end * g].to_vec()),
            },
            scheme: self.scheme,
        };
        Ok((part(0..at), part(at..m.n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_keep_rows_groups_and_zero_points() {
        let mut m = QuantMatrix::random(6, 128, 32, 3, 4).unwrap();
        m.zeros = Some((0..6 * 4).map(|i| (i % 17) as i8 - 8).collect());
        let whole = m.dequantize();
        for (rows, cols) in [(1..4, 0..128), (0..6, 32..96), (2..5, 64..128), (0..6, 0..128), (3..3, 0..32)] {
            let s = m.slice(rows.clone(), cols.clone()).unwrap();
            assert_eq!((s.n, s.k, s.group), (rows.len(), cols.len(), 32));
            assert_eq!(s.zeros.as_ref().map(Vec::len), Some(rows.len() * cols.len() / 32));
            let want: Vec<f32> =
                rows.clone().flat_map(|r| whole[r * 128 + cols.start..r * 128 + cols.end].to_vec()).collect();
            assert_eq!(s.dequantize(), want, "rows {rows:?} cols {cols:?}");
        }
        // The first group of row 1 keeps its scale and zero point.
        let s = m.slice(1..2, 32..64).unwrap();
        assert_eq!((s.scales[0], s.zeros.unwrap()[0]), (m.scales[4 + 1], m.zeros.as_ref().unwrap()[4 + 1]));
        m.zeros = None;
        assert_eq!(m.slice(0..6, 0..64).unwrap().zeros, None);
        for (rows, cols) in [(0..6, 16..64), (0..6, 0..48), (0..7, 0..32), (0..6, 0..160)] {
            let e = m.slice(rows.clone(), cols.clone()).unwrap_err().to_string();
            assert!(e.contains(&format!("{}..{}", cols.start, cols.end)) || e.contains("out of range"), "{e}");
        }
        let e = m.slice(0..6, 16..48).unwrap_err().to_string();
        assert!(e.contains("columns 16..48") && e.contains("group 32"), "{e}");
    }

    #[test]
    fn random_int4_weights_are_reproducible_and_scaled_like_the_dense_ones() {
        let a = QuantMatrix::random(64, 256, 32, 9, 1).unwrap();
        assert_eq!(a, QuantMatrix::random(64, 256, 32, 9, 1).unwrap());
        assert_ne!(a.q, QuantMatrix::random(64, 256, 32, 9, 2).unwrap().q);
        assert_ne!(a.q, QuantMatrix::random(64, 256, 32, 10, 1).unwrap().q);
        assert_eq!((a.q.len(), a.scales.len()), (64 * 256, 64 * 8));
        assert!(a.q.iter().all(|&v| (-8..=7).contains(&v)));
        assert!(a.q.contains(&-8) && a.q.contains(&7));
        assert!(a.scales.iter().all(|&s| s == half::bf16::from_f32(s).to_f32() && s > 0.002 && s < 0.0066));
        let w = a.dequantize();
        let var = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64;
        assert!((var.sqrt() - 0.02).abs() < 0.003, "std {}", var.sqrt());
        assert!(QuantMatrix::random(4, 48, 32, 0, 0).is_err());
    }
}

#[cfg(test)]
mod int8_table_tests {
    use super::*;

    #[test]
    fn quantizes_rows_checks_and_dequantizes_exactly() {
        let (rows, cols) = (3, 5);
        let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 - 7.0) * 0.013).collect();
        let t = Int8Table::quantize(&w, rows, cols, "table").unwrap();
        t.check("table").unwrap();
        assert_eq!(t.device_bytes(), rows * cols + 2 * rows);
        let d = t.dequantize();
        for r in 0..rows {
            // Each row's largest magnitude maps to about 127.5 steps, and each value to within a step (half a step
            // but where the clamp at 127 cuts the top one).
            let amax = w[r * cols..][..cols].iter().fold(0f32, |m, v| m.max(v.abs()));
            for c in 0..cols {
                let i = r * cols + c;
                assert_eq!(d[i], f32::from(t.q[i]) * t.scales[r]);
                assert!((d[i] - numerics::round_to_bf16(w[i])).abs() <= t.scales[r], "row {r} col {c}");
            }
            assert!(t.scales[r] >= amax / 128.0);
        }
        let e = Int8Table::quantize(&[f32::NAN], 1, 1, "lm_head.weight").unwrap_err().to_string();
        assert!(e.contains("lm_head.weight"), "{e}");
    }

    #[test]
    fn check_names_the_table_and_the_fault() {
        let ok = Int8Table { rows: 2, cols: 2, q: vec![1, -2, 3, -128], scales: vec![0.5, 0.25] };
        ok.check("t").unwrap();
        let err = |t: Int8Table| t.check("embed").unwrap_err().to_string();
        assert!(err(Int8Table { q: vec![1; 3], ..ok.clone() }).contains("3 values"));
        assert!(err(Int8Table { scales: vec![0.5], ..ok.clone() }).contains("1 scales"));
        assert!(err(Int8Table { scales: vec![0.5, f32::INFINITY], ..ok.clone() }).contains("row 1"));
        let e = err(Int8Table { scales: vec![0.5, 0.1], ..ok });
        assert!(e.contains("embed") && e.contains("not a finite bf16"), "{e}");
    }
}
