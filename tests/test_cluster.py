"""Actor placement: how many actors each node gets, and what each asks Ray for (no Ray needed)."""

from __future__ import annotations

from typing import Any

import pytest

from upg_batch import cluster
from upg_batch.cluster import Slot, no_slots_message, plan_slots, shared_gpu_warnings, start_actor
from upg_batch.config import ClusterSection


def _node(node_id: str, cpus: float, gpus: float = 0, alive: bool = True) -> dict[str, Any]:
    res = {"CPU": cpus, "memory": 1e9, f"node:10.0.0.{node_id[-1]}": 1.0}
    if gpus:
        res["GPU"] = gpus
    return {"NodeID": node_id * 4, "Alive": alive, "NodeManagerAddress": f"10.0.0.{node_id[-1]}", "Resources": res}


@pytest.fixture
def nodes(monkeypatch):
    """Three live nodes (8 CPUs + 2 GPUs, 16 CPUs, 2 CPUs + 4 GPUs) and a dead one with GPUs."""
    fake = [_node("c3", 2, gpus=4), _node("a1", 8, gpus=2), _node("b2", 16), _node("d4", 64, gpus=8, alive=False)]
    monkeypatch.setattr(cluster.ray, "nodes", lambda: fake)
    return fake


def _counts(slots: list[Slot]) -> dict[str, tuple[int, float]]:
    out: dict[str, tuple[int, float]] = {}
    for s in slots:
        n, g = out.get(s.node_id[:2], (0, 0.0))
        out[s.node_id[:2]] = (n + 1, g + s.num_gpus)
    return out


def test_per_gpu_places_one_actor_per_gpu_each_reserving_one(nodes):
    slots = plan_slots(ClusterSection(actors="per_gpu"))
    # a1: 2 GPUs; b2: none; c3: 4 GPUs but CPUs for 2 actors only; d4 is dead
    assert _counts(slots) == {"a1": (2, 2.0), "c3": (2, 2.0)}
    assert all(s.num_gpus == 1.0 for s in slots)
    assert [s.index for s in slots] == list(range(len(slots)))


def test_per_gpu_without_cpu_reservation_uses_every_gpu(nodes):
    slots = plan_slots(ClusterSection(actors="per_gpu", num_cpus_per_actor=0))
    assert _counts(slots) == {"a1": (2, 2.0), "c3": (4, 4.0)}


def test_per_node_reserves_no_gpu_and_fits_the_cpus(nodes):
    slots = plan_slots(ClusterSection(actors="per_node", actors_per_node=3, num_cpus_per_actor=4))
    # a1: 8 // 4 = 2; b2: 3; c3: 2 // 4 = 0; a GPU engine here runs without a reservation
    assert _counts(slots) == {"a1": (2, 0.0), "b2": (3, 0.0)}


def test_no_gpu_anywhere_leaves_per_gpu_without_slots_and_says_why(monkeypatch):
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [_node("a1", 8), _node("b2", 8)])
    cl = ClusterSection(actors="per_gpu")
    assert plan_slots(cl) == []
    message = no_slots_message(cl)
    assert "per_gpu" in message and "per_node" in message and "--num-gpus" in message
    assert "per_gpu" not in no_slots_message(ClusterSection())


class _FakeActorClass:
    def __init__(self) -> None:
        self.options_seen: list[dict[str, Any]] = []

    def options(self, **kw: Any) -> "_FakeActorClass":
        self.options_seen.append(kw)
        return self

    def remote(self, *args: Any) -> Any:
        class _Handle:
            class ready:
                @staticmethod
                def remote() -> str:
                    return "ready-ref"

        return _Handle()


@pytest.mark.parametrize("actors, cpus, gpus", [("per_gpu", 2.0, 1.0), ("per_node", 1.0, 0.0)])
def test_start_actor_asks_ray_for_the_slots_gpus_on_its_node(monkeypatch, actors, cpus, gpus):
    fake = _FakeActorClass()
    monkeypatch.setattr(cluster, "EngineActor", fake)
    cl = ClusterSection(actors=actors, num_cpus_per_actor=cpus)
    slot = Slot(index=3, node_id="ab" * 28, node="10.0.0.1-abababab", num_gpus=gpus)
    start_actor(slot, cl, spec=None, hooks={}, now=5.0)
    (kw,) = fake.options_seen
    assert kw["num_gpus"] == gpus and kw["num_cpus"] == cpus
    assert kw["scheduling_strategy"].node_id == slot.node_id and kw["scheduling_strategy"].soft is False
    assert slot.state == "starting" and slot.key == "3.0" and slot.ready_ref == "ready-ref"


def test_gpu_engines_sharing_a_node_are_warned_about(nodes):
    slots = plan_slots(ClusterSection(actors="per_gpu"))
    for backend in ("gpu", "auto"):
        warnings = shared_gpu_warnings(slots, backend)
        assert len(warnings) == 2 and all("same adapter" in w and "2 engine actors" in w for w in warnings)
    assert shared_gpu_warnings(slots, "cpu") == []
    one_each = [s for s in slots if s.index in (0, 2)]  # one slot on each node
    assert shared_gpu_warnings(one_each, "gpu") == []
    per_node = plan_slots(ClusterSection(actors="per_node", actors_per_node=2))
    assert shared_gpu_warnings(per_node, "gpu") == []  # nothing reserved, nothing promised
