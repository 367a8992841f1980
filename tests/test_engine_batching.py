"""Continuous batching must not change results: a prompt gives exactly the tokens it gives
alone, whatever it is batched with, in whatever order, with whatever max_batch or thread
count. Greedy and seeded sampling both."""

from __future__ import annotations

import functools
import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from upg_batch import Completion, Engine, SamplingParams

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODELS = ["llama-tiny", "qwen2-tiny", "llama3-tiny"]
GREEDY_24 = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@functools.cache
def engine(name: str, max_batch: int = 32, threads: int | None = None) -> Engine:
    return Engine(FIXTURES / "models" / name, max_batch=max_batch, threads=threads)


@functools.cache
def golden_prompts(name: str) -> tuple[str, ...]:
    cases = json.loads((FIXTURES / "golden" / f"{name}.json").read_text())["cases"]
    return tuple(c["prompt"] for c in cases)


Request = tuple[Any, SamplingParams]


def workload(name: str, seed: int) -> list[Request]:
    """The six golden prompts (greedy, 24 tokens) and fifteen random ones: token-id prompts of
    1 to 505 tokens (long ones force prompt chunks to span steps; the longest runs into the
    512-token context), texts, greedy and seeded
    sampling, max_tokens from 1 to 40, some stopping at EOS, a stop token or a stop string."""
    rng = random.Random(seed)
    reqs: list[Request] = [(p, GREEDY_24) for p in golden_prompts(name)]
    lengths = [1, 2, 7, 33, 120, 300, 450, 5, 64, 17, 260, 3, 90, 11]
    for i, n in enumerate(lengths):
        prompt: Any = [rng.randrange(2, 512) for _ in range(n)]
        if i % 4 == 3:
            prompt = "".join(rng.choice("abcdefgh ijklmnop,.XYZ") for _ in range(n))
        kind = i % 3
        if kind == 0:
            p = SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.0, ignore_eos=bool(i % 2))
        elif kind == 1:
            p = SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.8, seed=1000 + i, top_k=rng.choice([0, 50]))
        else:
            p = SamplingParams(max_tokens=rng.randint(1, 40), temperature=1.1, seed=2000 + i, top_p=0.9, min_p=0.02,
                               stop=("e", "t"), stop_token_ids=rng.sample(range(2, 512), 60))
        reqs.append((prompt, p))
    # Runs into the context (512): 7 tokens, then "length".
    reqs.append(([rng.randrange(2, 512) for _ in range(505)], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)))
    return reqs


def key(c: Completion) -> tuple[Any, ...]:
    return (c.token_ids, c.text, c.finish_reason, c.prompt_tokens)


@functools.cache
def alone(name: str, seed: int) -> tuple[tuple[Any, ...], ...]:
    eng = engine(name, max_batch=1)
    return tuple(key(eng.generate([prompt], params)[0]) for prompt, params in workload(name, seed))


@pytest.mark.parametrize("max_batch", [2, 3, 64])
@pytest.mark.parametrize("name", MODELS)
def test_batched_equals_alone_in_any_order(name: str, max_batch: int) -> None:
    reqs = workload(name, seed=7)
    expected = alone(name, 7)
    assert sum(c[2] == "stop" for c in expected) >= 2, "the workload should include early stops"
    eng = engine(name, max_batch=max_batch)
    for order_seed in range(3):
        order = list(range(len(reqs)))
        random.Random(order_seed).shuffle(order)
        outs = eng.generate([reqs[i][0] for i in order], [reqs[i][1] for i in order])
        for pos, i in enumerate(order):
            assert key(outs[pos]) == expected[i], f"request {i} at position {pos} (order {order_seed}) differs from alone"


