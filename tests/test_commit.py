"""The output folder: atomic commits, manifest, resume cleanup, fingerprint checks, locking."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import output_files, read_output

import upg_batch.commit as commit_mod
from upg_batch.commit import LOG, LOCK, MANIFEST, SUCCESS, CommitError, Committer, OutputError, read_committed

FP = {"config": "c1", "model": "m1", "dataset": "d1", "job": "j1"}


def _batch(ids):
    return pa.record_batch({"id": pa.array(ids, pa.int64()), "completion": pa.array([f"c{i}" for i in ids])})


def _commit(c: Committer, index: int, ids):
    c.commit(index, _batch(ids), {"ok": len(ids), "errors": 0})


def test_commit_then_finish_is_readable_and_recorded(tmp_path: Path):
    c = Committer(tmp_path / "out", FP, 2, "arrow")
    _commit(c, 0, [0, 1])
    assert not (tmp_path / "out" / SUCCESS).exists()
    _commit(c, 1, [2])
    with pytest.raises(OutputError, match="already committed"):
        _commit(c, 1, [2])
    c.finish({"status": "complete"})
    c.close()
    out = tmp_path / "out"
    # the lock file stays (hidden from readers): deleting it could let two runs hold a lock
    assert output_files(out) == sorted([LOCK, MANIFEST, SUCCESS, "part-000000.arrow", "part-000001.arrow"])
    assert sorted(read_output(out).column("id").to_pylist()) == [0, 1, 2]
    m = json.loads((out / MANIFEST).read_text())
    assert m["complete"] and set(m["shards"]) == {"0", "1"} and m["fingerprint"] == FP


def test_resume_keeps_committed_and_cleans_strays(tmp_path: Path):
    out = tmp_path / "out"
    c = Committer(out, FP, 3, "arrow")
    _commit(c, 0, [0])
    c.close()
    # a killed run leaves a temp file and a renamed part file the manifest never recorded
    (out / ".tmp-part-000001.arrow.123").write_bytes(b"partial")
    (out / "part-000002.arrow").write_bytes(b"whole but unrecorded")
    c = Committer(out, FP, 3, "arrow")
    assert c.is_committed(0) and not c.is_committed(1) and not c.is_committed(2)
    assert output_files(out) == [".upg-batch.lock", MANIFEST, "part-000000.arrow"]
    c.begin()
    c.close()
    assert json.loads((out / MANIFEST).read_text())["runs"] == 2


def test_recorded_file_that_vanished_is_redone(tmp_path: Path):
    out = tmp_path / "out"
    c = Committer(out, FP, 2, "arrow")
    _commit(c, 0, [0])
    c.close()
    (out / "part-000000.arrow").unlink()
    c = Committer(out, FP, 2, "arrow")
    assert not c.is_committed(0)
    c.close()


def test_different_fingerprint_refused_unless_overwrite(tmp_path: Path):
    out = tmp_path / "out"
    c = Committer(out, FP, 1, "arrow")
    _commit(c, 0, [0])
    c.close()
    other = {**FP, "dataset": "d2", "job": "j2"}
    with pytest.raises(OutputError, match="different job \\(its dataset differs\\).*--overwrite"):
        Committer(out, other, 1, "arrow")
    c = Committer(out, other, 1, "arrow", overwrite=True)
    assert not c.is_committed(0)
    c.begin()  # the old output goes once the run begins
    assert not (out / "part-000000.arrow").exists()
    c.close()


def test_foreign_files_refused_even_with_overwrite(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="did not write \\(notes.txt\\)"):
            Committer(out, FP, 1, "arrow", overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_run_that_never_begins_leaves_no_folder(tmp_path: Path):
    Committer(tmp_path / "new", FP, 1, "arrow").close()
    assert not (tmp_path / "new").exists()


def test_one_run_at_a_time(tmp_path: Path):
    c = Committer(tmp_path / "out", FP, 1, "arrow")
    with pytest.raises(OutputError, match="another upg-batch run"):
        Committer(tmp_path / "out", FP, 1, "arrow")
    c.close()
    Committer(tmp_path / "out", FP, 1, "arrow").close()


def test_parquet_format(tmp_path: Path):
    import pyarrow.dataset as ds

    c = Committer(tmp_path / "out", FP, 1, "parquet")
    _commit(c, 0, [5, 6])
    c.close()
    assert ds.dataset(str(tmp_path / "out"), format="parquet").to_table().column("id").to_pylist() == [5, 6]


def test_the_lock_file_survives_close_so_two_runs_never_hold_different_files(tmp_path: Path):
    import fcntl

    out = tmp_path / "out"
    first = Committer(out, FP, 1, "arrow")
    first.begin()
    # a second run opened the lock file while the first held it, and locks it once released
    fd = os.open(out / LOCK, os.O_RDWR)
    try:
        first.close()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # a third run must then be refused, not lock a fresh file of the same name
        with pytest.raises(OutputError, match="another upg-batch run"):
            Committer(out, FP, 1, "arrow")
    finally:
        os.close(fd)
    Committer(out, FP, 1, "arrow").close()


def test_a_lock_on_a_replaced_lock_file_is_not_trusted(tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    c = Committer(out, FP, 1, "arrow")
    c.begin()
    c.close()
    real_flock = commit_mod.fcntl.flock
    swapped = []

    def flock_then_swap(fd, op):
        real_flock(fd, op)
        if not swapped:  # another process replaced the lock file between open and flock
            swapped.append(True)
            (out / LOCK).unlink()
            (out / LOCK).write_bytes(b"")

    monkeypatch.setattr(commit_mod.fcntl, "flock", flock_then_swap)
    c = Committer(out, FP, 1, "arrow")
    assert os.fstat(c._lock_fd).st_ino == (out / LOCK).stat().st_ino
    monkeypatch.setattr(commit_mod.fcntl, "flock", real_flock)
    with pytest.raises(OutputError, match="another upg-batch run"):
        Committer(out, FP, 1, "arrow")
    c.close()


def test_overwrite_deletes_old_output_only_when_the_run_begins(tmp_path: Path):
    out = tmp_path / "out"
    c = Committer(out, FP, 1, "arrow")
    _commit(c, 0, [0])
    c.finish({"status": "complete"})
    c.close()
    before = {n: (out / n).read_bytes() for n in output_files(out)}
    other = {**FP, "model": "m2", "job": "j2"}
    # a run that fails a pre-flight check after opening the folder leaves it as it was
    c = Committer(out, other, 1, "arrow", overwrite=True)
    assert not c.is_committed(0)
    c.close()
    assert {n: (out / n).read_bytes() for n in output_files(out)} == before
    c = Committer(out, other, 1, "arrow", overwrite=True)
    c.begin()
    assert output_files(out) == [LOCK, MANIFEST]
    assert json.loads((out / MANIFEST).read_text())["fingerprint"] == other
    c.close()


def test_created_folders_are_fsynced_into_their_parents(tmp_path: Path, monkeypatch):
    synced: list[Path] = []
    real = commit_mod._fsync_dir
    monkeypatch.setattr(commit_mod, "_fsync_dir", lambda p: (synced.append(Path(p)), real(p)))
    out = tmp_path / "a" / "b" / "out"
    c = Committer(out, FP, 1, "arrow")
    for d in (tmp_path, tmp_path / "a", tmp_path / "a" / "b"):
        assert d in synced, (d, synced)
    c.close()
    assert not (tmp_path / "a").exists()  # never begun: every folder it created is gone again


def test_running_totals_of_rows_and_failed_shards(tmp_path: Path):
    out = tmp_path / "out"
    c = Committer(out, FP, 3, "arrow")
    _commit(c, 0, [0, 1])
    c.commit(1, _batch([2, 3, 4]), {"ok": 0, "errors": 3, "failed": True})
    assert (c.rows_committed, c.failed_shards) == (5, 1)
    c.close()
    c = Committer(out, FP, 3, "arrow")
    assert (c.rows_committed, c.failed_shards) == (5, 1)
    c.close()


# -- the commit log: O(1) per commit, torn lines, crashes around compaction ---------------------


def _crash(c: Committer) -> None:
    """What a SIGKILL leaves: no compaction, no cleanup; only the lock is released."""
    c.log.close()
    os.close(c._lock_fd)
    c._lock_fd = -1


def _ids(out: Path) -> list[int]:
    return sorted(read_output(out).column("id").to_pylist())


def test_commits_append_to_the_log_and_never_rewrite_the_snapshot(tmp_path: Path):
    out = tmp_path / "out"
    c = Committer(out, FP, 50, "arrow")
    c.begin()
    before = (out / MANIFEST).stat()
    writes = c.snapshot_writes
    for i in range(50):
        _commit(c, i, [i])
        # a reader of snapshot plus log sees every commit as it happens
        assert set(read_committed(out)["shards"]) == {str(k) for k in range(i + 1)}
    after = (out / MANIFEST).stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert c.snapshot_writes == writes
    assert json.loads((out / MANIFEST).read_text())["shards"] == {}
    lines = (out / LOG).read_bytes().splitlines(keepends=True)
    assert len(lines) == 50 and all(ln.endswith(b"\n") for ln in lines)
    assert [json.loads(ln)["shard"] for ln in lines] == list(range(50))
    c.finish({"status": "complete"})
    c.close()
    # the job's end compacts: the snapshot holds every shard and the log is gone
    assert not (out / LOG).exists()
    m = json.loads((out / MANIFEST).read_text())
    assert m["complete"] and set(m["shards"]) == {str(i) for i in range(50)}
    assert _ids(out) == list(range(50))


def test_the_log_is_compacted_when_it_outgrows_the_snapshot(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(commit_mod, "COMPACT_MIN_BYTES", 0)
    out = tmp_path / "out"
    c = Committer(out, FP, 200, "arrow")
    c.begin()
    first = c.snapshot_writes
    for i in range(200):
        _commit(c, i, [i])
        assert c.log.size <= max(c.snapshot_bytes, 0) + 200  # bounded by the snapshot
        assert len(read_committed(out)["shards"]) == i + 1
    # the snapshot roughly doubles between compactions: a handful of rewrites, not 200
    assert 2 <= c.snapshot_writes - first <= 12, c.snapshot_writes
    _crash(c)
    c = Committer(out, FP, 200, "arrow")
    assert all(c.is_committed(i) for i in range(200)) and c.rows_committed == 200
    c.close()


@pytest.mark.parametrize(
    "torn",
    [b'{"shard":2,"entry":{"file":"part-0000', b"\x00" * 40, b'{"shard":2,"entry":{"file"\n'],
    ids=["partial", "zeros", "terminated-but-invalid"],
)
def test_a_torn_last_log_line_is_no_commit_and_its_shard_runs_again(tmp_path: Path, torn: bytes):
    out = tmp_path / "out"
    c = Committer(out, FP, 3, "arrow")
    _commit(c, 0, [0])
    _commit(c, 1, [1])
    _crash(c)
    intact = (out / LOG).read_bytes()
    # shard 2 was renamed into place, then the run died while appending its log line
    (out / "part-000002.arrow").write_bytes((out / "part-000001.arrow").read_bytes())
    with open(out / LOG, "ab") as f:
        f.write(torn)
    assert set(read_committed(out)["shards"]) == {"0", "1"}  # readers ignore the torn line too
    c = Committer(out, FP, 3, "arrow")
    assert c.is_committed(0) and c.is_committed(1) and not c.is_committed(2)
    assert not (out / "part-000002.arrow").exists()  # an unrecorded part file: deleted
    assert (out / LOG).read_bytes() == intact  # the torn tail is cut before anything is appended
    _commit(c, 2, [2])
    c.finish({"status": "complete"})
    c.close()
    assert _ids(out) == [0, 1, 2]  # every row exactly once
    assert set(json.loads((out / MANIFEST).read_text())["shards"]) == {"0", "1", "2"}


def test_a_crash_between_log_append_and_compaction_keeps_the_logged_shards(tmp_path: Path):
    out = tmp_path / "out"
    c = Committer(out, FP, 3, "arrow")
    _commit(c, 0, [0, 1])
    c.commit(1, _batch([2]), {"ok": 0, "errors": 1, "failed": True})
    _crash(c)
    assert json.loads((out / MANIFEST).read_text())["shards"] == {}  # only the log knows
    c = Committer(out, FP, 3, "arrow")
    assert c.is_committed(0) and c.is_committed(1) and not c.is_committed(2)
    assert (c.rows_committed, c.failed_shards) == (3, 1)
    c.begin()  # a new run folds the old log into the snapshot
    assert not (out / LOG).exists()
    m = json.loads((out / MANIFEST).read_text())
    assert set(m["shards"]) == {"0", "1"} and m["runs"] == 2
    _commit(c, 2, [3])
    c.finish({"status": "complete"})
    c.close()
    assert _ids(out) == [0, 1, 2, 3]


@pytest.mark.parametrize("stage", ["snapshot-temp-written", "snapshot-renamed"])
def test_a_crash_in_the_middle_of_compaction_loses_and_doubles_nothing(tmp_path: Path, stage: str):
    out = tmp_path / "out"
    c = Committer(out, FP, 3, "arrow")
    _commit(c, 0, [0, 1])
    _commit(c, 1, [2])
    snapshot = {**json.loads((out / MANIFEST).read_text()), "shards": {str(k): v for k, v in c.shards.items()}}
    _crash(c)
    # compaction writes the whole snapshot to a temp file, renames it, then removes the log
    data = json.dumps(snapshot).encode()
    if stage == "snapshot-temp-written":
        (out / f".tmp-{MANIFEST}.4242").write_bytes(data)
    else:
        (out / MANIFEST).write_bytes(data)  # both the snapshot and the log hold shards 0 and 1
    c = Committer(out, FP, 3, "arrow")
    assert sorted(c.shards) == [0, 1] and c.rows_committed == 3
    assert not (out / f".tmp-{MANIFEST}.4242").exists()
    _commit(c, 2, [3])
    with pytest.raises(OutputError, match="already committed"):
        _commit(c, 1, [2])
    c.finish({"status": "complete"})
    c.close()
    assert _ids(out) == [0, 1, 2, 3]
    assert output_files(out) == sorted([LOCK, MANIFEST, SUCCESS] + [f"part-{i:06d}.arrow" for i in range(3)])


def test_a_log_without_a_snapshot_is_refused_unless_overwrite(tmp_path: Path):
    out = tmp_path / "out"
    c = Committer(out, FP, 2, "arrow")
    _commit(c, 0, [0])
    _crash(c)
    (out / MANIFEST).unlink()
    (out / "part-000000.arrow").unlink()
    with pytest.raises(OutputError, match="no _manifest.json.*--overwrite"):
        Committer(out, FP, 2, "arrow")
    c = Committer(out, FP, 2, "arrow", overwrite=True)
    c.begin()
    assert output_files(out) == [LOCK, MANIFEST]
    c.close()


def test_close_folds_the_log_into_the_snapshot(tmp_path: Path):
    out = tmp_path / "out"
    c = Committer(out, FP, 2, "arrow")
    _commit(c, 0, [0])
    c.close()  # a run that stopped early (an error) but exited cleanly
    assert not (out / LOG).exists()
    assert set(json.loads((out / MANIFEST).read_text())["shards"]) == {"0"}


def test_the_folder_removed_mid_run_stops_the_run_and_a_rerun_starts_over(tmp_path: Path):
    import shutil

    out = tmp_path / "out"
    c = Committer(out, FP, 3, "arrow")
    _commit(c, 0, [0])
    shutil.rmtree(out)  # rm -rf while the job runs
    with pytest.raises(CommitError, match="output folder was removed or replaced.*run it again"):
        _commit(c, 1, [1])
    with pytest.raises(CommitError, match="output folder was removed or replaced"):
        c.finish({"status": "complete"})
    c.close()
    assert not out.exists()  # nothing written into (or recreating) the removed folder
    c = Committer(out, FP, 3, "arrow")  # the rerun
    assert not c.is_committed(0)
    for i in range(3):
        _commit(c, i, [i])
    c.finish({"status": "complete"})
    c.close()
    assert sorted(read_output(out).column("id").to_pylist()) == [0, 1, 2] and (out / SUCCESS).exists()


def test_the_folder_emptied_mid_run_stops_the_run_before_it_writes_again(tmp_path: Path):
    out = tmp_path / "out"
    c = Committer(out, FP, 2, "arrow")
    _commit(c, 0, [0])
    for n in os.listdir(out):  # rm -rf out/* out/.*: the lock file goes too
        os.unlink(out / n)
    with pytest.raises(CommitError, match=f"lock file {LOCK} was removed or replaced"):
        _commit(c, 1, [1])
    c.close()
    assert os.listdir(out) == []
    c = Committer(out, FP, 2, "arrow")
    assert not c.is_committed(0) and not c.is_committed(1)
    c.close()


@pytest.mark.parametrize("damage", ["remove", "truncate"])
def test_finish_checks_every_recorded_part_file_before_success(tmp_path: Path, damage: str):
    out = tmp_path / "out"
    c = Committer(out, FP, 3, "arrow")
    for i in range(3):
        _commit(c, i, [i])
    part = out / "part-000001.arrow"
    if damage == "remove":  # rm out/*: hidden files (the lock) stay
        part.unlink()
    else:
        os.truncate(part, 10)
    with pytest.raises(CommitError, match="1 recorded part files are missing or changed size \\(part-000001.arrow\\)"):
        c.finish({"status": "complete"})
    c.close()
    assert not (out / SUCCESS).exists() and not json.loads((out / MANIFEST).read_text())["complete"]
    c = Committer(out, FP, 3, "arrow")  # the rerun redoes exactly the damaged shard
    assert [c.is_committed(i) for i in range(3)] == [True, False, True]
    assert not part.exists()
    _commit(c, 1, [1])
    c.finish({"status": "complete"})
    c.close()
    assert sorted(read_output(out).column("id").to_pylist()) == [0, 1, 2] and (out / SUCCESS).exists()


def test_a_full_disk_names_the_file_being_written(tmp_path: Path, monkeypatch):
    import errno

    out = tmp_path / "out"
    c = Committer(out, FP, 2, "arrow")
    _commit(c, 0, [0])

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(commit_mod.os, "fsync", no_space)
    with pytest.raises(CommitError, match=f"{out / 'part-000001.arrow'}: cannot write \\(No space left on device\\)"):
        _commit(c, 1, [1])
    monkeypatch.undo()
    assert not c.is_committed(1) and not any(n.startswith(".tmp-") for n in os.listdir(out))
    c.close()


@pytest.mark.parametrize("sub", ["", "inner"])
def test_an_output_path_that_is_a_file_is_named(tmp_path: Path, sub: str):
    f = tmp_path / "taken"
    f.write_text("a file")
    with pytest.raises(OutputError, match=f"output.path {f / sub if sub else f}: {f} is a file, not a folder"):
        Committer(f / sub if sub else f, FP, 1, "arrow")


class _Killed(BaseException):
    """Stands for a SIGKILL inside a commit: nothing after it runs, no cleanup handler counts."""


@pytest.mark.parametrize("stage", ["before_rename", "before_log_line", "mid_line"])
def test_a_fault_injected_inside_a_commit_leaves_no_duplicate_and_no_orphan(tmp_path: Path, monkeypatch, stage: str):
    """The real commit path, interrupted at each of its steps: after the temporary file is
    written (before its rename), after the rename (before the log line), and in the middle of
    writing the log line. A resumed run commits every shard exactly once and leaves only
    committed part files."""
    out = tmp_path / "out"
    c = Committer(out, FP, 3, "arrow")
    _commit(c, 0, [0, 1])
    real_replace, real_write = os.replace, os.write

    def replace(src, dst):
        if stage == "before_rename" and str(dst).endswith("part-000001.arrow"):
            raise _Killed()
        return real_replace(src, dst)

    def write(fd, data):
        if b'"shard":1' in bytes(data):
            if stage == "before_log_line":
                raise _Killed()
            if stage == "mid_line":
                real_write(fd, bytes(data)[: len(data) // 2])  # half the line reaches the disk
                raise _Killed()
        return real_write(fd, data)

    monkeypatch.setattr(commit_mod.os, "replace", replace)
    monkeypatch.setattr("upg_batch.manifest.os.write", write)
    with pytest.raises(_Killed):
        _commit(c, 1, [2, 3])
    monkeypatch.undo()
    _crash(c)
    if stage == "before_rename":  # the commit's own cleanup removed its temporary file; a SIGKILL would not
        (out / f".tmp-part-000001.arrow.{os.getpid()}").write_bytes(b"whole but never renamed")
    leftovers = sorted(os.listdir(out))
    if stage == "before_rename":
        assert "part-000001.arrow" not in leftovers
    else:
        assert "part-000001.arrow" in leftovers  # renamed into place but not (wholly) recorded
    assert set(read_committed(out)["shards"]) == {"0"}  # readers see only shard 0 committed

    c = Committer(out, FP, 3, "arrow")  # the resumed run
    assert c.is_committed(0) and not c.is_committed(1)
    assert sorted(os.listdir(out)) == sorted(n for n in [LOCK, LOG, MANIFEST, "part-000000.arrow"] if (out / n).exists())
    _commit(c, 1, [2, 3])
    _commit(c, 2, [4])
    c.finish({"status": "complete"})
    c.close()
    assert _ids(out) == [0, 1, 2, 3, 4]  # exactly once
    assert output_files(out) == sorted([LOCK, MANIFEST, SUCCESS, "part-000000.arrow", "part-000001.arrow", "part-000002.arrow"])


@pytest.mark.parametrize("stage", ["before_log_removal", "before_success"])
def test_a_kill_inside_finish_is_repaired_by_the_next_run(tmp_path: Path, monkeypatch, stage: str):
    """Killed after the snapshot marked the job complete, before the log was removed or before
    _SUCCESS was written: the next run finds the job complete (nothing to run), folds the log
    away and writes _SUCCESS from the stored summary."""
    out = tmp_path / "out"
    c = Committer(out, FP, 1, "arrow")
    _commit(c, 0, [0])
    kill = lambda *a: (_ for _ in ()).throw(_Killed())  # noqa: E731
    if stage == "before_log_removal":
        monkeypatch.setattr(c.log, "remove", kill)
    else:
        monkeypatch.setattr(c, "_write_success", kill)
    with pytest.raises(_Killed):
        c.finish({"status": "complete", "rows_ok": 1})
    _crash(c)
    assert json.loads((out / MANIFEST).read_text())["complete"] and not (out / SUCCESS).exists()
    assert (out / LOG).exists() == (stage == "before_log_removal")
    c = Committer(out, FP, 1, "arrow")
    assert c.complete
    c.repair_complete()
    c.close()
    assert output_files(out) == sorted([LOCK, MANIFEST, SUCCESS, "part-000000.arrow"])
    assert json.loads((out / SUCCESS).read_text()) == {"status": "complete", "rows_ok": 1}
    assert _ids(out) == [0]
