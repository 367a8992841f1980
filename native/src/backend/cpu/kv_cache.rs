//! Per-sequence key/value cache: for each layer, K and V as (positions, kv_dim) f32,
//! grown as the sequence grows.

pub struct SeqCache {
    /// Per layer: keys (len, kv_dim) and values (len, kv_dim).
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
    pub kv_dim: usize,
    /// Positions held.
    pub len: usize,
}

impl SeqCache {
    pub fn new(num_layers: usize, kv_dim: usize) -> Self {
        SeqCache { layers: (0..num_layers).map(|_| (Vec::new(), Vec::new())).collect(), kv_dim, len: 0 }
    }

    /// Reserve memory for `positions` positions exactly (instead of letting growth double it).
    pub fn reserve(&mut self, positions: usize) {
        let want = positions * self.kv_dim;
        for (k, v) in &mut self.layers {
            if k.capacity() < want {
                k.reserve_exact(want - k.len());
                v.reserve_exact(want - v.len());
            }
        }
    }

    /// Make room for positions 0..len.
    pub fn grow_to(&mut self, len: usize) {
        if len <= self.len {
            return;
        }
        for (k, v) in &mut self.layers {
            k.resize(len * self.kv_dim, 0.0);
            v.resize(len * self.kv_dim, 0.0);
        }
        self.len = len;
    }

    /// Forget all positions, keeping the memory for the next sequence in this slot.
    pub fn reset(&mut self) {
        for (k, v) in &mut self.layers {
            k.clear();
            v.clear();
        }
        self.len = 0;
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| (k.capacity() + v.capacity()) * 4).sum()
    }
}
