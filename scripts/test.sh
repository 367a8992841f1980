#!/usr/bin/env bash
# The project's test command: on a fresh machine it installs everything the tests need
# (system packages, the Python package with its native engine built from source, test
# dependencies), then runs the Rust unit tests and the Python test suite (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh
# The GPU tests run on the adapter named here; lavapipe (software Vulkan, installed above)
# unless the caller names a real GPU (e.g. UPG_BATCH_GPU_ADAPTER=nvidia or apple).
export UPG_BATCH_GPU_ADAPTER="${UPG_BATCH_GPU_ADAPTER:-llvmpipe}"
# Mesa's Vulkan drivers complain on stderr when this is unset.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
python3 -m pip install --quiet --editable ".[test]"

(cd native && cargo test --release --quiet)
# Bounded passes of the mutational fuzzers (a failure saves the input under
# native/fuzz/crashes/ and fails the run): the GGUF parser for 60 s, then the Hugging Face
# folder loaders (safetensors header, config.json, the shard index, tokenizer.json) 15 s each.
(cd native && cargo run --release --quiet --example fuzz_gguf -- --seconds 60)
(cd native && cargo run --release --quiet --example fuzz_model_files -- --target all --seconds 15)

status=0
python3 -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$status"
