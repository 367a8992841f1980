//! Per-sequence token sampling: greedy, temperature, top-k, top-p, min-p, applied in that
//! order (as transformers' logits warpers do). Each sequence owns a seeded RNG, so a
//! seeded prompt draws the same tokens whatever else is in the batch.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{EngineError, Result};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub min_p: f64,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Log-probabilities to report per generated token: None, or Some(k): the chosen
    /// token's and the k most likely (k <= MAX_TOP_LOGPROBS).
    pub logprobs: Option<usize>,
}

/// The most top log-probabilities a step reports (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One generated token's log-probability and the `k` most likely tokens' (descending, ties by
/// token id), under the model's distribution: log-softmax of the raw logits, before
/// temperature and filters (as vLLM and OpenAI report them).
pub type TokenLogprobs = (f32, Vec<(u32, f32)>);

pub fn logprobs(logits: &[f32], chosen: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    let lp = |l: f32| (l as f64 - lse) as f32;
    // the k best by one pass with a small sorted list (k <= 20)
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if top.len() == k && l <= top[k - 1].1 {
                continue; // not better than the k-th (a tie keeps the lower id, already in)
            }
            let at = top.partition_point(|&(_, v)| v >= l);
            top.insert(at, (i as u32, l));
            top.truncate(k);
        }
    }
    (lp(logits[chosen as usize]), top.into_iter().map(|(i, l)| (i, lp(l))).collect())
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 16,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: false,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self, index: usize) -> Result<()> {
        let bad = |field: &str, what: &str| {
            Err(EngineError::InvalidArgument(format!("sampling params of prompt {index}: `{field}` must be {what}")))
        };
        if self.max_tokens == 0 {
            return bad("max_tokens", ">= 1");
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", "a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "in [0, 1]");
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop", "non-empty strings");
        }
        if matches!(self.logprobs, Some(k) if k > MAX_TOP_LOGPROBS) {
            return bad("logprobs", "at most 20 (top log-probabilities per token)");
        }
        Ok(())
    }
}

pub struct Sampler {
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(seed: Option<u64>) -> Self {
        Sampler { rng: ChaCha8Rng::seed_from_u64(seed.unwrap_or_else(rand::random)) }
    }

    /// Next token from `logits` (vocab,).
    pub fn sample(&mut self, logits: &[f32], p: &SamplingParams) -> u32 {
        if p.temperature == 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let probs = filtered_distribution(logits, p);
        let u: f64 = self.rng.gen::<f64>();
        draw(&probs, u)
    }
}

/// Index of the largest logit; the lowest index wins a tie.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// (token, probability) pairs that survive the filters, renormalized to sum to 1: in
/// descending probability (ties by token id) when top-k or top-p applied, else in token order.
/// Sorting is confined to what a filter needs, so a 150k-token vocabulary costs O(vocab).
pub fn filtered_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
    let inv_t = 1.0 / p.temperature;
    if !inv_t.is_finite() {
        return vec![(argmax(logits), 1.0)];
    }
    let mut cand: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l as f64)).collect();
    if p.top_k > 0 && p.top_k < cand.len() {
        // Keep every token whose logit reaches the k-th largest (ties included, as
        // transformers' TopKLogitsWarper does).
        cand.select_nth_unstable_by(p.top_k - 1, by_probability);
        let kth = cand[p.top_k - 1].1;
        cand.retain(|c| c.1 >= kth);
        cand.sort_by(by_probability);
    }
    // Scale after subtracting the maximum: exponents stay <= 0 however small the temperature.
    let max = cand.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
    let mut total = 0.0;
    for c in cand.iter_mut() {
        c.1 = ((c.1 - max) * inv_t).exp();
        total += c.1;
    }
    for c in cand.iter_mut() {
        c.1 /= total;
    }
    if p.top_p < 1.0 {
        cand = top_p_prefix(cand, p.top_p);
    }
    if p.min_p > 0.0 {
        let threshold = p.min_p * cand.iter().map(|c| c.1).fold(0.0, f64::max);
        cand.retain(|c| c.1 >= threshold);
    }
    let total: f64 = cand.iter().map(|c| c.1).sum();
    for c in cand.iter_mut() {
        c.1 /= total;
    }
    cand
}

