"""`upg-batch show OUT`: what an output folder holds, complete or not.

Everything but the samples comes from the manifest (the snapshot and the commit log, as
`read_committed` reads them, so it is safe while a run commits): the stored summary of a
complete job, rows and tokens per node over every run, error rows by kind with examples (each
shard's entry records its kinds and an example of each). The samples read the first part files
only; so do examples of shards committed before kinds were recorded.
"""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from upg_batch.budget import error_examples, error_kinds
from upg_batch.manifest import LOG, MANIFEST, OutputError, read_committed

__all__ = ["show", "format_show"]

_EXAMPLES_PER_KIND = 3
_TEXT_CHARS = 200


def _read(path: Path, columns: list[str]) -> pa.Table:
    if path.suffix == ".parquet":
        return pq.read_table(path, columns=columns)
    if path.suffix == ".jsonl":  # OpenAI result lines: the first choice of each answered request
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            choice = (r.get("response") or {}).get("body", {}).get("choices", [{}])[0]
            text = choice.get("message", {}).get("content") if "message" in choice else choice.get("text")
            rows.append({"id": r.get("custom_id"), "completion": text, "finish_reason": choice.get("finish_reason", "error"), "error": (r.get("error") or {}).get("message")})
        return pa.Table.from_pylist(rows).select(columns) if rows else pa.table({c: [] for c in columns})
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all().select(columns)


def _clip(text: Any) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= _TEXT_CHARS else s[: _TEXT_CHARS - 3] + "..."


def show(out: str | Path, samples: int = 3) -> dict[str, Any]:
    """The facts `format_show` prints, as a dict (what `show --json` prints)."""
    out = Path(out)
    if not out.is_dir():
        raise OutputError(f"{out}: no such folder")
    if not (out / MANIFEST).exists() and not (out / LOG).exists():
        raise OutputError(f"{out}: no {MANIFEST}; not an upg-batch output folder, or no run has begun in it")
    manifest = read_committed(out)
    entries = [(int(k), e) for k, e in manifest["shards"].items()]
    summary = manifest.get("summary") if manifest.get("complete") else None
    engines = {n: v.get("engine") for n, v in (summary or {}).get("nodes", {}).items()}

    nodes: dict[str, dict[str, Any]] = {}
    for _, e in entries:
        n = nodes.setdefault(e.get("node") or "(failed shards)", {"shards": 0, "rows": 0, "completion_tokens": 0})
        n["shards"] += 1
        n["rows"] += int(e["rows"])
        n["completion_tokens"] += int(e.get("completion_tokens", 0))
    rows = sum(n["rows"] for n in nodes.values())
    for name, n in nodes.items():
        n["share"] = n["rows"] / rows if rows else 0.0
        if engines.get(name):
            n["engine"] = engines[name]

    plain = [e for _, e in entries]
    kinds = error_kinds(plain)
    examples = error_examples(plain, per_kind=_EXAMPLES_PER_KIND)
    if kinds.get("unrecorded"):
        examples["unrecorded"] = _scan_errors(out, [e for e in plain if e.get("errors") and "error_kinds" not in e])
    return {
        "output": str(out),
        "complete": summary is not None,
        "runs": manifest.get("runs", 0),
        "shards_committed": len(entries),
        "shards_total": manifest.get("total_shards"),
        "rows_committed": rows,
        "rows_ok": sum(int(e.get("ok", 0)) for e in plain),
        "rows_error": sum(int(e.get("errors", 0)) for e in plain),
        "prompt_tokens": sum(int(e.get("prompt_tokens", 0)) for e in plain),
        "completion_tokens": sum(int(e.get("completion_tokens", 0)) for e in plain),
        "summary": summary,
        "nodes": nodes,
        "error_kinds": dict(kinds.most_common()),
        "error_examples": examples,
        "samples": _samples(out, [e for _, e in sorted(entries, key=lambda x: x[0])], samples),
    }


def _scan_errors(out: Path, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for e in entries:
        for row in _read(out / e["file"], ["id", "error"]).to_pylist():
            if row["error"] is not None:
                found.append({"id": row["id"], "error": _clip(row["error"])})
                if len(found) >= _EXAMPLES_PER_KIND:
                    return found
    return found


def _samples(out: Path, entries: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for e in entries:
        if len(found) >= n:
            break
        if not e.get("ok"):
            continue
        for row in _read(out / e["file"], ["id", "completion", "finish_reason"]).to_pylist():
            if row["completion"] is not None:
                found.append(row)
                if len(found) >= n:
                    break
    return found


def format_show(r: dict[str, Any]) -> str:
    if r["complete"]:
        state = f"complete ({r['runs']} run{'s' if r['runs'] != 1 else ''})"
    elif r["shards_committed"] == r["shards_total"]:
        # every shard is in, but no run marked the job complete (e.g. it stopped over max_error_fraction)
        state = f"not complete: all {r['shards_total']} shards committed, but no run finished the job (run it again to finish)"
    else:
        state = f"incomplete: {r['shards_committed']} of {r['shards_total']} shards committed (run the job again to resume)"
    rows = r["rows_committed"]
    pct = 100.0 * r["rows_error"] / rows if rows else 0.0
    lines = [
        f"{r['output']}: {state}",
        f"rows: {rows} committed, {r['rows_ok']} ok, {r['rows_error']} error rows ({pct:.1f}%); "
        f"tokens: {r['prompt_tokens']} prompt, {r['completion_tokens']} completion",
    ]
    s = r.get("summary")
    if s:
        lines.append(
            f"last run: {s['tokens_per_s']:.1f} completion tok/s over {s.get('processing_s', 0.0):.1f}s of generation "
            f"({s['wall_s']:.1f}s wall), {s['shards_run']} shards run, {s['shards_skipped']} already committed"
        )
    if r["nodes"]:
        lines.append("nodes (every run):")
        for name, n in sorted(r["nodes"].items()):
            lines.append(
                f"  {name}: {n['shards']} shards, {n['rows']} rows ({100.0 * n['share']:.1f}%), {n['completion_tokens']} completion tokens"
                + (f" on {n['engine']}" if n.get("engine") else "")
            )
    if r["error_kinds"]:
        lines.append("error rows by kind:")
        for kind, count in r["error_kinds"].items():
            lines.append(f"  {kind}: {count}")
            for ex in r["error_examples"].get(kind, []):
                lines.append(f"    row {ex.get('id')!r}: {_clip(ex.get('error'))}")
    if r["samples"]:
        lines.append("sample completions:")
        for row in r["samples"]:
            lines.append(f"  row {row['id']!r} [{row['finish_reason']}]: {_clip(row['completion'])!r}")
    return "\n".join(lines)

