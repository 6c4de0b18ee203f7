"""Typed run configuration behind Hydra, validated before any actor starts.

Hydra composes `conf/config.yaml`; `load_config` merges it onto these dataclasses (so types are
checked by OmegaConf) and `validate` checks the values. Every problem is reported as one line that
names the field, e.g. ``rollout.samples_per_prompt: must be >= 2 (got 1)``.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig

from checkpoint_engine.transfer import MODES as TRANSPORT_MODES
from rl.objectives import AGGREGATIONS, OBJECTIVES, OLD_POLICIES, SEQUENCE_LEVEL, ObjectiveSettings
from rl.checkpoint import MARKER as CHECKPOINT_MARKER
from rl.parallel_layout import LayoutError, ParallelLayout, model_shape
from rl.data import Family, load_records
from rl.ptx import PTX_FIELDS
from rl.temperature import SCHEDULES
from rl.tiny_model import TOKENIZERS
from rewards.agentic import ANNEAL_SCHEDULES, PARALLEL_MODES
from rewards.registry import resolve
from rollout.environments import BUILTIN as ENVIRONMENTS, environment_class
from rewards.self_critique import make_judge
from rewards.runner import DEFAULT_TASK_TYPE, ISOLATIONS as REWARD_ISOLATIONS, RewardSpec


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming the field."""


@dataclass
class ModelConfig:
    # HF model directory (config.json, safetensors, tokenizer). None: build the project's tiny demo
    # model (random init + supervised warm start on the demo task) and cache it under cache_dir.
    path: Optional[str] = None
    cache_dir: str = ".cache/models"
    # Shape of the tiny demo model, used only when path is None.
    hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    tokenizer: str = "demo"  # demo: 62 symbols (the addition task's) | printable: printable ASCII (tool calls)
    max_position_embeddings: int = 256


@dataclass
class WarmStartConfig:
    """Supervised warm start of the demo model (see rl/warm_start.py).

    Trained to convergence with label smoothing, the policy's greedy answers are right while its
    sampled (temperature 1) answers are mostly wrong; RL has to concentrate the distribution.
    """
    label_smoothing: float = 0.3
    steps: int = 1200  # with a cosine learning-rate decay to zero
    batch_size: int = 64
    lr: float = 1e-3
    eval_prompts: int = 256


@dataclass
class TaskConfig:
    # The demo task: "a+b=" with operands of up to `digits` digits, answer checked exactly.
    name: str = "addition"
    digits: int = 2
    reverse_answer: bool = True  # write the sum least-significant digit first (see rl/tasks.py)
    seed: int = 1234
    # A generated environment task instead (name: calculator | wide_search | deep_search, see
    # rollout/environments/): its generator's options, which the episode's environment gets too
    # (e.g. wide_search: kb_seed, entities, items; deep_search: hops; calculator: digits).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskFamilyConfig:
    """One task family of the prompt stream (rl/data.py)."""
    path: Optional[str] = None  # JSONL/JSON, parquet or a `datasets` directory; None: the generated `task`
    weight: float = 1.0  # share of the stream's prompts
    prompt_field: str = "prompt"
    answer_field: str = "answer"  # the reference the verifiable reward checks against
    type_field: Optional[str] = None  # per-row task type (routes rewards); None: the family's name
    budget_field: Optional[str] = None  # per-row token budget; None: max_new_tokens below
    # row fields handed to the rewards as `sample.metadata` (instruction checks, unit tests, rubrics)
    metadata_fields: list[str] = field(default_factory=list)
    max_new_tokens: Optional[int] = None  # the family's token budget (K2: per task type); None: rollout's
    # The family's own temperature decay (K2: per task type), on the rollout's schedule shape and
    # steps; None: the rollout's temperatures. temperature_end None with a temperature: constant.
    temperature: Optional[float] = None
    temperature_end: Optional[float] = None


@dataclass
class DataConfig:
    """The prompt stream: task families mixed by weight. Each value holds TaskFamilyConfig's fields;
    Hydra adds one with `+data.families.<name>.path=...` (the schema keeps the values untyped because
    OmegaConf cannot add a key to a dict of dataclasses from the command line; `load_config` types
    and checks them)."""
    families: dict[str, Any] = field(default_factory=lambda: {"addition": TaskFamilyConfig()})


