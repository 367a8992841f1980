"""What people watching a job see: a tqdm bar on a TTY, else a periodic log line; the summary."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "format_summary"]

log = logging.getLogger("upg_batch")


class Progress:
    """Rows done out of the total, tokens/s and ETA.

    bar: "auto" (a bar when the stream is a TTY), "on" or "off". Without a bar, one log
    line every `log_interval_s` seconds.
    """

    def __init__(self, total_rows: int, done_rows: int, bar: str = "auto", log_interval_s: float = 10.0, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = total_rows
        self.done = done_rows
        self.start_done = done_rows
        self.tokens = 0
        self.t0 = time.monotonic()
        self.log_interval_s = log_interval_s
        self._last_log = self.t0
        use_bar = bar == "on" or (bar == "auto" and _isatty(self.stream))
        self._bar: Any = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_rows, initial=done_rows, unit="row", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def update(self, rows: int, tokens: int) -> None:
        self.done += rows
        self.tokens += tokens
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.tokens_per_s():.1f} tok/s", refresh=False)
            self._bar.update(rows)
        else:
            self.tick()

    def tick(self) -> None:
        """Log a line if the interval passed (no bar)."""
        if self._bar is not None:
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_interval_s:
            self._last_log = now
            log.info(self.line())

    def tokens_per_s(self) -> float:
        elapsed = time.monotonic() - self.t0
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        new = self.done - self.start_done
        left = self.total - self.done
        eta = f"{left * elapsed / new:.0f}s" if new > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"rows {self.done}/{self.total} ({pct:.1f}%), {self.tokens_per_s():.1f} tok/s, elapsed {elapsed:.0f}s, eta {eta}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def format_summary(s: dict[str, Any]) -> str:
    """The end-of-job summary as a few human lines (a job found already complete says so
    first, then shows the summary stored when it completed)."""
    lines = [f"job already complete in {s.get('output')}: nothing to run; its summary:"] if s.get("already_complete") else []
    lines += [
        f"job {s['status']}: {s['rows_ok']} rows ok, {s['rows_error']} rows in error "
        f"({s['rows_total']} rows in {s['shards_total']} shards; {s['shards_skipped']} shards already committed)",
        f"tokens: {s['prompt_tokens']} prompt, {s['completion_tokens']} completion; "
        f"{s['tokens_per_s']:.1f} completion tok/s over {s.get('processing_s', 0.0):.1f}s of generation "
        f"({s['wall_s']:.1f}s wall with Ray start and model load)",
    ]
    for node, share in sorted(s.get("nodes", {}).items()):
        lines.append(
            f"  node {node}: {share['shards']} shards, {share['rows']} rows, "
            f"{share['completion_tokens']} tokens ({100.0 * share['share']:.1f}% of rows)"
            + (f" on {share['engine']}" if share.get("engine") else "")
        )
    if s.get("output"):
        lines.append(f"output: {s['output']}")
    return "\n".join(lines)
