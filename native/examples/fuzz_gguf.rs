//! Mutational fuzzer of the GGUF parser (stable Rust; see `upg_batch_native::fuzzing`).
//!
//! cargo run --release --example fuzz_gguf -- [--seconds N] [--iterations N] [--seed S]
//!                                            [--corpus DIR] [--replay FILE] [--json FILE]
//!
//! Mutates the seeds of `native/fuzz/corpus/gguf` (or `--corpus`) until the time or iteration
//! budget is spent (default 10 seconds). On a panic, a hang, an oversized allocation or an
//! accepted file that breaks the reader's guarantees, it writes the input to
//! `native/fuzz/crashes/` and exits with status 1. `--replay FILE` checks one saved input.

use std::process::ExitCode;

use upg_batch_native::fuzzing::{alloc::Counting, cli};
use upg_batch_native::gguf::fuzz::Gguf;

#[global_allocator]
static ALLOC: Counting = Counting;

fn main() -> ExitCode {
    cli::main("fuzz_gguf", &[&Gguf])
}
