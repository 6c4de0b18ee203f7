"""The prompt stream's settings: the generated task (`task`), task families mixed by weight (`data`),
and held-out evaluation (`eval`). Bounds sit in each field's metadata, checked by rl/config.py before
any actor starts (which also reads the prompt files)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class TaskConfig:
    # The demo task: "a+b=" with operands of up to `digits` digits, answer checked exactly.
    name: str = "addition"
    digits: int = field(default=2, metadata={"ge": 1, "le": 6})
    reverse_answer: bool = True  # write the sum least-significant digit first (see rl/data/tasks.py)
    seed: int = 1234
    # A generated environment task instead (name: calculator | wide_search | deep_search, see
    # rollout/agents/environments/): its generator's options, which the episode's environment gets too
    # (e.g. wide_search: kb_seed, entities, items; deep_search: hops; calculator: digits).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskFamilyConfig:
    """One task family of the prompt stream (rl/data/prompts.py)."""
    path: Optional[str] = None  # JSONL/JSON, parquet or a `datasets` directory; None: the generated `task`
    # held-out prompts with the same fields, scored with the family's rewards as eval/<name>/accuracy
    eval_path: Optional[str] = None
    weight: float = field(default=1.0, metadata={"gt": 0})  # share of the stream's prompts
    # a string or a list of chat messages ({role, content}), rendered with the tokenizer's chat template
    prompt_field: str = "prompt"
    chat: bool = False  # render string prompts as a user message with the chat template too
    system_prompt: Optional[str] = None  # prepended as a system message (implies chat)
    answer_field: str = "answer"  # the reference the verifiable reward checks against
    type_field: Optional[str] = None  # per-row task type (routes rewards); None: the family's name
    budget_field: Optional[str] = None  # per-row token budget; None: max_new_tokens below
    # row fields handed to the rewards as `sample.metadata` (instruction checks, unit tests, rubrics)
    metadata_fields: list[str] = field(default_factory=list)
    # the family's token budget (K2: per task type), at most rollout.max_total_tokens; None: rollout's
    max_new_tokens: Optional[int] = None
    # The family's own temperature decay (K2: per task type), on the rollout's schedule shape and
    # steps; None: the rollout's temperatures. temperature_end None with a temperature: constant.
    temperature: Optional[float] = field(default=None, metadata={"gt": 0})
    temperature_end: Optional[float] = field(default=None, metadata={"gt": 0})

    def check(self) -> None:
        if self.eval_path is not None and self.path is None:
            raise ValueError(f"eval_path: held-out rows need a prompt set (path) (got {self.eval_path!r})")
        if self.temperature_end is not None and self.temperature is None:
            raise ValueError("temperature_end: needs the family's own start temperature "
                             f"(data.families.<name>.temperature) (got {self.temperature_end!r})")


@dataclass
class DataConfig:
    """The prompt stream: task families mixed by weight. Each value holds TaskFamilyConfig's fields;
    Hydra adds one with `+data.families.<name>.path=...` and `data.families.<name>=null` removes one
    (the schema keeps the values untyped because OmegaConf cannot add a key to a dict of dataclasses
    from the command line; rl/config.py's `load_config` types them)."""
    families: dict[str, Any] = field(default_factory=lambda: {"addition": TaskFamilyConfig()})
    # One prompt set instead of the families, in one argument (verl's keys): data.train_files=x.jsonl
    # [data.val_files=y.jsonl] [data.prompt_key=messages]; answers in the `answer` field.
    train_files: Optional[str] = None
    val_files: Optional[str] = None
    prompt_key: str = "prompt"  # a string or a list of chat messages
    # A prompt file's bad row (bad JSON, a missing, empty or too long prompt, a missing answer: see
    # rl/data/prompt_files.py): error = stop before any engine starts, naming file, line and field;
    # skip = leave it out, count it (the data_rows_skipped metric) and go on.
    on_bad_row: str = field(default="error", metadata={"choices": ("error", "skip")})

    def check(self) -> None:
        if self.val_files is not None and self.train_files is None:
            raise ValueError(f"val_files: held-out prompts go with data.train_files (got {self.val_files!r})")
        if not self.families:
            raise ValueError(f"families: needs at least one task family (got {self.families!r})")


@dataclass
class EvalConfig:
    """Held-out evaluation: one sample per prompt at the rollout temperature, before training and every
    `every` steps (0: never): the generated tasks' held-out range and every family's `eval_path`
    (at most `prompts` each). Its accuracy is the run's headline number, also per family."""
    every: int = field(default=10, metadata={"ge": 0})
    prompts: int = field(default=256, metadata={"ge": 1})
    greedy: bool = False  # also score each held-out prompt greedily (temperature 0)
