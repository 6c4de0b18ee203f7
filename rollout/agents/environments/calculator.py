"""A single-agent tool task: arithmetic a small model cannot do in its head, with a calculator tool and,
optionally, a Python tool that runs in the reward sandbox (rewards/sandbox.py)."""
from __future__ import annotations

import ast
import operator
import random

from rewards.builtin.verifiable import exact_match
from rewards.sandbox import Limits, Sandbox
from rl.sample import Problem
from rollout.agents.environments.base import Environment
from rollout.agents.tools import Tool

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
              ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate_arithmetic(expression: str) -> int:
    """An integer expression of + - * // % and parentheses; anything else raises ValueError."""
    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Mult) and abs(left) * abs(right) > 10**30:
                raise ValueError("result too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.operand))
        raise ValueError(f"unsupported expression: {ast.dump(node)[:40]}")
    try:
        return walk(ast.parse(expression, mode="eval"))
    except (SyntaxError, ZeroDivisionError) as exc:
        raise ValueError(str(exc)) from None


class CalculatorEnvironment(Environment):
    name = "calculator"

    @classmethod
    def generate(cls, index: int, seed: int, digits: int = 3, **options) -> Problem:
        rng = random.Random(f"calculator/{seed}/{index}")
        a, b, c = (rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in range(3))
        op = rng.choice("+-")
        expression = f"{a}*{b}{op}{c}"
        return Problem(prompt=f"What is {expression}?", reference=str(evaluate_arithmetic(expression)))

    def tools(self) -> list[Tool]:
        tools = [Tool("calculator", "Evaluate an integer arithmetic expression (+ - * // % and parentheses).",
                      {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 32}},
                       "required": ["expression"]},
                      lambda expression: str(evaluate_arithmetic(expression)))]
        if self.options.get("python_tool", False):
            tools.append(Tool("python", "Run a Python program in a sandbox and return what it prints.",
                              {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
                              self._run_python))
        return tools

    def _run_python(self, code: str) -> str:
        result = Sandbox(Limits(wall_s=float(self.options.get("python_timeout_s", 5.0)))).run_python(code)
        return (result.stdout if result.status == "ok" else f"{result.status}: {result.stderr[-200:]}").strip()

    def reward(self, answer: str) -> float:
        return exact_match(answer, self.reference)
