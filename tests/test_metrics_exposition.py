"""JobMetrics: what the HTTP endpoint exposes, held to the table in docs/observability.md."""

from __future__ import annotations

import re
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from upg_batch.metrics import OVERFLOW_NODE, JobMetrics

DOCS = Path(__file__).resolve().parents[1] / "docs" / "observability.md"

# The names the issue fixes as a contract (the docs may list more, never fewer).
REQUIRED = {
    "upg_batch_prompt_tokens_total": ("counter", {"model", "node"}),
    "upg_batch_generation_tokens_total": ("counter", {"model", "node"}),
    "upg_batch_rows_total": ("counter", {"model", "outcome"}),
    "upg_batch_shards": ("gauge", {"model", "state"}),
    "upg_batch_time_to_first_token_seconds": ("histogram", {"model", "node"}),
    "upg_batch_request_latency_seconds": ("histogram", {"model", "node"}),
    "upg_batch_engine_running_sequences": ("gauge", {"model", "node"}),
    "upg_batch_kv_cache_usage_ratio": ("gauge", {"model", "node"}),
    "upg_batch_engine_memory_bytes": ("gauge", {"model", "node"}),
    "upg_batch_actor_restarts_total": ("counter", {"model", "node"}),
    "upg_batch_commit_duration_seconds": ("histogram", {"model"}),
    "upg_batch_build_info": ("gauge", {"model"}),
}

STATS = {
    "prompt_tokens_total": 0, "generation_tokens_total": 0, "running_sequences": 3, "waiting_sequences": 1,
    "kv_cache_tokens": 40, "kv_cache_capacity_tokens": 160, "kv_cache_usage_ratio": 0.25,
    "memory_bytes": 1_000_000, "max_batch": 8,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) from the table under '## Every metric' in docs/observability.md."""
    text = DOCS.read_text()
    section = text.split("## Every metric", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`upg_batch_"):
            continue
        name = cells[0].strip("`")
        labels = set(re.findall(r"`([a-z_]+)`", cells[2]))
        assert name not in rows, f"{name} listed twice in {DOCS.name}"
        rows[name] = (cells[1], labels)
    return rows


def scrape(url: str) -> dict[str, tuple[str, set[str], list]]:
    """Exposed name -> (type, label names, samples), names as exposed (counters with _total)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = set().union(*(s.labels.keys() for s in fam.samples)) - {"le"}
        out[name] = (fam.type, labels, fam.samples)
    return out


def exercise(m: JobMetrics) -> None:
    """Touch every method, so every labelled metric has at least one series."""
    m.set_shards(pending=3, running=2, committed=1, failed=0)
    m.set_rows(total=100, done=10)
    m.observe_engine_stats("node-a", "actor-1", {**STATS, "prompt_tokens_total": 50, "generation_tokens_total": 20})
    m.observe_completions("node-a", [0.02, 0.03], [0.4, 0.6])
    m.rows_done("ok", 9)
    m.rows_done("error", 1)
    m.actor_restarted("node-a")
    m.observe_commit(0.012)


def value(m: JobMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, {"model": m.model, **labels})


def test_docs_list_the_required_metrics():
    docs = documented_metrics()
    for name, (typ, labels) in REQUIRED.items():
        assert name in docs, f"{name} missing from {DOCS.name}"
        assert docs[name][0] == typ, f"{name}: documented as {docs[name][0]}, must be {typ}"
        assert labels <= docs[name][1], f"{name}: labels {docs[name][1]} lack {labels - docs[name][1]}"
    for name, (typ, _) in docs.items():
        assert typ in {"counter", "gauge", "histogram"}, f"{name}: type {typ!r} (summaries are not used)"
        assert (typ == "counter") == name.endswith("_total"), f"{name}: only counters end in _total"


