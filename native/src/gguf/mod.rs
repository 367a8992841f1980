//! GGUF files (the format of llama.cpp, Ollama and LM Studio), read as untrusted input.
//!
//! - `reader`: the file's header, metadata and tensor directory, every count, length, offset,
//!   alignment and dimension product checked before use.
//! - `tokenizer`: a `tokenizers::Tokenizer` built from the `tokenizer.ggml.*` metadata.
//!
//! Metadata values are kept as the file types them (`MetaValue`); `Metadata`'s accessors
//! convert and name the key in every error.

/// The fuzz target of `reader::parse` (the `fuzz_gguf` example and a bounded test).
#[doc(hidden)]
pub mod fuzz;
pub mod reader;
pub mod tokenizer;
pub(crate) mod tokenizer_bpe;
mod tokenizer_spm;
#[cfg(test)]
mod tokenizer_tests;

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::{EngineError, Result};

/// One metadata value, typed as in the file (GGUF value types 0..=12).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "uint8",
            MetaValue::I8(_) => "int8",
            MetaValue::U16(_) => "uint16",
            MetaValue::I16(_) => "int16",
            MetaValue::U32(_) => "uint32",
            MetaValue::I32(_) => "int32",
            MetaValue::F32(_) => "float32",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "uint64",
            MetaValue::I64(_) => "int64",
            MetaValue::F64(_) => "float64",
        }
    }

    /// The GGUF value type id (0..=12) of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// An integer of any width, if it is one and is >= 0.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// An integer of any width.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float or an integer, as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
}

/// The metadata of one GGUF file, by key.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    /// The file, named in errors.
    pub path: PathBuf,
    pub values: BTreeMap<String, MetaValue>,
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.values.get(key)
    }

    fn err(&self, key: &str, message: impl Into<String>) -> EngineError {
        EngineError::field(&self.path, key, message)
    }

    fn typed<'a, T>(&'a self, key: &str, want: &str, f: impl Fn(&'a MetaValue) -> Option<T>) -> Result<Option<T>> {
        match self.values.get(key) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| self.err(key, format!("expected {want}, found {} {}", v.type_name(), short(v)))),
        }
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", |v| if let MetaValue::Str(s) = v { Some(s.as_str()) } else { None })
    }

    pub fn u64_opt(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", MetaValue::as_u64)
    }

    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", MetaValue::as_f64)
    }

    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", |v| if let MetaValue::Bool(b) = v { Some(*b) } else { None })
    }

    pub fn usize_req(&self, key: &str) -> Result<usize> {
        let v = self.u64_opt(key)?.ok_or_else(|| self.err(key, "missing"))?;
        usize::try_from(v).map_err(|_| self.err(key, format!("{v} is too large")))
    }

    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.u64_opt(key)? {
            None => Ok(None),
            Some(v) => usize::try_from(v).map(Some).map_err(|_| self.err(key, format!("{v} is too large"))),
        }
    }

    /// An array, every element converted by `f` (the first failing index is named).
    pub fn array_opt<'a, T>(&'a self, key: &str, want: &str, f: impl Fn(&'a MetaValue) -> Option<T>) -> Result<Option<Vec<T>>> {
        let Some(v) = self.values.get(key) else { return Ok(None) };
        let MetaValue::Array(items) = v else {
            return Err(self.err(key, format!("expected an array of {want}, found {}", v.type_name())));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| f(item).ok_or_else(|| self.err(&format!("{key}[{i}]"), format!("expected {want}, found {}", item.type_name()))))
            .collect::<Result<Vec<T>>>()
            .map(Some)
    }

    pub fn str_array_opt(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.array_opt(key, "strings", |v| if let MetaValue::Str(s) = v { Some(s.as_str()) } else { None })
    }
}

fn short(v: &MetaValue) -> String {
    match v {
        MetaValue::Str(s) if s.len() > 40 => format!("{:?}...", &s[..s.floor_char_boundary(40)]),
        MetaValue::Array(a) => format!("of {} items", a.len()),
        other => format!("{other:?}"),
    }
}
