//! Per-sequence key/value cache: for each layer, K and V as (positions, kv_dim), in f32 or
//! (`kv_cache="f16"`, half the memory) f16, grown as the sequence grows.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// One layer's keys or values, (positions, kv_dim) row-major.
pub enum KvRows {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl KvRows {
    pub fn new(f16: bool) -> Self {
        if f16 {
            KvRows::F16(Vec::new())
        } else {
            KvRows::F32(Vec::new())
        }
    }

    fn len(&self) -> usize {
        match self {
            KvRows::F32(v) => v.len(),
            KvRows::F16(v) => v.len(),
        }
    }

    fn reserve_exact(&mut self, want: usize) {
        let more = want.saturating_sub(self.len());
        match self {
            KvRows::F32(v) if v.capacity() < want => v.reserve_exact(more),
            KvRows::F16(v) if v.capacity() < want => v.reserve_exact(more),
            _ => {}
        }
    }

    pub fn resize(&mut self, n: usize) {
        match self {
            KvRows::F32(v) => v.resize(n, 0.0),
            KvRows::F16(v) => v.resize(n, f16::ZERO),
        }
    }

    fn release(&mut self) {
        match self {
            KvRows::F32(v) => *v = Vec::new(),
            KvRows::F16(v) => *v = Vec::new(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvRows::F32(v) => v.capacity() * 4,
            KvRows::F16(v) => v.capacity() * 2,
        }
    }

    /// Stores `values` at element offset `at` (f16: rounded to nearest).
    pub fn write(&mut self, at: usize, values: &[f32]) {
        match self {
            KvRows::F32(v) => v[at..at + values.len()].copy_from_slice(values),
            KvRows::F16(v) => v[at..at + values.len()].convert_from_f32_slice(values),
        }
    }

    /// `out.len()` elements from offset `at`, as f32: a view of f32 storage, or `out` filled
    /// from f16 storage.
    #[inline]
    pub fn read<'a>(&'a self, at: usize, out: &'a mut [f32]) -> &'a [f32] {
        match self {
            KvRows::F32(v) => &v[at..at + out.len()],
            KvRows::F16(v) => {
                v[at..at + out.len()].convert_to_f32_slice(out);
                out
            }
        }
    }
}

pub struct SeqCache {
    /// Per layer: keys (len, kv_dim) and values (len, kv_dim).
    pub layers: Vec<(KvRows, KvRows)>,
    pub kv_dim: usize,
    /// Positions held.
    pub len: usize,
}

impl SeqCache {
    pub fn new(num_layers: usize, kv_dim: usize, f16: bool) -> Self {
        SeqCache { layers: (0..num_layers).map(|_| (KvRows::new(f16), KvRows::new(f16))).collect(), kv_dim, len: 0 }
    }

    /// Reserve memory for `positions` positions exactly (instead of letting growth double it).
    pub fn reserve(&mut self, positions: usize) {
        let want = positions * self.kv_dim;
        for (k, v) in &mut self.layers {
            k.reserve_exact(want);
            v.reserve_exact(want);
        }
    }

    /// Make room for positions 0..len.
    pub fn grow_to(&mut self, len: usize) {
        if len <= self.len {
            return;
        }
        for (k, v) in &mut self.layers {
            k.resize(len * self.kv_dim);
            v.resize(len * self.kv_dim);
        }
        self.len = len;
    }

    /// Forget all positions and free their memory: the next sequence in this slot reserves
    /// what it needs, so the cache holds exactly what running sequences reserved (which a
    /// memory budget counts on).
    pub fn reset(&mut self) {
        for (k, v) in &mut self.layers {
            k.release();
            v.release();
        }
        self.len = 0;
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.bytes() + v.bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_f16_cache_holds_half_the_bytes_and_rounds_to_nearest() {
        let (mut a, mut b) = (SeqCache::new(3, 64, false), SeqCache::new(3, 64, true));
        a.reserve(100);
        b.reserve(100);
        assert_eq!(a.bytes(), 3 * 2 * 100 * 64 * 4);
        assert_eq!(b.bytes() * 2, a.bytes());
        b.grow_to(1);
        let (k, _) = &mut b.layers[0];
        let values: Vec<f32> = (0..64).map(|i| 1.0 + i as f32 / 3000.0).collect();
        k.write(0, &values);
        let mut out = vec![0f32; 64];
        let got = k.read(0, &mut out).to_vec();
        for (g, v) in got.iter().zip(&values) {
            assert_eq!(*g, half::f16::from_f32(*v).to_f32());
        }
        assert!(got.iter().zip(&values).any(|(g, v)| g != v), "1 + i/3000 is not all f16-exact");
    }
}