@dataclass
class RolloutConfig:
    samples_per_prompt: int = 8  # K in the Kimi objective
    prompts_per_step: int = 64
    max_new_tokens: int = 8
    temperature: float = 1.0  # the sampling temperature; with temperature_end, the schedule's start
    temperature_end: Optional[float] = None  # None: constant temperature (K2's decay values are undisclosed)
    temperature_schedule: str = "linear"  # linear | cosine | exponential (rl/temperature.py)
    temperature_decay_steps: Optional[int] = None  # steps to reach temperature_end; None: the whole run
    # K1.5 partial rollouts: per-iteration output-token budget of a response; one that is not finished
    # within it is paused, kept in the replay buffer and continued next round/step. None: off.
    partial_segment_tokens: Optional[int] = None
    mask_old_segments: bool = False  # train only on the tokens the current weights sampled
    max_total_tokens: int = 8192  # SGLang KV-cache cap; its default pre-allocates GBs on CPU
    tensor_parallel_size: int = 1
    mem_fraction_static: float = 0.3  # share of the (colocated) GPU SGLang may take; unused on CPU
    # Free SGLang's weights and KV cache while the colocated trainer works (CUDA only: needs SGLang's
    # memory saver; on CPU SGLang's release/resume calls have no effect, so this is skipped).
    release_memory_during_train: bool = False


@dataclass
class AlgorithmConfig(ObjectiveSettings):
    """The policy objective (fields of rl.objectives.ObjectiveSettings: objective, tau, ratio_low,
    ratio_high, mask_tau, old_policy, clip_low, clip_high, gspo_clip_low, gspo_clip_high, tis_cap,
    loss_aggregation) and how each iteration's rollouts become updates."""
    normalize_advantages: Optional[bool] = None  # divide by the group's reward std; None: for grpo only
    # DAPO's dynamic sampling: drop groups whose rewards are all equal and sample more prompts to refill,
    # up to `max_sampling_rounds` generation rounds per step.
    filter_uniform_groups: bool = False
    max_sampling_rounds: int = 3
    updates_per_step: int = 1  # gradient steps per RL iteration (mini-batches over the rollout)
    reset_optimizer_each_step: bool = False  # K1.5 resets the optimizer every iteration

    @property
    def std_normalized(self) -> bool:
        return self.objective == "grpo" if self.normalize_advantages is None else self.normalize_advantages


@dataclass
class BudgetConfig:
    """Budget control and length shaping (rl/budget.py, kimi-rl-spec §2); all off by default. The K2
    token budget is rollout.max_new_tokens; Kimi's values are undisclosed, these defaults are ours."""
    truncation_reward: Optional[float] = None  # K2: reward of a response cut off by the budget; None: scored as is
    length_penalty_weight: float = 0.0  # K1.5 length penalty weight; 0: off
    length_penalty_start_step: int = 0  # K1.5 warm-up: steps of plain RL before the penalty starts
    toggle: bool = False  # K2.5 Toggle
    toggle_phase_steps: int = 10  # m: steps per phase (budget-limited first)
    toggle_accuracy_threshold: float = 0.5  # lambda: the budget applies to groups at least this accurate
    toggle_percentile: float = 50.0  # rho: a prompt's budget is this percentile of its correct lengths
    toggle_estimate_prompts: int = 64  # prompts (K samples each) rolled out once at the start to set budgets
    correct_threshold: float = 1.0  # a task reward at or above this counts as correct


@dataclass
class PTXConfig:
    """The PTX loss (Kimi K2; rl/ptx.py): coef * token-mean NLL of curated demonstrations, in every
    RL update. Kimi's coefficient and data are undisclosed; off by default."""
    coef: float = 0.0  # 0: off
    path: Optional[str] = None  # JSONL or parquet with `prompt` and `response`; None: the task's own answers
    samples_per_step: int = 16  # demonstrations per RL step (dealt to its minibatches)


@dataclass
class EvalConfig:
    """Held-out evaluation: one sample per prompt at the rollout temperature, before training and every
    `every` steps (0: never). Its accuracy is the run's headline number."""
    every: int = 10
    prompts: int = 256


@dataclass
class TrainerConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1  # carved out of the data-parallel ranks: must divide DP
    world_size: Optional[int] = None  # training processes (one per GPU); None: TP * PP, i.e. DP = 1
    micro_batch_tokens: int = 8192  # padded tokens (rows x width) per micro-batch and DP rank
    vocab_pad_multiple: int = 1  # pad the vocabulary to a multiple of this x TP (Megatron-LM uses 128)
    optimizer: str = "adamw"  # adamw | muon (Muon on hidden matrices, AdamW on the rest; Kimi K2)
    muon_momentum: float = 0.95
    qk_clip_tau: Optional[float] = None  # MuonClip's QK-Clip threshold (K2: 100); None: off
    lr: float = 5e-4
    lr_warmup_steps: int = 10  # linear warm-up: Adam's first steps are sign-like and wreck a fine-tuned policy
    lr_decay: str = "cosine"  # constant | cosine (from lr after warm-up to lr * min_lr_ratio at the last step)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    seed: int = 0
    timeout_s: float = 300.0  # every remote call to an engine is bounded by this


