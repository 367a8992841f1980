"""A Llama checkpoint converted to GGUF as llama.cpp's converter does (q/k rows interleaved
for its rotary layout, names and metadata of the `llama` architecture), through the llama.cpp
benchmark's converter (benches/peer_llama_cpp.py, which writes with `upg-batch quantize`),
computes exactly what the safetensors original computes: the engine must undo the
interleaving and map every tensor and key. tests/test_quantize.py covers the writer itself."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from upg_batch.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))

import peer_llama_cpp  # noqa: E402


def test_llama_gguf_logits_equal_the_safetensors_original(tmp_path: Path) -> None:
    model = ROOT / "tests" / "fixtures" / "models" / "llama-tiny"
    gguf_file = peer_llama_cpp.convert_to_gguf_f16(model, tmp_path / "llama-tiny-f16.gguf")
    original = Engine(model, weights="f16")
    converted = Engine(gguf_file)
    assert converted.info["architecture"] == "LlamaForCausalLM"
    assert converted.info["weights"] == "stored"
    ids = original.tokenize("hello world, once upon a time")
    a = np.asarray(original.logits(ids))
    b = np.asarray(converted.logits(ids))
    assert np.array_equal(a, b), f"max difference {np.abs(a - b).max()}"
