//! The engine: a loaded model, its tokenizer and generation settings, a thread pool, and the
//! continuous-batching scheduler that serves `generate`.

pub mod model;
pub mod source;
pub mod sampler;
pub mod scheduler;
pub mod stats;

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokenizers::Tokenizer;

pub use self::model::Model;
use self::sampler::SamplingParams;
use self::source::ModelSource;
use self::scheduler::{FinishReason, Output, STEP_TOKENS};
use self::stats::Stats;
use crate::backend::{Backend, StepRow};
use crate::error::{EngineError, Result};

const MAX_THREADS: usize = 1024;
const MAX_BATCH: usize = 65536;

pub struct EngineOptions {
    pub backend: String,
    pub weights: String,
    pub threads: Option<usize>,
    pub max_batch: usize,
    pub context: Option<usize>,
    /// Fused kernels on backends that have them.
    pub fused: bool,
    /// Activations of block-format products: "" (the backend's own), "int8" or "f32".
    pub activations: String,
    /// The KV cache's element type: "" (f32), "f32" or "f16".
    pub kv_cache: String,
    /// The most bytes the KV cache may hold (None: no limit beyond max_batch and context).
    pub kv_cache_bytes: Option<usize>,
}

pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// A loaded model and its scheduler. `Engine` derefs to `Core`: the model, tokenizer and
/// settings, shared with the scheduler's thread.
pub struct Engine {
    core: Arc<Core>,
    worker: scheduler::Worker,
}

impl std::ops::Deref for Engine {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

pub struct Core {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub eos_token_ids: Vec<u32>,
    /// A GGUF file's chat template and special-token texts (folders keep theirs in
    /// tokenizer_config.json, read by the Python side).
    pub chat: Option<(Option<String>, Vec<(String, String)>)>,
    pub max_batch: usize,
    pub context: usize,
    /// The KV cache budget in bytes (`EngineOptions::kv_cache_bytes`).
    pub kv_budget: Option<usize>,
    pub threads: usize,
    pub stats: Stats,
    pool: rayon::ThreadPool,
    /// The model runs one forward pass at a time: the scheduler's steps and `logits` calls.
    model_lock: Mutex<()>,
}

impl Engine {
    pub fn load(model_dir: &Path, opts: EngineOptions) -> Result<Self> {
        if opts.max_batch == 0 {
            return Err(EngineError::InvalidArgument("max_batch must be >= 1".into()));
        }
        if matches!(opts.threads, Some(t) if t == 0 || t > MAX_THREADS) {
            return Err(EngineError::InvalidArgument(format!("threads must be between 1 and {MAX_THREADS} (or None for all cores)")));
        }
        if opts.max_batch > MAX_BATCH {
            return Err(EngineError::InvalidArgument(format!("max_batch must be at most {MAX_BATCH}")));
        }
        let source = ModelSource::open(model_dir, &opts.weights)?;
        let cfg = source.cfg.clone();
        let context = match opts.context {
            None => cfg.max_position_embeddings,
            Some(c) if c >= 2 && c <= cfg.max_position_embeddings => c,
            Some(c) => {
                return Err(EngineError::InvalidArgument(format!(
                    "context {c} must be between 2 and the model's max_position_embeddings ({})",
                    cfg.max_position_embeddings
                )))
            }
        };
        let threads = opts.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("upg-engine-{i}"))
            .build()
            .map_err(|e| EngineError::InvalidArgument(format!("cannot start {threads} threads: {e}")))?;
        let ModelSource { checkpoint, tokenizer, eos_token_ids, chat, scheme, .. } = source;
        let model = Model::load(&opts.backend, &opts.activations, &opts.kv_cache, &checkpoint, cfg, scheme, opts.fused)?;
        let engine = Core { model, tokenizer, eos_token_ids, chat, max_batch: opts.max_batch, context, kv_budget: opts.kv_cache_bytes, threads, stats: Stats::default(), pool, model_lock: Mutex::new(()) };
        if let Some(budget) = engine.kv_budget {
            // a backend that allocates whole contexts must fit one sequence of the context
            let one = engine.context * engine.kv_token_bytes();
            if crate::with_decoder!(&engine.model, m => m.backend.cache_preallocated()) && budget < one {
                return Err(EngineError::InvalidArgument(format!(
                    "kv_cache_bytes {budget} holds no sequence: the {} backend keeps a whole context ({} tokens, {one} bytes) per sequence; lower `context` or raise the budget",
                    engine.model.backend_name(),
                    engine.context
                )));
            }
        }
        let core = Arc::new(engine);
        let worker = scheduler::Worker::start(core.clone())?;
        Ok(Engine { core, worker })
    }

    /// Tokenizes and checks every request, then hands them to the scheduler, which batches
    /// them with whatever else is running (other threads' calls included) and returns when
    /// these are done.
    pub fn generate(&self, prompts: Vec<Prompt>, params: Vec<SamplingParams>) -> Result<Vec<Output>> {
        let ids = self.checked_requests(prompts, &params)?;
        self.worker.submit(ids, params)
    }
}

