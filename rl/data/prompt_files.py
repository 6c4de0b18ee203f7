"""Prompt files: read into Arrow tables (`load_table`), prompts as text or chat messages
(`chat_messages`), and every row checked once before any engine starts (`checked_table`,
`data.on_bad_row`).

A bad row is named by its file and line (its row, in a parquet file or a `datasets` directory) and
the field at fault: a JSON line that does not parse or is not an object, a byte that is not UTF-8, a
prompt that is missing, neither text nor chat messages, empty, or longer than the context leaves
room for; an answer that is missing or neither a string nor a number; a budget that is not a
positive integer. `error` (the default) stops the run at the first one with that message; `skip`
leaves such rows out, logs the first few and counts them (`PromptSource.skipped_rows`, the
`data_rows_skipped` metric).

The check runs in config validation, and the prompt stream (rl/data/prompts.py) later asks for the
same file: `checked_table` keeps each result for the process, so the file is scanned once.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)
POLICIES = ("error", "skip")
ROLES = ("system", "user", "assistant", "tool")
BATCH_ROWS = 10_000  # rows read from the Arrow table at a time
# At most what a chat template adds around one message (role markers, separators; ChatML: about 5),
# so only prompts that may be too long are tokenized.
TEMPLATE_TOKENS_PER_MESSAGE = 64


def load_table(path: str, fields: tuple[str, ...], setting: str):
    """A .jsonl/.json or .parquet file, or a directory saved by `datasets`, as a `datasets.Dataset` of
    `fields` (Arrow, memory-mapped: rows are read when indexed); a missing field raises ValueError
    naming `setting` and the field."""
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
    return table.select_columns(list(dict.fromkeys(fields)))


def load_records(path: str, fields: tuple[str, ...], setting: str) -> list[dict]:
    """`load_table`'s rows as dicts (for small files read whole, such as PTX demonstrations); a JSON
    line that cannot be read is named by its line."""
    try:
        return [dict(row) for row in load_table(path, fields, setting)]
    except Exception as exc:
        if path.endswith(".jsonl") and not str(exc).startswith(f"{setting}:"):
            with open(path, "rb") as f:
                for n, raw in enumerate(f, start=1):
                    if raw.strip() and (problem := _line_problem(raw)) is not None:
                        raise ValueError(f"{setting}: {path} line {n}: {problem}") from None
        raise


def chat_messages(value: Any, system_prompt: Optional[str], chat: bool, where: str) -> Optional[list[dict]]:
    """A row's prompt as chat messages (None: plain text). Anything but a string or a list of
    {role, content} messages raises ValueError naming `where` (never silently turned into text)."""
    if isinstance(value, str):
        if not (chat or system_prompt):
            return None
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        bad = next((m for m in value if m.get("role") not in ROLES or not isinstance(m.get("content"), str)), None)
        if bad is not None:
            raise ValueError(f"{where}: a chat message needs a role in {ROLES} and a string content (got {bad!r})")
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        raise ValueError(f"{where}: must be a string or a list of chat messages ({{role, content}}), "
                         f"got {type(value).__name__}: {str(value)[:80]!r}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


@dataclass(frozen=True)
class BadRow:
    where: str  # "<file> line N" (JSON lines) or "<file> row N"
    problem: str  # "<field>: what is wrong"

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass(frozen=True)
class RowRules:
    """What a row of one task family must hold (from its TaskFamilyConfig and the run's limits)."""
    prompt_field: str
    answer_field: str
    budget_field: Optional[str]
    system_prompt: Optional[str]
    chat: bool
    max_prompt_tokens: Optional[int] = None  # the context left after the response budget; None: unchecked


@dataclass
class CheckedTable:
    table: Any  # a datasets.Dataset of the family's fields, bad rows left out
    skipped: list[BadRow]


_checked: dict[tuple, CheckedTable] = {}


def checked_table(path: str, fields: tuple[str, ...], rules: RowRules, setting: str, on_bad_row: str = "error",
                  count_tokens: Optional[Callable[[Any], int]] = None) -> CheckedTable:
    """The file's table with every row checked; bad rows raise ValueError naming `setting`, file, line
    and field (`error`), or are left out and listed (`skip`). `count_tokens(prompt value)`: the
    prompt's length in tokens, asked only of prompts that may exceed `max_prompt_tokens` (a token is
    at least one byte; chat messages get the template's allowance). Kept per (file, its size and time, fields, rules, policy): a
    later call for the same file gets the first call's result, token check included."""
    stat = os.stat(path)
    # the token limit is not in the key: the run's first check (config validation) sets it
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, fields, replace(rules, max_prompt_tokens=None),
           on_bad_row)
    if key not in _checked:
        _checked[key] = _check(path, fields, rules, setting, on_bad_row, count_tokens)
    return _checked[key]


