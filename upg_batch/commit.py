"""The output folder: exactly-once shard commits, the manifest, resume and _SUCCESS.

A commit (G1-G5): the shard's batch is written to a hidden temporary file, fsynced,
renamed to `part-NNNNNN.<fmt>`, the folder fsynced; then one line recording the shard is
appended to the commit log `_manifest.log` and fsynced (O(1) per commit; see manifest.py). A
shard counts as committed only once the manifest (snapshot `_manifest.json` or a complete log
line) says so: a part file without an entry (a crash between rename and log line, or a torn
line) is deleted on resume and the shard runs again. The snapshot is rewritten (compacted)
when a run begins, when the log outgrows it, when the job finishes and when the run closes.

Names starting with '_' or '.' are ignored by pyarrow's dataset discovery, so
`pyarrow.dataset.dataset(out, format="arrow")` reads only the part files.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from upg_batch.fingerprint import describe_changes
from upg_batch.manifest import (
    LOG,
    MANIFEST,
    MANIFEST_VERSION,
    TMP_PREFIX,
    CommitError,
    CommitLog,
    OutputError,
    _fsync_dir,
    _write_atomic,
    read_committed,
    read_log,
    read_snapshot,
)

__all__ = ["CommitError", "Committer", "OutputError", "MANIFEST", "LOG", "SUCCESS", "part_name", "read_committed"]

SUCCESS = "_SUCCESS"
LOCK = ".upg-batch.lock"
_PART = re.compile(r"^part-(\d+)\.(arrow|parquet|jsonl)$")
# output.format -> the part files' extension
_EXTENSION = {"arrow": "arrow", "parquet": "parquet", "openai": "jsonl"}
# the log is compacted into the snapshot once it is larger than both the snapshot and this, so
# the bytes written stay O(1) per commit amortized and a resume reads a bounded log
COMPACT_MIN_BYTES = 1 << 20


def part_name(index: int, fmt: str) -> str:
    return f"part-{index:06d}.{_EXTENSION.get(fmt, fmt)}"


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _identity(st: os.stat_result | None) -> tuple[int, int] | None:
    return None if st is None else (st.st_dev, st.st_ino)


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p, fsyncing the parent of each folder created so the new entries survive a
    power loss (G5). Returns the folders created, outermost first. A path that is (or lies
    under) a file is an OutputError naming that file."""
    missing: list[Path] = []
    p = path.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise OutputError(f"output.path {path}: {p} is a file, not a folder; choose a folder for the output")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"output.path {path}: cannot create the folder ({e.strerror or e})") from None
    missing.reverse()
    for d in missing:
        _fsync_dir(d.parent)
    return missing


def _ours(name: str) -> bool:
    """Files this runner writes into an output folder."""
    return bool(_PART.match(name)) or name in (MANIFEST, LOG, SUCCESS, LOCK) or name.startswith(TMP_PREFIX)


