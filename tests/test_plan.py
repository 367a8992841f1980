"""Input discovery, schema checks across all files, and shard planning from metadata."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MSG_TYPE, write_job, write_prompts

from upg_batch.cli import main
from upg_batch.config import load_config
from upg_batch.plan import DatasetError, make_plan, read_shard


def _plan(tmp_path: Path, data, **sections):
    return make_plan(load_config(write_job(tmp_path, data, **sections)))


def test_shards_cover_every_row_once_and_read_their_own_range(tmp_path: Path):
    write_prompts(tmp_path / "d" / "a.parquet", 21, start=0, row_group_size=5)
    write_prompts(tmp_path / "d" / "b.parquet", 7, start=100, row_group_size=3)
    plan = _plan(tmp_path, tmp_path / "d", input={"shard_rows": 8})
    assert [(s.file.key, s.start, s.stop) for s in plan.shards] == [
        ("a.parquet", 0, 8), ("a.parquet", 8, 16), ("a.parquet", 16, 21), ("b.parquet", 0, 7)
    ]
    assert plan.total_rows == 28
    ids = []
    for s in plan.shards:
        t = read_shard(s, ["id", "prompt"])
        assert t.num_rows == s.rows
        ids += t.column("id").to_pylist()
    assert ids == list(range(21)) + list(range(100, 107))


def test_folder_ignores_hidden_and_underscore_files_and_glob_works(tmp_path: Path):
    write_prompts(tmp_path / "d" / "a.parquet", 3)
    (tmp_path / "d" / "_SUCCESS").write_text("")
    (tmp_path / "d" / ".hidden").write_text("x")
    assert [f.key for f in _plan(tmp_path, tmp_path / "d").files] == ["a.parquet"]
    write_prompts(tmp_path / "d" / "sub" / "b.parquet", 2, start=3)
    assert [f.key for f in _plan(tmp_path, tmp_path / "d" / "**" / "*.parquet").files] == ["a.parquet", "sub/b.parquet"]


def test_missing_prompt_column_names_file_and_column(tmp_path: Path):
    write_prompts(tmp_path / "d" / "a.parquet", 3)
    bad = tmp_path / "d" / "b.parquet"
    pq.write_table(pa.table({"id": [1], "text": ["x"]}), bad)
    with pytest.raises(DatasetError, match=f"{bad}: missing column 'prompt'"):
        _plan(tmp_path, tmp_path / "d")


def test_missing_id_or_passthrough_column(tmp_path: Path):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": ["x"]}), f)
    with pytest.raises(DatasetError, match=f"{f}: missing column 'id'"):
        _plan(tmp_path, f)
    write_prompts(f, 2)
    with pytest.raises(DatasetError, match=f"{f}: missing column 'label' \\(output.passthrough\\)"):
        _plan(tmp_path, f, output={"passthrough": ["label"]})


@pytest.mark.parametrize(
    "column, values, what",
    [
        ("prompt", pa.array([1, 2]), "must be a string column"),
        ("max_tokens", pa.array(["a", "b"]), "must be an integer"),
        ("temperature", pa.array(["hot", "cold"]), "must be a number"),
        ("messages", pa.array(["hi", "there"]), "must be a list of"),
        ("id", pa.array([1.5, 2.5]), "must be an integer or string"),
    ],
)
def test_mistyped_column_names_file_and_column(tmp_path: Path, column, values, what):
    f = tmp_path / "a.parquet"
    cols = {"id": pa.array([1, 2]), "prompt": pa.array(["a", "b"])}
    cols[column] = values
    pq.write_table(pa.table(cols), f)
    with pytest.raises(DatasetError, match=f"{f}: column '{column}'.*{what}"):
        _plan(tmp_path, f)


def test_id_type_must_agree_across_files(tmp_path: Path):
    write_prompts(tmp_path / "d" / "a.parquet", 2)
    pq.write_table(pa.table({"id": ["x"], "prompt": ["p"]}), tmp_path / "d" / "b.parquet")
    with pytest.raises(DatasetError, match="b.parquet: column 'id' has type string, but earlier files have int64"):
        _plan(tmp_path, tmp_path / "d")


def test_a_file_that_is_not_parquet_is_named(tmp_path: Path):
    write_prompts(tmp_path / "d" / "a.parquet", 2)
    bad = tmp_path / "d" / "notes.parquet"
    bad.write_text("this is not parquet\n" * 10)
    with pytest.raises(DatasetError, match=f"{bad}: not a readable Parquet file"):
        _plan(tmp_path, tmp_path / "d")


def test_messages_only_file_is_accepted(tmp_path: Path):
    f = tmp_path / "chat.parquet"
    msgs = pa.array([[{"role": "user", "content": "hi"}]], MSG_TYPE)
    pq.write_table(pa.table({"id": [1], "messages": msgs}), f)
    plan = _plan(tmp_path, f)
    assert plan.columns.prompt is None and plan.columns.messages == "messages"


def test_no_input_files(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no input files"):
        _plan(tmp_path, tmp_path / "empty")
    with pytest.raises(DatasetError, match="no such file or folder"):
        _plan(tmp_path, tmp_path / "nope.parquet")


def test_cli_run_fails_on_bad_dataset_before_any_work(tmp_path: Path, capsys):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1], "text": ["x"]}), f)
    job = write_job(tmp_path, f, out=tmp_path / "out")
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(f) in err[0] and "'prompt'" in err[0]
    assert not (tmp_path / "out").exists()


def test_dictionary_encoded_string_columns_are_accepted(tmp_path: Path):
    """Parquet written from categoricals (pandas, Polars) stores dictionary-encoded strings:
    they are strings for the prompt, id, stop and passthrough columns."""
    f = tmp_path / "cat.parquet"
    words = pa.array(["a", "b", "a"]).dictionary_encode()
    pq.write_table(pa.table({"id": pa.array(["x", "y", "z"]).dictionary_encode(), "prompt": words, "stop": words, "label": words}), f)
    assert pa.types.is_dictionary(pq.read_schema(f).field("prompt").type)
    plan = _plan(tmp_path, f, output={"passthrough": ["label"]})
    assert plan.id_type == pa.string() and plan.passthrough_types == (pa.string(),)
    assert plan.columns.prompt == "prompt" and plan.columns.overrides == ("stop",)


def test_cli_run_names_an_output_path_that_is_a_file(tmp_path: Path, capsys):
    f = write_prompts(tmp_path / "a.parquet", 2)
    taken = tmp_path / "results"
    taken.write_text("a file, not a folder")
    for out in (taken, taken / "sub"):
        job = write_job(tmp_path, f, out=out)
        assert main(["run", str(job)]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert f"output.path {out}: {taken} is a file, not a folder" in line
    assert taken.read_text() == "a file, not a folder"
