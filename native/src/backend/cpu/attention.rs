//! Causal attention of one query row over a sequence's KV cache.
//!
//! One pass with an online softmax: each position's score updates the running maximum m, the
//! running sum of weights l and the output (rescaled by exp(m_old - m_new) when the maximum
//! grows), so keys and values are read once, together, and no score buffer is kept. The order
//! is fixed (positions ascending), so a row's result does not depend on the batch.

use super::kv_cache::KvRows;

/// Scratch rows for reading an f16 cache (unused with f32).
pub struct Scratch {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Scratch {
    pub fn new(head_dim: usize) -> Self {
        Scratch { k: vec![0.0; head_dim], v: vec![0.0; head_dim] }
    }
}

/// One head of one query row.
/// q (head_dim,), keys/values (positions, kv_dim) row-major, this head's kv offset `kv_off`;
/// attends to positions `first..=last`. out (head_dim,) = softmax(q.K^T * scale) @ V.
#[allow(clippy::too_many_arguments)]
pub fn attend_head(q: &[f32], keys: &KvRows, values: &KvRows, kv_dim: usize, kv_off: usize, first: usize, last: usize, scale: f32, scratch: &mut Scratch, out: &mut [f32]) {
    let hd = q.len();
    let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
    out.fill(0.0);
    for p in first..=last {
        let at = p * kv_dim + kv_off;
        let s = dot(q, keys.read(at, &mut scratch.k[..hd])) * scale;
        let v = values.read(at, &mut scratch.v[..hd]);
        if s > m {
            // a new maximum: what was summed so far shrinks by exp(m - s) (0 at the start)
            let c = (m - s).exp();
            l = l * c + 1.0;
            out.iter_mut().zip(v).for_each(|(o, &x)| *o = *o * c + x);
            m = s;
        } else {
            let w = (s - m).exp();
            l += w;
            out.iter_mut().zip(v).for_each(|(o, &x)| *o += w * x);
        }
    }
    let inv = 1.0 / l;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// a . b in eight lanes (so that it vectorizes) and a fixed order: lanes, pairwise lane sum,
/// then the tail.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n8 = a.len() / 8 * 8;
    let mut lanes = [0f32; 8];
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += ca[l] * cb[l];
        }
    }
    let quad = [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
    let mut s = (quad[0] + quad[2]) + (quad[1] + quad[3]);
    for i in n8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn attend_head_matches_reference_over_a_window() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (hd, kv_heads, positions) = (16, 2, 9);
        let kv_dim = hd * kv_heads;
        let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect() };
        let (q, mut keys, values) = (r(hd), r(positions * kv_dim), r(positions * kv_dim));
        keys[5 * kv_dim + hd] = 40.0; // one large score: the running maximum must rescale
        for (f16, tol) in [(false, 1e-5), (true, 4e-3)] {
          for (first, last) in [(0, 0), (0, 8), (3, 6)] {
            let kv_off = hd;
            let mut out = vec![0f32; hd];
            let (mut k, mut v) = (KvRows::new(f16), KvRows::new(f16));
            k.resize(keys.len());
            v.resize(values.len());
            k.write(0, &keys);
            v.write(0, &values);
            attend_head(&q, &k, &v, kv_dim, kv_off, first, last, 0.25, &mut Scratch::new(hd), &mut out);
            let s: Vec<f64> = (first..=last)
                .map(|p| (0..hd).map(|i| q[i] as f64 * keys[p * kv_dim + kv_off + i] as f64).sum::<f64>() * 0.25)
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
            for i in 0..hd {
                let reference: f64 = (first..=last)
                    .enumerate()
                    .map(|(j, p)| (s[j] - m).exp() / z * values[p * kv_dim + kv_off + i] as f64)
                    .sum();
                assert!((out[i] as f64 - reference).abs() < tol, "f16 {f16}: window {first}..={last} element {i}");
            }
          }
        }
    }
}
