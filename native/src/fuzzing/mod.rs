//! Mutational fuzzing on stable Rust for the loaders of untrusted model files, shared by the
//! fuzz examples (`fuzz_gguf`, `fuzz_model_files`) and the loaders' bounded tests. There is no
//! coverage feedback: each `Target` mutates its seed corpus (`native/fuzz/corpus/<target>/`)
//! with format-aware operators and checks every input under `catch_unwind`. An input fails on
//! a panic, on an accepted file that breaks the loader's guarantees, on taking longer than the
//! hang limit, or on allocating more than the allocation limit at once (counted where the
//! binary installs `alloc::Counting`).

pub mod alloc;
pub mod bytes;
pub mod cli;
pub mod json;

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::SeedableRng;

pub type FuzzRng = rand_chacha::ChaCha8Rng;

/// One loader under test.
pub trait Target: Send + Sync {
    fn name(&self) -> &'static str;
    /// The extension of the seed files (and of saved failing inputs).
    fn extension(&self) -> &'static str;
    /// Replaces `out` with a mutated copy of a seed of `corpus`.
    fn mutate(&self, rng: &mut FuzzRng, corpus: &[Vec<u8>], out: &mut Vec<u8>);
    /// Ok(true): accepted, every guarantee holding; Ok(false): refused with an error;
    /// Err: what broke.
    fn check(&self, bytes: &[u8]) -> Result<bool, String>;
}

/// The committed seed corpus of `target`.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

/// The `*.<extension>` files of `dir`, by name; an error if there are none.
pub fn load_corpus(dir: &Path, extension: &str) -> io::Result<Vec<Vec<u8>>> {
    let mut paths: Vec<PathBuf> =
        std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == extension)).collect();
    paths.sort();
    let seeds = paths.iter().map(std::fs::read).collect::<io::Result<Vec<_>>>()?;
    if seeds.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no *.{extension} seeds in {}", dir.display())));
    }
    Ok(seeds)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Panic,
    /// Took longer than `Limits::hang`.
    Hang,
    /// Allocated more than `Limits::alloc` at once.
    Alloc,
    /// Accepted a file that breaks the loader's guarantees.
    Guarantee,
}

pub struct Failure {
    pub input: Vec<u8>,
    pub kind: Kind,
    pub message: String,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Stop after this many inputs or this long, whichever comes first (one must be given).
    pub iterations: Option<u64>,
    pub time: Option<Duration>,
    /// The longest one input may take.
    pub hang: Duration,
    /// The most bytes one input may have live at once: `alloc.0 + alloc.1 * input length`.
    pub alloc: (usize, usize),
    /// Go on after a failure (counting them) rather than stop at the first.
    pub keep_going: bool,
}

impl Limits {
    pub fn new(iterations: Option<u64>, time: Option<Duration>) -> Self {
        // 2 s for one file of a few KB is a hang; 32 MiB is hundreds of times what any seed
        // needs, and far below what a size taken from a field would ask for.
        Limits { iterations, time, hang: Duration::from_secs(2), alloc: (32 << 20, 256), keep_going: false }
    }
}

pub struct Outcome {
    pub iterations: u64,
    /// Inputs the loader accepted (the rest it refused with an error).
    pub accepted: u64,
    pub elapsed: Duration,
    /// The longest any one input took, and the most bytes any one had live at once.
    pub slowest: Duration,
    pub peak_alloc: usize,
    /// The first failing input of each distinct message (up to 32; one unless `keep_going`).
    pub failures: Vec<Failure>,
    /// Failures of each kind, in the order of `KINDS`.
    pub counts: [u64; 4],
}

pub const KINDS: [Kind; 4] = [Kind::Panic, Kind::Hang, Kind::Alloc, Kind::Guarantee];

/// Where the last panic happened, when a binary's panic hook records it (`record_panics`).
pub static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

/// Replaces the panic hook: panics are caught and reported with their location, not printed.
pub fn record_panics() {
    panic::set_hook(Box::new(|info| {
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = info.location().map(|l| l.to_string()).unwrap_or_default();
        }
    }));
}

/// The input being checked and when its check began, for a watchdog on another thread: a
/// check that never returns cannot report itself.
pub struct Watch {
    started_ms: AtomicU64,
    pub input: Mutex<Vec<u8>>,
    epoch: std::sync::OnceLock<Instant>,
}

impl Watch {
    pub const fn new() -> Self {
        Watch { started_ms: AtomicU64::new(0), input: Mutex::new(Vec::new()), epoch: std::sync::OnceLock::new() }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
    }

