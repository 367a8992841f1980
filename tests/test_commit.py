"""The output folder: atomic commits, manifest, resume cleanup, fingerprint checks, locking."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import output_files, read_output

from upg_batch.commit import MANIFEST, SUCCESS, Committer, OutputError

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
    assert output_files(out) == sorted([MANIFEST, SUCCESS, "part-000000.arrow", "part-000001.arrow"])
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
    assert not c.is_committed(0) and not (out / "part-000000.arrow").exists()
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
