"""A real Prometheus scrapes a real upg-batch job on a two-node local Ray cluster.

Prometheus (Debian's `prometheus`, see scripts/install-test-deps.sh) runs on a loopback port
with a temp copy of configs/prometheus.yml whose only change is the driver's port. The job is
sized from the engine's speed measured on this machine just before it runs, so that every
shard lasts several scrape intervals on a fast idle machine and a slow loaded one alike.
After the job, the test reads every scrape Prometheus stored: tokens/s must have been
positive, each node must have its own series, each node's token counter must have risen
between two scrapes that saw none of its shards commit (the driver's polls deliver progress
while a shard runs), and every PromQL expression of the Grafana dashboard (template variables
filled in as Grafana would) must parse and return at least one series when evaluated at a
moment while the job ran. At the end, the rows Prometheus saw must add up to the input's rows.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_YML = ROOT / "configs" / "prometheus.yml"
DASHBOARD = ROOT / "configs" / "grafana" / "upg-batch.json"
MODEL = ROOT / "tests" / "fixtures" / "models" / "llama-tiny"
DRIVER_TARGET = "127.0.0.1:9464"  # the target configs/prometheus.yml ships with

# How Grafana fills its built-in variables for a 1 s scrape interval: $__rate_interval is
# max($__interval + scrape interval, 4 x scrape interval).
GRAFANA_BUILTINS = {"__rate_interval": "4s", "__interval": "1s", "__range": "5m", "__range_s": "300"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A Prometheus server on 127.0.0.1 scraping the driver at `target_port`."""

    def __init__(self, workdir: Path, target_port: int) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not on PATH: run scripts/install-test-deps.sh"
        cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
        (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "upg-batch"]
        assert job["static_configs"] == [{"targets": [DRIVER_TARGET]}], job
        job["static_configs"] = [{"targets": [f"127.0.0.1:{target_port}"]}]  # the only change
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(cfg))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.time()
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{self.port}",
             f"--storage.tsdb.path={workdir / 'data'}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"prometheus exited: {self.log()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready after 60 s: {self.log()}"
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: str) -> object:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: the expression does not parse or evaluate
            body = json.load(e)
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query, now or at time `at`: [{'metric': {...}, 'value': [t, 'v']}, ...]."""
        data = self.api("query", query=expr, **({} if at is None else {"time": f"{at:.3f}"}))
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return data["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def series(self, selector: str, start: float, end: float) -> list[dict]:
        """The series of `selector` that have samples between start and end (as Grafana asks
        for a dashboard's time range)."""
        return self.api("series", **{"match[]": selector, "start": f"{start:.3f}", "end": f"{end:.3f}"})  # type: ignore[return-value]

    def scrapes(self, selector: str) -> list[tuple[dict, dict[float, float]]]:
        """Every sample of `selector` this server stored: [(labels, {scrape time: value}), ...],
        one entry per series. The samples of one scrape share its timestamp."""
        now = time.time()
        data = self.api("query", query=f"{selector}[{math.ceil(now - self.started) + 60}s]", time=f"{now:.3f}")
        assert data["resultType"] == "matrix", f"{selector}: {data['resultType']}"
        return [(s["metric"], {float(t): float(v) for t, v in s["values"]}) for s in data["result"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self._log.close()


# -- the dashboard, as Grafana would query it --------------------------------------------
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[str, str]]:
    out = []
    for panel in dashboard()["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out.extend((f"{p['title']} [{t['refId']}]", t["expr"]) for t in p.get("targets", []))
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Fill $var, ${var} and ${var:format} as Grafana does; an unknown variable fails."""

    def fill(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        assert name in variables, f"unknown variable ${name} in {expr}"
        return variables[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", fill, expr)


def promql_regex_escape(value: str) -> str:
    """A label value as a literal inside a PromQL regex string, escaped as Grafana does it
    (regex metacharacters get a backslash, itself escaped for the PromQL string)."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"([$^*+?.()|{}\[\]'])", r"\\\\\1", value)


def label_values(prom: Prometheus, query: str, variables: dict[str, str], at: float) -> list[str]:
    """Evaluate a Grafana `label_values(selector, label)` variable query over the dashboard's
    time range ending at `at`."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", substitute(query, variables).strip())
    assert m, f"not a label_values() query: {query}"
    selector, label = m.groups()
    start = at - float(GRAFANA_BUILTINS["__range_s"])
    return sorted({s[label] for s in prom.series(selector, start, at) if label in s})


def check_dashboard(prom: Prometheus, at: float) -> tuple[list[str], dict[str, list[str]]]:
    """Fill the template variables from Prometheus, evaluate every panel query, as Grafana
    would have at time `at`.

    Returns the problems (empty: every query parsed and returned a series) and the values
    each variable took."""
    variables: dict[str, str] = {**GRAFANA_BUILTINS, "datasource": "Prometheus"}
    values: dict[str, list[str]] = {}
    problems = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        found = label_values(prom, var["query"]["query"], variables, at)
        values[var["name"]] = found
        if not found:
            problems.append(f"variable ${var['name']}: {var['query']['query']} has no values")
        # the multi-value regex Grafana builds for "All" selected values
        variables[var["name"]] = "(" + "|".join(map(promql_regex_escape, found)) + ")" if found else ".*"
    for title, expr in dashboard_targets():
        filled = substitute(expr, variables)
        try:
            if not prom.query(filled, at=at):
                problems.append(f"{title}: no series for {filled}")
        except AssertionError as e:
            problems.append(f"{title}: {e}")
    return problems, values


# -- the job ------------------------------------------------------------------------------
MAX_TOKENS = 400
MAX_BATCH = 16
POLL_S = 0.5  # the job's metrics.poll_interval_s
SHARDS = 4  # two per node: each node commits a shard, then runs another one
RATE = GRAFANA_BUILTINS["__rate_interval"]
# The engine's speed is measured by a job of one shard per node, of whole batches (so the
# ramp-down at the end of a shard, when fewer rows than a batch are left, weighs little).
CALIBRATION_SHARD_ROWS = 8 * MAX_BATCH


def scrape_interval_s() -> float:
    """The scrape interval of configs/prometheus.yml, in seconds."""
    value = str(yaml.safe_load(PROMETHEUS_YML.read_text())["global"]["scrape_interval"])
    m = re.fullmatch(r"(\d+)(ms|s|m)", value)
    assert m, f"scrape_interval {value!r}: not a duration this test reads"
    return int(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(2)]


def shard_seconds() -> float:
    """How long each shard of the job should run. For Prometheus to show a node's token count
    from within a shard, two of its scrapes must fall inside one shard with a driver poll
    between them: at least two scrape intervals and one poll interval. Three times that, at the
    speed measured just before the job, keeps the check valid if the machine gets up to three
    times faster meanwhile (a concurrent load ending); two engines running at once on the
    job's nodes only make the shards longer."""
    return 3 * (2 * scrape_interval_s() + POLL_S)


@pytest.fixture(scope="module")
def ray_cluster():
    """A two-node Ray cluster on this machine (loopback only), one CPU per node."""
    from ray.cluster_utils import Cluster

    args = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={**args, "include_dashboard": False})
    try:
        cluster.add_node(**args)
        cluster.wait_for_nodes(timeout=120)  # raylets start slowly on a loaded machine
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture
def prometheus_for(tmp_path):
    servers = []

    def start(target_port: int) -> Prometheus:
        servers.append(Prometheus(tmp_path / "prometheus", target_port))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def driver_env() -> dict[str, str]:
    """The job's environment. The test cluster listens on 127.0.0.1 only; on Linux, Ray would
    rewrite a 127.0.0.1 cluster address to the machine's outward IP (where nothing listens)
    unless it treats this machine as a single-host setup, as it always does on macOS."""
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def write_job(folder: Path, rows: int, shard_rows: int, metrics_port: int, address: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [f"Row {i}: write a story about the number {i}." for i in range(rows)]
    pq.write_table(pa.table({"id": list(range(rows)), "prompt": prompts}), folder / "prompts.parquet")
    job = {
        "model": {"path": str(MODEL), "threads": 1, "max_batch": MAX_BATCH},
        "input": {"path": str(folder / "prompts.parquet"), "id_column": "id", "shard_rows": shard_rows},
        "output": {"path": str(folder / "out")},
        "sampling": {"max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 7},
        "cluster": {"address": address, "num_cpus_per_actor": 1.0, "shards_in_flight": 1},
        "metrics": {"host": "127.0.0.1", "port": metrics_port, "poll_interval_s": POLL_S},
        "progress": {"bar": "off", "log_interval_s": 5.0},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_job(job: Path, limit: float, what: str) -> dict:
    """Run `upg-batch run` on a job file (its log and summary beside it); its summary."""
    folder = job.parent
    log_path = folder / "job.log"
    with open(log_path, "wb") as log, open(folder / "summary.json", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "upg_batch", "run", "--json", str(job)], stdout=out, stderr=log, cwd=folder, env=driver_env())
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} ran for more than {limit:.0f} s:\n{log_path.read_text(errors='replace')[-4000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert rc == 0, f"{what}: upg-batch run exited {rc}:\n{log_path.read_text(errors='replace')[-4000:]}"
    return json.loads((folder / "summary.json").read_text())


def measure_speed(folder: Path, address: str) -> tuple[float, float]:
    """(completion tokens per second of one engine actor, completion tokens per row), measured
    here and now by a job on the test cluster with the job's model, engine and sampling settings
    and its first rows, one shard per node at once, as the job will run (the engine actors run
    under Ray's scheduling, e.g. at a lower CPU priority than other processes). The speed is the
    fastest shard's, so that no shard of the job is shorter than planned."""
    from upg_batch.commit import read_committed

    run_job(write_job(folder, 2 * CALIBRATION_SHARD_ROWS, CALIBRATION_SHARD_ROWS, 0, address), 240, "the calibration job")
    shards = list(read_committed(folder / "out")["shards"].values())
    assert len(shards) == 2 and all(e["errors"] == 0 and e["generate_s"] > 0 for e in shards), shards
    tokens = sum(e["completion_tokens"] for e in shards)
    return max(e["completion_tokens"] / e["generate_s"] for e in shards), tokens / (2 * CALIBRATION_SHARD_ROWS)


def by_node(scrapes: list[tuple[dict, dict[float, float]]]) -> dict[str, dict[float, float]]:
    out: dict[str, dict[float, float]] = {}
    for labels, samples in scrapes:
        assert labels["node"] not in out, f"two series for node {labels['node']}: {labels}"
        out[labels["node"]] = samples
    return out


def summed(scrapes: list[tuple[dict, dict[float, float]]]) -> dict[float, float]:
    out: dict[float, float] = {}
    for _, samples in scrapes:
        for t, v in samples.items():
            out[t] = out.get(t, 0.0) + v
    return out


@pytest.mark.timeout(540)
def test_prometheus_scrapes_a_two_node_job(tmp_path, ray_cluster, prometheus_for):
    from upg_batch.actor import node_label
    from upg_batch.commit import read_committed

    expected_nodes = {node_label(n.node_id, n.node_ip_address) for n in ray_cluster.list_all_nodes()}
    assert len(expected_nodes) == 2
    # Shards long enough for Prometheus to see progress inside them, on this machine as fast
    # as it is now: sized from the speed measured just before the job.
    tokens_per_s, tokens_per_row = measure_speed(tmp_path / "calibration", ray_cluster.address)
    shard_rows = math.ceil(shard_seconds() * tokens_per_s / tokens_per_row)
    rows_total = SHARDS * shard_rows
    sizing = (f"{SHARDS} shards of {shard_rows} rows, sized to run {shard_seconds():.1f} s each at the "
              f"{tokens_per_s:.0f} tokens/s and {tokens_per_row:.1f} tokens per row measured before the job")
    metrics_port = free_port()
    job = write_job(tmp_path, rows_total, shard_rows, metrics_port, ray_cluster.address)
    prom = prometheus_for(metrics_port)
    summary = run_job(job, float(os.environ.get("E2E_DEADLINE", 240)), f"the job ({sizing})")
    job_log = (tmp_path / "job.log").read_text(errors="replace")[-4000:]
    assert summary["rows_total"] == rows_total

    # The driver served its final values before it stopped (the target is gone now, so read
    # the last sample of each series).
    # (a scrape's samples become queryable a moment after the driver answered it)
    final_rows = None
    for _ in range(20):
        final_rows = prom.value("sum(last_over_time(upg_batch_rows_total[10m]))")
        if final_rows == rows_total:
            break
        time.sleep(0.5)
    assert final_rows == rows_total, f"final rows {final_rows}; scrape health: {prom.query('last_over_time(up[10m])')}\n{job_log}"

    # Every scrape Prometheus stored, per node: tokens generated, requests committed (the
    # latency histogram counts a node's requests when its shard commits, not before) and the
    # sequences its engine was running at the driver's latest poll.
    tokens = by_node(prom.scrapes("upg_batch_generation_tokens_total"))
    done = by_node(prom.scrapes("upg_batch_request_latency_seconds_count"))
    running = by_node(prom.scrapes("upg_batch_engine_running_sequences"))
    rows_seen = summed(prom.scrapes("upg_batch_rows_total"))
    times = sorted(set().union(*tokens.values()))
    shards = sorted((e["node"], round(e["generate_s"], 2)) for e in read_committed(tmp_path / "out")["shards"].values())

    def trail(node: str) -> list[tuple[float, float, float, float]]:
        """(scrape time, tokens, requests committed, sequences running) of a node."""
        return [(t, v, done.get(node, {}).get(t, 0.0), running.get(node, {}).get(t, 0.0)) for t, v in sorted(tokens[node].items())]

    rate = prom.api("query_range", query=f"sum(rate(upg_batch_generation_tokens_total[{RATE}]))", start=f"{times[0]:.3f}", end=f"{times[-1]:.3f}", step="1")
    max_rate = max((float(v) for s in rate["result"] for _, v in s["values"]), default=0.0)  # type: ignore[index]
    assert max_rate > 0, f"rate(upg_batch_generation_tokens_total[{RATE}]) was never positive; {sizing}\n{job_log}"
    nodes = {node for node, samples in tokens.items() if max(samples.values()) > 0}
    assert nodes == expected_nodes, f"per-node series {nodes}, cluster nodes {expected_nodes}"

    # Progress shows while shards run: on every node, two successive scrapes where its token
    # counter rose while none of its shards committed, the later one showing the batch
    # running, so its value was polled from the engine in the middle of a shard.
    for node in expected_nodes:
        rows = trail(node)
        live = [(a, b) for a, b in zip(rows, rows[1:]) if b[1] > a[1] and b[2] == a[2] and b[3] > 0]
        assert live, f"{node}: no token count from inside a shard reached Prometheus; {sizing}; shards (node, generate_s): {shards}; scrapes (time, tokens, committed, running): {rows}"

    # The dashboard as Grafana shows it while the job runs: evaluated at a scrape where both
    # nodes had committed a shard and rows were still left. A rate over a few seconds needs two
    # samples in its window, so the first such scrapes may lack a series; one that answers
    # every query is enough (a query that is wrong fails at all of them).
    candidates = [t for t in times if rows_seen.get(t, rows_total) < rows_total and all(done.get(n, {}).get(t, 0.0) > 0 for n in expected_nodes)]
    assert candidates, f"no scrape saw both nodes' first commits with rows left; {sizing}; shards (node, generate_s): {shards}"
    for at in candidates:
        problems, variable_values = check_dashboard(prom, at)
        if not problems:
            break
    assert not problems, f"dashboard queries that fail against the running job ({len(candidates)} scrapes tried), at the last:\n" + "\n".join(problems)
    assert set(variable_values["node"]) == expected_nodes
    assert variable_values["model"] == [MODEL.name]

    assert prom.value("sum(last_over_time(upg_batch_rows_left[10m]))") == 0
    committed = prom.value('last_over_time(upg_batch_shards{state="committed"}[10m])')
    assert committed == SHARDS
    per_node = prom.query("sum by (node) (last_over_time(upg_batch_generation_tokens_total[10m]))")
    assert {s["metric"]["node"] for s in per_node} == expected_nodes
    # every node generated; after the driver's final stats poll the counters equal what the
    # job's results say (no shard was retried, so no token was generated twice)
    assert all(float(s["value"][1]) > 0 for s in per_node), per_node
    assert sum(float(s["value"][1]) for s in per_node) == summary["completion_tokens"]
