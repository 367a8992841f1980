"""The Python face of the native engine (`upg_batch._native`).

The Rust extension takes and returns plain values; this module wraps them in the
documented API: `Engine`, `SamplingParams`, `Completion`, `EngineError`.
"""

from __future__ import annotations

import os
import secrets
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from upg_batch import _native
from upg_batch._native import EngineError
from upg_batch.hub import HubError, looks_like_hub_id, resolve_hub_id
from upg_batch.limits import SAMPLING_LIMITS, int_in

__all__ = ["Completion", "Engine", "EngineError", "SamplingParams", "TokenLogprobs", "sample_seed"]


@dataclass(frozen=True)
class SamplingParams:
    """How one prompt is continued. `temperature=0` is greedy decoding.

    `n`: samples per prompt (each seeded on its own: sample j of a prompt with seed s draws with
    seed `sample_seed(s, j)`, sample 0 with s itself, so results are reproducible and sample 0
    equals the n=1 result). `logprobs`: None, or k in [0, 20]: each generated token's
    log-probability and the k most likely tokens' (log-softmax of the model's logits, before
    temperature and filters), in `Completion.logprobs`.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        # the numeric limits are shared with the job's sampling section (upg_batch.limits)
        checks = [(name, check(getattr(self, name)), what) for name, (check, what) in SAMPLING_LIMITS.items()]
        checks += [
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
            ("stop_token_ids", all(int_in(t, 0, 2**32 - 1) for t in self.stop_token_ids), "a list of token ids >= 0"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {what}, got {getattr(self, name)!r}")

    def _to_native(self) -> tuple[Any, ...]:
        return (
            self.max_tokens,
            float(self.temperature),
            self.top_k,
            float(self.top_p),
            float(self.min_p),
            self.seed,
            list(self.stop),
            list(self.stop_token_ids),
            bool(self.ignore_eos),
            self.logprobs,
        )


def _token_ids(ids: Sequence[int], what: str) -> list[int]:
    """`ids` as a list of ints in the native range, or EngineError naming the bad one."""
    out = []
    for pos, t in enumerate(ids):
        if not int_in(t, 0, 2**32 - 1) and not (isinstance(t, np.integer) and 0 <= t < 2**32):
            raise EngineError(f"{what}: token id {t!r} at position {pos} is not an integer in [0, 2**32)")
        out.append(int(t))
    return out


# threads that wait on `submit`ted calls (they hold no GIL while the engine works)
_SUBMIT_THREADS = 64


def sample_seed(seed: int, j: int) -> int:
    """The seed of sample j of a prompt seeded `seed` (j = 0: the seed itself): splitmix64 of
    the pair, so the samples' streams are unrelated."""
    if j == 0:
        return seed
    z = (seed + 0x9E3779B97F4A7C15 * j) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability and the most likely tokens' at that step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass(frozen=True)
class Completion:
    """One finished prompt.

    `token_ids` are the generated tokens (an EOS or stop token that ended generation
    included); `text` is their decoding with special tokens and any stop string removed.
    `ttft_s` and `latency_s` count from the moment `generate` was called. A prompt that cannot
    run (empty, too long for the context, a token id outside the vocabulary) generates
    nothing: `finish_reason` is "error" and `error` says why; the other prompts still run.
    `logprobs`: one `TokenLogprobs` per generated token when the params asked for them.
    `samples`: with `n` > 1, all n samples of the prompt (this one is samples[0]); else [].
    """

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "error"
    prompt_tokens: int
    ttft_s: float
    latency_s: float
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    samples: list[Completion] = field(default_factory=list)


