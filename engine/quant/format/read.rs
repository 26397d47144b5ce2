//! Reading quantized checkpoints: a quantized projection as a [`QuantLinear`] (this engine's layout or a Hugging
//! Face int4 format), int4 nibble packing, and embedding / `lm_head` tables (plain or int8) as f32.

use std::path::Path;

use super::{QuantFormat, QuantizationConfig};
use crate::quant::{hf, Int8Table, QuantLinear, QuantMatrix};
use crate::weights::{Checkpoint, DType, TensorView};
use crate::{Error, Result};

/// A tensor of `ckpt`, checked for dtype and shape; errors name the tensor, the file and what was expected.
pub(crate) fn tensor<'a>(
    ckpt: &'a Checkpoint,
    name: &str,
    dtypes: &[DType],
    shape: &[usize],
    why: &str,
) -> Result<(TensorView<'a>, &'a Path)> {
    let (view, path) =
        ckpt.get(name).ok_or_else(|| Error::weights(ckpt.dir(), format!("missing tensor `{name}` ({why})")))?;
    if !dtypes.contains(&view.dtype) {
        let want: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
        return Err(Error::weights(
            path,
            format!("tensor `{name}`: dtype {}, expected {} ({why})", view.dtype.name(), want.join(" or ")),
        ));
    }
    if view.shape != shape {
        return Err(Error::weights(
            path,
            format!("tensor `{name}`: shape {:?}, expected {shape:?} ({why})", view.shape),
        ));
    }
    Ok((view, path))
}

/// Reads the quantized projection `prefix` (e.g. `model.layers.0.self_attn.q_proj`; a trailing `.weight` is
/// ignored) of an `[n, k]` weight from a checkpoint in any format [`QuantizationConfig`] recognizes.
pub fn read_linear(
    ckpt: &Checkpoint,
    prefix: &str,
    qcfg: &QuantizationConfig,
    n: usize,
    k: usize,
) -> Result<QuantLinear> {
    let prefix = prefix.strip_suffix(".weight").unwrap_or(prefix);
    let group = qcfg.scheme.group;
    if group == 0 || !k.is_multiple_of(group) {
        return Err(Error::weights(
            ckpt.dir(),
            format!("`{prefix}`: input size {k} is not a multiple of the quantization group {group}"),
        ));
    }
    let matrix = match &qcfg.format {
        QuantFormat::Llama32 => read_llama32(ckpt, prefix, n, k, group)?,
        QuantFormat::Gptq { sym, v2, desc_act } => hf::read_gptq(ckpt, prefix, n, k, group, *sym, *v2, *desc_act)?,
        QuantFormat::Awq => hf::read_awq(ckpt, prefix, n, k, group)?,
        QuantFormat::CompressedTensors { symmetric } => hf::read_compressed(ckpt, prefix, n, k, group, *symmetric)?,
    };
    // An infinite or NaN scale would turn every logit into NaN downstream: refuse it here, by name and place.
    if let Some(i) = matrix.scales.iter().position(|s| !s.is_finite()) {
        let groups = matrix.groups();
        return Err(Error::weights(
            ckpt.dir(),
            format!(
                "`{prefix}`: the scale of output row {}, group {} is {}, not a finite value",
                i / groups,
                i % groups,
                matrix.scales[i]
            ),
        ));
    }
    Ok(QuantLinear { matrix, scheme: qcfg.scheme })
}

fn read_llama32(ckpt: &Checkpoint, prefix: &str, n: usize, k: usize, group: usize) -> Result<QuantMatrix> {
    if !k.is_multiple_of(2) {
        return Err(Error::weights(ckpt.dir(), format!("`{prefix}`: odd input size {k} cannot hold packed int4")));
    }
    let why = "llama32 int4 layout";
    let (qw, _) = tensor(ckpt, &format!("{prefix}.qweight"), &[DType::U8], &[n, k / 2], why)?;
    let (sc, _) = tensor(ckpt, &format!("{prefix}.scales"), &[DType::BF16], &[n, k / group], why)?;
    Ok(QuantMatrix { n, k, group, q: unpack_nibbles(qw.bytes), scales: sc.to_f32(), zeros: None })
}

/// Packs int4 values (`[-8, 7]`, even length) two per byte as `q + 8`, the even column in the low nibble.
pub fn pack_nibbles(q: &[i8]) -> Vec<u8> {
    q.chunks_exact(2).map(|p| ((p[0] + 8) as u8 & 0xF) | (((p[1] + 8) as u8 & 0xF) << 4)).collect()
}

/// The inverse of [`pack_nibbles`].
pub fn unpack_nibbles(bytes: &[u8]) -> Vec<i8> {
    let mut q = Vec::with_capacity(bytes.len() * 2);
    for &b in bytes {
        q.push((b & 0xF) as i8 - 8);
        q.push((b >> 4) as i8 - 8);
    }
    q
}

/// Reads an `[rows, cols]` table stored as `<prefix>.weight` (any float dtype) or, in an int8-embeddings
/// checkpoint, as `<prefix>.qweight_int8` + `<prefix>.scales`, dequantized to f32 (exactly: int8 times a bf16
/// scale). `name` is the unquantized tensor name, e.g. `model.embed_tokens.weight`.
pub fn read_table_f32(ckpt: &Checkpoint, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
    if let Some(t) = read_table_int8(ckpt, name, rows, cols)? {
        return Ok(t.dequantize());
    }
    let (v, _) = tensor(ckpt, name, &[DType::BF16, DType::F16, DType::F32], &[rows, cols], "unquantized table")?;
    Ok(v.to_f32())
}

/// The int8 form of an `[rows, cols]` table of an int8-embeddings checkpoint (`<prefix>.qweight_int8` +
/// `<prefix>.scales`), or `None` when the checkpoint stores it unquantized (`<prefix>.weight`). Shapes and dtypes are
/// checked, naming the tensor.
pub fn read_table_int8(ckpt: &Checkpoint, name: &str, rows: usize, cols: usize) -> Result<Option<Int8Table>> {
    let prefix = name.strip_suffix(".weight").unwrap_or(name);
    let qname = format!("{prefix}.qweight_int8");
    if ckpt.get(&qname).is_none() {
        return Ok(None);
    }
    let why = "llama32 int8 table";
    let (q, _) = tensor(ckpt, &qname, &[DType::I8], &[rows, cols], why)?;
    let (s, _) = tensor(ckpt, &format!("{prefix}.scales"), &[DType::BF16], &[rows], why)?;
    let table = Int8Table { rows, cols, q: q.bytes.iter().map(|&b| b as i8).collect(), scales: s.to_f32() };
    table.check(&qname)?;
    Ok(Some(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibbles_roundtrip() {
        let q: Vec<i8> = (-8..8).chain((-8..8).rev()).collect();
        let packed = pack_nibbles(&q);
        assert_eq!(packed[0], 0x10); // -8 -> 0 (low), -7 -> 1 (high)
        assert_eq!(unpack_nibbles(&packed), q);
    }
}
