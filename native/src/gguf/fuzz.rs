//! Mutational fuzzing of the GGUF parser on stable Rust, shared by the `fuzz_gguf` example
//! and the reader's bounded test. There is no coverage feedback: seeds from
//! `native/fuzz/corpus/gguf` are mutated by format-aware operators (the fields that matter are
//! little-endian u32/u64 counts, lengths, types and offsets) and each input is parsed under
//! `catch_unwind`. A run fails on a panic or on an accepted file that breaks the reader's
//! guarantees (ranges inside the file, sizes matching shapes, no overlaps).

use std::collections::HashSet;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::reader::{parse, MAX_DIMS};

const BOUNDARY_BYTES: [u8; 6] = [0, 1, 0x7f, 0x80, 0xfe, 0xff];
const INTERESTING_U32: [u32; 20] = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 14, 30, 31, 32, 64, 0x7fff, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff];
const INTERESTING_U64: [u64; 16] =
    [0, 1, 2, 32, 64, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0x1_0000_0000, 1 << 40, 1 << 60, 1 << 62, (1 << 63) - 1, 1 << 63, u64::MAX - 1, u64::MAX];
/// Where the header, metadata and directory of the seeds lie: half the positions fall here.
const HEAD: usize = 1024;

/// The committed seed corpus.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf")
}

/// The `*.gguf` files of `dir`, by name; an error if there are none.
pub fn load_corpus(dir: &Path) -> io::Result<Vec<Vec<u8>>> {
    let mut paths: Vec<PathBuf> =
        std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "gguf")).collect();
    paths.sort();
    let seeds = paths.iter().map(std::fs::read).collect::<io::Result<Vec<_>>>()?;
    if seeds.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no *.gguf seeds in {}", dir.display())));
    }
    Ok(seeds)
}

/// Replaces `out` with a mutated copy of a random seed (1 to 4 stacked mutations).
pub fn mutate(rng: &mut ChaCha8Rng, corpus: &[Vec<u8>], out: &mut Vec<u8>) {
    out.clear();
    if let Some(seed) = pick(rng, corpus) {
        out.extend_from_slice(seed);
    }
    for _ in 0..rng.gen_range(1..=4) {
        mutate_once(rng, corpus, out);
    }
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> Option<&'a T> {
    if items.is_empty() {
        None
    } else {
        items.get(rng.gen_range(0..items.len()))
    }
}

/// A position at which `width` bytes fit (None if they do not), biased to the head.
fn position(rng: &mut ChaCha8Rng, len: usize, width: usize) -> Option<usize> {
    let last = len.checked_sub(width)?;
    let limit = if rng.gen_bool(0.5) { last.min(HEAD) } else { last };
    Some(rng.gen_range(0..=limit))
}

