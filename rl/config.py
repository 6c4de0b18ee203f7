"""The run's configuration: the sections of every package composed behind Hydra, validated before any
actor starts.

Each package owns its sections and their checks: bounds in each field's metadata (`ge`, `gt`, `le`,
`lt`, `choices`, with an optional `why`), checks that span one section's fields in its `check()`. This
module composes them (`Config`), applies those checks (`check_section`), and keeps the checks that span
packages or read files. Hydra composes `conf/config.yaml`; `load_config` merges it onto `Config` (so
OmegaConf checks the types) and validates it. Every problem is one line that names the field, e.g.
``rollout.samples_per_prompt: must be >= 2 (...) (got 1)``.
"""
from __future__ import annotations

import dataclasses
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig

from checkpoint_engine.config import WeightSyncConfig
from rewards.config import CriticConfig, RewardsConfig
from rewards.runner import DEFAULT_TASK_TYPE, RewardSpec
from rl.algo.config import AlgorithmConfig, BudgetConfig, PTXConfig
from rl.algo.ptx import PTX_FIELDS
from rl.algo.schedules import SCHEDULES
from rl.data.config import DataConfig, EvalConfig, TaskConfig, TaskFamilyConfig
from rl.data.prompt_files import checked_table, load_records
from rl.data.prompts import Family
from rl.demo.config import ModelConfig, WarmStartConfig
from rl.demo.tiny_model import TOKENIZERS
from rl.rollout_dump import dumped_steps
from rl.trainer.checkpoint import MARKER as CHECKPOINT_MARKER
from rl.trainer.config import TrainerConfig
from rl.trainer.models import registry as architectures
from rl.trainer.parallel_layout import LayoutError, model_shape
from rl.trainer.setup import resolve_device
from rollout.agents.environments import BUILTIN as ENVIRONMENTS
from rollout.agents.environments import environment_class
from rollout.config import AgentConfig, RolloutConfig

TASKS = ("addition", *ENVIRONMENTS)


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming the field."""


@dataclass
class CheckpointConfig:
    """Checkpoints of the whole run (rl/state.py): model, optimizer, lr schedule, RNG (per trainer rank),
    and the loop's state (step, weight version, data position, partial-rollout buffer, Toggle budgets)."""
    every: int = field(default=0, metadata={"ge": 0})  # save after every `every` steps; 0: never
    dir: Optional[str] = None  # None: <run dir>/checkpoints
    keep: int = field(default=2, metadata={"ge": 1})  # the newest complete checkpoints kept
    resume: Optional[str] = None  # "auto": the newest complete checkpoint under `dir`, if any; or a path

    def check(self) -> None:
        if self.resume not in (None, "auto") and not os.path.isfile(os.path.join(self.resume, CHECKPOINT_MARKER)):
            raise ValueError(f"resume: is not a complete checkpoint (expected \"auto\" or a checkpoint directory) "
                             f"(got {self.resume!r})")


@dataclass
class FaultConfig:
    """What the run survives unattended (rl/fault.py, docs/reliability.md)."""
    # A member that dies or hangs (trainer rank, rollout engine, its SGLang scheduler, a weight
    # receiver) tears the job down and restarts it in the same process from the newest complete
    # checkpoint (from the start if none), at most this many times in a run; 0: the run fails.
    max_restarts: int = field(default=3, metadata={"ge": 0})
    # A policy rollout engine that dies or stops answering (probed before each step) is replaced on its
    # own, without restarting the job: killed, started again in its bundles, given the current weights,
    # and its unfinished requests sent again; at most this many times in a run, then a job restart.
    max_engine_restarts: int = field(default=8, metadata={"ge": 0})
    probe_timeout_s: float = field(default=30.0, metadata={"gt": 0})  # bound on an engine's health probe


