//! Mutational fuzzer of the Hugging Face folder loaders (stable Rust; see
//! `upg_batch_native::fuzzing` and `upg_batch_native::model::fuzz`).
//!
//! cargo run --release --example fuzz_model_files -- [--target safetensors|config|index|tokenizer|all]
//!     [--seconds N] [--iterations N] [--seed S] [--corpus DIR] [--replay FILE]
//!     [--hang-seconds N] [--json FILE]
//!
//! Mutates the seeds of `native/fuzz/corpus/<target>/` until each target's time or iteration
//! budget is spent (default `all`, 10 seconds each). On a panic, a hang (2 s for one input by
//! default), an oversized allocation or an accepted file that breaks the loader's guarantees,
//! it writes the input to `native/fuzz/crashes/` and exits with status 1.

use std::process::ExitCode;

use upg_batch_native::fuzzing::{alloc::Counting, cli, Target};
use upg_batch_native::model::fuzz;

#[global_allocator]
static ALLOC: Counting = Counting;

fn main() -> ExitCode {
    let targets = match fuzz::targets() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot set up the index target's model folder: {e}");
            return ExitCode::FAILURE;
        }
    };
    let refs: Vec<&dyn Target> = targets.iter().map(|t| t.as_ref()).collect();
    cli::main("fuzz_model_files", &refs)
}
