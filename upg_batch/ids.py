"""Duplicate and null row ids in `input.id_column`: reported by `validate`, and refused
before any work when `input.unique_ids` is set.

Rows are matched to their completions by id, so a dataset whose ids repeat yields output a
reader cannot join back; a null id cannot be joined at all. The scan reads only the id
column, shard by shard, and keeps one entry per distinct id (memory grows with the number of
rows: about 100 bytes an id). Row groups whose data cannot be read are left out here (they
become error rows, and `validate` names them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from upg_batch.plan import Plan, read_shard_rows

__all__ = ["IdReport", "scan_ids"]

_EXAMPLES = 3


@dataclass
class IdReport:
    column: str
    rows: int = 0
    nulls: int = 0
    duplicates: int = 0  # rows whose id an earlier row already had
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.nulls == 0 and self.duplicates == 0

    def message(self) -> str:
        counts = [f"{n} {what}" for n, what in ((self.duplicates, "duplicate"), (self.nulls, "null")) if n]
        return f"column '{self.column}' (input.id_column) has {' and '.join(counts)} ids among {self.rows} rows (e.g. {'; '.join(self.examples)})"

    def as_dict(self) -> dict[str, Any]:
        return {"column": self.column, "rows": self.rows, "nulls": self.nulls, "duplicates": self.duplicates, "examples": self.examples}


def _comparable(arr: pa.ChunkedArray) -> list[Any]:
    """The ids as Python values; strings as bytes (an id that is not UTF-8 still compares)."""
    a = arr.combine_chunks()
    if pa.types.is_dictionary(a.type):
        a = a.dictionary_decode()
    if pa.types.is_string(a.type):
        a = a.cast(pa.binary())
    elif pa.types.is_large_string(a.type):
        a = a.cast(pa.large_binary())
    return a.to_pylist()


def _shown(v: Any) -> str:
    return repr(v.decode("utf-8", "replace")) if isinstance(v, bytes) else repr(v)


def scan_ids(plan: Plan) -> IdReport | None:
    """Nulls and repeats in the plan's id column; None when ids are the rows' own 'file:row'
    (unique by construction)."""
    column = plan.columns.id
    if column is None:
        return None
    report = IdReport(column)
    first: dict[Any, int] = {}  # id -> the shard it first appeared in
    for shard in plan.shards:
        table, unreadable = read_shard_rows(shard, [column])
        skip = {i for u in unreadable for i in range(u.start, u.stop)}
        for i, v in enumerate(_comparable(table.column(column))):
            if i in skip:
                continue
            report.rows += 1
            where = f"{shard.file.key}:{shard.start + i}"
            if v is None:
                report.nulls += 1
                if len(report.examples) < _EXAMPLES:
                    report.examples.append(f"a null id at {where}")
            elif v in first:
                report.duplicates += 1
                if len(report.examples) < _EXAMPLES:
                    report.examples.append(f"id {_shown(v)} at {where}, first in {plan.shards[first[v]].name}")
            else:
                first[v] = shard.index
    return report
