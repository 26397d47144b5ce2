//! Unpacking the common Hugging Face int4 checkpoint formats into [`QuantMatrix`] (weight-only, group 32 or
//! 128). In every format a packed 32-bit word holds eight unsigned 4-bit values `u` in `[0, 15]`, nibble `i` at
//! bits `4i..4i+4`; this module returns `q = u - 8` and `zero = z - 8`, so that `w = scale * (q - zero)` equals
//! each format's own `scale * (u - z)`.
//!
//! - **GPTQ** (AutoGPTQ `qlinear_cuda_old.QuantLinear.pack`, GPTQModel): `qweight I32 [k/8, n]`, nibble `i` of
//!   `qweight[p, c]` is input row `8p + i` of column `c`; `qzeros I32 [k/g, n/8]`, nibble `i` of `qzeros[g, p]`
//!   is output column `8p + i`; `scales [k/g, n]`; `g_idx I32 [k]`. With `checkpoint_format: "gptq"` (v1, the
//!   AutoGPTQ default) the packer stores `zero - 1` and every kernel adds the 1 back, so we read `z = stored + 1`
//!   (`zero` can then be 8, i.e. `z = 16`); with `gptq_v2` (GPTQModel) `z = stored`. Symmetric v1 checkpoints
//!   store 7 (zero point 8). An act-order `g_idx` that is not `c / group` is refused.
//! - **AWQ GEMM** (AutoAWQ `WQLinear_GEMM.from_linear`): `qweight I32 [k, n/8]` and `qzeros I32 [k/g, n/8]`
//!   packed along the output dimension in AWQ's interleaved order: nibble `i` of word `p` holds output column
//!   `8p + [0, 2, 4, 6, 1, 3, 5, 7][i]`; zero points are stored as they are; `scales [k/g, n]`.
//! - **compressed-tensors `pack-quantized`** (`compressed_tensors/compressors/quantized_compressors/
//!   pack_quantized.py`, `pack_to_int32`): the signed values are shifted by 8 and packed along the input
//!   dimension, `weight_packed I32 [n, ceil(k/8)]` with nibble `i` of word `p` holding column `8p + i`;
//!   `weight_scale [n, k/g]`; asymmetric zero points (signed, `[-8, 7]`) packed the same way along the *output*
//!   dimension (`weight_zero_point I32 [ceil(n/8), k/g]`, `packed_dim=0`) or, in older files, unpacked
//!   `[n, k/g]`; `weight_shape [2] = [n, k]`.

use super::format::tensor;
use super::QuantMatrix;
use crate::weights::{Checkpoint, DType, TensorView};
use crate::{Error, Result};

/// AWQ's packing order: nibble `i` of a word holds column `8p + AWQ_ORDER[i]`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

const FLOATS: &[DType] = &[DType::F16, DType::BF16, DType::F32];

fn nibble(word: i32, i: usize) -> i8 {
    ((word as u32 >> (4 * i)) & 0xF) as i8
}

