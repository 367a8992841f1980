//! Causal attention of one query row over a sequence's KV cache.

use super::ops::softmax;

/// One head of one query row.
/// q (head_dim,), keys/values (positions, kv_dim) row-major, this head's kv offset `kv_off`;
/// attends to positions `first..=last`. out (head_dim,) = softmax(q.K^T * scale) @ V.
#[allow(clippy::too_many_arguments)]
pub fn attend_head(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    kv_dim: usize,
    kv_off: usize,
    first: usize,
    last: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len();
    scores.clear();
    for p in first..=last {
        let k = &keys[p * kv_dim + kv_off..p * kv_dim + kv_off + hd];
        scores.push(dot(q, k) * scale);
    }
    softmax(scores);
    out.fill(0.0);
    for (j, p) in (first..=last).enumerate() {
        let v = &values[p * kv_dim + kv_off..p * kv_dim + kv_off + hd];
        let w = scores[j];
        for i in 0..hd {
            out[i] += w * v[i];
        }
    }
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
        let (q, keys, values) = (r(hd), r(positions * kv_dim), r(positions * kv_dim));
        for (first, last) in [(0, 0), (0, 8), (3, 6)] {
            let kv_off = hd;
            let mut out = vec![0f32; hd];
            attend_head(&q, &keys, &values, kv_dim, kv_off, first, last, 0.25, &mut vec![], &mut out);
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
                assert!((out[i] as f64 - reference).abs() < 1e-5, "window {first}..={last} element {i}");
            }
        }
    }
}
