"""Block-quantized weights (GGUF/ggml layouts, quantized at load): byte layouts against the
`gguf` package, fallbacks for rows that are not whole blocks, held bytes, and accuracy against
f32 (KL divergence of the next-token distribution and top-1 agreement) on the fixtures and on a
larger random model whose rows are whole k-quant blocks, on the CPU and the GPU backend."""

from __future__ import annotations

from pathlib import Path

import gguf.quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from quant_models import BOUNDS, FIXTURES, kl_and_top1, make_random_llama
from upg_batch import Engine, EngineError, _native

PROMPT = "Once upon a time there was a little robot who lived in a small town by the sea and every day"
GGML_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0, "q5_0": GGMLQuantizationType.Q5_0, "q4_k": GGMLQuantizationType.Q4_K, "q6_k": GGMLQuantizationType.Q6_K}
# Bytes held per weight against f32's 4 (norms stay f32, so a little above).
BYTES_PER_WEIGHT = {"q8_0": 34 / 32, "q6_k": 210 / 256, "q5_0": 22 / 32, "q4_k": 144 / 256, "q4_0": 18 / 32}


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_llama(tmp_path_factory.mktemp("models") / "random-256")


@pytest.fixture(scope="module")
def f32_logits(random_model: Path) -> tuple[list[int], np.ndarray]:
    f = Engine(random_model, weights="f32")
    ids = f.tokenize(PROMPT)
    return ids, f.logits(ids)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q5_0"])
def test_blocks_are_byte_identical_to_the_gguf_package(fmt: str) -> None:
    x = np.random.default_rng(5).standard_normal((64, 256)).astype(np.float32)
    x[3, :32] = 0.0  # an all-zero block
    ours = _native.quantize(x.tobytes(), fmt)
    assert ours == gguf.quants.quantize(x, GGML_TYPES[fmt]).tobytes()


@pytest.mark.parametrize("fmt", list(GGML_TYPES))
def test_blocks_dequantize_as_the_gguf_package_reads_them(fmt: str) -> None:
    x = np.random.default_rng(6).standard_normal((32, 512)).astype(np.float32) * 0.05
    blocks = _native.quantize(x.tobytes(), fmt)
    ours = np.frombuffer(_native.dequantize(blocks, fmt), np.float32).reshape(x.shape)
    theirs = gguf.quants.dequantize(np.frombuffer(blocks, np.uint8).reshape(32, -1), GGML_TYPES[fmt])
    assert np.array_equal(ours, theirs)


def test_quantize_names_a_bad_format_or_length() -> None:
    with pytest.raises(ValueError, match="not a block format"):
        _native.quantize(b"\0" * 128, "q3_k")
    with pytest.raises(ValueError, match="whole blocks of 256"):
        _native.quantize(b"\0" * 128, "q4_k")


def test_rows_that_are_not_whole_blocks_stay_16_bit_and_are_listed() -> None:
    # llama-tiny's intermediate size is 176, not a multiple of 32: its down_proj falls back.
    info = Engine(FIXTURES / "llama-tiny", weights="q8_0").info
    assert info["weights"] == "q8_0"
    assert info["weight_fallbacks"] == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    assert Engine(FIXTURES / "qwen2-tiny", weights="q4_0").info["weight_fallbacks"] == []


def test_a_model_with_no_whole_k_blocks_runs_as_f16() -> None:
    # Rows of 64 weights hold no 256-weight block: every matrix falls back, and the model
    # computes exactly what the f16 one does.
    q, f = Engine(FIXTURES / "llama3-tiny", weights="q4_k"), Engine(FIXTURES / "llama3-tiny", weights="f16")
    assert len(q.info["weight_fallbacks"]) == 1 + 2 * 7  # tied embedding, 7 matrices a layer
    ids = q.tokenize(PROMPT)
    assert np.array_equal(q.logits(ids), f.logits(ids))