def test_exposition_matches_docs():
    m = JobMetrics(model="llama-tiny", host="127.0.0.1", port=free_port())
    m.start()
    try:
        exercise(m)
        exposed = scrape(m.url)
    finally:
        m.stop()
    docs = documented_metrics()
    assert set(exposed) == set(docs), f"exposed but undocumented: {set(exposed) - set(docs)}; documented but not exposed: {set(docs) - set(exposed)}"
    for name, (typ, labels, samples) in exposed.items():
        assert (typ, labels) == docs[name], f"{name}: exposed as {typ} {sorted(labels)}, documented as {docs[name][0]} {sorted(docs[name][1])}"
        assert all(s.labels["model"] == "llama-tiny" for s in samples)
        assert not any(s.name.endswith("_created") for s in samples)
    build = exposed["upg_batch_build_info"][2]
    assert [s.value for s in build] == [1.0]
    tokens = {s.labels["node"]: s.value for s in exposed["upg_batch_generation_tokens_total"][2]}
    assert tokens == {"node-a": 20.0}
    rows = {s.labels["outcome"]: s.value for s in exposed["upg_batch_rows_total"][2]}
    assert rows == {"ok": 9.0, "error": 1.0}
    shards = {s.labels["state"]: s.value for s in exposed["upg_batch_shards"][2]}
    assert shards == {"pending": 3.0, "running": 2.0, "committed": 1.0, "failed": 0.0}
    left = exposed["upg_batch_rows_left"][2]
    assert [s.value for s in left] == [90.0]


def test_counters_never_decrease_when_an_actor_restarts():
    m = JobMetrics(model="tiny", port=0)
    seen = []

    def poll(gen: int, key: str = "actor-1") -> None:
        m.observe_engine_stats("node-a", key, {**STATS, "prompt_tokens_total": gen * 2, "generation_tokens_total": gen})
        seen.append(value(m, "upg_batch_generation_tokens_total", node="node-a"))

    for gen in (0, 10, 10, 25, 40):
        poll(gen)
    assert seen[-1] == 40
    # the actor died and came back under the same key: its engine counts from 0 again
    m.actor_restarted("node-a")
    for gen in (5, 30):
        poll(gen)
    assert seen[-1] == 40 + 30
    # restart announced with its key: the baseline resets at once, so a new engine that is
    # already past the old value when first polled still counts in full
    m.actor_restarted("node-a", actor_key="actor-1")
    poll(35)
    assert seen[-1] == 70 + 35
    # a replacement actor with a new key starts from its own zero
    poll(12, key="actor-2")
    assert seen[-1] == 105 + 12
    assert all(b >= a for a, b in zip(seen, seen[1:])), seen
    assert value(m, "upg_batch_prompt_tokens_total", node="node-a") == 2 * seen[-1]
    assert value(m, "upg_batch_actor_restarts_total", node="node-a") == 2


def test_node_gauges_sum_the_actors_of_a_node():
    m = JobMetrics(model="tiny", port=0)
    m.observe_engine_stats("node-a", "gpu0", STATS)
    m.observe_engine_stats("node-a", "gpu1", {**STATS, "kv_cache_tokens": 120})
    m.observe_engine_stats("node-b", "gpu0@b", {**STATS, "running_sequences": 8})
    assert value(m, "upg_batch_engine_running_sequences", node="node-a") == 6
    assert value(m, "upg_batch_engine_max_batch", node="node-a") == 16
    assert value(m, "upg_batch_kv_cache_usage_ratio", node="node-a") == pytest.approx(160 / 320)
    assert value(m, "upg_batch_engine_memory_bytes", node="node-a") == 2_000_000
    assert value(m, "upg_batch_engine_running_sequences", node="node-b") == 8
    m.forget_actor("gpu1")
    assert value(m, "upg_batch_engine_running_sequences", node="node-a") == 3
    assert value(m, "upg_batch_kv_cache_usage_ratio", node="node-a") == pytest.approx(0.25)


def test_node_label_is_bounded():
    m = JobMetrics(model="tiny", port=0, max_nodes=2)
    for i in range(5):
        m.observe_engine_stats(f"node-{i}", f"actor-{i}", {**STATS, "generation_tokens_total": 10})
    nodes = {s.labels["node"] for f in m.registry.collect() if f.name == "upg_batch_generation_tokens" for s in f.samples}
    assert nodes == {"node-0", "node-1", OVERFLOW_NODE}
    assert value(m, "upg_batch_generation_tokens_total", node=OVERFLOW_NODE) == 30


