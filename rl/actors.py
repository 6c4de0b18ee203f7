"""The actors of one colocated RL job, started and stopped together: the Megatron trainer ranks (rank i
in slot i), the SGLang rollout engines over the same GPU bundles (engine j over slots j*t .. j*t+t-1,
behind a RolloutManager), the weight sync between them, and with a PARL swarm the frozen sub-agent
engine in a bundle of its own. Placement: rl/cluster.py; docs/scaling.md."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import ray
from transformers import AutoConfig

from checkpoint_engine.weight_sync import WeightSync
from rl.cluster import Placement, place, start_ray
from rl.config import Config
from rl.trainer.engine import TrainingEngine
from rl.trainer.setup import resolve_device
from rollout.manager import RolloutManager
from rollout.sglang.engine import RolloutEngine
from rollout.sglang.tp_shards import region_rule

log = logging.getLogger(__name__)
PORT_ATTEMPTS = 3
SHARE = 0.5  # of a bundle's GPU, for each of the two actors colocated on it


def start_engine(placement: Placement, slot: int, path: str, settings, seed: int, device: str, share: float,
                 gpu_ids: list[str]):
    """A `RolloutEngine` actor in bundle `slot` (its SGLang workers see `gpu_ids`)."""
    return ray.remote(RolloutEngine).options(num_cpus=1, num_gpus=share, scheduling_strategy=placement.strategy(slot)
                                             ).remote(path, settings, device=device, seed=seed, gpu_ids=gpu_ids,
                                                      threads=placement.threads(slot))


def start_rollout_engine(placement: Placement, index: int, path: str, settings, seed: int, device: str):
    """Policy rollout engine `index`, over its TP bundles (it sits in the first), beside trainer ranks."""
    return start_engine(placement, index * settings.tensor_parallel_size, path, settings, seed, device, SHARE,
                        placement.engine_gpu_ids(index))


@dataclass
class Actors:
    """The actors of one colocated RL job."""
    trainers: list  # one per training rank (TP x PP x DP), trainer i in slot i
    rollout: Optional[RolloutManager]  # the policy's SGLang engines; None in a replay (rollout.replay_dir)
    sync: Optional[WeightSync]
    placement: Placement
    subagents: Optional[RolloutManager] = None  # PARL's frozen sub-agent engine: loaded once, never synced
    trainer_rendezvous: tuple[str, int] = ("", 0)  # where the trainer ranks met: rank 0's node
    config: Optional[Config] = None  # what they were started with (to start a rollout engine again)
    model_path: str = ""
    device: str = "cpu"

    @classmethod
    def start(cls, config: Config, model_path: str) -> "Actors":
        """Start every actor; if any fails to start, those already started and the placement group are
        released before the error propagates (nothing is left holding the cluster's GPUs)."""
        started: list = []
        try:
            return cls._start(config, model_path, started)
        except BaseException:
            for item in started:
                try:
                    if isinstance(item, Placement):
                        ray.util.remove_placement_group(item.pg)
                    else:
                        ray.kill(item)
                except Exception:
                    pass
            raise

    @classmethod
    def _start(cls, config: Config, model_path: str, started: list) -> "Actors":
        world = config.trainer.layout().world_size
        r, w, timeout = config.rollout, config.agent.swarm, config.trainer.timeout_s
        tp = r.tensor_parallel_size
        replay = r.replay_dir is not None  # training on dumped samples: the trainer ranks alone
        num_engines = 0 if replay else r.num_engines or max(1, world // tp)
        bundles = world + (1 if w.enabled else 0)  # PARL's sub-agent engine gets a GPU of its own
        start_ray(config.cluster, num_bundles=bundles)
        placement = place(bundles, config.cluster.placement, tp, num_engines, timeout, config.cluster.threads_per_actor)
        started.append(placement)
        log.info("placement (%s):\n%s", config.cluster.placement, placement.table(world))
        nodes = {s.node_id for s in placement.slots[:world]}
        if config.sync.transport == "colocated" and len(nodes) > 1:
            raise RuntimeError(f"sync.transport=colocated hands weights over in memory shared on one node, but the "
                               f"trainer ranks span {len(nodes)} nodes: use broadcast or reduce_scatter")
        device = resolve_device(config.cluster.device)
        trainer_cls = ray.remote(TrainingEngine)
        process_env = None  # the trainer ranks' processes (the engines' showed no gain: docs/performance.md)
        if device == "cpu":
            from rl.trainer import megatron_cpu

            process_env = {"env_vars": megatron_cpu.PROCESS_ENV}  # read by glibc when a process starts
        trainer_args = dict(device=device, seed=config.trainer.seed + config.seed,
                            lr_decay_steps=config.steps * config.algorithm.updates_per_step)

        def start_trainers() -> tuple[list, tuple[str, int]]:
            address, port = placement.rendezvous(0, timeout)  # rank 0's node, a port picked there
            return [trainer_cls.options(num_cpus=1, num_gpus=SHARE, scheduling_strategy=placement.strategy(rank),
                                        runtime_env=process_env).remote(
                model_path, config.trainer, rank=rank, master_addr=address, master_port=port,
                threads=placement.threads(rank), **trainer_args)
                for rank in range(world)], (address, port)

        trainers, rendezvous = start_trainers()
        started.extend(trainers)
        engines = [start_rollout_engine(placement, j, model_path, r, config.seed + j, device) for j in range(num_engines)]
        # the sub-agent engine has a bundle (GPU) of its own: TP 1, nothing to release for a trainer
        subagent_settings = dataclasses.replace(r, tensor_parallel_size=1, release_memory_during_train=False)
        subagent_engine = start_engine(placement, world, w.subagent_model or model_path, subagent_settings, config.seed,
                                       device, 1.0, list(placement.slots[world].gpu_ids)) if w.enabled else None
        started.extend(e for e in [*engines, subagent_engine] if e is not None)
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
                trainers, rendezvous = start_trainers()
                started.extend(trainers)
        context = dict(config=config, model_path=model_path, device=device)
        if replay:
            return cls(trainers, None, None, placement, None, rendezvous, **context)
        ray.get([e.__ray_ready__.remote() for e in [*engines, subagent_engine] if e is not None], timeout=timeout)
        bundles_of = [[placement.strategy(j * tp + t) for t in range(tp)] for j in range(num_engines)]
        sync = WeightSync(trainers, engines, bundles_of, config.sync,
                          device, rollout_tp_size=tp, tp_regions=region_rule(AutoConfig.from_pretrained(model_path), tp))
        sync.setup()  # the sub-agent engine is not among the sync's engines: its weights stay fixed
        rollout = RolloutManager(engines, timeout, seed=config.seed, probe_timeout_s=config.fault.probe_timeout_s)
        subagents = RolloutManager([subagent_engine], timeout, seed=config.seed + 1) if w.enabled else None
        return cls(trainers, rollout, sync, placement, subagents, rendezvous, **context)

    def replace_rollout_engine(self, index: int, version: int):
        """Kill policy rollout engine `index`, start it again in its own bundles and give it the weights
        of `version` (a push of its own, checksummed and verified); returns the new engine."""
        c = self.config
        ray.kill(self.rollout.engines[index])
        engine = start_rollout_engine(self.placement, index, self.model_path, c.rollout, c.seed + index, self.device)
        ray.get(engine.__ray_ready__.remote(), timeout=c.trainer.timeout_s)
        self.sync.replace_engine(index, engine, version)
        return engine

    @property
    def managers(self) -> list[RolloutManager]:
        return [m for m in (self.rollout, self.subagents) if m is not None]

    def shutdown(self, graceful: bool = True) -> None:
        """Stop every actor and free the bundles. `graceful`: the sync group and the SGLang engines are
        shut down first (bounded); after a failure they are killed outright, since members may be
        blocked in a collective with a dead one (rl/fault.py cleans up what killed processes leave)."""
        engines = [e for m in self.managers for e in m.engines]
        if self.sync is not None:
            try:
                self.sync.teardown() if graceful else self.sync.abandon()
            except Exception:
                pass
        if graceful and engines:
            try:
                ray.get([e.shutdown.remote() for e in engines], timeout=60)
            except Exception:
                pass
        for actor in [*self.trainers, *engines]:
            ray.kill(actor)
        ray.util.remove_placement_group(self.placement.pg)
