//! Minimal NumPy `.npy` (format versions 1.0, 2.0 and 3.0) reader and writer for little-endian,
//! C-order arrays: `<f4` (also reading `<f2` and `<f8`, converted to `f32`) and `<i4` / `<i8`.
//!
//! Errors name the file. Format errors are reported as [`Error::Io`] with kind `InvalidData`.

use std::io::ErrorKind;
use std::path::Path;

use crate::{Error, Result};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// An n-dimensional array in C (row-major) order.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray<T = f32> {
    /// Extent of each dimension (empty for a 0-d array, which holds one element).
    pub shape: Vec<usize>,
    /// The elements, last dimension fastest.
    pub data: Vec<T>,
}

/// Reads a `.npy` file of dtype `<f4`, `<f2` or `<f8` as `f32`.
pub fn read_f32(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (header, body) = parse(&bytes).map_err(|m| invalid(path, m))?;
    let data = match header.descr.as_str() {
        "<f4" => convert(body, |b: [u8; 4]| f32::from_le_bytes(b)),
        "<f2" => convert(body, |b: [u8; 2]| half::f16::from_le_bytes(b).to_f32()),
        "<f8" => convert(body, |b: [u8; 8]| f64::from_le_bytes(b) as f32),
        d => return Err(invalid(path, format!("unsupported dtype '{d}' (expected '<f4', '<f2' or '<f8')"))),
    };
    finish(path, header.shape, data)
}

/// Reads a `.npy` file of dtype `<i8` or `<i4` as `i64`.
pub fn read_i64(path: &Path) -> Result<NpyArray<i64>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (header, body) = parse(&bytes).map_err(|m| invalid(path, m))?;
    let data = match header.descr.as_str() {
        "<i8" => convert(body, i64::from_le_bytes),
        "<i4" => convert(body, |b: [u8; 4]| i32::from_le_bytes(b) as i64),
        d => return Err(invalid(path, format!("unsupported dtype '{d}' (expected '<i8' or '<i4')"))),
    };
    finish(path, header.shape, data)
}

/// Writes `data` (C order, `shape`'s product elements) as a `<f4` `.npy` file.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    write(path, "<f4", shape, data, |x, out| out.extend_from_slice(&x.to_le_bytes()))
}

/// Writes `data` (C order) as an `<i8` `.npy` file.
pub fn write_i64(path: &Path, shape: &[usize], data: &[i64]) -> Result<()> {
    write(path, "<i8", shape, data, |x, out| out.extend_from_slice(&x.to_le_bytes()))
}

/// Writes `data` (C order) as an `<i4` `.npy` file.
pub fn write_i32(path: &Path, shape: &[usize], data: &[i32]) -> Result<()> {
    write(path, "<i4", shape, data, |x, out| out.extend_from_slice(&x.to_le_bytes()))
}

fn invalid(path: &Path, msg: impl Into<String>) -> Error {
    Error::io(path, std::io::Error::new(ErrorKind::InvalidData, format!("npy: {}", msg.into())))
}

fn convert<const N: usize, T>(body: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    body.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect()
}

/// Checks that the element count matches the shape ([`parse`] already checked the byte length).
fn finish<T>(path: &Path, shape: Vec<usize>, data: Vec<T>) -> Result<NpyArray<T>> {
    let n = numel(&shape).ok_or_else(|| invalid(path, format!("shape {shape:?} overflows")))?;
    if data.len() != n {
        return Err(invalid(path, format!("shape {shape:?} needs {n} elements, the file holds {}", data.len())));
    }
    Ok(NpyArray { shape, data })
}

fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

struct Header {
    descr: String,
    shape: Vec<usize>,
}