class Committer:
    """Owns one output folder for the length of a run (an exclusive lock keeps others out)."""

    def __init__(
        self,
        out_dir: Path,
        fingerprint: dict[str, str],
        total_shards: int,
        fmt: str,
        overwrite: bool = False,
        inputs: dict[str, Any] | None = None,
        model_name: str = "",
    ) -> None:
        self.dir = Path(out_dir)
        self.model_name = model_name  # the `model` field of OpenAI result lines
        # folders this run created (outermost first): removed again if the run ends before
        # writing to them
        self._created = _make_dirs(self.dir)
        self.fmt = fmt
        self.fingerprint = dict(fingerprint)
        # what the fingerprint digests (fingerprint.fingerprint_inputs), kept in the manifest so
        # that a later run of a changed job can be told what changed
        self.inputs = inputs
        self.total_shards = total_shards
        self._begun = False
        # --overwrite: the old output is deleted in begin(), once every pre-flight check passed
        self._replace = False
        self.shards: dict[int, dict[str, Any]] = {}
        self.runs = 0
        self.rows_committed = 0  # rows of all recorded shards, kept as shards are committed
        self.failed_shards = 0  # recorded shards that ended as error rows (failed: true)
        self.error_rows = 0  # error rows of all recorded shards
        self.log = CommitLog(self.dir)
        self.snapshot_bytes = 0  # size of the snapshot last written or read
        self.snapshot_writes = 0  # snapshots this run wrote (each O(shards))
        self._complete = False  # the snapshot's complete flag and summary, kept by compaction
        self._summary: dict[str, Any] | None = None
        self._lock_fd = self._lock()
        # what this run holds: the folder and its lock file; either changing under the run (the
        # folder removed or replaced, the lock file deleted) stops it before it writes again
        self._dir_id = _identity(_stat_or_none(self.dir))
        self._lock_id = _identity(os.fstat(self._lock_fd))
        try:
            self._open(overwrite)
        except BaseException:
            self.close()
            raise

    def _lock(self) -> int:
        """An exclusive flock on the lock file. The file is never deleted while the folder is
        in use; should it be replaced anyway, the inode check sees that the lock taken is on
        a file no longer in the folder, and locks the new one."""
        path = self.dir / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"{self.dir}: another upg-batch run is writing into this folder") from None
            except BaseException:
                os.close(fd)
                raise
            held, now = os.fstat(fd), _stat_or_none(path)
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)  # locked a file that was unlinked meanwhile: try the current one

    # -- the lock file's note: the local Ray session of the run holding it (upg_batch/reap.py)
    def read_lock_note(self) -> dict[str, Any] | None:
        """The note the last run holding the lock left in the lock file, if any."""
        try:
            raw = os.pread(self._lock_fd, 1 << 16, 0)
            note = json.loads(raw.split(b"\n", 1)[0]) if raw.strip() else None
        except (OSError, ValueError):
            return None
        return note if isinstance(note, dict) else None

    def write_lock_note(self, note: dict[str, Any] | None) -> None:
        """Replace the note (None: clear it). Written over the old one, then cut to length: a
        kill in between leaves the new note as the first line, which is all that is read."""
        data = b"" if note is None else json.dumps(note, sort_keys=True).encode() + b"\n"
        try:
            os.pwrite(self._lock_fd, data, 0)
            os.ftruncate(self._lock_fd, len(data))
        except OSError:  # best effort: a missing note only means nothing is reaped later
            pass

    # -- opening: check, clean, resume -----------------------------------------------------
    def _open(self, overwrite: bool) -> None:
        self.log = CommitLog(self.dir)  # sized under the lock
        try:
            manifest = self._read_manifest()
        except OutputError:
            if not overwrite:
                raise
            manifest = None  # replaced anyway
        foreign = sorted(n for n in os.listdir(self.dir) if not _ours(n) and not n.startswith((".", "_")))
        if foreign:
            shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            raise OutputError(f"{self.dir}: holds files upg-batch did not write ({shown}); choose an empty or new output.path")
        if manifest is not None and not overwrite:
            old = manifest.get("fingerprint", {})
            if old.get("job") != self.fingerprint["job"]:
                differ = [k for k in ("config", "model", "dataset", "version") if old.get(k) != self.fingerprint.get(k)]
                changes = describe_changes(manifest["fingerprint_inputs"], self.inputs) if manifest.get("fingerprint_inputs") and self.inputs else []
                raise OutputError(
                    f"{self.dir}: holds output of a different job (its {', '.join(differ) or 'fingerprint'} differs)"
                    + (f": {'; '.join(changes)}" if changes else "")
                    + "; run with --overwrite to replace it, or choose another output.path"
                )
            self.shards = {int(k): v for k, v in manifest.get("shards", {}).items()}
            self.runs = int(manifest.get("runs", 0))
            self._complete, self._summary = bool(manifest.get("complete")), manifest.get("summary")
            self.snapshot_bytes = (self.dir / MANIFEST).stat().st_size
            logged, good, _ = read_log(self.log.path)
            self.shards.update(logged)  # a shard in both (a crash mid-compaction) is one entry
            self.log.cut_torn_tail(good)  # a torn last line is no commit: its part file is a stray
        elif manifest is None and not overwrite:
            parts = [n for n in os.listdir(self.dir) if _PART.match(n) or n == LOG]
            if parts:
                raise OutputError(f"{self.dir}: holds part files but no {MANIFEST}; run with --overwrite to replace them")
        if overwrite:
            self.shards = {}
            self._replace = True  # nothing is deleted before begin()
        else:
            self._clean()
        self._recount()

    def _recount(self) -> None:
        self.rows_committed = sum(int(e["rows"]) for e in self.shards.values())
        self.failed_shards = sum(1 for e in self.shards.values() if e.get("failed"))
        self.error_rows = sum(int(e.get("errors", 0)) for e in self.shards.values())

    def begin(self) -> None:
        """Record this run (and the fingerprint) in the manifest: called once the job is about
        to do work, so a job that fails its checks leaves the folder as it found it. With
        --overwrite, this is where the previous output is deleted."""
        if self._replace:
            self._replace = False
            for n in os.listdir(self.dir):
                if _ours(n) and n != LOCK:
                    os.unlink(self.dir / n)
            _fsync_dir(self.dir)
            self.log = CommitLog(self.dir)
        self.runs += 1
        self._begun = True
        self._complete, self._summary = False, None
        self._compact()  # the log of earlier runs folds into the snapshot

    def _read_manifest(self) -> dict[str, Any] | None:
        return read_snapshot(self.dir / MANIFEST)

    def _clean(self) -> None:
        """Delete temp files of killed runs and part files the manifest does not record;
        forget manifest entries whose file has gone (those shards run again)."""
        changed = False
        for n in os.listdir(self.dir):
            m = _PART.match(n)
            stray_part = m is not None and (int(m.group(1)) not in self.shards or self.shards[int(m.group(1))]["file"] != n)
            if n.startswith(TMP_PREFIX) or stray_part:
                os.unlink(self.dir / n)
                changed = True
        for index in [i for i, e in self.shards.items() if not self._part_intact(e)]:
            (self.dir / self.shards[index]["file"]).unlink(missing_ok=True)  # a part file cut short or changed
            del self.shards[index]
            changed = True
        if len(self.shards) < self.total_shards:
            (self.dir / SUCCESS).unlink(missing_ok=True)
        if changed:
            _fsync_dir(self.dir)

    def _part_intact(self, entry: dict[str, Any]) -> bool:
        """The entry's part file is there with the size recorded when it was committed."""
        st = _stat_or_none(self.dir / entry["file"])
        return st is not None and (entry.get("bytes") is None or st.st_size == entry["bytes"])

    # -- checks while the run writes ---------------------------------------------------------
    def _folder_changed(self) -> str | None:
        """How the folder changed under this run, or None while it is the one locked."""
        if _identity(_stat_or_none(self.dir)) != self._dir_id:
            return "the output folder was removed or replaced"
        if _identity(_stat_or_none(self.dir / LOCK)) != self._lock_id:
            return f"its lock file {LOCK} was removed or replaced"
        return None

    def _check_folder(self) -> None:
        changed = self._folder_changed()
        if changed:
            raise CommitError(f"{self.dir}: {changed} while this run was writing to it; the job stops: run it again to repair the output")

    @contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """An OSError while writing `path` becomes a CommitError naming it (or saying how the
        folder changed, when that is the cause)."""
        try:
            yield
        except OSError as e:
            self._check_folder()
            raise CommitError(f"{path}: cannot write ({e.strerror or e}); committed shards are kept: run the job again once this is fixed") from None

    def verify_parts(self) -> None:
        """Every recorded part file is there with its recorded size, else CommitError."""
        bad = sorted(e["file"] for e in self.shards.values() if not self._part_intact(e))
        if bad:
            shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
            raise CommitError(
                f"{self.dir}: {len(bad)} recorded part files are missing or changed size ({shown}); "
                "the job is not marked complete: run it again to redo those shards"
            )

    # -- committing ------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """The folder holds the whole job: marked complete and every shard committed."""
        return self._complete and len(self.shards) == self.total_shards

    @property
    def summary(self) -> dict[str, Any] | None:
        """The summary stored when the job completed."""
        return self._summary

    def is_committed(self, index: int) -> bool:
        return index in self.shards

    def commit(self, index: int, batch: pa.RecordBatch, info: dict[str, Any]) -> float:
        """Write, fsync, rename, record. Returns the seconds it took."""
        if not self._begun:
            self.begin()
        if index in self.shards:  # the driver commits each shard once; this guards G3
            raise OutputError(f"shard {index} is already committed")
        t0 = time.perf_counter()
        self._check_folder()  # never write into a folder that is no longer the one locked
        name = part_name(index, self.fmt)
        final = self.dir / name
        tmp = self.dir / f"{TMP_PREFIX}{name}.{os.getpid()}"
        try:
            with self._writing(final):
                with open(tmp, "wb") as f:
                    if self.fmt == "parquet":
                        pq.write_table(pa.Table.from_batches([batch]), f)
                    elif self.fmt == "openai":
                        from upg_batch.openai_batch import result_lines

                        f.write(result_lines(batch, self.model_name))
                    else:
                        with pa.ipc.new_file(f, batch.schema) as writer:
                            writer.write_batch(batch)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                _fsync_dir(self.dir)
                entry = {"file": name, "rows": batch.num_rows, "bytes": final.stat().st_size, **info}
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise
        with self._writing(self.log.path):
            self.log.append(index, entry)  # the commit point: one fsynced line
        self.shards[index] = entry
        self.rows_committed += batch.num_rows
        self.failed_shards += bool(info.get("failed"))
        self.error_rows += int(info.get("errors", 0))
        if self.log.size > max(self.snapshot_bytes, COMPACT_MIN_BYTES):
            self._compact()
        return time.perf_counter() - t0

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the job complete: the snapshot (compacted, the log removed), then _SUCCESS
        (last, so readers can wait on it)."""
        self._begun = True
        # the output is what the manifest says before it is called complete: the folder still
        # the one locked, every part file there with the size it was committed with
        self._check_folder()
        self.verify_parts()
        self._complete, self._summary = True, summary
        self._compact()
        self._write_success()

    def repair_complete(self) -> None:
        """Finish what a kill inside finish() left of a complete job: the log still there (killed
        between the final snapshot and the log's removal; the snapshot holds its lines), or no
        _SUCCESS (killed before it was written; readers waiting on it would wait forever)."""
        if not self.complete or self._summary is None:
            return
        if self.log.path.exists():
            self._check_folder()
            self._compact()
        if not (self.dir / SUCCESS).exists():
            self._check_folder()
            self.verify_parts()
            self._write_success()

    def _write_success(self) -> None:
        with self._writing(self.dir / SUCCESS):
            _write_atomic(self.dir / SUCCESS, (json.dumps(self._summary, indent=1, sort_keys=True) + "\n").encode())

    def _compact(self) -> None:
        """Rewrite the snapshot atomically with every committed shard, then remove the log. A
        crash between the two leaves shards in both, which reading dedupes by index."""
        data = {
            "version": MANIFEST_VERSION,
            "fingerprint": self.fingerprint,
            **({"fingerprint_inputs": self.inputs} if self.inputs is not None else {}),
            "total_shards": self.total_shards,
            "format": self.fmt,
            "runs": self.runs,
            "complete": self._complete,
            "shards": {str(k): v for k, v in sorted(self.shards.items())},
        }
        if self._summary is not None:
            data["summary"] = self._summary
        raw = json.dumps(data, separators=(",", ":")).encode()
        with self._writing(self.dir / MANIFEST):
            _write_atomic(self.dir / MANIFEST, raw)
            self.snapshot_bytes = len(raw)
            self.snapshot_writes += 1
            self.log.remove()

    def close(self) -> None:
        """Fold the log into the snapshot (best effort: a log left behind is read on resume),
        then release the lock. The lock file stays (it is hidden from readers): deleting it
        while held would let a later run lock a new file while another still holds the old
        one. Only a folder this run created and never wrote to is removed again."""
        if self._lock_fd >= 0 and self._begun and self.log.size > 0 and self._folder_changed() is None:
            try:
                self._compact()
            except (OSError, CommitError):
                pass
        self.log.close()
        if self._lock_fd >= 0:
            if self._created and not self._begun:
                # nothing but the lock file is in it: remove it while still holding the lock
                # (a run that opened the old file meanwhile sees the inode change in _lock)
                (self.dir / LOCK).unlink(missing_ok=True)
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1
            if self._created and not self._begun:
                for d in reversed(self._created):
                    try:
                        d.rmdir()
                    except OSError:  # not empty after all
                        break
