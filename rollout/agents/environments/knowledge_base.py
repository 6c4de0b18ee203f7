"""A synthetic knowledge base with a lookup tool, and the two PARL task shapes built on it (K2.5 §3):

- wide search: the same attribute of many entities, each fact independent of the others (parallel
  sub-agents can each gather some; a single agent needs one lookup per fact);
- deep search: a chain of lookups, each step needing the last one's result (no parallelism helps).

The base is a pure function of its seed and size, so tasks, tools and references agree without files.
"""
from __future__ import annotations

import functools
import random

from rl.sample import Problem
from rollout.agents.environments.base import Environment
from rollout.agents.tools import Tool

CITIES = ("oslo", "lima", "rome", "kyiv", "baku", "riga", "doha", "suva", "male", "apia", "bern", "lome")
COLORS = ("red", "blue", "green", "amber", "teal", "gray", "pink", "gold")
ATTRIBUTES = ("city", "color", "year", "next")


@functools.lru_cache(maxsize=16)
def knowledge_base(seed: int, entities: int) -> dict[str, dict[str, str]]:
    """entity -> attribute -> value; `next` links every entity into one cycle (deep search follows it)."""
    rng = random.Random(f"kb/{seed}/{entities}")
    names = [f"e{i:02d}" for i in range(entities)]
    order = names[:]
    rng.shuffle(order)
    successor = {a: b for a, b in zip(order, order[1:] + order[:1])}
    return {n: {"city": rng.choice(CITIES), "color": rng.choice(COLORS), "year": str(rng.randint(1900, 2020)),
                "next": successor[n]} for n in names}


def item_f1(answer: str, reference: str) -> tuple[float, dict[str, float]]:
    """WideSearch-style item F1 of a comma-separated answer against the reference items, position by
    position (item i is right when the i-th answer equals the i-th reference value)."""
    predicted = [a.strip().lower() for a in answer.split(",") if a.strip()]
    expected = [r.strip().lower() for r in reference.split(",")]
    correct = sum(p == e for p, e in zip(predicted, expected))
    precision = correct / len(predicted) if predicted else 0.0
    recall = correct / len(expected)
    f1 = 2 * precision * recall / (precision + recall) if correct else 0.0
    return f1, {"precision": precision, "recall": recall}


class KnowledgeBaseEnvironment(Environment):
    """Options: `kb_seed` and `entities` of the base; `items` (wide) or `hops` (deep) of generated tasks."""
    system_prompt = ("Answer from the knowledge base. lookup(entity, attribute) returns one fact. "
                     "Put the final answer in <answer></answer>.")

    @property
    def base(self) -> dict[str, dict[str, str]]:
        return knowledge_base(int(self.options.get("kb_seed", 0)), int(self.options.get("entities", 24)))

    def tools(self) -> list[Tool]:
        return [Tool("lookup", "The value of one attribute of one entity.",
                     {"type": "object", "properties": {"entity": {"type": "string", "enum": sorted(self.base)},
                                                       "attribute": {"type": "string", "enum": list(ATTRIBUTES)}},
                      "required": ["entity", "attribute"]}, self._lookup)]

    def _lookup(self, entity: str, attribute: str) -> str:
        return self.base.get(entity, {}).get(attribute, f"no {attribute} for {entity}")

    @classmethod
    def _draw(cls, index: int, seed: int, entities: int, options: dict) -> tuple[dict, random.Random, str]:
        """The base, the task's own random stream, and the attribute it asks for."""
        base = knowledge_base(int(options.get("kb_seed", 0)), entities)
        rng = random.Random(f"{cls.stream}/{seed}/{index}")
        return base, rng, rng.choice(("city", "color", "year"))


class WideSearchEnvironment(KnowledgeBaseEnvironment):
    name, stream = "wide_search", "wide"

    @classmethod
    def draw(cls, index: int, seed: int, entities: int = 24, items: int = 4, **options) -> tuple[str, list[str], dict]:
        """The index-th task's parts: the attribute asked for, the entities in order, and the base."""
        base, rng, attribute = cls._draw(index, seed, entities, options)
        return attribute, rng.sample(sorted(base), items), base

    @classmethod
    def generate(cls, index: int, seed: int, entities: int = 24, items: int = 4, **options) -> Problem:
        attribute, chosen, base = cls.draw(index, seed, entities, items, **options)
        return Problem(prompt=f"Find the {attribute} of each of {', '.join(chosen)}. Answer with the values in "
                              f"that order, separated by commas.",
                       reference=",".join(base[e][attribute] for e in chosen))

    def reward(self, answer: str):
        return item_f1(answer, self.reference)


class DeepSearchEnvironment(KnowledgeBaseEnvironment):
    name, stream = "deep_search", "deep"

    @classmethod
    def generate(cls, index: int, seed: int, entities: int = 24, hops: int = 3, **options) -> Problem:
        base, rng, attribute = cls._draw(index, seed, entities, options)
        entity = start = rng.choice(sorted(base))
        for _ in range(hops):
            entity = base[entity]["next"]
        return Problem(prompt=f"Start at {start}, follow next {hops} times, and give the {attribute} you reach.",
                       reference=base[entity][attribute])

    def reward(self, answer: str) -> float:
        return 1.0 if answer.strip().lower() == self.reference.strip().lower() else 0.0
