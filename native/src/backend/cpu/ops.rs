//! Row-wise kernels: RMSNorm, rotary embeddings, SwiGLU, softmax. Each works on one row at a
//! time in a fixed order, so a row's result never depends on the other rows of a batch.

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

/// gate (n,) <- gelu_tanh(gate) * up, the tanh approximation of GELU
/// (`gelu_pytorch_tanh`): 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = 0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh()) * u;
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

/// Rotates every head (head_dim each) of `x` in place in the "rotate half" layout of
/// Hugging Face LLaMA (element i pairs with element i + head_dim/2), with one position's
/// cos and sin (head_dim/2 each).
pub fn rope_apply(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
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
    fn gelu_tanh_mul_matches_reference() {
        let (mut g, u) = (random(50, 6), random(50, 7));
        let g0 = g.clone();
        gelu_tanh_mul(&mut g, &u);
        for i in 0..50 {
            let x = g0[i] as f64;
            let r = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh()) * u[i] as f64;
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
}
