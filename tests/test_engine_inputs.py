"""Engine arguments and inputs: bad arguments, backends and options raise `EngineError` naming
them; a prompt that cannot run (too long, empty, ids outside the vocabulary) fails alone in
`generate`; errors leave the engine as it was. (Bad model files: test_engine_errors.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from test_engine_errors import MODELS, PROMPT, bits, expect_engine_error

from upg_batch import Completion, Engine, EngineError, SamplingParams


@pytest.fixture(scope="module")
def eng() -> Engine:
    return Engine(MODELS / "llama-tiny", context=16)


def failed(out: Completion, *needles: str) -> None:
    """`out` is a prompt that could not run: no tokens, finish_reason "error", every needle in
    its error."""
    assert (out.finish_reason, out.token_ids, out.text) == ("error", [], ""), out
    for needle in needles:
        assert needle in (out.error or ""), f"{needle!r} not in {out.error!r}"


def test_prompt_longer_than_context(eng: Engine) -> None:
    (out,) = eng.generate([list(range(2, 18))], SamplingParams(max_tokens=2))
    failed(out, "prompt 0", "16 tokens", "context of 16")
    ok, bad = eng.generate([[5, 6], list(range(2, 30))], SamplingParams(max_tokens=2, temperature=0.0))
    assert ok.error is None and len(ok.token_ids) >= 1 and bad.prompt_tokens == 28
    failed(bad, "prompt 1", "context")
    expect_engine_error(lambda: eng.logits(list(range(2, 19))), "17", "context")
    # A prompt one short of the context generates one token.
    (out,) = eng.generate([list(range(2, 17))], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert (len(out.token_ids), out.finish_reason, out.error) == (1, "length", None)
    assert eng.logits(list(range(2, 18))).shape == (16, 512)


@pytest.mark.parametrize("bad", [512, 513, 2**31, -1, -(2**40), 2**32, 2**70])
def test_token_id_out_of_vocabulary(eng: Engine, bad: int) -> None:
    (out,) = eng.generate([[5, bad, 6]], SamplingParams(max_tokens=2))
    failed(out, str(bad), "position 1")
    expect_engine_error(lambda: eng.logits([5, 6, bad]), str(bad))
    expect_engine_error(lambda: eng.detokenize([bad]), str(bad))


def test_empty_prompt(eng: Engine) -> None:
    (out,) = eng.generate([[]], SamplingParams(max_tokens=2))
    failed(out, "empty")
    hello, empty = eng.generate(["hello", ""], SamplingParams(max_tokens=2))
    assert hello.error is None and hello.finish_reason in ("stop", "length")
    failed(empty, "prompt 1", "empty")
    expect_engine_error(lambda: eng.logits([]), "empty")
    assert eng.generate([], SamplingParams()) == []
    assert eng.tokenize("") == [] and eng.detokenize([]) == ""


def test_one_bad_prompt_fails_alone_and_the_others_are_unchanged(eng: Engine) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    good = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    alone = eng.generate(good, params)
    before = eng.stats()["generation_tokens_total"]
    mixed = eng.generate([good[0], [7, 9999], good[1], [], good[2]], params)
    failed(mixed[1], "prompt 1", "9999")
    failed(mixed[3], "prompt 3", "empty")
    assert [m.token_ids for m in (mixed[0], mixed[2], mixed[4])] == [a.token_ids for a in alone]
    assert eng.stats()["generation_tokens_total"] == before + 3 * 6


def test_unknown_weights_format() -> None:
    for w in ("int8", "q4", "F32", ""):
        expect_engine_error(lambda: Engine(MODELS / "llama-tiny", weights=w), "weights", repr(w).replace("'", '"'))


def test_activations_option_is_checked() -> None:
    for bad in ("f16", "", "INT8", 8):
        expect_engine_error(lambda: Engine(MODELS / "llama-tiny", activations=bad), "activations")
    # int8 activations are the CPU's; the GPU keeps f32 and says so rather than ignoring it
    expect_engine_error(lambda: Engine(MODELS / "llama-tiny", backend="gpu", activations="int8"), "activations='int8'", "cpu backend")


def test_cpu_f32_activations_compute_what_the_gpu_computes() -> None:
    """The same q8_0 weights on the CPU with f32 activations and on the GPU (always f32
    activations) agree to f32 rounding; the CPU's int8 activations are visibly farther."""
    gpu = Engine(MODELS / "llama-tiny", weights="q8_0", backend="gpu").logits(PROMPT)
    f32acts = Engine(MODELS / "llama-tiny", weights="q8_0", activations="f32")
    int8acts = Engine(MODELS / "llama-tiny", weights="q8_0")
    assert (f32acts.info["activations"], int8acts.info["activations"]) == ("f32", "int8")
    near, far = np.abs(f32acts.logits(PROMPT) - gpu).max(), np.abs(int8acts.logits(PROMPT) - gpu).max()
    assert near < 1e-4, near
    assert far > 10 * near, (near, far)


def test_unknown_backend() -> None:
    expect_engine_error(lambda: Engine(MODELS / "llama-tiny", backend="tpu"), "backend", "tpu")


def test_gpu_adapter_that_does_not_exist_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPG_BATCH_GPU_ADAPTER", "no-such-adapter-xyz")
    expect_engine_error(lambda: Engine(MODELS / "llama-tiny", backend="gpu"), "UPG_BATCH_GPU_ADAPTER", "no-such-adapter-xyz")


@pytest.mark.parametrize("arg, value", [
    ("context", 1), ("context", 513), ("context", 0), ("context", -1),
    ("max_batch", 0), ("max_batch", -1), ("max_batch", 2.5), ("threads", 0), ("threads", -2), ("threads", 10**6),
    ("threads", True),
])
def test_bad_engine_arguments(arg: str, value: int) -> None:
    expect_engine_error(lambda: Engine(MODELS / "llama-tiny", **{arg: value}), arg)


def test_engine_error_is_an_exception_with_a_message() -> None:
    assert issubclass(EngineError, Exception)
    msg = expect_engine_error(lambda: Engine(MODELS / "llama-tiny", weights="nope"))
    assert msg and "panicked" not in msg


def test_errors_do_not_poison_the_engine(eng: Engine) -> None:
    ref = eng.logits(PROMPT[:8])
    for bad in ([], [600], list(range(2, 40))):
        with pytest.raises(EngineError):
            eng.logits(bad)
    assert np.array_equal(bits(eng.logits(PROMPT[:8])), bits(ref))
    assert eng.stats()["running_sequences"] == 0
