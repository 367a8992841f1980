"""Duplicate and null ids in input.id_column: `validate` reports them, and with
input.unique_ids set both `validate` and `run` refuse the job (exit 2) before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import write_job, write_prompts

from upg_batch.cli import main
from upg_batch.config import load_config
from upg_batch.ids import scan_ids
from upg_batch.plan import make_plan


def _dataset(tmp: Path) -> Path:
    """Two files: ids 0..9, then 10..14 with 3 again, a null, and 12 again (a string-free
    dictionary case is in test_plan)."""
    write_prompts(tmp / "data" / "a.parquet", 10)
    ids = pa.array([10, 3, None, 12, 12], pa.int64())
    write_prompts(tmp / "data" / "b.parquet", 5, start=10, id=ids)
    return tmp / "data"


def test_scan_finds_every_repeat_and_null_and_names_where(tmp_path: Path):
    job = write_job(tmp_path, _dataset(tmp_path))
    r = scan_ids(make_plan(load_config(job)))
    assert r is not None and (r.rows, r.duplicates, r.nulls) == (15, 2, 1)
    assert r.examples == ["id 3 at b.parquet:1, first in a.parquet[0:8]", "a null id at b.parquet:2", "id 12 at b.parquet:4, first in b.parquet[0:5]"]
    assert "column 'id' (input.id_column) has 2 duplicate and 1 null ids among 15 rows" in r.message()


def test_string_ids_compare_as_bytes_and_row_keys_need_no_scan(tmp_path: Path):
    f = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": pa.array(["x", "y", "x"]).dictionary_encode(), "prompt": ["a", "b", "c"]}), f)
    r = scan_ids(make_plan(load_config(write_job(tmp_path, f))))
    assert r is not None and (r.duplicates, r.nulls) == (1, 0) and "id 'x' at s.parquet:2" in r.examples[0]
    assert scan_ids(make_plan(load_config(write_job(tmp_path, f, input={"id_column": None})))) is None


def test_validate_reports_them_and_unique_ids_refuses_the_job(tmp_path: Path, capsys):
    data = _dataset(tmp_path)
    job = write_job(tmp_path, data)
    assert main(["validate", str(job), "--json"]) == 0  # reported, not refused by default
    report = json.loads(capsys.readouterr().out)
    assert report["ids"]["duplicates"] == 2 and report["ids"]["nulls"] == 1
    strict = write_job(tmp_path, data, out=tmp_path / "strict", input={"unique_ids": True})
    for command in ("validate", "run"):
        assert main([command, str(strict)]) == 2
        err = capsys.readouterr().err
        assert "column 'id' (input.id_column) has 2 duplicate and 1 null ids" in err and "input.unique_ids is set" in err, err
    assert not (tmp_path / "strict").exists()  # refused before any work


def test_unique_ids_accepts_a_clean_dataset(tmp_path: Path, capsys):
    f = write_prompts(tmp_path / "a.parquet", 12)
    job = write_job(tmp_path, f, input={"unique_ids": True})
    assert main(["validate", str(job), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ids"] == {"column": "id", "rows": 12, "nulls": 0, "duplicates": 0, "examples": []} and report["ids_problem"] is None