@dataclass
class ClusterConfig:
    # None: start a local Ray cluster (the embedded default); else join this address ("auto" too).
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # logical CPUs of the local cluster (default: what the bundles need)
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    # pack: fill a node's GPUs before the next node's; spread: bundles over as many nodes as possible
    placement: str = field(default="pack", metadata={"choices": ("pack", "spread")})
    # GPUs per node of the cluster the job runs on, checked before start (whole engines on a node);
    # None: not checked before start (the placement is still checked once Ray has placed the bundles)
    gpus_per_node: Optional[int] = field(default=None, metadata={"ge": 1})
    # torch threads of each trainer rank and rollout engine; None: the node's cores over the job's
    # bundles on that node. A bundle's trainer rank and engine work in turn (colocated), so each uses
    # the bundle's whole share of cores while it works (rl/cluster.py, docs/performance.md).
    threads_per_actor: Optional[int] = field(default=None, metadata={"ge": 1})


@dataclass
class LoggingConfig:
    wandb_mode: str = field(default="offline", metadata={"choices": ("offline", "online", "disabled")})
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
    fault: FaultConfig = field(default_factory=FaultConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    steps: int = field(default=120, metadata={"ge": 0})
    seed: int = 0


def load_config(cfg: DictConfig | dict[str, Any] | None = None) -> Config:
    """Merge a Hydra/OmegaConf config onto the typed schema, then validate it."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, cfg if cfg is not None else {})
    except Exception as exc:  # OmegaConf type/key errors carry the full key path
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(exc).splitlines()[0]}") from None
    config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    d = config.data
    if d.train_files is not None:  # one prompt set replaces the families (verl's data.train_files)
        d.families = {"train": {"path": d.train_files, "eval_path": d.val_files, "prompt_field": d.prompt_key}}
    config.data.families = {name: _typed(TaskFamilyConfig, raw, f"data.families.{name}")
                            for name, raw in config.data.families.items() if raw is not None}  # null removes one
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


# --- the packages' own checks ----------------------------------------------------------------------
_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))


def bound_problem(value: Any, rules: dict, optional: bool) -> Optional[str]:
    """What is wrong with `value` under a field's metadata rules (None: nothing), e.g. "must be >= 1"."""
    bounds = [(key, symbol, test) for key, symbol, test in _BOUNDS if key in rules]
    if value is None or not (bounds or "choices" in rules):
        return None
    if "choices" in rules:
        ok, text = value in rules["choices"], f"must be one of {tuple(rules['choices'])}"
    else:
        ok = all(test(value, rules[key]) for key, _, test in bounds)
        if len(bounds) == 2:  # a lower and an upper bound: an interval, [a, b) and the like
            (low, _, _), (high, _, _) = bounds
            text = f"must be in {'[' if low == 'ge' else '('}{rules[low]}, {rules[high]}{']' if high == 'le' else ')'}"
        else:
            (key, symbol, _), = bounds
            text = f"must be {symbol} {rules[key]}"
    if ok:
        return None
    return text + (" or null" if optional else "") + (f" ({rules['why']})" if "why" in rules else "")


def check_section(section: Any, at: str) -> None:
    """Each field's bounds (its metadata), nested sections first (also those in a dict or list, such as
    data.families.<name> or rewards.task_types.<type>[i]), then the section's own `check()`."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{at}.{f.name}" if at else f.name
        for item, where in _sections(value, key):
            check_section(item, where)
        problem = bound_problem(value, f.metadata, optional="Optional" in str(f.type))
        if problem:
            raise ConfigError(f"{key}: {problem} (got {value!r})")
    if at and hasattr(section, "check"):
        try:
            section.check()
        except ValueError as exc:
            raise ConfigError(f"{at}.{str(exc).splitlines()[0]}") from None


def _sections(value: Any, key: str):
    """The dataclasses in `value` (itself, or inside dicts and lists), each with its config path."""
    if dataclasses.is_dataclass(value):
        yield value, key
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from _sections(item, f"{key}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _sections(item, f"{key}[{i}]")


def _require(ok: bool, field_name: str, why: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {why} (got {value!r})")


# --- checks that span packages or read files --------------------------------------------------------
def validate(c: Config) -> None:
    """Every section's own checks, then those across sections. Raises ConfigError naming the first bad field."""
    check_section(c, "")
    _validate_layouts(c)
    a, r, p = c.algorithm, c.rollout, c.ptx
    _require(r.temperature_schedule in SCHEDULES, "rollout.temperature_schedule", f"must be one of {SCHEDULES}",
             r.temperature_schedule)
    _require(r.prompts_per_step % a.updates_per_step == 0, "algorithm.updates_per_step",
             "must divide rollout.prompts_per_step", a.updates_per_step)
    _require(a.routing_replay != "rollout" or r.return_routing, "algorithm.routing_replay",
             "'rollout' replays the engines' routing: set rollout.return_routing=true", a.routing_replay)
    for key, value, off in (("rollout.return_routing", r.return_routing, False),
                            ("algorithm.routing_replay", a.routing_replay, "off")):
        if value != off:
            _require(_model_shape(c)["num_experts"] is not None, key, "needs a mixture-of-experts model", value)
    if p.path is not None:
        _require(os.path.isfile(p.path), "ptx.path", "file does not exist", p.path)
        _readable_records(p.path, PTX_FIELDS, "ptx.path")
    _require(not r.deterministic_sampling or resolve_device(c.cluster.device) != "cpu", "rollout.deterministic_sampling",
             "needs CUDA: SGLang's deterministic inference runs batch-invariant kernels that have no CPU build",
             r.deterministic_sampling)
    if r.replay_dir is not None:  # training on dumped samples: no rollout engine starts
        _require(bool(dumped_steps(r.replay_dir)), "rollout.replay_dir", "holds no dumped step (step_<n>.jsonl.gz)",
                 r.replay_dir)
        for key, value in (("eval.every", c.eval.every), ("critic.every", c.critic.every)):
            _require(not value, key, "needs the rollout engines, which a replay (rollout.replay_dir) does not "
                     "start; set it to 0", value)
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


def _validate_layouts(c: Config) -> None:
    """The trainer's and the rollout engines' parallel layouts against the model's shape, and the engines against
    the GPU bundles and nodes."""
    shape = _model_shape(c)
    heads, kv_heads = shape["num_heads"], shape["num_kv_heads"]
    _require(heads % kv_heads == 0, "model.num_key_value_heads", "must divide the number of attention heads", kv_heads)
    try:
        c.trainer.layout().check(**shape)
    except LayoutError as exc:
        raise ConfigError(str(exc)) from None
    tp = c.rollout.tensor_parallel_size
    _require(heads % tp == 0, "rollout.tensor_parallel_size", f"must divide the number of attention heads ({heads})", tp)
    _require(kv_heads % tp == 0, "rollout.tensor_parallel_size",
             f"must divide the number of key/value heads ({kv_heads})", tp)
    world = c.trainer.layout().world_size
    _require(tp <= world, "rollout.tensor_parallel_size",
             f"an engine spans that many of the trainer's {world} GPU bundles: must be <= trainer world size", tp)
    engines = c.rollout.num_engines or world // tp
    _require(engines * tp <= world, "rollout.num_engines",
             f"engines x rollout.tensor_parallel_size ({engines} x {tp}) must fit the {world} GPU bundles of the "
             "trainer's world", c.rollout.num_engines)
    per_node = c.cluster.gpus_per_node
    _require(per_node is None or per_node % tp == 0, "cluster.gpus_per_node",
             f"a node must hold whole rollout engines: must be a multiple of rollout.tensor_parallel_size ({tp})",
             per_node)
    _require(c.sync.transport != "colocated" or per_node is None or world <= per_node, "sync.transport",
             "colocated hands weights over through memory shared on one node; the trainer spans several nodes",
             c.sync.transport)


def _readable_records(path: str, fields: tuple[str, ...], setting: str):
    """`load_records`, with any failure (a missing field, named; a file datasets cannot read) as a
    one-line ConfigError naming `setting`."""
    try:
        return load_records(path, fields, setting)
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(message if message.startswith(f"{setting}:") else f"{setting}: {message}") from None


def _validate_data(c: Config) -> None:
    """Each family's budget against the engine's context, and its prompt files: readable, not empty,
    every row's prompt text or chat messages and budget valid (one streaming pass, errors name the row)."""
    for name, f in c.data.families.items():
        key = f"data.families.{name}"
        _require(f.max_new_tokens is None or 1 <= f.max_new_tokens <= c.rollout.max_total_tokens,
                 f"{key}.max_new_tokens", "must be in [1, rollout.max_total_tokens] or null", f.max_new_tokens)
        for setting, path in ((f"{key}.path", f.path), (f"{key}.eval_path", f.eval_path)):
            if path is not None:
                _require(os.path.exists(path), setting, "does not exist", path)
                _check_rows(c, f, path, setting)


def _check_rows(c: Config, f: TaskFamilyConfig, path: str, setting: str) -> None:
    """One pass over a prompt file's rows (rl/data/prompt_files.py): every row's prompt (present, text or
    chat messages, not empty, short enough for the context), answer and budget; a bad row is a one-line
    error naming the file, line and field (data.on_bad_row = error) or is left out (skip)."""
    budget = f.max_new_tokens or c.rollout.max_new_tokens
    context = AutoConfig.from_pretrained(c.model.path).max_position_embeddings if c.model.path \
        else c.model.max_position_embeddings
    rules = Family.rules(f, max(1, min(context, c.rollout.max_total_tokens) - budget))
    try:
        checked_table(path, Family.fields(f), rules, setting, c.data.on_bad_row, _token_counter(c))
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def _token_counter(c: Config):
    """A prompt's length in the run's tokens (text, or chat messages through the chat template); the
    tokenizer is loaded at the first call (only prompts longer in bytes than the limit are counted)."""
    tokenizer = []

    def count(prompt) -> int:
        if not tokenizer:
            from transformers import AutoTokenizer

            from rl.demo.tiny_model import build_tokenizer
            tokenizer.append(AutoTokenizer.from_pretrained(c.model.path) if c.model.path
                             else build_tokenizer(TOKENIZERS[c.model.tokenizer]))
        if isinstance(prompt, str):
            return len(tokenizer[0].encode(prompt))
        return len(tokenizer[0].apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))
    return count


