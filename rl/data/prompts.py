"""Prompt sets: task families mixed by weight, drawn deterministically and resumably.

A family is either the project's generated task (the demo's addition stream, `path` None) or a
prompt set read from a JSONL/JSON or parquet file, or a directory saved by HF `datasets`, with
configurable fields for the prompt, the reference answer, the task type (used to route rewards)
a per-row token budget, and fields passed on to the rewards (`Sample.metadata`: instruction
checks, unit tests, rubrics). Position n of the run's prompt stream goes to a family drawn with the
families' weights from a generator seeded by (seed, n); the family's k-th draw takes its k-th
problem (generated) or row k of a seeded permutation of its rows, one permutation per epoch. Every
draw is a function of the seed and the position, so a resumed run needs only the position.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional

from rl.data.tasks import AdditionTask


@dataclass(frozen=True)
class Prompt:
    prompt: str
    reference: str
    family: str
    task_type: str  # the row's task type, or the family's name
    max_new_tokens: Optional[int] = None  # this prompt's token budget; None: the family's or the rollout's
    metadata: dict[str, Any] = field(default_factory=dict)  # the row's `metadata_fields`, for rewards


def load_records(path: str, fields: tuple[str, ...], setting: str) -> list[dict]:
    """Rows of a .jsonl/.json or .parquet file, or of a directory saved by `datasets`, each with
    `fields`; a missing field raises ValueError naming `setting` and the field."""
    import datasets

    datasets.disable_progress_bars()
    if path.endswith((".jsonl", ".json", ".parquet")):
        table = datasets.load_dataset("parquet" if path.endswith(".parquet") else "json", data_files=path,
                                      split="train")
    else:
        table = datasets.load_from_disk(path)
        if isinstance(table, datasets.DatasetDict):
            table = table["train"]
    missing = [f for f in fields if f not in table.column_names]
    if missing:
        raise ValueError(f"{setting}: {path} has no field {missing[0]!r} (fields: {table.column_names})")
    return [{f: row[f] for f in fields} for row in table]


def generated_task(task):
    """The generated task of `task` (rl.config.TaskConfig): the demo addition, or an environment's tasks."""
    if task.name == "addition":
        return AdditionTask(task.digits, task.seed, task.reverse_answer)
    from rollout.agents.environments import EnvironmentTask

    return EnvironmentTask(task.name, task.seed, task.options)


class Family:
    def __init__(self, name: str, config, task, seed: int):
        """`config`: an rl.config.TaskFamilyConfig; `task`: the rl.config.TaskConfig of the generated task."""
        self.name, self.config, self.seed = name, config, seed
        self.task = generated_task(task) if config.path is None else None
        self.rows = None if config.path is None else load_records(config.path, self.fields(config), self.setting)

    @property
    def setting(self) -> str:
        return f"data.families.{self.name}.path"

    @staticmethod
    def fields(config) -> tuple[str, ...]:
        optional = (config.type_field, config.budget_field)
        return (config.prompt_field, config.answer_field, *(f for f in optional if f), *config.metadata_fields)

    def _row(self, k: int) -> int:
        epoch, offset = divmod(k, len(self.rows))
        order = list(range(len(self.rows)))
        random.Random(f"{self.seed}/{self.name}/{epoch}").shuffle(order)
        return order[offset]

    def problem(self, k: int) -> Prompt:
        """The family's k-th draw."""
        c = self.config
        if self.rows is None:
            p = self.task.problem(k)
            return Prompt(p.prompt, p.reference, self.name, self.name, c.max_new_tokens)
        row = self.rows[self._row(k)]
        budget = row[c.budget_field] if c.budget_field else None
        return Prompt(str(row[c.prompt_field]), str(row[c.answer_field]), self.name,
                      str(row[c.type_field]) if c.type_field else self.name,
                      int(budget) if budget is not None else c.max_new_tokens,
                      {f: row[f] for f in c.metadata_fields})


class PromptSource:
    """The run's prompt stream over its task families (`rl.config.DataConfig`)."""

    def __init__(self, data, task, seed: int):
        self.families = [Family(name, cfg, task, seed) for name, cfg in data.families.items()]
        self.weights = [cfg.weight for cfg in data.families.values()]
        self.seed = seed
        self._counted_to, self._counts = 0, [0] * len(self.families)  # draws per family before `_counted_to`

    def _family(self, position: int) -> int:
        if len(self.families) == 1:
            return 0
        return random.Random(self.seed * 1_000_003 + position).choices(range(len(self.families)), self.weights)[0]

    def _draws_before(self, position: int) -> list[int]:
        if len(self.families) == 1:
            return [position]
        if position < self._counted_to:
            self._counted_to, self._counts = 0, [0] * len(self.families)
        for n in range(self._counted_to, position):
            self._counts[self._family(n)] += 1
        self._counted_to = position
        return list(self._counts)

    def prompts(self, start: int, count: int) -> list[Prompt]:
        """Positions start .. start + count - 1 of the stream."""
        draws = self._draws_before(start)
        out = []
        for position in range(start, start + count):
            f = self._family(position)
            out.append(self.families[f].problem(draws[f]))
            draws[f] += 1
        return out

    def held_out(self, start: int, count: int) -> list[Prompt]:
        """Evaluation prompts: the generated families' problems from `start` on (a range training never
        reaches), shared out by weight; prompt-set families have no held-out part here."""
        generated = [(f, w) for f, w in zip(self.families, self.weights) if f.rows is None]
        if not generated:
            return []
        out = []
        for i in range(count):
            family = random.Random(self.seed * 7_919 + i).choices([f for f, _ in generated], [w for _, w in generated])[0]
            out.append(family.problem(start + i))
        return out