fn mutate_once(rng: &mut ChaCha8Rng, corpus: &[Vec<u8>], out: &mut Vec<u8>) {
    let len = out.len();
    match rng.gen_range(0..12) {
        0 => {
            if let Some(p) = position(rng, len, 1) {
                out[p] ^= 1 << rng.gen_range(0..8);
            }
        }
        1 => {
            if let Some(p) = position(rng, len, 1) {
                out[p] = BOUNDARY_BYTES[rng.gen_range(0..BOUNDARY_BYTES.len())];
            }
        }
        2 => {
            if let Some(p) = position(rng, len, 1) {
                out[p] = rng.gen();
            }
        }
        3 => {
            // A u32 field (value type, n_dims, ggml type, version): aligned or not.
            if let Some(mut p) = position(rng, len, 4) {
                if rng.gen_bool(0.5) {
                    p &= !3;
                }
                let v = INTERESTING_U32[rng.gen_range(0..INTERESTING_U32.len())];
                out[p..p + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        4 => {
            // A u64 field (count, string length, dimension, offset).
            if let Some(mut p) = position(rng, len, 8) {
                if rng.gen_bool(0.5) {
                    p &= !7;
                }
                let v = INTERESTING_U64[rng.gen_range(0..INTERESTING_U64.len())];
                out[p..p + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        5 => {
            // Nudge a u64 in place: off-by-a-little lengths and offsets.
            if let Some(p) = position(rng, len, 8) {
                let mut b = [0u8; 8];
                b.copy_from_slice(&out[p..p + 8]);
                let v = u64::from_le_bytes(b).wrapping_add_signed(rng.gen_range(-40i64..=40));
                out[p..p + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        6 => {
            if len > 0 {
                out.truncate(rng.gen_range(0..len));
            }
        }
        7 => {
            // Insert random bytes or a copy of a chunk of the input itself.
            let at = rng.gen_range(0..=len);
            let n = rng.gen_range(1..=64);
            let chunk: Vec<u8> = match position(rng, len, n) {
                Some(p) if rng.gen_bool(0.5) => out[p..p + n].to_vec(),
                _ => (0..n).map(|_| rng.gen()).collect(),
            };
            out.splice(at..at, chunk);
        }
        8 => {
            if len > 0 {
                let at = rng.gen_range(0..len);
                let n = rng.gen_range(1..=(len - at).min(64));
                out.drain(at..at + n);
            }
        }
        9 => {
            // Splice: this input's head with another seed's tail.
            if let Some(other) = pick(rng, corpus) {
                let at = rng.gen_range(0..=len);
                let from = rng.gen_range(0..=other.len());
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
        }
        10 => {
            // Overwrite a chunk with another part of the input.
            let n = rng.gen_range(1..=16);
            if let (Some(src), Some(dst)) = (position(rng, len, n), position(rng, len, n)) {
                out.copy_within(src..src + n, dst);
            }
        }
        _ => {
            // Zero a run (empty strings, zero counts and dims).
            let n = rng.gen_range(1..=8);
            if let Some(p) = position(rng, len, n) {
                out[p..p + n].fill(0);
            }
        }
    }
}

/// Parses `bytes` under `catch_unwind`; Err describes a panic or a broken guarantee.
pub fn check(bytes: &[u8]) -> Result<bool, String> {
    let path = Path::new("fuzz.gguf");
    let parsed = panic::catch_unwind(AssertUnwindSafe(|| parse(path, bytes))).map_err(|e| {
        let msg = e.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| e.downcast_ref::<String>().cloned());
        format!("panic: {}", msg.unwrap_or_else(|| "(non-string payload)".into()))
    })?;
    let Ok((_, metadata, alignment, tensors)) = parsed else { return Ok(false) };
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

pub struct Outcome {
    pub iterations: u64,
    /// Inputs the parser accepted (the rest it refused with an error).
    pub accepted: u64,
    pub elapsed: Duration,
    /// The first failing input and what went wrong.
    pub failure: Option<(Vec<u8>, String)>,
}

/// Mutates and checks until `iterations` or `time` (whichever comes first; at least one must
/// be given) or the first failure. The same seed and corpus give the same inputs.
pub fn run(corpus: &[Vec<u8>], seed: u64, iterations: Option<u64>, time: Option<Duration>) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let started = Instant::now();
    let mut input = Vec::new();
    let mut outcome = Outcome { iterations: 0, accepted: 0, elapsed: Duration::ZERO, failure: None };
    let max = iterations.unwrap_or(if time.is_some() { u64::MAX } else { 0 });
    while outcome.iterations < max {
        if outcome.iterations.is_multiple_of(256) && time.is_some_and(|t| started.elapsed() >= t) {
            break;
        }
        mutate(&mut rng, corpus, &mut input);
        outcome.iterations += 1;
        match check(&input) {
            Ok(accepted) => outcome.accepted += accepted as u64,
            Err(msg) => {
                outcome.failure = Some((input, msg));
                break;
            }
        }
    }
    outcome.elapsed = started.elapsed();
    outcome
}
