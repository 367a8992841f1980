"""One shard's rows in, one Arrow record batch out: prompts, sampling, generation, error rows.

Runs inside an engine actor (and on the driver for error-only batches). Each input row
becomes exactly one output row, in input order: a completion, or an error row saying why.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow as pa

from upg_batch.chat import ChatTemplate, MessagesError
from upg_batch.config import OUTPUT_COLUMNS, JobConfig
from upg_batch.plan import Columns, Shard, Unreadable, read_shard_rows

__all__ = ["Prepared", "id_text", "Prompting", "ShardResult", "WorkSpec", "derive_seed", "error_batch", "output_schema", "prepare_rows", "run_rows"]


@dataclass(frozen=True)
class WorkSpec:
    """What an actor needs to turn a shard into output rows (sent once, at actor start)."""

    cfg: JobConfig
    columns: Columns
    schema: pa.Schema


@dataclass
class ShardResult:
    index: int
    attempt: int
    batch: pa.RecordBatch
    ok: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    generate_s: float = 0.0
    node: str = ""
    actor_key: str = ""
    # error rows by kind (the kinds of Prepared.kind, and "generate" for a failed generation)
    # and the first of each kind as {"id", "error"}; the manifest keeps both per shard
    error_kinds: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, dict[str, Any]] = field(default_factory=dict)


_TOP = pa.list_(pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())]))
LOGPROBS_TYPE = pa.list_(pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32()), ("top", _TOP)]))


def samples_type(logprobs: bool) -> pa.DataType:
    fields = [("completion", pa.string()), ("finish_reason", pa.string()), ("completion_tokens", pa.int32())]
    return pa.list_(pa.struct(fields + ([("logprobs", LOGPROBS_TYPE)] if logprobs else [])))


def output_schema(id_type: pa.DataType, passthrough: Sequence[tuple[str, pa.DataType]], extra: Sequence[str] = ()) -> pa.Schema:
    """OUTPUT_COLUMNS, then the sampling section's `extra` columns (config.extra_output_columns),
    then the passthrough columns."""
    fields = [
        pa.field("id", id_type),
        pa.field("completion", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("error", pa.string()),
    ]
    assert [f.name for f in fields] == list(OUTPUT_COLUMNS)
    if "logprobs" in extra:
        fields.append(pa.field("logprobs", LOGPROBS_TYPE))
    if "samples" in extra:
        fields.append(pa.field("samples", samples_type("logprobs" in extra)))
    return pa.schema(fields + [pa.field(n, t) for n, t in passthrough])


def _logprobs_value(out: Any, text: Any) -> list[dict[str, Any]] | None:
    """`text(token_id)`: the token's text (the engine's decoding of it alone)."""
    if out.logprobs is None:
        return None
    return [
        {"token_id": lp.token_id, "token": text(lp.token_id), "logprob": lp.logprob, "top": [{"token_id": t, "token": text(t), "logprob": v} for t, v in lp.top]}
        for lp in out.logprobs
    ]


def _samples_value(out: Any, logprobs: bool, text: Any) -> list[dict[str, Any]]:
    samples = out.samples or [out]
    return [
        {"completion": s.text, "finish_reason": s.finish_reason, "completion_tokens": len(s.token_ids), **({"logprobs": _logprobs_value(s, text)} if logprobs else {})}
        for s in samples
    ]


def derive_seed(job_seed: int, row_id: Any) -> int:
    """A row's seed from the job seed and its id: independent of sharding and order."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _row_ids(shard: Shard, table: pa.Table, spec: WorkSpec) -> pa.Array:
    if spec.columns.id is not None:
        return table.column(spec.columns.id).combine_chunks().cast(spec.schema.field("id").type)
    return pa.array([f"{shard.file.key}:{r}" for r in range(shard.start, shard.stop)], pa.string())


