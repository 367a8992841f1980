"""Q8_0 weights (GGUF's 8-bit blocks, quantized at load): held bytes, fallbacks for rows that
are not whole blocks, closeness to f32 on the fixtures, and the GPU backend on the same bits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from upg_batch import Engine

MODELS = Path(__file__).resolve().parent / "fixtures" / "models"
PROMPT = "Once upon a time there was a little robot who"


def test_rows_that_are_not_whole_blocks_stay_16_bit_and_are_listed() -> None:
    # llama-tiny's intermediate size is 176, not a multiple of 32: its down_proj falls back.
    info = Engine(MODELS / "llama-tiny", weights="q8_0").info
    assert info["weights"] == "q8_0"
    assert info["weight_fallbacks"] == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    assert Engine(MODELS / "qwen2-tiny", weights="q8_0").info["weight_fallbacks"] == []


@pytest.mark.parametrize("name", ["llama-tiny", "llama3-tiny", "qwen2-tiny"])
def test_q8_0_is_close_to_f32_and_four_times_smaller(name: str) -> None:
    q, f = Engine(MODELS / name, weights="q8_0"), Engine(MODELS / name, weights="f32")
    if not q.info["weight_fallbacks"]:
        # 34 bytes per 32 weights against 128 (norms and biases stay f32)
        assert q.info["weight_bytes"] < 0.3 * f.info["weight_bytes"]
    ids = q.tokenize(PROMPT)
    a, b = q.logits(ids).astype(np.float64), f.logits(ids).astype(np.float64)
    pa, pb = np.exp(a - a.max(-1, keepdims=True)), np.exp(b - b.max(-1, keepdims=True))
    pa, pb = pa / pa.sum(-1, keepdims=True), pb / pb.sum(-1, keepdims=True)
    kl = (pb * (np.log(pb) - np.log(pa))).sum(-1)
    assert kl.max() < 0.01, f"KL(f32 || q8_0) per position up to {kl.max():.3g}"
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.75


def test_the_gpu_runs_q8_0_weights_as_the_cpu_does() -> None:
    c = Engine(MODELS / "llama3-tiny", weights="q8_0")
    g = Engine(MODELS / "llama3-tiny", weights="q8_0", backend="gpu")
    ids = c.tokenize(PROMPT)
    a, b = g.logits(ids), c.logits(ids)
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-4
