//! The command line of the fuzz examples:
//!
//!   [--target NAME|all] [--seconds N] [--iterations N] [--seed S] [--corpus DIR]
//!   [--replay FILE] [--hang-seconds N] [--alloc-mib N] [--keep-going] [--json FILE]
//!
//! `--seconds` and `--iterations` are per target (default 10 seconds). A failing input is
//! written to `native/fuzz/crashes/` and the exit status is 1; `--keep-going` counts failures
//! and saves the first input of each distinct one. A watchdog saves the input of a check that
//! never returns, and a single allocation over 1 GiB saves the input before the process
//! aborts. `--json` writes a summary (inputs, time, failures, peak RSS).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::{alloc, load_corpus, record_panics, run, Limits, Target, Watch};

static WATCH: Watch = Watch::new();
/// Where the watchdog and the allocation ceiling save the input, and the command to replay it.
static SAVE_AS: Mutex<Option<(PathBuf, String)>> = Mutex::new(None);

const CEILING: usize = 1 << 30;

fn usage(program: &str, message: &str) -> ExitCode {
    eprintln!("{message}\nusage: {program} [--target NAME|all] [--seconds N] [--iterations N] [--seed S] [--corpus DIR] [--replay FILE] [--hang-seconds N] [--alloc-mib N] [--keep-going] [--json FILE]");
    ExitCode::from(2)
}

fn crash_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/crashes")
}

/// Writes the input being checked to the path set for this run (watchdog and ceiling).
fn save_current(why: &str) {
    let Some((file, replay)) = SAVE_AS.lock().ok().and_then(|s| s.clone()) else { return };
    let input = WATCH.input.lock().map(|i| i.clone()).unwrap_or_default();
    let _ = std::fs::create_dir_all(crash_dir());
    match std::fs::write(&file, &input) {
        Ok(()) => println!("FAILURE: {why}\ninput written to {}\nreplay: {replay} {}", file.display(), file.display()),
        Err(e) => println!("FAILURE: {why}\ncould not write the input to {}: {e}", file.display()),
    }
}

fn over_ceiling(size: usize) {
    save_current(&format!("one allocation of {size} bytes (ceiling {CEILING}); the process aborts"));
}

/// Peak resident memory of this process (Linux), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
    Some(kb * 1024)
}