@pytest.mark.parametrize("port", [0, None])
def test_port_zero_or_none_disables_the_server(port):
    m = JobMetrics(model="tiny", port=port)
    m.start()
    try:
        assert m.url is None
        exercise(m)  # every call still works
        assert value(m, "upg_batch_rows_total", outcome="ok") == 9
    finally:
        m.stop()
    m.stop()


def test_stop_frees_the_port_and_jobs_do_not_clash():
    port = free_port()
    first = JobMetrics(model="a", host=None, port=port)
    assert first.host == "127.0.0.1"
    first.start()
    first.rows_done("ok", 5)
    other = JobMetrics(model="a", port=0)  # same names, own registry: no "Duplicated timeseries"
    other.rows_done("ok", 1)
    assert "upg_batch_rows_total" in scrape(first.url)
    first.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR tolerates the scrape's TIME_WAIT, not a socket still listening
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    second = JobMetrics(model="b", port=port)
    second.start()
    try:
        rows = scrape(second.url)["upg_batch_rows_total"][2]
        assert {s.labels["model"] for s in rows} == {"b"}
        assert sum(s.value for s in rows) == 0
    finally:
        second.stop()
    assert REGISTRY.get_sample_value("upg_batch_rows_total", {"model": "a", "outcome": "ok"}) is None


def test_concurrent_polls_from_threads():
    m = JobMetrics(model="tiny", port=0)

    def worker(i: int) -> None:
        for gen in range(1, 501):
            m.observe_engine_stats(f"node-{i % 2}", f"actor-{i}", {**STATS, "generation_tokens_total": gen})
            m.rows_done("ok", 1)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(value(m, "upg_batch_generation_tokens_total", node=f"node-{n}") for n in (0, 1))
    assert total == 4 * 500
    assert value(m, "upg_batch_rows_total", outcome="ok") == 4 * 500


def test_bad_outcome_is_refused():
    m = JobMetrics(model="tiny", port=0)
    with pytest.raises(ValueError, match="outcome"):
        m.rows_done("maybe", 1)


class _WatchedCondition(threading.Condition):
    """JobMetrics' scrape condition, telling the test when stop() starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        self.waiting.set()
        return super().wait(timeout)


def test_stop_waits_for_a_final_scrape_only_when_scraped():
    import time

    m = JobMetrics(model="tiny", port=free_port())
    m._scraped = watched = _WatchedCondition()
    m.start()
    m.stop()  # never scraped: no wait at all
    assert watched.waits == []
    assert m.url is None

    # Scraped twice, 1 s apart: stop() waits for two more scrapes (at most 3 x 1 s + 1 s).
    m = JobMetrics(model="tiny", port=free_port())
    m._scraped = watched = _WatchedCondition()
    m.start()
    url = m.url
    scrape(url)
    time.sleep(1.0)
    scrape(url)
    m.rows_done("ok", 7)  # the job's last commit, right before it ends
    t0 = time.monotonic()
    stopper = threading.Thread(target=m.stop)
    stopper.start()
    assert watched.waiting.wait(timeout=60), "stop() did not wait for a final scrape"
    budget = watched.waits[0]  # how long stop() was prepared to wait, by its own figures
    assert budget is not None and 3.0 < budget <= 30.0, watched.waits
    final = scrape(url)["upg_batch_rows_total"][2]
    assert sum(s.value for s in final) == 7  # the final value is served while stop() waits
    assert stopper.is_alive() or time.monotonic() - t0 >= budget, "stop() returned after one fresh scrape"
    scrape(url)
    stopper.join(timeout=60)
    waited = time.monotonic() - t0
    assert not stopper.is_alive() and m.url is None
    # it returned on the second fresh scrape, not at the end of its budget
    assert waited < budget - 1.0, (waited, watched.waits)


def test_an_endpoint_beyond_loopback_is_warned_about(caplog):
    from upg_batch.metrics import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "metrics.example"))
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        caplog.clear()
        m = JobMetrics(model="tiny", host=host, port=free_port(), linger_s=0)
        with caplog.at_level("WARNING", logger="upg_batch"):
            m.start()
        m.stop()
        lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert bool(lines) == warned, lines
        if warned:
            assert "metrics.host 0.0.0.0" in lines[0] and "unauthenticated" in lines[0]
