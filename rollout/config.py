"""The rollout's settings: generation (`rollout`), agentic episodes (`agent`) and the PARL swarm
(`agent.swarm`). Bounds sit in each field's metadata (ge, gt, le, lt, choices), checked by rl/config.py
before any actor starts; `check()` holds the checks that span fields of one section."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from rewards.builtin.agentic import PARALLEL_MODES
from rollout.agents.agent_loop import TurnFormat
from rollout.agents.environments import environment_class
from rollout.agents.swarm import SwarmSettings


@dataclass
class RolloutConfig:
    samples_per_prompt: int = field(default=8, metadata={  # K in the Kimi objective
        "ge": 2, "why": "the group-mean baseline needs at least two samples"})
    prompts_per_step: int = field(default=64, metadata={"ge": 1})
    max_new_tokens: int = field(default=8, metadata={"ge": 1})  # the K2 token budget
    # the sampling temperature; with temperature_end, the schedule's start
    temperature: float = field(default=1.0, metadata={"gt": 0})
    # None: constant temperature (K2's decay values are undisclosed)
    temperature_end: Optional[float] = field(default=None, metadata={"gt": 0})
    # linear | cosine | exponential (rl/algo/schedules.py, whose list rl/config.py checks it against)
    temperature_schedule: str = "linear"
    # steps to reach temperature_end; None: the whole run
    temperature_decay_steps: Optional[int] = field(default=None, metadata={"ge": 1})
    # K1.5 partial rollouts: per-iteration output-token budget of a response; one that is not finished
    # within it is paused, kept in the replay buffer and continued next round/step. None: off.
    partial_segment_tokens: Optional[int] = field(default=None, metadata={"ge": 1})
    mask_old_segments: bool = False  # train only on the tokens the current weights sampled
    max_total_tokens: int = 8192  # SGLang KV-cache cap; its default pre-allocates GBs on CPU
    # the rollout engines' precision, independent of the trainer's (fp32): bf16 is what large runs serve
    # in, and what makes the train-inference mismatch (rl/algo/mismatch.py) real
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16", "float16")})
    # MoE: the engines report the experts each token was routed to (Sample.routed_experts), for
    # algorithm.routing_replay=rollout and the routing_diff_share metric
    return_routing: bool = False
    tensor_parallel_size: int = field(default=1, metadata={"ge": 1})
    # rollout engines, each over tensor_parallel_size GPU bundles of one node; None: every bundle
    # serves rollout (trainer world size / tensor_parallel_size engines)
    num_engines: Optional[int] = field(default=None, metadata={"ge": 1})
    # SGLang's deterministic inference (CUDA): each request is sampled with its own seed from (run seed,
    # step, group, sample), so samples do not depend on which engine served them or in what batch.
    # Costs speed (batch-invariant kernels) and needs CUDA; off, each engine is reseeded every step and
    # a step's split over the engines is a function of its requests, so a run still repeats exactly.
    deterministic_sampling: bool = False
    # share of the (colocated) GPU SGLang may take; unused on CPU
    mem_fraction_static: float = field(default=0.3, metadata={"gt": 0, "lt": 1})
    # Free SGLang's weights and KV cache while the colocated trainer works (CUDA only: needs SGLang's
    # memory saver; on CPU SGLang's release/resume calls have no effect, so this is skipped).
    release_memory_during_train: bool = False
    # An idle SGLang scheduler polls its sockets in a busy loop, taking a core from the colocated
    # trainer while it works; sleeping on idle gives it back (measured: docs/performance.md).
    sleep_on_idle: bool = True
    # Prefill each prompt once before its group's K samples are generated, so they read its KV from
    # the prefix cache (emptied by every weight update) instead of each prefilling it again: what
    # SGLang does itself for one request with n > 1 (measured: docs/performance.md).
    prefill_shared_prompts: bool = True
    # Every step's trained samples (token ids, rollout logprobs, rewards, advantages, weight versions)
    # to <dump_dir>/step_<n>.jsonl.gz, numbered as in metrics.jsonl (rl/rollout_dump.py).
    dump_dir: Optional[str] = None
    # Train on the samples dumped there instead of generating: no rollout engine, sync or gateway
    # starts. With checkpoint.resume at step n-1, step n is re-run alone.
    replay_dir: Optional[str] = None

    def check(self) -> None:
        if self.max_total_tokens < self.max_new_tokens:
            raise ValueError(f"max_total_tokens: must be >= rollout.max_new_tokens (got {self.max_total_tokens})")


@dataclass
class SwarmConfig(SwarmSettings):
    """PARL agent swarm (rollout/agents/swarm.py, rewards/builtin/agentic.py; docs/kimi-methods.md): the
    trained policy is the orchestrator, with create_subagent/assign_task tools; sub-agents run on their
    own frozen SGLang engine. Kimi does not disclose the PARL weights, their schedule or the terms'
    definitions: these defaults are ours (lambda 0.1 is the scale the K2.5 blog gives). The tools'
    limits are SwarmSettings' fields."""
    enabled: bool = False
    # HF directory of the frozen sub-agents; None: the run's initial policy
    subagent_model: Optional[str] = None
    subagent_max_turns: int = field(default=4, metadata={"ge": 1})
    subagent_max_tokens: int = field(default=256, metadata={"ge": 1})
    subagent_max_turn_tokens: int = field(default=96, metadata={"ge": 1})
    # the episode's step budget, in critical steps; None: max_turns only
    max_critical_steps: Optional[int] = field(default=None, metadata={"ge": 1})
    # added to the reward of an episode stopped by max_critical_steps
    budget_penalty: float = field(default=0.0, metadata={"le": 0, "why": "a penalty"})
    lambda_parallel: float = field(default=0.1, metadata={"ge": 0})  # lambda1 at step 0 (r_parallel)
    lambda_finish: float = field(default=0.1, metadata={"ge": 0})  # lambda2 at step 0 (r_finish)
    # steps for both to reach 0; None: 0 at the run's last step (rl/algo/schedules.py)
    anneal_steps: Optional[int] = field(default=None, metadata={"ge": 1})
    anneal_schedule: str = field(default="linear", metadata={"choices": ("linear", "cosine")})
    # count: min(n, cap) / cap | stages: share of stages with >= 2 sub-agents
    parallel_reward: str = field(default="count", metadata={"choices": PARALLEL_MODES})
    parallel_cap: int = field(default=4, metadata={"ge": 1})


