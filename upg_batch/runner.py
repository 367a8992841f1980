"""The driver: plan, start engine actors, hand out shards, commit results, recover, summarize.

Only the driver commits, and only the result of an attempt it is still waiting for: when it
gives up on an attempt (its actor died or timed out) the attempt's ref is dropped, so a
late result can never be committed (G3). Every wait is `ray.wait` with a timeout, so a
dead actor or node never hangs the job.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, TextIO

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from upg_batch import budget, reap
from upg_batch.actor import test_hooks_from_env
from upg_batch.chat import ChatTemplateError, is_gguf_file, load_chat_template
from upg_batch.cluster import Slot, connect, kill_actor, no_slots_message, node_alive, plan_slots, shared_gpu_warnings, start_actor
from upg_batch.commit import CommitError, Committer
from upg_batch.config import JobConfig, extra_output_columns
from upg_batch.fingerprint import digest_inputs, fingerprint_inputs
from upg_batch.ids import scan_ids
from upg_batch.plan import DatasetError, Plan, make_plan
from upg_batch.progress import Progress, format_summary
from upg_batch.rows import ShardResult, WorkSpec, error_batch, output_schema

__all__ = ["JobError", "MetricsPortError", "ModelError", "Runner", "run_job"]

log = logging.getLogger("upg_batch")

# A shard whose result is lost (not charged to it) runs again at most this many times
# cluster.max_attempts before its rows become error rows.
LOST_FACTOR = 3


class JobError(RuntimeError):
    """The job could not finish (every actor died, ...)."""


class ModelError(JobError):
    """The model does not load (on any node): a bad job, found before any work."""


class MetricsPortError(JobError):
    """The metrics endpoint cannot listen where the config says: a bad job."""


def _job_metrics(cfg: JobConfig) -> Any:
    try:
        from upg_batch.metrics import JobMetrics
    except ModuleNotFoundError as e:  # observability not installed yet: keep the calls, serve nothing
        if e.name != "upg_batch.metrics":
            raise
        return _NoMetrics()
    return JobMetrics(model=Path(cfg.model.path).name, host=cfg.metrics.host, port=cfg.metrics.port or 0)


class _NoMetrics:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def check_model_dir(cfg: JobConfig) -> None:
    p = Path(cfg.model.path)
    if is_gguf_file(p):
        return
    if not p.exists():
        raise ModelError(f"model.path {p}: no such file or folder (expected a Hugging Face model folder, a GGUF file, or a hub id ORG/NAME in the local cache)")
    if not (p / "config.json").is_file():
        raise ModelError(f"model.path {p}: no config.json there (expected a Hugging Face model folder or a GGUF file)")


def check_chat_template(cfg: JobConfig) -> Any:
    """The model's chat template, loaded on the driver before any work: a malformed
    tokenizer_config.json or template is a bad job (ModelError naming the file)."""
    try:
        return load_chat_template(cfg.model.path)
    except ChatTemplateError as e:
        raise ModelError(f"model.path {cfg.model.path}: {e}") from None


class Runner:
    def __init__(self, cfg: JobConfig, overwrite: bool = False, stream: TextIO | None = None) -> None:
        self.cfg = cfg
        self.overwrite = overwrite
        self.stream = stream
        self.plan: Plan | None = None

    # -- the whole job ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the job to the end; returns the summary. Raises ConfigError / DatasetError /
        OutputError / JobError for a job that cannot run."""
        t_start = time.monotonic()
        cfg = self.cfg
        check_model_dir(cfg)
        check_chat_template(cfg)
        plan = self.plan = make_plan(cfg)
        if cfg.input.unique_ids:
            ids = scan_ids(plan)
            if ids is not None and not ids.ok:
                raise DatasetError(f"{ids.message()}; input.unique_ids is set")
        inputs = fingerprint_inputs(cfg, plan)
        committer = Committer(
            cfg.output.path, digest_inputs(inputs), len(plan.shards), cfg.output.format, overwrite=self.overwrite, inputs=inputs, model_name=Path(cfg.model.path).name
        )
        try:
            # an earlier run of this folder killed with its private Ray: stop what is left of it
            note = committer.read_lock_note()
            if note is not None and reap.reap_dead_session(note) is not None:
                committer.write_lock_note(None)
            if committer.complete and committer.summary is not None:
                # nothing to run: the folder holds the whole job; its stored summary answers
                committer.repair_complete()
                return {**committer.summary, "already_complete": True}
            skipped = sum(committer.is_committed(s.index) for s in plan.shards)
            todo = [s for s in plan.shards if not committer.is_committed(s.index)]
            spec = WorkSpec(cfg, plan.columns, output_schema(plan.id_type, list(zip(plan.columns.passthrough, plan.passthrough_types)), extra_output_columns(cfg)))
            stats = _RunStats()
            metrics = _job_metrics(cfg)
            try:
                metrics.start()
            except OSError as e:
                from upg_batch.metrics import port_message

                raise MetricsPortError(port_message(cfg.metrics.host, cfg.metrics.port, e)) from None
            try:
                if todo:
                    started_ray = connect(cfg.cluster, note=committer.write_lock_note)
                    try:
                        stats = _Loop(self, plan, spec, committer, metrics, todo).run()
                    finally:
                        if started_ray:
                            ray.shutdown()
                            _sweep_own_session(committer)
                budget.check(committer, plan.total_rows, cfg.max_error_fraction, final=True)
                summary = self._summary(plan, committer, stats, skipped, time.monotonic() - t_start)
                if not todo:
                    committer.begin()
                committer.finish(summary)
            finally:
                metrics.stop()
        except CommitError as e:  # the output folder failed under the run: a started job that cannot finish
            raise JobError(str(e)) from None
        finally:
            committer.close()
        return summary

    def _summary(self, plan: Plan, committer: Committer, st: "_RunStats", skipped: int, wall_s: float) -> dict[str, Any]:
        entries = committer.shards.values()
        rows_run = sum(v["rows"] for v in st.nodes.values()) or 1
        return {
            "status": "complete",
            "rows_total": plan.total_rows,
            "rows_ok": sum(e["ok"] for e in entries),
            "rows_error": sum(e["errors"] for e in entries),
            "shards_total": len(plan.shards),
            "shards_skipped": skipped,
            "shards_run": st.shards,
            "shards_failed": st.failed,
            "actor_restarts": st.restarts,
            "prompt_tokens": st.prompt_tokens,
            "completion_tokens": st.completion_tokens,
            "wall_s": round(wall_s, 3),
            "processing_s": round(st.processing_s, 3),
            "tokens_per_s": st.completion_tokens / st.processing_s if st.processing_s > 0 else 0.0,
            "nodes": {node: {**v, "share": v["rows"] / rows_run, "engine": st.engines.get(node)} for node, v in st.nodes.items()},
            "output": str(self.cfg.output.path),
        }