def _check(path, fields, rules, setting, on_bad_row, count_tokens) -> CheckedTable:
    lines = JsonLines(path) if path.endswith(".jsonl") else None
    try:
        table, skipped = load_table(path, fields, setting), []
        bad_rows = _scan(table, rules, count_tokens, first_only=on_bad_row == "error")
    except Exception as exc:  # noqa: BLE001 - datasets cannot read the file: find the line, if it is JSON lines
        if str(exc).startswith(f"{setting}:"):  # a field no row has
            raise
        if lines is None:
            raise ValueError(f"{setting}: {path} cannot be read ({type(exc).__name__}: {_first_line(exc)})") from None
        table, skipped = lines.parsed(fields, rules, lambda row: row_problem(row, rules, count_tokens), setting,
                                      on_bad_row)
        bad_rows = []  # every line was checked as it was parsed
    if len(table) == 0 and not skipped:
        raise ValueError(f"{setting}: {path} holds no rows")
    located = [BadRow(lines.where(i) if lines else f"{path} row {i}", problem) for i, problem in bad_rows]
    if located and on_bad_row == "error":
        raise ValueError(f"{setting}: {located[0]}")
    if located:
        bad = {i for i, _ in bad_rows}
        table = table.select([i for i in range(len(table)) if i not in bad])
    skipped += located
    if skipped:
        log.warning("%s: %d bad rows skipped (data.on_bad_row=skip), first: %s", setting, len(skipped),
                    "; ".join(map(str, skipped[:3])))
    if len(table) == 0:
        raise ValueError(f"{setting}: {path} holds no usable rows ({len(skipped)} skipped, first: {skipped[0]})")
    return CheckedTable(table, skipped)


def _scan(table, rules: RowRules, count_tokens, first_only: bool) -> list[tuple[int, str]]:
    """(row index, problem) of the table's bad rows, a batch at a time; `first_only`: stop at the first."""
    bad_rows = []
    for first in range(0, len(table), BATCH_ROWS):
        batch = table[first:first + BATCH_ROWS]
        for offset in range(len(batch[rules.prompt_field])):
            problem = row_problem({f: batch[f][offset] for f in batch}, rules, count_tokens)
            if problem is not None:
                bad_rows.append((first + offset, problem))
                if first_only:
                    return bad_rows
    return bad_rows


def row_problem(row: dict, rules: RowRules, count_tokens: Optional[Callable[[Any], int]] = None) -> Optional[str]:
    """What is wrong with one row ("<field>: ..."), or None."""
    value = row.get(rules.prompt_field)
    if value is None:
        return f"{rules.prompt_field}: missing"
    try:
        messages = chat_messages(value, rules.system_prompt, rules.chat, rules.prompt_field)
    except ValueError as exc:
        return str(exc)
    text = value if messages is None else "".join(m["content"] for m in messages)
    if not text.strip():
        return f"{rules.prompt_field}: empty"
    limit = rules.max_prompt_tokens
    # a token is at least a byte of the text; the chat template adds its own tokens around each message
    upper_bound = len(text.encode()) + (0 if messages is None else TEMPLATE_TOKENS_PER_MESSAGE * (len(messages) + 1))
    if limit is not None and upper_bound > limit and count_tokens is not None:
        tokens = count_tokens(value if messages is None else messages)
        if tokens > limit:
            return (f"{rules.prompt_field}: {tokens} tokens, more than the {limit} the context leaves after the "
                    "response budget (rollout.max_total_tokens, the model's context)")
    answer = row.get(rules.answer_field)
    if answer is None:
        return f"{rules.answer_field}: missing"
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return f"{rules.answer_field}: must be a string or a number, got {type(answer).__name__}"
    if rules.budget_field:
        budget = row.get(rules.budget_field)
        if not (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1):
            return f"{rules.budget_field}: must be an integer >= 1, got {budget!r}"
    return None


class JsonLines:
    """A JSON-lines file read line by line: where its rows are, and its good rows when datasets'
    reader fails on a bad one. Blank lines hold no row."""

    def __init__(self, path: str):
        self.path = path
        self._lines: Optional[list[int]] = None  # the line number of each row

    def where(self, row: int) -> str:
        if self._lines is None:
            with open(self.path, "rb") as f:
                self._lines = [n for n, line in enumerate(f, start=1) if line.strip()]
        return f"{self.path} line {self._lines[row]}" if row < len(self._lines) else f"{self.path} row {row}"

    def parsed(self, fields: tuple[str, ...], rules: RowRules, problem_of: Callable[[dict], Optional[str]],
               setting: str, on_bad_row: str):
        """(a datasets.Dataset of the good rows' `fields`, the bad lines); `error`: the first bad line
        raises ValueError naming `setting`. A field a line lacks is None, as datasets reads it; answers
        become text (numbers in some rows and strings in others must share a column)."""
        import datasets

        rows, bad, numbers = [], [], []
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                problem = _line_problem(raw)
                row = None
                if problem is None:
                    record = json.loads(raw)
                    row = {k: record.get(k) for k in dict.fromkeys(fields)}
                    problem = problem_of(row)
                if problem is not None:
                    if on_bad_row == "error":
                        raise ValueError(f"{setting}: {self.path} line {n}: {problem}")
                    bad.append(BadRow(f"{self.path} line {n}", problem))
                    continue
                row[rules.answer_field] = str(row[rules.answer_field])
                rows.append(row)
                numbers.append(n)
        self._lines = numbers
        try:
            table = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({k: [] for k in fields})
        except Exception as exc:  # noqa: BLE001 - good rows whose fields do not share one type
            raise ValueError(f"{setting}: {self.path}: a field's values have types that do not fit one column "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None
        return table, bad


def _line_problem(raw: bytes) -> Optional[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(record, dict):
        return f"not a JSON object (a {type(record).__name__})"
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
