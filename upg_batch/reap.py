"""What a killed driver's private Ray leaves behind, found and stopped by the next run.

A driver that starts Ray in-process (no `cluster.address`) owns that Ray: its GCS, raylet,
dashboard and log monitor die with the driver, but the raylet's agents (ray::DashboardAgent,
ray::RuntimeEnvAgent in Ray 2.60) outlive a SIGKILLed driver by about a minute. So the runner
notes its local Ray session in the output folder's lock file (`note_for_this_process`), and the
next run of that folder, once it holds the lock, stops what is left of a session whose owner is
dead (`reap_dead_session`); a clean `ray.shutdown()` is followed by the same sweep of the run's
own session (`reap_session`).

Only this user's processes of that one session are ever signalled: the same session id (setsid)
as the recorded driver, running its Python or a Ray binary, holding a file under the recorded
Ray session folder (or naming it on their command line). A Ray cluster the user started (`ray
start`, another driver's private Ray) has another session folder; a live owner (its pid with its
recorded start time) is never reaped; a note written on another machine or before a reboot is
ignored.
"""

from __future__ import annotations

import glob
import logging
import os
import signal
import socket
import sys
import time
from datetime import datetime
from typing import Any

import ray

__all__ = ["note_for_this_process", "reap_dead_session", "reap_session", "session_processes"]

log = logging.getLogger("upg_batch")

# what this needs of a process (its session, start time, open files) is read from Linux's /proc;
# elsewhere nothing is noted and nothing reaped
SUPPORTED = os.path.isdir("/proc/self/fd") and os.path.exists("/proc/stat")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[int, int] | None:
    """(session id, start time in clock ticks since boot) of a process, or None if it is gone
    (or a zombie: gone but for its exit status)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[3]), int(fields[19])


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start


def note_for_this_process(temp_dir: str, session_dir: str | None = None) -> dict[str, Any] | None:
    """The lock-file note of a Ray session started by this process (session_dir None while
    ray.init runs: the session folder is then found by the owner's pid in its name). None where
    /proc is not there."""
    if not SUPPORTED:
        return None
    pid = os.getpid()
    sid, start = _stat(pid) or (os.getsid(0), 0)
    with open("/proc/stat") as f:
        btime = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
    return {
        "owner_pid": pid,
        "owner_start": start,
        "owner_started_at": btime + start / os.sysconf("SC_CLK_TCK"),
        "sid": sid,
        "uid": os.getuid(),
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "temp_dir": temp_dir,
        "session_dir": session_dir,
        # what Ray's processes run: this Python (agents, workers) or Ray's binaries (raylet, GCS)
        "python": os.path.realpath(sys.executable),
        "ray_dir": os.path.realpath(os.path.dirname(ray.__file__)),
    }


def _session_dirs(note: dict[str, Any]) -> list[str]:
    if note.get("session_dir"):
        return sorted({note["session_dir"], os.path.realpath(note["session_dir"])})
    # killed inside ray.init: Ray names the session folder session_<local time>_<driver pid>
    found = []
    for path in glob.glob(os.path.join(note["temp_dir"], f"session_*_{int(note['owner_pid'])}")):
        stamp = os.path.basename(path)[len("session_") :].rsplit("_", 1)[0]
        try:
            at = datetime.strptime(stamp, "%Y-%m-%d_%H-%M-%S_%f").timestamp()
        except ValueError:
            continue
        if at >= float(note["owner_started_at"]) - 2.0:
            found.append(os.path.realpath(path))
    return found


def _under(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d + "/") or f"={d}/" in path or path.endswith(f"={d}") for d in dirs)


def session_processes(note: dict[str, Any]) -> list[tuple[int, int]]:
    """(pid, start) of this user's processes of the noted Ray session: in the owner's session
    id, holding a file under (or naming on their command line) the Ray session folder."""
    dirs = _session_dirs(note)
    if not dirs:
        return []
    me, uid, found = os.getpid(), os.getuid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
        except OSError:
            continue
        st = _stat(pid)
        if st is None or st[0] != note["sid"] or not _runs_ray(pid, note):
            continue
        if _holds(pid, dirs):
            found.append((pid, st[1]))
    return found


def _runs_ray(pid: int, note: dict[str, Any]) -> bool:
    """The process runs the owner's Python or one of Ray's binaries (not, say, a `tail -f` of
    a Ray log started from the same terminal)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return exe == note.get("python") or bool(note.get("ray_dir")) and exe.startswith(note["ray_dir"] + "/")


def _holds(pid: int, dirs: list[str]) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    if any(_under(a, dirs) for a in args):
        return True
    try:  # ray:: processes rewrite their command line; their open log files still tell
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if _under(os.readlink(f"/proc/{pid}/fd/{fd}"), dirs):
                return True
        except OSError:
            continue
    return False


def _signal_all(procs: list[tuple[int, int]], sig: int) -> None:
    for pid, start in procs:
        if _alive(pid, start):  # not a reused pid
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _wait_gone(procs: list[tuple[int, int]], seconds: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + seconds
    left = [p for p in procs if _alive(*p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(*p)]
    return left


def reap_session(note: dict[str, Any], grace_s: float = 1.0) -> list[int]:
    """Stop the noted session's processes: SIGTERM, then SIGKILL after grace_s (the agents of
    a session whose GCS is gone do not exit on SIGTERM). Returns the pids signalled. The caller
    decides the session is over (its owner dead, or shut down)."""
    if not SUPPORTED or note.get("host") != socket.gethostname() or note.get("boot_id") != _boot_id() or note.get("uid") != os.getuid():
        return []
    procs = session_processes(note)
    if not procs:
        return []
    _signal_all(procs, signal.SIGTERM)
    left = _wait_gone(procs, grace_s)
    if left:
        _signal_all(left, signal.SIGKILL)
        _wait_gone(left, 5.0)
    return [pid for pid, _ in procs]


def reap_dead_session(note: dict[str, Any]) -> list[int] | None:
    """Stop what is left of the noted local Ray session if its owner (the driver that started
    it) is dead; returns the pids signalled. None: the owner lives (a process that ran a job
    in-process and goes on), its session is left alone and the note kept."""
    try:
        owner, start = int(note["owner_pid"]), int(note["owner_start"])
    except (KeyError, TypeError, ValueError):
        return []  # not a note of ours
    if note.get("host") == socket.gethostname() and note.get("boot_id") == _boot_id() and _alive(owner, start):
        return None
    pids = reap_session(note)
    if pids:
        where = note.get("session_dir") or f"{note.get('temp_dir')}/session_*_{note['owner_pid']}"
        log.info("stopped %d Ray processes left by an earlier run of this folder that was killed (pids %s, session %s)", len(pids), " ".join(map(str, pids)), where)
    return pids
