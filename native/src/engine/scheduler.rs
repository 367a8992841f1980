//! Continuous batching. Up to `max_batch` sequences are in flight; every step runs one row per
//! decoding sequence plus prompt chunks of prefilling ones through the model as a single
//! batch, samples where a sequence's last token was processed, retires finished sequences
//! and admits waiting ones into their slots.

use std::collections::VecDeque;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use super::sampler::{logprobs, Sampler, SamplingParams, TokenLogprobs};
use super::stats::Stats;
use super::Core;
use crate::backend::{Backend, StepRow};
use crate::error::{EngineError, Result};
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

/// A request waiting for a slot: a prompt of a `submit` call and where its output goes.
struct Pending {
    index: usize,
    prompt: Vec<u32>,
    params: SamplingParams,
    reply: mpsc::Sender<(usize, Result<Output>)>,
    submitted: Instant,
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
    reply: mpsc::Sender<(usize, Result<Output>)>,
    submitted: Instant,
}

impl Sequence {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}

struct Job {
    prompts: Vec<Vec<u32>>,
    params: Vec<SamplingParams>,
    reply: mpsc::Sender<(usize, Result<Output>)>,
    submitted: Instant,
}

/// The scheduler's thread. Requests can arrive at any time (`submit`, from any thread): they
/// join the running batch as slots free up, so concurrent calls share one batch and the
/// engine does not drain between them. Each call returns as soon as its own requests finish.
pub struct Worker {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Worker {
    pub fn start(core: Arc<Core>) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("upg-engine-scheduler".into())
            .spawn(move || crate::with_decoder!(&core.model, m => serve(&core, m, rx)))
            .map_err(|e| EngineError::InvalidArgument(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Worker { tx: Mutex::new(Some(tx)), handle: Mutex::new(Some(handle)) })
    }