/// Splits a `.npy` file into its header and its data bytes.
fn parse(bytes: &[u8]) -> std::result::Result<(Header, &[u8]), String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("bad magic (not a .npy file)".into());
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            let b = bytes.get(8..12).ok_or("truncated header length")?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        _ => return Err(format!("unsupported format version {major}.{minor}")),
    };
    let end = start.checked_add(len).filter(|&e| e <= bytes.len()).ok_or("truncated header")?;
    let text = std::str::from_utf8(&bytes[start..end]).map_err(|_| "header is not valid text".to_string())?;
    let header = parse_dict(text)?;
    let body = &bytes[end..];
    let item = match header.descr.as_bytes().get(2) {
        Some(b'2') => 2,
        Some(b'4') => 4,
        Some(b'8') => 8,
        _ => 0,
    };
    if item > 0 {
        let n = numel(&header.shape).ok_or_else(|| format!("shape {:?} overflows", header.shape))?;
        if n.checked_mul(item) != Some(body.len()) {
            return Err(format!(
                "shape {:?} of {} needs {} data bytes, the file holds {}",
                header.shape,
                header.descr,
                n.saturating_mul(item),
                body.len()
            ));
        }
    }
    Ok((header, body))
}

/// Parses the header's Python dict literal: `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
fn parse_dict(text: &str) -> std::result::Result<Header, String> {
    let mut p = Lexer { s: text.as_bytes(), i: 0 };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    p.expect(b'{')?;
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        match key.as_str() {
            "descr" => descr = Some(p.string().map_err(|e| format!("descr: {e} (only simple dtypes are supported)"))?),
            "fortran_order" => fortran = Some(p.boolean()?),
            "shape" => shape = Some(p.tuple()?),
            other => return Err(format!("unexpected header key '{other}'")),
        }
        p.ws();
        if !p.eat(b',') {
            p.ws();
            p.expect(b'}')?;
            break;
        }
    }
    if fortran.ok_or("header lacks 'fortran_order'")? {
        return Err("fortran_order arrays are not supported (save a C-ordered array)".into());
    }
    Ok(Header { descr: descr.ok_or("header lacks 'descr'")?, shape: shape.ok_or("header lacks 'shape'")? })
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        let hit = self.s.get(self.i) == Some(&c);
        self.i += hit as usize;
        hit
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("malformed header: expected '{}' at byte {}", c as char, self.i))
        }
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let q = match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("malformed header: expected a quoted string at byte {}", self.i)),
        };
        let start = self.i + 1;
        let len = self.s[start..].iter().position(|&c| c == q).ok_or("malformed header: unterminated string")?;
        self.i = start + len + 1;
        Ok(String::from_utf8_lossy(&self.s[start..start + len]).into_owned())
    }
    fn boolean(&mut self) -> std::result::Result<bool, String> {
        for (word, v) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.i..].starts_with(word) {
                self.i += word.len();
                return Ok(v);
            }
        }
        Err(format!("malformed header: expected True or False at byte {}", self.i))
    }
    fn tuple(&mut self) -> std::result::Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.ws();
            if self.eat(b')') {
                return Ok(dims);
            }
            let start = self.i;
            while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
                self.i += 1;
            }
            let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
            let d = digits.parse().map_err(|_| format!("malformed shape at byte {start}"))?;
            dims.push(d);
            self.eat(b'L'); // Python 2 long suffix
            self.ws();
            if !self.eat(b',') {
                self.ws();
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

/// Serializes a header plus data; version 1.0 unless the header needs 2.0's 32-bit length.
fn write<T: Copy>(path: &Path, descr: &str, shape: &[usize], data: &[T], put: impl Fn(T, &mut Vec<u8>)) -> Result<()> {
    if numel(shape) != Some(data.len()) {
        let msg = format!("npy: shape {shape:?} does not match {} elements", data.len());
        return Err(Error::io(path, std::io::Error::new(ErrorKind::InvalidInput, msg)));
    }
    let dims = match shape {
        [d] => format!("({d},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    // Pad with spaces so that magic + version + length + header (ending in '\n') is a multiple of 64.
    let v1 = (10 + dict.len() + 1).div_ceil(64) * 64 - 10 <= u16::MAX as usize;
    let prefix = if v1 { 10 } else { 12 };
    let total = (prefix + dict.len() + 1).div_ceil(64) * 64;
    dict.extend(std::iter::repeat_n(' ', total - prefix - dict.len() - 1));
    dict.push('\n');
    let mut out = Vec::with_capacity(total + std::mem::size_of_val(data));
    out.extend_from_slice(MAGIC);
    if v1 {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    for &x in data {
        put(x, &mut out);
    }
    if !check_output(path)? {
        // A device, a pipe or a symbolic link: written in place (a rename would replace the link, or fail).
        return std::fs::write(path, out).map_err(|e| Error::io(path, e));
    }
    // Written beside the target and renamed over it once complete: an error part way (a full disk) leaves any
    // earlier file as it was.
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, out).and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Checks that an array can be written to `path` without destroying anything else: its directory exists, and
/// whatever is there already is an .npy array (by its magic bytes) or an empty file, which a new one may replace,
/// or a device or pipe (`/dev/null`) to write into. A checkpoint, a config or a directory given by a slip of
/// `--out` is refused, named. Callers run it before long work. Returns whether the path is a regular file (or
/// nothing yet) that may be replaced by a rename.
pub fn check_output(path: &Path) -> Result<bool> {
    let refuse = |msg: &str| Err(Error::io(path, std::io::Error::new(ErrorKind::AlreadyExists, msg.to_string())));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(Error::io(path, std::io::Error::new(ErrorKind::NotFound, "its directory does not exist")));
        }
    }
    let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    match std::fs::metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(!link),
        Err(e) => Err(Error::io(path, e)),
        Ok(m) if m.is_dir() => refuse("is a directory"),
        Ok(m) if !m.is_file() => Ok(false),
        Ok(m) => {
            let mut head = [0u8; 6];
            let is_npy = m.len() == 0
                || std::fs::File::open(path)
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                    .is_ok_and(|()| &head == MAGIC);
            if is_npy {
                Ok(!link)
            } else {
                refuse("exists and is not an .npy array; refusing to overwrite it (remove it first)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Fixtures under `tests/data/npy_*.npy` were written by numpy (`tests/data/make_sampling_fixtures.py`).
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn reads_numpy_float_files() {
        let a = read_f32(&fixture("npy_f32_2x3.npy")).unwrap();
        assert_eq!(a.shape, [2, 3]);
        assert_eq!(bits(&a.data), bits(&[1.5, -2.25, std::f32::consts::PI, 1e-30, -0.0, 65504.0]));
        let a = read_f32(&fixture("npy_f16_3.npy")).unwrap();
        assert_eq!((a.shape, a.data), (vec![3], vec![0.5, -1.0, 65504.0]));
        let a = read_f32(&fixture("npy_f64_2x1x2.npy")).unwrap();
        assert_eq!((a.shape, a.data), (vec![2, 1, 2], vec![0.1f64 as f32, -7.0, 1e10f64 as f32, 2.5]));
        let a = read_f32(&fixture("npy_f32_scalar.npy")).unwrap();
        assert_eq!((a.shape, a.data), (vec![], vec![42.0]));
        let a = read_f32(&fixture("npy_f32_v2.npy")).unwrap();
        assert_eq!((a.shape, a.data), (vec![4], vec![0.0, 1.0, 2.0, 3.0]));
        let a = read_f32(&fixture("npy_f32_v3.npy")).unwrap();
        assert_eq!((a.shape, a.data), (vec![3], vec![-1.0, 0.0, 1.0]));
    }

    #[test]
    fn reads_numpy_int_files() {
        let a = read_i64(&fixture("npy_i64_4.npy")).unwrap();
        assert_eq!((a.shape, a.data), (vec![4], vec![0, -1, 128000, 1 << 40]));
        let a = read_i64(&fixture("npy_i32_2x2.npy")).unwrap();
        assert_eq!((a.shape, a.data), (vec![2, 2], vec![1, -2, 3, i32::MAX as i64]));
    }

    fn err_of<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("expected an error").to_string()
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let e = err_of(read_f32(&fixture("npy_fortran.npy")));
        assert!(e.contains("npy_fortran.npy") && e.contains("fortran_order"), "{e}");
        let e = err_of(read_f32(&fixture("npy_f32_bigendian.npy")));
        assert!(e.contains("npy_f32_bigendian.npy") && e.contains("unsupported dtype '>f4'"), "{e}");
        let e = err_of(read_f32(&fixture("npy_i64_4.npy")));
        assert!(e.contains("unsupported dtype '<i8'"), "{e}");
        let e = err_of(read_i64(&fixture("npy_f32_2x3.npy")));
        assert!(e.contains("unsupported dtype '<f4'"), "{e}");
        let e = err_of(read_f32(&fixture("sampling_reference.json")));
        assert!(e.contains("sampling_reference.json") && e.contains("bad magic"), "{e}");
        let e = err_of(read_f32(&fixture("does_not_exist.npy")));
        assert!(e.contains("does_not_exist.npy"), "{e}");

        let dir = std::env::temp_dir().join(format!("llama32_npy_test_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Truncated data: drop the last byte of a valid file; extra data: append one.
        let good = std::fs::read(fixture("npy_f32_2x3.npy")).unwrap();
        let short = dir.join("short.npy");
        std::fs::write(&short, &good[..good.len() - 1]).unwrap();
        let e = err_of(read_f32(&short));
        assert!(e.contains("short.npy") && e.contains("needs 24 data bytes, the file holds 23"), "{e}");
        let long = dir.join("long.npy");
        std::fs::write(&long, [&good[..], &[0]].concat()).unwrap();
        assert!(err_of(read_f32(&long)).contains("the file holds 25"));
        let e = err_of(write_f32(&dir.join("w.npy"), &[2, 2], &[1.0; 3]));
        assert!(e.contains("w.npy") && e.contains("does not match 3 elements"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_matches_numpy_layout_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("llama32_npy_rt_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // numpy's own file for the same array is byte-identical (numpy >= 1.x pads headers to 64 bytes).
        let p = dir.join("a.npy");
        write_f32(&p, &[2, 3], &[1.5, -2.25, std::f32::consts::PI, 1e-30, -0.0, 65504.0]).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(fixture("npy_f32_2x3.npy")).unwrap());
        write_f32(&p, &[], &[42.0]).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(fixture("npy_f32_scalar.npy")).unwrap());
        write_i64(&p, &[4], &[0, -1, 128000, 1 << 40]).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(fixture("npy_i64_4.npy")).unwrap());
        write_i32(&p, &[2, 2], &[1, -2, 3, i32::MAX]).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(fixture("npy_i32_2x2.npy")).unwrap());
        // A header too long for version 1.0 switches to 2.0.
        let shape = vec![1usize; 30000];
        write_f32(&p, &shape, &[7.0]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[6..8], &[2, 0]);
        assert_eq!((bytes.len() - 4) % 64, 0);
        let a = read_f32(&p).unwrap();
        assert_eq!((a.shape, a.data), (shape, vec![7.0]));
        // Anything but an .npy array is not replaced (a checkpoint named by a slip of --out), nor is a directory.
        let precious = dir.join("model.safetensors");
        std::fs::write(&precious, b"weights").unwrap();
        let e = write_f32(&precious, &[1], &[1.0]).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("not an .npy array"), "{e}");
        assert_eq!(std::fs::read(&precious).unwrap(), b"weights");
        assert!(write_f32(&dir, &[1], &[1.0]).unwrap_err().to_string().contains("is a directory"));
        // An empty file (mktemp's) is replaced; a device is written into.
        let empty = dir.join("empty.npy");
        std::fs::write(&empty, b"").unwrap();
        write_f32(&empty, &[1], &[1.0]).unwrap();
        assert_eq!(read_f32(&empty).unwrap().data, vec![1.0]);
        std::fs::remove_file(&empty).unwrap();
        if Path::new("/dev/null").exists() {
            write_f32(Path::new("/dev/null"), &[1], &[1.0]).unwrap();
        }
        assert!(write_f32(&dir.join("no/such/dir/a.npy"), &[1], &[1.0]).is_err());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 2, "no temporary file left behind: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
