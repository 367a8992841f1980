"""Ray: connect (a local Ray bound to 127.0.0.1, or an existing cluster) and place actors.

Actors are pinned to nodes by node affinity, `cluster.actors_per_node` per node or one per GPU
(each reserving that GPU from Ray), as many as the node's CPUs allow, so every machine runs its
own engine.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from upg_batch import reap
from upg_batch.actor import EngineActor, node_label
from upg_batch.config import ClusterSection

__all__ = ["Slot", "connect", "no_slots_message", "node_alive", "plan_slots", "shared_gpu_warnings", "start_actor"]

log = logging.getLogger("upg_batch")


def connect(cluster: ClusterSection, note: Callable[[dict[str, Any] | None], None] | None = None) -> bool:
    """Initialize Ray unless it already is. Returns True if this call started or joined it.
    A private Ray this call starts is described to `note` (reap.note_for_this_process) before
    ray.init and again once its session folder is known, so a later run can stop what is left
    of it should this driver be killed."""
    if ray.is_initialized():
        return False
    with _neutral_cwd(), _keep_sigterm_handler():
        if cluster.address is None:
            temp_dir = _ray_temp_dir()
            if note is not None:
                note(reap.note_for_this_process(temp_dir))
            # A private Ray on this machine: bound to loopback because Ray's ports run code
            # for anyone who reaches them.
            with _keep_loopback():
                ray.init(
                    address="local",
                    _node_ip_address="127.0.0.1",
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            if note is not None:
                from ray._private.worker import global_worker

                node = global_worker.node
                note(reap.note_for_this_process(node.get_temp_dir_path(), node.get_session_dir_path()))
        elif cluster.address.split("://")[-1].rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
            # a cluster on this machine's loopback: joining must not rewrite the address either
            with _keep_loopback():
                ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    return True


def _ray_temp_dir() -> str:
    """Where ray.init will put its session folder (RAY_TMPDIR, TMPDIR or /tmp, then ray/)."""
    try:
        from ray._common.utils import get_default_ray_temp_dir

        return get_default_ray_temp_dir()
    except ImportError:  # another Ray release: its usual place
        return os.path.join(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp", "ray")


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """Keep the driver's SIGTERM handler through ray.init, which installs its own (one that
    exits at once, from wherever the driver is, with Ray's messages on the way); the CLI's
    unwinds the job as Ctrl-C does. A default handler is left to Ray (which then stops its
    local processes on SIGTERM). Only the main thread can set handlers."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(old):
            signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _neutral_cwd() -> Iterator[None]:
    """Run ray.init from an empty folder.

    Ray puts the driver's working directory first on every worker's sys.path. Started from a
    source checkout (as the README's demo is), workers would import the checkout's
    `upg_batch`, which has no compiled engine, instead of the installed package. The folder
    outlives the call: a local Ray's processes keep it as their working directory.
    """
    empty = os.path.join(tempfile.gettempdir(), "upg-batch-ray-cwd")
    os.makedirs(empty, exist_ok=True)
    old = os.getcwd()
    os.chdir(empty)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _keep_loopback() -> Iterator[None]:
    """Keep Ray from replacing 127.0.0.1 with the machine's outward IP while it starts.

    On Linux, ray.init resolves a loopback node address to the outward IP (and its servers
    then listen there) unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the single-host mode Ray
    always uses on macOS. Ray reads that variable at import, so the constant is set too; the
    processes Ray starts inherit the variable. Both are restored afterwards.
    """
    name = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    old_env = os.environ.get(name)
    os.environ[name] = "0"
    try:
        import ray._private.ray_constants as ray_constants

        old_const = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
        ray_constants.ENABLE_RAY_CLUSTER = False
    except ImportError:  # a Ray without it binds as it sees fit
        ray_constants, old_const = None, None
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old_env
        if ray_constants is not None and old_const is not None:
            ray_constants.ENABLE_RAY_CLUSTER = old_const


@dataclass
class Slot:
    """One engine actor's place: a node (and its restarts)."""

    index: int
    node_id: str
    node: str  # node_label
    num_gpus: float
    gen: int = 0  # restarts so far
    handle: Any = None
    key: str = ""
    state: str = "new"  # new | starting | ready | dead
    ready_ref: Any = None
    started_at: float = 0.0
    queue: list[Any] = field(default_factory=list)  # refs of run_shard calls, oldest first
    head_since: float = 0.0  # when the oldest queued call became the oldest
    current: int | None = None  # shard the actor last said it runs
    stats_ref: Any = None
    last_poll: float = 0.0
    last_error: str = ""


