"""A real Prometheus scrapes a real upg-batch job on a two-node local Ray cluster.

Prometheus (Debian's `prometheus`, see scripts/install-test-deps.sh) runs on a loopback port
with a temp copy of configs/prometheus.yml whose only change is the driver's port. While the
job runs, the test asks Prometheus' HTTP API whether tokens/s is positive, whether each node
has its own series, and evaluates every PromQL expression of the Grafana dashboard (template
variables filled in as Grafana would): each must parse and return at least one series. At the
end, the rows Prometheus saw must add up to the input's rows.
"""

from __future__ import annotations

import json
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

    def query(self, expr: str) -> list[dict]:
        """Instant query: [{'metric': {...}, 'value': [t, 'v']}, ...]."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return data["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def series(self, selector: str) -> list[dict]:
        return self.api("series", **{"match[]": selector})  # type: ignore[return-value]

    def targets_up(self) -> bool:
        return self.value('up{job="upg-batch"}') == 1.0

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


def label_values(prom: Prometheus, query: str, variables: dict[str, str]) -> list[str]:
    """Evaluate a Grafana `label_values(selector, label)` variable query."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", substitute(query, variables).strip())
    assert m, f"not a label_values() query: {query}"
    selector, label = m.groups()
    return sorted({s[label] for s in prom.series(selector) if label in s})


def check_dashboard(prom: Prometheus) -> tuple[list[str], dict[str, list[str]]]:
    """Fill the template variables from Prometheus, evaluate every panel query.

    Returns the problems (empty: every query parsed and returned a series) and the values
    each variable took."""
    variables: dict[str, str] = {**GRAFANA_BUILTINS, "datasource": "Prometheus"}
    values: dict[str, list[str]] = {}
    problems = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        found = label_values(prom, var["query"]["query"], variables)
        values[var["name"]] = found
        if not found:
            problems.append(f"variable ${var['name']}: {var['query']['query']} has no values")
        # the multi-value regex Grafana builds for "All" selected values
        variables[var["name"]] = "(" + "|".join(map(promql_regex_escape, found)) + ")" if found else ".*"
    for title, expr in dashboard_targets():
        filled = substitute(expr, variables)
        try:
            if not prom.query(filled):
                problems.append(f"{title}: no series for {filled}")
        except AssertionError as e:
            problems.append(f"{title}: {e}")
    return problems, values


# -- the job ------------------------------------------------------------------------------
# Sized so the job runs ~20-40 s on two CPU cores: long shards, so progress must show while
# a shard runs, not only when it ends.
ROWS = 1200
SHARD_ROWS = 100
MAX_TOKENS = 400
RATE = GRAFANA_BUILTINS["__rate_interval"]


@pytest.fixture(scope="module")
def ray_cluster():
    """A two-node Ray cluster on this machine (loopback only), one CPU per node."""
    from ray.cluster_utils import Cluster

    args = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={**args, "include_dashboard": False})
    try:
        cluster.add_node(**args)
        cluster.wait_for_nodes()
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


def write_job(tmp_path: Path, metrics_port: int, address: str) -> Path:
    prompts = [f"Row {i}: write a story about the number {i}." for i in range(ROWS)]
    pq.write_table(pa.table({"id": list(range(ROWS)), "prompt": prompts}), tmp_path / "prompts.parquet")
    job = {
        "model": {"path": str(MODEL), "threads": 1, "max_batch": 16},
        "input": {"path": str(tmp_path / "prompts.parquet"), "id_column": "id", "shard_rows": SHARD_ROWS},
        "output": {"path": str(tmp_path / "out")},
        "sampling": {"max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 7},
        "cluster": {"address": address, "num_cpus_per_actor": 1.0, "shards_in_flight": 1},
        "metrics": {"host": "127.0.0.1", "port": metrics_port, "poll_interval_s": 0.5},
        "progress": {"bar": "off", "log_interval_s": 5.0},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.timeout(300)
def test_prometheus_scrapes_a_two_node_job(tmp_path, ray_cluster, prometheus_for):
    from upg_batch.actor import node_label

    expected_nodes = {node_label(n.node_id, n.node_ip_address) for n in ray_cluster.list_all_nodes()}
    assert len(expected_nodes) == 2
    metrics_port = free_port()
    job = write_job(tmp_path, metrics_port, ray_cluster.address)
    prom = prometheus_for(metrics_port)
    log_path = tmp_path / "job.log"
    with open(log_path, "wb") as log, open(tmp_path / "summary.json", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "upg_batch", "run", "--json", str(job)], stdout=out, stderr=log, cwd=tmp_path, env=driver_env())
    max_rate, nodes, trail = 0.0, set(), []
    dashboard_ok, problems, variable_values = False, ["never evaluated: no rows were committed while the job ran"], {}
    deadline = time.monotonic() + float(os.environ.get("E2E_DEADLINE", 240))
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"the job ran for more than 240 s:\n{log_path.read_text(errors='replace')[-4000:]}"
            time.sleep(1.0)
            if not prom.targets_up():
                continue
            max_rate = max(max_rate, prom.value(f"sum(rate(upg_batch_generation_tokens_total[{RATE}]))") or 0.0)
            nodes |= {s["metric"]["node"] for s in prom.query("upg_batch_generation_tokens_total > 0")}
            tokens = prom.value("sum(upg_batch_generation_tokens_total)") or 0.0
            rows = prom.value("sum(upg_batch_rows_total)") or 0.0
            trail.append((tokens, rows))
            if not dashboard_ok and 0 < rows < ROWS and len(nodes) == 2:
                problems, variable_values = check_dashboard(prom)
                dashboard_ok = not problems
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    job_log = log_path.read_text(errors="replace")[-4000:]
    assert rc == 0, f"upg-batch run exited {rc}:\n{job_log}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows_total"] == ROWS

    assert max_rate > 0, f"rate(upg_batch_generation_tokens_total[{RATE}]) was never positive; trail {trail}\n{job_log}"
    assert nodes == expected_nodes, f"per-node series {nodes}, cluster nodes {expected_nodes}"
    # progress shows while shards run: tokens rose between two scrapes that saw the same rows
    assert any(t1 > t0 and r1 == r0 for (t0, r0), (t1, r1) in zip(trail, trail[1:])), trail
    assert dashboard_ok, "dashboard queries that fail against the running job:\n" + "\n".join(problems)
    assert set(variable_values["node"]) == expected_nodes
    assert variable_values["model"] == [MODEL.name]

    # The driver served its final values before it stopped (the target is gone now, so read
    # the last sample of each series).
    # (a scrape's samples become queryable a moment after the driver answered it)
    final_rows = None
    for _ in range(20):
        final_rows = prom.value("sum(last_over_time(upg_batch_rows_total[10m]))")
        if final_rows == ROWS:
            break
        time.sleep(0.5)
    assert final_rows == ROWS, f"final rows {final_rows}; scrape health: {prom.query('last_over_time(up[10m])')}\n{job_log}"
    assert prom.value("sum(last_over_time(upg_batch_rows_left[10m]))") == 0
    committed = prom.value('last_over_time(upg_batch_shards{state="committed"}[10m])')
    assert committed == ROWS // SHARD_ROWS
    per_node = prom.query("sum by (node) (last_over_time(upg_batch_generation_tokens_total[10m]))")
    assert {s["metric"]["node"] for s in per_node} == expected_nodes
    # every node generated; after the driver's final stats poll the counters equal what the
    # job's results say (no shard was retried, so no token was generated twice)
    assert all(float(s["value"][1]) > 0 for s in per_node), per_node
    assert sum(float(s["value"][1]) for s in per_node) == summary["completion_tokens"]