fn by_probability(a: &(u32, f64), b: &(u32, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The smallest most-likely prefix whose mass reaches `top_p`, sorted. The prefix nearly
/// always lies among the tokens within 1e-4 of the top probability, so those are sorted
/// first; every other token is less likely than all of them, so when their mass suffices the
/// prefix equals the one a full sort would give. Otherwise everything is sorted.
fn top_p_prefix(cand: Vec<(u32, f64)>, top_p: f64) -> Vec<(u32, f64)> {
    let max = cand.iter().map(|c| c.1).fold(0.0, f64::max);
    for cutoff in [max * 1e-4, 0.0] {
        let mut head: Vec<(u32, f64)> = cand.iter().copied().filter(|c| c.1 >= cutoff).collect();
        head.sort_by(by_probability);
        let mut cum = 0.0;
        for (i, c) in head.iter().enumerate() {
            cum += c.1;
            if cum >= top_p {
                head.truncate(i + 1);
                return head;
            }
        }
        if cutoff == 0.0 {
            return head; // rounding left the total a hair below top_p: keep everything
        }
    }
    unreachable!("the last cutoff keeps every token")
}

/// The token where the cumulative probability passes `u` in [0, 1).
fn draw(probs: &[(u32, f64)], u: f64) -> u32 {
    let mut cum = 0.0;
    for &(tok, pr) in probs {
        cum += pr;
        if u < cum {
            return tok;
        }
    }
    probs.last().map(|c| c.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {

    #[test]
    fn logprobs_are_the_log_softmax_of_the_raw_logits_with_the_top_k_in_order() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let want = |i: usize| ((logits[i] as f64).exp() / z).ln() as f32;
        let (lp, top) = logprobs(&logits, 4, 3);
        assert!((lp - want(4)).abs() < 1e-6);
        // descending; the tie between tokens 1 and 3 keeps the lower id first
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 0]);
        for (i, l) in top {
            assert!((l - want(i as usize)).abs() < 1e-6);
        }
        assert!(logprobs(&logits, 0, 0).1.is_empty());
        let big: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
        let (_, top) = logprobs(&big, 0, 20);
        let mut sorted: Vec<(u32, f32)> = big.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), sorted[..20].iter().map(|t| t.0).collect::<Vec<_>>());
    }

    use super::*;

    fn params(temperature: f64, top_k: usize, top_p: f64, min_p: f64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, min_p, ..Default::default() }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.1, 2.0, 1.9, -3.0];
        let mut s = Sampler::new(Some(1));
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &params(1.5, 1, 1.0, 0.0)), 1);
        }
    }

    #[test]
    fn filters_keep_what_they_should() {
        // probabilities 0.5, 0.25, 0.125, 0.125 at temperature 1
        let logits = [(0.5f32).ln(), (0.25f32).ln(), (0.125f32).ln(), (0.125f32).ln()];
        let ids = |d: Vec<(u32, f64)>| d.into_iter().map(|c| c.0).collect::<Vec<_>>();
        assert_eq!(ids(filtered_distribution(&logits, &params(1.0, 2, 1.0, 0.0))), vec![0, 1]);
        assert_eq!(ids(filtered_distribution(&logits, &params(1.0, 0, 0.7, 0.0))), vec![0, 1]);
        assert_eq!(ids(filtered_distribution(&logits, &params(1.0, 0, 0.5, 0.0))), vec![0]);
        assert_eq!(ids(filtered_distribution(&logits, &params(1.0, 0, 1.0, 0.3))), vec![0, 1]);
        let d = filtered_distribution(&logits, &params(1.0, 0, 0.7, 0.0));
        assert!((d[0].1 - 2.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn top_p_prefix_equals_the_full_sort_on_random_distributions() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for trial in 0..200 {
            let n = 1 + trial * 37 % 3000;
            let spread = [0.5f32, 3.0, 12.0][trial % 3];
            let logits: Vec<f32> = (0..n).map(|_| rng.gen_range(-spread..spread)).collect();
            let top_p = [0.1, 0.5, 0.9, 0.999, 0.99999][trial % 5];
            let got = filtered_distribution(&logits, &params(1.0, 0, top_p, 0.0));
            // Reference: sort everything, then take the prefix.
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let mut all: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, (l as f64 - m).exp())).collect();
            let z: f64 = all.iter().map(|c| c.1).sum();
            all.iter_mut().for_each(|c| c.1 /= z);
            all.sort_by(by_probability);
            let mut cum = 0.0;
            let keep = all.iter().position(|c| { cum += c.1; cum >= top_p }).map_or(all.len(), |i| i + 1);
            let want: Vec<u32> = all[..keep].iter().map(|c| c.0).collect();
            assert_eq!(got.iter().map(|c| c.0).collect::<Vec<_>>(), want, "trial {trial}: n {n}, top_p {top_p}");
        }
    }

    #[test]
    fn top_k_keeps_ties_with_the_kth_logit() {
        let logits = [3.0f32, 1.0, 2.0, 2.0, 0.5];
        let kept: Vec<u32> = filtered_distribution(&logits, &params(1.0, 2, 1.0, 0.0)).iter().map(|c| c.0).collect();
        assert_eq!(kept, vec![0, 2, 3]);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = params(1.0, 0, 1.0, 0.0);
        let a: Vec<u32> = (0..1).flat_map(|_| {
            let mut s = Sampler::new(Some(42));
            (0..30).map(|_| s.sample(&logits, &p)).collect::<Vec<_>>()
        }).collect();
        let mut s = Sampler::new(Some(42));
        let b: Vec<u32> = (0..30).map(|_| s.sample(&logits, &p)).collect();
        assert_eq!(a, b);
        assert!(a.iter().any(|&t| t != a[0]), "draws should vary at temperature 1");
    }
}
