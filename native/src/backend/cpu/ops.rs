//! Row-wise kernels: RMSNorm, rotary embeddings, SwiGLU, softmax. Each works on one row at a
//! time in a fixed order, so a row's result never depends on the other rows of a batch.

use crate::model::config::RopeScaling;

/// out (d,) = x (d,) / sqrt(mean(x^2) + eps) * w (d,)
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
    debug_assert!(x.len() == w.len() && out.len() == x.len());
    let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let inv = (1.0 / (ss / x.len() as f64 + eps).sqrt()) as f32;
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// gate (n,) <- silu(gate) * up, silu(g) = g / (1 + e^-g)
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// x (n,) <- softmax(x), max-subtracted, summed in order.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Rotary position embeddings in the "rotate half" layout of Hugging Face LLaMA:
/// element i pairs with element i + head_dim/2.
pub struct Rope {
    /// Per pair i: the (possibly scaled) inverse frequency, in f64.
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let base: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
        let inv_freq = match *scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Rope { inv_freq }
    }

    /// cos and sin (head_dim/2 each) of every pair's angle at `pos`.
    pub fn table(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        self.inv_freq.iter().map(|&f| pos as f64 * f).map(|a| (a.cos() as f32, a.sin() as f32)).unzip()
    }

    /// Rotate every head (head_dim each) of `x` in place with a table from `table`.
    pub fn apply(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = head_dim / 2;
        for head in x.chunks_exact_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
    }

    #[test]
    fn rmsnorm_matches_reference() {
        let (x, w) = (random(77, 1), random(77, 2));
        let mut out = vec![0f32; 77];
        rmsnorm(&x, &w, 1e-5, &mut out);
        let ms: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 77.0;
        for i in 0..77 {
            let r = x[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
            assert!((out[i] as f64 - r).abs() < 1e-5 * r.abs().max(1.0), "element {i}");
        }
    }

    #[test]
    fn silu_mul_matches_reference() {
        let (mut g, u) = (random(50, 3), random(50, 4));
        let g0 = g.clone();
        silu_mul(&mut g, &u);
        for i in 0..50 {
            let r = g0[i] as f64 / (1.0 + (-(g0[i] as f64)).exp()) * u[i] as f64;
            assert!((g[i] as f64 - r).abs() < 1e-6, "element {i}");
        }
    }

    #[test]
    fn softmax_matches_reference_and_survives_large_logits() {
        let mut x = random(40, 5);
        x[3] = 80.0;
        let x0 = x.clone();
        softmax(&mut x);
        let m = x0.iter().copied().fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
        let z: f64 = x0.iter().map(|&v| (v as f64 - m).exp()).sum();
        for i in 0..40 {
            let r = (x0[i] as f64 - m).exp() / z;
            assert!((x[i] as f64 - r).abs() < 1e-6, "element {i}");
        }
    }

    /// Reference rotation straight from the definition q*cos + rotate_half(q)*sin.
    fn rope_reference(x: &[f32], head_dim: usize, pos: usize, inv_freq: &[f64]) -> Vec<f64> {
        let half = head_dim / 2;
        let mut out = vec![0f64; x.len()];
        for (h, head) in x.chunks(head_dim).enumerate() {
            for j in 0..head_dim {
                let i = j % half;
                let angle = pos as f64 * inv_freq[i];
                let rotated = if j < half { -(head[j + half] as f64) } else { head[j - half] as f64 };
                out[h * head_dim + j] = head[j] as f64 * angle.cos() + rotated * angle.sin();
            }
        }
        out
    }

    #[test]
    fn rope_matches_reference_with_and_without_llama3_scaling() {
        let head_dim = 16;
        let scalings = [
            RopeScaling::None,
            RopeScaling::Linear { factor: 4.0 },
            RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64.0 },
        ];
        for (s, scaling) in scalings.iter().enumerate() {
            let rope = Rope::new(head_dim, 500000.0, scaling);
            for pos in [0usize, 1, 37, 300] {
                let x = random(3 * head_dim, 10 + pos as u64);
                let mut y = x.clone();
                let (c, sn) = rope.table(pos);
                Rope::apply(&mut y, head_dim, &c, &sn);
                let r = rope_reference(&x, head_dim, pos, &rope.inv_freq);
                for i in 0..y.len() {
                    assert!((y[i] as f64 - r[i]).abs() < 1e-5, "scaling {s} pos {pos} element {i}");
                }
            }
        }
    }

    #[test]
    fn llama3_scaling_follows_the_three_bands() {
        // Wavelengths shorter than old/high_freq_factor keep their frequency; longer than
        // old/low_freq_factor are divided by factor; in between they are interpolated.
        let rope = Rope::new(16, 500000.0, &RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        });
        let base = Rope::new(16, 500000.0, &RopeScaling::None);
        let mut kinds = [0; 3];
        for (f, b) in rope.inv_freq.iter().zip(&base.inv_freq) {
            let wavelen = 2.0 * std::f64::consts::PI / b;
            if wavelen < 16.0 {
                assert_eq!(f, b);
                kinds[0] += 1;
            } else if wavelen > 64.0 {
                assert!((f - b / 8.0).abs() < 1e-15);
                kinds[1] += 1;
            } else {
                assert!(*f < *b && *f > b / 8.0);
                kinds[2] += 1;
            }
        }
        assert!(kinds[0] > 0 && kinds[1] > 0, "test shape must reach the outer bands: {kinds:?}");
    }
}
