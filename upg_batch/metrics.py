"""Prometheus metrics of one upg-batch job, served over HTTP by the driver.

The driver owns one `JobMetrics`. The runner feeds it while the job runs: shard and row
counts from the committer, live engine counters polled from every actor (`eng.stats()`,
also while a shard is still running), per-request timings when a shard's results arrive.
Prometheus scrapes `http://HOST:PORT/metrics`; `docs/observability.md` lists every series.

Every metric lives in a private `CollectorRegistry`, so several jobs (or tests) in one
process never clash, and nothing is added to prometheus-client's global registry.
Labels are bounded: `model` (one per job), `node` (one per machine of the fleet, capped
at `max_nodes`), `outcome` and `state` (fixed sets). Never a row id.

All methods are thread-safe: the runner may call them from a polling thread.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import platform
import socket
import threading
import time
from typing import Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.registry import Collector

__all__ = ["JobMetrics", "OVERFLOW_NODE", "SHARD_STATES", "ROW_OUTCOMES", "is_loopback", "port_message", "port_problem"]

SHARD_STATES = ("pending", "running", "committed", "failed")
ROW_OUTCOMES = ("ok", "error")
# Label value that stands for every node past `max_nodes`, so a huge fleet cannot
# blow up the series count.
OVERFLOW_NODE = "_other"

# Bucket bounds in seconds. CPU engines on small machines take from milliseconds
# (tiny models) to minutes (long completions of big models) per request.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"))
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))

# Engine gauges summed over the actors of one node (several actors per node: one per GPU).
_SUMMED_STATS = ("running_sequences", "waiting_sequences", "kv_cache_tokens", "kv_cache_capacity_tokens", "memory_bytes", "max_batch")


class _CreatedFilter(Collector):
    """Collects the wrapped metrics, minus prometheus-client's `*_created` series.

    Those timestamps are not part of the documented set and would double every counter
    and histogram family in Prometheus; `rate()` and `histogram_quantile()` do not need them.
    """

    def __init__(self, metrics: Iterable[Any], on_collect: Any = None) -> None:
        self._metrics = list(metrics)
        self._on_collect = on_collect

    def collect(self):  # type: ignore[override]
        if self._on_collect is not None:
            self._on_collect()
        for metric in self._metrics:
            for family in metric.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class JobMetrics:
    """The metrics of one job, and (if `port`) the HTTP endpoint that serves them.

    port 0 or None: no HTTP server; every method still works (values are kept, not served).
    host: the address to bind; loopback by default, because the endpoint is unauthenticated.
    max_nodes: distinct `node` label values; further nodes share OVERFLOW_NODE.
    linger_s: at stop(), if a scraper has been reading the endpoint (two scrapes seen), keep
      serving until two more scrapes read the final values, waiting at most 3x the span of
      the last recorded scrapes + 1 s, and never longer than this.
    """

    def __init__(
        self, model: str, host: str | None = "127.0.0.1", port: int | None = 9464, max_nodes: int = 256, linger_s: float = 30.0
    ) -> None:
        self.model = str(model)
        self.host = host or "127.0.0.1"
        self.port = int(port) if port else 0
        self.max_nodes = int(max_nodes)
        self.linger_s = float(linger_s)
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        # scrapes while serving: times of the last two, to see a final one out at stop()
        self._scraped = threading.Condition()
        self._scrapes: list[float] = []
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._nodes: set[str] = set()
        # actor_key -> last cumulative token counters seen from that engine instance
        self._last_tokens: dict[str, tuple[float, float]] = {}
        # actor_key -> (node, latest gauge stats) for the per-node sums
        self._actor_stats: dict[str, tuple[str, dict[str, float]]] = {}

        L = ["model"]
        N = ["model", "node"]
        m: dict[str, Any] = {}
        m["prompt_tokens"] = Counter("upg_batch_prompt_tokens", "Prompt tokens processed (prefill) by the engines of a node.", N, registry=None)
        m["generation_tokens"] = Counter("upg_batch_generation_tokens", "Tokens generated (decoded) by the engines of a node.", N, registry=None)
        m["rows"] = Counter("upg_batch_rows", "Rows committed by this run, by outcome: ok (a completion) or error (an error row).", L + ["outcome"], registry=None)
        m["shards"] = Gauge("upg_batch_shards", "Shards of the job by state: pending, running, committed, failed.", L + ["state"], registry=None)
        m["rows_input"] = Gauge("upg_batch_rows_input", "Rows in the job's input dataset.", L, registry=None)
        m["rows_committed"] = Gauge("upg_batch_rows_committed", "Rows committed so far, earlier runs of a resumed job included.", L, registry=None)
        m["rows_left"] = Gauge("upg_batch_rows_left", "Rows not yet committed (input minus committed).", L, registry=None)
        m["ttft"] = Histogram("upg_batch_time_to_first_token_seconds", "Time from a request's submission to its first generated token.", N, buckets=TTFT_BUCKETS, registry=None)
        m["latency"] = Histogram("upg_batch_request_latency_seconds", "Time from a request's submission to its last generated token.", N, buckets=LATENCY_BUCKETS, registry=None)
        m["running"] = Gauge("upg_batch_engine_running_sequences", "Sequences in the running batch of the engines of a node.", N, registry=None)
        m["waiting"] = Gauge("upg_batch_engine_waiting_sequences", "Sequences queued for a batch slot on the engines of a node.", N, registry=None)
        m["max_batch"] = Gauge("upg_batch_engine_max_batch", "Batch slots (max_batch) of the engines of a node.", N, registry=None)
        m["kv_tokens"] = Gauge("upg_batch_kv_cache_tokens", "Tokens held in the KV caches of a node.", N, registry=None)
        m["kv_capacity"] = Gauge("upg_batch_kv_cache_capacity_tokens", "Tokens the KV caches of a node can hold.", N, registry=None)
        m["kv_ratio"] = Gauge("upg_batch_kv_cache_usage_ratio", "Fraction of the KV cache capacity of a node in use (0 to 1).", N, registry=None)
        m["memory"] = Gauge("upg_batch_engine_memory_bytes", "Memory held by the engines of a node: weights, KV cache, buffers.", N, registry=None)
        m["restarts"] = Counter("upg_batch_actor_restarts", "Engine actors restarted after a failure, by the node they ran on.", N, registry=None)
        m["commit"] = Histogram("upg_batch_commit_duration_seconds", "Time to commit one shard: write, fsync, rename, manifest.", L, buckets=COMMIT_BUCKETS, registry=None)
        m["build"] = Gauge("upg_batch_build_info", "Always 1; labels say which build of upg-batch runs the job.", ["model", "version", "python", "ray", "prometheus_client"], registry=None)
        self._m = m
        self.registry.register(_CreatedFilter(m.values(), on_collect=self._on_scrape))

        for state in SHARD_STATES:
            m["shards"].labels(self.model, state).set(0)
        for outcome in ROW_OUTCOMES:
            m["rows"].labels(self.model, outcome)
        m["build"].labels(self.model, _dist_version("upg-batch"), platform.python_version(), _dist_version("ray"), _dist_version("prometheus-client")).set(1)

    # -- HTTP endpoint -------------------------------------------------------------------
    def start(self) -> None:
        """Serve /metrics on host:port (no-op if port is 0/None or already started)."""
        if not self.port or self._server is not None:
            return
        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        if not is_loopback(self.host):
            logging.getLogger("upg_batch").warning(
                "metrics.host %s: the metrics endpoint on port %d is unauthenticated and reachable beyond this machine; "
                "bind it to a private address only",
                self.host,
                self.port,
            )

    def _on_scrape(self) -> None:
        if self._server is None:
            return
        with self._scraped:
            self._scrapes = [*self._scrapes[-2:], time.monotonic()]
            self._scraped.notify_all()

    def _fresh_scrapes(self, since: float) -> int:
        return sum(1 for t in self._scrapes if t > since)

    def stop(self) -> None:
        """Stop serving and free the port. Safe to call twice, or without start().

        A batch job's last values would otherwise never reach Prometheus when the job ends
        between two scrapes: if something scrapes the endpoint regularly (two scrapes seen),
        stop() first waits for two more scrapes: at most three times the span of the last
        recorded scrapes (two or three of them, so one or two scrape intervals) plus 1 s, and
        never longer than `linger_s`.
        """
        with self._scraped:
            if self._server is not None and len(self._scrapes) > 1:  # a scraper polls regularly
                # Two fresh scrapes: the first may have been cut off by the scraper's timeout
                # on a busy machine.
                stopping = time.monotonic()
                interval = self._scrapes[-1] - self._scrapes[0]
                deadline = stopping + min(self.linger_s, 3 * interval + 1.0)
                while self._fresh_scrapes(stopping) < 2 and time.monotonic() < deadline:
                    self._scraped.wait(timeout=max(0.0, deadline - time.monotonic()))
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def url(self) -> str | None:
        """http://host:port/metrics while serving, else None."""
        if self._server is None:
            return None
        return f"http://{self.host}:{self.port}/metrics"

    def __enter__(self) -> "JobMetrics":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- job progress --------------------------------------------------------------------
    def set_shards(self, pending: int = 0, running: int = 0, committed: int = 0, failed: int = 0) -> None:
        values = {"pending": pending, "running": running, "committed": committed, "failed": failed}
        for state, value in values.items():
            self._m["shards"].labels(self.model, state).set(value)

    def set_rows(self, total: int, done: int) -> None:
        """total: rows in the input; done: rows committed so far (earlier runs included)."""
        self._m["rows_input"].labels(self.model).set(total)
        self._m["rows_committed"].labels(self.model).set(done)
        self._m["rows_left"].labels(self.model).set(max(0, total - done))

    def rows_done(self, outcome: str, n: int = 1) -> None:
        """n rows of one outcome ("ok" or "error") were committed by this run."""
        if outcome not in ROW_OUTCOMES:
            raise ValueError(f"outcome must be one of {ROW_OUTCOMES}, got {outcome!r}")
        if n > 0:
            self._m["rows"].labels(self.model, outcome).inc(n)

    def observe_commit(self, seconds: float) -> None:
        self._m["commit"].labels(self.model).observe(max(0.0, float(seconds)))

    # -- fleet ---------------------------------------------------------------------------
    def _node(self, node: str) -> str:
        """The label value for `node`: itself, or OVERFLOW_NODE past `max_nodes` distinct nodes."""
        node = str(node)
        with self._lock:
            if node in self._nodes:
                return node
            label = node if len(self._nodes) < self.max_nodes else OVERFLOW_NODE
            self._nodes.add(label)
        # a new node: its restart counter shows 0 rather than no series at all
        self._m["restarts"].labels(self.model, label)
        return label

    def observe_engine_stats(self, node: str, actor_key: str, stats: Mapping[str, float]) -> None:
        """Live stats of one actor's engine (`Engine.stats()`, plus `max_batch`).

        The token counters in `stats` are cumulative per engine instance. The exported
        counters grow by the positive difference to the last value seen for `actor_key`;
        a value lower than the last one means a fresh engine (restarted actor) that
        counted from 0 again, so all of it is new. Counters never decrease.
        Gauges are summed over the actors of a node (the ratio is recomputed from the sums).
        """
        label = self._node(node)
        prompt = float(stats.get("prompt_tokens_total", 0) or 0)
        gen = float(stats.get("generation_tokens_total", 0) or 0)
        with self._lock:
            last_p, last_g = self._last_tokens.get(actor_key, (0.0, 0.0))
            d_prompt = prompt - last_p if prompt >= last_p else prompt
            d_gen = gen - last_g if gen >= last_g else gen
            self._last_tokens[actor_key] = (prompt, gen)
            gauges = {k: float(stats[k]) for k in (*_SUMMED_STATS, "kv_cache_usage_ratio") if stats.get(k) is not None}
            self._actor_stats[actor_key] = (label, gauges)
            self._refresh_node(label)
            if d_prompt > 0:
                self._m["prompt_tokens"].labels(self.model, label).inc(d_prompt)
            if d_gen > 0:
                self._m["generation_tokens"].labels(self.model, label).inc(d_gen)
            else:  # make the per-node series visible from the first poll on
                self._m["generation_tokens"].labels(self.model, label)
                self._m["prompt_tokens"].labels(self.model, label)

    def forget_actor(self, actor_key: str) -> None:
        """An actor is gone for good: drop its gauges from its node's sums."""
        with self._lock:
            entry = self._actor_stats.pop(actor_key, None)
            self._last_tokens.pop(actor_key, None)
            if entry is not None:
                self._refresh_node(entry[0])

    def _refresh_node(self, label: str) -> None:
        # caller holds self._lock
        actors = [g for n, g in self._actor_stats.values() if n == label]
        sums = {k: sum(g.get(k, 0.0) for g in actors) for k in _SUMMED_STATS}
        if sums["kv_cache_capacity_tokens"] > 0:
            ratio = sums["kv_cache_tokens"] / sums["kv_cache_capacity_tokens"]
        else:
            ratios = [g["kv_cache_usage_ratio"] for g in actors if "kv_cache_usage_ratio" in g]
            ratio = sum(ratios) / len(ratios) if ratios else 0.0
        m, model = self._m, self.model
        m["running"].labels(model, label).set(sums["running_sequences"])
        m["waiting"].labels(model, label).set(sums["waiting_sequences"])
        m["max_batch"].labels(model, label).set(sums["max_batch"])
        m["kv_tokens"].labels(model, label).set(sums["kv_cache_tokens"])
        m["kv_capacity"].labels(model, label).set(sums["kv_cache_capacity_tokens"])
        m["kv_ratio"].labels(model, label).set(min(1.0, max(0.0, ratio)))
        m["memory"].labels(model, label).set(sums["memory_bytes"])

    def observe_completions(self, node: str, ttfts: Iterable[float], latencies: Iterable[float]) -> None:
        """Per-request timings (seconds) of finished requests on `node`."""
        label = self._node(node)
        ttft = self._m["ttft"].labels(self.model, label)
        latency = self._m["latency"].labels(self.model, label)
        for t in ttfts:
            ttft.observe(max(0.0, float(t)))
        for t in latencies:
            latency.observe(max(0.0, float(t)))

    def actor_restarted(self, node: str, actor_key: str | None = None) -> None:
        """An actor on `node` was restarted. With `actor_key`, its token baseline goes back
        to 0 at once (a fresh engine), so no tokens of the new instance are missed."""
        label = self._node(node)
        self._m["restarts"].labels(self.model, label).inc()
        if actor_key is not None:
            with self._lock:
                self._last_tokens.pop(actor_key, None)
                if self._actor_stats.pop(actor_key, None) is not None:
                    self._refresh_node(label)


def _dist_version(name: str) -> str:
    """The installed version of a distribution, or "unknown" (e.g. run from a source tree)."""
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "unknown"

def port_message(host: str, port: int | None, err: OSError) -> str:
    """Why the endpoint cannot listen at host:port, and the fix (one line)."""
    why = err.strerror or str(err)
    taken = err.errno == errno.EADDRINUSE
    return (
        f"metrics.port {port} on {host}: cannot serve metrics ({why}"
        + ("; another upg-batch job, or another program, is using it" if taken else "")
        + f"); set metrics.port to a free port in the job file or with --set metrics.port=PORT (0 for no endpoint)"
    )


def port_problem(host: str, port: int | None) -> str | None:
    """None if the endpoint could listen at host:port now (it binds and closes a socket as the
    HTTP server would); else the message of port_message. Port 0 or None: no endpoint, no problem."""
    if not port:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
            s.bind(addr)
    except OSError as e:
        return port_message(host, port, e)
    return None