def _assemble(spec: WorkSpec, ids: pa.Array, table: pa.Table, cols: dict[str, list[Any]]) -> pa.RecordBatch:
    n = len(ids)
    own = [f.name for f in spec.schema][1 : len(spec.schema) - len(spec.columns.passthrough)]
    arrays = [ids] + [pa.array(cols.get(name, [None] * n), spec.schema.field(name).type) for name in own]
    for name in spec.columns.passthrough:
        arrays.append(table.column(name).combine_chunks().cast(spec.schema.field(name).type))
    return pa.RecordBatch.from_arrays(arrays, schema=spec.schema)


def error_batch(shard: Shard, spec: WorkSpec, message: str) -> pa.RecordBatch:
    """Every row of `shard` as an error row with `message` (a shard that could not run)."""
    needed = [c for c in (spec.columns.id, *spec.columns.passthrough) if c is not None]
    table, unreadable = read_shard_rows(shard, needed)
    n = shard.rows
    error = [message] * n
    for u in unreadable:  # rows whose data cannot be read (their id is null): say that too
        error[u.start : u.stop] = [f"{message}; {u.message}"] * (u.stop - u.start)
    cols = {
        "completion": [None] * n,
        "finish_reason": ["error"] * n,
        "prompt_tokens": [0] * n,
        "completion_tokens": [0] * n,
        "error": error,
    }
    return _assemble(spec, _row_ids(shard, table, spec), table, cols)


class Prompting:
    """Per-engine helpers: tokenization as transformers would do for chat text."""

    def __init__(self, engine: Any, template: ChatTemplate | None) -> None:
        self.engine = engine
        self.template = template
        self.context = int(engine.info["context"])
        # What the tokenizer's post-processor adds around any text (e.g. a BOS): chat
        # text already carries its special tokens, so those are taken off again, like
        # transformers' apply_chat_template(tokenize=True) with add_special_tokens=False.
        empty = engine.tokenize("")
        probe = engine.tokenize("a")
        k = 0
        while k < len(empty) and k < len(probe) and empty[k] == probe[k]:
            k += 1
        self.prefix, self.suffix = list(empty[:k]), list(empty[k:])

    def chat_ids(self, messages: Any) -> list[int]:
        if self.template is None:
            raise MessagesError("the model has no chat_template (tokenizer_config.json), so messages cannot be rendered")
        ids = list(self.engine.tokenize(self.template.render(messages)))
        if self.prefix and ids[: len(self.prefix)] == self.prefix:
            ids = ids[len(self.prefix) :]
        if self.suffix and ids[-len(self.suffix) :] == self.suffix:
            ids = ids[: -len(self.suffix)]
        return ids


def _params_for(row: dict[str, Any], row_id: Any, cfg: JobConfig, sampling_cls: Any) -> Any:
    s = cfg.sampling
    values: dict[str, Any] = {
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "min_p": s.min_p,
        "seed": derive_seed(s.seed, row_id) if s.seed is not None else None,
        "stop": tuple(s.stop),
        "n": s.n,
        "logprobs": s.logprobs,
    }
    for name, value in row.items():
        if value is None:
            continue
        if name in ("temperature", "top_p", "min_p") and isinstance(value, int):
            value = float(value)
        values[name] = value
    return sampling_cls(**values)


class _Undecodable:
    """A value that could not be read as a Python object (invalid UTF-8 in a string)."""

    def __init__(self, column: str, error: Exception) -> None:
        self.message = f"{column} is not valid UTF-8 ({error})"

    def __str__(self) -> str:
        return self.message


def _values(arr: Any, column: str) -> list[Any]:
    """A column's values as Python objects. Should one hold bytes that are not UTF-8, every
    row is decoded on its own, and the bad ones become _Undecodable (error rows), so one
    bad value does not fail the shard."""
    try:
        return arr.to_pylist()
    except UnicodeDecodeError:
        pass
    out: list[Any] = []
    for scalar in arr:
        try:
            out.append(scalar.as_py())
        except UnicodeDecodeError as e:
            out.append(_Undecodable(column, e))
    return out


