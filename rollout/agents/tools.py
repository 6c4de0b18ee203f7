"""Tools as OpenAI-style function schemas, and the tool calls a model writes in its turns.

A model calls tools the way Qwen/Hermes-style chat models do: each call is a JSON object
``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and ``</tool_call>``, several per turn
for calls to run in parallel. A turn without calls is the agent's final message; its answer is what
is inside ``<answer>...</answer>``, or the whole text. Malformed calls do not raise: they come back
as `ParsedCall`s with an error, which the agent loop returns to the model as the tool's result and
counts (a format signal for rewards).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Union

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
_TOOL_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="tool")
_REGEX_SPECIAL = set(".^$*+?{}[]\\|()")
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


@dataclass
class Tool:
    """One tool: an OpenAI function schema and the function that runs it (sync or async, called with
    the arguments as keywords, returning the text the model sees)."""
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of an object: properties, required
    run: Callable[..., Union[str, Awaitable[str]]]
    timeout_s: Optional[float] = None  # its own bound (a sub-agent's whole episode); None: agent.tool_timeout_s

    def schema(self) -> dict[str, Any]:
        """The OpenAI `tools` entry (what a chat template renders into the system prompt)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        """The call as the model writes it."""
        return CALL_OPEN + json.dumps({"name": self.name, "arguments": self.arguments}) + CALL_CLOSE


@dataclass
class ParsedCall:
    """A tool call found in a turn: `call` when it is well formed and valid, else `error` says why."""
    text: str
    call: Optional[ToolCall] = None
    error: Optional[str] = None


def parse_tool_calls(text: str, tools: dict[str, Tool]) -> list[ParsedCall]:
    """Every tool call in a turn, in order, each valid or with the reason it is not."""
    parsed = [_parse_one(m.group(0), m.group(1), tools) for m in _CALL_RE.finditer(text)]
    tail = _CALL_RE.sub("", text)
    if CALL_OPEN in tail:  # an opened call the turn never closed (cut off, or malformed)
        start = tail.index(CALL_OPEN)
        parsed.append(ParsedCall(tail[start:], error=f"unclosed {CALL_OPEN}"))
    return parsed


def _parse_one(text: str, body: str, tools: dict[str, Tool]) -> ParsedCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        return ParsedCall(text, error=f"not JSON: {exc.msg}")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ParsedCall(text, error='a call is {"name": ..., "arguments": {...}}')
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return ParsedCall(text, error="arguments are not a JSON object")
    if not isinstance(arguments, dict):
        return ParsedCall(text, error="arguments are not a JSON object")
    tool = tools.get(obj["name"])
    if tool is None:
        return ParsedCall(text, error=f"unknown tool {obj['name']!r} (tools: {sorted(tools)})")
    error = check_arguments(arguments, tool.parameters)
    call = ToolCall(obj["name"], arguments)
    return ParsedCall(text, call=None if error else call, error=error)


def check_arguments(arguments: dict[str, Any], schema: dict[str, Any]) -> Optional[str]:
    """Why `arguments` do not fit the tool's schema (required, types, enums), or None."""
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in arguments:
            return f"missing argument {name!r}"
    for name, value in arguments.items():
        spec = properties.get(name)
        if spec is None:
            return f"unknown argument {name!r}"
        expected = _JSON_TYPES.get(spec.get("type", ""), object)
        if not isinstance(value, expected) or (isinstance(value, bool) and spec.get("type") != "boolean"):
            return f"argument {name!r} must be {spec.get('type')}"
        if "enum" in spec and value not in spec["enum"]:
            return f"argument {name!r} must be one of {spec['enum']}"
    return None


async def run_tool(tool: Tool, arguments: dict[str, Any], timeout_s: float) -> str:
    """Run a (validated) call within `timeout_s`; sync tools run on the tools' own thread pool (the
    default executor has a handful of threads, and queueing there would eat into the timeout). A failure
    or timeout becomes the text the model sees, so a broken tool never stops an episode."""
    try:
        if inspect.iscoroutinefunction(tool.run):
            result = await asyncio.wait_for(tool.run(**arguments), timeout_s)
        else:
            call = functools.partial(tool.run, **arguments)
            result = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(_TOOL_THREADS, call), timeout_s)
        return str(result)
    except asyncio.TimeoutError:
        return f"error: {tool.name} timed out after {timeout_s:g} s"
    except Exception as exc:  # noqa: BLE001 - the model sees why its call failed
        return f"error: {type(exc).__name__}: {exc}"


def final_answer(text: str) -> str:
    """The answer of a final turn: inside <answer>...</answer> when present, else the text."""
    match = ANSWER_RE.search(text)
    return (match.group(1) if match else text).strip()


def _literal(text: str) -> str:
    """`text` as a regex literal, escaping only metacharacters (grammar backends reject `\\ ` and kin)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def turn_regex(tools: list[Tool], max_calls: int, answer_chars: int, free_text_chars: int = 48) -> str:
    """A regular expression for one turn: 1..max_calls well-formed calls, or a final <answer>.

    For constrained decoding (`agent.constrain_format`): small models that cannot yet write the format
    still explore the tools. Arguments follow the schema's property order; strings are an `enum`'s
    values or up to `maxLength` (else `free_text_chars`) characters without quotes or markup."""
    def value(spec: dict) -> str:
        if "enum" in spec:
            return "(" + "|".join(_literal(json.dumps(v)) for v in spec["enum"]) + ")"
        kind = spec.get("type")
        if kind == "integer":
            return "-?[0-9]{1,6}"
        if kind == "number":
            return r"-?[0-9]{1,6}(\.[0-9]{1,4})?"
        if kind == "boolean":
            return "(true|false)"
        return '"' + rf'[^"\\<>\n]{{1,{int(spec.get("maxLength", free_text_chars))}}}' + '"'

    def call(tool: Tool) -> str:
        properties = tool.parameters.get("properties", {})
        args = ", ".join(_literal(json.dumps(name) + ": ") + value(spec) for name, spec in properties.items())
        return _literal(CALL_OPEN + '{"name": ' + json.dumps(tool.name) + ', "arguments": {') + args + \
            _literal("}}" + CALL_CLOSE)

    one = "(" + "|".join(call(t) for t in tools) + ")"
    answer = "<answer>" + rf"[^<>\n]{{0,{answer_chars}}}" + "</answer>"
    return f"{one}{{1,{max_calls}}}|{answer}" if tools else answer
