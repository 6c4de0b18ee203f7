"""Bad prompt files (rl/data/prompt_files.py): each bad row is named by file, line and field before any
engine starts (data.on_bad_row = error), or left out and counted (skip)."""
import json

import pytest

from rl.config import ConfigError, load_config
from rl.data.config import DataConfig, TaskConfig, TaskFamilyConfig
from rl.data.prompts import PromptSource

GOOD = [json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) for a in range(1, 4)]
# (the bad line, the message after "<file> line 3: ")
CASES = {
    "bad_json": ('{"prompt": "1+2=", "answer": ', "not JSON"),
    "not_utf8": (b'{"prompt": "1+2=\xff", "answer": "3"}', r"not UTF-8 \(byte 0xff at column 17\)"),
    "not_an_object": ('["1+2=", "3"]', r"not a JSON object \(a list\)"),
    "null_prompt": ('{"prompt": null, "answer": "3"}', "prompt: missing"),
    "number_prompt": ('{"prompt": 42, "answer": "3"}', "prompt: must be a string or a list of chat messages"),
    "empty_prompt": ('{"prompt": "  ", "answer": "3"}', "prompt: empty"),
    "no_answer": ('{"prompt": "1+2="}', "answer: missing"),
    "answer_a_list": ('{"prompt": "1+2=", "answer": ["3"]}', "answer: must be a string or a number, got list"),
    "too_long": (json.dumps({"prompt": "1+" * 200_000, "answer": "3"}), r"prompt: 400000 tokens, more than the \d+"),
}


def _file(tmp_path, bad, name="set.jsonl"):
    """Two good lines, a blank one (line 3), the bad line (line 4), a good one."""
    path = tmp_path / name
    bad = bad if isinstance(bad, bytes) else bad.encode()
    path.write_bytes(b"\n".join([GOOD[0].encode(), GOOD[1].encode(), b"", bad, GOOD[2].encode()]) + b"\n")
    return str(path)


def _config(path, on_bad_row="error"):
    return load_config({"data": {"families": {"addition": None, "set": {"path": path}}, "on_bad_row": on_bad_row}})


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_row_stops_the_run_before_it_starts_naming_file_line_and_field(tmp_path, case):
    bad, message = CASES[case]
    path = _file(tmp_path, bad)
    with pytest.raises(ConfigError, match=rf"^data.families.set.path: {path} line 4: {message}") as error:
        _config(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_with_skip_a_bad_row_is_left_out_and_counted(tmp_path, case):
    path = _file(tmp_path, CASES[case][0])
    config = _config(path, "skip")
    source = PromptSource(config.data, config.task, config.seed)
    assert source.skipped_rows == 1
    drawn = {p.prompt for p in source.prompts(0, 30)}
    assert drawn == {"1+1=", "2+2=", "3+3="}


def test_file_level_problems_name_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match=rf"^data.families.set.path: {empty} holds no rows"):
        _config(str(empty))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not a parquet file")
    with pytest.raises(ConfigError, match=rf"^data.families.set.path: {broken} cannot be read"):
        _config(str(broken))
    only_bad = _file(tmp_path, CASES["null_prompt"][0], "only_bad.jsonl")
    with open(only_bad, "w") as f:
        f.write(CASES["null_prompt"][0] + "\n")
    with pytest.raises(ConfigError, match=r"holds no usable rows \(1 skipped, first: .* line 1: prompt: missing\)"):
        _config(only_bad, "skip")
    with pytest.raises(ConfigError, match=r"^data.on_bad_row: must be one of \('error', 'skip'\)"):
        _config(only_bad, "ignore")


def test_the_held_out_file_is_checked_too(tmp_path):
    train = _file(tmp_path, GOOD[0], "train.jsonl")
    held_out = _file(tmp_path, CASES["no_answer"][0], "test.jsonl")
    with pytest.raises(ConfigError, match=rf"^data.families.set.eval_path: {held_out} line 4: answer: missing"):
        load_config({"data": {"families": {"set": {"path": train, "eval_path": held_out}}}})


def test_a_prompt_stream_without_validation_checks_its_rows_too(tmp_path):
    """PromptSource on its own (no config validation) reads through the same check."""
    path = _file(tmp_path, CASES["empty_prompt"][0])
    with pytest.raises(ValueError, match=rf"^data.families.set.path: {path} line 4: prompt: empty"):
        PromptSource(DataConfig(families={"set": TaskFamilyConfig(path=path)}), TaskConfig(), seed=0)


def test_a_bad_line_of_the_ptx_file_is_named(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "response": \n')
    with pytest.raises(ConfigError, match=rf"^ptx.path: {path} line 2: not JSON"):
        load_config({"ptx": {"coef": 0.1, "path": str(path)}})


def test_a_chat_prompt_is_counted_with_its_template(tmp_path):
    """90 bytes of content, which the template takes past a 100-token limit: counted, and named."""
    from rl.data.prompt_files import RowRules, checked_table

    path = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "x" * 90}]
    path.write_text(json.dumps({"prompt": messages, "answer": "1"}) + "\n")
    with_template = lambda m: sum(len(x["content"]) for x in m) + 20  # noqa: E731 - a template's tokens
    with pytest.raises(ValueError, match=r"line 1: prompt: 110 tokens, more than the 100"):
        checked_table(str(path), ("prompt", "answer"), RowRules("prompt", "answer", None, None, False, 100),
                      "data.families.chat.path", count_tokens=with_template)