def _alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id for n in _alive_nodes())


def plan_slots(cluster: ClusterSection) -> list[Slot]:
    """Where actors go: on every node, `actors_per_node` actors (per_node) or one per GPU that
    Ray counts there (per_gpu, each reserving one GPU), as many as the node's CPUs fit."""
    slots: list[Slot] = []
    for n in sorted(_alive_nodes(), key=lambda n: n["NodeID"]):
        res = n.get("Resources", {})
        if cluster.actors == "per_gpu":
            count, gpus = int(res.get("GPU", 0)), 1.0
        else:
            # Nothing reserved: a GPU engine runs anyway (on the adapter it picks), also on
            # nodes where Ray counts no GPU at all.
            count, gpus = cluster.actors_per_node, 0.0
        if cluster.num_cpus_per_actor > 0:
            # An actor Ray cannot place would only wait out actor_start_timeout_s.
            count = min(count, int(res.get("CPU", 0) // cluster.num_cpus_per_actor))
        label = node_label(n["NodeID"], n.get("NodeManagerAddress", "?"))
        for _ in range(count):
            slots.append(Slot(index=len(slots), node_id=n["NodeID"], node=label, num_gpus=gpus))
    return slots


def no_slots_message(cluster: ClusterSection) -> str:
    """Why plan_slots found no place for an actor."""
    if cluster.actors == "per_gpu":
        return (
            "no Ray node can host an engine actor: cluster.actors is per_gpu and no node has both a GPU that Ray counts "
            f"and the CPUs of cluster.num_cpus_per_actor ({cluster.num_cpus_per_actor:g}). Ray counts GPUs through their "
            "compute drivers (CUDA, ROCm, oneAPI; Apple GPUs only in recent Ray releases), not through Vulkan: use "
            "cluster.actors: per_node (model.backend: gpu works there too), or declare the GPUs (ray start --num-gpus N)"
        )
    return "no Ray node can host an engine actor (check cluster.num_cpus_per_actor / cluster.actors)"


def shared_gpu_warnings(slots: list[Slot], backend: str) -> list[str]:
    """Warnings for nodes where several GPU engines will run on one adapter.

    Ray hands each per_gpu actor its GPU through CUDA_VISIBLE_DEVICES (or ROCm's or oneAPI's
    variable). Vulkan ignores those: the GPU engine picks its adapter itself (the best
    hardware one, or the one UPG_BATCH_GPU_ADAPTER names, by name, which cannot tell two
    cards of one model apart), so every GPU engine of a node opens the same adapter.
    """
    if backend == "cpu":
        return []
    per_node = collections.Counter(s.node for s in slots if s.num_gpus > 0)
    return [
        f"{node}: {count} engine actors each reserve one GPU, but the {backend} engine cannot be pinned to the GPU "
        "Ray assigned (it picks its adapter by type or by UPG_BATCH_GPU_ADAPTER's name): all of them run on the same "
        "adapter, each with its own copy of the weights"
        for node, count in sorted(per_node.items())
        if count > 1
    ]


def start_actor(slot: Slot, cluster: ClusterSection, spec: Any, hooks: dict[str, str], now: float) -> None:
    """Create the slot's actor (pinned to its node) and ask it for `ready`."""
    slot.key = f"{slot.index}.{slot.gen}"
    slot.handle = EngineActor.options(
        num_cpus=cluster.num_cpus_per_actor,
        num_gpus=slot.num_gpus,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=slot.node_id, soft=False),
        max_restarts=0,  # the driver restarts actors itself, counting them
        max_task_retries=0,
    ).remote(spec, slot.key, slot.node, hooks)
    slot.ready_ref = slot.handle.ready.remote()
    slot.state = "starting"
    slot.started_at = now
    slot.queue = []
    slot.current = None
    slot.stats_ref = None


def kill_actor(slot: Slot) -> None:
    if slot.handle is not None:
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception as e:  # already gone
            log.debug("kill actor %s: %s", slot.key, e)
    slot.handle = None
