//! The host-side weight layout of the 4-bit kernels: [`layout_w4a16`] / [`layout_w4a8`] reorder a
//! [`QuantMatrix`] into the 512-byte MMA-fragment tiles (see the parent module's `# Layout`), with their checks
//! and the host emulation tests of the fragments.

use half::bf16;
use rayon::prelude::*;

use super::{padded_n, supports, MAX_N, TILE_K, TILE_N};
use crate::quant::QuantMatrix;
use crate::{Error, Result};

/// Nibble position (0..8) of column offset `i` (0..8) inside a W4A16 word: pairs of columns share the two 16-bit
/// halves (see `kernels/quant/common.cuh`).
fn nibble_w4a16(i: usize) -> usize {
    (i >> 1) + 4 * (i & 1)
}

/// Nibble position of column offset `i` inside a W4A8 word: columns 0..4 in the low nibbles of the four bytes,
/// 4..8 in the high nibbles.
fn nibble_w4a8(i: usize) -> usize {
    if i < 4 {
        2 * i
    } else {
        2 * (i - 4) + 1
    }
}

/// Checks that the kernels take `m` (shape, value ranges, buffer lengths).
fn check_matrix(m: &QuantMatrix) -> Result<()> {
    let fail = |msg: String| Err(Error::request(format!("quantized [{}, {}] matrix: {msg}", m.n, m.k)));
    if !supports(m.k, m.group) {
        return fail(format!(
            "the CUDA kernels need k a multiple of 64 (up to 2^24) and a group a multiple of 32 dividing k; \
             k is {}, group {}",
            m.k, m.group
        ));
    }
    if m.n > MAX_N {
        return fail(format!("n is {}, at most {MAX_N} is supported", m.n));
    }
    if m.q.len() != m.n * m.k {
        return fail(format!("q has {} values, expected {}", m.q.len(), m.n * m.k));
    }
    let groups = m.n * (m.k / m.group);
    if m.scales.len() != groups {
        return fail(format!("{} scales, expected {groups}", m.scales.len()));
    }
    if let Some(i) = m.q.iter().position(|q| !(-8..=7).contains(q)) {
        return fail(format!("q[{i}] = {} is outside the int4 range [-8, 7]", m.q[i]));
    }
    if let Some(i) = m.scales.iter().position(|s| !s.is_finite()) {
        return fail(format!("scale {i} is {}", m.scales[i]));
    }
    if let Some(z) = &m.zeros {
        if z.len() != groups {
            return fail(format!("{} zero points, expected {groups}", z.len()));
        }
        if let Some(i) = z.iter().position(|z| !(-8..=7).contains(z)) {
            return fail(format!("zero point {i} = {} is outside [-8, 7]", z[i]));
        }
    }
    Ok(())
}

/// Which matrix row each layout row holds: the matrix's own order, or SwiGLU's pairing (see
/// [`layout_w4a16_paired`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowOrder {
    /// Layout row `r` is matrix row `r`.
    Plain,
    /// Layout rows `16 t + r` are gate row `8 t + r` (`r < 8`) and up row `half + 8 t + r - 8` (`r >= 8`).
    Paired { half: usize },
}

impl RowOrder {
    /// The matrix row of layout row `r` (`kernels/quant/w4a16_common.cuh`, `w4a16_matrix_row`).
    fn matrix_row(self, r: usize) -> usize {
        match self {
            RowOrder::Plain => r,
            RowOrder::Paired { half } => {
                let j = r / 16 * 8 + r % 8;
                if r % 16 < 8 {
                    j
                } else {
                    half + j
                }
            }
        }
    }
}

/// The scale and zero point of row `r`, column `c` (0 for the padding rows `r >= n`).
fn group_params(m: &QuantMatrix, r: usize, c: usize) -> (f32, i8) {
    if r >= m.n {
        return (0.0, 0);
    }
    let gi = r * (m.k / m.group) + c / m.group;
    (m.scales[gi], m.zeros.as_ref().map_or(0, |z| z[gi]))
}

