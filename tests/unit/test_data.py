"""Prompt sets and task families (rl/data/prompts.py): files and `datasets` directories, weights, budgets, and
a stream that is a function of the seed and the position (so a resumed run draws the same prompts)."""
import json
from collections import Counter

import pytest

from rl.config import ConfigError, load_config
from rl.data.config import DataConfig, TaskConfig, TaskFamilyConfig
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
    ({"budget_field": "question"}, "data.families.set.budget_field: every row's budget must be an integer"),
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
