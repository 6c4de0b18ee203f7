"""The PTX loss's data (Kimi K2 §3.2.3): curated demonstrations trained by NLL inside every RL step.

L = L_RL + coef * L_PTX, with L_PTX the token-mean negative log-likelihood of the demonstrations'
response tokens (docs/kimi-methods.md §3). The demonstrations come from a JSONL or parquet file with `prompt`
and `response` fields, or, with no file, from the task itself: correct answers to problems of a
stream disjoint from the RL prompts. Batches are a pure function of the step, so a resumed run
draws the same ones.
"""
from __future__ import annotations

import random
from typing import Optional

from rl.data.prompt_files import load_records
from rl.data.tasks import AdditionTask
from rl.sample import Sample

PTX_FIELDS = ("prompt", "response")
_TASK_SEED_OFFSET = 104_729  # the task-generated demonstrations: a stream disjoint from the RL prompts


class PTXData:
    def __init__(self, tokenizer, path: Optional[str], task: AdditionTask, seed: int):
        self.tokenizer, self.seed = tokenizer, seed
        self.records = load_records(path, PTX_FIELDS, "ptx.path") if path else None
        self.task = AdditionTask(task.digits, task.seed + _TASK_SEED_OFFSET, task.reverse_answer)

    def _record(self, index: int) -> tuple[str, str]:
        if self.records is None:
            problem = self.task.problem(index)
            return problem.prompt, problem.reference
        row = self.records[random.Random(self.seed * 1_000_003 + index).randrange(len(self.records))]
        return row["prompt"], row["response"]

    def batch(self, step: int, size: int) -> list[Sample]:
        """The demonstrations of RL step `step`, as samples whose response is the demonstration (+ EOS)."""
        out = []
        for i in range(size):
            prompt, response = self._record(step * size + i)
            out.append(Sample(group_id=-1 - i, prompt=prompt, prompt_ids=self.tokenizer.encode(prompt), reference=response,
                              response=response, ptx=True,
                              response_ids=self.tokenizer.encode(response) + [self.tokenizer.eos_token_id]))
        return out
