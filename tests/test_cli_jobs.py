"""The CLI on whole jobs: the error budget, --limit and --set, a taken metrics port, a complete
job run again, and `show`."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import MSG_TYPE, read_output, write_job, write_prompts

from upg_batch.cli import main
from upg_batch.commit import MANIFEST, SUCCESS, read_committed


def _mistyped_prompt_column(tmp_path: Path, rows: int, **sections) -> tuple[Path, Path]:
    """A dataset with prompt and messages columns where only every 5th row is a chat row, and
    a job whose input.prompt_column is mistyped: 80% of the rows have no prompt."""
    msgs = [[{"role": "user", "content": f"hi {i}"}] if i % 5 == 0 else None for i in range(rows)]
    f = write_prompts(tmp_path / "d.parquet", rows, messages=pa.array(msgs, MSG_TYPE))
    out = tmp_path / "out"
    sections.setdefault("input", {}).update(prompt_column="promt")
    return write_job(tmp_path, f, out, max_error_fraction=0.1, **sections), out


def _errors(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("upg-batch: error:")]


def test_validate_exits_non_zero_when_the_rows_it_would_reject_exceed_the_budget(tmp_path: Path, capsys):
    job, out = _mistyped_prompt_column(tmp_path, 20)
    assert main(["validate", str(job)]) == 1
    [err] = _errors(capsys)
    assert "16 of 20 rows would be error rows (80.0%)" in err and "max_error_fraction 0.1" in err
    assert "null 16" in err and "no column 'promt' (input.prompt_column)" in err
    assert main(["validate", "--max-error-fraction", "0.8", str(job)]) == 0
    assert not out.exists()


def test_validate_names_a_taken_metrics_port_and_the_fix(tmp_path: Path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        job = write_job(tmp_path, write_prompts(tmp_path / "d.parquet", 2), tmp_path / "out", metrics={"port": port})
        assert main(["validate", str(job)]) == 2
    [err] = _errors(capsys)
    assert f"metrics.port {port} on 127.0.0.1" in err and "in use" in err
    assert "--set metrics.port=" in err and "0 for no endpoint" in err


@pytest.mark.usefixtures("local_ray")
def test_a_mistyped_prompt_column_stops_the_job_early(tmp_path: Path, capsys):
    job, out = _mistyped_prompt_column(tmp_path, 400, input={"shard_rows": 40}, cluster={"shards_in_flight": 1})
    assert main(["run", str(job)]) == 1
    [err] = _errors(capsys)
    assert "job stopped:" in err and "rows so far are error rows" in err and "max_error_fraction 0.1" in err
    assert "null" in err and "no column 'promt' (input.prompt_column)" in err and "--max-error-fraction" in err
    committed = read_committed(out)["shards"]
    # stopped once 200 rows were in, not after the first shard, nor at the end
    assert 5 <= len(committed) < 10, sorted(committed)
    assert not (out / SUCCESS).exists() and not json.loads((out / MANIFEST).read_text())["complete"]
    entry = committed["0"]
    assert entry["error_kinds"] == {"null": 32} and entry["error_examples"]["null"]["id"] == 1
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"incomplete: {len(committed)} of 10 shards committed" in shown and "no column 'promt'" in shown


@pytest.mark.usefixtures("local_ray")
def test_a_small_job_is_judged_at_the_end_then_accepted_then_already_complete_and_shown(tmp_path: Path, capsys):
    # 3 bad rows, all in the first shard of 8: 15% of the job, 37% of that shard
    prompts = [None, "", "x " * 200] + [f"prompt {i}" for i in range(3, 20)]
    f = write_prompts(tmp_path / "d.parquet", 20, prompt=pa.array(prompts, pa.string()))
    out = tmp_path / "out"
    job = write_job(tmp_path, f, out, model={"context": 64}, max_error_fraction=0.1)
    assert main(["run", str(job)]) == 1
    [err] = _errors(capsys)
    assert "3 of 20 rows are error rows (15.0%)" in err
    assert len(read_committed(out)["shards"]) == 3 and not (out / SUCCESS).exists()  # every shard ran
    assert main(["show", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: not complete: all 3 shards committed, but no run finished the job")

    # a higher budget accepts them (it does not change the output: the run resumes)
    assert main(["run", "--max-error-fraction", "0.2", "--json", str(job)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_error"] == 3 and summary["shards_skipped"] == 3 and (out / SUCCESS).exists()

    assert main(["run", "--max-error-fraction", "0.2", str(job)]) == 0
    again = capsys.readouterr().out
    assert again.startswith(f"job already complete in {out}: nothing to run; its summary:")
    assert "17 rows ok, 3 rows in error" in again

    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"{out}: complete (2 runs)")
    assert "rows: 20 committed, 17 ok, 3 error rows (15.0%)" in shown
    assert "nodes (every run):\n  127.0.0.1-" in shown and ": 3 shards, 20 rows (100.0%)" in shown  # the node's share
    for kind, example in (("null", "prompt is null"), ("empty", "prompt is empty"), ("too_long", "the context holds 64")):
        assert f"  {kind}: 1\n    row " in shown and example in shown
    assert shown.count(" [length]: ") + shown.count(" [stop]: ") == 3  # three sample completions
    assert main(["show", "--json", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["error_kinds"] == {"null": 1, "empty": 1, "too_long": 1} and len(info["samples"]) == 3


def test_show_of_a_folder_that_is_not_output(tmp_path: Path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    [err] = _errors(capsys)
    assert str(tmp_path) in err and MANIFEST in err


@pytest.mark.usefixtures("local_ray")
def test_limit_and_set_for_a_smoke_test(tmp_path: Path, capsys):
    f = write_prompts(tmp_path / "d.parquet", 30)
    out = tmp_path / "out"
    job = write_job(tmp_path, f, out)
    assert main(["run", "--limit", "5", "--set", "sampling.max_tokens=2", "--json", str(job)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_total"] == 5 and summary["rows_ok"] == 5
    table = read_output(out)
    assert sorted(table.column("id").to_pylist()) == [0, 1, 2, 3, 4]
    assert max(table.column("completion_tokens").to_pylist()) <= 2
    # the whole job is another job: refused, naming the limit and the override
    assert main(["run", str(job)]) == 2
    [err] = _errors(capsys)
    assert "config field input.limit: 5 -> null" in err and "config field sampling.max_tokens: 2 -> 6" in err


def test_json_stdout_holds_only_the_summary_when_an_actor_dies(tmp_path: Path):
    """Ray prints a notice of its own to the driver's stdout when a worker dies ("(raylet) A
    worker died or was killed ..."); `run --json` keeps stdout for the summary alone."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    f = write_prompts(tmp_path / "d.parquet", 24)
    job = write_job(tmp_path, f, tmp_path / "out", cluster={"shards_in_flight": 1})
    env = {**os.environ, "UPG_BATCH_TEST_CRASH": "1@1", "UPG_BATCH_TEST_SHARD_DELAY_S": "0.5",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "upg_batch", "run", "--json", str(job)], capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout)  # nothing but the summary
    assert summary["actor_restarts"] == 1 and summary["rows_ok"] == 24
