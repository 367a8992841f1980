"""The reaper of a killed driver's private Ray (upg_batch/reap.py), on stand-in processes: it
stops only the noted session's processes, and only once the session's owner is dead. (A real
SIGKILLed driver: test_runner_driver_kill.py::test_the_next_run_stops_what_a_killed_driver_left.)"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from upg_batch import reap
from upg_batch.commit import Committer

HOLD = "import sys, time; f = open(sys.argv[1], 'a'); print('ready', flush=True); time.sleep(120)"


def _holder(path: Path, **kw) -> subprocess.Popen:
    """A process of this Python holding `path` open, as a Ray agent holds its log files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, **kw)
    assert p.stdout.readline() == b"ready\n"
    p.stdout.close()
    return p


def _dead_owner_note(tmp_path: Path, session: Path) -> dict:
    """The note a driver (now dead) wrote for `session`."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        note = {**reap.note_for_this_process(str(tmp_path / "ray"), str(session))}
        note["owner_pid"], note["owner_start"] = owner.pid, reap._stat(owner.pid)[1]
    finally:
        owner.kill()
        owner.wait()
    return note


def _gone(p: subprocess.Popen, within: float = 10.0) -> bool:
    try:
        p.wait(timeout=within)
        return True
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def test_a_dead_owners_session_is_stopped_and_nothing_else(tmp_path: Path, procs):
    session = tmp_path / "ray" / "session_2026-01-01_00-00-00_000001_1"
    other = tmp_path / "ray" / "session_2026-01-01_00-00-00_000001_12"  # its name extends ours
    ours = _holder(session / "logs" / "agent.log")
    theirs = _holder(other / "logs" / "agent.log")
    elsewhere = _holder(session / "logs" / "x.log", start_new_session=True)  # another terminal
    procs += [ours, theirs, elsewhere]
    note = _dead_owner_note(tmp_path, session)
    assert reap.reap_dead_session(note) == [ours.pid]
    assert _gone(ours)
    assert theirs.poll() is None and elsewhere.poll() is None


def test_a_live_owners_session_is_left_alone(tmp_path: Path, procs):
    session = tmp_path / "ray" / "session_x"
    ours = _holder(session / "logs" / "agent.log")
    procs.append(ours)
    note = reap.note_for_this_process(str(tmp_path / "ray"), str(session))  # this process: alive
    assert reap.reap_dead_session(note) is None
    time.sleep(0.2)
    assert ours.poll() is None
    # a note written on another machine (or before a reboot) signals nothing either
    for key, value in (("host", "elsewhere"), ("boot_id", "0")):
        assert reap.reap_dead_session({**_dead_owner_note(tmp_path, session), key: value}) == []
    assert ours.poll() is None


def test_a_session_folder_not_yet_noted_is_found_by_the_owners_pid(tmp_path: Path, procs):
    """Killed inside ray.init: the note has no session folder yet; Ray names it after the
    driver's pid and start time, so it is found (an older folder of a reused pid is not)."""
    note = _dead_owner_note(tmp_path, tmp_path / "unused")
    started = time.localtime(note["owner_started_at"] + 1)
    name = time.strftime("session_%Y-%m-%d_%H-%M-%S_000000_", started) + str(note["owner_pid"])
    older = "session_2000-01-01_00-00-00_000000_" + str(note["owner_pid"])
    ours = _holder(tmp_path / "ray" / name / "logs" / "a.log")
    stale = _holder(tmp_path / "ray" / older / "logs" / "a.log")
    procs += [ours, stale]
    assert reap.reap_dead_session({**note, "session_dir": None}) == [ours.pid]
    assert _gone(ours) and stale.poll() is None


def test_the_note_lives_in_the_lock_file(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()  # (a folder the run created and never wrote to is removed again on close)
    c = Committer(out, {"config": "c", "model": "m", "dataset": "d", "job": "j"}, 1, "arrow")
    assert c.read_lock_note() is None
    c.write_lock_note({"owner_pid": 1, "session_dir": "/tmp/ray/session_long_name_" + "x" * 100})
    c.write_lock_note({"owner_pid": 2})  # shorter: the old tail is cut
    assert c.read_lock_note() == {"owner_pid": 2}
    c.close()
    c = Committer(out, {"config": "c", "model": "m", "dataset": "d", "job": "j"}, 1, "arrow")
    assert c.read_lock_note() == {"owner_pid": 2}
    c.write_lock_note(None)
    assert c.read_lock_note() is None
    c.close()


def test_without_proc_nothing_is_noted_or_reaped(tmp_path: Path, procs, monkeypatch):
    session = tmp_path / "ray" / "session_y"
    ours = _holder(session / "logs" / "agent.log")
    procs.append(ours)
    note = _dead_owner_note(tmp_path, session)
    monkeypatch.setattr(reap, "SUPPORTED", False)  # as on macOS
    assert reap.note_for_this_process(str(tmp_path / "ray")) is None
    assert reap.reap_dead_session(note) == []
    assert ours.poll() is None
