//! Live counters of an engine, readable from any thread while `generate` runs.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Stats {
    pub prompt_tokens_total: AtomicU64,
    pub generation_tokens_total: AtomicU64,
    pub running_sequences: AtomicU64,
    pub waiting_sequences: AtomicU64,
    pub kv_cache_tokens: AtomicU64,
    pub kv_cache_bytes: AtomicU64,
    /// The most `kv_cache_bytes` has been since the engine loaded.
    pub kv_cache_peak_bytes: AtomicU64,
    pub steps_total: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Relaxed);
    }

    pub fn set(gauge: &AtomicU64, v: usize) {
        gauge.store(v as u64, Relaxed);
    }

    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Relaxed)
    }
}
