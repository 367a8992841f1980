"""Kill soak: one job of many small shards, its driver SIGKILLed again and again (each time
`run` starts again and resumes), its engine actors SIGKILLed while the driver runs on, and a
node removed from a multi-node local cluster mid-job; then run to the end. Every completed job
must hold every input id exactly once, only committed files, the manifest and _SUCCESS, and
equal an uninterrupted greedy run of the same job. Driver and actor RSS are sampled throughout.

    python scripts/kill_soak.py --kills 100 --boundary-kills 45 --actor-kills 30 \\
        --node-removals 6 --rows 2000 --cluster-rows 480 --shard-rows 4 --json soak.json

Driver kills (a run is `python -m upg_batch run` in a session of its own):
  random     at a uniformly random moment 0.5..--max-delay s after the run starts: Ray's start,
             the model load, a shard, a commit, the end
  log_line   right after the commit log grows to its n-th line of the run (n in 1..40): a
             commit point just passed
  part_file  right after a new part file appears: between its rename and its log line, or
             just after that line
  snapshot   right after the snapshot manifest is replaced: when the run begins (the earlier
             runs' log folded in, the log not yet removed), or at the end (the job marked
             complete, _SUCCESS not yet written)
The watcher polls the output folder every millisecond; a kill found a part file on disk that
the manifest does not record (or a temporary file) counts as landed inside a commit.

Actor kills: one engine actor of the run (a ray::EngineActor process whose parent is the run's
raylet) SIGKILLed at a random moment, the driver going on; half of them in runs that are then
left to finish (the run completes with a restarted actor), half in runs later killed too.

Node removals: a local cluster of three nodes (ray.cluster_utils, on 127.0.0.1); a job on it
(`cluster.address`) has a worker node removed (its raylet killed) right after its n-th commit,
a fresh node added, and the run finishes, or every other time its driver is SIGKILLed 0.3-2 s later
and `run` again finishes it.

After a driver kill the private Ray it started is not cleaned up by this script: the next run
of the folder must stop what is left (upg_batch/reap.py); processes of a killed run's session
still alive 10 s into a later run are counted. A bounded variant runs in the tests
(tests/test_kill_soak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "configs" / "demo" / "model"
KEEP = ("_SUCCESS", "_manifest.json", ".upg-batch.lock")
REAP_BOUND_S = 10.0  # a later run must have stopped a killed run's Ray processes by then
FLAT_RATIO = 1.15  # RSS "flat": max of the last quarter <= this x max of the first quarter


# -- processes -----------------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session id, start ticks) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rfind(")") + 2 :].split()
    return None if f[0] == "Z" else (int(f[1]), int(f[3]), int(f[19]))


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmd(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def local_raylets(driver: int) -> set[int]:
    """The raylet of the private Ray a driver started (its child)."""
    return {p for p in _pids() if (st := _stat(p)) and st[0] == driver and _cmd(p).split(b"\0")[0].endswith(b"/raylet")}


def engine_actors(raylets: set[int], since: int) -> list[int]:
    """Engine actor processes of these raylets started at or after `since` (start ticks)."""
    return [p for p in _pids() if (st := _stat(p)) and st[0] in raylets and st[2] >= since and _cmd(p).startswith(b"ray::EngineActor")]


def session_alive(sid: int) -> list[int]:
    return [p for p in _pids() if (st := _stat(p)) and st[1] == sid]


def kill_session(sid: int) -> None:
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in session_alive(sid):  # pgids the session's processes set themselves
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Sampler(threading.Thread):
    """RSS of the current run's driver and engine actors every `every` seconds."""

    def __init__(self, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.every, self.t0, self.samples = every, time.monotonic(), []  # (t, role, pid, MiB)
        self.driver: int | None = None
        self.raylets: set[int] | None = None  # None: the driver's own (a private Ray)
        self.since = 0
        self.halt = threading.Event()

    def actors(self) -> list[int]:
        d = self.driver
        if d is None:
            return []
        return engine_actors(self.raylets if self.raylets is not None else local_raylets(d), self.since)

    def run(self) -> None:
        while not self.halt.wait(self.every):
            d, t = self.driver, time.monotonic() - self.t0
            for role, pids in (("driver", [d] if d else []), ("actor", self.actors())):
                for p in pids:
                    if (r := rss_mib(p)) is not None:
                        self.samples.append((t, role, p, r))

    def report(self) -> dict:
        out = {}
        end = max((s[0] for s in self.samples), default=0.0)
        for role in ("driver", "actor"):
            s = [x for x in self.samples if x[1] == role]
            if not s:
                continue
            first = max((x[3] for x in s if x[0] <= end / 4), default=0.0)
            last = max((x[3] for x in s if x[0] >= 3 * end / 4), default=0.0)
            per_pid: dict[int, list] = {}
            for x in s:
                per_pid.setdefault(x[2], []).append(x)
            longest = max(per_pid.values(), key=lambda v: v[-1][0] - v[0][0])
            a, b = longest[0][0], longest[-1][0]
            out[role] = {
                "samples": len(s),
                "processes": len(per_pid),
                "min": round(min(x[3] for x in s), 1),
                "max": round(max(x[3] for x in s), 1),
                "max_first_quarter_of_soak": round(first, 1),
                "max_last_quarter_of_soak": round(last, 1),
                "last_over_first": round(last / first, 3) if first else None,
                "longest_process_s": round(b - a, 1),
                "longest_process_max_first_quarter": round(max(x[3] for x in longest if x[0] <= a + (b - a) / 4), 1),
                "longest_process_max_last_quarter": round(max(x[3] for x in longest if x[0] >= a + 3 * (b - a) / 4), 1),
            }
            out[role]["flat"] = bool(first) and last <= FLAT_RATIO * first
        return out


# -- the job -------------------------------------------------------------------------------
def write_data(work: Path, rows: int) -> Path:
    data = work / f"data-{rows}.parquet"
    prompts = [f"row {i}: the quick brown fox {i % 17}" for i in range(rows)]
    pq.write_table(pa.table({"id": list(range(rows)), "prompt": prompts}), data, row_group_size=64)
    return data


def write_job(work: Path, out: Path, data: Path, shard_rows: int, address: str | None = None) -> Path:
    job = {
        "model": {"path": str(MODEL), "max_batch": 16, "threads": 1},
        "input": {"path": str(data), "id_column": "id", "shard_rows": shard_rows},
        "output": {"path": str(out)},
        "sampling": {"max_tokens": 8, "temperature": 0.0},
        "metrics": {"port": 0},
        "progress": {"bar": "off", "log_interval_s": 3600},
    }
    if address:
        job["cluster"] = {"address": address}
    path = work / f"job-{out.name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def start(job: Path, log: Path, summary: Path, shard_delay: float = 0.02) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("UPG_BATCH_TEST_SHARD_DELAY_S", str(shard_delay))  # shards of >= 20 ms: kills land mid-job
    with open(log, "ab") as err, open(summary, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "upg_batch", "run", "--json", str(job)], stdout=out, stderr=err, env=env, start_new_session=True)


