"""Kill soak: one job of many small shards, its driver SIGKILLed again and again at random
moments (each time `run` starts again and resumes), then run to the end; the result must hold
every input id exactly once, only committed files and the manifest, and equal an uninterrupted
run of the same job. Driver RSS is sampled at every kill.

    python scripts/kill_soak.py --kills 100 --rows 2000 --shard-rows 4 --json soak.json

Each run is `python -m upg_batch run` in its own session (so the private Ray it starts dies
with it); a kill comes at a uniformly random moment between 0.5 and --max-delay seconds after
the run starts, so it lands in Ray's start, the model load, a shard, a commit (the commit log
line, the snapshot compaction) or the end. A bounded variant runs in the tests
(tests/test_kill_soak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "configs" / "demo" / "model"


def write_job(work: Path, out: Path, rows: int, shard_rows: int) -> Path:
    data = work / "data.parquet"
    prompts = [f"row {i}: the quick brown fox {i % 17}" for i in range(rows)]
    pq.write_table(pa.table({"id": list(range(rows)), "prompt": prompts}), data, row_group_size=64)
    job = {
        "model": {"path": str(MODEL), "max_batch": 16, "threads": 1},
        "input": {"path": str(data), "id_column": "id", "shard_rows": shard_rows},
        "output": {"path": str(out)},
        "sampling": {"max_tokens": 8, "temperature": 0.0},
        "metrics": {"port": 0},
        "progress": {"bar": "off", "log_interval_s": 3600},
    }
    path = work / f"job-{out.name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def start(job: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("UPG_BATCH_TEST_SHARD_DELAY_S", "0.02")  # shards of >= 20 ms: kills land mid-job
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "upg_batch", "run", str(job)], stdout=f, stderr=f, env=env, start_new_session=True)


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def check(out: Path, want: pa.Table, rows: int) -> dict:
    """A complete output folder against the uninterrupted run's rows."""
    got = ds.dataset(str(out), format="arrow").to_table().sort_by("id")
    ids = got.column("id").to_pylist()
    files = os.listdir(out)
    stray = sorted(f for f in files if not (f.startswith("part-") or f in ("_SUCCESS", "_manifest.json", ".upg-batch.lock")))
    return {
        "rows_lost": len(set(range(rows)) - set(ids)),
        "rows_duplicated": len(ids) - len(set(ids)),
        "stray_files": stray,
        "equal_to_uninterrupted_run": got.equals(want),
        "runs": json.loads((out / "_manifest.json").read_text()).get("runs"),
    }


def run_to_end(job: Path, log: Path) -> None:
    proc = start(job, log)
    code = proc.wait(timeout=1800)
    kill_group(proc)
    if code != 0:
        raise SystemExit(f"{job.name}: a run exited {code}; see {log}")


def soak(kills: int, rows: int, shard_rows: int, max_delay: float, seed: int, work: Path) -> dict:
    """Kill runs of one job until `kills` kills; whenever the job completes (a run finished
    before its kill, or the last run), check the folder and start the job over."""
    rng = random.Random(seed)
    log = work / "soak.log"
    ref_out = work / "ref"
    run_to_end(write_job(work, ref_out, rows, shard_rows), log)
    want = ds.dataset(str(ref_out), format="arrow").to_table().sort_by("id")
    out = work / "out"
    job = write_job(work, out, rows, shard_rows)
    killed, rss, cycles = 0, [], []
    t0 = time.monotonic()
    while killed < kills:
        proc = start(job, log)
        time.sleep(rng.uniform(0.5, max_delay))
        if proc.poll() is not None:  # the job completed before the kill: check it, start over
            if proc.returncode != 0:
                raise SystemExit(f"a run exited {proc.returncode}; see {log}")
            kill_group(proc)
            cycles.append(check(out, want, rows))
            shutil.rmtree(out)
            continue
        rss.append(rss_mib(proc.pid))
        proc.send_signal(signal.SIGKILL)  # the driver alone, as a crash would
        proc.wait()
        kill_group(proc)  # then the Ray it started
        killed += 1
    run_to_end(job, log)
    cycles.append(check(out, want, rows))
    rss = [r for r in rss if r]
    return {
        "kills": killed,
        "rows": rows,
        "shards": -(-rows // shard_rows),
        "jobs_completed_and_checked": len(cycles),
        "runs_per_job": [c["runs"] for c in cycles],
        "rows_lost": sum(c["rows_lost"] for c in cycles),
        "rows_duplicated": sum(c["rows_duplicated"] for c in cycles),
        "stray_files": sorted({f for c in cycles for f in c["stray_files"]}),
        "every_job_equal_to_uninterrupted_run": all(c["equal_to_uninterrupted_run"] for c in cycles),
        "driver_rss_mib_at_kills": {"min": round(min(rss), 1), "max": round(max(rss), 1)} if rss else None,
        "soak_s": round(time.monotonic() - t0, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--shard-rows", type=int, default=4)
    ap.add_argument("--max-delay", type=float, default=12.0, help="latest kill, in seconds after a run starts")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kill-soak-"))
    try:
        report = soak(args.kills, args.rows, args.shard_rows, args.max_delay, args.seed, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    ok = report["rows_lost"] == report["rows_duplicated"] == 0 and report["every_job_equal_to_uninterrupted_run"] and not report["stray_files"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
