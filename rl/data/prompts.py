"""Prompt sets: task families mixed by weight, drawn deterministically and resumably.

A family is either the project's generated task (the demo's addition stream, `path` None) or a
prompt set read from a JSONL/JSON or parquet file, or a directory saved by HF `datasets`, with
configurable fields for the prompt, the reference answer, the task type (used to route rewards)
a per-row token budget, and fields passed on to the rewards (`Sample.metadata`: instruction
checks, unit tests, rubrics). Position n of the run's prompt stream goes to a family drawn with the
families' weights from a generator seeded by (seed, n); the family's k-th draw takes its k-th
problem (generated) or row k of a seeded permutation of its rows, one permutation per epoch,
computed once for the epoch (a draw is O(1)); rows are read from the Arrow table on demand. Every
draw is a function of the seed and the position, so a resumed run needs only the position.

A prompt is a string, or a list of chat messages ({role, content}: the verl/TRL convention) that
`encode_prompt` renders with the tokenizer's chat template; a family's `system_prompt` (or `chat`)
makes its string prompts chat messages too. A family's `eval_path` holds its held-out prompts.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from rl.data.prompt_files import RowRules, chat_messages, checked_table
from rl.data.tasks import AdditionTask


@dataclass(frozen=True)
class Prompt:
    prompt: str
    reference: str
    family: str
    task_type: str  # the row's task type, or the family's name
    max_new_tokens: Optional[int] = None  # this prompt's token budget; None: the family's or the rollout's
    metadata: dict[str, Any] = field(default_factory=dict)  # the row's `metadata_fields`, for rewards
    messages: Optional[list[dict]] = None  # chat messages, rendered with the chat template; None: `prompt`


def encode_prompt(tokenizer, prompt: Prompt) -> tuple[str, list[int]]:
    """The prompt's text and token ids: chat messages through the tokenizer's chat template with the
    generation prompt (the ids of `apply_chat_template(..., tokenize=True)`: no second BOS), plain
    text through `encode`."""
    if prompt.messages is None:
        return prompt.prompt, tokenizer.encode(prompt.prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"data.families.{prompt.family}: chat prompts need a tokenizer with a chat template")
    text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def generated_task(task):
    """The generated task of `task` (rl.config.TaskConfig): the demo addition, or an environment's tasks."""
    if task.name == "addition":
        return AdditionTask(task.digits, task.seed, task.reverse_answer)
    from rollout.agents.environments import EnvironmentTask

    return EnvironmentTask(task.name, task.seed, task.options)


class Family:
    def __init__(self, name: str, config, task, seed: int, on_bad_row: str = "error"):
        """`config`: an rl.config.TaskFamilyConfig; `task`: the rl.config.TaskConfig of the generated task;
        `on_bad_row`: data.on_bad_row (rl/data/prompt_files.py)."""
        self.name, self.config, self.seed = name, config, seed
        self.task = generated_task(task) if config.path is None else None
        self.skipped_rows = 0  # bad rows left out of its files (data.on_bad_row = skip)
        self.rows = self._table(config.path, self.setting, on_bad_row)
        self.eval_rows = self._table(config.eval_path, f"data.families.{name}.eval_path", on_bad_row)
        self._order: tuple[int, Optional[np.ndarray]] = (-1, None)  # (epoch, its permutation)

    def _table(self, path, setting: str, on_bad_row: str):
        """A prompt file's checked rows (config validation checked it already: this reuses its result)."""
        if path is None:
            return None
        checked = checked_table(path, self.fields(self.config), self.rules(self.config), setting, on_bad_row)
        self.skipped_rows += len(checked.skipped)
        return checked.table

    @staticmethod
    def rules(config, max_prompt_tokens=None) -> RowRules:
        return RowRules(config.prompt_field, config.answer_field, config.budget_field, config.system_prompt,
                        config.chat, max_prompt_tokens)

    @property
    def setting(self) -> str:
        return f"data.families.{self.name}.path"

    @staticmethod
    def fields(config) -> tuple[str, ...]:
        optional = (config.type_field, config.budget_field)
        return (config.prompt_field, config.answer_field, *(f for f in optional if f), *config.metadata_fields)

    def _row(self, k: int) -> int:
        epoch, offset = divmod(k, len(self.rows))
        if self._order[0] != epoch:  # once per epoch; then every draw of the epoch is an index
            key = hashlib.sha256(f"{self.seed}/{self.name}/{epoch}".encode()).digest()
            self._order = (epoch, np.random.default_rng(int.from_bytes(key[:8], "little")).permutation(len(self.rows)))
        return int(self._order[1][offset])

    def problem(self, k: int) -> Prompt:
        """The family's k-th draw."""
        if self.rows is None:
            p = self.task.problem(k)
            return Prompt(p.prompt, p.reference, self.name, self.name, self.config.max_new_tokens)
        index = self._row(k)
        return self._prompt(self.rows[index], f"{self.setting} row {index}")

    def held_out(self, i: int) -> Prompt:
        """Row i of the family's held-out prompts (`eval_path`)."""
        return self._prompt(self.eval_rows[i], f"data.families.{self.name}.eval_path row {i}")

    def _prompt(self, row: dict, where: str) -> Prompt:
        c = self.config
        budget = row[c.budget_field] if c.budget_field else None
        value = row[c.prompt_field]
        messages = chat_messages(value, c.system_prompt, c.chat, f"{where}: {c.prompt_field}")
        return Prompt(value if messages is None else "", str(row[c.answer_field]), self.name,
                      str(row[c.type_field]) if c.type_field else self.name,
                      int(budget) if budget is not None else c.max_new_tokens,
                      {f: row[f] for f in c.metadata_fields}, messages)


class PromptSource:
    """The run's prompt stream over its task families (`rl.config.DataConfig`)."""

    def __init__(self, data, task, seed: int):
        self.families = [Family(name, cfg, task, seed, data.on_bad_row) for name, cfg in data.families.items()]
        self.weights = [cfg.weight for cfg in data.families.values()]
        self.seed = seed
        self._counted_to, self._counts = 0, [0] * len(self.families)  # draws per family before `_counted_to`

    @property
    def skipped_rows(self) -> int:
        """Bad rows left out of the families' files (data.on_bad_row = skip)."""
        return sum(f.skipped_rows for f in self.families)

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
        reaches), `count` shared out by weight; and each prompt-set family's first `count` held-out
        rows (`eval_path`)."""
        out = [f.held_out(i) for f in self.families if f.eval_rows is not None
               for i in range(min(count, len(f.eval_rows)))]
        generated = [(f, w) for f, w in zip(self.families, self.weights) if f.rows is None]
        if not generated:
            return out
        for i in range(count):
            family = random.Random(self.seed * 7_919 + i).choices([f for f, _ in generated], [w for _, w in generated])[0]
            out.append(family.problem(start + i))
        return out
