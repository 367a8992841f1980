//! The GGUF container: header, metadata, tensor directory (see the module docs).
//!
//! `parse` is the whole parser, on bytes; `GgufFile::open` maps a file and calls it. The file
//! is untrusted: every count is bounded by the bytes left before anything is allocated, every
//! size and offset is computed with checked arithmetic, and every error names the header
//! field, metadata key or tensor at fault.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::{MetaValue, Metadata};
use crate::error::{EngineError, Result};
use crate::tensor::WeightFormat;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: usize = 32;
/// Arrays nested deeper than this are refused (real files nest none).
pub const MAX_ARRAY_DEPTH: usize = 8;
pub const MAX_DIMS: usize = 4;

// The smallest encodings, to bound counts by the bytes left.
const MIN_KV_BYTES: usize = 8 + 1 + 4 + 1; // key length, 1-byte key, value type, 1-byte value
const MIN_TENSOR_INFO_BYTES: usize = 8 + 1 + 4 + 8 + 4 + 8; // name, n_dims, 1 dim, type, offset

/// Capacity reserved up front for a counted list; beyond it vectors grow with what is parsed.
const MAX_RESERVE: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: dims[0] is the row length (innermost), as ggml's ne[].
    pub dims: Vec<usize>,
    pub format: WeightFormat,
    /// Absolute byte range in the file, checked to lie inside it.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Metadata,
    pub alignment: usize,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    pub map: Arc<Mmap>,
}

impl GgufFile {
    /// Maps the file and parses it.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| EngineError::file(path, format!("cannot open: {e}")))?;
        // SAFETY: a read-only mapping; as with every mapped checkpoint, the file must not be
        // truncated or rewritten while it is mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::file(path, format!("cannot map: {e}")))?;
        let (version, metadata, alignment, tensors) = parse(path, &map)?;
        Ok(GgufFile { path: path.to_path_buf(), version, metadata, alignment, tensors, map: Arc::new(map) })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The data of `t`, one of this file's tensors (panics on a range not from this file).
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.start..t.end]
    }
}

/// A failure inside the parser: where inside a value (`[3][0]`, empty at top level) and what.
type Fail = (String, String);
type Parsed<T> = std::result::Result<T, Fail>;

fn fail<T>(message: impl Into<String>) -> Parsed<T> {
    Err((String::new(), message.into()))
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Parsed<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end.and_then(|e| self.bytes.get(self.pos..e).map(|s| (e, s))) {
            Some((e, s)) => {
                self.pos = e;
                Ok(s)
            }
            None => fail(format!("truncated: {n} bytes needed at offset {}, {} left", self.pos, self.left())),
        }
    }

    fn array<const N: usize>(&mut self) -> Parsed<[u8; N]> {
        let s = self.take(N)?;
        s.try_into().or_else(|_| fail("internal: short read"))
    }

    fn u8(&mut self) -> Parsed<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u32(&mut self) -> Parsed<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Parsed<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// A u64 count of items of at least `min` bytes each, checked to fit in the bytes left.
    fn count(&mut self, min: usize, what: &str) -> Parsed<usize> {
        let n = self.u64()?;
        let fits = self.left() / min.max(1);
        match usize::try_from(n) {
            Ok(n) if n <= fits => Ok(n),
            _ => fail(format!("{what} {n} cannot fit in the {} bytes left (at least {min} bytes each)", self.left())),
        }
    }

    /// A GGUF string's bytes (u64 length, then the bytes; UTF-8 is the caller's to check).
    fn string(&mut self) -> Parsed<&'a [u8]> {
        let n = self.count(1, "string length")?;
        self.take(n)
    }

    fn utf8(&mut self) -> Parsed<&'a str> {
        let b = self.string()?;
        std::str::from_utf8(b).or_else(|e| fail(format!("string is not valid UTF-8 ({e}): {}", preview(b))))
    }
}

/// The start of untrusted bytes, for messages.
fn preview(b: &[u8]) -> String {
    let head = String::from_utf8_lossy(b.get(..b.len().min(40)).unwrap_or_default()).into_owned();
    format!("{head:?}{}", if b.len() > 40 { "..." } else { "" })
}

/// The smallest encoding of a value of GGUF type `ty` (None: not a type).
fn min_value_bytes(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 4 + 8,
        _ => return None,
    })
}

