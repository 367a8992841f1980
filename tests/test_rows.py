"""Row handling inside an actor, without Ray: seeds, per-row fallback, progress output."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import MODEL, MSG_TYPE, corrupt_row_group, write_job, write_prompts

from upg_batch.chat import load_chat_template
from upg_batch.cli import main
from upg_batch.config import load_config
from upg_batch.engine import Engine, EngineError, SamplingParams
from upg_batch.plan import make_plan
from upg_batch.progress import Progress, format_summary
from upg_batch.rows import Prompting, WorkSpec, derive_seed, error_batch, output_schema, prepare_rows, run_rows


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(7, 12) == derive_seed(7, 12)
    assert len({derive_seed(7, i) for i in range(1000)}) == 1000
    assert derive_seed(7, 1) != derive_seed(8, 1)
    assert 0 <= derive_seed(2**40, "x") < 2**63


class _FailsInBatches:
    """A real engine whose batched generate refuses any batch holding a poisoned prompt, as an
    engine bug on one row would; alone, the poisoned prompt still fails."""

    def __init__(self, engine: Engine, poison: list[int]) -> None:
        self.engine, self.poison = engine, poison
        self.info = engine.info

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def generate(self, prompts, params):
        if any(list(p) == self.poison for p in prompts):
            raise EngineError("engine could not run this prompt")
        return self.engine.generate(prompts, params)


def test_a_failing_generate_falls_back_to_one_row_at_a_time(tmp_path: Path):
    f = write_prompts(tmp_path / "d.parquet", 5)
    cfg = load_config(write_job(tmp_path, f, input={"shard_rows": 5}))
    plan = make_plan(cfg)
    spec = WorkSpec(cfg, plan.columns, output_schema(plan.id_type, []))
    engine = Engine(MODEL, max_batch=8)
    poisoned = _FailsInBatches(engine, engine.tokenize("Row 2: tell me about the number 2."))
    result = run_rows(poisoned, Prompting(poisoned, load_chat_template(MODEL)), plan.shards[0], spec, SamplingParams)
    rows = result.batch.to_pylist()
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[2]["finish_reason"] == "error" and "engine could not run this prompt" in rows[2]["error"]
    assert all(r["error"] is None and r["completion"] is not None for i, r in enumerate(rows) if i != 2)
    assert result.ok == 4 and result.errors == 1
    # the rows that ran alone got what a batched run gives (the engine is batch-invariant)
    alone = engine.generate([engine.tokenize(f"Row {i}: tell me about the number {i}.") for i in (0, 1, 3, 4)], SamplingParams(max_tokens=6, temperature=0.0))
    assert [r["completion"] for i, r in enumerate(rows) if i != 2] == [c.text for c in alone]


def test_progress_bar_on_a_tty_and_log_lines_otherwise(caplog):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    p = Progress(10, 2, "auto", 0.0, tty)
    p.update(3, 40)
    p.close()
    assert "5/10" in tty.getvalue() and "tok/s" in tty.getvalue()

    plain = io.StringIO()
    with caplog.at_level(logging.INFO, logger="upg_batch"):
        p = Progress(10, 0, "auto", 0.0, plain)
        p.update(4, 10)
        p.close()
    assert plain.getvalue() == ""
    assert any("rows 4/10 (40.0%)" in r.getMessage() and "eta" in r.getMessage() for r in caplog.records)


def test_summary_names_each_node_share():
    text = format_summary({
        "status": "complete", "rows_ok": 9, "rows_error": 1, "rows_total": 10, "shards_total": 2, "shards_skipped": 0,
        "prompt_tokens": 50, "completion_tokens": 80, "tokens_per_s": 40.0, "wall_s": 3.0,
        "nodes": {"10.0.0.1-aaaaaaaa": {"shards": 1, "rows": 6, "completion_tokens": 50, "share": 0.6, "engine": "gpu (Apple M2, Metal)"},
                  "10.0.0.2-bbbbbbbb": {"shards": 1, "rows": 4, "completion_tokens": 30, "share": 0.4, "engine": None}},
    })
    assert "9 rows ok, 1 rows in error" in text and "40.0 completion tok/s" in text
    assert "node 10.0.0.1-aaaaaaaa: 1 shards, 6 rows, 50 tokens (60.0% of rows) on gpu (Apple M2, Metal)" in text
    assert "node 10.0.0.2-bbbbbbbb: 1 shards, 4 rows, 30 tokens (40.0% of rows)\n" in text + "\n"


def _bad_utf8(values: list) -> pa.Array:
    """A string array whose values are the given bytes, valid UTF-8 or not."""
    return pa.array(values, pa.binary()).view(pa.string())


def _spec_and_shard(tmp_path: Path, f: Path, **sections):
    cfg = load_config(write_job(tmp_path, f, input={"shard_rows": 8}, **sections))
    plan = make_plan(cfg)
    return plan.shards[0], WorkSpec(cfg, plan.columns, output_schema(plan.id_type, []))


def test_an_undecodable_prompt_or_messages_value_is_one_error_row(tmp_path: Path):
    content = _bad_utf8([b"hi", b"bad \xff\xfe here"])
    msgs = pa.ListArray.from_arrays(
        pa.array([0, 0, 0, 0, 1, 2], pa.int32()),
        pa.StructArray.from_arrays([pa.array(["user", "user"]), content], names=["role", "content"]),
        mask=pa.array([True, True, True, False, False]),  # rows 0-2 use their prompt
    )
    assert msgs.type == MSG_TYPE
    prompts = _bad_utf8([b"Row 0: fine", b"\xff\xfe not utf-8", b"Row 2: fine", None, None])
    f = write_prompts(tmp_path / "d.parquet", 5, prompt=prompts, messages=msgs)
    shard, spec = _spec_and_shard(tmp_path, f)
    engine = Engine(MODEL, max_batch=8)
    result = run_rows(engine, Prompting(engine, load_chat_template(MODEL)), shard, spec, SamplingParams)
    rows = result.batch.to_pylist()
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4]
    for i in (1, 4):
        assert rows[i]["finish_reason"] == "error" and "is not valid UTF-8" in rows[i]["error"], rows[i]
    assert "prompt is not valid UTF-8" in rows[1]["error"] and "messages is not valid UTF-8" in rows[4]["error"]
    assert all(rows[i]["error"] is None and rows[i]["completion"] is not None for i in (0, 2, 3)), rows
    assert result.ok == 3 and result.errors == 2


def test_validate_reports_undecodable_rows(tmp_path: Path, capsys):
    f = write_prompts(tmp_path / "d.parquet", 3, prompt=_bad_utf8([b"fine", b"\xc3\x28", b"also fine"]))
    job = write_job(tmp_path, f, tmp_path / "out")
    assert main(["validate", "--json", str(job)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["error_rows"] == 1 and report["error_kinds"] == {"undecodable": 1}
    assert report["examples"][0]["id"] == 1 and "not valid UTF-8" in report["examples"][0]["error"]


class _TokenizeFails:
    """A real engine whose tokenize raises EngineError on one text."""

    def __init__(self, engine: Engine, bad: str) -> None:
        self.engine, self.bad = engine, bad
        self.info = engine.info

    def tokenize(self, text: str) -> list[int]:
        if text == self.bad:
            raise EngineError("tokenizer refused this text")
        return self.engine.tokenize(text)

    def generate(self, prompts, params):
        return self.engine.generate(prompts, params)


def test_an_engine_error_from_tokenize_is_one_error_row(tmp_path: Path):
    f = write_prompts(tmp_path / "d.parquet", 4)
    shard, spec = _spec_and_shard(tmp_path, f)
    engine = _TokenizeFails(Engine(MODEL, max_batch=8), "Row 1: tell me about the number 1.")
    prep = prepare_rows(engine, Prompting(engine, None), shard, spec, SamplingParams)
    assert prep.error[1] == "EngineError: tokenizer refused this text" and prep.kind[1] == "tokenize"
    assert [i for i, _, _ in prep.todo] == [0, 2, 3]


def _corrupt_file(tmp_path: Path) -> Path:
    """24 rows in row groups of 8; row group 1 (rows 8 to 15) has garbage data pages."""
    f = write_prompts(tmp_path / "c.parquet", 24, row_group_size=8, label=pa.array([f"L{i}" for i in range(24)]))
    corrupt_row_group(f, 1)
    return f


def test_rows_of_a_corrupt_row_group_are_error_rows_naming_file_and_group(tmp_path: Path):
    f = _corrupt_file(tmp_path)
    cfg = load_config(write_job(tmp_path, f, input={"shard_rows": 12}, output={"passthrough": ["label"]}))
    plan = make_plan(cfg)  # the footer is fine: planning does not see the damage
    spec = WorkSpec(cfg, plan.columns, output_schema(plan.id_type, [("label", pa.string())]))
    engine = Engine(MODEL, max_batch=8)
    # shard 0 is rows 0-11: rows 8-11 lie in the corrupt group, rows 0-7 still run
    result = run_rows(engine, Prompting(engine, None), plan.shards[0], spec, SamplingParams)
    rows = result.batch.to_pylist()
    assert [r["id"] for r in rows] == [*range(8), None, None, None, None]
    for r in rows[8:]:
        assert r["finish_reason"] == "error" and r["completion"] is None and r["label"] is None
        assert f"{f}: row group 1 (rows 8 to 15) cannot be read" in r["error"], r
    assert all(r["error"] is None and r["label"] == f"L{r['id']}" for r in rows[:8])
    assert result.ok == 8 and result.errors == 4
    # the driver's error rows for a shard that failed read the same file: no exception either
    batch = error_batch(plan.shards[1], spec, "shard failed 3 times")
    rows = batch.to_pylist()
    assert [r["id"] for r in rows] == [None, None, None, None, *range(16, 24)]
    assert "row group 1 (rows 8 to 15)" in rows[0]["error"] and rows[-1]["error"] == "shard failed 3 times"


def test_validate_names_a_corrupt_row_group(tmp_path: Path, capsys):
    f = _corrupt_file(tmp_path)
    job = write_job(tmp_path, f, tmp_path / "out")
    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out
    [line] = [ln for ln in out.splitlines() if ln.startswith("unreadable")]
    assert f"{f}: row group 1 (rows 8 to 15) cannot be read" in line
    assert "8 rows would be error rows (unreadable: 8)" in out


def test_dictionary_encoded_prompt_and_id_columns_run(tmp_path: Path):
    f = tmp_path / "cat.parquet"
    prompts = pa.array(["Row 0: hello", "Row 1: again", "Row 0: hello", None]).dictionary_encode()
    pq.write_table(pa.table({"id": pa.array(["a", "b", "c", "d"]).dictionary_encode(), "prompt": prompts, "label": prompts}), f)
    cfg = load_config(write_job(tmp_path, f, output={"passthrough": ["label"]}))
    plan = make_plan(cfg)
    spec = WorkSpec(cfg, plan.columns, output_schema(plan.id_type, list(zip(cfg.output.passthrough, plan.passthrough_types))))
    engine = Engine(MODEL, max_batch=8)
    result = run_rows(engine, Prompting(engine, None), plan.shards[0], spec, SamplingParams)
    rows = result.batch.to_pylist()
    assert result.batch.schema.field("id").type == pa.string() and result.batch.schema.field("label").type == pa.string()
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"] and [r["label"] for r in rows] == ["Row 0: hello", "Row 1: again", "Row 0: hello", None]
    assert [r["error"] is None for r in rows] == [True, True, True, False] and "prompt is null" in rows[3]["error"]
    assert rows[0]["completion"] == rows[2]["completion"]


def test_readable_ids_of_a_row_group_with_one_corrupt_column_are_kept(tmp_path: Path):
    import pyarrow.parquet as pq_

    f = write_prompts(tmp_path / "c.parquet", 16, row_group_size=8)
    col = pq_.read_metadata(f).row_group(1).column(1)  # the prompt column of rows 8 to 15
    assert col.path_in_schema == "prompt"
    with open(f, "r+b") as fh:
        fh.seek(col.data_page_offset)
        fh.write(b"\xff" * 16)
    cfg = load_config(write_job(tmp_path, f, input={"shard_rows": 16}))
    plan = make_plan(cfg)
    spec = WorkSpec(cfg, plan.columns, output_schema(plan.id_type, []))
    batch = error_batch(plan.shards[0], spec, "shard failed")
    assert batch.column("id").to_pylist() == list(range(16))
    engine = Engine(MODEL, max_batch=8)
    prep = prepare_rows(engine, Prompting(engine, None), plan.shards[0], spec, SamplingParams)
    assert prep.ids.to_pylist() == list(range(16)) and [i for i, _, _ in prep.todo] == list(range(8))
    assert prep.kind[8:] == ["unreadable"] * 8
    assert f"{f}: row group 1 (rows 8 to 15) cannot be read (column 'prompt': " in prep.error[8]