/// The 512-byte tiles of `m` with the given nibble order, layout row `r` holding matrix row `order.matrix_row(r)`.
fn pack_tiles(m: &QuantMatrix, nibble: fn(usize) -> usize, order: RowOrder) -> Vec<u8> {
    let (n_pad, k) = (padded_n(m.n), m.k);
    let kc = k / TILE_K;
    let mut out = vec![0u8; n_pad / TILE_N * kc * 512];
    // Tiles are independent: packed in parallel (a 90B model has 85 G values to reorder at load).
    out.par_chunks_exact_mut(512).enumerate().for_each(|(tile, chunk)| {
        let (nt, c) = (tile / kc, tile % kc);
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for word in 0..4 {
                let row = order.matrix_row(nt * TILE_N + g + 8 * (word & 1));
                let col0 = c * TILE_K + 32 * (word >> 1) + 8 * t;
                let mut w = 0u32;
                if row < m.n {
                    for i in 0..8 {
                        let q = m.q[row * k + col0 + i] as u8 & 0xF;
                        w |= u32::from(q) << (4 * nibble(i));
                    }
                }
                chunk[lane * 16 + word * 4..][..4].copy_from_slice(&w.to_le_bytes());
            }
        }
    });
    out
}

/// The per-tile entries of a per-(row, group-of-32) quantity: for tile (nt, c) and lane group g, the values of
/// (row g, group 2c), (row g, group 2c+1), (row g+8, group 2c), (row g+8, group 2c+1).
fn pack_entries<T: Copy + Send>(m: &QuantMatrix, value: impl Fn(usize, usize) -> T + Sync) -> Vec<T> {
    let kc = m.k / TILE_K;
    let tiles = padded_n(m.n) / TILE_N * kc;
    (0..tiles)
        .into_par_iter()
        .flat_map_iter(|tile| {
            let (nt, c) = (tile / kc, tile % kc);
            let value = &value;
            (0..32).map(move |i| {
                let (g, e) = (i / 4, i % 4);
                value(nt * TILE_N + g + 8 * (e >> 1), c * TILE_K + 32 * (e & 1))
            })
        })
        .collect()
}

/// A W4A16 matrix in the kernels' layout, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostW4A16 {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// The int4 tiles.
    pub qweight: Vec<u8>,
    /// The bf16 scales, per tile entry.
    pub scales: Vec<bf16>,
    /// The bf16 biases `136 + z`, per tile entry; `None` for symmetric weights.
    pub zeros: Option<Vec<bf16>>,
}

/// Reorders `m` for the W4A16 kernels (see the module docs). Errors name what the kernels cannot take.
pub fn layout_w4a16(m: &QuantMatrix) -> Result<HostW4A16> {
    layout_w4a16_ordered(m, RowOrder::Plain)
}

/// [`layout_w4a16`] for SwiGLU's fused `[gate; up]` projection (`n = 2 half`, `half` a multiple of 8), with the rows
/// paired: 16-row tile `t` holds gate rows `8 t .. 8 t + 8` as its rows 0-7 and the matching up rows
/// `half + 8 t ..` as its rows 8-15, so that one lane of a kernel's MMA tile holds both sums of an output and the
/// kernel can apply SiLU * up as it writes (`l32_w4a16_params.silu`). The kernels still write a plain output in the
/// matrix's row order, so the paired layout serves every W4A16 path. Errors name what the kernels cannot take.
pub fn layout_w4a16_paired(m: &QuantMatrix) -> Result<HostW4A16> {
    if !m.n.is_multiple_of(16) {
        return Err(Error::request(format!(
            "quantized [{}, {}] matrix: pairing gate and up rows needs n = 2 x a multiple of 8",
            m.n, m.k
        )));
    }
    layout_w4a16_ordered(m, RowOrder::Paired { half: m.n / 2 })
}

