"""The Ray engine actor: loads the model once, runs the shards queued on it, reports live stats.

The actor is threaded with two concurrency groups: `work` (up to WORK_THREADS shards at once:
their `generate` calls share the engine's batch, so it stays full while one shard finishes and
the next starts; results are the same as one at a time, by batch invariance) and `poll` (so the
driver can read `eng.stats()` while shards run; generate releases the GIL).

Test-only hooks (read from the driver's environment and handed to the actor; never set them
in production):
  UPG_BATCH_TEST_SHARD_DELAY_S  seconds to sleep before each shard (slows a job down so tests
                                can kill the driver or an actor mid-job deterministically)
  UPG_BATCH_TEST_CRASH          "I" or "I@A": the actor process exits when it starts shard I
                                (every attempt, or only attempt A), like a crash would
  UPG_BATCH_TEST_STOP           "I@A:FILE": the actor writes its pid to FILE and stops itself
                                (SIGSTOP) when it starts attempt A of shard I, so a test can
                                resume it (SIGCONT) after that attempt was given up
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import ray

from upg_batch.chat import load_chat_template
from upg_batch.plan import Shard
from upg_batch.rows import ShardResult, WorkSpec, Prompting, run_rows

__all__ = ["EngineActor", "node_label", "test_hooks_from_env"]

TEST_HOOK_VARS = ("UPG_BATCH_TEST_SHARD_DELAY_S", "UPG_BATCH_TEST_CRASH", "UPG_BATCH_TEST_STOP")
# shards run at once per actor (the driver queues cluster.shards_in_flight on each, at most 8);
# UPG_BATCH_ACTOR_SHARDS_AT_ONCE=1 runs them one after another (benchmarks compare the two)
WORK_THREADS = int(os.environ.get("UPG_BATCH_ACTOR_SHARDS_AT_ONCE", "8") or 8)


def node_label(node_id: str, ip: str) -> str:
    """The short, bounded name of a Ray node used in logs, summaries, manifests and metrics."""
    return f"{ip}-{node_id[:8]}"


def test_hooks_from_env() -> dict[str, str]:
    return {k: os.environ[k] for k in TEST_HOOK_VARS if os.environ.get(k)}


@ray.remote(concurrency_groups={"work": WORK_THREADS, "poll": 1})
class EngineActor:
    def __init__(self, spec: WorkSpec, actor_key: str, node: str, hooks: dict[str, str]) -> None:
        from upg_batch.engine import Engine

        m = spec.cfg.model
        self.spec = spec
        self.actor_key = actor_key
        self.hooks = hooks
        self.node = node  # node_label() of the node the driver pinned this actor to
        self._lock = threading.Lock()
        self._current: list[int] = []  # shards running now
        # A model that does not load is reported by ready() as a plain message, rather than
        # as an actor creation failure wrapped in Ray's formatting.
        self.load_error: str | None = None
        try:
            self.engine = Engine(m.path, **m.engine_kwargs())
            self.prompting = Prompting(self.engine, load_chat_template(m.path))
        except Exception as e:  # EngineError, OSError, a bad chat template, ...
            self.load_error = f"{type(e).__name__}: {e}"

    @ray.method(concurrency_group="poll")
    def ready(self) -> dict[str, Any]:
        if self.load_error is not None:
            return {"node": self.node, "pid": os.getpid(), "error": self.load_error}
        return {"node": self.node, "pid": os.getpid(), "info": self.engine.info}

    @ray.method(concurrency_group="work")
    def run_shard(self, shard: Shard, attempt: int) -> ShardResult:
        from upg_batch.engine import SamplingParams

        with self._lock:
            self._current.append(shard.index)
        try:
            self._apply_hooks(shard, attempt)
            result = run_rows(self.engine, self.prompting, shard, self.spec, SamplingParams)
            result.attempt = attempt
            result.node = self.node
            result.actor_key = self.actor_key
            return result
        finally:
            with self._lock:
                self._current.remove(shard.index)

    @ray.method(concurrency_group="poll")
    def stats(self) -> dict[str, Any]:
        """Live engine stats, plus max_batch and the shards running now (oldest first)."""
        stats: dict[str, Any] = dict(self.engine.stats())
        stats["max_batch"] = self.spec.cfg.model.max_batch
        with self._lock:
            stats["shards"] = list(self._current)
        return stats

    def _apply_hooks(self, shard: Shard, attempt: int) -> None:
        crash = self.hooks.get("UPG_BATCH_TEST_CRASH")
        if crash:
            index, _, only = crash.partition("@")
            if int(index) == shard.index and (not only or int(only) == attempt):
                os._exit(17)
        stop = self.hooks.get("UPG_BATCH_TEST_STOP")
        if stop:
            which, _, pidfile = stop.partition(":")
            index, _, only = which.partition("@")
            if int(index) == shard.index and int(only or 1) == attempt:
                Path(pidfile).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGSTOP)
        delay = float(self.hooks.get("UPG_BATCH_TEST_SHARD_DELAY_S", 0) or 0)
        if delay > 0:
            time.sleep(delay)
