"""The error budget (`max_error_fraction`): a job whose rows are mostly error rows stops.

Error rows are results (a bad row never fails its shard), but a job where most rows fail is
usually a mistake of the job: a mistyped column, a context too small, a wrong template. The
fraction is taken over committed rows (those of earlier runs of the job included), once at
least `MIN_ROWS` of them are in (or the whole job, if smaller), so one bad row early in a
small job does not stop it; and always once more when every row is in. The message names the
most frequent error kinds with an example of each.

The kinds come from the manifest: every shard's entry counts its error rows by kind
(`error_kinds`) and keeps one example of each (`error_examples`); see rows.py.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable

__all__ = ["ErrorBudgetError", "MIN_ROWS", "check", "error_examples", "error_kinds", "exceeded", "message"]

# committed rows before the fraction is looked at (it is always looked at once all are in)
MIN_ROWS = 200
_SHOWN_KINDS = 3
_EXAMPLE_CHARS = 160


class ErrorBudgetError(RuntimeError):
    """More than max_error_fraction of the rows are error rows; the message names the kinds."""


def error_kinds(entries: Iterable[dict[str, Any]]) -> collections.Counter[str]:
    """Error rows by kind over manifest entries (entries written before kinds were recorded
    count as `unrecorded`)."""
    kinds: collections.Counter[str] = collections.Counter()
    for e in entries:
        recorded = e.get("error_kinds")
        if isinstance(recorded, dict):
            kinds.update({str(k): int(v) for k, v in recorded.items()})
        elif e.get("errors"):
            kinds["unrecorded"] += int(e["errors"])
    return kinds


def error_examples(entries: Iterable[dict[str, Any]], per_kind: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Up to `per_kind` example rows ({id, error}) of each kind, in shard order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        for kind, ex in (e.get("error_examples") or {}).items():
            shown = out.setdefault(kind, [])
            if len(shown) < per_kind:
                shown.append(ex)
    return out


def exceeded(rows: int, errors: int, fraction: float) -> bool:
    return rows > 0 and errors > fraction * rows + 1e-9


def message(rows: int, errors: int, fraction: float, kinds: collections.Counter[str], examples: dict[str, list[dict[str, Any]]], verb: str = "are") -> str:
    """One line: how many rows failed, the top kinds with an example each, and the way on."""
    shown = []
    for kind, n in kinds.most_common(_SHOWN_KINDS):
        ex = (examples.get(kind) or [None])[0]
        text = f"{kind} {n}"
        if ex:
            err = " ".join(str(ex.get("error", "")).split())
            err = err if len(err) <= _EXAMPLE_CHARS else err[: _EXAMPLE_CHARS - 3] + "..."
            text += f" (e.g. row {ex.get('id')!r}: {err})"
        shown.append(text)
    if len(kinds) > _SHOWN_KINDS:
        shown.append(f"{len(kinds) - _SHOWN_KINDS} more kinds")
    return (
        f"{errors} of {rows} rows {verb} error rows ({100.0 * errors / rows:.1f}%), more than max_error_fraction {fraction:g} allows; "
        f"top error kinds: {', '.join(shown) or 'none recorded'}"
    )


def check(committer: Any, total_rows: int, fraction: float, final: bool = False) -> None:
    """Raise ErrorBudgetError when the rows committed in `committer` (a commit.Committer) are
    over the budget: once at least MIN_ROWS (or all `total_rows`) are in, and when `final`.
    Cheap (two counters) unless it raises."""
    rows, errors = committer.rows_committed, committer.error_rows
    if not final and rows < min(total_rows, MIN_ROWS):
        return
    if exceeded(rows, errors, fraction):
        entries = list(committer.shards.values())
        text = message(rows, errors, fraction, error_kinds(entries), error_examples(entries), verb="are" if final or rows >= total_rows else "so far are")
        raise ErrorBudgetError(
            f"job stopped: {text}; committed shards are kept. Fix the job (`upg-batch show` lists the error rows), "
            f"or run it again with a higher --max-error-fraction to accept them"
        )