fn layout_w4a16_ordered(m: &QuantMatrix, order: RowOrder) -> Result<HostW4A16> {
    check_matrix(m)?;
    let row = |r: usize| order.matrix_row(r);
    let scales = pack_entries(m, |r, c| bf16::from_f32(group_params(m, row(r), c).0));
    let zeros =
        m.zeros.as_ref().map(|_| pack_entries(m, |r, c| bf16::from_f32(136.0 + group_params(m, row(r), c).1 as f32)));
    Ok(HostW4A16 { n: m.n, k: m.k, qweight: pack_tiles(m, nibble_w4a16, order), scales, zeros })
}

/// A W4A8 matrix in the kernels' layout, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostW4A8 {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// The int4 tiles.
    pub qweight: Vec<u8>,
    /// The f32 scales per tile entry: `s / 16` for symmetric weights (the kernel multiplies `16 q`), `s` otherwise.
    pub scales: Vec<f32>,
    /// The bytes `8 + z` per tile entry; `None` for symmetric weights.
    pub zeros: Option<Vec<u8>>,
    /// `[n_pad]`: `sum_g s[r, g] * sum_{c in g} (q[r, c] - z[r, g])`, summed in f64, rounded once.
    pub row_corr: Vec<f32>,
}

/// Reorders `m` for the W4A8 kernels (see the module docs). Errors name what the kernels cannot take.
pub fn layout_w4a8(m: &QuantMatrix) -> Result<HostW4A8> {
    check_matrix(m)?;
    let div = if m.zeros.is_some() { 1.0 } else { 16.0 };
    let scales = pack_entries(m, |r, c| group_params(m, r, c).0 / div);
    let zeros = m.zeros.as_ref().map(|_| pack_entries(m, |r, c| (8 + group_params(m, r, c).1) as u8));
    let mut row_corr = vec![0.0f32; padded_n(m.n)];
    let groups = m.k / m.group;
    for (r, corr) in row_corr.iter_mut().enumerate().take(m.n) {
        let mut acc = 0.0f64;
        for gi in 0..groups {
            let (s, z) = group_params(m, r, gi * m.group);
            let sum: i64 = m.q[r * m.k + gi * m.group..][..m.group].iter().map(|&q| i64::from(q) - i64::from(z)).sum();
            acc += f64::from(s) * sum as f64;
        }
        *corr = acc as f32;
    }
    Ok(HostW4A8 { n: m.n, k: m.k, qweight: pack_tiles(m, nibble_w4a8, RowOrder::Plain), scales, zeros, row_corr })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random-ish matrix with every int4 value, and scales / zeros that differ per group.
    fn matrix(n: usize, k: usize, group: usize, zeros: bool) -> QuantMatrix {
        let q: Vec<i8> = (0..n * k).map(|i| ((i * 7 + i / 13) % 16) as i8 - 8).collect();
        let g = n * (k / group);
        let scales: Vec<f32> = (0..g).map(|i| bf16::from_f32(0.01 * (1 + i % 5) as f32).to_f32()).collect();
        let zeros = zeros.then(|| (0..g).map(|i| (i % 16) as i8 - 8).collect());
        QuantMatrix { n, k, group, q, scales, zeros }
    }

    /// The inverse of the layout, written from the lane's point of view (kernels/quant/common.cuh): the value of
    /// (row, col) is in tile (row / 16, col / 64), lane 4 g + t with g = row % 8, t = (col % 32) / 8, word
    /// (row % 16 >= 8) + 2 ((col % 64) >= 32), nibble of i = col % 8.
    fn unpack(tiles: &[u8], n: usize, k: usize, nibble: fn(usize) -> usize) -> Vec<i8> {
        let kc = k / 64;
        let mut q = vec![0i8; n * k];
        for row in 0..n {
            for col in 0..k {
                let tile = (row / 16) * kc + col / 64;
                let lane = 4 * (row % 8) + (col % 32) / 8;
                let word = usize::from(row % 16 >= 8) + 2 * usize::from(col % 64 >= 32);
                let at = tile * 512 + lane * 16 + word * 4;
                let w = u32::from_le_bytes(tiles[at..at + 4].try_into().unwrap());
                let nib = (w >> (4 * nibble(col % 8))) & 0xF;
                q[row * k + col] = ((nib as i8) << 4) >> 4;
            }
        }
        q
    }

    /// The exact dot product of group `jg` of row `r` of `m` (minus its zero point) with token `tok` of the `[8, k]`
    /// activations `x`.
    fn group_dot(m: &QuantMatrix, x: &[i32], jg: usize, r: usize, tok: usize) -> i64 {
        let (k, groups) = (m.k, m.k / m.group);
        let z = m.zeros.as_ref().map_or(0, |z| i64::from(z[r * groups + jg]));
        (jg * 32..(jg + 1) * 32).map(|c| (i64::from(m.q[r * k + c]) - z) * i64::from(x[tok * k + c])).sum()
    }

    /// Emulates, on the host, one warp of the kernels on one tile: each lane builds its MMA fragments from the
    /// packed words with the kernels' bit operations, the fragments are placed into the A / B matrices where the
    /// PTX fragment layout says they go, and D = A B must equal the group's dot products computed directly. This
    /// checks the layout, the nibble orders, the dequantization bit tricks and the B-fragment column mapping of
    /// both kernels without a GPU.
    #[test]
    #[allow(clippy::needless_range_loop)] // fragment coordinates read clearer as indices
    fn emulated_mma_fragments_compute_the_group_dot_products() {
        let (n, k) = (16, 64);
        for zeros in [false, true] {
            let m = matrix(n, k, 32, zeros);
            let zero = |r: usize, grp: usize| m.zeros.as_ref().map_or(0i32, |z| i32::from(z[r * 2 + grp]));
            // Activations: 8 tokens; bf16-exact small integers for W4A16, int8 for W4A8.
            let x: Vec<i32> = (0..8 * k).map(|i| ((i * 37 + 11) % 255) as i32 - 127).collect();
            let h = layout_w4a16(&m).unwrap();
            let e = layout_w4a8(&m).unwrap();
            for jg in 0..2 {
                let want = |r: usize, tok: usize| group_dot(&m, &x, jg, r, tok);
                // W4A16: two m16n8k16 MMAs per group into one accumulator.
                let mut d = [[0f64; 8]; 16];
                for mma in 0..2 {
                    let (mut a, mut b) = ([[0f64; 16]; 16], [[0f64; 8]; 16]);
                    for lane in 0..32 {
                        let (g, t) = (lane / 4, lane % 4);
                        let word =
                            |wi: usize| u32::from_le_bytes(h.qweight[lane * 16 + wi * 4..][..4].try_into().unwrap());
                        let (wa, wb) = (word(2 * jg), word(2 * jg + 1));
                        let bias = |r: usize| 136.0 + zero(r, jg) as f64;
                        let deq = |w: u32, s: u32, r: usize| {
                            let v = ((w >> s) & 0x000F_000F) ^ 0x4308_4308;
                            let lo = f32::from_bits((v & 0xFFFF) << 16) as f64 - bias(r);
                            let hi = f32::from_bits(v & 0xFFFF_0000) as f64 - bias(r);
                            (lo, hi)
                        };
                        let s0 = 8 * mma as u32;
                        let regs = [deq(wa, s0, g), deq(wb, s0, g + 8), deq(wa, s0 + 4, g), deq(wb, s0 + 4, g + 8)];
                        // a0: A[g][2t..], a1: A[g+8][2t..], a2: A[g][2t+8..], a3: A[g+8][2t+8..].
                        for (ri, (row, col)) in
                            [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)].into_iter().enumerate()
                        {
                            a[row][col] = regs[ri].0;
                            a[row][col + 1] = regs[ri].1;
                        }
                        // xb = x[token g][32 jg + 8t .. + 8]; MMA0 b0 = (0, 1), b1 = (2, 3); MMA1 b0 = (4, 5), b1 = (6, 7).
                        let xb = |i: usize| x[g * k + jg * 32 + 8 * t + i] as f64;
                        let base = 4 * mma;
                        b[2 * t][g] = xb(base);
                        b[2 * t + 1][g] = xb(base + 1);
                        b[2 * t + 8][g] = xb(base + 2);
                        b[2 * t + 9][g] = xb(base + 3);
                    }
                    for (r, dr) in d.iter_mut().enumerate() {
                        for (tok, v) in dr.iter_mut().enumerate() {
                            *v += (0..16).map(|s| a[r][s] * b[s][tok]).sum::<f64>();
                        }
                    }
                }
                for (r, dr) in d.iter().enumerate() {
                    for (tok, &v) in dr.iter().enumerate() {
                        assert_eq!(v as i64, want(r, tok), "w4a16 zeros {zeros} group {jg} row {r} token {tok}");
                    }
                }
                // W4A8: one m16n8k32 s8 MMA per group.
                let (mut a, mut b) = ([[0i64; 32]; 16], [[0i64; 8]; 32]);
                for lane in 0..32 {
                    let (g, t) = (lane / 4, lane % 4);
                    let word = |wi: usize| u32::from_le_bytes(e.qweight[lane * 16 + wi * 4..][..4].try_into().unwrap());
                    let (wa, wb) = (word(2 * jg), word(2 * jg + 1));
                    let expand = |w: u32, r: usize| -> (u32, u32) {
                        if zeros {
                            let c4 = (8 + zero(r, jg)) as u32 * 0x0101_0101;
                            let lo = (((w & 0x0F0F_0F0F) ^ 0x8888_8888).wrapping_sub(c4)) ^ 0x8080_8080;
                            let hi = ((((w >> 4) & 0x0F0F_0F0F) ^ 0x8888_8888).wrapping_sub(c4)) ^ 0x8080_8080;
                            (lo, hi)
                        } else {
                            ((w << 4) & 0xF0F0_F0F0, w & 0xF0F0_F0F0)
                        }
                    };
                    let ((a0, a2), (a1, a3)) = (expand(wa, g), expand(wb, g + 8));
                    let byte = |v: u32, j: usize| i64::from((v >> (8 * j)) as u8 as i8);
                    for j in 0..4 {
                        a[g][4 * t + j] = byte(a0, j);
                        a[g + 8][4 * t + j] = byte(a1, j);
                        a[g][4 * t + 16 + j] = byte(a2, j);
                        a[g + 8][4 * t + 16 + j] = byte(a3, j);
                        // The 8-byte load of x[token g][32 jg + 8t ..]: b0 = bytes 0..4, b1 = bytes 4..8.
                        b[4 * t + j][g] = i64::from(x[g * k + jg * 32 + 8 * t + j]);
                        b[4 * t + 16 + j][g] = i64::from(x[g * k + jg * 32 + 8 * t + 4 + j]);
                    }
                }
                let unit = if zeros { 1 } else { 16 };
                for r in 0..16 {
                    for tok in 0..8 {
                        let v: i64 = (0..32).map(|s| a[r][s] * b[s][tok]).sum();
                        assert_eq!(v, unit * want(r, tok), "w4a8 zeros {zeros} group {jg} row {r} token {tok}");
                    }
                }
            }
        }
    }

    /// The wgmma-row kernels (`kRow` in kernels/quant/w4a8_sm90.cu and w4a16_sm90.cu), emulated like the test above:
    /// each lane composes its A fragments from the words of its quad's lanes with the kernels' bit operations, the
    /// B operand holds the activations in natural k order (slot s is column s), and D = A B must equal the group's
    /// dot products. This checks the A-side permutation of both kernels without a GPU.
    #[test]
    #[allow(clippy::needless_range_loop)] // fragment coordinates read clearer as indices
    fn emulated_row_fragments_take_natural_k_order() {
        let (n, k) = (16, 64);
        for zeros in [false, true] {
            let m = matrix(n, k, 32, zeros);
            let zero = |r: usize, grp: usize| m.zeros.as_ref().map_or(0i32, |z| i32::from(z[r * 2 + grp]));
            let x: Vec<i32> = (0..8 * k).map(|i| ((i * 53 + 7) % 255) as i32 - 127).collect();
            let h = layout_w4a16(&m).unwrap();
            let e = layout_w4a8(&m).unwrap();
            // The word `wi` (0: row g group 0, 1: row g + 8 group 0, 2 / 3: group 1) of lane `lane`.
            let word = |tiles: &[u8], lane: usize, wi: usize| {
                u32::from_le_bytes(tiles[lane * 16 + wi * 4..][..4].try_into().unwrap())
            };
            for jg in 0..2 {
                let want = |r: usize, tok: usize| group_dot(&m, &x, jg, r, tok);
                // W4A16: k16 steps st = 0, 1 of the group; registers r (rows g / g + 8) from quad lane 2 st,
                // registers r + 2 from quad lane 2 st + 1, pair t of each (shift 4 t).
                let mut d = [[0f64; 8]; 16];
                for st in 0..2 {
                    let (mut a, mut b) = ([[0f64; 16]; 16], [[0f64; 8]; 16]);
                    for lane in 0..32 {
                        let (g, t) = (lane / 4, lane % 4);
                        let deq = |w: u32, row: usize| {
                            let v = ((w >> (4 * t)) & 0x000F_000F) ^ 0x4308_4308;
                            let bias = 136.0 + zero(row, jg) as f64;
                            (
                                f32::from_bits((v & 0xFFFF) << 16) as f64 - bias,
                                f32::from_bits(v & 0xFFFF_0000) as f64 - bias,
                            )
                        };
                        for (r, row) in [(0, g), (1, g + 8)] {
                            for (half, u) in [(0, 2 * st), (1, 2 * st + 1)] {
                                let (lo, hi) = deq(word(&h.qweight, 4 * g + u, 2 * jg + r), row);
                                // Register r + 2 half: A[row][2t + 8 half ..].
                                a[row][2 * t + 8 * half] = lo;
                                a[row][2 * t + 8 * half + 1] = hi;
                            }
                        }
                    }
                    for s in 0..16 {
                        for tok in 0..8 {
                            b[s][tok] = x[tok * k + jg * 32 + 16 * st + s] as f64;
                        }
                    }
                    for (r, dr) in d.iter_mut().enumerate() {
                        for (tok, v) in dr.iter_mut().enumerate() {
                            *v += (0..16).map(|s| a[r][s] * b[s][tok]).sum::<f64>();
                        }
                    }
                }
                for (r, dr) in d.iter().enumerate() {
                    for (tok, &v) in dr.iter().enumerate() {
                        assert_eq!(v as i64, want(r, tok), "w4a16 row zeros {zeros} group {jg} row {r} token {tok}");
                    }
                }
                // W4A8 (symmetric weights only): slots 4t.. from quad lane t / 2, slots 16 + 4t.. from quad lane
                // 2 + t / 2; low nibbles (shift 4) for even t, high nibbles for odd t.
                if zeros {
                    continue;
                }
                let (mut a, mut b) = ([[0i64; 32]; 16], [[0i64; 8]; 32]);
                for lane in 0..32 {
                    let (g, t) = (lane / 4, lane % 4);
                    let sh = if t % 2 == 1 { 0 } else { 4 };
                    let frag = |u: usize, wi: usize| (word(&e.qweight, 4 * g + u, wi) << sh) & 0xF0F0_F0F0;
                    let (lo_q, hi_q) = (t / 2, 2 + t / 2);
                    let regs = [frag(lo_q, 2 * jg), frag(lo_q, 2 * jg + 1), frag(hi_q, 2 * jg), frag(hi_q, 2 * jg + 1)];
                    let byte = |v: u32, j: usize| i64::from((v >> (8 * j)) as u8 as i8);
                    for j in 0..4 {
                        a[g][4 * t + j] = byte(regs[0], j);
                        a[g + 8][4 * t + j] = byte(regs[1], j);
                        a[g][16 + 4 * t + j] = byte(regs[2], j);
                        a[g + 8][16 + 4 * t + j] = byte(regs[3], j);
                    }
                }
                for s in 0..32 {
                    for tok in 0..8 {
                        b[s][tok] = i64::from(x[tok * k + jg * 32 + s]);
                    }
                }
                for r in 0..16 {
                    for tok in 0..8 {
                        let v: i64 = (0..32).map(|s| a[r][s] * b[s][tok]).sum();
                        assert_eq!(v, 16 * want(r, tok), "w4a8 row group {jg} row {r} token {tok}");
                    }
                }
            }
        }
    }

    #[test]
    fn nibble_orders_are_permutations() {
        for f in [nibble_w4a16 as fn(usize) -> usize, nibble_w4a8] {
            let mut seen: Vec<usize> = (0..8).map(f).collect();
            seen.sort();
            assert_eq!(seen, (0..8).collect::<Vec<_>>());
        }
        // W4A16: columns (0, 1) in nibbles (0, 4), the halves of one bf16x2 register.
        assert_eq!((0..8).map(nibble_w4a16).collect::<Vec<_>>(), [0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!((0..8).map(nibble_w4a8).collect::<Vec<_>>(), [0, 2, 4, 6, 1, 3, 5, 7]);
    }

    #[test]
    fn tiles_round_trip_every_value() {
        for (n, k) in [(16, 64), (17, 128), (33, 192), (5, 64)] {
            let m = matrix(n, k, 32, false);
            let a = layout_w4a16(&m).unwrap();
            assert_eq!(a.qweight.len(), padded_n(n) / 16 * k / 64 * 512);
            assert_eq!(unpack(&a.qweight, n, k, nibble_w4a16), m.q, "w4a16 {n}x{k}");
            let b = layout_w4a8(&m).unwrap();
            assert_eq!(unpack(&b.qweight, n, k, nibble_w4a8), m.q, "w4a8 {n}x{k}");
        }
    }

    /// `m` with its rows in the paired order: row `r` of the result is row `RowOrder::Paired.matrix_row(r)` of `m`.
    fn paired_rows(m: &QuantMatrix) -> QuantMatrix {
        let order = RowOrder::Paired { half: m.n / 2 };
        let g = m.k / m.group;
        let mut out =
            QuantMatrix { q: Vec::new(), scales: Vec::new(), zeros: m.zeros.as_ref().map(|_| Vec::new()), ..*m };
        for r in 0..m.n {
            let src = order.matrix_row(r);
            out.q.extend_from_slice(&m.q[src * m.k..][..m.k]);
            out.scales.extend_from_slice(&m.scales[src * g..][..g]);
            if let (Some(o), Some(z)) = (out.zeros.as_mut(), m.zeros.as_ref()) {
                o.extend_from_slice(&z[src * g..][..g]);
            }
        }
        out
    }

    #[test]
    fn paired_layout_is_the_plain_layout_of_the_paired_rows() {
        for (n, k, zeros) in [(16, 64, false), (32, 128, true), (48, 64, false), (64, 192, true)] {
            let m = matrix(n, k, 32, zeros);
            let paired = layout_w4a16_paired(&m).unwrap();
            assert_eq!(paired, layout_w4a16(&paired_rows(&m)).unwrap(), "{n}x{k} zeros {zeros}");
            // Every matrix row appears once, gate j and up j in one tile at rows r and r + 8.
            let order = RowOrder::Paired { half: n / 2 };
            let mut seen: Vec<usize> = (0..n).map(|r| order.matrix_row(r)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
            for r in (0..n).filter(|r| r % 16 < 8) {
                assert_eq!(order.matrix_row(r + 8), n / 2 + order.matrix_row(r), "pair of layout row {r}");
            }
        }
        assert_eq!(RowOrder::Paired { half: 16 }.matrix_row(17), 9);
        assert_eq!(RowOrder::Paired { half: 16 }.matrix_row(24), 24);
        let err = layout_w4a16_paired(&matrix(24, 64, 32, false)).unwrap_err().to_string();
        assert!(err.contains("pairing"), "{err}");
    }

    #[test]
    fn scale_entries_follow_the_lane_order() {
        let (n, k) = (20, 128);
        let m = matrix(n, k, 32, true);
        let a = layout_w4a16(&m).unwrap();
        let b = layout_w4a8(&m).unwrap();
        let kc = k / 64;
        for row in 0..padded_n(n) {
            for grp in 0..k / 32 {
                // Entry (tile, g), value e = 2 (row % 16 >= 8) + (group % 2).
                let idx = (((row / 16) * kc + grp / 2) * 8 + row % 8) * 4 + 2 * usize::from(row % 16 >= 8) + grp % 2;
                let (s, z) = if row < n {
                    (m.scales[row * (k / 32) + grp], m.zeros.as_ref().unwrap()[row * (k / 32) + grp])
                } else {
                    (0.0, 0)
                };
                assert_eq!(a.scales[idx].to_f32(), s, "row {row} group {grp}");
                assert_eq!(a.zeros.as_ref().unwrap()[idx].to_f32(), 136.0 + z as f32);
                assert_eq!(b.scales[idx], s, "zero points: the W4A8 scale is not divided by 16");
                assert_eq!(b.zeros.as_ref().unwrap()[idx], (8 + z) as u8);
            }
        }
        let sym = layout_w4a8(&matrix(n, k, 32, false)).unwrap();
        assert_eq!(sym.scales[0], m.scales[0] / 16.0);
        assert!(sym.zeros.is_none());
    }

    #[test]
    fn row_constants_sum_scaled_group_sums() {
        let (n, k) = (3, 128);
        let m = matrix(n, k, 64, true);
        let b = layout_w4a8(&m).unwrap();
        for r in 0..n {
            let mut want = 0.0f64;
            for c in 0..k {
                let gi = r * 2 + c / 64;
                want += m.scales[gi] as f64 * (m.q[r * k + c] as f64 - m.zeros.as_ref().unwrap()[gi] as f64);
            }
            assert!((b.row_corr[r] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "row {r}");
        }
        assert_eq!(b.row_corr[n..], vec![0.0; padded_n(n) - n]);
    }

    #[test]
    fn groups_of_64_become_pairs_of_32() {
        let m = matrix(16, 128, 64, false);
        let a = layout_w4a16(&m).unwrap();
        // Row 0: groups 0, 1 of the 64-group matrix -> 32-groups 0, 1 (= scale 0) and 2, 3 (= scale 1).
        assert_eq!(a.scales[0].to_f32(), m.scales[0]);
        assert_eq!(a.scales[1].to_f32(), m.scales[0]);
        assert_eq!(a.scales[32].to_f32(), m.scales[1]);
    }

    #[test]
    fn rejects_what_the_kernels_cannot_take() {
        let mut m = matrix(4, 96, 32, false);
        assert!(layout_w4a16(&m).unwrap_err().to_string().contains("multiple of 64"));
        m = matrix(4, 128, 16, false);
        assert!(layout_w4a8(&m).unwrap_err().to_string().contains("group"));
        m = matrix(4, 128, 32, false);
        m.q[5] = 9;
        assert!(layout_w4a16(&m).unwrap_err().to_string().contains("q[5]"));
        m = matrix(4, 128, 32, false);
        m.scales.pop();
        assert!(layout_w4a16(&m).unwrap_err().to_string().contains("scales"));
        assert!(supports(2048, 32) && supports(8192, 128) && !supports(2048, 48) && !supports(2080, 32));
    }
}
