"""The bounded kill soak (scripts/kill_soak.py): a job's driver SIGKILLed at random moments,
run again each time; every completed job holds each id exactly once, no stray file, and the
rows of an uninterrupted run. The full soak (100+ kills) is recorded in docs/reliability.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_bounded_kill_soak_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("kill_soak", ROOT / "scripts" / "kill_soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)  # type: ignore[union-attr]
    report = soak.soak(kills=4, rows=240, shard_rows=4, max_delay=7.0, seed=3, work=tmp_path)
    assert report["kills"] == 4 and report["jobs_completed_and_checked"] >= 1
    assert report["rows_lost"] == 0 and report["rows_duplicated"] == 0, report
    assert report["stray_files"] == [] and report["every_job_equal_to_uninterrupted_run"], report
