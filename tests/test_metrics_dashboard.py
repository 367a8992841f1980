"""The shipped Grafana dashboard, Grafana provisioning and Prometheus config are well formed
and refer only to metrics that exist (the e2e test evaluates every query for real)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import yaml


def _sibling(name: str):
    """A module of this folder, loaded by path (works however pytest sets sys.path)."""
    spec = importlib.util.spec_from_file_location(f"_upg_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


documented_metrics = _sibling("test_metrics_exposition").documented_metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "configs" / "grafana" / "upg-batch.json"
PROVISIONING = ROOT / "configs" / "grafana" / "provisioning"
PROMETHEUS_YML = ROOT / "configs" / "prometheus.yml"

# Panels the dashboard must have (title words), per the observability issue.
REQUIRED_PANELS = ["Tokens/s, total", "Tokens/s per node", "Rows/s", "Rows done vs left", "ETA", "Error rate",
                   "Time to first token", "Request latency", "Batch fill per node", "KV cache use per node",
                   "Engine memory per node"]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in all_panels(dashboard()) for t in p.get("targets", [])]


def test_dashboard_is_grafana_json():
    d = dashboard()
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 30
    assert d["uid"] == "upg-batch" and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert set(variables) >= {"datasource", "model", "node"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("model", "node"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "${datasource}"
        assert v["includeAll"] and v["multi"] and v["allValue"] == ".*"
        assert re.fullmatch(r"label_values\(.+, %s\)" % name, v["query"]["query"]), v["query"]
    ids = set()
    for p in all_panels(d):
        if p["type"] == "row":
            continue
        assert p["id"] not in ids
        ids.add(p["id"])
        g = p["gridPos"]
        assert set(g) >= {"h", "w", "x", "y"} and g["x"] + g["w"] <= 24, p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]
    titles = [p["title"] for p in all_panels(d)]
    for want in REQUIRED_PANELS:
        assert want in titles, f"panel {want!r} missing"


def test_panels_do_not_overlap():
    cells = {}
    for p in all_panels(dashboard()):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_dashboard_uses_only_documented_metrics_and_filters_by_variables():
    documented = set(documented_metrics())
    histograms = {n for n, (t, _) in documented_metrics().items() if t == "histogram"}
    exposed = documented | {h + s for h in histograms for s in ("_bucket", "_sum", "_count")}
    for expr in dashboard_exprs():
        used = set(re.findall(r"\bupg_batch_[a-z_]+", expr))
        assert used, expr
        assert used <= exposed, f"{expr}: unknown {used - exposed}"
        assert 'model=~"$model"' in expr, f"not filtered by $model: {expr}"
        # tokens/s must come from counters through rate(), never from an exported gauge
        if "tokens_total" in expr:
            assert "rate(" in expr, expr
        assert "_created" not in expr


def test_provisioning_files():
    ds = yaml.safe_load(next((PROVISIONING / "datasources").glob("*.yml")).read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://127.0.0.1:")
    prov = yaml.safe_load(next((PROVISIONING / "dashboards").glob("*.yml")).read_text())
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_prometheus_config_scrapes_the_driver():
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    interval = cfg["global"]["scrape_interval"]
    assert re.fullmatch(r"[12]s", interval), f"scrape_interval {interval}: keep it short (1-2 s)"
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "upg-batch"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["127.0.0.1:9464"]
    check = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_install_script_installs_prometheus_only_when_missing():
    script = (ROOT / "scripts" / "install-test-deps.sh").read_text()
    assert "command -v prometheus" in script
    assert "apt-get update" in script
    assert "apt-get install -y --no-install-recommends prometheus" in script
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "install-test-deps.sh")]).returncode == 0
