"""Sampling: greedy and top-k=1, seeds, the top-k / top-p / min-p masks and temperature checked
against the model's own next-token distribution over thousands of seeded draws, and every way
a completion ends (stop strings, stop tokens, EOS, max_tokens, the context)."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from upg_batch import Engine, SamplingParams

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LLAMA = FIXTURES / "models" / "llama-tiny"
GREEDY_24 = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
DRAWS = 4000


@functools.cache
def engine(max_batch: int = 32, context: int | None = None) -> Engine:
    return Engine(LLAMA, max_batch=max_batch, context=context)


@functools.cache
def cases() -> list[dict[str, Any]]:
    return json.loads((FIXTURES / "golden" / "llama-tiny.json").read_text())["cases"]


# ---------------------------------------------------------------- the distribution, in numpy


@functools.cache
def prompt_logits() -> tuple[tuple[int, ...], np.ndarray]:
    """A short golden prompt and the model's next-token logits after it (float32, from logits())."""
    ids = tuple(cases()[2]["prompt_ids"])
    return ids, engine().logits(list(ids))[-1]


def filtered(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> dict[int, float]:
    """token -> probability after temperature, top-k, top-p, min-p (transformers' order),
    renormalized: what the sampler should draw from."""
    order = sorted(range(len(logits)), key=lambda i: (-float(logits[i]), i))
    if top_k:
        order = order[:top_k]
    z = np.array([float(logits[i]) for i in order]) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1  # smallest prefix with mass >= top_p
        order, p = order[:keep], p[:keep]
    if min_p > 0.0:
        mask = p >= min_p * p[0]
        order, p = [t for t, m in zip(order, mask) if m], p[mask]
    p = p / p.sum()
    return dict(zip(order, p.tolist()))


def sorted_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.sort(logits.astype(np.float64))[::-1] / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def draw(n: int = DRAWS, **params: Any) -> np.ndarray:
    """One next token for each of seeds 0..n-1, all in one batch."""
    ids, _ = prompt_logits()
    eng = engine(max_batch=1024)
    outs = eng.generate([list(ids)] * n, [SamplingParams(max_tokens=1, seed=s, **params) for s in range(n)])
    assert all(len(o.token_ids) == 1 for o in outs)
    return np.array([o.token_ids[0] for o in outs])


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper 1e-4 quantile of chi-square(df), Wilson-Hilferty approximation."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(draws: np.ndarray, dist: dict[int, float]) -> tuple[float, int]:
    """Pearson statistic of the draws against `dist` (tokens expected < 5 times pooled), and df."""
    n = len(draws)
    counts = np.bincount(draws, minlength=512)
    big = [t for t, p in dist.items() if n * p >= 5]
    small = [t for t in dist if t not in big]
    obs = [counts[t] for t in big] + ([sum(counts[t] for t in small)] if small else [])
    exp = [n * dist[t] for t in big] + ([n * sum(dist[t] for t in small)] if small else [])
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return stat, len(obs) - 1


def assert_draws_follow(draws: np.ndarray, dist: dict[int, float]) -> None:
    outside = sorted(set(draws.tolist()) - set(dist))
    assert not outside, f"drew tokens the filters should have masked: {outside[:10]}"
    missing = [t for t, p in dist.items() if p * len(draws) >= 20 and t not in set(draws.tolist())]
    assert not missing, f"never drew tokens the filters keep: {missing}"
    stat, df = chi2(draws, dist)
    assert df >= 1
    assert stat < chi2_critical(df), f"chi-square {stat:.1f} with {df} df (critical {chi2_critical(df):.1f})"


# ---------------------------------------------------------------- greedy, seeds


def test_top_k_one_equals_greedy() -> None:
    eng = engine()
    prompts = [c["prompt"] for c in cases()]
    greedy = [o.token_ids for o in eng.generate(prompts, GREEDY_24)]
    assert greedy == [c["greedy_ids"] for c in cases()]  # llama-tiny has no near-tie in 24 steps
    for temperature in (0.7, 1.5):
        params = [SamplingParams(max_tokens=24, temperature=temperature, top_k=1, seed=s, ignore_eos=True) for s in range(6)]
        assert [o.token_ids for o in eng.generate(prompts, params)] == greedy
    # temperature 0 ignores the seed and the filters
    params = [SamplingParams(max_tokens=24, temperature=0.0, seed=s, top_p=0.5, ignore_eos=True) for s in range(6)]
    assert [o.token_ids for o in eng.generate(prompts, params)] == greedy


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    eng = engine()
    prompt = cases()[0]["prompt"]
    p = SamplingParams(max_tokens=24, temperature=1.0, seed=123, ignore_eos=True)
    a = eng.generate([prompt], p)[0].token_ids
    b = eng.generate([prompt], p)[0].token_ids
    assert a == b
    assert a != cases()[0]["greedy_ids"], "temperature 1 should not reproduce greedy decoding"
    by_seed = [o.token_ids for o in eng.generate([prompt] * 8, [SamplingParams(max_tokens=24, seed=s, ignore_eos=True) for s in range(8)])]
    assert len({tuple(t) for t in by_seed}) == 8, "eight seeds should give eight different continuations"
    assert by_seed[0] == eng.generate([prompt], SamplingParams(max_tokens=24, seed=0, ignore_eos=True))[0].token_ids
    unseeded = [o.token_ids for o in eng.generate([prompt] * 4, SamplingParams(max_tokens=24, ignore_eos=True))]
    assert len({tuple(t) for t in unseeded}) == 4, "unseeded requests should not share a random stream"


# ---------------------------------------------------------------- the masks


def test_unfiltered_draws_follow_the_softmax() -> None:
    _, logits = prompt_logits()
    assert_draws_follow(draw(temperature=1.0), filtered(logits))


def test_top_k_keeps_the_k_most_likely() -> None:
    _, logits = prompt_logits()
    dist = filtered(logits, top_k=5)
    assert len(dist) == 5
    assert_draws_follow(draw(temperature=1.0, top_k=5), dist)


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    _, logits = prompt_logits()
    p = sorted_probs(logits)
    k = 8
    top_p = float(np.cumsum(p)[k - 1] - p[k - 1] / 2)  # midway inside the k-th token's mass
    dist = filtered(logits, top_p=top_p)
    assert len(dist) == k
    assert_draws_follow(draw(temperature=1.0, top_p=top_p), dist)


def test_min_p_drops_tokens_below_a_fraction_of_the_top() -> None:
    _, logits = prompt_logits()
    p = sorted_probs(logits)
    k = 3 + int(np.argmax(p[2:14] / p[3:15]))  # the widest gap between ranks 3 and 15
    min_p = float(math.sqrt(p[k - 1] * p[k]) / p[0])
    dist = filtered(logits, min_p=min_p)
    assert len(dist) == k
    assert_draws_follow(draw(temperature=1.0, min_p=min_p), dist)


def test_filters_combine_in_order() -> None:
    """temperature, then top-k, then top-p on the renormalized top-k, then min-p."""
    _, logits = prompt_logits()
    t, top_k = 0.7, 40
    p = sorted_probs(logits, t)[:top_k]
    p = p / p.sum()
    top_p = float(np.cumsum(p)[19] - p[19] / 2)  # 20 survive top-p
    q = p[:20] / p[:20].sum()
    min_p = float(math.sqrt(q[11] * q[12]) / q[0])  # 12 survive min-p
    dist = filtered(logits, temperature=t, top_k=top_k, top_p=top_p, min_p=min_p)
    assert len(dist) == 12
    assert_draws_follow(draw(temperature=t, top_k=top_k, top_p=top_p, min_p=min_p), dist)


def test_temperature_sharpens_and_flattens() -> None:
    _, logits = prompt_logits()
    top = int(np.argmax(logits))
    freq = {}
    for t in (0.5, 2.0):
        d = draw(temperature=t)
        assert_draws_follow(d, filtered(logits, temperature=t))
        other = filtered(logits, temperature=2.5 - t)
        stat, df = chi2(d, other)
        assert stat > 3 * chi2_critical(df), f"draws at temperature {t} also fit temperature {2.5 - t}"
        freq[t] = float(np.mean(d == top))
    assert freq[0.5] > 2 * freq[2.0]


# ---------------------------------------------------------------- how completions end


def greedy_text_case() -> tuple[str, list[int], str]:
    """A golden prompt, its 24 greedy tokens and their text."""
    c = cases()[1]
    out = engine().generate([c["prompt"]], GREEDY_24)[0]
    assert out.token_ids == c["greedy_ids"]
    return c["prompt"], out.token_ids, out.text


def test_stop_string_cuts_the_text() -> None:
    eng = engine()
    prompt, ids, text = greedy_text_case()
    # The first run of three ASCII letters after the first few characters.
    at = next(i for i in range(4, len(text) - 3) if text[i : i + 3].isascii() and text[i : i + 3].isalpha())
    stop = text[at : at + 3]
    cut = text.find(stop)
    out = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:cut] and stop not in out.text
    n = len(out.token_ids)
    assert out.token_ids == ids[:n] and n < 24
    assert stop in eng.detokenize(ids[:n]) and stop not in eng.detokenize(ids[: n - 1]), "generation should end at the token completing the stop string"
    # Of several stop strings, the one that appears first ends generation.
    later = text[cut + 3 :].lstrip()[:2]
    assert later and later not in text[: cut + 3]
    out2 = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[later, stop]))[0]
    assert (out2.text, out2.token_ids) == (out.text, out.token_ids)
    # A stop string that never appears changes nothing.
    out3 = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=["\u2603never"]))[0]
    assert (out3.token_ids, out3.text, out3.finish_reason) == (ids, text, "length")


