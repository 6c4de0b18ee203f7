"""Prompt sets and task families (rl/data/prompts.py): files and `datasets` directories, weights, budgets, and
a stream that is a function of the seed and the position (so a resumed run draws the same prompts)."""
import json
from collections import Counter

import pytest

from rl.config import ConfigError, load_config
from rl.data.config import DataConfig, TaskConfig, TaskFamilyConfig
from rl.data.prompt_files import load_records
from rl.data.prompts import PromptSource
from rl.data.tasks import AdditionTask

ROWS = [{"question": f"q{i}", "solution": str(i), "kind": "math" if i % 2 else "logic", "limit": 2 + i % 3}
        for i in range(10)]


@pytest.fixture
def prompt_set(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def _family(path, **fields):
    return TaskFamilyConfig(path=path, prompt_field="question", answer_field="solution", **fields)


def test_the_demo_family_is_the_addition_stream():
    source = PromptSource(DataConfig(), TaskConfig(), seed=0)
    task = AdditionTask(TaskConfig().digits, TaskConfig().seed, TaskConfig().reverse_answer)
    assert [(p.prompt, p.reference) for p in source.prompts(40, 5)] == [(q.prompt, q.reference) for q in task.batch(40, 5)]
    assert all(p.family == p.task_type == "addition" and p.max_new_tokens is None for p in source.prompts(0, 3))


def test_families_mix_by_weight_and_the_stream_is_a_function_of_the_position(prompt_set):
    data = DataConfig(families={"addition": TaskFamilyConfig(weight=3.0), "set": _family(prompt_set, weight=1.0)})
    source = PromptSource(data, TaskConfig(), seed=7)
    stream = source.prompts(0, 2000)
    share = Counter(p.family for p in stream)["set"] / len(stream)
    assert share == pytest.approx(0.25, abs=0.03)
    # any window, from a fresh source (a resumed run) or after a detour, equals the same positions of the stream
    assert PromptSource(data, TaskConfig(), seed=7).prompts(1500, 20) == stream[1500:1520]
    assert source.prompts(3, 4) == stream[3:7]
    assert PromptSource(data, TaskConfig(), seed=8).prompts(0, 50) != stream[:50]  # the seed matters


def test_a_prompt_set_is_visited_once_per_epoch_in_a_seeded_order(prompt_set):
    data = DataConfig(families={"set": _family(prompt_set, type_field="kind", budget_field="limit")})
    first, second = PromptSource(data, TaskConfig(), 0).prompts(0, 10), PromptSource(data, TaskConfig(), 0).prompts(10, 10)
    assert sorted(p.prompt for p in first) == sorted(r["question"] for r in ROWS) == sorted(p.prompt for p in second)
    assert [p.prompt for p in first] != [p.prompt for p in second]  # each epoch is shuffled anew
    by_prompt = {r["question"]: r for r in ROWS}
    for p in first:  # the row's answer, task type and token budget come along
        row = by_prompt[p.prompt]
        assert (p.reference, p.task_type, p.max_new_tokens) == (row["solution"], row["kind"], row["limit"])


@pytest.mark.parametrize("kind", ["parquet", "datasets"])
def test_parquet_files_and_datasets_directories_load_the_same_rows(tmp_path, kind):
    import datasets

    table = datasets.Dataset.from_list(ROWS)
    path = str(tmp_path / ("set.parquet" if kind == "parquet" else "set"))
    table.to_parquet(path) if kind == "parquet" else table.save_to_disk(path)
    prompts = PromptSource(DataConfig(families={"set": _family(path)}), TaskConfig(), 0).prompts(0, 10)
    assert sorted((p.prompt, p.reference) for p in prompts) == sorted((r["question"], r["solution"]) for r in ROWS)


def test_held_out_prompts_come_from_the_generated_families_only(prompt_set):
    mixed = PromptSource(DataConfig(families={"addition": TaskFamilyConfig(), "set": _family(prompt_set)}),
                         TaskConfig(), 0)
    assert {p.family for p in mixed.held_out(10**9, 20)} == {"addition"}
    assert PromptSource(DataConfig(families={"set": _family(prompt_set)}), TaskConfig(), 0).held_out(10**9, 5) == []


@pytest.mark.parametrize("family, field", [
    ({"answer_field": "answer"}, "data.families.set.path: .* has no field 'answer'"),
    ({"budget_field": "question"}, r"data.families.set.path: .* line 1: question: must be an integer >= 1, got 'q0'"),
    ({"weight": 0.0}, "data.families.set.weight: must be > 0"),
    ({"max_new_tokens": 0}, "data.families.set.max_new_tokens: must be in"),
    ({"temperature": 0.0}, "data.families.set.temperature: must be > 0"),
    ({"temperature_end": 0.5}, "data.families.set.temperature_end: needs the family's own start temperature"),
])
def test_bad_prompt_sets_are_named_before_anything_starts(prompt_set, family, field):
    fields = {"path": prompt_set, "prompt_field": "question", "answer_field": "solution", **family}
    with pytest.raises(ConfigError, match="^" + field):
        load_config({"data": {"families": {"set": fields}}})
    with pytest.raises(ConfigError, match="^data.families.gone.path: does not exist"):
        load_config({"data": {"families": {"gone": {"path": prompt_set + ".missing"}}}})


def test_a_family_is_added_from_the_command_line(prompt_set):
    """Hydra: `+data.families.<name>.<field>=...` adds a family next to the demo's."""
    from hydra import compose, initialize
    from hydra.core.config_store import ConfigStore

    from rl.config import Config

    ConfigStore.instance().store(name="tandem_schema", node=Config)
    with initialize(config_path="../../conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+data.families.set.path={prompt_set}",
                                                       "+data.families.set.prompt_field=question",
                                                       "+data.families.set.answer_field=solution"])
    config = load_config(cfg)
    assert set(config.data.families) == {"addition", "set"} and config.data.families["set"].path == prompt_set
    with pytest.raises(ConfigError, match="^data.families.set.wieght: Key 'wieght' not in"):
        load_config({"data": {"families": {"set": {"path": prompt_set, "wieght": 2}}}})


