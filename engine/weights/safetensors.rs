//! A memory-mapped safetensors reader that validates the header before any tensor byte is touched.
//!
//! The checks: the header length fits in the file, the header is a JSON object of `{dtype, shape, data_offsets}`
//! entries, every tensor's byte range lies inside the data section and matches its shape and dtype, and no two
//! tensors overlap. A malformed file is rejected with an error naming the file and the tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::Value;

use crate::{Error, Result};

/// Largest header accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Element types the engine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
    /// Signed 8-bit integer (int8 embeddings of quantized checkpoints).
    I8,
    /// Unsigned 8-bit integer (packed int4 weights).
    U8,
    /// Signed 32-bit integer (GPTQ/AWQ/compressed-tensors packed int4 weights, `g_idx`).
    I32,
    /// Signed 64-bit integer (compressed-tensors `weight_shape`).
    I64,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
        }
    }

    /// Whether this is a floating-point type (`BF16`, `F16`, `F32`): what a dense weight must be stored as. Integer
    /// tensors would convert by value, so a dense weight stored as integers is refused rather than read.
    pub fn is_float(self) -> bool {
        matches!(self, DType::BF16 | DType::F16 | DType::F32)
    }

    /// The safetensors spelling (`BF16`, `F16`, `F32`).
    pub fn name(self) -> &'static str {
        match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::I32 => "I32",
            DType::I64 => "I64",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "BF16" => Some(DType::BF16),
            "F16" => Some(DType::F16),
            "F32" => Some(DType::F32),
            "I8" => Some(DType::I8),
            "U8" => Some(DType::U8),
            "I32" => Some(DType::I32),
            "I64" => Some(DType::I64),
            _ => None,
        }
    }
}

/// Where one tensor lives inside a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub range: std::ops::Range<usize>,
}

/// A borrowed view of one tensor's bytes.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: &'a [usize],
    /// Raw little-endian bytes.
    pub bytes: &'a [u8],
}

impl TensorView<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts the tensor to f32 into `out` (exact for bf16, f16 and 8-bit integers; integers convert by value).
    /// `out.len()` must equal `numel()`.
    pub fn to_f32_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.numel(), "to_f32_into: output length");
        match self.dtype {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(self.bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(self.bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(self.bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::I8 => {
                for (o, &b) in out.iter_mut().zip(self.bytes) {
                    *o = b as i8 as f32;
                }
            }
            DType::U8 => {
                for (o, &b) in out.iter_mut().zip(self.bytes) {
                    *o = b as f32;
                }
            }
            DType::I32 => {
                for (o, c) in out.iter_mut().zip(self.bytes.chunks_exact(4)) {
                    *o = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32;
                }
            }
            DType::I64 => {
                for (o, c) in out.iter_mut().zip(self.bytes.chunks_exact(8)) {
                    *o = i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32;
                }
            }
        }
    }

    /// Converts the tensor to a new f32 vector.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        self.to_f32_into(&mut out);
        out
    }
}

/// One opened, validated safetensors file.
pub struct SafeTensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafeTensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeTensorsFile").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

impl SafeTensorsFile {
    /// Opens and memory-maps `path`, validating the header and every tensor's byte range.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // A directory opens, and mapping it fails with an unhelpful "No such device".
        if !file.metadata().map_err(|e| Error::io(path, e))?.is_file() {
            return Err(Error::weights(path, "not a regular file"));
        }
        // SAFETY: the map is read-only; a checkpoint modified while mapped is outside what we can defend against,
        // as for every mmap-based loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (data_start, tensors, metadata) = parse_header(&mmap, path)?;
        Ok(SafeTensorsFile { path: path.to_path_buf(), mmap, data_start, tensors, metadata })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names and their placement.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// The `__metadata__` string map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// A view of the tensor `name`, if present.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let info = self.tensors.get(name)?;
        let start = self.data_start + info.range.start;
        let end = self.data_start + info.range.end;
        Some(TensorView { dtype: info.dtype, shape: &info.shape, bytes: &self.mmap[start..end] })
    }
}

type Header = (usize, BTreeMap<String, TensorInfo>, BTreeMap<String, String>);