fn i32s(v: &TensorView<'_>) -> Vec<i32> {
    v.bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// `[rows, cols]` -> `[cols, rows]`.
fn transpose<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

fn none_if_zero(z: Vec<i8>) -> Option<Vec<i8>> {
    if z.iter().all(|&v| v == 0) {
        None
    } else {
        Some(z)
    }
}

fn check_dims(what: &str, n: usize, k: usize, group: usize, n_mult: usize, k_mult: usize) -> Result<()> {
    if group == 0 || !k.is_multiple_of(group) || !n.is_multiple_of(n_mult) || !k.is_multiple_of(k_mult) {
        return Err(Error::request(format!(
            "{what}: a [{n}, {k}] matrix in groups of {group} cannot be stored in this format (n must be a multiple \
             of {n_mult}, k of {k_mult} and of the group)"
        )));
    }
    Ok(())
}

/// Unpacks GPTQ tensors (see the module doc): `qweight [k/8, n]`, `qzeros [k/g, n/8]` (absent: symmetric),
/// `scales [k/g, n]` as f32. `v2` selects GPTQModel's zero-point convention (no off-by-one).
pub fn unpack_gptq(
    qweight: &[i32],
    qzeros: Option<&[i32]>,
    scales: &[f32],
    n: usize,
    k: usize,
    group: usize,
    v2: bool,
) -> Result<QuantMatrix> {
    check_dims("GPTQ", n, k, group, 8, 8)?;
    let groups = k / group;
    if qweight.len() != k / 8 * n || scales.len() != groups * n || qzeros.is_some_and(|z| z.len() != groups * n / 8) {
        return Err(Error::request(format!(
            "GPTQ: tensor sizes do not match a [{n}, {k}] matrix in groups of {group}"
        )));
    }
    let mut q = vec![0i8; n * k];
    for p in 0..k / 8 {
        for c in 0..n {
            let word = qweight[p * n + c];
            for i in 0..8 {
                q[c * k + 8 * p + i] = nibble(word, i) - 8;
            }
        }
    }
    let zeros = match qzeros {
        None => None,
        Some(qz) => {
            let mut z = vec![0i8; n * groups];
            for g in 0..groups {
                for p in 0..n / 8 {
                    let word = qz[g * (n / 8) + p];
                    for i in 0..8 {
                        let stored = nibble(word, i);
                        z[(8 * p + i) * groups + g] = stored + if v2 { 0 } else { 1 } - 8;
                    }
                }
            }
            none_if_zero(z)
        }
    };
    Ok(QuantMatrix { n, k, group, q, scales: transpose(scales, groups, n), zeros })
}

/// Unpacks AutoAWQ GEMM tensors (see the module doc): `qweight [k, n/8]`, `qzeros [k/g, n/8]`, `scales [k/g, n]`.
pub fn unpack_awq(
    qweight: &[i32],
    qzeros: &[i32],
    scales: &[f32],
    n: usize,
    k: usize,
    group: usize,
) -> Result<QuantMatrix> {
    check_dims("AWQ", n, k, group, 8, 1)?;
    let groups = k / group;
    if qweight.len() != k * n / 8 || qzeros.len() != groups * n / 8 || scales.len() != groups * n {
        return Err(Error::request(format!("AWQ: tensor sizes do not match a [{n}, {k}] matrix in groups of {group}")));
    }
    let mut q = vec![0i8; n * k];
    for r in 0..k {
        for p in 0..n / 8 {
            let word = qweight[r * (n / 8) + p];
            for (i, &o) in AWQ_ORDER.iter().enumerate() {
                q[(8 * p + o) * k + r] = nibble(word, i) - 8;
            }
        }
    }
    let mut z = vec![0i8; n * groups];
    for g in 0..groups {
        for p in 0..n / 8 {
            let word = qzeros[g * (n / 8) + p];
            for (i, &o) in AWQ_ORDER.iter().enumerate() {
                z[(8 * p + o) * groups + g] = nibble(word, i) - 8;
            }
        }
    }
    Ok(QuantMatrix { n, k, group, q, scales: transpose(scales, groups, n), zeros: none_if_zero(z) })
}

/// Zero points of a compressed-tensors checkpoint.
#[derive(Clone, Copy, Debug)]
pub enum CtZeros<'a> {
    /// `pack_to_int32(.., packed_dim=0)`: `[ceil(n/8), k/g]`.
    Packed(&'a [i32]),
    /// Signed values `[n, k/g]`.
    Unpacked(&'a [i8]),
}

/// Unpacks compressed-tensors `pack-quantized` tensors (see the module doc): `weight_packed [n, ceil(k/8)]`,
/// `weight_scale [n, k/g]`, optional zero points.
pub fn unpack_compressed(
    packed: &[i32],
    zeros: Option<CtZeros<'_>>,
    scales: &[f32],
    n: usize,
    k: usize,
    group: usize,
) -> Result<QuantMatrix> {
    check_dims("compressed-tensors", n, k, group, 1, 1)?;
    let groups = k / group;
    let kw = k.div_ceil(8);
    if packed.len() != n * kw || scales.len() != n * groups {
        return Err(Error::request(format!(
            "compressed-tensors: tensor sizes do not match a [{n}, {k}] matrix in groups of {group}"
        )));
    }
    let mut q = vec![0i8; n * k];
    for r in 0..n {
        for c in 0..k {
            q[r * k + c] = nibble(packed[r * kw + c / 8], c % 8) - 8;
        }
    }
    let zeros = match zeros {
        None => None,
        Some(CtZeros::Unpacked(z)) => {
            if z.len() != n * groups {
                return Err(Error::request("compressed-tensors: zero points do not match the scales".to_string()));
            }
            none_if_zero(z.to_vec())
        }
        Some(CtZeros::Packed(zp)) => {
            if zp.len() != n.div_ceil(8) * groups {
                return Err(Error::request(
                    "compressed-tensors: packed zero points do not match the scales".to_string(),
                ));
            }
            let mut z = vec![0i8; n * groups];
            for r in 0..n {
                for g in 0..groups {
                    z[r * groups + g] = nibble(zp[(r / 8) * groups + g], r % 8) - 8;
                }
            }
            none_if_zero(z)
        }
    };
    Ok(QuantMatrix { n, k, group, q, scales: scales.to_vec(), zeros })
}

/// Refuses a `g_idx` that is not the trivial `c / group` (act-order permutations are not supported).
fn check_g_idx(ckpt: &Checkpoint, name: &str, k: usize, group: usize, desc_act: bool) -> Result<()> {
    let Some((_, path)) = ckpt.get(name) else { return Ok(()) };
    let (view, _) = tensor(ckpt, name, &[DType::I32, DType::I64], &[k], "group index")?;
    let vals: Vec<i64> = match view.dtype {
        DType::I64 => view.bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(),
        _ => i32s(&view).into_iter().map(i64::from).collect(),
    };
    if let Some(c) = (0..k).find(|&c| vals[c] != (c / group) as i64) {
        return Err(Error::weights(
            path,
            format!(
                "tensor `{name}`: g_idx[{c}] = {} is not {} (act-order{} with a permuted g_idx is not supported)",
                vals[c],
                c / group,
                if desc_act { ", desc_act" } else { "" }
            ),
        ));
    }
    Ok(())
}

/// Reads a GPTQ projection `prefix` of an `[n, k]` weight.
#[allow(clippy::too_many_arguments)]
pub fn read_gptq(
    ckpt: &Checkpoint,
    prefix: &str,
    n: usize,
    k: usize,
    group: usize,
    sym: bool,
    v2: bool,
    desc_act: bool,
) -> Result<QuantMatrix> {
    check_dims(prefix, n, k, group, 8, 8).map_err(|e| Error::weights(ckpt.dir(), e.to_string()))?;
    let why = "GPTQ layout";
    let (qw, path) = tensor(ckpt, &format!("{prefix}.qweight"), &[DType::I32], &[k / 8, n], why)?;
    let zname = format!("{prefix}.qzeros");
    let qz = if sym && ckpt.get(&zname).is_none() {
        None
    } else {
        Some(i32s(&tensor(ckpt, &zname, &[DType::I32], &[k / group, n / 8], why)?.0))
    };
    let (sc, _) = tensor(ckpt, &format!("{prefix}.scales"), FLOATS, &[k / group, n], why)?;
    check_g_idx(ckpt, &format!("{prefix}.g_idx"), k, group, desc_act)?;
    unpack_gptq(&i32s(&qw), qz.as_deref(), &sc.to_f32(), n, k, group, v2)
        .map_err(|e| Error::weights(path, e.to_string()))
}

/// Reads an AutoAWQ GEMM projection `prefix` of an `[n, k]` weight.
pub fn read_awq(ckpt: &Checkpoint, prefix: &str, n: usize, k: usize, group: usize) -> Result<QuantMatrix> {
    check_dims(prefix, n, k, group, 8, 1).map_err(|e| Error::weights(ckpt.dir(), e.to_string()))?;
    let why = "AWQ GEMM layout";
    let (qw, path) = tensor(ckpt, &format!("{prefix}.qweight"), &[DType::I32], &[k, n / 8], why)?;
    let (qz, _) = tensor(ckpt, &format!("{prefix}.qzeros"), &[DType::I32], &[k / group, n / 8], why)?;
    let (sc, _) = tensor(ckpt, &format!("{prefix}.scales"), FLOATS, &[k / group, n], why)?;
    unpack_awq(&i32s(&qw), &i32s(&qz), &sc.to_f32(), n, k, group).map_err(|e| Error::weights(path, e.to_string()))
}

/// Reads a compressed-tensors `pack-quantized` projection `prefix` of an `[n, k]` weight.
pub fn read_compressed(
    ckpt: &Checkpoint,
    prefix: &str,
    n: usize,
    k: usize,
    group: usize,
    symmetric: bool,
) -> Result<QuantMatrix> {
    let why = "compressed-tensors pack-quantized layout";
    let (qw, path) = tensor(ckpt, &format!("{prefix}.weight_packed"), &[DType::I32], &[n, k.div_ceil(8)], why)?;
    let (sc, _) = tensor(ckpt, &format!("{prefix}.weight_scale"), FLOATS, &[n, k / group], why)?;
    let shape_name = format!("{prefix}.weight_shape");
    if let Some((sv, spath)) = ckpt.get(&shape_name) {
        let dims: Vec<i64> = match sv.dtype {
            DType::I64 => {
                sv.bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
            }
            DType::I32 => i32s(&sv).into_iter().map(i64::from).collect(),
            d => {
                return Err(Error::weights(
                    spath,
                    format!("tensor `{shape_name}`: dtype {}, expected I32 or I64", d.name()),
                ))
            }
        };
        if dims != [n as i64, k as i64] {
            return Err(Error::weights(spath, format!("tensor `{shape_name}` is {dims:?}, expected [{n}, {k}]")));
        }
    }
    check_g_idx(ckpt, &format!("{prefix}.weight_g_idx"), k, group, false)?;
    let zname = format!("{prefix}.weight_zero_point");
    let packed_z;
    let unpacked_z: Vec<i8>;
    let zeros = match ckpt.get(&zname) {
        None if symmetric => None,
        None => return Err(Error::weights(ckpt.dir(), format!("missing tensor `{zname}` (asymmetric {why})"))),
        Some((zv, zpath)) => match (zv.dtype, zv.shape) {
            (DType::I32, s) if s == [n.div_ceil(8), k / group] => {
                packed_z = i32s(&zv);
                Some(CtZeros::Packed(&packed_z))
            }
            (DType::I8 | DType::I32, s) if s == [n, k / group] => {
                let values: Vec<i32> = match zv.dtype {
                    DType::I8 => zv.bytes.iter().map(|&b| i32::from(b as i8)).collect(),
                    _ => i32s(&zv),
                };
                // An unpacked zero point is an int4 value; outside [-8, 7] the file is not what it claims.
                if let Some(i) = values.iter().position(|v| !(-8..=7).contains(v)) {
                    return Err(Error::weights(
                        zpath,
                        format!(
                            "tensor `{zname}`: zero point {} at [{}, {}] is outside int4's [-8, 7]",
                            values[i],
                            i / (k / group),
                            i % (k / group)
                        ),
                    ));
                }
                unpacked_z = values.into_iter().map(|v| v as i8).collect();
                Some(CtZeros::Unpacked(&unpacked_z))
            }
            (d, s) => {
                return Err(Error::weights(
                    zpath,
                    format!(
                        "tensor `{zname}`: {} {s:?}, expected I32 [{}, {}] (packed) or I8 [{n}, {}]",
                        d.name(),
                        n.div_ceil(8),
                        k / group,
                        k / group
                    ),
                ))
            }
        },
    };
    unpack_compressed(&i32s(&qw), zeros, &sc.to_f32(), n, k, group).map_err(|e| Error::weights(path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack8(u: &[u32]) -> i32 {
        u.iter().enumerate().fold(0u32, |w, (i, &v)| w | (v << (4 * i))) as i32
    }

    #[test]
    fn gptq_v1_zero_offset() {
        // n = 8, k = 8, group 8: column c has all values u = c, zero point stored 3 (v1: z = 4).
        let qweight: Vec<i32> = (0..8).map(|c| pack8(&[c; 8])).collect();
        let qzeros = vec![pack8(&[3; 8])];
        let m = unpack_gptq(&qweight, Some(&qzeros), &[0.5; 8], 8, 8, 8, false).unwrap();
        assert_eq!(m.q[3 * 8 + 5], 3 - 8);
        assert_eq!(m.zeros.as_ref().unwrap()[0], 4 - 8);
        assert_eq!(m.dequantize()[8 * 7], 0.5 * (7.0 - 4.0));
        let v2 = unpack_gptq(&qweight, Some(&qzeros), &[0.5; 8], 8, 8, 8, true).unwrap();
        assert_eq!(v2.zeros.unwrap()[0], 3 - 8);
    }

    #[test]
    fn awq_order() {
        // One row, n = 8: nibble i holds column AWQ_ORDER[i]; put value = column index.
        let mut u = [0u32; 8];
        for (i, &o) in AWQ_ORDER.iter().enumerate() {
            u[i] = o as u32;
        }
        let m = unpack_awq(&[pack8(&u)], &[pack8(&[8; 8])], &[1.0; 8], 8, 1, 1).unwrap();
        let q: Vec<i8> = m.q.clone();
        assert_eq!(q, (0..8).map(|c| c - 8).collect::<Vec<i8>>());
        assert!(m.zeros.is_none());
    }
}
