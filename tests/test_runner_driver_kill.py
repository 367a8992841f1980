"""The driver is SIGKILLed mid-job; `run` again ends with the output of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, output_files, read_output, write_job, write_prompts

from upg_batch.commit import LOCK, MANIFEST, SUCCESS, OutputError, read_committed
from upg_batch.config import load_config
from upg_batch.runner import Runner


def _committed_shards(out: Path) -> set[int]:
    try:
        return {int(k) for k in read_committed(out)["shards"]}  # the snapshot and the commit log
    except (OSError, ValueError, OutputError):
        return set()


def _committed(out: Path) -> int:
    return len(_committed_shards(out))


def _cli(job: Path, log: Path, **env: str) -> subprocess.Popen:
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "ab") as f:
        # a session of its own, so the local Ray it starts can be cleaned up as a group
        return subprocess.Popen([sys.executable, "-m", "upg_batch", "run", "--json", str(job)], stdout=f, stderr=f, env=full_env, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_driver_after_commits(job: Path, out: Path, log: Path, commits: int = 2, kill_ray: bool = True) -> subprocess.Popen:
    """Runs `job` with shards of >= 1 s, SIGKILLs the driver alone (as a crash would) once
    `commits` shards are committed, then (kill_ray) whatever is left of the Ray it started."""
    proc = _cli(job, log, UPG_BATCH_TEST_SHARD_DELAY_S="1.0")
    try:
        deadline = time.monotonic() + 180
        while _committed(out) < commits and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(1.0)
    finally:
        if kill_ray:
            _kill_group(proc)
    return proc


def test_driver_killed_mid_job_then_run_again(tmp_path: Path, local_ray):
    f = write_prompts(tmp_path / "d.parquet", 64)
    out = tmp_path / "out"
    job = write_job(tmp_path, f, out)  # 8 shards of 8 rows
    log = tmp_path / "log.txt"
    # shards of >= 1 s each: once two committed, seconds of work are left to kill the driver in
    proc = kill_driver_after_commits(job, out, log)
    done = _committed_shards(out)
    done_before = len(done)
    assert 2 <= done_before < 8 and proc.returncode == -signal.SIGKILL, (done, proc.returncode, log.read_text())
    assert not (out / SUCCESS).exists()
    # what a kill during a commit leaves behind: a temp file, a part file not yet in the
    # manifest (of a shard that had not committed)
    victim = max(set(range(8)) - done)
    (out / f".tmp-part-{victim:06d}.arrow.999999").write_bytes(b"half a file")
    (out / f"part-{victim:06d}.arrow").write_bytes(b"renamed but not recorded")

    again = _cli(job, log)
    try:
        assert again.wait(timeout=240) == 0, log.read_text()
    finally:
        _kill_group(again)
    assert output_files(out) == sorted([LOCK, MANIFEST, SUCCESS] + [f"part-{i:06d}.arrow" for i in range(8)])
    resumed = read_output(out).sort_by("id")
    assert resumed.column("id").to_pylist() == list(range(64))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["runs"] == 2 and manifest["summary"]["shards_skipped"] == done_before

    # the same job without interruption (into another folder) gives the same rows
    ref_out = tmp_path / "ref"
    Runner(load_config(write_job(tmp_path, f, ref_out))).run()
    assert read_output(ref_out).sort_by("id").equals(resumed)


def _session_pids(sid: int) -> set[int]:
    """Live processes of a session (the killed driver's: what its private Ray left)."""
    pids = set()
    for p in os.listdir("/proc"):
        try:
            raw = Path(f"/proc/{p}/stat").read_text() if p.isdigit() else ""
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        if fields and fields[0] != "Z" and int(fields[3]) == sid:
            pids.add(int(p))
    return pids


def test_the_next_run_stops_what_a_killed_driver_left(tmp_path: Path):
    """With Ray 2.60 a SIGKILLed driver's GCS and raylet die with it, but its DashboardAgent
    and RuntimeEnvAgent live about 60 s more. The run noted its Ray session in the lock file;
    `run` again stops them as it starts, long before they would go on their own."""
    f = write_prompts(tmp_path / "d.parquet", 64)
    out = tmp_path / "out"
    job = write_job(tmp_path, f, out)  # 8 shards of 8 rows
    log = tmp_path / "log.txt"
    proc = kill_driver_after_commits(job, out, log, commits=1, kill_ray=False)
    again = None
    try:
        note = json.loads((out / LOCK).read_text().splitlines()[0])
        assert note["owner_pid"] == proc.pid and note["session_dir"], note
        time.sleep(1.0)
        left = _session_pids(proc.pid)
        assert left, "the killed driver left no process: nothing for this test to reap (did Ray change?)"
        t0 = time.monotonic()
        again = _cli(job, log)
        while _session_pids(proc.pid) and time.monotonic() - t0 < 20:
            time.sleep(0.1)
        gone_in = time.monotonic() - t0
        assert not _session_pids(proc.pid), f"{_session_pids(proc.pid)} of {left} still alive 20 s after the next run started"
        assert again.wait(timeout=240) == 0, log.read_text()
    finally:
        _kill_group(proc)
        if again is not None:
            _kill_group(again)
    assert re.search(r"INFO stopped \d+ Ray processes left by an earlier run of this folder that was killed", log.read_text()), (gone_in, log.read_text())
    assert (out / LOCK).read_bytes() == b""  # a run that shut its Ray down clears the note
    assert sorted(read_output(out).column("id").to_pylist()) == list(range(64))


def test_sigterm_stops_like_ctrl_c(tmp_path: Path):
    """SIGTERM to the driver (as a scheduler or `kill` sends it): one line, exit 143, the
    committed shards kept and the folder unlocked, Ray's processes gone; `run` again resumes."""
    f = write_prompts(tmp_path / "d.parquet", 64)
    out = tmp_path / "out"
    job = write_job(tmp_path, f, out)  # 8 shards of 8 rows
    log = tmp_path / "log.txt"
    proc = _cli(job, log, UPG_BATCH_TEST_SHARD_DELAY_S="1.0")
    try:
        deadline = time.monotonic() + 180
        while _committed(out) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the driver alone
        assert proc.wait(timeout=60) == 143, log.read_text()
        # the private Ray the driver started is gone with it
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(proc.pid)
    finally:
        _kill_group(proc)
    text = log.read_text()
    # (Ray prints a notice about its token authentication when it starts; nothing else may show)
    lines = [ln for ln in text.splitlines() if ln.strip() and "Token authentication is enabled" not in ln]
    assert lines == ["upg-batch: error: terminated (SIGTERM); committed shards are kept, run the job again to resume"], text
    done = _committed_shards(out)
    assert 2 <= len(done) < 8 and not (out / SUCCESS).exists()
    assert sorted(read_output(out).column("id").to_pylist()) == sorted(i for s in done for i in range(8 * s, 8 * s + 8))

    again = _cli(job, log)
    try:
        assert again.wait(timeout=240) == 0, log.read_text()
    finally:
        _kill_group(again)
    assert sorted(read_output(out).column("id").to_pylist()) == list(range(64))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
