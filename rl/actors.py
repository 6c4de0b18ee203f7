"""The actors of one colocated RL job, started and stopped together: the Megatron trainer ranks, the
SGLang rollout engine beside trainer rank 0 (same placement-group bundle), the weight sync between
them, and with a PARL swarm the frozen sub-agent engine in a bundle of its own."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import ray
from transformers import AutoConfig

from checkpoint_engine.group import free_port
from checkpoint_engine.weight_sync import WeightSync
from rl.cluster import colocated_bundles, in_bundle, start_ray
from rl.config import Config
from rl.trainer.engine import TrainingEngine
from rl.trainer.setup import resolve_device
from rollout.sglang.engine import RolloutEngine
from rollout.sglang.tp_shards import region_rule

log = logging.getLogger(__name__)
PORT_ATTEMPTS = 3


@dataclass
class Actors:
    """The actors of one colocated RL job."""
    trainers: list  # one per training rank (TP x PP x DP), trainer i in bundle i
    rollout: object  # the SGLang engine, in bundle 0 beside trainer rank 0
    sync: WeightSync
    placement_group: object
    subagents: Optional[object] = None  # PARL's frozen sub-agent engine: loaded once, never synced

    @classmethod
    def start(cls, config: Config, model_path: str) -> "Actors":
        world = config.trainer.layout().world_size
        w = config.agent.swarm
        bundles = world + (1 if w.enabled else 0)  # PARL's sub-agent engine gets a GPU of its own
        start_ray(config.cluster, num_bundles=bundles)
        timeout = config.trainer.timeout_s
        pg = colocated_bundles(bundles, timeout)
        device = resolve_device(config.cluster.device)
        trainer_args = dict(master_addr="127.0.0.1", device=device, seed=config.trainer.seed + config.seed,
                            lr_decay_steps=config.steps * config.algorithm.updates_per_step)
        trainer_cls = ray.remote(TrainingEngine)

        def start_trainers() -> list:
            port = free_port()
            return [trainer_cls.options(num_cpus=1, num_gpus=0.5, scheduling_strategy=in_bundle(pg, rank)).remote(
                model_path, config.trainer, rank=rank, master_port=port, **trainer_args) for rank in range(world)]

        trainers = start_trainers()
        r = config.rollout

        def start_rollout(path: str, bundle: int, share: float, settings):
            return ray.remote(RolloutEngine).options(
                num_cpus=1, num_gpus=share, scheduling_strategy=in_bundle(pg, bundle)).remote(
                path, settings, device=device, seed=config.seed)

        rollout = start_rollout(model_path, 0, 0.5, r)  # beside trainer rank 0
        # the sub-agent engine has a bundle (GPU) of its own: TP 1, nothing to release for a trainer
        subagent_settings = dataclasses.replace(r, tensor_parallel_size=1, release_memory_during_train=False)
        subagents = start_rollout(w.subagent_model or model_path, world, 1.0, subagent_settings) if w.enabled else None
        # Constructors run in the actors; surface their failures (with a bound) before the loop starts.
        # The trainers' rendezvous port was free when picked, but SGLang, starting beside them, picks
        # ports too: if it took this one first, the trainers start again on another.
        for attempt in range(PORT_ATTEMPTS):
            try:
                ray.get([a.__ray_ready__.remote() for a in trainers], timeout=timeout)
                break
            except Exception as exc:
                for actor in trainers:
                    ray.kill(actor)
                if "EADDRINUSE" not in str(exc) or attempt == PORT_ATTEMPTS - 1:
                    raise
                log.warning("trainer rendezvous port taken; starting the trainers again on another")
                trainers = start_trainers()
        ray.get([e.__ray_ready__.remote() for e in (rollout, subagents) if e is not None], timeout=timeout)
        s = config.sync
        sync = WeightSync(trainers, [rollout], [in_bundle(pg, 0)], s, device, rollout_tp_size=r.tensor_parallel_size,
                                tp_regions=region_rule(AutoConfig.from_pretrained(model_path), r.tensor_parallel_size))
        sync.setup()  # the sub-agent engine is not among the sync's engines: its weights stay fixed
        return cls(trainers, rollout, sync, pg, subagents)

    def shutdown(self) -> None:
        try:
            self.sync.teardown()
        except Exception:
            pass
        engines = [e for e in (self.rollout, self.subagents) if e is not None]
        try:
            ray.get([e.shutdown.remote() for e in engines], timeout=60)
        except Exception:
            pass
        for actor in [*self.trainers, *engines]:
            ray.kill(actor)
        ray.util.remove_placement_group(self.placement_group)