    /// Runs `prompts` (checked) to completion with whatever else is in flight; outputs in
    /// request order.
    pub fn submit(&self, prompts: Vec<Vec<u32>>, params: Vec<SamplingParams>) -> Result<Vec<Output>> {
        let n = prompts.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let (reply, results) = mpsc::channel();
        let job = Job { prompts, params, reply, submitted: Instant::now() };
        let stopped = || EngineError::InvalidArgument("the engine's scheduler has stopped".into());
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref().ok_or_else(stopped)?.send(job).map_err(|_| stopped())?;
        let mut outputs: Vec<Option<Output>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            let (i, out) = results.recv().map_err(|_| stopped())?;
            outputs[i] = Some(out?);
        }
        Ok(outputs.into_iter().map(|o| o.expect("every request finishes")).collect())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // closing the channel ends the loop once its work is done
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(h) = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// The scheduler loop: admit waiting requests into free slots (within the KV budget), run one
/// step, sample, retire finished sequences to their callers; sleep when there is no work;
/// return when the engine is dropped.
fn serve<B: Backend>(engine: &Core, model: &Decoder<B>, jobs: mpsc::Receiver<Job>) {
    let stats = &engine.stats;
    let preallocated = model.backend.cache_preallocated();
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    let mut running: Vec<Sequence> = Vec::new();
    let mut cache: Option<B::Cache> = None;
    let mut slots = 0usize;
    let mut free_slots: Vec<usize> = Vec::new();
    let mut reserved = 0usize;
    let enqueue = |waiting: &mut VecDeque<Pending>, job: Job| {
        for (index, (prompt, params)) in job.prompts.into_iter().zip(job.params).enumerate() {
            waiting.push_back(Pending { index, prompt, params, reply: job.reply.clone(), submitted: job.submitted });
        }
    };
    loop {
        if running.is_empty() && waiting.is_empty() {
            // idle: let the cache go and sleep until work comes (or the engine is dropped)
            cache = None;
            Stats::set(&stats.running_sequences, 0);
            Stats::set(&stats.kv_cache_tokens, 0);
            Stats::set(&stats.kv_cache_bytes, 0);
            match jobs.recv() {
                Ok(job) => enqueue(&mut waiting, job),
                Err(_) => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            enqueue(&mut waiting, job);
        }
        if running.is_empty() {
            // (re)size the cache: max_batch slots where caches grow per sequence (an empty slot
            // costs nothing, and later calls join the batch); where each slot holds a whole
            // context, what waits now (up to max_batch and the KV budget), grown when idle
            let mut want = engine.max_batch;
            if preallocated {
                want = want.min(waiting.len());
                if let Some(budget) = engine.kv_budget {
                    want = want.min(budget / (engine.context * engine.kv_token_bytes()).max(1)).max(1);
                }
            }
            if cache.is_none() || want > slots {
                cache = None; // the old one goes before the new one is allocated
                match model.new_cache(want, engine.context) {
                    Ok(c) => cache = Some(c),
                    Err(e) => {
                        fail_all(&mut running, &mut waiting, &e);
                        continue;
                    }
                }
                slots = want;
                free_slots = (0..slots).rev().collect();
                reserved = 0;
            }
        }
        let Some(cache_ref) = cache.as_mut() else { continue };
        // Admission: a cache that grows per sequence admits one only when its reservation
        // fits beside the running ones' (first come, first served; `generate` refused any
        // that never fits).
        while let (Some(slot), Some(next)) = (free_slots.last().copied(), waiting.front()) {
            let need = engine.kv_reservation(next.prompt.len(), next.params.max_tokens);
            if let (Some(budget), false) = (engine.kv_budget, preallocated) {
                if reserved + need > budget && !running.is_empty() {
                    break; // waits for running sequences to finish and free their share
                }
            }
            reserved += need;
            free_slots.pop();
            let p = waiting.pop_front().unwrap();
            let sampler = Sampler::new(p.params.seed);
            let prompt_len = p.prompt.len();
            model.backend.cache_reserve(cache_ref, slot, (prompt_len + p.params.max_tokens).min(engine.context));
            running.push(Sequence {
                index: p.index,
                slot,
                tokens: p.prompt,
                prompt_len,
                processed: 0,
                params: p.params,
                sampler,
                first_token: None,
                logprobs: Vec::new(),
                reply: p.reply,
                submitted: p.submitted,
            });
        }
        Stats::set(&stats.running_sequences, running.len());
        Stats::set(&stats.waiting_sequences, waiting.len());

        let step = plan_step(&running);
        let logits = match engine.run_model(|| model.forward(&step.rows, cache_ref, &step.logit_rows)) {
            Ok(l) => l,
            Err(e) => {
                for seq in &running {
                    model.backend.cache_reset(cache_ref, seq.slot);
                }
                fail_all(&mut running, &mut waiting, &e);
                cache = None;
                continue;
            }
        };
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
        // Their callers hear of them last, once the stats say what is left, so a call that
        // returns sees its own sequences gone.
        finished.sort_by(|a, b| b.0.cmp(&a.0));
        let mut replies = Vec::with_capacity(finished.len());
        for (s, (text, reason)) in finished {
            let mut seq = running.swap_remove(s);
            let now = Instant::now();
            let logprobs = seq.params.logprobs.map(|_| std::mem::take(&mut seq.logprobs));
            let out = Output {
                token_ids: seq.generated().to_vec(),
                text,
                finish_reason: reason,
                prompt_tokens: seq.prompt_len,
                ttft_s: seq.first_token.map_or(0.0, |t| (t - seq.submitted).as_secs_f64()),
                latency_s: (now - seq.submitted).as_secs_f64(),
                logprobs,
            };
            replies.push((seq.reply, seq.index, out));
            model.backend.cache_reset(cache_ref, seq.slot);
            free_slots.push(seq.slot);
            reserved -= engine.kv_reservation(seq.prompt_len, seq.params.max_tokens);
        }
        Stats::set(&stats.kv_cache_tokens, running.iter().map(|s| s.processed).sum());
        let bytes = model.backend.cache_bytes(cache_ref);
        stats.kv_cache_peak_bytes.fetch_max(bytes as u64, std::sync::atomic::Ordering::Relaxed);
        Stats::set(&stats.running_sequences, running.len());
        if running.is_empty() && waiting.is_empty() {
            cache = None; // nothing left: the caches go before the callers return
            Stats::set(&stats.kv_cache_bytes, 0);
        } else {
            Stats::set(&stats.kv_cache_bytes, bytes);
        }
        for (reply, index, out) in replies {
            let _ = reply.send((index, Ok(out))); // a caller gone (after an error of its own) is fine
        }
    }
}

/// A failed step fails every request in flight or waiting (each caller gets the error).
fn fail_all(running: &mut Vec<Sequence>, waiting: &mut VecDeque<Pending>, e: &EngineError) {
    for seq in running.drain(..) {
        let _ = seq.reply.send((seq.index, Err(EngineError::InvalidArgument(e.to_string()))));
    }
    for p in waiting.drain(..) {
        let _ = p.reply.send((p.index, Err(EngineError::InvalidArgument(e.to_string()))));
    }
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
