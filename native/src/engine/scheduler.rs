//! Continuous batching. Up to `max_batch` sequences are in flight; every step runs one row per
//! decoding sequence plus prompt chunks of prefilling ones through the model as a single
//! batch, samples where a sequence's last token was processed, retires finished sequences
//! and admits waiting ones into their slots.

use std::collections::VecDeque;
use std::time::Instant;

use super::sampler::{logprobs, Sampler, SamplingParams, TokenLogprobs};
use super::stats::Stats;
use super::Engine;
use crate::backend::{Backend, StepRow};
use crate::error::Result;
use crate::model::decoder::Decoder;

/// Tokens per step at most (decode rows first, then prompt chunks): bounds activation memory.
pub const STEP_TOKENS: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

pub struct Output {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub ttft_s: f64,
    pub latency_s: f64,
    /// Per generated token, when the params asked for log-probabilities.
    pub logprobs: Option<Vec<TokenLogprobs>>,
}

struct Sequence {
    index: usize,
    slot: usize,
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    processed: usize,
    params: SamplingParams,
    sampler: Sampler,
    first_token: Option<Instant>,
    logprobs: Vec<TokenLogprobs>,
}

impl Sequence {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}

/// Runs every request to completion on `model`; outputs in request order.
pub fn run<B: Backend>(engine: &Engine, model: &Decoder<B>, prompts: Vec<Vec<u32>>, params: Vec<SamplingParams>) -> Result<Vec<Output>> {
    let start = Instant::now();
    let n = prompts.len();
    let mut outputs: Vec<Option<Output>> = (0..n).map(|_| None).collect();
    let mut waiting: VecDeque<(usize, Vec<u32>, SamplingParams)> =
        prompts.into_iter().zip(params).enumerate().map(|(i, (p, s))| (i, p, s)).collect();
    let max_batch = engine.max_batch;
    let mut slots = max_batch.min(n);
    // The KV budget: a backend that allocates whole contexts gets as many slots as fit; one
    // whose caches grow admits a sequence only when its reservation fits beside the running
    // ones' (first come, first served; Engine::generate refused any that never fits).
    let preallocated = model.backend.cache_preallocated();
    if let (Some(budget), true) = (engine.kv_budget, preallocated) {
        slots = slots.min(budget / (engine.context * engine.kv_token_bytes()).max(1)).max(1);
    }
    let mut reserved = 0usize;
    let mut cache = model.new_cache(slots, engine.context)?;
    let mut free_slots: Vec<usize> = (0..slots).rev().collect();
    let mut running: Vec<Sequence> = Vec::new();
    let stats = &engine.stats;

    loop {
        while let (Some(slot), Some((_, next, next_params))) = (free_slots.last().copied(), waiting.front()) {
            let need = engine.kv_reservation(next.len(), next_params.max_tokens);
            if let (Some(budget), false) = (engine.kv_budget, preallocated) {
                if reserved + need > budget && !running.is_empty() {
                    break; // waits for running sequences to finish and free their share
                }
            }
            reserved += need;
            free_slots.pop();
            let (index, prompt, params) = waiting.pop_front().unwrap();
            let sampler = Sampler::new(params.seed);
            let prompt_len = prompt.len();
            model.backend.cache_reserve(&mut cache, slot, (prompt_len + params.max_tokens).min(engine.context));
            running.push(Sequence { index, slot, tokens: prompt, prompt_len, processed: 0, params, sampler, first_token: None, logprobs: Vec::new() });
        }
        Stats::set(&stats.running_sequences, running.len());
        Stats::set(&stats.waiting_sequences, waiting.len());
        if running.is_empty() {
            break;
        }

        let step = plan_step(&running);
        let logits = model.forward(&step.rows, &mut cache, &step.logit_rows)?;
        let mut prompt_tokens = 0;
        for &(s, take) in &step.takes {
            let seq = &mut running[s];
            prompt_tokens += (seq.processed + take).min(seq.prompt_len).saturating_sub(seq.processed);
            seq.processed += take;
        }
        Stats::add(&stats.prompt_tokens_total, prompt_tokens);
        Stats::add(&stats.steps_total, 1);

        let vocab = model.cfg.vocab_size;
        let mut finished = Vec::new();
        for (j, &s) in step.samplers.iter().enumerate() {
            let seq = &mut running[s];
            let row = &logits[j * vocab..(j + 1) * vocab];
            let token = seq.sampler.sample(row, &seq.params);
            if let Some(k) = seq.params.logprobs {
                seq.logprobs.push(logprobs(row, token, k));
            }
            seq.tokens.push(token);
            seq.first_token.get_or_insert_with(Instant::now);
            Stats::add(&stats.generation_tokens_total, 1);
            if let Some(out) = engine.check_finished(seq.generated(), seq.prompt_len, &seq.params) {
                finished.push((s, out));
            }
        }
        // Retire finished sequences (highest index first so swap_remove keeps the others valid).
        finished.sort_by(|a, b| b.0.cmp(&a.0));
        for (s, (text, reason)) in finished {
            let mut seq = running.swap_remove(s);
            let now = Instant::now();
            let logprobs = seq.params.logprobs.map(|_| std::mem::take(&mut seq.logprobs));
            outputs[seq.index] = Some(Output {
                token_ids: seq.generated().to_vec(),
                text,
                finish_reason: reason,
                prompt_tokens: seq.prompt_len,
                ttft_s: seq.first_token.map_or(0.0, |t| (t - start).as_secs_f64()),
                latency_s: (now - start).as_secs_f64(),
                logprobs,
            });
            model.backend.cache_reset(&mut cache, seq.slot);
            free_slots.push(seq.slot);
            reserved -= engine.kv_reservation(seq.prompt_len, seq.params.max_tokens);
        }
        Stats::set(&stats.kv_cache_tokens, running.iter().map(|s| s.processed).sum());
        let bytes = model.backend.cache_bytes(&cache);
        Stats::set(&stats.kv_cache_bytes, bytes);
        stats.kv_cache_peak_bytes.fetch_max(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }
    // The caches are freed on return.
    Stats::set(&stats.running_sequences, 0);
    Stats::set(&stats.kv_cache_tokens, 0);
    Stats::set(&stats.kv_cache_bytes, 0);
    Ok(outputs.into_iter().map(|o| o.expect("every request finishes")).collect())
}

struct Step {
    rows: Vec<StepRow>,
    /// Rows whose logits are needed: the last token of a sequence.
    logit_rows: Vec<usize>,
    /// For each logit row, the index of its sequence in `running`.
    samplers: Vec<usize>,
    /// (index in `running`, rows it has in this step).
    takes: Vec<(usize, usize)>,
}

/// Rows of the next step: one per decoding sequence, then prompt chunks while the token
/// budget lasts.
fn plan_step(running: &[Sequence]) -> Step {
    let mut step = Step { rows: vec![], logit_rows: vec![], samplers: vec![], takes: vec![] };
    let budget = STEP_TOKENS.max(running.len());
    let decoding = running.iter().enumerate().filter(|(_, s)| s.processed >= s.prompt_len);
    let prefilling = running.iter().enumerate().filter(|(_, s)| s.processed < s.prompt_len);
    for (i, s) in decoding.chain(prefilling) {
        let todo = s.tokens.len() - s.processed;
        let take = todo.min(budget - step.rows.len());
        if take == 0 {
            break;
        }
        for pos in s.processed..s.processed + take {
            step.rows.push(StepRow { slot: s.slot, pos, token: s.tokens[pos] });
        }
        step.takes.push((i, take));
        if take == todo {
            step.logit_rows.push(step.rows.len() - 1);
            step.samplers.push(i);
        }
    }
    step
}