pub fn main(program: &str, targets: &[&dyn Target]) -> ExitCode {
    let mut seconds: Option<f64> = None;
    let mut iterations: Option<u64> = None;
    let mut seed: Option<u64> = None;
    let mut corpus: Option<PathBuf> = None;
    let mut replay: Option<PathBuf> = None;
    let mut summary: Option<PathBuf> = None;
    let mut hang = 2.0f64;
    let mut alloc_mib: Option<usize> = None;
    let mut keep_going = false;
    let mut chosen = if targets.len() == 1 { targets[0].name().to_string() } else { "all".to_string() };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--keep-going" {
            keep_going = true;
            continue;
        }
        let Some(value) = args.next() else { return usage(program, &format!("{flag} needs a value")) };
        let ok = match flag.as_str() {
            "--seconds" => value.parse().map(|v| seconds = Some(v)).is_ok(),
            "--iterations" => value.parse().map(|v| iterations = Some(v)).is_ok(),
            "--seed" => value.parse().map(|v| seed = Some(v)).is_ok(),
            "--hang-seconds" => value.parse().map(|v| hang = v).is_ok(),
            "--alloc-mib" => value.parse().map(|v| alloc_mib = Some(v)).is_ok(),
            "--target" => {
                chosen = value;
                true
            }
            "--corpus" => {
                corpus = Some(value.into());
                true
            }
            "--replay" => {
                replay = Some(value.into());
                true
            }
            "--json" => {
                summary = Some(value.into());
                true
            }
            _ => return usage(program, &format!("unknown argument {flag}")),
        };
        if !ok {
            return usage(program, &format!("bad value for {flag}"));
        }
    }
    let names: Vec<&str> = targets.iter().map(|t| t.name()).collect();
    let selected: Vec<&dyn Target> = targets.iter().copied().filter(|t| chosen == "all" || t.name() == chosen).collect();
    if selected.is_empty() {
        return usage(program, &format!("unknown target {chosen:?} (targets: {}, all)", names.join(", ")));
    }
    if selected.len() > 1 && (corpus.is_some() || replay.is_some()) {
        return usage(program, "--corpus and --replay need one --target");
    }
    let mut limits = Limits::new(iterations, None);
    limits.hang = Duration::from_secs_f64(hang.max(0.001));
    limits.keep_going = keep_going;
    if let Some(mib) = alloc_mib {
        limits.alloc.0 = mib << 20;
    }
    record_panics();

    if let Some(file) = replay {
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) => return usage(program, &format!("{}: {e}", file.display())),
        };
        let (result, took, peak) = super::check_one(selected[0], &bytes, &limits);
        println!("{}: {:.1} ms, {} KiB allocated at most", file.display(), took.as_secs_f64() * 1e3, peak >> 10);
        return match result {
            Ok(accepted) => {
                println!("{}: no failure ({})", file.display(), if accepted { "accepted" } else { "refused" });
                ExitCode::SUCCESS
            }
            Err((kind, msg)) => {
                println!("{}: {kind:?}: {msg}", file.display());
                ExitCode::FAILURE
            }
        };
    }

    if seconds.is_none() && iterations.is_none() {
        seconds = Some(10.0);
    }
    limits.time = seconds.map(|s| Duration::from_secs_f64(s.max(0.0)));
    let seed = seed.unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0));
    alloc::set_ceiling(CEILING, over_ceiling);
    // A check stuck for 10 hang limits (30 s at least) never returns: save it and stop.
    let stuck = limits.hang.mul_f64(10.0).max(Duration::from_secs(30));
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        if let Some(t) = WATCH.busy_for().filter(|&t| t > stuck) {
            save_current(&format!("hang: one input has run for {:.0} s", t.as_secs_f64()));
            std::process::exit(1);
        }
    });

    let mut reports = Vec::new();
    let mut failed = false;
    for target in &selected {
        let dir = corpus.clone().unwrap_or_else(|| super::corpus_dir(target.name()));
        let seeds = match load_corpus(&dir, target.extension()) {
            Ok(s) => s,
            Err(e) => return usage(program, &format!("corpus {}: {e}", dir.display())),
        };
        println!("{program} {}: {} seeds from {}, seed {seed}", target.name(), seeds.len(), dir.display());
        let name = format!("crash-{}-{seed}-{}.{}", target.name(), "current", target.extension());
        if let Ok(mut s) = SAVE_AS.lock() {
            *s = Some((crash_dir().join(name), format!("cargo run --release --example {program} -- --target {} --replay", target.name())));
        }
        let out = run(*target, &seeds, seed, &limits, Some(&WATCH));
        let secs = out.elapsed.as_secs_f64();
        println!(
            "{program} {}: {} iterations in {secs:.1} s ({:.0} iterations/s), {} inputs accepted; slowest input {:.1} ms, most allocated at once {}",
            target.name(),
            out.iterations,
            out.iterations as f64 / secs.max(1e-9),
            out.accepted,
            out.slowest.as_secs_f64() * 1e3,
            if alloc::installed() { format!("{} KiB", out.peak_alloc >> 10) } else { "(not counted)".into() },
        );
        reports.push(json!({
            "target": target.name(),
            "seeds": seeds.len(),
            "inputs": out.iterations,
            "accepted": out.accepted,
            "seconds": (secs * 10.0).round() / 10.0,
            "panics": out.counts[0],
            "hangs": out.counts[1],
            "allocations_over_limit": out.counts[2],
            "broken_guarantees": out.counts[3],
            "slowest_input_ms": (out.slowest.as_secs_f64() * 1e4).round() / 10.0,
            "peak_alloc_per_input_bytes": alloc::installed().then_some(out.peak_alloc),
        }));
        for (i, f) in out.failures.iter().enumerate() {
            failed = true;
            let file = crash_dir().join(format!("crash-{}-{seed}-{i}.{}", target.name(), target.extension()));
            let saved = std::fs::create_dir_all(crash_dir()).and_then(|_| std::fs::write(&file, &f.input));
            println!("FAILURE ({:?}): {}", f.kind, f.message);
            match saved {
                Ok(()) => println!(
                    "  input written to {}\n  replay: cargo run --release --example {program} -- --target {} --replay {}",
                    file.display(),
                    target.name(),
                    file.display()
                ),
                Err(e) => println!("  could not write the input to {}: {e}", file.display()),
            }
        }
        if failed && !keep_going {
            break;
        }
    }
    if let Some(path) = summary {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let doc = json!({
            "program": program,
            "arguments": args.join(" "),
            "seed": seed,
            "hang_limit_s": limits.hang.as_secs_f64(),
            "alloc_limit_bytes": format!("{} + {} per input byte", limits.alloc.0, limits.alloc.1),
            "single_allocation_ceiling_bytes": CEILING,
            "threads": 1,
            "targets": reports,
            "peak_rss_bytes": peak_rss(),
            "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        });
        if let Err(e) = std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n") {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