impl Core {
    /// Runs `f` on the engine's thread pool with the model to itself.
    pub(crate) fn run_model<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let _guard = self.model_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.pool.install(f)
    }

    /// Bytes of KV cache one position of one sequence takes on this engine's backend.
    pub fn kv_token_bytes(&self) -> usize {
        let c = self.model.cfg();
        crate::with_decoder!(&self.model, m => m.backend.cache_token_bytes(c.num_hidden_layers, c.kv_dim()))
    }

    /// The cache a sequence reserves: its prompt plus max_tokens positions, within the context.
    pub fn kv_reservation(&self, prompt_len: usize, max_tokens: usize) -> usize {
        (prompt_len + max_tokens).min(self.context) * self.kv_token_bytes()
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| EngineError::InvalidArgument(format!("cannot tokenize text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn detokenize(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids, "detokenize")?;
        self.tokenizer.decode(ids, true).map_err(|e| EngineError::InvalidArgument(format!("cannot detokenize: {e}")))
    }

    fn check_ids(&self, ids: &[u32], what: &str) -> Result<()> {
        let vocab = self.model.cfg().vocab_size;
        match ids.iter().position(|&t| t as usize >= vocab) {
            Some(i) => Err(EngineError::InvalidArgument(format!("{what}: token id {} at position {i} is outside the vocabulary of {vocab}", ids[i]))),
            None => Ok(()),
        }
    }

    /// Logits (len(ids), vocab) at every position of one sequence.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids, "logits")?;
        if ids.is_empty() {
            return Err(EngineError::InvalidArgument("logits: token_ids is empty".into()));
        }
        if ids.len() > self.context {
            return Err(EngineError::InvalidArgument(format!("logits: {} tokens exceed the context of {} tokens", ids.len(), self.context)));
        }
        let context = self.context;
        self.run_model(|| {
            crate::with_decoder!(&self.model, m => {
                let mut cache = m.new_cache(1, context)?;
                let mut out = Vec::with_capacity(ids.len() * m.cfg.vocab_size);
                for start in (0..ids.len()).step_by(STEP_TOKENS) {
                    let end = (start + STEP_TOKENS).min(ids.len());
                    let rows: Vec<StepRow> = (start..end).map(|pos| StepRow { slot: 0, pos, token: ids[pos] }).collect();
                    let all: Vec<usize> = (0..rows.len()).collect();
                    out.extend(m.forward(&rows, &mut cache, &all)?);
                }
                Ok(out)
            })
        })
    }

    /// Every request tokenized and checked (an error names the first bad one).
    fn checked_requests(&self, prompts: Vec<Prompt>, params: &[SamplingParams]) -> Result<Vec<Vec<u32>>> {
        if prompts.len() != params.len() {
            return Err(EngineError::InvalidArgument(format!("{} prompts but {} sampling params", prompts.len(), params.len())));
        }
        let mut ids = Vec::with_capacity(prompts.len());
        for (i, (prompt, p)) in prompts.into_iter().zip(params).enumerate() {
            p.validate(i)?;
            let t = match prompt {
                Prompt::Text(text) => self.tokenize(&text)?,
                Prompt::Ids(t) => t,
            };
            self.check_ids(&t, &format!("prompt {i}"))?;
            if t.is_empty() {
                return Err(EngineError::InvalidArgument(format!("prompt {i} is empty (no tokens)")));
            }
            if t.len() >= self.context {
                return Err(EngineError::PromptTooLong { index: i, tokens: t.len(), context: self.context });
            }
            if let Some(budget) = self.kv_budget {
                let need = self.kv_reservation(t.len(), p.max_tokens);
                let growing = !crate::with_decoder!(&self.model, m => m.backend.cache_preallocated());
                if growing && need > budget {
                    return Err(EngineError::InvalidArgument(format!("prompt {i}: needs {need} bytes of KV cache (prompt plus max_tokens), more than kv_cache_bytes {budget}")));
                }
            }
            ids.push(t);
        }
        Ok(ids)
    }

    /// Whether a sequence that just produced `generated` is done, and if so its text and why.
    pub fn check_finished(&self, generated: &[u32], prompt_len: usize, p: &SamplingParams) -> Option<(String, FinishReason)> {
        let last = *generated.last()?;
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, true).unwrap_or_default();
        if p.stop_token_ids.contains(&last) || (!p.ignore_eos && self.eos_token_ids.contains(&last)) {
            return Some((decode(&generated[..generated.len() - 1]), FinishReason::Stop));
        }
        if !p.stop.is_empty() {
            if let Some(text) = self.stop_string_cut(generated, &p.stop) {
                return Some((text, FinishReason::Stop));
            }
        }
        if generated.len() >= p.max_tokens || prompt_len + generated.len() >= self.context {
            return Some((decode(generated), FinishReason::Length));
        }
        None
    }

    /// The completion's text cut before the first stop string, if one has appeared.
    ///
    /// Called after every token, so a new match can only end in the last few tokens: only a
    /// tail of the completion is decoded (widened until it holds the longest stop string
    /// plus a margin for a mangled first character), which keeps each step O(stop length)
    /// instead of O(completion). The full text is decoded once, when the tail matches.
    fn stop_string_cut(&self, generated: &[u32], stops: &[String]) -> Option<String> {
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, true).unwrap_or_default();
        // A trailing U+FFFD is a multi-byte character split across tokens: it may still
        // complete, so it cannot match a stop string yet.
        let settled = |t: &str| t.trim_end_matches('\u{fffd}').len();
        let need = stops.iter().map(|s| s.len()).max().unwrap_or(0) + 16;
        let mut window = need;
        loop {
            let start = generated.len().saturating_sub(window);
            let tail = decode(&generated[start..]);
            let tail = &tail[..settled(&tail)];
            if start == 0 || tail.len() >= need {
                if !stops.iter().any(|s| tail.contains(s.as_str())) {
                    return None;
                }
                let full = decode(generated);
                let full = &full[..settled(&full)];
                let cut = stops.iter().filter_map(|s| full.find(s.as_str())).min()?;
                return Some(full[..cut].to_string());
            }
            window *= 2;
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.model.weight_bytes() as u64 + Stats::get(&self.stats.kv_cache_bytes)
    }
}