def test_stop_string_late_in_a_long_completion() -> None:
    # The engine checks stop strings on a decoded tail of the completion; a match hundreds of
    # tokens in must end generation exactly where a check of the whole text would.
    eng = engine()
    prompt = cases()[2]["prompt"]
    long = eng.generate([prompt], SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True))[0]
    text = long.text
    starts = [i for i in range(len(text) * 3 // 4, len(text) - 4) if text[i : i + 4].isascii() and text[i : i + 4].strip() == text[i : i + 4]]
    assert starts, "the completion should have some ASCII late in its text"
    for at in starts[:5]:
        stop = text[at : at + 4]
        cut = text.find(stop)
        out = eng.generate([prompt], SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
        assert out.finish_reason == "stop" and out.text == text[:cut], stop
        n = len(out.token_ids)
        assert out.token_ids == long.token_ids[:n]
        assert stop in eng.detokenize(long.token_ids[:n]) and stop not in eng.detokenize(long.token_ids[: n - 1]), stop


def test_stop_token_ids_end_generation() -> None:
    eng = engine()
    prompt, ids, _ = greedy_text_case()
    k = next(i for i in range(3, 24) if ids[i] not in ids[:i] and ids[i] != 1)
    out = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[ids[k], 7777]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == ids[: k + 1], "the stop token is the last token returned"
    assert out.text == eng.detokenize(ids[:k]), "the stop token's text is not part of the completion"


def test_eos_stops_unless_ignored() -> None:
    eng = engine()
    c = cases()[0]
    ids = c["greedy_ids"]
    e = ids.index(1)  # the reference run emits <|eos|> early
    assert e < 23
    out = eng.generate([c["prompt"]], SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert (out.token_ids, out.finish_reason) == (ids[: e + 1], "stop")
    assert out.text == eng.detokenize(ids[:e])
    out = eng.generate([c["prompt"]], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    assert (out.token_ids, out.finish_reason) == (ids, "length")


def test_stop_token_ids_apply_even_when_eos_is_ignored() -> None:
    c = cases()[0]
    e = c["greedy_ids"].index(1)
    out = engine().generate([c["prompt"]], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[1]))[0]
    assert (out.token_ids, out.finish_reason) == (c["greedy_ids"][: e + 1], "stop")


def test_detokenize_skips_special_tokens() -> None:
    eng = engine()
    ids = cases()[0]["prompt_ids"]
    assert eng.detokenize([0] + ids + [1]) == eng.detokenize(ids) == cases()[0]["prompt"]
    out = eng.generate([cases()[0]["prompt"]], GREEDY_24)[0]
    assert 1 in out.token_ids and "<|eos|>" not in out.text


def test_eos_ids_come_from_generation_config(tmp_path: Path) -> None:
    prompt, ids, _ = greedy_text_case()
    k = next(i for i in range(2, 24) if ids[i] not in ids[:i] and ids[i] != 1)
    model = tmp_path / "model"
    shutil.copytree(LLAMA, model)
    gen = json.loads((model / "generation_config.json").read_text())
    gen["eos_token_id"] = [1, ids[k]]
    (model / "generation_config.json").write_text(json.dumps(gen))
    eng = Engine(model)
    assert eng.info["eos_token_ids"] == [1, ids[k]]
    out = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert (out.token_ids, out.finish_reason) == (ids[: k + 1], "stop")
    out = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    assert (out.token_ids, out.finish_reason) == (ids, "length")
    # Without generation_config.json, config.json's eos_token_id (a single id) applies.
    (model / "generation_config.json").unlink()
    cfg = json.loads((model / "config.json").read_text())
    cfg["eos_token_id"] = ids[k]
    (model / "config.json").write_text(json.dumps(cfg))
    eng = Engine(model)
    assert eng.info["eos_token_ids"] == [ids[k]]
    out = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert (out.token_ids, out.finish_reason) == (ids[: k + 1], "stop")


def test_max_tokens_and_context_end_with_length() -> None:
    prompt, ids, _ = greedy_text_case()
    out = engine().generate([prompt], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert (out.token_ids, out.finish_reason) == (ids[:5], "length")
    # A 16-token context leaves 16 - len(prompt) tokens to generate.
    n_prompt = len(cases()[1]["prompt_ids"])
    small = Engine(LLAMA, context=n_prompt + 6)
    out = small.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    assert (out.token_ids, out.finish_reason) == (ids[:6], "length")


def test_timings() -> None:
    eng = engine(max_batch=8)
    prompts = [c["prompt"] for c in cases()]
    outs = eng.generate(prompts, [SamplingParams(max_tokens=1 + 8 * i, temperature=0.0, ignore_eos=True) for i in range(6)])
    for c, o in zip(cases(), outs):
        assert 0.0 < o.ttft_s <= o.latency_s
        assert o.prompt_tokens == len(c["prompt_ids"])
    lat = [o.latency_s for o in outs]
    assert lat == sorted(lat) and lat[0] < lat[-1], "longer completions in the same batch finish later"


# ---------------------------------------------------------------- parameter checks


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0), ("max_tokens", None),
        ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
        ("top_k", -1), ("top_k", 1.5),
        ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")), ("top_p", -0.5),
        ("min_p", -0.01), ("min_p", 1.5), ("min_p", float("nan")),
        ("seed", -1), ("seed", 1.0), ("seed", "7"),
        ("stop", [""]), ("stop", ["ok", 3]),
        ("stop_token_ids", [-1]),
    ],
)
def test_invalid_sampling_params_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "params",
    [
        {"seed": 0}, {"seed": 2**64 - 1}, {"seed": 2**63},
        {"temperature": 1e-300}, {"temperature": 1e-45}, {"temperature": 1e39}, {"temperature": 1e300},
        {"top_p": 1e-300}, {"top_p": 1.0}, {"min_p": 1.0}, {"min_p": 1e-300},
        {"top_k": 1}, {"top_k": 511}, {"top_k": 512}, {"top_k": 2**31},
        {"max_tokens": 2**31}, {"stop_token_ids": [2**32 - 1, 511, 512]}, {"stop": ["\x00", "é"]},
    ],
)
def test_every_accepted_sampling_params_runs(params: dict[str, Any]) -> None:
    """What SamplingParams accepts, generate runs (or SamplingParams itself refuses it, naming
    the field): nothing passes validation only to fail in the native layer."""
    try:
        p = SamplingParams(**{"max_tokens": 4, **params})
    except ValueError as e:
        assert next(iter(params)) in str(e)
        return
    eng = engine(context=16)
    outs = eng.generate([cases()[2]["prompt_ids"]] * 2, [p, p])
    assert all(1 <= len(o.token_ids) <= min(p.max_tokens, 16 - 4) for o in outs)
    if p.seed is not None or p.temperature < 1e-30 or p.top_k == 1 or p.top_p < 1e-30 or p.min_p == 1.0:
        assert outs[0].token_ids == outs[1].token_ids