/// One value of type `ty`; arrays recurse, `depth` levels deep so far.
fn read_value(c: &mut Cursor<'_>, ty: u32, depth: usize) -> Parsed<MetaValue> {
    use MetaValue as V;
    Ok(match ty {
        0 => V::U8(c.u8()?),
        1 => V::I8(i8::from_le_bytes(c.array()?)),
        2 => V::U16(u16::from_le_bytes(c.array()?)),
        3 => V::I16(i16::from_le_bytes(c.array()?)),
        4 => V::U32(c.u32()?),
        5 => V::I32(i32::from_le_bytes(c.array()?)),
        6 => V::F32(f32::from_le_bytes(c.array()?)),
        7 => match c.u8()? {
            0 => V::Bool(false),
            1 => V::Bool(true),
            b => return fail(format!("bool byte {b:#04x} is neither 0 nor 1")),
        },
        8 => V::Str(c.utf8()?.to_owned()),
        9 => {
            if depth >= MAX_ARRAY_DEPTH {
                return fail(format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"));
            }
            let elem = c.u32()?;
            let Some(min) = min_value_bytes(elem) else { return fail(format!("unknown array element type {elem}")) };
            let n = c.count(min, "array length")?;
            let mut items = Vec::with_capacity(n.min(MAX_RESERVE));
            for i in 0..n {
                items.push(read_value(c, elem, depth + 1).map_err(|(at, m)| (format!("[{i}]{at}"), m))?);
            }
            V::Array(items)
        }
        10 => V::U64(c.u64()?),
        11 => V::I64(i64::from_le_bytes(c.array()?)),
        12 => V::F64(f64::from_le_bytes(c.array()?)),
        _ => return fail(format!("unknown value type {ty}")),
    })
}

/// The name of ggml type `id`, as ggml spells it.
pub fn ggml_type_name(id: u32) -> &'static str {
    #[rustfmt::skip]
    const NAMES: [&str; 40] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2 (removed)", "Q4_3 (removed)", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
        "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64",
        "IQ1_M", "BF16", "Q4_0_4_4 (removed)", "Q4_0_4_8 (removed)", "Q4_0_8_8 (removed)", "TQ1_0", "TQ2_0", "IQ4_NL_4_4 (removed)",
        "IQ4_NL_4_8 (removed)", "IQ4_NL_8_8 (removed)", "MXFP4",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// The weight format of ggml type `id`, if the engine has one.
pub fn ggml_format(id: u32) -> Option<WeightFormat> {
    Some(match id {
        0 => WeightFormat::F32,
        1 => WeightFormat::F16,
        2 => WeightFormat::Q4_0,
        6 => WeightFormat::Q5_0,
        8 => WeightFormat::Q8_0,
        12 => WeightFormat::Q4K,
        14 => WeightFormat::Q6K,
        30 => WeightFormat::Bf16,
        _ => return None,
    })
}

/// One entry of the tensor directory before its data range is placed.
struct RawTensor {
    name: String,
    dims: Vec<usize>,
    format: WeightFormat,
    offset: u64,
    bytes: usize,
}

/// The parser proper, on bytes: (version, metadata, alignment, tensors in file order).
/// `path` is only named in errors (and kept as the metadata's path).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<(u32, Metadata, usize, Vec<TensorInfo>)> {
    let field = |name: &str, (at, m): Fail| EngineError::field(path, format!("{name}{at}"), m);
    let mut c = Cursor { bytes, pos: 0 };

    let magic: [u8; 4] = c.array().map_err(|f| field("magic", f))?;
    if &magic != MAGIC {
        return Err(EngineError::file(path, format!("not a GGUF file: magic {} is not \"GGUF\"", preview(&magic))));
    }
    let version = c.u32().map_err(|f| field("version", f))?;
    match version {
        2 | 3 => {}
        1 => return Err(EngineError::field(path, "version", "GGUF version 1 is not supported (v2 and v3 are)")),
        v if (1..=3).contains(&v.swap_bytes()) => {
            let msg = format!("big-endian GGUF (version {} byte-swapped) is not supported; convert the file to little endian", v.swap_bytes());
            return Err(EngineError::field(path, "version", msg));
        }
        v => return Err(EngineError::field(path, "version", format!("unsupported GGUF version {v} (v2 and v3 are supported)"))),
    }
    let tensor_count = c.count(MIN_TENSOR_INFO_BYTES, "tensor count").map_err(|f| field("tensor_count", f))?;
    let kv_count = c.count(MIN_KV_BYTES, "metadata count").map_err(|f| field("kv_count", f))?;

    let mut values = BTreeMap::new();
    for i in 0..kv_count {
        let entry = format!("metadata key #{i}");
        let key = c.utf8().map_err(|f| field(&entry, f))?;
        if key.is_empty() {
            return Err(EngineError::field(path, entry, "empty key"));
        }
        if values.contains_key(key) {
            return Err(EngineError::field(path, key, format!("duplicate key ({entry})")));
        }
        let ty = c.u32().map_err(|f| field(key, f))?;
        let value = read_value(&mut c, ty, 0).map_err(|f| field(key, f))?;
        values.insert(key.to_owned(), value);
    }
    let metadata = Metadata { path: path.to_path_buf(), values };
    let alignment = alignment(path, &metadata)?;

    let mut raw = Vec::with_capacity(tensor_count.min(MAX_RESERVE));
    let mut names = HashSet::new();
    for i in 0..tensor_count {
        let name = c.utf8().map_err(|f| field(&format!("tensor #{i} name"), f))?;
        if name.is_empty() {
            return Err(EngineError::field(path, format!("tensor #{i} name"), "empty tensor name"));
        }
        if !names.insert(name) {
            return Err(EngineError::tensor(path, name, format!("duplicate tensor name (tensor #{i})")));
        }
        raw.push(tensor_info(&mut c, name).map_err(|(_, m)| EngineError::tensor(path, name, m))?);
    }

    // The data section starts at the first multiple of the alignment after the directory.
    let data_start = c.pos.checked_add(alignment - 1).map(|p| p & !(alignment - 1));
    let mut tensors = Vec::with_capacity(raw.len());
    for t in raw {
        let err = |m: String| EngineError::tensor(path, &t.name, m);
        if t.offset % alignment as u64 != 0 {
            return Err(err(format!("data offset {} is not a multiple of the alignment {alignment}", t.offset)));
        }
        let start = usize::try_from(t.offset).ok().zip(data_start).and_then(|(o, d)| d.checked_add(o));
        let end = start.and_then(|s| s.checked_add(t.bytes));
        let Some((start, end)) = start.zip(end).filter(|&(_, e)| e <= bytes.len()) else {
            let msg = format!("data ({} bytes at offset {} of the data section) lies past the end of the file ({} bytes)", t.bytes, t.offset, bytes.len());
            return Err(err(msg));
        };
        tensors.push(TensorInfo { name: t.name, dims: t.dims, format: t.format, start, end });
    }

    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.start);
    for w in order.windows(2) {
        if let [a, b] = w {
            if a.end > b.start {
                let msg = format!("data [{}, {}) overlaps tensor `{}` [{}, {})", b.start, b.end, a.name, a.start, a.end);
                return Err(EngineError::tensor(path, &b.name, msg));
            }
        }
    }
    Ok((version, metadata, alignment, tensors))
}

