"""`upg-batch validate`: everything `run` checks, plus each row, without generating.

Loads the model on this machine (proving it loads), then reads the dataset shard by shard
(memory bounded by one shard) and tokenizes every prompt, counting rows that would become
error rows: too long for the context, null or empty, not valid UTF-8, malformed messages,
bad overrides, and row groups whose data cannot be read (each named with its file); and
duplicate or null ids in input.id_column.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pyarrow as pa

from upg_batch import budget
from upg_batch.config import JobConfig, extra_output_columns
from upg_batch.ids import scan_ids
from upg_batch.plan import make_plan
from upg_batch.rows import Prompting, WorkSpec, output_schema, prepare_rows
from upg_batch.metrics import port_problem
from upg_batch.runner import MetricsPortError, ModelError, check_chat_template, check_model_dir

__all__ = ["budget_error", "validate", "format_report"]

_EXAMPLES = 5


def validate(cfg: JobConfig) -> dict[str, Any]:
    from upg_batch.engine import Engine, EngineError, SamplingParams

    check_model_dir(cfg)
    port = port_problem(cfg.metrics.host, cfg.metrics.port)  # e.g. taken by a job running now
    if port:
        raise MetricsPortError(port)
    template = check_chat_template(cfg)  # before loading the weights: the cheap check first
    plan = make_plan(cfg)
    m = cfg.model
    try:
        engine = Engine(m.path, **m.engine_kwargs())
    except (EngineError, OSError, ValueError) as e:
        raise ModelError(f"model.path {m.path}: the model does not load ({e})") from None
    prompting = Prompting(engine, template)
    spec = WorkSpec(cfg, plan.columns, output_schema(plan.id_type, list(zip(plan.columns.passthrough, plan.passthrough_types)), extra_output_columns(cfg)))
    kinds: collections.Counter[str] = collections.Counter()
    examples: list[dict[str, Any]] = []
    first: dict[str, dict[str, Any]] = {}  # the first row of each kind
    prompt_tokens = 0
    unreadable: list[str] = []  # one line per row group whose data cannot be read
    for shard in plan.shards:
        prep = prepare_rows(engine, prompting, shard, spec, SamplingParams)
        prompt_tokens += sum(prep.prompt_tokens)
        unreadable += [u.message for u in prep.unreadable if u.message not in unreadable]
        for i, kind in enumerate(prep.kind):
            if kind is None:
                continue
            kinds[kind] += 1
            if kind not in first:
                first[kind] = {"id": _id_text(prep.ids, i), "error": prep.error[i]}
            if len(examples) < _EXAMPLES:
                examples.append({"id": _id_text(prep.ids, i), "kind": kind, "error": prep.error[i]})
    ids = scan_ids(plan)
    info = engine.info
    return {
        "config": "ok",
        "model": {
            "path": str(Path(m.path)),
            "architecture": info.get("architecture"),
            "context": int(info["context"]),
            "chat_template": template is not None,
            # what the engine runs on (with backend auto, what this machine picked)
            "backend": info.get("backend", m.backend),
            "adapter": info.get("adapter"),
        },
        "files": len(plan.files),
        "rows": plan.total_rows,
        "shards": len(plan.shards),
        "prompt_tokens": prompt_tokens,
        "error_rows": sum(kinds.values()),
        "error_kinds": dict(sorted(kinds.items())),
        "too_long": kinds.get("too_long", 0),
        "examples": examples,
        "unreadable": unreadable,
        "max_error_fraction": cfg.max_error_fraction,
        "over_error_budget": budget.exceeded(plan.total_rows, sum(kinds.values()), cfg.max_error_fraction),
        "first_of_kind": first,
        "ids": None if ids is None else ids.as_dict(),
        "ids_problem": None if ids is None or ids.ok else ids.message(),
    }


def budget_error(r: dict[str, Any]) -> str | None:
    """The one-line error when the rows validate would reject exceed max_error_fraction."""
    if not r.get("over_error_budget"):
        return None
    kinds = collections.Counter(r["error_kinds"])
    examples = {k: [v] for k, v in r.get("first_of_kind", {}).items()}
    text = budget.message(r["rows"], r["error_rows"], r["max_error_fraction"], kinds, examples, verb="would be")
    return f"{text}; a run would stop: fix the job, or raise max_error_fraction (--max-error-fraction on run) to accept them"


def _id_text(ids: Any, i: int) -> Any:
    try:
        return ids[i].as_py()
    except UnicodeDecodeError:  # an id that is not UTF-8: shown with the bad bytes replaced
        return ids[i].cast(pa.binary()).as_py().decode("utf-8", "replace")


def _backend_text(model: dict[str, Any]) -> str:
    adapter = model.get("adapter")
    return f"{model['backend']} on {adapter}" if adapter else str(model["backend"])


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"config ok; model {r['model']['path']} loads ({r['model']['architecture']}, context {r['model']['context']}, "
        f"backend {_backend_text(r['model'])}, chat template: {'yes' if r['model']['chat_template'] else 'no'})",
        f"{r['files']} files, {r['rows']} rows, {r['shards']} shards, {r['prompt_tokens']} prompt tokens",
        f"{r['too_long']} rows too long for the context; {r['error_rows']} rows would be error rows"
        + (f" ({', '.join(f'{k}: {v}' for k, v in r['error_kinds'].items())})" if r["error_kinds"] else ""),
    ]
    if r.get("ids_problem"):
        lines.append(f"ids: {r['ids_problem']}")
    for message in r.get("unreadable", []):
        lines.append(f"unreadable data (its rows would be error rows): {message}")
    for ex in r["examples"]:
        lines.append(f"  row {ex['id']!r}: {ex['error']}")
    return "\n".join(lines)
