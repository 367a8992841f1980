"""kv_cache="f16": keys and values held in f16 (half the cache memory) on the CPU and the GPU,
against the reference fixtures, the f32 cache, and batch invariance; and the KV budget."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine_golden import FIXTURES, MODELS, cases, exact_steps, reference_logits, rel_err

from upg_batch import Engine, EngineError, SamplingParams

# Rounding each cached key and value to f16 (11 significant bits) perturbs the attention
# output by ~2^-11 relative. Measured on these fixtures: max|engine - ref| / max|ref| at most
# 9.4e-4 (the f32 cache: 1e-6). Bounds: 5e-3, and greedy tokens equal to the reference's up
# to the first step whose reference margin is below 0.05 (as the f16 weights are held).
F16_KV_REL = 5e-3
F16_KV_NEAR_TIE = 0.05


@pytest.fixture(scope="module", params=MODELS)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_f16_cache_follows_the_reference(name: str) -> None:
    eng = Engine(FIXTURES / "models" / name, kv_cache="f16")
    assert eng.info["kv_cache"] == "f16"
    ref = reference_logits(name)
    for i, case in enumerate(cases(name)):
        err = rel_err(eng.logits(case["prompt_ids"]), ref[f"prefill_logits_{i}"])
        assert err < F16_KV_REL, f"case {i}: {err:.3g}"
    outs = eng.generate([c["prompt_ids"] for c in cases(name)], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    for i, (case, out) in enumerate(zip(cases(name), outs)):
        n = exact_steps(case["step_margin"], F16_KV_NEAR_TIE)
        assert out.token_ids[:n] == case["greedy_ids"][:n], f"case {i}"


def test_f16_cache_rounds_and_is_batch_invariant() -> None:
    model = FIXTURES / "models" / "llama-tiny"
    f16, f32 = Engine(model, kv_cache="f16", max_batch=8), Engine(model, kv_cache="f32")
    assert f32.info["kv_cache"] == "f32" and Engine(model).info["kv_cache"] == "f32"
    prompts = [c["prompt_ids"] for c in cases("llama-tiny")]
    a, b = f16.logits(prompts[0]), f32.logits(prompts[0])
    assert 0 < np.abs(a - b).max() < 1e-2  # the cache really holds f16, and only rounds
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    batched = f16.generate(prompts, params)
    for p, out in zip(prompts, batched):
        (alone,) = f16.generate([p], params)
        assert alone.token_ids == out.token_ids


def test_gpu_f16_cache_follows_the_reference_and_is_batch_invariant(name: str) -> None:
    model = FIXTURES / "models" / name
    f16, f32 = Engine(model, backend="gpu", kv_cache="f16", max_batch=8), Engine(model, backend="gpu")
    assert f16.info["kv_cache"] == "f16" and f32.info["kv_cache"] == "f32"
    assert f16.info["kv_bytes_per_token"] * 2 == f32.info["kv_bytes_per_token"]
    ref = reference_logits(name)
    prompts = [c["prompt_ids"] for c in cases(name)]
    for i, p in enumerate(prompts):
        got = f16.logits(p)
        assert rel_err(got, ref[f"prefill_logits_{i}"]) < F16_KV_REL, f"case {i}"
        if i == 0 and len(p) > 1:  # the cache really holds f16 (a one-token prompt reads only its own row)
            assert np.abs(got - f32.logits(p)).max() > 0
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    batched = f16.generate(prompts, params)
    for i, (case, out) in enumerate(zip(cases(name), batched)):
        n = exact_steps(case["step_margin"], F16_KV_NEAR_TIE)
        assert out.token_ids[:n] == case["greedy_ids"][:n], f"case {i}"
        (alone,) = f16.generate([case["prompt_ids"]], params)
        assert alone.token_ids == out.token_ids, f"case {i}: batched differs from alone"


def test_kv_cache_option_is_checked() -> None:
    model = FIXTURES / "models" / "llama-tiny"
    for bad in ("bf16", "", "F16"):
        with pytest.raises(EngineError, match="kv_cache"):
            Engine(model, kv_cache=bad)


def test_a_kv_budget_is_never_exceeded_and_changes_no_result() -> None:
    model = FIXTURES / "models" / "llama-tiny"
    free = Engine(model, max_batch=16)
    per_token = free.info["kv_bytes_per_token"]
    info = free.info
    assert per_token == info["layers"] * 2 * info["kv_heads"] * info["head_dim"] * 4  # keys and values, f32
    assert Engine(model, kv_cache="f16").info["kv_bytes_per_token"] * 2 == per_token
    prompts = [[5 + i, 6, 7, 8, 9, 10][: 2 + i % 5] for i in range(16)]
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    budget = 3 * 15 * per_token  # room for three sequences of prompt + 9 at once
    tight = Engine(model, max_batch=16, kv_cache_bytes=budget)
    assert tight.info["kv_cache_bytes"] == budget
    want = [o.token_ids for o in free.generate(prompts, params)]
    assert free.stats()["kv_cache_peak_bytes"] > budget  # unbudgeted, the batch takes more
    assert [o.token_ids for o in tight.generate(prompts, params)] == want  # batch invariance
    assert 0 < tight.stats()["kv_cache_peak_bytes"] <= budget
    # a prompt whose reservation alone exceeds the budget fails alone; the others run
    small = Engine(model, max_batch=4, kv_cache_bytes=8 * per_token)
    ok, too_big = small.generate([[5, 6], [5, 6, 7, 8]], SamplingParams(max_tokens=5, temperature=0.0))
    assert ok.error is None and too_big.finish_reason == "error" and "kv_cache_bytes" in too_big.error
    with pytest.raises(EngineError, match="kv_cache_bytes"):
        Engine(model, kv_cache_bytes=0)


def test_a_gpu_kv_budget_limits_the_sequences_at_once() -> None:
    model = FIXTURES / "models" / "llama-tiny"
    per_token = Engine(model, backend="gpu").info["kv_bytes_per_token"]
    with pytest.raises(EngineError, match="holds no sequence"):
        Engine(model, backend="gpu", context=16, kv_cache_bytes=16 * per_token - 1)
    eng = Engine(model, backend="gpu", context=16, max_batch=8, kv_cache_bytes=2 * 16 * per_token)  # two slots
    prompts = [[5 + i, 6, 7] for i in range(6)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    got = eng.generate(prompts, params)
    assert eng.stats()["kv_cache_peak_bytes"] <= 2 * 16 * per_token
    assert [o.token_ids for o in got] == [o.token_ids for o in Engine(model, backend="gpu", context=16).generate(prompts, params)]