def _sweep_own_session(committer: Committer) -> None:
    """After ray.shutdown() of the private Ray this run started: stop any of its processes
    still there (none, normally), then clear the lock file's note of it."""
    note = committer.read_lock_note()
    if note is not None and note.get("owner_pid") == os.getpid():
        left = reap.reap_session(note)
        if left:
            log.debug("stopped %d Ray processes still running after shutdown: %s", len(left), left)
        committer.write_lock_note(None)


class _RunStats:
    def __init__(self) -> None:
        self.shards = 0
        self.failed = 0
        self.restarts = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.processing_s = 0.0
        self.nodes: dict[str, dict[str, int]] = {}
        # node -> the engine its actors run, e.g. "cpu (avx2+fma+f16c)" or "gpu (NVIDIA H100, Vulkan)"
        self.engines: dict[str, str] = {}

    def add(self, node: str, rows: int, tokens: int) -> None:
        n = self.nodes.setdefault(node, {"shards": 0, "rows": 0, "completion_tokens": 0})
        n["shards"] += 1
        n["rows"] += rows
        n["completion_tokens"] += tokens


def describe_engine(info: dict[str, Any]) -> str:
    """What an actor's engine runs on, from `Engine.info`: the backend and its device."""
    if info.get("backend") == "gpu":
        return f"gpu ({info.get('adapter')}, {info.get('gpu_api')})"
    return f"{info.get('backend')} ({info.get('simd')}, {info.get('threads')} threads)"