/// `general.alignment`: a power of two that fits a u32 (32 when absent).
fn alignment(path: &Path, metadata: &Metadata) -> Result<usize> {
    const KEY: &str = "general.alignment";
    let Some(v) = metadata.get(KEY) else { return Ok(DEFAULT_ALIGNMENT) };
    match v.as_u64().filter(|&a| a.is_power_of_two() && a <= u32::MAX as u64).and_then(|a| usize::try_from(a).ok()) {
        Some(a) => Ok(a),
        None => Err(EngineError::field(path, KEY, format!("must be a power of two from 1 to 2^31, found {} {v:?}", v.type_name()))),
    }
}

/// The rest of one directory entry after its name: shape, type, offset, checked byte size.
fn tensor_info(c: &mut Cursor<'_>, name: &str) -> Parsed<RawTensor> {
    let n_dims = c.u32()?;
    if !(1..=MAX_DIMS as u32).contains(&n_dims) {
        return fail(format!("n_dims {n_dims} is not in 1..={MAX_DIMS}"));
    }
    let mut dims = Vec::with_capacity(MAX_DIMS);
    for d in 0..n_dims {
        let v = c.u64()?;
        match usize::try_from(v) {
            Ok(0) => return fail(format!("dimension {d} is 0")),
            Ok(v) => dims.push(v),
            Err(_) => return fail(format!("dimension {d} ({v}) is too large")),
        }
    }
    let id = c.u32()?;
    let Some(format) = ggml_format(id) else {
        let supported = "F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K, Q6_K";
        return fail(format!("ggml type {} ({id}) is not supported (supported: {supported})", ggml_type_name(id)));
    };
    let offset = c.u64()?;

    let Some(elements) = dims.iter().try_fold(1usize, |p, &d| p.checked_mul(d)) else {
        return fail(format!("dimensions {dims:?}: element count overflows"));
    };
    let (per_block, block_bytes) = format.block();
    let row = dims.first().copied().unwrap_or(0);
    if row % per_block != 0 {
        return fail(format!("row length {row} is not a whole number of {} blocks of {per_block} weights", format.name()));
    }
    let Some(bytes) = (elements / per_block).checked_mul(block_bytes) else {
        return fail(format!("dimensions {dims:?}: byte size of {} data overflows", format.name()));
    };
    Ok(RawTensor { name: name.to_owned(), dims, format, offset, bytes })
}

#[cfg(test)]
#[path = "reader_tests.rs"]
mod tests;