def _validate_rewards(c: Config) -> None:
    """Every task family's task type has rewards (its own entry, or the default one)."""
    r = c.rewards
    if DEFAULT_TASK_TYPE not in r.task_types:
        untyped = [name for name, f in c.data.families.items() if not f.type_field and name not in r.task_types]
        _require(not untyped, "rewards.task_types", f"has no rewards for task family {untyped[:1]} and no "
                 f"'{DEFAULT_TASK_TYPE}' entry", sorted(r.task_types))


def _validate_agent(c: Config) -> None:
    """What agentic episodes need from the rest of the run: the environment reward has an environment,
    single-turn partial rollouts are off, and the sub-agent model shares the policy's tokenizer."""
    g, w = c.agent, c.agent.swarm
    if g.environment is None:
        uses = [t for t, specs in c.rewards.task_types.items() if any(s.name == "environment" for s in specs)]
        _require(not uses, f"rewards.task_types.{uses[0] if uses else ''}", "uses the environment reward, which "
                 "needs agent.environment", "environment")
        return
    _require(c.rollout.partial_segment_tokens is None, "rollout.partial_segment_tokens",
             "is for single-turn rollouts; agentic episodes pause at turns (agent.partial_tokens)",
             c.rollout.partial_segment_tokens)
    if w.enabled and w.subagent_model is not None:
        _require(os.path.isfile(os.path.join(w.subagent_model, "config.json")), "agent.swarm.subagent_model",
                 "is not a HuggingFace model directory", w.subagent_model)
        policy_vocab = (AutoConfig.from_pretrained(c.model.path).vocab_size if c.model.path
                        else 2 + len(TOKENIZERS[c.model.tokenizer]))
        sub_vocab = AutoConfig.from_pretrained(w.subagent_model).vocab_size
        _require(sub_vocab == policy_vocab, "agent.swarm.subagent_model",
                 f"has a vocabulary of {sub_vocab}, the policy {policy_vocab}: they must share the tokenizer",
                 w.subagent_model)


def _model_shape(c: Config) -> dict:
    """What a parallel layout is checked against: from the model directory when given, else the demo shape."""
    if c.model.path is not None:
        hf = AutoConfig.from_pretrained(c.model.path)
        try:
            architectures.for_config(hf)  # one line naming an architecture the trainer cannot build
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return model_shape(hf)
    m = c.model
    if m.architecture != "qwen2":
        from rl.demo.tiny_model import tiny_moe_shape

        return tiny_moe_shape(m.architecture)
    return dict(num_layers=m.num_layers, num_heads=m.num_attention_heads, num_kv_heads=m.num_key_value_heads,
                num_experts=None)