@dataclass
class WeightSyncConfig:
    """How weights reach the rollout engines after each update (checkpoint_engine/, docs/weight-sync.md)."""
    # broadcast: each bucket's owner broadcasts it to every receiver (Kimi K2's checkpoint engine);
    # reduce_scatter: trainer ranks add their shards, each receiver gets only its chunk;
    # colocated: no collective, the owning trainer rank hands buckets to the engines in place.
    transport: str = "broadcast"
    bucket_mb: float = 512.0  # bucket size (slime's default); a tensor larger than this gets its own
    verify_checksums: bool = True  # per-bucket checksum on every receiver
    verify_full: bool = False  # after each push, compare all engine weights with the trainer's (slow)
    timeout_s: float = 120.0  # bound on setup, on every collective and on a whole push


@dataclass
class RewardsConfig:
    """How samples are scored (rewards/): per task type, a list of rewards combined by weight. Each list
    item holds rewards.runner.RewardSpec's fields (name, weight, per_group, isolation, timeout_s,
    memory_mb, kwargs); "default" serves the task types not listed. Untyped in the schema for the same
    reason as data.families; `load_config` types and checks them."""
    task_types: dict[str, Any] = field(default_factory=lambda: {DEFAULT_TASK_TYPE: [{"name": "exact_match"}]})
    timeout_s: float = 30.0  # per reward call (one sample, or one group for a per-group reward)
    concurrency: int = 8  # reward calls in flight at once
    fallback: float = 0.0  # the score a call that raises, times out or returns NaN/inf gives its samples


@dataclass
class CriticConfig:
    """The closed-loop critic check (rewards/critic_data.py): every `every` steps, pairs of a
    verified-correct and a verified-wrong response to the same prompt (task reward at or above
    budget.correct_threshold, or below) from the step's samples of `task_types` go to the judge; its
    agreement with the verifier is logged (critic_agreement) and the pairs are appended to
    <run dir>/critic_pairs.jsonl for refining the critic."""
    every: int = 0  # 0: off
    task_types: list[str] = field(default_factory=list)  # the task types with verifiable rewards
    max_pairs: int = 16
    # rewards.self_critique.make_judge arguments: base_url ("policy": the run's own rollout engine),
    # model, api, max_tokens, concurrency, request_timeout_s, extra_body
    judge: dict[str, Any] = field(default_factory=lambda: {"base_url": "policy"})


@dataclass
class SwarmConfig:
    """PARL agent swarm (rollout/swarm.py, rewards/agentic.py; kimi-rl-spec §8): the trained policy is the
    orchestrator, with create_subagent/assign_task tools; sub-agents run on their own frozen SGLang
    engine. Kimi does not disclose the PARL weights, their schedule or the terms' definitions: these
    defaults are ours (lambda 0.1 is the scale the K2.5 blog gives)."""
    enabled: bool = False
    subagent_model: Optional[str] = None  # HF directory of the frozen sub-agents; None: the run's initial policy
    max_subagents: int = 8  # assignments per episode
    max_parallel: int = 4  # assignments per orchestrator turn (one stage)
    orchestrator_env_tools: bool = False  # the orchestrator also gets the environment's tools
    subagent_temperature: float = 1.0
    subagent_timeout_s: float = 300.0  # bound on one sub-agent's whole episode (its steps still count if cut)
    subagent_max_turns: int = 4
    subagent_max_tokens: int = 256
    subagent_max_turn_tokens: int = 96
    max_critical_steps: Optional[int] = None  # the episode's step budget, in critical steps; None: max_turns only
    budget_penalty: float = 0.0  # added to the reward of an episode stopped by max_critical_steps (<= 0)
    lambda_parallel: float = 0.1  # lambda1 at step 0 (r_parallel)
    lambda_finish: float = 0.1  # lambda2 at step 0 (r_finish)
    anneal_steps: Optional[int] = None  # steps for both to reach 0; None: 0 at the run's last step
    anneal_schedule: str = "linear"  # linear | cosine
    parallel_reward: str = "count"  # count: min(n, cap) / cap | stages: share of stages with >= 2 sub-agents
    parallel_cap: int = 4


