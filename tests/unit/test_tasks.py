"""The demo task and its verifiable reward; the warm-started demo model starts weak but not at zero."""
import json
import os

from rewards.builtin.verifiable import exact_match
from rl.data.tasks import AdditionTask


def test_addition_stream_is_deterministic_and_checkable():
    task = AdditionTask(digits=2, seed=5, reverse_answer=False)
    assert task.batch(10, 4) == AdditionTask(2, 5, False).batch(10, 4)
    for p in task.batch(0, 50):
        a, b = p.prompt.rstrip("=").split("+")
        assert int(p.reference) == int(a) + int(b)
        assert exact_match(p.reference, p.reference) == 1.0
        assert exact_match(p.reference + "1", p.reference) == 0.0


def test_reversed_answers_are_written_least_significant_digit_first():
    plain, rev = AdditionTask(3, 9, False).problem(7), AdditionTask(3, 9, True).problem(7)
    assert plain.prompt == rev.prompt and rev.reference == plain.reference[::-1]


def test_demo_model_is_built_locally_and_starts_weak(demo_model):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(demo_model))
    report = json.load(open(os.path.join(demo_model, "warm_start.json")))
    assert report["greedy_accuracy"] >= 0.9  # the policy ranks the right answer first ...
    assert 0.0 < report["sampled_accuracy"] <= 0.4  # ... but samples it rarely: room for RL
