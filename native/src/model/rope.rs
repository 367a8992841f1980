//! Rotary position embeddings: the (possibly scaled) frequency of every rotary pair, and the
//! cos/sin table of a step's positions that every backend's rotation reads.

use super::config::RopeScaling;

pub struct Rope {
    /// Per pair i: the (possibly scaled) inverse frequency, in f64.
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let base: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
        let inv_freq = match scaling {
            RopeScaling::None => base,
            RopeScaling::Factors(factors) => base.iter().zip(factors).map(|(f, d)| f / d).collect(),
            &RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            &RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
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

    /// Appends cos then sin (head_dim/2 each) at `pos` to `out`: one row of a step's table.
    pub fn push_row(&self, pos: usize, out: &mut Vec<f32>) {
        let (cos, sin) = self.table(pos);
        out.extend_from_slice(&cos);
        out.extend_from_slice(&sin);
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::backend::cpu::ops::rope_apply;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
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
                rope_apply(&mut y, head_dim, &c, &sn);
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
