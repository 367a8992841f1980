"""Jobs on a multi-node Ray cluster on this machine: every node works; a lost node loses no row."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import ray
from conftest import read_output, write_job, write_prompts
from ray.cluster_utils import Cluster

from upg_batch.actor import node_label
from upg_batch.commit import MANIFEST, OutputError, read_committed
from upg_batch.config import load_config
from upg_batch.runner import Runner

NODE_ARGS = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():  # another module's local Ray; it is started again when needed
        ray.shutdown()
    import ray._private.ray_constants as ray_constants

    # The test cluster listens on 127.0.0.1 only. On Linux, ray.init would rewrite a
    # 127.0.0.1 address to the machine's outward IP (where nothing listens) unless Ray
    # treats this machine as single-host (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at
    # import, hence the attribute).
    mp = pytest.MonkeyPatch()
    mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    c = Cluster(initialize_head=True, connect=False, head_node_args={**NODE_ARGS, "include_dashboard": False, "resources": {"node_a": 1}})
    try:
        c.add_node(**NODE_ARGS, resources={"node_b": 1})
        c.wait_for_nodes(timeout=120)  # raylets start slowly on a loaded machine
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        mp.undo()


def _labels(c: Cluster) -> set[str]:
    return {node_label(n.node_id, n.node_ip_address) for n in c.list_all_nodes()}


def _committed(out: Path) -> int:
    try:
        return len(read_committed(out)["shards"])  # the snapshot and the commit log
    except (OSError, ValueError, OutputError):
        return 0


def test_every_node_does_work(tmp_path: Path, cluster: Cluster):
    f = write_prompts(tmp_path / "d.parquet", 64)
    out = tmp_path / "out"
    summary = Runner(load_config(write_job(tmp_path, f, out, input={"shard_rows": 4}))).run()
    assert sorted(read_output(out).column("id").to_pylist()) == list(range(64))
    nodes = summary["nodes"]
    assert set(nodes) == _labels(cluster) and len(nodes) == 2
    for share in nodes.values():
        assert share["rows"] > 0 and share["shards"] > 0 and share["completion_tokens"] > 0
    assert sum(s["rows"] for s in nodes.values()) == 64
    manifest = json.loads((out / MANIFEST).read_text())
    assert {e["node"] for e in manifest["shards"].values()} == _labels(cluster)


def test_a_node_lost_mid_job_loses_no_row(tmp_path: Path, cluster: Cluster, monkeypatch):
    extra = cluster.add_node(**NODE_ARGS, resources={"node_c": 1})
    cluster.wait_for_nodes(timeout=120)
    f = write_prompts(tmp_path / "d.parquet", 96)
    out = tmp_path / "out"
    job = write_job(tmp_path, f, out)  # 12 shards
    # shards of >= 1 s on three actors, two queued on each: once the first commits, every
    # actor (the lost node's too) holds shards for seconds more
    monkeypatch.setenv("UPG_BATCH_TEST_SHARD_DELAY_S", "1.0")
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(Runner(load_config(job)).run()))
    t.start()
    try:
        deadline = time.monotonic() + 120
        while _committed(out) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _committed(out) >= 1
        cluster.remove_node(extra, allow_graceful=False)
        removed_at = _committed(out)
    finally:
        t.join(timeout=300)
    assert not t.is_alive()
    # the two other actors hold at most 2 x 2 shards: with more left, the lost node held some
    assert 12 - removed_at > 2 * 2, f"{removed_at} of 12 shards had committed when the node was lost"
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == list(range(96))
    assert read_output(out).column("error").null_count == 96
    assert result["shards_failed"] == 0
    assert len(result["nodes"]) >= 2
    # the shards the lost node held ran again elsewhere
    manifest = json.loads((out / MANIFEST).read_text())
    assert any(e["attempt"] > 1 for e in manifest["shards"].values())
