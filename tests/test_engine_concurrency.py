"""The engine releases the GIL while it computes: other Python threads run, and `stats()` read
from another thread during `generate` shows live values. Concurrent calls on one engine are
serialized without mixing their results."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from upg_batch import Completion, Engine, SamplingParams

LLAMA = Path(__file__).resolve().parent / "fixtures" / "models" / "llama-tiny"
STAT_KEYS = {
    "prompt_tokens_total", "generation_tokens_total", "steps_total", "running_sequences", "waiting_sequences",
    "max_batch", "kv_cache_tokens", "kv_cache_capacity_tokens", "kv_cache_usage_ratio", "memory_bytes",
}


def run_in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, box


def long_workload(n: int = 24, max_tokens: int = 200) -> tuple[list[list[int]], SamplingParams]:
    prompts = [[2 + (7 * i + j) % 500 for j in range(10 + 3 * i)] for i in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_stats_are_live_during_generate() -> None:
    eng = Engine(LLAMA, max_batch=8)
    prompts, params = long_workload()
    before = eng.stats()
    assert STAT_KEYS <= set(before)
    t, box = run_in_thread(lambda: eng.generate(prompts, params))
    samples = []
    while t.is_alive():
        samples.append(eng.stats())
        time.sleep(0.0005)
    t.join()
    assert "error" not in box, box.get("error")
    outs: list[Completion] = box["result"]
    after = eng.stats()

    generated = sum(len(o.token_ids) for o in outs)
    assert generated == 24 * 200
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == generated
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == sum(map(len, prompts))
    assert (after["running_sequences"], after["waiting_sequences"], after["kv_cache_tokens"]) == (0, 0, 0)

    live = [s["generation_tokens_total"] for s in samples]
    assert live == sorted(live), "the token counter only grows"
    inside = {v for v in live if before["generation_tokens_total"] < v < after["generation_tokens_total"]}
    assert len(inside) >= 5, f"stats() saw only {len(inside)} intermediate values: the GIL is held during generate"
    assert max(s["running_sequences"] for s in samples) == 8
    assert max(s["waiting_sequences"] for s in samples) > 0
    busy = [s for s in samples if s["kv_cache_tokens"] > 0]
    assert busy and all(0 < s["kv_cache_usage_ratio"] <= 1 for s in busy)
    assert all(s["kv_cache_capacity_tokens"] == 8 * 512 and s["max_batch"] == 8 for s in samples)
    assert max(s["memory_bytes"] for s in samples) > eng.info["weight_bytes"]


def test_python_threads_run_during_generate() -> None:
    eng = Engine(LLAMA, max_batch=8, threads=1)
    # One generate call long enough to tell on any machine: sized from a timed sample call.
    prompts, params = long_workload(n=16, max_tokens=150)
    start = time.perf_counter()
    eng.generate(prompts, params)
    sample_s = time.perf_counter() - start
    prompts = prompts * max(1, math.ceil(0.25 / sample_s))  # each copy takes about sample_s
    ticks = 0
    t, box = run_in_thread(lambda: eng.generate(prompts, params))
    start = time.perf_counter()
    while t.is_alive():
        ticks += 1
    elapsed = time.perf_counter() - start
    t.join()
    assert "error" not in box, box.get("error")
    assert elapsed > 0.05, "the workload is too small to tell"
    assert ticks > 1000, f"only {ticks} loop iterations in {elapsed:.2f}s beside generate"


@pytest.mark.parametrize("method", ["generate", "logits"])
def test_concurrent_calls_on_one_engine(method: str) -> None:
    eng = Engine(LLAMA, max_batch=4)
    jobs: list[Any] = []
    for k in range(4):
        prompts, _ = long_workload(n=5, max_tokens=1)
        prompts = [[(t + 31 * k) % 500 + 2 for t in p] for p in prompts]
        params = SamplingParams(max_tokens=40, temperature=0.9, seed=k, ignore_eos=True)
        if method == "generate":
            jobs.append(lambda p=prompts, q=params: [o.token_ids for o in eng.generate(p, q)])
        else:
            jobs.append(lambda p=prompts: [eng.logits(x).tobytes() for x in p])
    expected = [job() for job in jobs]
    threads = [run_in_thread(job) for job in jobs for _ in range(2)]
    for t, _ in threads:
        t.join()
    for i, (_, box) in enumerate(threads):
        assert "error" not in box, box.get("error")
        assert box["result"] == expected[i // 2], f"job {i // 2} gave different results when run concurrently"


def test_an_idle_engine_reports_only_its_weights() -> None:
    """KV caches live for one generate call (the scheduler creates and drops them), so once it
    returns, memory_bytes is the weights again, not the freed caches of the last call."""
    eng = Engine(LLAMA, max_batch=8)
    weights = eng.info["weight_bytes"]
    assert eng.stats()["memory_bytes"] == weights
    eng.generate([[5] * 300] * 8, SamplingParams(max_tokens=5))
    s = eng.stats()
    assert (s["kv_cache_tokens"], s["running_sequences"]) == (0, 0)
    assert s["memory_bytes"] == weights, f"memory_bytes {s['memory_bytes']} after generate returned; weights are {weights}"


def test_submitted_prompts_join_the_running_batch_and_match_generate() -> None:
    """The streaming interface: prompts submitted one by one, while others run, join the
    batch at once (a short one finishes while a long one started earlier is still running)
    and give exactly what one `generate` call gives for the same prompts and seeds."""
    eng = Engine(LLAMA, max_batch=8)
    prompts = [[(7 * i + j) % 500 + 2 for j in range(3 + i % 4)] for i in range(12)]
    params = [SamplingParams(max_tokens=4 + 3 * (i % 5), temperature=0.8, seed=i, ignore_eos=True) for i in range(12)]
    want = [o.token_ids for o in eng.generate(prompts, params)]
    long = eng.submit([[5, 6, 7]], SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
    while eng.stats()["running_sequences"] < 1:
        time.sleep(0.001)
    futures = [eng.submit([p], q) for p, q in zip(reversed(prompts), reversed(params))][::-1]
    got = [f.result(timeout=120)[0].token_ids for f in futures]
    assert not long.done(), "the short prompts waited for the long one: they did not join its batch"
    assert got == want
    (out,) = long.result(timeout=120)
    assert len(out.token_ids) == 400