    fn begin(&self, input: &[u8]) {
        if let Ok(mut held) = self.input.lock() {
            held.clear();
            held.extend_from_slice(input);
        }
        self.started_ms.store(self.now_ms(), Relaxed);
    }

    fn end(&self) {
        self.started_ms.store(0, Relaxed);
    }

    /// How long the current check has run (None between checks).
    pub fn busy_for(&self) -> Option<Duration> {
        match self.started_ms.load(Relaxed) {
            0 => None,
            t => Some(Duration::from_millis(self.now_ms().saturating_sub(t))),
        }
    }
}

impl Default for Watch {
    fn default() -> Self {
        Self::new()
    }
}

/// Checks one input under `catch_unwind`, within the time and allocation limits.
pub fn check_one(target: &dyn Target, input: &[u8], limits: &Limits) -> (Result<bool, (Kind, String)>, Duration, usize) {
    let mark = alloc::begin();
    let started = Instant::now();
    let result = panic::catch_unwind(AssertUnwindSafe(|| target.check(input)));
    let took = started.elapsed();
    let peak = alloc::peak_since(mark);
    let result = match result {
        Err(e) => {
            let at = LAST_PANIC.lock().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default();
            Err((Kind::Panic, format!("panic at {at}: {}", crate::error::panic_message(e.as_ref()))))
        }
        Ok(Err(msg)) => Err((Kind::Guarantee, msg)),
        Ok(Ok(_)) if took > limits.hang => Err((Kind::Hang, format!("took {:.2} s (limit {:.1} s)", took.as_secs_f64(), limits.hang.as_secs_f64()))),
        Ok(Ok(_)) if peak > limits.alloc.0.saturating_add(limits.alloc.1.saturating_mul(input.len())) => {
            Err((Kind::Alloc, format!("{peak} bytes live at once for a {}-byte input", input.len())))
        }
        Ok(Ok(accepted)) => Ok(accepted),
    };
    (result, took, peak)
}

/// Mutates and checks until the limits are reached or an input fails. The same seed and
/// corpus give the same inputs.
pub fn run(target: &dyn Target, corpus: &[Vec<u8>], seed: u64, limits: &Limits, watch: Option<&Watch>) -> Outcome {
    let mut rng = FuzzRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut input = Vec::new();
    let mut out = Outcome { iterations: 0, accepted: 0, elapsed: Duration::ZERO, slowest: Duration::ZERO, peak_alloc: 0, failures: Vec::new(), counts: [0; 4] };
    let max = limits.iterations.unwrap_or(if limits.time.is_some() { u64::MAX } else { 0 });
    while out.iterations < max {
        if out.iterations.is_multiple_of(256) && limits.time.is_some_and(|t| started.elapsed() >= t) {
            break;
        }
        target.mutate(&mut rng, corpus, &mut input);
        out.iterations += 1;
        if let Some(w) = watch {
            w.begin(&input);
        }
        let (result, took, peak) = check_one(target, &input, limits);
        if let Some(w) = watch {
            w.end();
        }
        out.slowest = out.slowest.max(took);
        out.peak_alloc = out.peak_alloc.max(peak);
        match result {
            Ok(accepted) => out.accepted += accepted as u64,
            Err((kind, message)) => {
                out.counts[KINDS.iter().position(|&k| k == kind).unwrap_or(0)] += 1;
                if out.failures.len() < 32 && !out.failures.iter().any(|f| f.message == message) {
                    out.failures.push(Failure { input: input.clone(), kind, message });
                }
                if !limits.keep_going {
                    break;
                }
            }
        }
    }
    out.elapsed = started.elapsed();
    out
}

/// Runs `target` over its committed corpus for a bounded test: every seed must be accepted,
/// then `iterations` mutated inputs must pass. Panics with the failing input otherwise.
pub fn bounded_test(target: &dyn Target, seed: u64, iterations: u64) {
    let corpus = load_corpus(&corpus_dir(target.name()), target.extension()).unwrap();
    let limits = Limits::new(Some(iterations), None);
    for (i, s) in corpus.iter().enumerate() {
        match check_one(target, s, &limits).0 {
            Ok(true) => {}
            other => panic!("{} seed #{i} is not accepted: {other:?}", target.name()),
        }
    }
    let out = run(target, &corpus, seed, &limits, None);
    if let Some(f) = out.failures.first() {
        let shown = String::from_utf8_lossy(&f.input[..f.input.len().min(4096)]).into_owned();
        panic!("{}: {:?}: {} on a {}-byte input (run the fuzz example to save it): {shown:?}", target.name(), f.kind, f.message, f.input.len());
    }
    assert_eq!(out.iterations, iterations);
}
