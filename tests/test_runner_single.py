"""Whole jobs on one local Ray node: exactly once, resume, bad rows, seeds, failures."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MSG_TYPE, corrupt_row_group, output_files, read_output, write_job, write_prompts

from upg_batch.cli import main
from upg_batch.commit import MANIFEST, SUCCESS, OutputError, read_committed
from upg_batch.config import OUTPUT_COLUMNS, load_config
from upg_batch.runner import Runner

pytestmark = pytest.mark.usefixtures("local_ray")


def _run(job: Path, **kw):
    return Runner(load_config(job), **kw).run()


def _committed(out: Path) -> int:
    try:
        return len(read_committed(out)["shards"])  # the snapshot and the commit log
    except (OSError, ValueError, OutputError):
        return 0


def test_job_commits_every_row_exactly_once_and_resumes_as_a_no_op(tmp_path: Path):
    data = tmp_path / "data"
    write_prompts(data / "a.parquet", 20, start=0, row_group_size=6, label=pa.array([f"L{i}" for i in range(20)]))
    write_prompts(data / "b.parquet", 13, start=20, label=pa.array([f"L{i}" for i in range(20, 33)]))
    out = tmp_path / "out"
    job = write_job(tmp_path, data, out, output={"passthrough": ["label"]})
    summary = _run(job)
    table = read_output(out)
    assert table.column_names == [*OUTPUT_COLUMNS, "label"]
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(33))
    rows = {r["id"]: r for r in table.to_pylist()}
    for i, r in rows.items():
        assert r["error"] is None and r["completion"] is not None
        assert r["finish_reason"] in ("stop", "length")
        assert 1 <= r["completion_tokens"] <= 6 and r["prompt_tokens"] > 0
        assert r["label"] == f"L{i}"
    assert summary["rows_ok"] == 33 and summary["rows_error"] == 0
    assert summary["shards_total"] == 5 and summary["shards_run"] == 5
    assert summary["completion_tokens"] == sum(r["completion_tokens"] for r in rows.values())
    [(node, share)] = summary["nodes"].items()
    assert share["rows"] == 33 and share["share"] == 1.0
    assert node.startswith("127.0.0.1-")  # the local Ray is bound to loopback
    assert (out / SUCCESS).exists() and json.loads((out / MANIFEST).read_text())["complete"]

    before = {n: (out / n).read_bytes() for n in output_files(out)}
    again = _run(job)
    # already complete: nothing runs, nothing is written, the stored summary comes back
    assert again == {**summary, "already_complete": True}
    assert {n: (out / n).read_bytes() for n in output_files(out)} == before


def test_local_ray_listens_on_loopback_only(local_ray):
    [node] = local_ray.nodes()
    assert node["NodeManagerAddress"] == "127.0.0.1"
    from ray._private.worker import global_worker

    assert global_worker.node.gcs_address.startswith("127.0.0.1:")


def test_every_bad_row_kind_becomes_an_error_row(tmp_path: Path):
    long_prompt = "lorem ipsum dolor sit amet " * 60
    prompts = ["fine one", None, "", long_prompt, None, None, "bad override", "fine two", None]
    messages = [None, None, None, None,
                [{"role": "user", "content": "chat ok"}],
                [{"role": "user", "content": None}],  # content must be a string
                None, None,
                [{"role": "robot", "content": "x"}]]  # the template raises on unknown roles
    max_tokens = [None, None, None, None, None, None, 0, 3, None]
    f = tmp_path / "bad.parquet"
    write_prompts(f, 9, prompt=pa.array(prompts, pa.string()), messages=pa.array(messages, MSG_TYPE), max_tokens=pa.array(max_tokens, pa.int64()))
    out = tmp_path / "out"
    job = write_job(tmp_path, f, out, model={"context": 64}, input={"shard_rows": 9})
    summary = _run(job)
    rows = {r["id"]: r for r in read_output(out).to_pylist()}
    assert sorted(rows) == list(range(9))
    expect_error = {1: "prompt is null", 2: "prompt is empty", 3: "the context holds 64", 5: "content must be a string",
                    6: "max_tokens", 8: "unknown role: robot"}
    for i, r in rows.items():
        if i in expect_error:
            assert r["finish_reason"] == "error" and r["completion"] is None, r
            assert expect_error[i] in r["error"], r
        else:
            assert r["error"] is None and r["finish_reason"] in ("stop", "length"), r
    assert rows[7]["completion_tokens"] <= 3  # the per-row override applied
    assert rows[3]["prompt_tokens"] > 64
    assert summary["rows_ok"] == 3 and summary["rows_error"] == 6


def test_seeded_sampling_does_not_depend_on_sharding(tmp_path: Path):
    f = write_prompts(tmp_path / "d.parquet", 12)
    results = []
    for shard_rows in (3, 12):
        out = tmp_path / f"out{shard_rows}"
        job = write_job(tmp_path, f, out, input={"shard_rows": shard_rows}, sampling={"temperature": 1.0, "seed": 1234, "max_tokens": 8})
        _run(job)
        results.append({r["id"]: r["completion"] for r in read_output(out).to_pylist()})
    assert results[0] == results[1]


def test_a_shard_that_keeps_killing_its_actor_ends_as_error_rows(tmp_path: Path, monkeypatch):
    f = write_prompts(tmp_path / "d.parquet", 24)
    out = tmp_path / "out"
    # One shard in flight: the actor holds only the shard it dies on, and the result of the
    # shard before it was already in when that one was handed out, so none can be lost with
    # the actor and the blame is certain each time (the blame when several shards were held:
    # test_runner_loop.py).
    job = write_job(tmp_path, f, out, cluster={"max_attempts": 2, "max_actor_restarts": 3, "shards_in_flight": 1})
    monkeypatch.setenv("UPG_BATCH_TEST_CRASH", "1")  # shard 1 (rows 8..15) exits its actor, every attempt
    summary = _run(job)
    rows = {r["id"]: r for r in read_output(out).to_pylist()}
    assert sorted(rows) == list(range(24))
    for i, r in rows.items():
        if 8 <= i < 16:
            assert r["finish_reason"] == "error" and "failed 2 times" in r["error"] and "died" in r["error"], r
        else:
            assert r["error"] is None, r
    # two deaths, both charged to shard 1
    assert summary["shards_failed"] == 1 and summary["actor_restarts"] == 2
    manifest = json.loads((out / MANIFEST).read_text())
    assert [int(k) for k, e in manifest["shards"].items() if e.get("failed")] == [1]
    assert summary["rows_error"] == 8 and summary["rows_ok"] == 16


def _engine_actor_pids() -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::EngineActor"):
                pids.append(int(p))
    return pids


def test_an_actor_killed_mid_job_loses_no_row(tmp_path: Path, monkeypatch):
    f = write_prompts(tmp_path / "d.parquet", 48)
    out = tmp_path / "out"
    job = write_job(tmp_path, f, out)
    # 6 shards of >= 1 s each: once the first commits, 5 s of work are left to kill the actor in
    monkeypatch.setenv("UPG_BATCH_TEST_SHARD_DELAY_S", "1.0")
    before = set(_engine_actor_pids())  # actors of earlier jobs may still be exiting
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(_run(job)))
    t.start()
    try:
        deadline = time.monotonic() + 120
        while _committed(out) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [p for p in _engine_actor_pids() if p not in before]
        assert _committed(out) >= 1 and len(pids) == 1, (_committed(out), pids)
        os.kill(pids[0], signal.SIGKILL)
        killed_at = _committed(out)
    finally:
        t.join(timeout=300)
    assert killed_at < 6, "the job ended before its actor was killed"
    assert result["actor_restarts"] == 1 and result["shards_failed"] == 0
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == list(range(48))
    assert read_output(out).column("error").null_count == 48


def test_changed_job_refuses_the_folder_unless_overwrite(tmp_path: Path, capsys):
    f = write_prompts(tmp_path / "d.parquet", 5)
    out = tmp_path / "out"
    assert main(["run", str(write_job(tmp_path, f, out))]) == 0
    changed = write_job(tmp_path, f, out, sampling={"max_tokens": 3})
    capsys.readouterr()
    assert main(["run", str(changed)]) == 2
    err = capsys.readouterr().err
    assert "different job (its config differs)" in err and "--overwrite" in err
    assert main(["run", "--overwrite", "--json", str(changed)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_ok"] == 5
    assert max(read_output(out).column("completion_tokens").to_pylist()) <= 3


def test_validate_counts_rows_and_reports_too_long_ones(tmp_path: Path, capsys):
    f = write_prompts(tmp_path / "d.parquet", 4, prompt=pa.array(["ok", "x " * 200, "", "fine"], pa.string()))
    job = write_job(tmp_path, f, tmp_path / "out", model={"context": 64})
    assert main(["validate", "--json", str(job)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 4 and report["files"] == 1
    assert report["too_long"] == 1 and report["error_rows"] == 2
    assert report["error_kinds"] == {"empty": 1, "too_long": 1}
    assert not (tmp_path / "out").exists()  # validate writes nothing


def test_a_model_that_does_not_load_fails_the_job_before_any_work(tmp_path: Path, capsys):
    import shutil

    from conftest import MODEL

    bad = tmp_path / "model"
    shutil.copytree(MODEL, bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    f = write_prompts(tmp_path / "d.parquet", 4)
    job = write_job(tmp_path, f, tmp_path / "out", model={"path": str(bad)})
    for command in ("run", "validate"):
        assert main([command, str(job)]) == 2
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("upg-batch: error:")]
        assert len(errors) == 1 and "does not load" in errors[0] and "model.safetensors" in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_a_hung_shard_is_given_up_after_shard_timeout(tmp_path: Path, monkeypatch):
    f = write_prompts(tmp_path / "d.parquet", 16)
    out = tmp_path / "out"
    job = write_job(tmp_path, f, out, cluster={"shard_timeout_s": 1.0, "max_attempts": 1, "shards_in_flight": 1})
    # every shard "hangs" for 300 s; given up after 1 s, the job takes seconds (restarting the
    # actor and loading the model included), far from what waiting out one hang would take
    monkeypatch.setenv("UPG_BATCH_TEST_SHARD_DELAY_S", "300")
    t0 = time.monotonic()
    summary = _run(job)
    assert time.monotonic() - t0 < 150
    rows = read_output(out).to_pylist()
    assert sorted(r["id"] for r in rows) == list(range(16))
    assert all(r["finish_reason"] == "error" and "shard_timeout_s" in r["error"] for r in rows)
    assert summary["shards_failed"] == 2 and summary["rows_error"] == 16


def test_a_taken_metrics_port_is_a_bad_job(tmp_path: Path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        f = write_prompts(tmp_path / "d.parquet", 2)
        job = write_job(tmp_path, f, tmp_path / "out", metrics={"port": port})
        assert main(["run", str(job)]) == 2
    assert f"metrics.port {port}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_overwrite_with_a_model_that_does_not_load_keeps_the_old_output(tmp_path: Path, capsys):
    import shutil

    from conftest import MODEL

    f = write_prompts(tmp_path / "d.parquet", 4)
    out = tmp_path / "out"
    assert main(["run", str(write_job(tmp_path, f, out))]) == 0
    before = {n: (out / n).read_bytes() for n in output_files(out)}
    bad = tmp_path / "model"
    shutil.copytree(MODEL, bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    capsys.readouterr()
    assert main(["run", "--overwrite", str(write_job(tmp_path, f, out, model={"path": str(bad)}))]) == 2
    assert "does not load" in capsys.readouterr().err
    # the failed run deleted nothing: the old results are still whole and complete
    assert {n: (out / n).read_bytes() for n in output_files(out)} == before
    assert sorted(read_output(out).column("id").to_pylist()) == [0, 1, 2, 3]


def test_a_gpu_job_runs_its_rows_on_the_gpu_engine(tmp_path: Path):
    """`model: {backend: gpu}` in a job: the actor's engine runs on the GPU adapter (lavapipe in
    the tests, named by UPG_BATCH_GPU_ADAPTER), and its completions are the GPU engine's."""
    from upg_batch import Engine, SamplingParams
    from upg_batch.rows import derive_seed

    data = tmp_path / "data"
    write_prompts(data / "a.parquet", 12)
    out = tmp_path / "out"
    job = write_job(tmp_path, data, out, model={"backend": "gpu", "weights": "f32"}, sampling={"max_tokens": 5, "temperature": 0.8, "seed": 3})
    summary = _run(job)
    assert summary["rows_ok"] == 12 and summary["rows_error"] == 0
    [share] = summary["nodes"].values()
    eng = Engine(load_config(job).model.path, backend="gpu", weights="f32")
    assert share["engine"] == f"gpu ({eng.info['adapter']}, {eng.info['gpu_api']})"
    rows = {r["id"]: r for r in read_output(out).to_pylist()}
    prompts = pq.read_table(data / "a.parquet").to_pylist()
    params = [SamplingParams(max_tokens=5, temperature=0.8, seed=derive_seed(3, p["id"])) for p in prompts]
    got = eng.generate([p["prompt"] for p in prompts], params)
    assert [rows[p["id"]]["completion"] for p in prompts] == [c.text for c in got]


