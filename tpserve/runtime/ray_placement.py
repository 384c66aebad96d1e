"""Ray placement: start or join a cluster, reserve a bundle per rank, start the RankWorker actors
and load their shards.

Without an address tpserve starts a private local cluster (the executor stops it on close); with
`address` (or RAY_ADDRESS, as inside a Ray Job) it joins that cluster. Ranks are ordered by node id
so neighbours share a node. Before any shard loads, each node is checked for what its ranks need:
the checkpoint readable there, the driver's tpserve (Ray puts the launch folder on the ranks' Python
path, where another tpserve checkout would shadow the installed one) and, on GPUs, every GPU of the
node's ranks visible to each of them.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from tpserve.errors import TpserveError

log = logging.getLogger(__name__)
PLACEMENTS = {"strict_pack": "STRICT_PACK", "pack": "PACK", "spread": "SPREAD"}


def ensure_ray(address: str | None, tp: int, device: str) -> bool:
    """Connect to or start Ray; True when this call started a private cluster."""
    import ray
    if ray.is_initialized():
        return False
    env = {"env_vars": {"TPSERVE_RANK_PROCESS": "1"}}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return False
    # A private cluster with one logical slot per rank; on a CPU box each "GPU" slot is logical.
    num_gpus = torch.cuda.device_count() if device == "cuda" else 0
    ray.init(address="local", num_cpus=max(tp + 1, os.cpu_count() or 1), num_gpus=num_gpus,
             include_dashboard=False, runtime_env=env, log_to_driver=True)
    return True


def rank_bundle(device: str) -> dict:
    return {"GPU": 1, "CPU": 1} if device == "cuda" else {"CPU": 1}


def reserve(tp: int, device: str, placement: str, tag: str):
    """A placement group of one bundle per rank, not yet placed (`rank_order` waits for it).
    `tag` names the group and its actors apart from other executors' and earlier rebuilds'."""
    from ray.util.placement_group import placement_group
    return placement_group([rank_bundle(device) for _ in range(tp)],
                           strategy=PLACEMENTS[placement], name=f"tpserve-{tag}")


def rank_order(pg, tp: int, device: str, placement: str, timeout_s: float) -> list[int]:
    """Wait until `pg` is placed -> its bundle index for each rank, ranks grouped by node."""
    import ray
    from ray.util.placement_group import placement_group_table
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        raise TpserveError(
            f"Ray could not place {tp} bundles of {rank_bundle(device)} with strategy "
            f"{PLACEMENTS[placement]} within {timeout_s:.0f}s; check free "
            f"resources with `ray status`, lower --tp or use --placement pack")
    nodes = placement_group_table(pg)["bundles_to_node_id"]
    return sorted(range(tp), key=lambda b: (nodes[b], b))  # ranks grouped by node


RESERVED_ENV = "TPSERVE_CPU_RESERVED_CORES"


def reserved_cores() -> int:
    """TPSERVE_CPU_RESERVED_CORES (default 1): the cores of each node that its CPU ranks leave to
    the driver's coordinator and engine and to Ray's own processes (`share_threads`)."""
    value = os.environ.get(RESERVED_ENV, "1")
    if not value.isdigit():
        raise TpserveError(f"{RESERVED_ENV}={value!r} is not a count of cores; set a whole "
                           f"number >= 0 (cores left to the driver and Ray beside CPU ranks)")
    return int(value)


def share_threads(ranks_here: int, reserved: int, cores: int | None = None) -> int:
    """Torch threads of a CPU rank: its node's cores (this process's affinity) less `reserved`
    (TPSERVE_CPU_RESERVED_CORES: the driver's coordinator and engine, Ray's own processes), shared
    by the `ranks_here` ranks of the node, at least one. A rank whose threads outnumber the cores
    left to it waits at every parallel op for a thread the OS has parked (on 2 cores at tp=1 the
    demo model's attention ops took ~80 us each with 2 threads, ~10 with 1)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, ((cores or 1) - reserved) // ranks_here)


def start_ranks(actors: list, pg, order: list[int], tag: str, path: str, dtype: str,
                device: str, num_slots: int, max_len: int, timeout_s: float) -> None:
    """A RankWorker actor for rank r in bundle `order[r]` of `pg`, each appended to `actors` as it
    starts, so that the caller kills those already started when a later one fails."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from ray.util.placement_group import placement_group_table
    from tpserve.runtime.rank_worker import RankWorker  # it imports share_threads from here
    tp, bundle = len(order), rank_bundle(device)
    # CPU ranks share their node's cores: each learns how many ranks its node holds
    nodes = placement_group_table(pg)["bundles_to_node_id"]
    here = collections.Counter(nodes[b] for b in order)
    reserved = reserved_cores() if device == "cpu" else 0
    remote = ray.remote(max_concurrency=2)(RankWorker)
    # The driver's TPSERVE_* settings (cache, debug hooks) reach every rank.
    env = {k: v for k, v in os.environ.items() if k.startswith("TPSERVE_")}
    for rank, b in enumerate(order):
        actors.append(remote.options(
            num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, b),
            name=f"tpserve-rank{rank}-{tag}",
            runtime_env={"env_vars": env} if env else None,
        ).remote(rank, tp, path, dtype, device, num_slots, max_len, timeout_s,
                 cpu_share=(here[nodes[b]], reserved) if device == "cpu" else None))


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> tuple[str, str]:
    """(a hash of tpserve's source files, the folder tpserve was imported from): the driver and
    every rank must run the same code (`check_nodes`), wherever each has it installed."""
    import tpserve
    from tpserve import kernels
    top, ker = Path(tpserve.__file__).parent, Path(kernels.__file__).parent
    h = hashlib.sha256()
    for root in (top, ker):  # kernels/ on its own, whether or not it lies inside tpserve/
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root)
            if root is top and rel.parts[0] == "kernels":
                continue
            h.update(rel.as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16], str(top)


def check_nodes(actors: list, nodes: list[dict], path, device: str) -> None:
    """Refuse a node where the checkpoint is not readable or the rank runs another tpserve than
    the driver; on GPUs, show each rank its node's ranks' GPUs. `nodes`: each actor's
    `node_info()`."""
    import ray
    mine = code_fingerprint()
    for info in nodes:
        code = tuple(info.get("code") or ("", "a tpserve too old to say where it lies"))
        if code[0] != mine[0]:
            raise TpserveError(f"rank {info['rank']} on node {info['node_id']} ({info['ip']}) runs "
                               f"the tpserve in {code[1]}, which differs from the driver's in "
                               f"{mine[1]}; launch from a folder that holds no other tpserve "
                               f"checkout (Ray puts the launch folder on the ranks' Python path) "
                               f"and install the same tpserve on every node")
        if not info["path_ok"]:
            raise TpserveError(f"model path {path} is not readable on node "
                               f"{info['node_id']} ({info['ip']}) holding rank {info['rank']}; "
                               f"put the checkpoint on every node's disk or shared storage")
    if device == "cuda":  # each rank sees its node's ranks' GPUs, as NCCL's P2P needs
        gpus: dict[str, set] = {}
        for i in nodes:
            gpus.setdefault(i["node_id"], set()).update(i["gpu_ids"])
        ray.get([a.see_gpus.remote(sorted(gpus[i["node_id"]], key=lambda g: (len(g), g)))
                 for a, i in zip(actors, nodes)])


def load_ranks(actors: list, progress: bool) -> list[dict]:
    """Every rank loads its shards (in parallel; a bar counts ranks done) -> their load infos, in
    the order they finished. A rank that fails names itself and the cause."""
    import ray
    pending = {a.load.remote(): r for r, a in enumerate(actors)}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(actors), desc="loading ranks", unit="rank")
    t0, infos = time.perf_counter(), []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        r = pending.pop(done[0])
        try:
            infos.append(ray.get(done[0]))
        except ray.exceptions.RayTaskError as e:
            raise TpserveError(f"rank {r} failed to load: {e.cause}") from None
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    log.info("ranks loaded in %.1fs, %.1f MB read", time.perf_counter() - t0,
             sum(i["bytes_read"] for i in infos) / 1e6)
    return infos
