//! Mutational fuzzer of the GGUF parser (stable Rust; see `upg_batch_native::gguf::fuzz`).
//!
//! cargo run --release --example fuzz_gguf -- [--seconds N] [--iterations N] [--seed S]
//!                                            [--corpus DIR] [--replay FILE]
//!
//! Mutates the seeds of `native/fuzz/corpus/gguf` (or `--corpus`) until the time or iteration
//! budget is spent (default 10 seconds). On a panic, or an accepted file that breaks the
//! reader's guarantees, it writes the input to `native/fuzz/crashes/` and exits with status 1.
//! `--replay FILE` checks one saved input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use upg_batch_native::gguf::fuzz;

/// The panic hook's report (message and location) of the last panic.
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

fn usage(message: &str) -> ExitCode {
    eprintln!("{message}\nusage: fuzz_gguf [--seconds N] [--iterations N] [--seed S] [--corpus DIR] [--replay FILE]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut seconds: Option<f64> = None;
    let mut iterations: Option<u64> = None;
    let mut seed: Option<u64> = None;
    let mut corpus = fuzz::corpus_dir();
    let mut replay: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else { return usage(&format!("{flag} needs a value")) };
        let ok = match flag.as_str() {
            "--seconds" => value.parse().map(|v| seconds = Some(v)).is_ok(),
            "--iterations" => value.parse().map(|v| iterations = Some(v)).is_ok(),
            "--seed" => value.parse().map(|v| seed = Some(v)).is_ok(),
            "--corpus" => {
                corpus = value.into();
                true
            }
            "--replay" => {
                replay = Some(value.into());
                true
            }
            _ => return usage(&format!("unknown argument {flag}")),
        };
        if !ok {
            return usage(&format!("bad value for {flag}"));
        }
    }

    if let Some(file) = replay {
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) => return usage(&format!("{}: {e}", file.display())),
        };
        return match fuzz::check(&bytes) {
            Ok(accepted) => {
                println!("{}: no failure ({})", file.display(), if accepted { "accepted" } else { "refused" });
                ExitCode::SUCCESS
            }
            Err(msg) => {
                println!("{}: {msg}", file.display());
                ExitCode::FAILURE
            }
        };
    }

    let seeds = match fuzz::load_corpus(&corpus) {
        Ok(s) => s,
        Err(e) => return usage(&format!("corpus {}: {e}", corpus.display())),
    };
    if seconds.is_none() && iterations.is_none() {
        seconds = Some(10.0);
    }
    let seed = seed.unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0));
    let time = seconds.map(|s| Duration::from_secs_f64(s.max(0.0)));
    println!("fuzz_gguf: {} seeds from {}, seed {seed}", seeds.len(), corpus.display());

    // Panics are caught and reported below, with the location the hook saw.
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = info.to_string();
        }
    }));
    let out = fuzz::run(&seeds, seed, iterations, time);
    let _ = std::panic::take_hook();

    let secs = out.elapsed.as_secs_f64();
    println!("{} iterations in {secs:.1} s ({:.0} iterations/s), {} inputs accepted", out.iterations, out.iterations as f64 / secs.max(1e-9), out.accepted);
    let Some((input, mut msg)) = out.failure else { return ExitCode::SUCCESS };
    if let Ok(last) = LAST_PANIC.lock() {
        if msg.starts_with("panic") && !last.is_empty() {
            msg = format!("{msg}\n  {last}");
        }
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/crashes");
    let file = dir.join(format!("crash-{seed}-{}.gguf", out.iterations));
    match std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&file, &input)) {
        Ok(()) => println!("FAILURE at iteration {}: {msg}\ninput written to {}", out.iterations, file.display()),
        Err(e) => println!("FAILURE at iteration {}: {msg}\ncould not write the input to {}: {e}", out.iterations, file.display()),
    }
    println!("replay: cargo run --release --example fuzz_gguf -- --replay {}", file.display());
    ExitCode::FAILURE
}