@pytest.mark.parametrize("name", ["llama-tiny", "llama3-tiny", "qwen2-tiny"])
@pytest.mark.parametrize("fmt,kl_mean", [("q8_0", 0.003), ("q5_0", 0.1), ("q4_0", 0.3)])
def test_32_weight_formats_stay_close_to_f32_on_the_fixtures(name: str, fmt: str, kl_mean: float) -> None:
    q, f = Engine(FIXTURES / name, weights=fmt), Engine(FIXTURES / name, weights="f32")
    ids = q.tokenize(PROMPT)
    _, mean, _ = kl_and_top1(f.logits(ids), q.logits(ids))
    assert mean < kl_mean, f"{name} {fmt}: mean KL(f32 || {fmt}) {mean:.4f}"


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("fmt", list(BOUNDS))
def test_each_format_holds_its_accuracy_bounds(random_model: Path, f32_logits: tuple[list[int], np.ndarray], fmt: str, backend: str) -> None:
    ids, reference = f32_logits
    q = Engine(random_model, weights=fmt, backend=backend)
    assert q.info["weights"] == fmt and q.info["weight_fallbacks"] == []
    kl_max, kl_mean, top1 = kl_and_top1(reference, q.logits(ids))
    mean_bound, max_bound, top1_bound = BOUNDS[fmt]
    assert kl_mean < mean_bound and kl_max < max_bound, f"{fmt} on {backend}: KL mean {kl_mean:.4f} max {kl_max:.4f}"
    assert top1 >= top1_bound, f"{fmt} on {backend}: top-1 agreement {top1:.2f}"


def test_fewer_bits_drift_further(random_model: Path, f32_logits: tuple[list[int], np.ndarray]) -> None:
    ids, reference = f32_logits
    means = [kl_and_top1(reference, Engine(random_model, weights=f).logits(ids))[1] for f in ("f16", "q8_0", "q6_k", "q5_0", "q4_0")]
    assert means == sorted(means), f"mean KL by format f16, q8_0, q6_k, q5_0, q4_0: {means}"


@pytest.mark.parametrize("fmt", list(BYTES_PER_WEIGHT))
def test_held_bytes_are_the_formats_block_sizes(random_model: Path, fmt: str) -> None:
    q, f = Engine(random_model, weights=fmt), Engine(random_model, weights="f32")
    ratio = q.info["weight_bytes"] / f.info["weight_bytes"]
    assert BYTES_PER_WEIGHT[fmt] / 4 <= ratio < BYTES_PER_WEIGHT[fmt] / 4 * 1.02, f"{fmt}: {ratio:.4f} of f32"
    # The checkpoint stores f16: its matrices take 2 bytes a weight.
    assert q.info["checkpoint_matrix_bytes"] == f.info["checkpoint_matrix_bytes"]


def test_q4_k_m_holds_the_output_and_some_layers_in_q6_k(random_model: Path) -> None:
    m, k = Engine(random_model, weights="q4_k_m"), Engine(random_model, weights="q4_k")
    assert m.info["weights"] == "q4_k_m"
    # lm_head (512 x 256) is Q6_K, and with 2 layers llama.cpp's rule widens layer 1's
    # v_proj (128 x 256) and down_proj (256 x 768), not layer 0's.
    extra = (512 * 256 + 128 * 256 + 256 * 768) // 256 * (210 - 144)
    assert m.info["weight_bytes"] - k.info["weight_bytes"] == extra


@pytest.mark.parametrize("fmt", list(BOUNDS))
def test_the_gpu_and_the_cpu_agree_on_every_format(random_model: Path, f32_logits: tuple[list[int], np.ndarray], fmt: str) -> None:
    # The CPU multiplies int8-quantized activations, the GPU f32 ones: close, not identical.
    ids, _ = f32_logits
    c, g = Engine(random_model, weights=fmt), Engine(random_model, weights=fmt, backend="gpu")
    kl_max, kl_mean, _ = kl_and_top1(g.logits(ids), c.logits(ids))
    assert kl_mean < 0.002 and kl_max < 0.006, f"{fmt}: KL(gpu || cpu) mean {kl_mean:.5f} max {kl_max:.5f}"


def test_unknown_weights_are_named() -> None:
    with pytest.raises(EngineError, match="weights \"q3_k\" is unknown.*q4_k_m"):
        Engine(FIXTURES / "llama-tiny", weights="q3_k")