def test_a_corrupt_data_page_becomes_error_rows_and_the_job_completes(tmp_path: Path, capsys):
    f = write_prompts(tmp_path / "c.parquet", 24, row_group_size=8)
    corrupt_row_group(f, 1)  # rows 8 to 15: the footer is valid, their data pages are garbage
    out = tmp_path / "out"
    job = write_job(tmp_path, f, out, input={"shard_rows": 8})
    assert main(["run", str(job)]) == 0
    rows = read_output(out).to_pylist()
    assert sorted(r["id"] for r in rows if r["id"] is not None) == [*range(8), *range(16, 24)]
    bad = [r for r in rows if r["id"] is None]
    assert len(bad) == 8
    assert all(r["finish_reason"] == "error" and f"{f}: row group 1 (rows 8 to 15) cannot be read" in r["error"] for r in bad)
    assert all(r["error"] is None for r in rows if r["id"] is not None)
    assert (out / SUCCESS).exists()
    m = read_committed(out)
    assert sum(e["errors"] for e in m["shards"].values()) == 8 and not any(e.get("failed") for e in m["shards"].values())
    assert main(["run", str(job)]) == 0  # a rerun is a no-op, not a failure


@pytest.mark.parametrize("damage", ["rm -rf out", "rm out/part-*"])
def test_output_removed_mid_job_fails_the_run_and_a_rerun_repairs_it(tmp_path: Path, capsys, monkeypatch, damage: str):
    import shutil

    from upg_batch.commit import Committer

    f = write_prompts(tmp_path / "d.parquet", 24)
    out = tmp_path / "out"
    job = write_job(tmp_path, f, out, input={"shard_rows": 8}, cluster={"shards_in_flight": 1})
    commit = Committer.commit

    def commit_then_damage(self, index, batch, info):
        seconds = commit(self, index, batch, info)
        if len(self.shards) == 1:  # the first commit of the run is in: now the damage
            if damage == "rm -rf out":
                shutil.rmtree(out)
            else:  # the shell's glob skips hidden files: the lock file stays
                for p in out.glob("part-*"):
                    p.unlink()
        return seconds

    monkeypatch.setattr(Committer, "commit", commit_then_damage)
    assert main(["run", str(job)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("upg-batch: error: ") and str(out) in last and "run it again" in last
    expect = "output folder was removed or replaced" if damage == "rm -rf out" else "recorded part files are missing or changed size"
    assert expect in last
    assert not (out / SUCCESS).exists()
    monkeypatch.undo()
    assert main(["run", str(job)]) == 0  # the rerun repairs the output
    assert sorted(read_output(out).column("id").to_pylist()) == list(range(24))
    assert (out / SUCCESS).exists() and len(read_committed(out)["shards"]) == 3


def test_a_zombie_attempt_resumed_after_it_was_given_up_never_commits(tmp_path: Path, monkeypatch):
    """An actor stopped (SIGSTOP) in the middle of shard 0 past the shard timeout; the driver
    gives up on that attempt, but its kill is disabled, so the process lives on while a new
    actor runs attempt 2. The stopped actor is resumed (SIGCONT) while the job still runs and
    finishes its stale attempt: that result is never committed nor duplicated."""
    import upg_batch.runner as runner_mod

    f = write_prompts(tmp_path / "d.parquet", 48)
    out = tmp_path / "out"
    pidfile = tmp_path / "zombie.pid"
    job = write_job(tmp_path, f, out, cluster={"shard_timeout_s": 3.0, "max_attempts": 3, "shards_in_flight": 1})
    monkeypatch.setenv("UPG_BATCH_TEST_STOP", f"0@1:{pidfile}")
    monkeypatch.setenv("UPG_BATCH_TEST_SHARD_DELAY_S", "0.5")  # 6 shards of >= 0.5 s after the stop

    def forget_actor(slot):  # the driver gives up on the actor but cannot kill it
        slot.handle = None

    monkeypatch.setattr(runner_mod, "kill_actor", forget_actor)
    resumed: dict[str, float] = {}

    def resume_the_zombie() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (pidfile.exists() and 0 in {int(k) for k in _committed_shards(out)}):
            time.sleep(0.05)
        if pidfile.exists():
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGCONT)  # it runs on, and returns attempt 1's result
            resumed["at"] = time.monotonic()
            resumed["pid"] = pid

    t = threading.Thread(target=resume_the_zombie)
    t.start()
    try:
        summary = _run(job)
        ended = time.monotonic()
    finally:
        t.join()
        if "pid" in resumed:
            try:
                os.kill(resumed["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert "at" in resumed and resumed["at"] < ended - 1.0, "the zombie was not resumed while the job ran"
    rows = read_output(out).to_pylist()
    assert sorted(r["id"] for r in rows) == list(range(48)) and all(r["error"] is None for r in rows)
    record = read_committed(out)["shards"]
    assert record["0"]["attempt"] == 2  # the replacement's attempt, not the zombie's
    assert summary["rows_ok"] == 48 and summary["shards_failed"] == 0


def _committed_shards(out: Path) -> set[str]:
    try:
        return set(read_committed(out)["shards"])
    except (OSError, ValueError, OutputError):
        return set()