class Engine:
    """A model loaded into the native engine.

    backend: "cpu", "gpu" (wgpu: Metal on macOS, Vulkan on Linux) or "auto" (a hardware GPU
    when there is one, else the CPU). The environment variable UPG_BATCH_GPU_ADAPTER (a
    case-insensitive part of an adapter's name, e.g. "llvmpipe") forces one GPU adapter.
    model_dir: a Hugging Face model folder (config.json, safetensors, tokenizer.json), a hub id
        ORG/NAME[@REVISION] found in the local Hugging Face cache (no network), or a GGUF
        file (metadata, tensors and tokenizer in one; architectures llama, qwen2, gemma3).
    weights: how weights are held in memory: None (the default: "f32" for folders, "stored"
        for GGUF files), "stored" (each matrix as the file stores it, block formats used in
        place), "f32", "f16", "bf16", or a GGUF block format
        quantized at load: "q8_0", "q6_k", "q5_0", "q4_k", "q4_0", or "q4_k_m" (llama.cpp's
        mix: q4_k with q6_k for the output and some layers' v and down projections).
        Matrices whose rows are not whole blocks stay f16 and are listed in
        `info["weight_fallbacks"]`.
    activations: how block-format weights meet the activations: None (the backend's own),
        "int8" (the CPU default: activations quantized per group of 32, integer dot products,
        as llama.cpp does; fast) or "f32" (the dequantized weights times f32 activations,
        which follows the reference to f32 rounding; slower on the CPU, the GPU's only way).
    kv_cache: the KV cache's element type: None or "f32", or "f16" (half the memory, so twice
        the sequences or context in the same memory; keys and values rounded to f16).
    kv_cache_bytes: the most bytes the KV cache may hold (None: whatever max_batch sequences
        take). On the CPU a sequence reserves its prompt plus max_tokens positions and waits
        until that fits beside the running ones (a prompt that never fits fails alone); the GPU,
        which keeps a whole context per sequence, runs as many at once as fit. Results do not
        change, only how many sequences run at once.
    threads: compute threads (None: all cores). max_batch: sequences in flight at once.
    context: longest sequence (prompt + completion) in tokens (None: the model's maximum).
    fused: fused kernels where the backend has them (the GPU: fewer dispatches per step);
    False keeps one op per kernel. Both compute the same function.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        backend: str = "cpu",
        weights: str | None = None,
        threads: int | None = None,
        max_batch: int = 32,
        context: int | None = None,
        fused: bool = True,
        activations: str | None = None,
        kv_cache: str | None = None,
        kv_cache_bytes: int | None = None,
    ) -> None:
        for name, value, low in (("threads", threads, 1), ("max_batch", max_batch, 1), ("context", context, 2)):
            if value is not None and not int_in(value, low, 2**31):
                raise EngineError(f"Engine argument `{name}` must be an integer >= {low}, got {value!r}")
        if not isinstance(fused, bool):
            raise EngineError(f"Engine argument `fused` must be True or False, got {fused!r}")
        if weights is not None and not isinstance(weights, str):
            raise EngineError(f"Engine argument `weights` must be a string or None, got {weights!r}")
        if weights == "":
            raise EngineError('weights "" is unknown (leave it None for the default, or name a format)')
        if activations not in (None, "int8", "f32"):
            raise EngineError(f"Engine argument `activations` must be 'int8', 'f32' or None, got {activations!r}")
        if kv_cache_bytes is not None and not int_in(kv_cache_bytes, 1, 2**63 - 1):
            raise EngineError(f"Engine argument `kv_cache_bytes` must be an integer >= 1 or None, got {kv_cache_bytes!r}")
        if kv_cache not in (None, "f32", "f16"):
            raise EngineError(f"Engine argument `kv_cache` must be 'f32', 'f16' or None, got {kv_cache!r}")
        if not os.path.exists(model_dir) and looks_like_hub_id(model_dir):
            try:
                model_dir = resolve_hub_id(os.fspath(model_dir))
            except HubError as e:
                raise EngineError(str(e)) from None
        self._native = _native.NativeEngine(
            os.fspath(model_dir), backend, weights or "", threads, max_batch, context, fused, activations or "", kv_cache or "", kv_cache_bytes
        )
        info = self._native.info()
        # what a prompt must fit: the vocabulary, the context, and (a cache that grows per
        # sequence) the KV budget: (budget, bytes per position) or None
        budget = (int(info["kv_cache_bytes"]), int(info["kv_bytes_per_token"])) if info["kv_cache_bytes"] and info["backend"] == "cpu" else None
        self._limits = (int(info["vocab"]), int(info["context"]), budget)
        self._submit_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as tokenizer.json encodes it (its post-processor included)."""
        return self._native.tokenize(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        return self._native.detokenize(_token_ids(ids, "detokenize"))

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 [len(token_ids), vocab]: the next-token logits at every position."""
        raw, rows, vocab = self._native.logits(_token_ids(token_ids, "logits"))
        return np.frombuffer(raw, dtype=np.float32).reshape(rows, vocab).copy()

    def submit(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Future[list[Completion]]:
        """`generate` without waiting: the prompts join the engine's running batch at once
        (beside every other call's) and the future resolves when they are done, so callers
        can stream work in and collect completions as they finish (`concurrent.futures.
        as_completed`; submit prompts one by one for per-prompt results). Results equal
        `generate`'s for the same prompts and seeds, whatever else runs beside them."""
        with self._submit_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=_SUBMIT_THREADS, thread_name_prefix="upg-submit")
            return self._executor.submit(self.generate, prompts, params)

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Continue every prompt; results come back in the order of `prompts`. Calls from
        several threads run in one batch (the engine's scheduler admits each call's prompts
        as slots free up) and each returns when its own prompts are done."""
        if isinstance(prompts, (str, bytes)):
            raise TypeError("generate() takes a list of prompts; wrap a single prompt in a list")
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            per_prompt = [params] * len(prompts)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(per_prompt)} SamplingParams")
        out: list[Completion | None] = [None] * len(prompts)
        ok: list[tuple[int, list[int]]] = []
        for i, p in enumerate(prompts):
            ids: list[int] | None = None
            try:
                ids = self._native.tokenize(p) if isinstance(p, str) else _token_ids(p, f"prompt {i}")
                self._check_prompt(ids, i, per_prompt[i].max_tokens)
                ok.append((i, ids))
            except EngineError as e:
                n = len(ids) if ids is not None else 0 if isinstance(p, str) else len(p)
                out[i] = Completion([], "", "error", n, 0.0, 0.0, error=str(e))
        # n samples of a prompt are n requests, seeded apart, in one batch
        requests: list[tuple[int, list[int], SamplingParams]] = []
        for i, ids in ok:
            p = per_prompt[i]
            if p.n > 1 and p.seed is None:
                p = replace(p, seed=secrets.randbits(64))  # one draw for the prompt, so its samples differ
            requests += [(i, ids, p if j == 0 else replace(p, seed=sample_seed(p.seed, j))) for j in range(p.n)]
        results = self._native.generate([ids for _, ids, _ in requests], [p._to_native() for _, _, p in requests]) if requests else []
        samples: dict[int, list[Completion]] = {}
        for (i, _, _), (ids, text, reason, n_prompt, ttft, latency, lps) in zip(requests, results):
            logprobs = None if lps is None else [TokenLogprobs(t, lp, list(top)) for t, (lp, top) in zip(ids, lps)]
            samples.setdefault(i, []).append(Completion(list(ids), text, reason, n_prompt, ttft, latency, logprobs=logprobs))
        for i, group in samples.items():
            out[i] = group[0] if len(group) == 1 else replace(group[0], samples=group)
        return out  # type: ignore[return-value]  # every slot is filled

    def _check_prompt(self, ids: list[int], i: int, max_tokens: int) -> None:
        """EngineError saying why prompt i cannot run, if it cannot (the rules the native
        engine applies to a whole call, applied to one prompt)."""
        info = self._limits
        bad = next((pos for pos, t in enumerate(ids) if t >= info[0]), None)
        if bad is not None:
            raise EngineError(f"prompt {i}: token id {ids[bad]} at position {bad} is outside the vocabulary of {info[0]}")
        if not ids:
            raise EngineError(f"prompt {i} is empty (no tokens)")
        if len(ids) >= info[1]:
            raise EngineError(f"prompt {i}: {len(ids)} tokens leave no room to generate within the context of {info[1]} tokens")
        if info[2] is not None:
            need = min(len(ids) + max_tokens, info[1]) * info[2][1]
            if need > info[2][0]:
                raise EngineError(f"prompt {i}: needs {need} bytes of KV cache (prompt plus max_tokens), more than kv_cache_bytes {info[2][0]}")

    @property
    def info(self) -> dict[str, Any]:
        """What is loaded: architecture, parameters, layers, vocab, context, backend, weights, weight bytes."""
        return dict(self._native.info())

    def stats(self) -> dict[str, float]:
        """Live counters, safe to read from another thread while `generate` runs:
        prompt_tokens_total, generation_tokens_total, running_sequences, waiting_sequences,
        kv_cache_tokens, kv_cache_capacity_tokens, kv_cache_usage_ratio, memory_bytes,
        kv_cache_bytes (now) and kv_cache_peak_bytes (the most since load)."""
        return dict(self._native.stats())
