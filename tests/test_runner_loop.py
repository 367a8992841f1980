"""The driver's scheduling loop without Ray: failure bookkeeping, shard gauges, final poll."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import read_output, write_job, write_prompts

import upg_batch.runner as runner_mod
from upg_batch.cluster import Slot
from upg_batch.commit import MANIFEST, Committer
from upg_batch.config import load_config
from upg_batch.fingerprint import fingerprint
from upg_batch.plan import make_plan
from upg_batch.rows import WorkSpec, output_schema
from upg_batch.runner import LOST_FACTOR, Runner, _Loop


class _Recorder:
    """Stands in for JobMetrics: keeps the last value of each call."""

    def __init__(self) -> None:
        self.shards: dict[str, int] = {}
        self.engine: list[tuple[str, str, dict]] = []

    def set_shards(self, **states: int) -> None:
        self.shards = states

    def observe_engine_stats(self, node: str, key: str, stats: dict) -> None:
        self.engine.append((node, key, stats))

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def _loop(tmp_path: Path, rows: int = 24, **cluster: Any) -> tuple[_Loop, Committer, _Recorder]:
    f = write_prompts(tmp_path / "d.parquet", rows)
    cfg = load_config(write_job(tmp_path, f, tmp_path / "out", cluster=cluster))
    plan = make_plan(cfg)
    committer = Committer(cfg.output.path, fingerprint(cfg, plan), len(plan.shards), cfg.output.format)
    todo = [s for s in plan.shards if not committer.is_committed(s.index)]
    spec = WorkSpec(cfg, plan.columns, output_schema(plan.id_type, []))
    metrics = _Recorder()
    return _Loop(Runner(cfg), plan, spec, committer, metrics, todo), committer, metrics


def test_a_shard_whose_result_keeps_getting_lost_ends_as_error_rows(tmp_path: Path):
    loop, committer, _ = _loop(tmp_path, max_attempts=2)
    bound = LOST_FACTOR * 2
    for n in range(1, bound):
        loop.pending.clear()
        loop._shard_failed(1, "shard result lost on n1: ObjectLostError: gone", charge=False)
        assert list(loop.pending) == [1], n  # retried, not charged
        assert loop.failures[1] == 0 and not committer.is_committed(1)
    loop.pending.clear()
    loop._shard_failed(1, "shard result lost on n1: ObjectLostError: gone", charge=False)
    assert not loop.pending and committer.is_committed(1)
    committer.close()
    rows = [r for r in read_output(tmp_path / "out").to_pylist()]
    assert sorted(r["id"] for r in rows) == list(range(8, 16))
    assert all(r["finish_reason"] == "error" and f"result was lost {bound} times" in r["error"] and "ObjectLostError" in r["error"] for r in rows)
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["shards"]["1"]["failed"]


def _ok_commit(committer: Committer, loop: _Loop, index: int) -> None:
    from upg_batch.rows import error_batch

    batch = error_batch(loop.plan.shards[index], loop.spec, "stand-in")
    committer.commit(index, batch, {"ok": batch.num_rows, "errors": 0})


def test_shard_gauges_partition_the_shards_across_resumes(tmp_path: Path):
    loop, committer, metrics = _loop(tmp_path, max_attempts=1)
    _ok_commit(committer, loop, 0)
    loop.pending.remove(0)
    loop.pending.remove(1)
    loop._shard_failed(1, "boom")  # max_attempts 1: shard 1 ends as error rows
    loop._update_shard_gauges()
    assert metrics.shards == {"pending": 1, "running": 0, "committed": 1, "failed": 1}
    committer.close()
    # resumed: the shard that failed in the earlier run still counts as failed, once
    loop, committer, metrics = _loop(tmp_path, max_attempts=1)
    loop._update_shard_gauges()
    assert metrics.shards == {"pending": 1, "running": 0, "committed": 1, "failed": 1}
    assert sum(metrics.shards.values()) == len(loop.plan.shards)
    committer.close()


def test_final_stats_poll_waits_once_for_all_actors(tmp_path: Path, monkeypatch):
    loop, committer, metrics = _loop(tmp_path)
    committer.close()

    def slot(name: str) -> Any:
        return SimpleNamespace(state="ready", node=name, key=f"{name}-0", handle=SimpleNamespace(stats=SimpleNamespace(remote=lambda: name)))

    loop.slots = [slot("hung"), slot("fine"), SimpleNamespace(state="dead")]
    waits: list[tuple] = []

    def fake_wait(refs, num_returns=1, timeout=None):
        waits.append((list(refs), num_returns, timeout))
        return [r for r in refs if r != "hung"], [r for r in refs if r == "hung"]

    gets: list[str] = []

    def fake_get(ref, timeout=None):
        gets.append(ref)
        if ref == "hung":  # a hung actor: a get on it would block for the whole timeout
            time.sleep(timeout or 0)
            raise runner_mod.GetTimeoutError("hung")
        return {"generation_tokens_total": 5}

    monkeypatch.setattr(runner_mod.ray, "wait", fake_wait)
    monkeypatch.setattr(runner_mod.ray, "get", fake_get)
    loop._final_stats_poll()
    assert waits == [(["hung", "fine"], 2, pytest.approx(10.0))]
    assert gets == ["fine"]  # the hung actor, not ready after the one wait, is not waited on again
    assert [(n, k) for n, k, _ in metrics.engine] == [("fine", "fine-0")]


def test_an_actor_death_charges_the_shard_it_ran_or_isolates_the_suspects(tmp_path: Path, monkeypatch):
    """An actor died holding shards 0 and 1 (2 pending): the one its last stats poll said was
    running is charged; with no such poll, both become suspects, uncharged, and run alone."""
    loop, committer, _ = _loop(tmp_path, max_attempts=2)  # shards 0, 1, 2
    started: list[str] = []
    monkeypatch.setattr(runner_mod.ray, "wait", lambda refs, num_returns=1, timeout=None: ([], list(refs)))  # no result came back
    monkeypatch.setattr(runner_mod, "kill_actor", lambda slot: None)
    monkeypatch.setattr(runner_mod, "node_alive", lambda node_id: True)
    monkeypatch.setattr(runner_mod, "start_actor", lambda slot, *args: started.append(slot.key))

    def died_holding_0_and_1(current: int | None) -> Slot:
        slot = Slot(index=0, node_id="n", node="n1", num_gpus=0.0, key="0.0", state="ready", current=current)
        loop.pending.clear()
        loop.pending.append(2)
        loop.suspects.clear()
        loop.failures.clear()
        for index in (0, 1):
            slot.queue.append(f"ref{index}")
            loop.inflight[f"ref{index}"] = (slot, index, 1)
        loop._actor_gone(slot, "engine actor on n1 died: boom")
        assert not loop.inflight and not slot.queue and started[-1] == slot.key
        return slot

    died_holding_0_and_1(current=1)
    assert dict(loop.failures) == {1: 1} and loop.suspects == {1}
    assert list(loop.pending) == [1, 0, 2]

    slot = died_holding_0_and_1(current=None)
    assert not loop.failures and loop.suspects == {0, 1}
    assert list(loop.pending) == [0, 1, 2]
    assert loop.stats.restarts == 2
    # a suspect goes only to an idle actor, and nothing joins it there
    assert loop._next_for(slot) == 0
    slot.queue.append("ref0")
    loop.inflight["ref0"] = (slot, 0, 2)
    assert loop._next_for(slot) is None
    committer.close()


def test_an_actor_killed_while_it_starts_is_restarted_but_a_failed_init_is_not(tmp_path: Path, monkeypatch):
    """The ready call of the first actor fails: a process that died (SIGKILL, OOM killer while
    it loads the model) is restarted; an __init__ that raised fails the slot, as a bad job."""
    loop, committer, _ = _loop(tmp_path)
    committer.close()
    started: list[str] = []
    monkeypatch.setattr(runner_mod, "kill_actor", lambda slot: None)
    monkeypatch.setattr(runner_mod, "node_alive", lambda node_id: True)
    monkeypatch.setattr(runner_mod, "start_actor", lambda slot, *args: started.append(slot.key))
    for init_failed, restarted in ((False, True), (True, False)):
        slot = Slot(index=0, node_id="n", node="n1", num_gpus=0.0, key="0.0", state="starting", ready_ref="ready")
        loop.slots, started[:] = [slot], []

        def get(ref, timeout=None, init_failed=init_failed):
            raise runner_mod.RayActorError(error_msg="The actor never ran", actor_init_failed=init_failed)

        monkeypatch.setattr(runner_mod.ray, "get", get)
        loop._handle("ready")
        if restarted:
            assert started == ["0.0"] and slot.gen == 1 and loop.stats.restarts == 1
        else:
            assert started == [] and slot.state == "dead" and "failed to start" in slot.last_error
