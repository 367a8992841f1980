"""The GPU backend (wgpu: Vulkan here, Metal on macOS) on the reference fixtures: the whole
model against the reference logits and greedy tokens (f32, the CPU's tolerances), GPU and CPU
tokens equal, batch invariance, fused and unfused paths, held formats, weights split over
several buffers, adapter selection.

The adapter comes from UPG_BATCH_GPU_ADAPTER (scripts/test.sh sets lavapipe's `llvmpipe`
unless told otherwise); with no adapter these tests fail, they never skip."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from test_engine_batching import alone as cpu_alone
from test_engine_batching import key, workload
from test_engine_golden import (F32_LOGITS_REL, F32_NEAR_TIE, GREEDY_24, MODELS, cases, exact_steps,
                                reference_logits, rel_err)
from upg_batch import Engine, SamplingParams

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@functools.cache
def gpu(name: str, weights: str = "f32", fused: bool = True, max_batch: int = 32) -> Engine:
    return Engine(FIXTURES / "models" / name, backend="gpu", weights=weights, fused=fused, max_batch=max_batch)


@functools.cache
def cpu(name: str, weights: str = "f32") -> Engine:
    return Engine(FIXTURES / "models" / name, weights=weights)


def test_info_names_the_adapter_and_counts_dispatches() -> None:
    fused, plain = gpu("llama-tiny"), gpu("llama-tiny", fused=False)
    for eng in (fused, plain):
        eng.generate(["hello"], SamplingParams(max_tokens=2, temperature=0.0))
        info = eng.info
        assert info["backend"] == "gpu" and info["adapter"] and info["gpu_api"] in ("Vulkan", "Metal")
    # Two layers: 6 dispatches a layer fused (q, k and v in one), 15 unfused, plus embedding,
    # final norm, lm_head.
    assert fused.info["fused"] and fused.info["dispatches_per_step"] == 2 * 6 + 3
    assert not plain.info["fused"] and plain.info["dispatches_per_step"] == 2 * 15 + 3


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", MODELS)
def test_prefill_logits_match_reference_f32(name: str, fused: bool) -> None:
    eng = gpu(name, fused=fused)
    ref = reference_logits(name)
    for i, case in enumerate(cases(name)):
        got = eng.logits(case["prompt_ids"])
        err = rel_err(got, ref[f"prefill_logits_{i}"])
        assert err < F32_LOGITS_REL, f"case {i}: max|gpu - ref| / max|ref| = {err:.3g}"


@pytest.mark.parametrize("name", MODELS)
def test_greedy_matches_reference_and_the_cpu(name: str) -> None:
    eng = gpu(name)
    for i, case in enumerate(cases(name)):
        (out,) = eng.generate([case["prompt"]], GREEDY_24)
        n = exact_steps(case["step_margin"], F32_NEAR_TIE)
        assert out.token_ids[:n] == case["greedy_ids"][:n], f"case {i}: diverges before step {n} (the first near-tie)"
        (on_cpu,) = cpu(name).generate([case["prompt"]], GREEDY_24)
        assert out.token_ids[:n] == on_cpu.token_ids[:n], f"case {i}: GPU and CPU differ before step {n}"


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny"])
def test_batched_equals_alone_on_the_gpu(name: str) -> None:
    """The batching workload (early stops, prompts spanning steps, seeded sampling, one run into
    the context): each request gives exactly its tokens alone, in any order and batch size."""
    reqs = workload(name, 11)
    eng = gpu(name)
    solo = [key(eng.generate([p], [s])[0]) for p, s in reqs]
    assert sum(c[2] == "stop" for c in solo) >= 2
    for max_batch, order_seed in ((32, 1), (5, 2)):
        order = np.random.default_rng(order_seed).permutation(len(reqs)).tolist()
        outs = gpu(name, max_batch=max_batch).generate([reqs[i][0] for i in order], [reqs[i][1] for i in order])
        for pos, i in enumerate(order):
            assert key(outs[pos]) == solo[i], f"request {i} (max_batch {max_batch}) differs from alone"


def test_gpu_tokens_equal_cpu_tokens_on_the_workload() -> None:
    """Greedy requests of the batching workload give the CPU's tokens (sampled ones may differ
    where float rounding moves a draw across a boundary; greedy only flips on near-ties,
    which these random prompts are checked not to hit through the logits margin)."""
    name = "llama-tiny"
    reqs = [(p, s) for p, s in workload(name, 11) if s.temperature == 0.0]
    expected = cpu_alone(name, 11)
    all_reqs = workload(name, 11)
    outs = gpu(name).generate([p for p, _ in reqs], [s for _, s in reqs])
    eng = cpu(name)
    for (p, s), out in zip(reqs, outs):
        want = expected[all_reqs.index((p, s))]
        if list(out.token_ids) == list(want[0]):
            continue
        # A difference is allowed only after a step whose CPU top-2 margin is a near-tie.
        ids = eng.tokenize(p) if isinstance(p, str) else list(p)
        logits = eng.logits(ids + list(want[0])[:-1])[len(ids) - 1:]
        top2 = np.sort(logits, axis=1)[:, -2:]
        first_diff = next(i for i, (a, b) in enumerate(zip(out.token_ids, want[0])) if a != b)
        margin = float(top2[first_diff, 1] - top2[first_diff, 0])
        assert margin < F32_NEAR_TIE, f"GPU and CPU differ at step {first_diff} with a margin of {margin}"


@pytest.mark.parametrize("name", MODELS)
def test_fused_and_unfused_agree(name: str) -> None:
    for case in cases(name):
        a = gpu(name).logits(case["prompt_ids"])
        b = gpu(name, fused=False).logits(case["prompt_ids"])
        assert rel_err(a, b.astype(np.float64)) < 1e-5


@pytest.mark.parametrize("weights", ["f16", "bf16"])
@pytest.mark.parametrize("name", MODELS)
def test_held_formats_compute_what_the_cpu_computes(name: str, weights: str) -> None:
    """Both backends widen f16/bf16 exactly and compute in f32: only summation order differs."""
    eng = gpu(name, weights)
    assert eng.info["weights"] == weights
    for case in cases(name):
        err = rel_err(eng.logits(case["prompt_ids"]), cpu(name, weights).logits(case["prompt_ids"]).astype(np.float64))
        assert err < 1e-5, f"{weights}: max|gpu - cpu| / max|cpu| = {err:.3g}"


def test_the_kernel_profile_times_every_dispatch_and_changes_no_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """UPG_BATCH_GPU_PROFILE_KERNELS=1 (benchmarks): every dispatch in its own timed pass,
    totals per kernel in info["gpu_profile"]["kernels"]; a normal engine records none."""
    name = "llama-tiny"
    plain = gpu(name)
    monkeypatch.setenv("UPG_BATCH_GPU_PROFILE_KERNELS", "1")
    timed = Engine(FIXTURES / "models" / name, backend="gpu")
    prompt = cases(name)[0]["prompt_ids"]
    a, b = timed.logits(prompt), plain.logits(prompt)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    profile = timed.info["gpu_profile"]
    if profile["gpu_s"] is None:
        pytest.skip("this adapter has no timestamp queries")
    kernels = profile["kernels"]
    assert sum(count for count, _ in kernels.values()) == profile["dispatches"] > 0
    assert all(seconds > 0 for _, seconds in kernels.values())
    assert any(k.startswith("attention") for k in kernels) and any(k.startswith("matmul_") for k in kernels)
    assert plain.info["gpu_profile"]["kernels"] == {}


def test_weights_split_over_several_buffers_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A matrix larger than one storage binding is split by rows (a 128k-vocabulary embedding is
    ~0.5 GB; lavapipe binds at most 128 MiB). Forced here with a 4 KiB limit: the embedding
    (512 x 64 f32) then spans 32 buffers, and every row is reduced exactly as before."""
    name = "llama-tiny"
    whole = gpu(name)
    monkeypatch.setenv("UPG_BATCH_GPU_MAX_WEIGHT_BUFFER", "4096")
    split = Engine(FIXTURES / "models" / name, backend="gpu")
    split.generate(["x"], SamplingParams(max_tokens=1, temperature=0.0))
    assert split.info["dispatches_per_step"] > whole.info["dispatches_per_step"] + 60, "the split did not happen"
    for case in cases(name):
        a, b = split.logits(case["prompt_ids"]), whole.logits(case["prompt_ids"])
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("checks", ["all", "none"])
def test_shader_checks_change_no_result(monkeypatch: pytest.MonkeyPatch, checks: str) -> None:
    """The kernels compile without wgpu's loop counters and workgroup zeroing by default
    (`bounds`); wgpu's full checks (`all`) and none at all (`none`, benchmarks) compute the
    same logits and tokens."""
    name = "llama-tiny"
    default = gpu(name)
    monkeypatch.setenv("UPG_BATCH_GPU_SHADER_CHECKS", checks)
    other = Engine(FIXTURES / "models" / name, backend="gpu")
    assert default.info["gpu_shader_checks"] == "bounds" and other.info["gpu_shader_checks"] == checks
    for case in cases(name):
        a, b = other.logits(case["prompt_ids"]), default.logits(case["prompt_ids"])
        assert rel_err(a, b) < 1e-5
    params = SamplingParams(max_tokens=12, temperature=0.0)
    prompts = ["hello world", "the cat sat on"]
    assert [c.token_ids for c in other.generate(prompts, params)] == [c.token_ids for c in default.generate(prompts, params)]


def test_an_unknown_shader_checks_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPG_BATCH_GPU_SHADER_CHECKS", "some")
    with pytest.raises(Exception, match="UPG_BATCH_GPU_SHADER_CHECKS.*bounds, all or none"):
        Engine(FIXTURES / "models" / "llama-tiny", backend="gpu")


def test_auto_never_picks_a_software_adapter() -> None:
    on_gpu = gpu("llama-tiny")
    auto = Engine(FIXTURES / "models" / "llama-tiny", backend="auto")
    if on_gpu.info["gpu_device_type"] == "cpu":
        assert auto.info["backend"] == "cpu"
    else:
        assert auto.info["backend"] == "gpu" and auto.info["adapter"] == on_gpu.info["adapter"]