/// Parses and validates a safetensors header from the whole file's bytes.
pub fn parse_header(bytes: &[u8], path: &Path) -> Result<Header> {
    let bad = |msg: String| Error::weights(path, msg);
    if bytes.len() < 8 {
        return Err(bad(format!("file is {} bytes, too short for a safetensors header", bytes.len())));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().map_err(|_| bad("unreadable header length".into()))?);
    let avail = (bytes.len() - 8) as u64;
    if header_len > MAX_HEADER_BYTES || header_len > avail {
        return Err(bad(format!(
            "header length {header_len} exceeds the file ({avail} bytes after the length) or the 100 MB limit"
        )));
    }
    let data_start = 8 + header_len as usize;
    let header: Value =
        serde_json::from_slice(&bytes[8..data_start]).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let obj = header.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_len = bytes.len() - data_start;

    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in obj {
        if name == "__metadata__" {
            if let Some(m) = entry.as_object() {
                for (k, v) in m {
                    metadata.insert(k.clone(), v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()));
                }
            }
            continue;
        }
        let t = |msg: String| bad(format!("tensor `{name}`: {msg}"));
        let e = entry.as_object().ok_or_else(|| t("entry is not an object".into()))?;
        let dtype_s = e.get("dtype").and_then(Value::as_str).ok_or_else(|| t("missing `dtype`".into()))?;
        let dtype = DType::parse(dtype_s)
            .ok_or_else(|| t(format!("unsupported dtype {dtype_s} (supported: BF16, F16, F32, I8, U8, I32, I64)")))?;
        let shape: Vec<usize> = e
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| t("missing `shape`".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| t("`shape` must be a list of non-negative integers".into()))?;
        let offsets: Vec<usize> = e
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect())
            .ok_or_else(|| t("`data_offsets` must be two non-negative integers".into()))?;
        let (begin, end) = (offsets[0], offsets[1]);
        if begin > end {
            return Err(t(format!("data_offsets [{begin}, {end}] are reversed")));
        }
        if end > data_len {
            return Err(t(format!(
                "data_offsets end {end} lies beyond the {data_len} data bytes in the file (truncated file?)"
            )));
        }
        let expected = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| t(format!("shape {shape:?} overflows")))?;
        if end - begin != expected {
            return Err(t(format!(
                "shape {shape:?} of {} needs {expected} bytes but data_offsets span {}",
                dtype.name(),
                end - begin
            )));
        }
        tensors.insert(name.clone(), TensorInfo { dtype, shape, range: begin..end });
    }

    let mut ranges: Vec<(&str, &std::ops::Range<usize>)> =
        tensors.iter().map(|(n, i)| (n.as_str(), &i.range)).filter(|(_, r)| !r.is_empty()).collect();
    ranges.sort_by_key(|(_, r)| (r.start, r.end));
    for pair in ranges.windows(2) {
        let ((a, ra), (b, rb)) = (pair[0], pair[1]);
        if rb.start < ra.end {
            return Err(bad(format!(
                "tensors `{a}` [{}, {}) and `{b}` [{}, {}) overlap",
                ra.start, ra.end, rb.start, rb.end
            )));
        }
    }
    Ok((data_start, tensors, metadata))
}

/// Serializes tensors into safetensors bytes (used by tests and tools that write small checkpoints).
pub fn serialize(tensors: &[(&str, DType, &[usize], &[u8])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut head = serde_json::to_vec(&Value::Object(header)).unwrap_or_default();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_file(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    fn err(bytes: &[u8]) -> String {
        parse_header(bytes, Path::new("m.safetensors")).unwrap_err().to_string()
    }

    #[test]
    fn roundtrip() {
        let a: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let b: Vec<u8> = [bf16::from_f32(3.0)].iter().flat_map(|x| x.to_le_bytes()).collect();
        let bytes = serialize(&[("a", DType::F32, &[2], &a), ("b", DType::BF16, &[1, 1], &b)]);
        let (start, t, _) = parse_header(&bytes, Path::new("x")).unwrap();
        assert_eq!(t["a"].shape, vec![2]);
        let info = &t["b"];
        let view = TensorView { dtype: info.dtype, shape: &info.shape, bytes: &bytes[start + info.range.start..][..2] };
        assert_eq!(view.to_f32(), vec![3.0]);
    }

    #[test]
    fn rejects_malformed_headers() {
        assert!(err(&[1, 2, 3]).contains("too short"));
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(err(&huge).contains("header length"));
        assert!(err(&header_file("not json", 0)).contains("not valid JSON"));
        let e = err(&header_file(r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8));
        assert!(e.contains("`w`") && e.contains("truncated"), "{e}");
        let e = err(&header_file(r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#, 16));
        assert!(e.contains("needs 12 bytes"), "{e}");
        let e = err(&header_file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            16,
        ));
        assert!(e.contains("overlap"), "{e}");
        let e = err(&header_file(r#"{"w":{"dtype":"F8_E5M2","shape":[1],"data_offsets":[0,1]}}"#, 1));
        assert!(e.contains("unsupported dtype"), "{e}");
        let e = err(&header_file(r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#, 8));
        assert!(e.contains("reversed"), "{e}");
        let e = err(&header_file(
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#,
            8,
        ));
        assert!(e.contains("overflows"), "{e}");
    }
}
