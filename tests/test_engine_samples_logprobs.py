"""SamplingParams(n=...) and SamplingParams(logprobs=...): several samples per prompt, seeded
apart reproducibly, and each token's log-probability with the top k, checked against the
log-softmax of the engine's own logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from upg_batch import Engine, SamplingParams
from upg_batch.engine import sample_seed

LLAMA = Path(__file__).resolve().parent / "fixtures" / "models" / "llama-tiny"
PROMPTS = [[5, 6, 7, 8], [100, 200, 300], [42]]


@pytest.fixture(scope="module")
def eng() -> Engine:
    return Engine(LLAMA, max_batch=16)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def test_logprobs_are_the_log_softmax_of_the_logits_with_the_top_k(eng: Engine) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, logprobs=5, ignore_eos=True)
    for prompt, out in zip(PROMPTS, eng.generate(PROMPTS, params)):
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 6
        # the logits behind each step: the prompt plus the tokens before it
        logits = eng.logits(prompt + out.token_ids[:-1])[len(prompt) - 1:]
        for step, (lp, row) in enumerate(zip(out.logprobs, logits)):
            want = log_softmax(row)
            assert lp.token_id == out.token_ids[step]
            assert abs(lp.logprob - want[lp.token_id]) < 1e-4, step
            top_ids = [t for t, _ in lp.top]
            assert top_ids == sorted(range(len(want)), key=lambda t: (-want[t], t))[:5]
            assert all(abs(v - want[t]) < 1e-4 for t, v in lp.top)
    # without the option nothing is computed; k = 0 gives the chosen token's alone
    (plain,) = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0.0))
    assert plain.logprobs is None
    (chosen,) = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0.0, logprobs=0))
    assert chosen.logprobs is not None and all(lp.top == [] for lp in chosen.logprobs)
    assert chosen.token_ids == plain.token_ids  # asking changes nothing else


def test_n_samples_are_seeded_apart_and_reproducible(eng: Engine) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11, n=4, ignore_eos=True)
    first = eng.generate(PROMPTS, params)
    again = eng.generate(list(reversed(PROMPTS)), params)[::-1]  # another order, the same draws
    for out, same in zip(first, again):
        assert len(out.samples) == 4 and out.samples[0].token_ids == out.token_ids
        assert [s.token_ids for s in out.samples] == [s.token_ids for s in same.samples]
        assert len({tuple(s.token_ids) for s in out.samples}) > 1  # temperature 1: they differ
    # sample j is the n=1 result under sample_seed(seed, j)
    for j in range(4):
        (one,) = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=1.0, seed=sample_seed(11, j), ignore_eos=True))
        assert one.token_ids == first[0].samples[j].token_ids
    assert sample_seed(11, 0) == 11 and len({sample_seed(11, j) for j in range(100)}) == 100
    # unseeded: the samples still differ from each other
    (free,) = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=8, temperature=1.0, n=3, ignore_eos=True))
    assert len(free.samples) == 3 and len({tuple(s.token_ids) for s in free.samples}) > 1
    (single,) = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=4, n=1))
    assert single.samples == []


@pytest.mark.parametrize("field, value", [("n", 0), ("n", 129), ("n", 1.5), ("logprobs", 21), ("logprobs", -1), ("logprobs", True)])
def test_bad_n_and_logprobs_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})
