//! The GGUF target of the shared fuzzer (`crate::fuzzing`): seeds from
//! `native/fuzz/corpus/gguf`, mutated by the byte-level operators (the fields that matter are
//! little-endian u32/u64 counts, lengths, types and offsets). An accepted file must keep the
//! reader's guarantees (ranges inside the file, sizes matching shapes, no overlaps).

use std::collections::HashSet;
use std::path::Path;

use super::reader::{parse, MAX_DIMS};
use crate::fuzzing::{bytes, FuzzRng, Target};

pub struct Gguf;

impl Target for Gguf {
    fn name(&self) -> &'static str {
        "gguf"
    }

    fn extension(&self) -> &'static str {
        "gguf"
    }

    fn mutate(&self, rng: &mut FuzzRng, corpus: &[Vec<u8>], out: &mut Vec<u8>) {
        bytes::mutate(rng, corpus, out)
    }

    fn check(&self, bytes: &[u8]) -> Result<bool, String> {
        check(bytes)
    }
}

/// Parses `bytes`; Ok(false) if the reader refuses them, Err if it accepts a broken file.
pub fn check(bytes: &[u8]) -> Result<bool, String> {
    let path = Path::new("fuzz.gguf");
    let Ok((_, metadata, alignment, tensors)) = parse(path, bytes) else { return Ok(false) };
    if metadata.path != path || !alignment.is_power_of_two() {
        return Err(format!("accepted with metadata path {:?}, alignment {alignment}", metadata.path));
    }
    let mut names = HashSet::new();
    let mut ranges = Vec::new();
    for t in &tensors {
        let (per_block, block_bytes) = t.format.block();
        let expected = t.dims.iter().try_fold(1usize, |p, &d| p.checked_mul(d)).map(|n| n / per_block * block_bytes);
        let ok = (1..=MAX_DIMS).contains(&t.dims.len())
            && t.dims.iter().all(|&d| d > 0)
            && t.dims.first().is_some_and(|&r| r % per_block == 0)
            && t.start <= t.end
            && t.end <= bytes.len()
            && expected == Some(t.end - t.start)
            && names.insert(t.name.as_str());
        if !ok {
            return Err(format!("accepted a bad tensor: {t:?}"));
        }
        ranges.push((t.start, t.end));
    }
    ranges.sort_unstable();
    if ranges.windows(2).any(|w| w[0].1 > w[1].0) {
        return Err("accepted overlapping tensors".into());
    }
    Ok(true)
}