@dataclass
class Prepared:
    """A shard's rows checked and tokenized, ready to generate."""

    table: pa.Table
    ids: pa.Array
    todo: list[tuple[int, list[int], Any]]  # (row, prompt ids, SamplingParams)
    error: list[Any]  # per row: None or why the row is an error row
    kind: list[Any]  # per row: None or "unreadable", "undecodable", "null", "empty", "messages", "tokenize", "too_long", "sampling"
    prompt_tokens: list[int]
    unreadable: list[Unreadable] = field(default_factory=list)  # row groups whose data cannot be read


def prepare_rows(engine: Any, prompting: Prompting, shard: Shard, spec: WorkSpec, sampling_cls: Any) -> Prepared:
    """Read the shard and turn each row into prompt ids and SamplingParams, or an error."""
    cols_in = spec.columns
    # a corrupt row group does not fail the shard: its rows become error rows naming it
    table, unreadable = read_shard_rows(shard, cols_in.all())
    names = set(table.column_names)
    n = shard.rows
    ids = _row_ids(shard, table, spec)
    id_values = _values(ids, "id")

    def col(name: str | None) -> list[Any]:
        return _values(table.column(name), name) if name is not None and name in names else [None] * n

    prompts_in, messages_in = col(cols_in.prompt), col(cols_in.messages)
    request_errors = col("_request_error")  # OpenAI batch lines that are no request
    overrides = {c: col(c) for c in cols_in.overrides}
    prep = Prepared(table, ids, [], [None] * n, [None] * n, [0] * n, unreadable)
    for u in unreadable:
        prep.error[u.start : u.stop] = [u.message] * (u.stop - u.start)
        prep.kind[u.start : u.stop] = ["unreadable"] * (u.stop - u.start)
    for i, e in enumerate(request_errors):
        if e is not None and prep.kind[i] is None:
            prep.error[i], prep.kind[i] = e, "request"
    for i in range(n):
        if prep.kind[i] is not None:
            continue
        kind = "null"
        try:
            kind = "undecodable"
            for value in (id_values[i], messages_in[i], prompts_in[i], *(v[i] for v in overrides.values())):
                if isinstance(value, _Undecodable):
                    raise ValueError(str(value))
            kind = "null"
            if messages_in[i] is not None:
                kind = "messages"
                ids_i = prompting.chat_ids(messages_in[i])
            elif prompts_in[i] is None and (cols_in.prompt or spec.cfg.input.prompt_column) not in names:
                # a mistyped input.prompt_column, with a messages column present: say so
                raise ValueError(
                    f"{cols_in.messages or 'messages'} is null and {shard.file.key} has no column "
                    f"'{spec.cfg.input.prompt_column}' (input.prompt_column)"
                )
            elif prompts_in[i] is None:
                raise ValueError(f"{cols_in.prompt or 'prompt'} is null")
            elif prompts_in[i] == "":
                kind = "empty"
                raise ValueError(f"{cols_in.prompt} is empty")
            else:
                kind = "tokenize"
                ids_i = list(engine.tokenize(prompts_in[i]))
            if not ids_i:
                kind = "empty"
                raise ValueError("prompt has no tokens")
            prep.prompt_tokens[i] = len(ids_i)
            if len(ids_i) >= prompting.context:
                kind = "too_long"
                raise ValueError(
                    f"prompt has {len(ids_i)} tokens; the context holds {prompting.context} (prompt plus at least one generated token)"
                )
            kind = "sampling"
            params = _params_for({c: v[i] for c, v in overrides.items()}, id_values[i], spec.cfg, sampling_cls)
        except (ValueError, TypeError) as e:  # the row's own fault; MessagesError is a ValueError
            prep.error[i], prep.kind[i] = str(e), kind
            continue
        except Exception as e:  # e.g. an EngineError from tokenize: still only this row's
            prep.error[i], prep.kind[i] = f"{type(e).__name__}: {e}", kind
            continue
        prep.todo.append((i, ids_i, params))
    return prep


