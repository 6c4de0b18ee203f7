"""Code rewards: the response's program run against the prompt's unit tests in the sandbox.

`sample.metadata["tests"]` (from the prompt set's `metadata_fields`) is a list of tests, each either
- {"input": "...", "output": "..."}: the program reads the input on stdin and must print the output
  (compared line by line, trailing whitespace ignored), as in competitive programming; or
- a string of Python (e.g. "assert add(2, 3) == 5"), run after the program in the same file.
The program is the response's last fenced code block (or the whole response when it has none). The
score is the fraction of tests passed (`strict`: 1.0 only when all pass); each test's pass/fail is a
sub-score, and its sandbox status (ok, error, timeout, cpu_time, memory, ...) is counted by name.
"""
from __future__ import annotations

import functools
import logging
import re
from collections import Counter

from rewards.registry import reward
from rewards.sandbox import Limits, Sandbox

log = logging.getLogger(__name__)
_FENCED = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    blocks = _FENCED.findall(response)
    return blocks[-1] if blocks else response


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


@functools.lru_cache(maxsize=None)
def sandbox(limits: Limits) -> Sandbox:
    box = Sandbox(limits)
    if not box.network_isolated():
        log.warning("code sandbox (%s mode): the network is NOT isolated on this machine", box.mode)
    return box


def run_test(box: Sandbox, program: str, test) -> tuple[bool, str]:
    if isinstance(test, str):
        result = box.run_python(program + "\n\n" + test)
        return result.ok, result.status
    result = box.run_python(program, stdin=str(test.get("input", "")))
    return result.ok and _lines(result.stdout) == _lines(str(test["output"])), result.status


@reward("code_tests")
def code_tests(sample, strict: bool = False, wall_s: float = 10.0, cpu_s: int = 5, memory_mb: int = 512):
    tests = sample.metadata.get("tests")
    if not tests:
        raise ValueError("the prompt has no 'tests' (list them in data.families.<name>.metadata_fields)")
    box = sandbox(Limits(wall_s=wall_s, cpu_s=cpu_s, memory_mb=memory_mb))
    program = extract_code(sample.response)
    outcomes = [run_test(box, program, test) for test in tests]
    passed = [ok for ok, _ in outcomes]
    parts = {f"test{i}": float(ok) for i, ok in enumerate(passed)}
    parts.update({f"status_{status}": float(n) for status, n in Counter(s for _, s in outcomes).items()})
    return (float(all(passed)) if strict else sum(passed) / len(passed)), parts