@dataclass
class AgentConfig:
    """Multi-turn tool-using rollouts (rollout/agent_loop.py): off while `environment` is None. The
    episode's reward comes from `rewards` (the `environment` reward gives the environment's verdict)."""
    environment: Optional[str] = None  # calculator | wide_search | deep_search | module:Class
    environment_options: dict[str, Any] = field(default_factory=dict)  # over task.options, for the environment
    max_turns: int = 6
    max_tool_calls: int = 16
    max_tokens: int = 768  # response tokens per episode, tool results included
    max_turn_tokens: int = 160
    max_calls_per_turn: int = 4
    tool_timeout_s: float = 30.0
    concurrency: int = 64  # episodes in flight at once
    # SGLang samples only well-formed tool calls or a final answer (regex from the tools' schemas): lets a
    # small model explore the tools; Kimi-Researcher trains without a format enforcer (the default).
    constrain_format: bool = False
    answer_chars: int = 48  # longest final answer under constrain_format
    describe_tools: bool = True  # the tools' schemas in the prompt
    tool_result: str = "\n<tool_response>{result}</tool_response>\n"  # each tool result, as the model sees it
    # Turn-level partial rollout: what an episode may spend per iteration before it pauses at a turn
    # boundary and continues next iteration under the new weights (response tokens; seconds). None: off.
    partial_tokens: Optional[int] = None
    partial_seconds: Optional[float] = None
    swarm: SwarmConfig = field(default_factory=SwarmConfig)


@dataclass
class CheckpointConfig:
    """Checkpoints of the whole run (rl/loop.py): model, optimizer, lr schedule, RNG (per trainer rank),
    and the loop's state (step, weight version, data position, partial-rollout buffer, Toggle budgets)."""
    every: int = 0  # save after every `every` steps; 0: never
    dir: Optional[str] = None  # None: <run dir>/checkpoints
    keep: int = 2  # the newest complete checkpoints kept
    resume: Optional[str] = None  # "auto": the newest complete checkpoint under `dir`, if any; or a path