def run_rows(engine: Any, prompting: Prompting, shard: Shard, spec: WorkSpec, sampling_cls: Any) -> ShardResult:
    """Read the shard, generate every valid row, and build its output batch."""
    prep = prepare_rows(engine, prompting, shard, spec, sampling_cls)
    n = shard.rows
    completion: list[Any] = [None] * n
    reason = ["error"] * n
    p_tok = list(prep.prompt_tokens)
    c_tok = [0] * n
    error = list(prep.error)
    ttfts: list[float] = []
    latencies: list[float] = []
    extra = {f.name for f in spec.schema}
    logprobs: list[Any] = [None] * n
    samples: list[Any] = [None] * n
    more_tokens = 0  # of samples 1..n-1, which the completion_tokens column does not count
    token_text = functools.lru_cache(maxsize=65536)(lambda t: engine.detokenize([t]))
    t0 = time.perf_counter()
    outs = _generate(engine, prep.todo)
    generate_s = time.perf_counter() - t0
    kind = list(prep.kind)
    for (i, _, _), out in zip(prep.todo, outs):
        if isinstance(out, BaseException) or getattr(out, "error", None) is not None:
            error[i] = f"{type(out).__name__}: {out}" if isinstance(out, BaseException) else f"EngineError: {out.error}"
            kind[i] = "generate"
            continue
        completion[i] = out.text
        reason[i] = out.finish_reason
        p_tok[i] = out.prompt_tokens
        c_tok[i] = len(out.token_ids)
        more_tokens += sum(len(s.token_ids) for s in out.samples[1:])
        if "logprobs" in extra:
            logprobs[i] = _logprobs_value(out, token_text)
        if "samples" in extra:
            samples[i] = _samples_value(out, "logprobs" in extra, token_text)
        ttfts.append(out.ttft_s)
        latencies.append(out.latency_s)

    cols = {"completion": completion, "finish_reason": reason, "prompt_tokens": p_tok, "completion_tokens": c_tok, "error": error, "logprobs": logprobs, "samples": samples}
    batch = _assemble(spec, prep.ids, prep.table, cols)
    n_err = sum(e is not None for e in error)
    kinds: dict[str, int] = {}
    examples: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(error):
        if e is not None:
            k = kind[i] or "generate"
            kinds[k] = kinds.get(k, 0) + 1
            if k not in examples:
                examples[k] = {"id": id_text(prep.ids, i), "error": e[:_EXAMPLE_CHARS]}
    return ShardResult(
        index=shard.index,
        attempt=0,
        batch=batch,
        ok=n - n_err,
        errors=n_err,
        prompt_tokens=sum(p for p, e in zip(p_tok, error) if e is None),
        completion_tokens=sum(c_tok) + more_tokens,
        ttfts=ttfts,
        latencies=latencies,
        generate_s=generate_s,
        error_kinds=kinds,
        error_examples=examples,
    )


_EXAMPLE_CHARS = 300  # of an example error message kept in the manifest


def id_text(ids: pa.Array, i: int) -> Any:
    """Row i's id as a Python value (an id that is not UTF-8 with its bad bytes replaced)."""
    try:
        return ids[i].as_py()
    except UnicodeDecodeError:
        return ids[i].cast(pa.binary()).as_py().decode("utf-8", "replace")


def _generate(engine: Any, todo: list[tuple[int, list[int], Any]]) -> list[Any]:
    """All prompts in one call (the engine batches them); if that raises, one call per row
    so only the row at fault becomes an error row."""
    if not todo:
        return []
    try:
        return list(engine.generate([t[1] for t in todo], [t[2] for t in todo]))
    except Exception:
        pass
    outs: list[Any] = []
    for _, ids_i, params in todo:
        try:
            outs.append(engine.generate([ids_i], [params])[0])
        except Exception as e:  # the row's own failure, reported in its error column
            outs.append(e)
    return outs