# --- chat prompts, held-out sets, draws at scale (issue 18) ---------------------------------------------
def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_chat_message_prompts_render_with_the_chat_template_and_no_second_bos(tmp_path, smollm2):
    from transformers import AutoTokenizer

    from rl.data.prompts import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    path = _write(tmp_path / "chat.jsonl", [{"question": messages, "solution": "7"}])
    source = PromptSource(DataConfig(families={"chat": _family(path)}), TaskConfig(), seed=0)
    prompt = source.prompts(0, 1)[0]
    assert prompt.messages == messages
    text, ids = encode_prompt(tokenizer, prompt)
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids == list(expected) and ids.count(tokenizer.bos_token_id) == expected.count(tokenizer.bos_token_id)
    assert text.endswith("<|im_start|>assistant\n")
    # a string prompt with the family's system prompt becomes [system, user]
    plain = _write(tmp_path / "plain.jsonl", [{"question": "What is 3 + 4?", "solution": "7"}])
    family = _family(plain, system_prompt="Answer with a number.")
    prompt = PromptSource(DataConfig(families={"p": family}), TaskConfig(), seed=0).prompts(0, 1)[0]
    assert prompt.messages == [{"role": "system", "content": "Answer with a number."}, *messages]
    # without a system prompt or `chat`, a string prompt stays text, encoded as before
    text = PromptSource(DataConfig(families={"p": _family(plain)}), TaskConfig(), seed=0).prompts(0, 1)[0]
    assert text.messages is None and encode_prompt(tokenizer, text)[1] == tokenizer.encode("What is 3 + 4?")


@pytest.mark.parametrize("value", [7, {"role": "user", "content": "hi"}, [{"role": "robot", "content": "hi"}]])
def test_a_prompt_that_is_neither_text_nor_messages_is_named(tmp_path, value):
    path = _write(tmp_path / "bad.jsonl", [{"question": value, "solution": "1"}])
    with pytest.raises(ValueError, match=r"^data.families.bad.path: .*bad.jsonl line 1: question: "):
        PromptSource(DataConfig(families={"bad": _family(path)}), TaskConfig(), seed=0)


def test_eval_path_rows_are_the_families_held_out_prompts(tmp_path, prompt_set):
    held = _write(tmp_path / "held.jsonl", [{"question": f"h{i}", "solution": str(i)} for i in range(4)])
    data = DataConfig(families={"addition": TaskFamilyConfig(), "set": _family(prompt_set, eval_path=held)})
    prompts = PromptSource(data, TaskConfig(), seed=0).held_out(10**9, 3)
    assert [p.prompt for p in prompts if p.family == "set"] == ["h0", "h1", "h2"]
    assert sum(p.family == "addition" for p in prompts) == 3
    with pytest.raises(ConfigError, match="eval_path"):
        load_config({"data": {"families": {"addition": {"eval_path": held}}}})


def test_every_epoch_draws_each_row_once_in_its_own_order(prompt_set):
    source = PromptSource(DataConfig(families={"set": _family(prompt_set)}), TaskConfig(), seed=3)
    first, second = source.prompts(0, 10), source.prompts(10, 10)
    assert sorted(p.prompt for p in first) == sorted(p.prompt for p in second) == sorted(r["question"] for r in ROWS)
    assert [p.prompt for p in first] != [p.prompt for p in second]
    again = PromptSource(DataConfig(families={"set": _family(prompt_set)}), TaskConfig(), seed=3)
    assert [p.prompt for p in again.prompts(5, 10)] == [p.prompt for p in source.prompts(5, 10)]


def test_the_word_problem_files_are_chat_rows_and_the_held_out_file_shares_no_problem(tmp_path):
    from rl.data.word_problems import write

    train, test = (load_records(p, ("messages", "answer"), "x") for p in write(str(tmp_path), train=2000, test=100))
    assert len(test) == 100 and all(r["messages"][0]["role"] == "user" for r in train + test)
    texts = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert not texts(train) & texts(test)
    assert any(r["messages"][0]["content"].startswith("What is") for r in test)  # sums of unseen pairs
    assert all(int(r["answer"]) == eval(r["messages"][0]["content"][8:].split("?")[0])  # noqa: S307
               for r in test if r["messages"][0]["content"].startswith("What is"))


def test_config_validation_names_the_first_bad_prompt_row(tmp_path):
    path = _write(tmp_path / "rows.jsonl", [{"question": "fine", "solution": "1"}, {"question": "also", "solution": "2"},
                                            {"question": 7, "solution": "3"}])
    family = {"path": path, "prompt_field": "question", "answer_field": "solution"}
    with pytest.raises(ConfigError, match=r"^data.families.set.path: .*rows.jsonl line 3: question: must be a string or a list"):
        load_config({"data": {"families": {"set": family}}})