@dataclass
class ClusterConfig:
    # None: start a local Ray cluster (the embedded default); else join this address ("auto" too).
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # logical CPUs of the local cluster (default: what the bundles need)
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "tandem"
    run_dir: Optional[str] = None  # None: Hydra's output directory


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    ptx: PTXConfig = field(default_factory=PTXConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    steps: int = 120
    seed: int = 0


SYNC_TRANSPORTS = TRANSPORT_MODES
TASKS = ("addition", *ENVIRONMENTS)


def load_config(cfg: DictConfig | dict[str, Any] | None = None) -> Config:
    """Merge a Hydra/OmegaConf config onto the typed schema, then validate it."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, cfg if cfg is not None else {})
    except Exception as exc:  # OmegaConf type/key errors carry the full key path
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(exc).splitlines()[0]}") from None
    config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    config.data.families = {name: _typed(TaskFamilyConfig, raw, f"data.families.{name}")
                            for name, raw in config.data.families.items()}
    config.rewards.task_types = {name: _reward_specs(name, raw) for name, raw in config.rewards.task_types.items()
                                 if raw is not None}  # null removes an entry (the default one, say)
    validate(config)
    return config


def _typed(schema: type, raw: Any, where: str) -> Any:
    """A dict from an untyped part of the config, merged onto `schema` (errors name `where`)."""
    if isinstance(raw, schema):
        return raw
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw or {}))
    except Exception as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{where}{'.' + key if key else ''}: {str(exc).splitlines()[0]}") from None


def _reward_specs(task_type: str, raw: Any) -> list[RewardSpec]:
    where = f"rewards.task_types.{task_type}"
    if isinstance(raw, (dict, DictConfig, str)) or raw is None:
        raise ConfigError(f"{where}: must be a list of rewards (got {raw!r})")
    return [_typed(RewardSpec, {"name": item} if isinstance(item, str) else item, f"{where}[{i}]")
            for i, item in enumerate(raw)]


def _validate_rewards(c: Config) -> None:
    r = c.rewards
    _require(r.timeout_s > 0, "rewards.timeout_s", "must be > 0", r.timeout_s)
    _require(r.concurrency >= 1, "rewards.concurrency", "must be >= 1", r.concurrency)
    _require(math.isfinite(r.fallback), "rewards.fallback", "must be finite", r.fallback)
    for task_type, specs in r.task_types.items():
        _require(len(specs) >= 1, f"rewards.task_types.{task_type}", "needs at least one reward", specs)
        for i, spec in enumerate(specs):
            key = f"rewards.task_types.{task_type}[{i}]"
            try:
                resolve(spec.name, spec.per_group)
            except ValueError as exc:
                raise ConfigError(f"{key}.name: {exc}") from None
            _require(math.isfinite(spec.weight), f"{key}.weight", "must be finite", spec.weight)
            _require(spec.isolation in REWARD_ISOLATIONS, f"{key}.isolation", f"must be one of {REWARD_ISOLATIONS}",
                     spec.isolation)
            _require(spec.timeout_s is None or spec.timeout_s > 0, f"{key}.timeout_s", "must be > 0 or null",
                     spec.timeout_s)
            _require(spec.memory_mb is None or spec.memory_mb > 0, f"{key}.memory_mb", "must be > 0 or null",
                     spec.memory_mb)
    k = c.critic
    _require(k.every >= 0, "critic.every", "must be >= 0", k.every)
    _require(k.max_pairs >= 1, "critic.max_pairs", "must be >= 1", k.max_pairs)
    _require(not k.every or k.task_types, "critic.task_types", "must name the task types with verifiable rewards",
             k.task_types)
    unknown = sorted(set(k.judge) - set(inspect.signature(make_judge).parameters))
    _require(not unknown, "critic.judge", f"unknown judge settings {unknown}", dict(k.judge))
    if DEFAULT_TASK_TYPE not in r.task_types:
        untyped = [name for name, f in c.data.families.items() if not f.type_field and name not in r.task_types]
        _require(not untyped, "rewards.task_types", f"has no rewards for task family {untyped[:1]} and no "
                 f"'{DEFAULT_TASK_TYPE}' entry", sorted(r.task_types))


def _validate_agent(c: Config) -> None:
    g, w = c.agent, c.agent.swarm
    if g.environment is None:
        _require(not w.enabled, "agent.swarm.enabled", "needs agent.environment (the sub-agents' tools and tasks)",
                 w.enabled)
        uses = [t for t, specs in c.rewards.task_types.items() if any(s.name == "environment" for s in specs)]
        _require(not uses, f"rewards.task_types.{uses[0] if uses else ''}", "uses the environment reward, which "
                 "needs agent.environment", "environment")
        return
    try:
        environment_class(g.environment)
    except ValueError as exc:
        raise ConfigError(f"agent.environment: {exc}") from None
    for name in ("max_turns", "max_tool_calls", "max_tokens", "max_turn_tokens", "max_calls_per_turn", "concurrency",
                 "answer_chars"):
        _require(getattr(g, name) >= 1, f"agent.{name}", "must be >= 1", getattr(g, name))
    _require(g.tool_timeout_s > 0, "agent.tool_timeout_s", "must be > 0", g.tool_timeout_s)
    _require("{result}" in g.tool_result, "agent.tool_result", "must contain {result}", g.tool_result)
    _require(g.partial_tokens is None or g.partial_tokens >= 1, "agent.partial_tokens", "must be >= 1 or null",
             g.partial_tokens)
    _require(g.partial_seconds is None or g.partial_seconds > 0, "agent.partial_seconds", "must be > 0 or null",
             g.partial_seconds)
    _require(c.rollout.partial_segment_tokens is None, "rollout.partial_segment_tokens",
             "is for single-turn rollouts; agentic episodes pause at turns (agent.partial_tokens)",
             c.rollout.partial_segment_tokens)
    if not w.enabled:
        return
    if w.subagent_model is not None:
        _require(os.path.isfile(os.path.join(w.subagent_model, "config.json")), "agent.swarm.subagent_model",
                 "is not a HuggingFace model directory", w.subagent_model)
        policy_vocab = (AutoConfig.from_pretrained(c.model.path).vocab_size if c.model.path
                        else 2 + len(TOKENIZERS[c.model.tokenizer]))
        sub_vocab = AutoConfig.from_pretrained(w.subagent_model).vocab_size
        _require(sub_vocab == policy_vocab, "agent.swarm.subagent_model",
                 f"has a vocabulary of {sub_vocab}, the policy {policy_vocab}: they must share the tokenizer",
                 w.subagent_model)
    for name in ("max_subagents", "max_parallel", "subagent_max_turns", "subagent_max_tokens",
                 "subagent_max_turn_tokens", "parallel_cap"):
        _require(getattr(w, name) >= 1, f"agent.swarm.{name}", "must be >= 1", getattr(w, name))
    _require(w.subagent_temperature > 0, "agent.swarm.subagent_temperature", "must be > 0", w.subagent_temperature)
    _require(w.subagent_timeout_s > 0, "agent.swarm.subagent_timeout_s", "must be > 0", w.subagent_timeout_s)
    _require(w.budget_penalty <= 0, "agent.swarm.budget_penalty", "must be <= 0 (a penalty)", w.budget_penalty)
    _require(w.max_critical_steps is None or w.max_critical_steps >= 1, "agent.swarm.max_critical_steps",
             "must be >= 1 or null", w.max_critical_steps)
    for name in ("lambda_parallel", "lambda_finish"):
        _require(getattr(w, name) >= 0, f"agent.swarm.{name}", "must be >= 0", getattr(w, name))
    _require(w.anneal_steps is None or w.anneal_steps >= 1, "agent.swarm.anneal_steps", "must be >= 1 or null",
             w.anneal_steps)
    _require(w.anneal_schedule in ANNEAL_SCHEDULES, "agent.swarm.anneal_schedule", f"must be one of {ANNEAL_SCHEDULES}",
             w.anneal_schedule)
    _require(w.parallel_reward in PARALLEL_MODES, "agent.swarm.parallel_reward", f"must be one of {PARALLEL_MODES}",
             w.parallel_reward)


def _require(ok: bool, field_name: str, why: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {why} (got {value!r})")


def validate(c: Config) -> None:
    """Check values that types cannot express. Raises ConfigError naming the first bad field."""
    m = c.model
    if m.path is not None:
        _require(os.path.isdir(m.path), "model.path", "directory does not exist", m.path)
        _require(os.path.isfile(os.path.join(m.path, "config.json")), "model.path",
                 "has no config.json (expected a HuggingFace model directory)", m.path)
    shape = _model_shape(c)
    heads, kv_heads = shape["num_heads"], shape["num_kv_heads"]
    _require(m.tokenizer in TOKENIZERS, "model.tokenizer", f"must be one of {sorted(TOKENIZERS)}", m.tokenizer)
    for name in ("hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                 "max_position_embeddings"):
        _require(getattr(m, name) > 0, f"model.{name}", "must be > 0", getattr(m, name))
    _require(m.hidden_size % m.num_attention_heads == 0, "model.hidden_size",
             "must be divisible by model.num_attention_heads", m.hidden_size)
    _require(heads % kv_heads == 0, "model.num_key_value_heads",
             "must divide the number of attention heads", kv_heads)

    t = c.trainer
    try:
        trainer_layout(c).check(**shape)
    except LayoutError as exc:
        raise ConfigError(str(exc)) from None
    _require(t.micro_batch_tokens >= 1, "trainer.micro_batch_tokens", "must be >= 1", t.micro_batch_tokens)
    _require(t.vocab_pad_multiple >= 1, "trainer.vocab_pad_multiple", "must be >= 1", t.vocab_pad_multiple)
    tp = c.rollout.tensor_parallel_size
    _require(tp >= 1, "rollout.tensor_parallel_size", "must be >= 1", tp)
    _require(heads % tp == 0, "rollout.tensor_parallel_size", f"must divide the number of attention heads ({heads})", tp)
    _require(kv_heads % tp == 0, "rollout.tensor_parallel_size",
             f"must divide the number of key/value heads ({kv_heads})", tp)

    r = c.rollout
    _require(r.samples_per_prompt >= 2, "rollout.samples_per_prompt",
             "must be >= 2 (the group-mean baseline needs at least two samples)", r.samples_per_prompt)
    _require(r.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1", r.prompts_per_step)
    _require(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1", r.max_new_tokens)
    _require(r.temperature > 0, "rollout.temperature", "must be > 0", r.temperature)
    _require(r.partial_segment_tokens is None or r.partial_segment_tokens >= 1, "rollout.partial_segment_tokens",
             "must be >= 1 or null", r.partial_segment_tokens)
    _require(r.temperature_end is None or r.temperature_end > 0, "rollout.temperature_end", "must be > 0 or null",
             r.temperature_end)
    _require(r.temperature_schedule in SCHEDULES, "rollout.temperature_schedule", f"must be one of {SCHEDULES}",
             r.temperature_schedule)
    _require(r.temperature_decay_steps is None or r.temperature_decay_steps >= 1, "rollout.temperature_decay_steps",
             "must be >= 1 or null", r.temperature_decay_steps)
    _require(r.max_total_tokens >= r.max_new_tokens, "rollout.max_total_tokens",
             "must be >= rollout.max_new_tokens", r.max_total_tokens)
    _require(0 < r.mem_fraction_static < 1, "rollout.mem_fraction_static", "must be in (0, 1)", r.mem_fraction_static)

    a = c.algorithm
    _require(a.objective in OBJECTIVES, "algorithm.objective", f"must be one of {OBJECTIVES}", a.objective)
    _require(a.tau >= 0, "algorithm.tau", "must be >= 0", a.tau)
    _require(a.ratio_low > 0, "algorithm.ratio_low", "must be > 0 (kimi_k25's alpha bounds the ratio)", a.ratio_low)
    _require(a.ratio_low < a.ratio_high, "algorithm.ratio_low",
             f"must be < algorithm.ratio_high ({a.ratio_high}) (alpha < beta)", a.ratio_low)
    _require(a.old_policy in OLD_POLICIES, "algorithm.old_policy", f"must be one of {OLD_POLICIES}", a.old_policy)
    for name in ("clip_low", "clip_high", "gspo_clip_low", "gspo_clip_high"):
        _require(getattr(a, name) >= 0, f"algorithm.{name}", "must be >= 0", getattr(a, name))
    _require(a.clip_low < 1, "algorithm.clip_low", "must be < 1", a.clip_low)
    _require(a.gspo_clip_low < 1, "algorithm.gspo_clip_low", "must be < 1", a.gspo_clip_low)
    _require(a.tis_cap is None or a.tis_cap > 0, "algorithm.tis_cap", "must be > 0 or null", a.tis_cap)
    _require(a.tis_cap is None or a.objective not in SEQUENCE_LEVEL, "algorithm.tis_cap",
             f"applies to token-level objectives only, not {a.objective}", a.tis_cap)
    _require(a.loss_aggregation is None or a.loss_aggregation in AGGREGATIONS, "algorithm.loss_aggregation",
             f"must be one of {AGGREGATIONS} or null", a.loss_aggregation)
    _require(a.objective not in SEQUENCE_LEVEL or a.aggregation in ("group_mean", "sample_mean"),
             "algorithm.loss_aggregation", f"{a.objective} is sequence level: group_mean or sample_mean",
             a.loss_aggregation)
    _require(a.max_sampling_rounds >= 1, "algorithm.max_sampling_rounds", "must be >= 1", a.max_sampling_rounds)
    _require(a.updates_per_step >= 1, "algorithm.updates_per_step", "must be >= 1", a.updates_per_step)
    _require(r.prompts_per_step % a.updates_per_step == 0, "algorithm.updates_per_step",
             "must divide rollout.prompts_per_step", a.updates_per_step)

    b = c.budget
    _require(b.length_penalty_weight >= 0, "budget.length_penalty_weight", "must be >= 0", b.length_penalty_weight)
    _require(b.length_penalty_start_step >= 0, "budget.length_penalty_start_step", "must be >= 0",
             b.length_penalty_start_step)
    _require(b.toggle_phase_steps >= 1, "budget.toggle_phase_steps", "must be >= 1", b.toggle_phase_steps)
    _require(0 <= b.toggle_accuracy_threshold <= 1, "budget.toggle_accuracy_threshold", "must be in [0, 1]",
             b.toggle_accuracy_threshold)
    _require(0 <= b.toggle_percentile <= 100, "budget.toggle_percentile", "must be in [0, 100]", b.toggle_percentile)
    _require(b.toggle_estimate_prompts >= 1, "budget.toggle_estimate_prompts", "must be >= 1",
             b.toggle_estimate_prompts)

    p = c.ptx
    _require(p.coef >= 0, "ptx.coef", "must be >= 0", p.coef)
    _require(p.samples_per_step >= 1, "ptx.samples_per_step", "must be >= 1", p.samples_per_step)
    if p.path is not None:
        _require(os.path.isfile(p.path), "ptx.path", "file does not exist", p.path)
        _readable_records(p.path, PTX_FIELDS, "ptx.path")

    _require(t.optimizer in ("adamw", "muon"), "trainer.optimizer", "must be adamw or muon", t.optimizer)
    _require(0 <= t.muon_momentum < 1, "trainer.muon_momentum", "must be in [0, 1)", t.muon_momentum)
    _require(t.qk_clip_tau is None or t.qk_clip_tau > 0, "trainer.qk_clip_tau", "must be > 0 or null", t.qk_clip_tau)
    _require(t.lr > 0, "trainer.lr", "must be > 0", t.lr)
    _require(t.lr_warmup_steps >= 0, "trainer.lr_warmup_steps", "must be >= 0", t.lr_warmup_steps)
    _require(t.lr_decay in ("constant", "cosine"), "trainer.lr_decay", "must be constant or cosine", t.lr_decay)
    _require(0 <= t.min_lr_ratio <= 1, "trainer.min_lr_ratio", "must be in [0, 1]", t.min_lr_ratio)
    _require(t.weight_decay >= 0, "trainer.weight_decay", "must be >= 0", t.weight_decay)
    _require(all(0 <= b < 1 for b in t.adam_betas), "trainer.adam_betas", "must be in [0, 1)", t.adam_betas)
    _require(t.grad_clip > 0, "trainer.grad_clip", "must be > 0", t.grad_clip)
    _require(t.timeout_s > 0, "trainer.timeout_s", "must be > 0", t.timeout_s)

    s = c.sync
    _require(s.transport in SYNC_TRANSPORTS, "sync.transport", f"must be one of {SYNC_TRANSPORTS}", s.transport)
    _require(s.bucket_mb > 0, "sync.bucket_mb", "must be > 0", s.bucket_mb)
    _require(s.timeout_s > 0, "sync.timeout_s", "must be > 0", s.timeout_s)

    k = c.checkpoint
    _require(k.every >= 0, "checkpoint.every", "must be >= 0", k.every)
    _require(k.keep >= 1, "checkpoint.keep", "must be >= 1", k.keep)
    if k.resume not in (None, "auto"):
        _require(os.path.isfile(os.path.join(k.resume, CHECKPOINT_MARKER)), "checkpoint.resume",
                 "is not a complete checkpoint (expected \"auto\" or a checkpoint directory)", k.resume)

    w = c.warm_start
    _require(0 <= w.label_smoothing < 1, "warm_start.label_smoothing", "must be in [0, 1)", w.label_smoothing)
    _require(w.steps >= 0, "warm_start.steps", "must be >= 0", w.steps)
    _require(w.lr > 0, "warm_start.lr", "must be > 0", w.lr)

    _validate_data(c)
    _validate_rewards(c)
    _validate_agent(c)
    _require(c.task.name in TASKS or c.task.name == c.agent.environment, "task.name",
             f"must be one of {TASKS} or agent.environment", c.task.name)
    if c.task.name != "addition":
        try:  # the generator's options: a bad one fails here, not at the first prompt
            environment_class(c.task.name).generate(0, c.task.seed, **c.task.options)
        except Exception as exc:  # noqa: BLE001 - reported as the field's error
            raise ConfigError(f"task.options: {c.task.name} cannot generate a task with {dict(c.task.options)} "
                              f"({type(exc).__name__}: {exc})") from None
    _require(1 <= c.task.digits <= 6, "task.digits", "must be in [1, 6]", c.task.digits)
    _require(c.steps >= 0, "steps", "must be >= 0", c.steps)
    _require(c.eval.every >= 0, "eval.every", "must be >= 0", c.eval.every)
    _require(c.eval.prompts >= 1, "eval.prompts", "must be >= 1", c.eval.prompts)
    _require(c.cluster.device in ("auto", "cpu", "cuda"), "cluster.device", "must be auto, cpu or cuda", c.cluster.device)
    _require(c.logging.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode",
             "must be offline, online or disabled", c.logging.wandb_mode)


def _readable_records(path: str, fields: tuple[str, ...], setting: str) -> list[dict]:
    """`load_records`, with any failure (a missing field, named; a file datasets cannot read) as a
    one-line ConfigError naming `setting`."""
    try:
        return load_records(path, fields, setting)
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(message if message.startswith(f"{setting}:") else f"{setting}: {message}") from None


def _validate_data(c: Config) -> None:
    _require(len(c.data.families) >= 1, "data.families", "needs at least one task family", c.data.families)
    for name, f in c.data.families.items():
        key = f"data.families.{name}"
        _require(f.weight > 0, f"{key}.weight", "must be > 0", f.weight)
        _require(f.max_new_tokens is None or 1 <= f.max_new_tokens <= c.rollout.max_total_tokens,
                 f"{key}.max_new_tokens", "must be in [1, rollout.max_total_tokens] or null", f.max_new_tokens)
        for name_, value in (("temperature", f.temperature), ("temperature_end", f.temperature_end)):
            _require(value is None or value > 0, f"{key}.{name_}", "must be > 0 or null", value)
        _require(f.temperature_end is None or f.temperature is not None, f"{key}.temperature_end",
                 "needs the family's own start temperature (data.families.<name>.temperature)", f.temperature_end)
        if f.path is None:
            continue
        _require(os.path.exists(f.path), f"{key}.path", "does not exist", f.path)
        rows = _readable_records(f.path, Family.fields(f), f"{key}.path")
        _require(len(rows) > 0, f"{key}.path", "holds no rows", f.path)
        if f.budget_field:
            bad = next((r[f.budget_field] for r in rows if not (isinstance(r[f.budget_field], int)
                                                                and r[f.budget_field] >= 1)), None)
            _require(bad is None, f"{key}.budget_field", "every row's budget must be an integer >= 1", bad)


def trainer_layout(c: Config) -> ParallelLayout:
    t = c.trainer
    world = t.world_size if t.world_size is not None else t.tensor_parallel_size * t.pipeline_parallel_size
    return ParallelLayout(world, t.tensor_parallel_size, t.pipeline_parallel_size, t.expert_parallel_size)


def _model_shape(c: Config) -> dict:
    """What a parallel layout is checked against: from the model directory when given, else the demo shape."""
    if c.model.path is not None:
        return model_shape(AutoConfig.from_pretrained(c.model.path))
    m = c.model
    return dict(num_layers=m.num_layers, num_heads=m.num_attention_heads, num_kv_heads=m.num_key_value_heads,
                num_experts=None)