class _Loop:
    """The scheduling loop of one run."""

    def __init__(self, runner: Runner, plan: Plan, spec: WorkSpec, committer: Committer, metrics: Any, todo: list[Any]) -> None:
        self.cfg = runner.cfg
        self.cl = runner.cfg.cluster
        self.plan = plan
        self.spec = spec
        self.committer = committer
        self.metrics = metrics
        self.pending = collections.deque(s.index for s in todo)
        self.failures: dict[int, int] = collections.Counter()
        # results lost in transit (not the shard's fault, so not charged), bounded per shard
        self.lost: dict[int, int] = collections.Counter()
        self.attempts: dict[int, int] = collections.Counter()
        self.inflight: dict[Any, tuple[Slot, int, int]] = {}  # ref -> (slot, shard, attempt)
        # Shards that may have killed an actor: each runs alone on its actor, so if it kills
        # one again the blame is certain (a threaded actor may run queued calls out of order).
        self.suspects: set[int] = set()
        self.hooks = test_hooks_from_env()
        self.stats = _RunStats()
        done_rows = committer.rows_committed
        pcfg = runner.cfg.progress
        self.progress = Progress(plan.total_rows, done_rows, pcfg.bar, pcfg.log_interval_s, runner.stream)
        self.metrics.set_rows(plan.total_rows, done_rows)
        self.slots: list[Slot] = []

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> _RunStats:
        try:
            self._start_actors()
            t0 = time.monotonic()
            while self.pending or self.inflight:
                self._dispatch()
                self._update_shard_gauges()
                refs = list(self.inflight) + [s.ready_ref for s in self.slots if s.state == "starting"]
                refs += [s.stats_ref for s in self.slots if s.stats_ref is not None]
                if not refs:
                    raise JobError(self._no_actor_message())
                ready, _ = ray.wait(refs, num_returns=1, timeout=min(1.0, self.cfg.metrics.poll_interval_s))
                for ref in ready:
                    self._handle(ref)
                self._poll_stats()
                self._check_timeouts()
                self.progress.tick()
            self.stats.processing_s = time.monotonic() - t0
            self._final_stats_poll()
            self._update_shard_gauges()
            return self.stats
        finally:
            self.progress.close()
            for s in self.slots:
                kill_actor(s)

    def _start_actors(self) -> None:
        self.slots = plan_slots(self.cl)
        if not self.slots:
            raise JobError(no_slots_message(self.cl))
        for warning in shared_gpu_warnings(self.slots, self.cfg.model.backend):
            log.warning("%s", warning)
        now = time.monotonic()
        for slot in self.slots:
            start_actor(slot, self.cl, self.spec, self.hooks, now)
        # A bad model fails here, before any shard runs: wait until every actor loaded it
        # or failed (bounded by actor_start_timeout_s).
        while any(s.state == "starting" for s in self.slots):
            refs = [s.ready_ref for s in self.slots if s.state == "starting"]
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            for ref in ready:
                self._handle(ref)
            self._check_timeouts()
        if not any(s.state == "ready" for s in self.slots):
            raise ModelError(self._no_actor_message())
        self.committer.begin()

    def _no_actor_message(self) -> str:
        causes = sorted({s.last_error for s in self.slots if s.last_error})
        return "no engine actor could run: " + ("; ".join(causes) if causes else "no actor is alive")

    def _slot_of_ready(self, ref: Any) -> Slot | None:
        for s in self.slots:
            if s.ready_ref is not None and s.ready_ref == ref:
                return s
        return None

    def _handle(self, ref: Any) -> None:
        if ref in self.inflight:
            self._handle_shard(ref)
            return
        slot = self._slot_of_ready(ref)
        if slot is not None:
            slot.ready_ref = None
            try:
                info = ray.get(ref, timeout=10)
            except (RayError, GetTimeoutError) as e:
                # A process killed while it loaded the model (OOM killer, SIGKILL) is restarted
                # like any dead actor; an actor whose __init__ raised is a bad job, given up.
                died = isinstance(e, RayActorError) and not e.actor_init_failed
                self._actor_gone(slot, f"engine actor failed to start on {slot.node}: {_cause(e)}", starting=not died)
                return
            if info.get("error"):
                self._actor_gone(slot, f"the model does not load on {slot.node}: {info['error']}", starting=True)
                return
            slot.state = "ready"
            slot.node = info["node"]
            self.stats.engines[slot.node] = describe_engine(info["info"])
            log.debug("actor %s ready on %s (pid %s)", slot.key, slot.node, info["pid"])
            return
        for slot in self.slots:
            if slot.stats_ref is not None and slot.stats_ref == ref:
                slot.stats_ref = None
                try:
                    st = ray.get(ref, timeout=10)
                except (RayError, GetTimeoutError):
                    return  # a dead actor shows through its shard calls
                running = st.pop("shards", [])
                # the shard it would die on, when only one runs (several: none can be blamed)
                slot.current = running[0] if len(running) == 1 else None
                self.metrics.observe_engine_stats(slot.node, slot.key, st)
                return

    # -- shards ----------------------------------------------------------------------------
    def _dispatch(self) -> None:
        now = time.monotonic()
        # fill the least busy actors first so every node gets work
        for slot in sorted((s for s in self.slots if s.state == "ready"), key=lambda s: len(s.queue)):
            while self.pending and len(slot.queue) < self.cl.shards_in_flight:
                index = self._next_for(slot)
                if index is None:
                    break
                self.attempts[index] += 1
                ref = slot.handle.run_shard.remote(self.plan.shards[index], self.attempts[index])
                if not slot.queue:
                    slot.head_since = now
                slot.queue.append(ref)
                self.inflight[ref] = (slot, index, self.attempts[index])

    def _next_for(self, slot: Slot) -> int | None:
        """The next pending shard for `slot`: a suspect only to an idle actor, nothing
        more to an actor running a suspect."""
        if not slot.queue:
            return self.pending.popleft()
        if any(self.inflight[r][1] in self.suspects for r in slot.queue):
            return None
        for i, index in enumerate(self.pending):
            if index not in self.suspects:
                del self.pending[i]
                return index
        return None

    def _drop(self, ref: Any) -> tuple[Slot, int, int]:
        slot, index, attempt = self.inflight.pop(ref)
        if ref in slot.queue:
            head = slot.queue[0] == ref
            slot.queue.remove(ref)
            if head:
                slot.head_since = time.monotonic()
        return slot, index, attempt

    def _handle_shard(self, ref: Any) -> None:
        slot = self.inflight[ref][0]
        try:
            result: ShardResult = ray.get(ref, timeout=60)
        except RayActorError as e:
            self._actor_gone(slot, f"engine actor on {slot.node} died: {_cause(e)}")
            return
        except RayTaskError as e:  # the shard raised inside a live actor
            _, index, _ = self._drop(ref)
            self._shard_failed(index, f"shard failed on {slot.node}: {_cause(e)}")
            return
        except (RayError, GetTimeoutError) as e:  # e.g. the result object was lost with its node
            _, index, _ = self._drop(ref)
            self._shard_failed(index, f"shard result lost on {slot.node}: {_cause(e)}", charge=False)
            return
        self._commit_result(ref, result)

    def _commit_result(self, ref: Any, result: ShardResult) -> None:
        """Commit a finished attempt the driver is still waiting for."""
        slot, index, _ = self._drop(ref)
        info = {
            "ok": result.ok,
            "errors": result.errors,
            "node": result.node,
            "attempt": result.attempt,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "generate_s": round(result.generate_s, 4),
        }
        if result.error_kinds:
            info.update(error_kinds=result.error_kinds, error_examples=result.error_examples)
        seconds = self.committer.commit(index, result.batch, info)
        self.suspects.discard(index)
        self.metrics.observe_commit(seconds)
        self.metrics.observe_completions(result.node, result.ttfts, result.latencies)
        self.metrics.rows_done("ok", result.ok)
        self.metrics.rows_done("error", result.errors)
        self.stats.shards += 1
        self.stats.prompt_tokens += result.prompt_tokens
        self.stats.completion_tokens += result.completion_tokens
        self.stats.add(result.node, result.batch.num_rows, result.completion_tokens)
        self.progress.update(result.batch.num_rows, result.completion_tokens)
        self._after_rows()
        slot.last_poll = 0.0  # poll the engine's counters right after a shard

    def _after_rows(self) -> None:
        self.metrics.set_rows(self.plan.total_rows, self.committer.rows_committed)
        budget.check(self.committer, self.plan.total_rows, self.cfg.max_error_fraction)

    def _shard_failed(self, index: int, cause: str, charge: bool = True) -> None:
        """An attempt of shard `index` failed: try again, or after max_attempts commit its
        rows as error rows naming the cause. An uncharged failure (its result was lost, not
        its fault) is retried up to LOST_FACTOR x max_attempts times, then ends the same way."""
        shard = self.plan.shards[index]
        if charge:
            self.failures[index] += 1
            self.suspects.add(index)
            over = self.failures[index] >= self.cl.max_attempts
            message = f"shard {shard.name} failed {self.failures[index]} times; last cause: {cause}"
        else:
            self.lost[index] += 1
            over = self.lost[index] >= LOST_FACTOR * self.cl.max_attempts
            message = f"shard {shard.name}: its result was lost {self.lost[index]} times; last cause: {cause}"
        if not over:
            if charge:
                log.warning("%s; shard %d goes back to the queue (attempt %d of %d failed)", cause, index, self.failures[index], self.cl.max_attempts)
            else:
                log.warning("%s; shard %d goes back to the queue (result lost %d times, at most %d)", cause, index, self.lost[index], LOST_FACTOR * self.cl.max_attempts)
            self.pending.appendleft(index)
            return
        log.error("%s; its %d rows become error rows", message, shard.rows)
        batch = error_batch(shard, self.spec, message)
        examples = {"shard_failed": {"id": shard.name, "error": message[:300]}}
        info = {"ok": 0, "errors": shard.rows, "node": None, "attempt": self.attempts[index], "failed": True}
        seconds = self.committer.commit(index, batch, {**info, "error_kinds": {"shard_failed": shard.rows}, "error_examples": examples})
        self.suspects.discard(index)
        self.metrics.observe_commit(seconds)
        self.metrics.rows_done("error", shard.rows)
        self.stats.failed += 1
        self.progress.update(shard.rows, 0)
        self._after_rows()

    # -- actors ----------------------------------------------------------------------------
    def _actor_gone(self, slot: Slot, cause: str, starting: bool = False) -> None:
        """The slot's actor died (or hangs): results it returned are committed, its other
        shards go back to the queue, the one it died on charged with a failed attempt; then
        the actor restarts on its node, a bounded number of times."""
        log.warning("%s", cause)
        # Results the actor returned before it died are whole: commit them, so neither their
        # work is lost nor are they blamed.
        if slot.queue:
            done, _ = ray.wait(list(slot.queue), num_returns=len(slot.queue), timeout=0)
            for ref in [r for r in slot.queue if r in done]:
                try:
                    result = ray.get(ref, timeout=10)
                except (RayError, GetTimeoutError):
                    continue
                self._commit_result(ref, result)
        left = [self.inflight[r][1] for r in slot.queue]
        for ref in list(slot.queue):
            self._drop(ref)
        # The shard it died on: the only one left, or the one its last stats poll said was
        # running (unfinished, so still running when it died). Otherwise unknown: all of them
        # become suspects and run alone from now on, none charged.
        culprit = left[0] if len(left) == 1 else (slot.current if slot.current in left else None)
        if culprit is None:
            self.suspects.update(left)
        for index in reversed(left):  # back to the front of the queue, in order
            if index != culprit:
                self.pending.appendleft(index)
        if culprit is not None:
            self._shard_failed(culprit, cause)
        kill_actor(slot)
        slot.last_error = cause
        self.metrics.forget_actor(slot.key)
        slot.ready_ref, slot.stats_ref = None, None
        if slot.gen < self.cl.max_actor_restarts and node_alive(slot.node_id) and not (starting and slot.gen == 0):
            slot.gen += 1
            self.stats.restarts += 1
            self.metrics.actor_restarted(slot.node, slot.key)
            start_actor(slot, self.cl, self.spec, self.hooks, time.monotonic())
        else:
            slot.state = "dead"
            slot.queue = []

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == "starting" and now - slot.started_at > self.cl.actor_start_timeout_s:
                self._actor_gone(slot, f"engine actor on {slot.node} did not start within {self.cl.actor_start_timeout_s:.0f}s", starting=True)
            elif slot.state == "ready" and slot.queue and self.cl.shard_timeout_s is not None and now - slot.head_since > self.cl.shard_timeout_s:
                self._actor_gone(slot, f"shard on {slot.node} ran longer than cluster.shard_timeout_s ({self.cl.shard_timeout_s:.0f}s)")

    def _poll_stats(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == "ready" and slot.stats_ref is None and now - slot.last_poll >= self.cfg.metrics.poll_interval_s:
                slot.last_poll = now
                slot.stats_ref = slot.handle.stats.remote()

    def _final_stats_poll(self) -> None:
        """One last stats() from every live actor, so the exported token counters end equal
        to the committed totals (polls otherwise happen every poll_interval_s)."""
        live = {s.handle.stats.remote(): s for s in self.slots if s.state == "ready"}
        if not live:
            return
        # one wait for all of them (10 s in all, not per actor); those not ready are skipped
        ready, _ = ray.wait(list(live), num_returns=len(live), timeout=10.0)
        for ref in ready:
            slot = live[ref]
            try:
                self.metrics.observe_engine_stats(slot.node, slot.key, ray.get(ref, timeout=1.0))
            except Exception as e:  # a dying actor's last numbers are not worth failing the job
                log.debug("final stats poll of %s failed: %s", slot.node, e)

    def _update_shard_gauges(self) -> None:
        # An actor runs the oldest call of its queue; the others wait their turn.
        # The states partition the shards: committed counts those that did not fail;
        # failed counts every shard the manifest records as failed (earlier runs included).
        running = sum(1 for s in self.slots if s.state == "ready" and s.queue)
        failed = self.committer.failed_shards
        self.metrics.set_shards(
            pending=len(self.pending) + max(0, len(self.inflight) - running),
            running=running,
            committed=len(self.committer.shards) - failed,
            failed=failed,
        )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _cause(e: BaseException) -> str:
    """A one-line reason from a Ray exception (the innermost cause when there is one)."""
    cause = getattr(e, "cause", None)
    if isinstance(e, RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {' '.join(str(cause).split())}"
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip() and set(ln.strip()) != {"^"}]
    if not lines:
        return type(e).__name__
    # Ray puts the traceback's last line (the error itself) at the end of multi-line messages
    return f"{type(e).__name__}: {lines[-1] if len(lines) > 1 else lines[0]}"


def run_job(cfg: JobConfig, overwrite: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Run a job and log its summary; returns the summary dict."""
    summary = Runner(cfg, overwrite=overwrite, stream=stream).run()
    log.info("%s", format_summary(summary))
    return summary
