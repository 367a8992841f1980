//! Byte-level mutation of binary formats whose fields are little-endian integers (counts,
//! lengths, types, offsets): the GGUF fuzzer's operators, shared by every target.

use rand::Rng;

use super::FuzzRng;

const BOUNDARY_BYTES: [u8; 6] = [0, 1, 0x7f, 0x80, 0xfe, 0xff];
const INTERESTING_U32: [u32; 20] = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 14, 30, 31, 32, 64, 0x7fff, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff];
pub const INTERESTING_U64: [u64; 16] =
    [0, 1, 2, 32, 64, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0x1_0000_0000, 1 << 40, 1 << 60, 1 << 62, (1 << 63) - 1, 1 << 63, u64::MAX - 1, u64::MAX];
/// Where the headers and directories of the seeds lie: half the positions fall here.
const HEAD: usize = 1024;

/// Replaces `out` with a mutated copy of a random seed (1 to 4 stacked mutations).
pub fn mutate(rng: &mut FuzzRng, corpus: &[Vec<u8>], out: &mut Vec<u8>) {
    out.clear();
    if let Some(seed) = pick(rng, corpus) {
        out.extend_from_slice(seed);
    }
    for _ in 0..rng.gen_range(1..=4) {
        mutate_once(rng, corpus, out);
    }
}

pub fn pick<'a, T>(rng: &mut FuzzRng, items: &'a [T]) -> Option<&'a T> {
    if items.is_empty() {
        None
    } else {
        items.get(rng.gen_range(0..items.len()))
    }
}

/// A position at which `width` bytes fit (None if they do not), biased to the head.
fn position(rng: &mut FuzzRng, len: usize, width: usize) -> Option<usize> {
    let last = len.checked_sub(width)?;
    let limit = if rng.gen_bool(0.5) { last.min(HEAD) } else { last };
    Some(rng.gen_range(0..=limit))
}

/// One mutation of `out` in place; `corpus` supplies tails to splice in.
pub fn mutate_once(rng: &mut FuzzRng, corpus: &[Vec<u8>], out: &mut Vec<u8>) {
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