@dataclass
class AgentConfig(TurnFormat):
    """Multi-turn tool-using rollouts (rollout/agents/agent_loop.py): off while `environment` is None.
    The episode's reward comes from `rewards` (the `environment` reward gives the environment's
    verdict). How turns are written is TurnFormat's fields."""
    environment: Optional[str] = None  # calculator | wide_search | deep_search | module:Class
    # over task.options, for the environment
    environment_options: dict[str, Any] = field(default_factory=dict)
    max_turns: int = field(default=6, metadata={"ge": 1})
    max_tool_calls: int = field(default=16, metadata={"ge": 1})
    max_tokens: int = field(default=768, metadata={"ge": 1})  # response tokens per episode, tool results included
    max_turn_tokens: int = field(default=160, metadata={"ge": 1})
    max_calls_per_turn: int = field(default=4, metadata={"ge": 1})
    tool_timeout_s: float = field(default=30.0, metadata={"gt": 0})
    concurrency: int = field(default=64, metadata={"ge": 1})  # episodes in flight at once
    # Turn-level partial rollout: what an episode may spend per iteration before it pauses at a turn
    # boundary and continues next iteration under the new weights (response tokens; seconds). None: off.
    partial_tokens: Optional[int] = field(default=None, metadata={"ge": 1})
    partial_seconds: Optional[float] = field(default=None, metadata={"gt": 0})
    swarm: SwarmConfig = field(default_factory=SwarmConfig)

    def check(self) -> None:
        super().check()
        if self.environment is None:
            if self.swarm.enabled:
                raise ValueError("swarm.enabled: needs agent.environment (the sub-agents' tools and tasks) (got True)")
            return
        try:
            environment_class(self.environment)
        except ValueError as exc:
            raise ValueError(f"environment: {exc}") from None
