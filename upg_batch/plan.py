"""Input discovery, schema checks and shard planning, from Parquet metadata only.

The driver never loads the dataset: it reads each file's footer (schema, row groups, row
counts) and cuts every file into shards of at most `input.shard_rows` rows. An actor reads
its own shard's rows with pyarrow (`read_shard`), touching only the row groups it overlaps.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from upg_batch.config import OVERRIDE_COLUMNS, InputSection, JobConfig

__all__ = ["DatasetError", "InputFile", "Plan", "Shard", "Unreadable", "find_files", "make_plan", "read_shard", "read_shard_rows"]


class DatasetError(ValueError):
    """The dataset is unusable; the message names the file and column."""


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    key: str  # short stable name used in row keys ("file:row"): path relative to the input root
    size: int
    num_rows: int
    row_group_rows: tuple[int, ...]
    # OpenAI batch (.jsonl) files: the byte offset of lines 0, offset_every, 2 * offset_every, ...
    # (offset_every is input.shard_rows, so every shard starts at one of them)
    line_offsets: tuple[int, ...] = ()
    offset_every: int = 0

    @property
    def is_jsonl(self) -> bool:
        return self.path.endswith(".jsonl")


@dataclass(frozen=True)
class Shard:
    index: int
    file: InputFile
    start: int  # first row in the file
    stop: int  # one past the last row

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"{self.file.key}[{self.start}:{self.stop}]"


@dataclass(frozen=True)
class Columns:
    """Which input columns the job reads (those present in the dataset)."""

    prompt: str | None
    messages: str | None
    id: str | None
    overrides: tuple[str, ...]
    passthrough: tuple[str, ...]

    def all(self) -> list[str]:
        names = [self.prompt, self.messages, self.id, *self.overrides, *self.passthrough]
        seen: list[str] = []
        for n in names:
            if n is not None and n not in seen:
                seen.append(n)
        return seen


@dataclass(frozen=True)
class Plan:
    files: tuple[InputFile, ...]
    shards: tuple[Shard, ...]
    columns: Columns
    id_type: pa.DataType
    passthrough_types: tuple[pa.DataType, ...]

    @property
    def total_rows(self) -> int:
        """Rows the job runs: every row of the files, or the first input.limit of them."""
        return sum(s.rows for s in self.shards)


_GLOB_CHARS = set("*?[")


def find_files(path: str) -> tuple[list[str], str]:
    """The input files (sorted) and the root their keys are relative to.

    A file; a folder (every file below it, except names starting with '_' or '.', as
    pyarrow's dataset discovery does); or a glob.
    """
    if any(c in path for c in _GLOB_CHARS):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        root = _glob_root(path)
    elif os.path.isdir(path):
        root = path
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(("_", ".")))
            files += [os.path.join(dirpath, f) for f in filenames if not f.startswith(("_", "."))]
        files.sort()
    elif os.path.isfile(path):
        files, root = [path], os.path.dirname(path)
    else:
        raise DatasetError(f"input.path {path}: no such file or folder")
    if not files:
        raise DatasetError(f"input.path {path}: no input files found")
    return [os.path.abspath(f) for f in files], os.path.abspath(root)


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if any(c in part for c in _GLOB_CHARS):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def _is_string(t: pa.DataType) -> bool:
    t = _decoded(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _decoded(t: pa.DataType) -> pa.DataType:
    """A dictionary-encoded column's value type (what its values are); other types as they are."""
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_messages(t: pa.DataType) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return pa.types.is_null(t)
    item = t.value_type
    if not pa.types.is_struct(item):
        return False
    names = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
    return all(k in names and _is_string(names[k]) for k in ("role", "content"))


def _override_ok(name: str, t: pa.DataType) -> bool:
    t = _decoded(t)
    if pa.types.is_null(t):
        return True
    if name in ("max_tokens", "top_k", "seed"):
        return pa.types.is_integer(t)
    if name in ("temperature", "top_p", "min_p"):
        return pa.types.is_integer(t) or pa.types.is_floating(t)
    # stop: one string or a list of strings
    if _is_string(t):
        return True
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_string(t.value_type)


_EXPECT = {
    "max_tokens": "an integer",
    "top_k": "an integer",
    "seed": "an integer",
    "temperature": "a number",
    "top_p": "a number",
    "min_p": "a number",
    "stop": "a string or a list of strings",
}


def _normalize(t: pa.DataType) -> pa.DataType:
    """Types equal up to string/large_string widths and dictionary encoding compare equal
    across files (the output holds plain values)."""
    t = _decoded(t)
    if pa.types.is_large_string(t):
        return pa.string()
    return t


def _jsonl_plan(cfg: JobConfig, paths: list[str], root: str) -> Plan:
    """OpenAI batch files: each line a request, shards of input.shard_rows lines located by
    the byte offsets one streaming pass finds (the files are never loaded)."""
    from upg_batch.openai_batch import OVERRIDES, REQUEST_SCHEMA, scan_lines

    if cfg.output.passthrough:
        raise DatasetError("output.passthrough: OpenAI batch input has no columns to pass through (the output carries custom_id and url)")
    files = []
    for p in paths:
        try:
            lines, offsets = scan_lines(p, cfg.input.shard_rows)
        except OSError as e:
            raise DatasetError(f"{p}: cannot be read ({e.strerror or e})") from None
        files.append(InputFile(p, os.path.relpath(p, root), os.path.getsize(p), lines, (), offsets, cfg.input.shard_rows))
    columns = Columns(prompt="prompt", messages="messages", id="custom_id", overrides=OVERRIDES, passthrough=("url",))
    return Plan(files=tuple(files), shards=_cut(files, cfg), columns=columns, id_type=pa.string(), passthrough_types=(REQUEST_SCHEMA.field("url").type,))


def _cut(files: Sequence[InputFile], cfg: JobConfig) -> tuple[Shard, ...]:
    """Shards of input.shard_rows rows, file by file; input.limit keeps the first rows only."""
    inp = cfg.input
    shards: list[Shard] = []
    left = inp.limit  # None: all of them
    for f in files:
        for start in range(0, f.num_rows, inp.shard_rows):
            stop = min(f.num_rows, start + inp.shard_rows)
            if left is not None:
                if left <= 0:
                    break
                stop = min(stop, start + left)
                left -= stop - start
            shards.append(Shard(len(shards), f, start, stop))
    return tuple(shards)


def make_plan(cfg: JobConfig) -> Plan:
    """Check every input file's schema, then cut the files into shards. Raises DatasetError."""
    inp: InputSection = cfg.input
    paths, root = find_files(inp.path)
    jsonl = [p.endswith(".jsonl") for p in paths]
    if all(jsonl):
        return _jsonl_plan(cfg, paths, root)
    if any(jsonl):
        raise DatasetError(f"input.path {inp.path}: mixes .jsonl request files with Parquet files ({paths[jsonl.index(True)]})")
    files: list[InputFile] = []
    schemas: list[pa.Schema] = []
    for p in paths:
        try:
            meta = pq.read_metadata(p)
            schema = pq.read_schema(p)
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
            raise DatasetError(f"{p}: not a readable Parquet file ({_first_line(e)})") from None
        rg = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        key = os.path.relpath(p, root)
        files.append(InputFile(p, key, os.path.getsize(p), meta.num_rows, rg))
        schemas.append(schema)

    names_in_all = [set(s.names) for s in schemas]
    has_messages = any(inp.messages_column in n for n in names_in_all)
    has_prompt = any(inp.prompt_column in n for n in names_in_all)
    id_type: pa.DataType | None = None
    pt_types: dict[str, pa.DataType] = {}
    overrides = tuple(c for c in OVERRIDE_COLUMNS if any(c in n for n in names_in_all))
    for f, schema in zip(files, schemas):
        names = set(schema.names)
        if inp.prompt_column not in names and inp.messages_column not in names:
            raise DatasetError(
                f"{f.path}: missing column '{inp.prompt_column}' (the prompt column; "
                f"or a '{inp.messages_column}' column of chat messages)"
            )
        if inp.prompt_column in names and not _is_string(schema.field(inp.prompt_column).type):
            raise DatasetError(
                f"{f.path}: column '{inp.prompt_column}' must be a string column, "
                f"got {schema.field(inp.prompt_column).type}"
            )
        if inp.messages_column in names and not _is_messages(schema.field(inp.messages_column).type):
            raise DatasetError(
                f"{f.path}: column '{inp.messages_column}' must be a list of {{role: string, content: string}}, "
                f"got {schema.field(inp.messages_column).type}"
            )
        if inp.id_column is not None:
            if inp.id_column not in names:
                raise DatasetError(f"{f.path}: missing column '{inp.id_column}' (input.id_column)")
            t = _normalize(schema.field(inp.id_column).type)
            if not (pa.types.is_integer(t) or pa.types.is_string(t)):
                raise DatasetError(f"{f.path}: column '{inp.id_column}' (input.id_column) must be an integer or string column, got {t}")
            if id_type is None:
                id_type = t
            elif t != id_type:
                raise DatasetError(f"{f.path}: column '{inp.id_column}' has type {t}, but earlier files have {id_type}")
        for c in overrides:
            if c in names and not _override_ok(c, schema.field(c).type):
                raise DatasetError(f"{f.path}: column '{c}' (a per-row override) must be {_EXPECT[c]}, got {schema.field(c).type}")
        for c in cfg.output.passthrough:
            if c not in names:
                raise DatasetError(f"{f.path}: missing column '{c}' (output.passthrough)")
            t = _normalize(schema.field(c).type)
            if c in pt_types and pt_types[c] != t:
                raise DatasetError(f"{f.path}: column '{c}' has type {t}, but earlier files have {pt_types[c]}")
            pt_types.setdefault(c, t)

    columns = Columns(
        prompt=inp.prompt_column if has_prompt else None,
        messages=inp.messages_column if has_messages else None,
        id=inp.id_column,
        overrides=overrides,
        passthrough=tuple(cfg.output.passthrough),
    )
    return Plan(
        files=tuple(files),
        shards=_cut(files, cfg),
        columns=columns,
        id_type=id_type if id_type is not None else pa.string(),
        passthrough_types=tuple(pt_types[c] for c in cfg.output.passthrough),
    )


@dataclass(frozen=True)
class Unreadable:
    """Rows of a shard whose data cannot be read (a corrupt page): [start, stop) counted from
    the shard's first row, and why, naming the file and row group."""

    start: int
    stop: int
    message: str


def read_shard(shard: Shard, columns: Sequence[str]) -> pa.Table:
    """The shard's rows, only `columns` that the file has, reading only overlapping row groups.
    Raises on data that cannot be read; `read_shard_rows` turns that into null rows."""
    pf = pq.ParquetFile(shard.file.path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    groups, first = _groups(shard)
    if not groups:
        return pf.schema_arrow.empty_table().select(present)
    table = pf.read_row_groups([g for g, _, _ in groups], columns=present)
    return table.slice(shard.start - first, shard.rows)


def read_shard_rows(shard: Shard, columns: Sequence[str]) -> tuple[pa.Table, list[Unreadable]]:
    """Like `read_shard`, but data that cannot be read (a corrupt page, a file cut short since
    it was planned) does not fail: each row group at fault is listed with its rows, and its
    columns that cannot be read come back null (those that can, ids say, keep their values).
    The table always has `shard.rows` rows."""
    path = shard.file.path
    if shard.file.is_jsonl:
        return _read_request_lines(shard)
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        return _null_table(None, columns, shard.rows), [Unreadable(0, shard.rows, f"{path}: cannot be read ({_printable(e)})")]
    try:
        return read_shard(shard, columns), []
    except (OSError, pa.ArrowException):
        pass  # find the row groups (and columns) at fault: read each alone
    present = [c for c in columns if c in pf.schema_arrow.names]
    groups, first = _groups(shard)
    parts: list[pa.Table] = []
    bad: list[Unreadable] = []
    for g, lo, hi in groups:
        part, cause = _read_group(pf, g, present, hi - lo)
        if cause is not None:
            a, b = max(lo, shard.start), min(hi, shard.stop)
            bad.append(Unreadable(a - shard.start, b - shard.start, f"{path}: row group {g} (rows {lo} to {hi - 1}) cannot be read ({cause})"))
        parts.append(part)
    table = pa.concat_tables(parts).slice(shard.start - first, shard.rows)
    return table, bad


def _read_request_lines(shard: Shard) -> tuple[pa.Table, list[Unreadable]]:
    from upg_batch.openai_batch import REQUEST_SCHEMA, read_requests

    f = shard.file
    try:
        table = read_requests(f.path, f.key, f.line_offsets[shard.start // f.offset_every], shard.start, shard.rows)
        if table.num_rows == shard.rows:
            return table, []
        problem = f"{f.path}: has {table.num_rows} of this shard's {shard.rows} lines (changed since the job was planned)"
    except OSError as e:
        problem = f"{f.path}: cannot be read ({_printable(e)})"
    empty = pa.Table.from_pylist([{"custom_id": f"{f.key}:{shard.start + i + 1}"} for i in range(shard.rows)], schema=REQUEST_SCHEMA)
    return empty, [Unreadable(0, shard.rows, problem)]


def _read_group(pf: pq.ParquetFile, group: int, columns: list[str], rows: int) -> tuple[pa.Table, str | None]:
    """One row group's `columns`, and None; or, when some cannot be read, the group with those
    columns null and why."""
    try:
        part = pf.read_row_group(group, columns=columns).select(columns)
        if part.num_rows == rows:
            return part, None
        whole = f"it holds {part.num_rows} rows, the footer says {rows}"
    except (OSError, pa.ArrowException) as e:
        whole = _printable(e)
    arrays, failed = [], []
    for c in columns:
        try:
            col = pf.read_row_group(group, columns=[c]).column(c)
            if len(col) != rows:
                raise OSError(f"it holds {len(col)} rows, the footer says {rows}")
        except (OSError, pa.ArrowException) as e:
            col = pa.chunked_array([pa.nulls(rows, pf.schema_arrow.field(c).type)])
            failed.append((c, _printable(e)))
        arrays.append(col)
    if not failed or len(failed) == len(columns):  # no column alone is at fault: all of them are null
        return _null_table(pf.schema_arrow, columns, rows), whole
    names = ", ".join(f"'{c}'" for c, _ in failed)
    return pa.table(dict(zip(columns, arrays))), f"column {names}: {failed[0][1]}"


def _groups(shard: Shard) -> tuple[list[tuple[int, int, int]], int]:
    """The row groups the shard overlaps, as (group, first row, one past its last row) in the
    file, and the first row of the first of them."""
    groups: list[tuple[int, int, int]] = []
    offset = 0
    for i, n in enumerate(shard.file.row_group_rows):
        if offset + n > shard.start and offset < shard.stop:
            groups.append((i, offset, offset + n))
        offset += n
    return groups, groups[0][1] if groups else 0


def _null_table(schema: pa.Schema | None, columns: Sequence[str], rows: int) -> pa.Table:
    """`rows` null rows of `columns` (typed as in `schema` where it has them, else null)."""
    names = [c for c in columns if schema is None or c in schema.names]
    types = [schema.field(c).type if schema is not None else pa.null() for c in names]
    return pa.table({c: pa.nulls(rows, t) for c, t in zip(names, types)}) if names else pa.table({"_": pa.nulls(rows)}).select([])


def _printable(e: BaseException) -> str:
    """The first line of an error, control characters (from bytes of a corrupt file) as '?'."""
    return "".join(c if c.isprintable() else "?" for c in _first_line(e))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