def _committed(out: Path) -> set[int]:
    from upg_batch.commit import read_committed

    try:
        return {int(k) for k in read_committed(out)["shards"]}
    except (OSError, ValueError):
        return set()


def check(out: Path, want: pa.Table, rows: int) -> dict:
    """A complete output folder against the uninterrupted run's rows."""
    got = ds.dataset(str(out), format="arrow").to_table().sort_by("id")
    ids = got.column("id").to_pylist()
    files = os.listdir(out)
    manifest = json.loads((out / "_manifest.json").read_text())
    return {
        "rows_lost": len(set(range(rows)) - set(ids)),
        "rows_duplicated": len(ids) - len(set(ids)),
        "stray_files": sorted(f for f in files if not (f.startswith("part-") or f in KEEP)),
        "success_missing": "_SUCCESS" not in files or not manifest.get("complete"),
        "equal_to_uninterrupted_run": got.equals(want),
        "runs": manifest.get("runs"),
        "shards_run_again": sum(1 for e in manifest["shards"].values() if e.get("attempt", 1) > 1),
    }


class Watch:
    """The output folder as a run changes it, polled: has the run begun (its first snapshot
    written), log lines since, part files new since the run started, the job marked complete."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.snap0 = self._ino(out / "_manifest.json")
        self.parts0 = self._parts()
        self.begun = self.complete = False
        self.lines = 0
        self._log_size = -1

    @staticmethod
    def _ino(p: Path) -> int | None:
        try:
            return os.stat(p).st_ino
        except OSError:
            return None

    def _parts(self) -> set[tuple[str, int]]:
        try:
            return {(e.name, e.inode()) for e in os.scandir(self.out) if e.name.startswith("part-")}
        except OSError:
            return set()

    def poll(self, parts: bool = False) -> bool:
        """Update; with `parts`, True when a new part file is there."""
        snap = self._ino(self.out / "_manifest.json")
        if snap is not None and snap != self.snap0:
            self.begun = True
            try:
                self.complete = b'"complete":true' in (self.out / "_manifest.json").read_bytes()
            except OSError:
                pass
            self.snap0 = snap
        if self.begun:
            try:
                size = os.stat(self.out / "_manifest.log").st_size
            except OSError:
                size = 0
            if size != self._log_size:
                self._log_size = size
                try:
                    self.lines = max(self.lines, (self.out / "_manifest.log").read_bytes().count(b"\n"))
                except OSError:
                    pass
        return parts and self.begun and bool(self._parts() - self.parts0)


def inside_a_commit(out: Path) -> bool:
    """What a kill left: a temporary file, or a part file the manifest does not record."""
    names = os.listdir(out)
    done = _committed(out)
    parts = {int(m.group(1)) for n in names if (m := re.match(r"part-(\d+)\.", n))}
    return any(n.startswith(".tmp-") for n in names) or bool(parts - done)


# -- the soak ------------------------------------------------------------------------------
class Soak:
    def __init__(self, work: Path, rows: int, shard_rows: int, max_delay: float, seed: int) -> None:
        self.work, self.rows, self.shard_rows, self.max_delay = work, rows, shard_rows, max_delay
        self.rng = random.Random(seed)
        self.log = work / "soak.log"
        self.summary = work / "summary.json"
        self.data = write_data(work, rows)
        self.sampler = Sampler()
        self.cycles: list[dict] = []
        self.kills = {"random": 0, "log_line": 0, "part_file": 0, "snapshot": 0, "after_node_removal": 0}
        self.n = {"kills_inside_a_commit": 0, "kills_between_complete_snapshot_and_success": 0, "actor_kills": 0, "actor_kills_in_runs_that_completed": 0,
                  "actor_restarts_in_completed_runs": 0, "node_removals": 0,
                  "leftovers_alive_10s_into_a_later_run": 0}
        self.orphans: list[int] = []  # sessions of killed drivers whose private Ray is left to reap
        self.want: pa.Table | None = None

    # one run ---------------------------------------------------------------------------
    def run_once(self, job: Path, out: Path, kill: str | None, actor_at: float | None, raylets: set[int] | None = None,
                 on_commit: tuple[int, object] | None = None, kill_after: float | None = None, shard_delay: float = 0.02) -> subprocess.Popen:
        """Start a run; kill an actor at `actor_at` s; SIGKILL the driver as `kill` says (None:
        let it end); `on_commit` = (n, fn): call fn() once the run's n-th commit is logged, and
        with `kill_after`, SIGKILL the driver that many seconds later. `raylets`: those of a
        cluster the run joins (None: the private Ray the driver starts)."""
        w = Watch(out)
        proc = start(job, self.log, self.summary, shard_delay)
        t0 = time.monotonic()
        self.sampler.raylets, self.sampler.since = raylets, (_stat(proc.pid) or (0, 0, 0))[2]
        self.sampler.driver = proc.pid
        at = self.rng.uniform(0.5, self.max_delay) if kill == "random" else None
        line = self.rng.randint(1, 40) if kill == "log_line" else None
        final = self.rng.random() < 0.5 if kill == "snapshot" else False
        reaped_check = False
        while proc.poll() is None:
            now = time.monotonic() - t0
            hit = w.poll(parts=kill == "part_file")
            if actor_at is not None and now >= actor_at and self._kill_actor():
                actor_at = None
            if on_commit is not None and w.lines >= on_commit[0]:
                on_commit[1]()  # type: ignore[operator]
                on_commit = None
                if kill_after is not None:
                    kill, at = "after_node_removal", now + kill_after
            if not reaped_check and now >= REAP_BOUND_S:
                self._check_orphans()
                reaped_check = True
            if (
                (kill in ("random", "after_node_removal") and now >= at)
                or (kill == "log_line" and w.lines >= line)
                or (kill == "part_file" and hit)
                or (kill == "snapshot" and w.begun and (w.complete or not final))
            ):
                proc.send_signal(signal.SIGKILL)  # the driver alone, as a crash would
                proc.wait()
                self.kills[kill] += 1
                self.n["kills_inside_a_commit"] += inside_a_commit(out)
                self.n["kills_between_complete_snapshot_and_success"] += w.complete and not (out / "_SUCCESS").exists()
                if raylets is None:
                    self.orphans.append(proc.pid)  # its private Ray: the next run's to reap
                else:
                    kill_session(proc.pid)
                break
            time.sleep(0.001)
        self.sampler.driver = None
        if proc.returncode == 0:
            if not reaped_check:
                self._check_orphans()
            self.n["actor_kills_in_runs_that_completed"] += self._actor_killed_in_run
            try:
                summary = json.loads(self.summary.read_text())
            except ValueError:
                raise SystemExit(f"a run exited 0 without its summary: {self.summary.read_text()[:500]!r} " + self.log.read_text()[-3000:]) from None
            self.n["actor_restarts_in_completed_runs"] += summary.get("actor_restarts", 0)
        elif proc.returncode != -signal.SIGKILL:
            raise SystemExit(f"a run exited {proc.returncode}: " + self.log.read_text()[-3000:])
        self._actor_killed_in_run = False
        return proc

    _actor_killed_in_run = False

    def _kill_actor(self) -> bool:
        actors = self.sampler.actors()
        if not actors:
            return False
        os.kill(self.rng.choice(actors), signal.SIGKILL)
        self.n["actor_kills"] += 1
        self._actor_killed_in_run = True
        return True

    def _check_orphans(self) -> None:
        """A killed run's private Ray must be gone once a later run is REAP_BOUND_S in (or done)."""
        for sid in self.orphans:
            left = session_alive(sid)
            self.n["leftovers_alive_10s_into_a_later_run"] += len(left)
            kill_session(sid)
        self.orphans = []

    def complete(self, out: Path, want: pa.Table, rows: int) -> None:
        self.cycles.append({**check(out, want, rows), "phase": out.name})
        shutil.rmtree(out)

    # phases ------------------------------------------------------------------------------
    def reference(self) -> None:
        ref = self.work / "ref"
        proc = self.run_once(write_job(self.work, ref, self.data, self.shard_rows), ref, None, None)
        assert proc.returncode == 0
        self.want = ds.dataset(str(ref), format="arrow").to_table().sort_by("id")

    def local(self, kills: int, boundary: int, actor_kills: int) -> None:
        """The driver kills and actor kills, in a random order, on one job started over each
        time it completes."""
        modes = ["random"] * kills + [("log_line", "part_file", "snapshot")[i % 3] for i in range(boundary)]
        self.rng.shuffle(modes)
        alone = actor_kills - actor_kills // 2  # in runs left to finish; the rest before a driver kill
        with_actor = set(self.rng.sample(range(len(modes)), min(len(modes), actor_kills - alone)))
        plan = [(m, i in with_actor) for i, m in enumerate(modes)] + [(None, True)] * alone
        self.rng.shuffle(plan)
        out = self.work / "out"
        job = write_job(self.work, out, self.data, self.shard_rows)
        for mode, actor in plan:
            while True:
                actor_at = self.rng.uniform(1.0, self.max_delay if mode else 8.0) if actor else None
                before = self.n["actor_kills"]
                proc = self.run_once(job, out, mode, actor_at)
                if proc.returncode == 0:  # the job completed (before the kill, if any): check, start over
                    self.complete(out, self.want, self.rows)
                    if mode is not None or self.n["actor_kills"] == before:
                        continue  # the kill is still to come
                break
        self.run_once(job, out, None, None)
        self.complete(out, self.want, self.rows)
        self._check_orphans()

    def cluster(self, removals: int, rows: int) -> None:
        """Node removals on a three-node local cluster: a worker node removed right after the
        run's n-th commit (and a fresh one added); every other time the driver is SIGKILLed
        0.3-2 s later and `run` again finishes the job. Each job is checked and started over."""
        import ray._private.ray_constants as ray_constants
        from ray.cluster_utils import Cluster

        ray_constants.ENABLE_RAY_CLUSTER = False  # keep 127.0.0.1 (as tests/test_runner_cluster.py)
        args = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
        c = Cluster(initialize_head=True, connect=False, head_node_args={**args, "include_dashboard": False})
        try:
            workers = [c.add_node(**args) for _ in range(2)]
            c.wait_for_nodes(timeout=180)
            want = self.want.filter(pc.less(self.want.column("id"), rows))
            out = self.work / "out-cluster"
            job = write_job(self.work, out, write_data(self.work, rows), self.shard_rows, address=c.address)

            def remove() -> None:
                victim = self.rng.choice(workers)
                workers.remove(victim)
                c.remove_node(victim, allow_graceful=False)
                self.n["node_removals"] += 1

            shards = -(-rows // self.shard_rows)
            def raylets() -> set[int]:
                return {n.all_processes["raylet"][0].process.pid for n in c.list_all_nodes()}

            for r in range(removals):
                kill_after = self.rng.uniform(0.3, 2.0) if r % 2 else None
                at = self.rng.randint(1, max(1, min(20, shards // 4)))  # early: the lost node holds shards
                # shards of >= 0.25 s: the lost node holds some, and the driver kill lands mid-job
                proc = self.run_once(job, out, None, None, raylets(), on_commit=(at, remove), kill_after=kill_after, shard_delay=0.25)
                workers.append(c.add_node(**args))
                c.wait_for_nodes(timeout=180)
                if proc.returncode != 0:
                    self.run_once(job, out, None, None, raylets(), shard_delay=0.25)
                self.complete(out, want, rows)
        finally:
            c.shutdown()


def soak(kills: int, rows: int, shard_rows: int, max_delay: float, seed: int, work: Path, boundary_kills: int = 0,
         actor_kills: int = 0, node_removals: int = 0, cluster_rows: int | None = None) -> dict:
    s = Soak(work, rows, shard_rows, max_delay, seed)
    t0 = time.monotonic()
    s.sampler.start()
    try:
        s.reference()
        if kills or boundary_kills or actor_kills:
            s.local(kills, boundary_kills, actor_kills)
        if node_removals:
            s.cluster(node_removals, cluster_rows or rows)
    finally:
        s.sampler.halt.set()
        for sid in s.orphans:
            kill_session(sid)
    c = s.cycles
    reaped = sum(int(m) for m in re.findall(rb"stopped (\d+) Ray processes left by an earlier run", s.log.read_bytes()))
    return {
        "driver_kills": sum(s.kills.values()),
        "driver_kills_by_moment": s.kills,
        **s.n,
        "ray_processes_of_killed_runs_stopped_by_the_next_run": reaped,
        "rows": rows,
        "shards": -(-rows // shard_rows),
        "jobs_completed_and_checked": len(c),
        "runs_per_job": [x["runs"] for x in c],
        # shards whose committed attempt was not the first (an actor died, a node was lost)
        "shards_run_again": {ph: sum(x["shards_run_again"] for x in c if x["phase"] == ph) for ph in ("out", "out-cluster")},
        "rows_lost": sum(x["rows_lost"] for x in c),
        "rows_duplicated": sum(x["rows_duplicated"] for x in c),
        "stray_files": sorted({f for x in c for f in x["stray_files"]}),
        "jobs_without_success": sum(x["success_missing"] for x in c),
        "every_job_equal_to_uninterrupted_run": all(x["equal_to_uninterrupted_run"] for x in c),
        "rss_mib": s.sampler.report(),
        "soak_s": round(time.monotonic() - t0, 1),
    }


def passed(r: dict) -> bool:
    return (
        r["rows_lost"] == r["rows_duplicated"] == r["jobs_without_success"] == r["leftovers_alive_10s_into_a_later_run"] == 0
        and r["every_job_equal_to_uninterrupted_run"]
        and not r["stray_files"]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100, help="driver kills at uniformly random moments")
    ap.add_argument("--boundary-kills", type=int, default=45, help="driver kills at commit-log boundaries")
    ap.add_argument("--actor-kills", type=int, default=30)
    ap.add_argument("--node-removals", type=int, default=6, help="worker nodes removed from a local cluster, one a run")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--cluster-rows", type=int, default=480)
    ap.add_argument("--shard-rows", type=int, default=4)
    ap.add_argument("--max-delay", type=float, default=12.0, help="latest random kill, in seconds after a run starts")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kill-soak-"))
    try:
        report = soak(args.kills, args.rows, args.shard_rows, args.max_delay, args.seed, work, args.boundary_kills,
                      args.actor_kills, args.node_removals, args.cluster_rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["command"] = " ".join(["python", "scripts/kill_soak.py", *sys.argv[1:]])
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
