"""The manifest of an output folder: a snapshot plus an append-only commit log.

`_manifest.json` is the job's header and snapshot: version, fingerprint, format, runs, whether
the job is complete (with its summary), and the shards committed when it was last written. It is
only ever replaced atomically (temp, fsync, rename, fsync folder).

`_manifest.log` holds one JSON line per shard committed since: `{"shard": N, "entry": {...}}`,
appended and fsynced per commit, so a commit costs O(1) bytes. A shard is committed when it is
in the snapshot or its log line is complete (newline-terminated, valid JSON). A torn last line
(a crash mid-append) does not count; it is truncated away before anything else is appended.

Compaction rewrites the snapshot with every committed shard, then removes the log. A crash in
between leaves a shard in both (entries are keyed by shard index, so that is harmless), never in
neither. Both names start with '_', so pyarrow's dataset discovery skips them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST", "LOG", "MANIFEST_VERSION", "CommitError", "OutputError", "CommitLog", "read_snapshot", "read_log", "read_committed"]

MANIFEST = "_manifest.json"
LOG = "_manifest.log"
MANIFEST_VERSION = 1
TMP_PREFIX = ".tmp-"


class OutputError(RuntimeError):
    """The output folder cannot take this job; the message says why and what to do."""


class CommitError(RuntimeError):
    """Writing into the output folder failed while the job ran (a full disk, the folder or its
    lock file removed or replaced, a recorded part file gone): the job stops; a rerun repairs
    the output (shards whose files are intact are kept, the others run again)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_snapshot(path: Path) -> dict[str, Any] | None:
    """The snapshot `_manifest.json`, or None when there is none."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: unreadable manifest ({e}); run with --overwrite to start over") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise OutputError(f"{path}: not a manifest this version of upg-batch understands; run with --overwrite")
    return data


def _record(line: bytes) -> tuple[int, dict[str, Any]] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or type(rec.get("shard")) is not int or not isinstance(rec.get("entry"), dict):
        return None
    if not isinstance(rec["entry"].get("file"), str):
        return None
    return rec["shard"], rec["entry"]


def read_log(path: Path) -> tuple[dict[int, dict[str, Any]], int, int]:
    """The log's committed entries (a later line for a shard wins), the length of its intact
    prefix and its size. Everything after the last complete, valid line is a torn tail; a line
    that is not valid JSON is no commit (its shard runs again)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}, 0, 0
    entries: dict[int, dict[str, Any]] = {}
    good = pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        rec = _record(data[pos:nl])
        if rec is not None:
            entries[rec[0]] = rec[1]
            good = nl + 1
        pos = nl + 1
    return entries, good, len(data)


def read_committed(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest as a reader sees it: the snapshot with the log's shards merged in (keys are
    shard indices as strings, as in the snapshot). Safe to call while a run commits: the log is
    read before the snapshot, so a compaction in between loses nothing."""
    out = Path(out_dir)
    logged, _, _ = read_log(out / LOG)
    snap = read_snapshot(out / MANIFEST) or {"shards": {}}
    shards = {int(k): v for k, v in snap.get("shards", {}).items()}
    shards.update(logged)
    return {**snap, "shards": {str(k): v for k, v in sorted(shards.items())}}


class CommitLog:
    """The append-only `_manifest.log` of one folder, held open between commits."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOG
        self._fd = -1
        self.size = 0  # bytes in the log (after any torn tail is cut)
        try:
            self.size = os.stat(self.path).st_size
        except FileNotFoundError:
            pass

    def cut_torn_tail(self, good: int) -> None:
        """Truncate the log to its intact prefix (a crash mid-append left a partial line)."""
        if self.size > good:
            with open(self.path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
            self.size = good

    def append(self, index: int, entry: dict[str, Any]) -> None:
        """One line, written whole and fsynced; a new log file's folder entry is fsynced too."""
        line = json.dumps({"shard": index, "entry": entry}, separators=(",", ":")).encode() + b"\n"
        if self._fd < 0:
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if created:
                _fsync_dir(self.path.parent)
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self.size += len(line)

    def remove(self) -> None:
        """Delete the log (once the snapshot holds all of it) and fsync the folder."""
        self.close()
        if self.path.exists():
            self.path.unlink()
            _fsync_dir(self.path.parent)
        self.size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
