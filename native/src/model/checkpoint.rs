//! Reads safetensors checkpoints (one file or shards listed in
//! `model.safetensors.index.json`) as untrusted input: every header, offset, dtype and shape
//! is checked before a byte of tensor data is used. Pickle checkpoints are refused.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::Value;

use super::config::parse_json_object;
use crate::tensor::{DType, HostTensor, SharedBytes};
use crate::error::{EngineError, Result};

struct TensorEntry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the mapped file.
    start: usize,
    end: usize,
}

/// All tensors of a checkpoint, mapped but not yet read.
pub struct Checkpoint {
    paths: Vec<PathBuf>,
    maps: Vec<SharedBytes>,
    tensors: HashMap<String, TensorEntry>,
}

const PICKLE_NAMES: [&str; 4] = ["pytorch_model.bin", "model.bin", "model.pt", "model.pth"];

impl Checkpoint {
    pub fn open(model_dir: &Path) -> Result<Self> {
        let index = model_dir.join("model.safetensors.index.json");
        let single = model_dir.join("model.safetensors");
        let paths = if index.is_file() {
            shard_paths(&index)?
        } else if single.is_file() {
            vec![single]
        } else if let Some(pickle) = PICKLE_NAMES.iter().map(|n| model_dir.join(n)).find(|p| p.is_file()) {
            return Err(EngineError::file(pickle, "pickle checkpoints are refused (they can run code); convert the model to safetensors"));
        } else {
            return Err(EngineError::file(model_dir, "no model.safetensors or model.safetensors.index.json in the model folder"));
        };
        let mut ckpt = Checkpoint { paths: vec![], maps: vec![], tensors: HashMap::new() };
        for path in paths {
            ckpt.add_file(path)?;
        }
        Ok(ckpt)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).map_err(|e| EngineError::file(&path, format!("cannot open: {e}")))?;
        // SAFETY: the file is mapped read-only; a checkpoint modified while the engine runs
        // is outside what any engine can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::file(&path, format!("cannot map: {e}")))?;
        self.add_safetensors(path, Arc::new(map))
    }

    /// The tensors of safetensors file `path`, whose contents are `bytes`.
    pub fn add_safetensors(&mut self, path: PathBuf, bytes: SharedBytes) -> Result<()> {
        let data: &[u8] = (*bytes).as_ref();
        let (header_len, metadata) = SafeTensors::read_metadata(data).map_err(|e| {
            // Only a file that is not valid safetensors is examined for pickle: a safetensors
            // header length can start with the same two bytes as a pickle stream.
            if looks_like_pickle(data) {
                EngineError::file(&path, "this is a pickle/PyTorch checkpoint, not safetensors; pickle formats are refused")
            } else {
                EngineError::file(&path, format!("not a valid safetensors file (truncated or corrupt?): {e}"))
            }
        })?;
        let data_start = 8 + header_len;
        let file_index = self.maps.len();
        for (name, info) in metadata.tensors() {
            let dtype = match info.dtype {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::Bf16,
                other => {
                    return Err(EngineError::tensor(&path, name, format!("dtype {other:?} is not supported (F32, F16, BF16)")))
                }
            };
            let (s, e) = info.data_offsets;
            let entry = TensorEntry { file: file_index, dtype, shape: info.shape.clone(), start: data_start + s, end: data_start + e };
            if self.tensors.insert(name.clone(), entry).is_some() {
                return Err(EngineError::tensor(&path, name, "appears in more than one file"));
            }
        }
        self.paths.push(path);
        self.maps.push(bytes);
        Ok(())
    }

    /// The files read, in the order their bytes were added.
    pub fn files(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Every tensor: name, file (index into `files`), dtype, shape and byte range.
    pub fn entries(&self) -> impl Iterator<Item = (&str, usize, DType, &[usize], std::ops::Range<usize>)> {
        self.tensors.iter().map(|(n, e)| (n.as_str(), e.file, e.dtype, e.shape.as_slice(), e.start..e.end))
    }

    /// A checkpoint of tensors placed by the caller (`add_bytes`, `insert`): GGUF files.
    pub fn empty() -> Self {
        Checkpoint { paths: vec![], maps: vec![], tensors: HashMap::new() }
    }

    /// Bytes that tensors may live in, named `path` in errors; returns their index.
    pub fn add_bytes(&mut self, path: PathBuf, bytes: SharedBytes) -> usize {
        self.paths.push(path);
        self.maps.push(bytes);
        self.maps.len() - 1
    }

    /// Tensor `name` at `start..end` of bytes `file`, its bounds already checked.
    pub fn insert(&mut self, name: String, file: usize, dtype: DType, shape: Vec<usize>, start: usize, end: usize) -> Result<()> {
        debug_assert!(end <= (*self.maps[file]).as_ref().len());
        if self.tensors.contains_key(&name) {
            return Err(EngineError::tensor(&self.paths[file], &name, "appears twice"));
        }
        self.tensors.insert(name, TensorEntry { file, dtype, shape, start, end });
        Ok(())
    }

    /// The highest `model.layers.N` index among the tensors (None without layer tensors).
    pub fn last_layer(&self) -> Option<usize> {
        self.tensors.keys().filter_map(|n| n.strip_prefix("model.layers.")?.split('.').next()?.parse::<usize>().ok()).max()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let entry = self.tensors.get(name).ok_or_else(|| {
            let files: Vec<String> = self.paths.iter().map(|p| p.display().to_string()).collect();
            EngineError::tensor(files.join(", "), name, "missing from the checkpoint")
        })?;
        if entry.shape != shape {
            return Err(EngineError::tensor(
                &self.paths[entry.file],
                name,
                format!("shape {:?} does not match config.json, which implies {:?}", entry.shape, shape),
            ));
        }
        Ok(entry)
    }

    /// Tensor `name`, checked to have `shape`, as a view of its bytes in the mapped file.
    pub fn tensor<'a>(&'a self, name: &'a str, shape: &'a [usize]) -> Result<HostTensor<'a>> {
        let entry = self.entry(name, shape)?;
        Ok(HostTensor { name, dtype: entry.dtype, shape, map: &self.maps[entry.file], start: entry.start, end: entry.end })
    }

    /// A 1-D tensor (norm weight, bias) as f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(self.tensor(name, &[len])?.to_f32())
    }
}

fn looks_like_pickle(bytes: &[u8]) -> bool {
    // Pickle protocol 2+ starts with 0x80 <proto>; torch.save writes a zip archive.
    matches!(bytes, [0x80, 2..=5, ..]) || bytes.starts_with(b"PK\x03\x04")
}

fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| EngineError::file(index, format!("cannot read: {e}")))?;
    shard_files(index, &text)
}

/// The shard files named by index file `index` (text `text`), all in the index's folder.
pub fn shard_files(index: &Path, text: &str) -> Result<Vec<PathBuf>> {
    let obj = parse_json_object(index, text)?;
    let Some(Value::Object(map)) = obj.get("weight_map") else {
        return Err(EngineError::field(index, "weight_map", "missing or not an object"));
    };
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let name = file.as_str().ok_or_else(|| EngineError::field(index, format!("weight_map.{tensor}"), "expected a file name"))?;
        if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(EngineError::field(index, format!("weight_map.{tensor}"), format!("{name:?} is not a plain file name")));
        }
        files.insert(name.to_string());
    }
    if files.is_empty() {
        return Err(EngineError::field(index, "weight_map", "is empty"));
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}
