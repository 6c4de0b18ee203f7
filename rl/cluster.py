"""Ray cluster and colocated placement: start a local cluster or join one, and reserve bundles.

Each bundle is one GPU (fake on CPU: Ray schedules logical GPUs on a machine without any) plus a
CPU; trainer rank i and the rollout engine share bundle 0..n-1, so they are colocated.
"""
from __future__ import annotations

import os

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.config import ClusterConfig


def start_ray(cfg: ClusterConfig, num_bundles: int) -> None:
    if ray.is_initialized():
        return
    if cfg.address is not None:
        ray.init(address=cfg.address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster needs no token
    ray.init(num_cpus=cfg.num_cpus or 2 * num_bundles, num_gpus=num_bundles, include_dashboard=False,
             log_to_driver=True)


def colocated_bundles(num_bundles: int, timeout_s: float) -> PlacementGroup:
    pg = placement_group([{"CPU": 2, "GPU": 1}] * num_bundles, strategy="PACK")
    ray.get(pg.ready(), timeout=timeout_s)
    return pg


def in_bundle(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)