@pytest.mark.parametrize("name", MODELS)
def test_golden_prompts_batched_equal_alone(name: str) -> None:
    prompts = list(golden_prompts(name))
    eng = engine(name, max_batch=64)
    solo = [eng.generate([p], GREEDY_24)[0].token_ids for p in prompts]
    for max_batch in (2, 3, 64):
        for order_seed in range(2):
            order = list(range(6))
            random.Random(order_seed).shuffle(order)
            outs = engine(name, max_batch=max_batch).generate([prompts[i] for i in order], GREEDY_24)
            assert [o.token_ids for o in outs] == [solo[i] for i in order], f"max_batch {max_batch}, order {order}"


def test_seeded_sampling_alone_equals_batched() -> None:
    name = "llama-tiny"
    prompts = list(golden_prompts(name))
    params = [SamplingParams(max_tokens=24, temperature=0.8, seed=4242 + i, ignore_eos=True) for i in range(6)]
    solo = [engine(name, max_batch=1).generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    filler = [([5 + j] * (3 + 11 * j), SamplingParams(max_tokens=1 + 5 * j, temperature=0.8)) for j in range(6)]
    for max_batch in (1, 2, 3, 64):
        eng = engine(name, max_batch=max_batch)
        mixed = [(p, q) for p, q in zip(prompts, params)] + filler
        order = list(range(len(mixed)))
        random.Random(max_batch).shuffle(order)
        outs = eng.generate([mixed[i][0] for i in order], [mixed[i][1] for i in order])
        got = {i: outs[pos].token_ids for pos, i in enumerate(order) if i < 6}
        assert [got[i] for i in range(6)] == solo, f"max_batch {max_batch}"
    # The same seed in one batch twice: both copies draw the same tokens.
    twice = engine(name, max_batch=4).generate([prompts[0], prompts[0]], [params[0], params[0]])
    assert twice[0].token_ids == twice[1].token_ids == solo[0]


@pytest.mark.parametrize("name", MODELS)
def test_generate_agrees_with_logits_token_by_token(name: str) -> None:
    """Greedy tokens are the argmax of `logits()` over prompt + generated prefix, at every step:
    the batched decode path and the single-sequence path compute the same numbers."""
    eng = engine(name, max_batch=8)
    prompts = [eng.tokenize(p) for p in golden_prompts(name)]
    outs = eng.generate(prompts, GREEDY_24)
    for ids, out in zip(prompts, outs):
        full = ids + out.token_ids
        logits = eng.logits(full[:-1])
        assert logits[len(ids) - 1 :].argmax(axis=1).tolist() == out.token_ids


def test_logits_do_not_depend_on_thread_count() -> None:
    prompt = [int(t) for t in np.random.default_rng(3).integers(2, 512, size=200)]
    one, two = engine("llama-tiny", threads=1), engine("llama-tiny", threads=2)
    assert one.info["threads"] == 1 and two.info["threads"] == 2
    a, b = one.logits(prompt), two.logits(prompt)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    reqs = workload("llama-tiny", seed=11)
    ga = one.generate([r[0] for r in reqs], [r[1] for r in reqs])
    gb = two.generate([r[0] for r in reqs], [r[1] for r in reqs])
    assert [key(c) for c in ga] == [key(c) for c in gb]


def test_repeated_calls_reuse_slots_cleanly() -> None:
    """Slots freed by one call (and within a call) start the next sequence from scratch."""
    eng = engine("llama-tiny", max_batch=2)
    reqs = workload("llama-tiny", seed=5)
    first = [key(c) for c in eng.generate([r[0] for r in reqs], [r[1] for r in reqs])]
    again = [key(c) for c in eng.generate([r[0] for r in reqs], [r[1] for r in reqs])]
    assert first == again == list(alone("llama-tiny", 5))


def test_per_prompt_params_follow_their_prompt() -> None:
    eng = engine("llama-tiny", max_batch=3)
    prompts = list(golden_prompts("llama-tiny"))
    params = [replace(GREEDY_24, max_tokens=3 + i) for i in range(6)]
    outs = eng.generate(prompts[::-1], params[::-1])
    assert [len(o.token_ids) for o in outs] == [3 + i for i in range(6)][::-1]
    with pytest.raises(ValueError, match="6 prompts but 5"):
        eng.generate(prompts, params[:5])
