"""The bounded kill soak (scripts/kill_soak.py). On a private Ray: a job's driver SIGKILLed at
a random moment and at each kind of commit-log boundary, an engine actor SIGKILLed in a run
that then finishes, `run` again each time; on a three-node local cluster: a node removed
mid-job, once left to finish and once followed by a driver kill. Every completed job holds each
id exactly once, no stray file, _SUCCESS, and the rows of an uninterrupted run; the Ray a killed
driver left is stopped by the next run. The full soak is recorded in docs/reliability.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("kill_soak", ROOT / "scripts" / "kill_soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _nothing_lost(report: dict) -> None:
    assert report["rows_lost"] == 0 and report["rows_duplicated"] == 0, report
    assert report["stray_files"] == [] and report["jobs_without_success"] == 0, report
    assert report["every_job_equal_to_uninterrupted_run"], report


def test_a_bounded_kill_soak_loses_and_duplicates_nothing(tmp_path: Path, soak) -> None:
    report = soak.soak(kills=1, rows=240, shard_rows=4, max_delay=7.0, seed=3, work=tmp_path, boundary_kills=3, actor_kills=1)
    moments = report["driver_kills_by_moment"]
    assert moments["random"] == 1 and moments["log_line"] == moments["part_file"] == moments["snapshot"] == 1, report
    assert report["actor_kills_in_runs_that_completed"] >= 1 and report["actor_restarts_in_completed_runs"] >= 1, report
    assert report["jobs_completed_and_checked"] >= 2
    _nothing_lost(report)
    # what the killed drivers' private Ray left was stopped by the next run, in time
    assert report["ray_processes_of_killed_runs_stopped_by_the_next_run"] > 0, report
    assert report["leftovers_alive_10s_into_a_later_run"] == 0, report


def test_a_bounded_soak_on_a_cluster_loses_nodes_and_nothing_else(tmp_path: Path, soak) -> None:
    report = soak.soak(kills=0, rows=240, shard_rows=4, max_delay=7.0, seed=3, work=tmp_path, node_removals=2)
    assert report["node_removals"] == 2 and report["jobs_completed_and_checked"] == 2, report
    assert report["shards_run_again"]["out-cluster"] >= 1, report  # the lost nodes held shards
    _nothing_lost(report)
