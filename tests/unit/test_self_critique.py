"""The self-critique rubric reward's logic with fixed judge outputs: verdict parsing, both orders of
every pair, win rates with ties as half, unparseable and failed judgments left out."""
import asyncio

import pytest

from rewards.builtin.self_critique import (
    CORE_RUBRICS,
    judge_group,
    judge_prompt,
    ordered_pairs,
    parse_verdict,
    rubric_bundle,
    win_rates,
)
from rl.sample import Sample


@pytest.mark.parametrize("text,verdict", [
    ("A is clearer. [[A]]", "A"), ("[[ b ]]", "B"), ("Equal.\n[[TIE]]", "tie"),
    ("First I thought [[A]] but on reflection [[B]]", "B"), ("A is better", None), ("", None), ("[[C]]", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_every_pair_is_judged_in_both_orders():
    assert ordered_pairs(3) == [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]
    sampled = ordered_pairs(8, max_pairs=5, seed=1)
    assert len(sampled) == 10 and {(j, i) for i, j in sampled} == set(sampled)


def test_win_rates_count_ties_as_half_and_leave_out_unparseable():
    judgments = [(0, 1, "A"), (1, 0, "B"),   # 0 beats 1 in both orders
                 (0, 2, "tie"), (2, 0, None),  # a tie, and one unparseable
                 (1, 2, "B"), (2, 1, "A")]     # 2 beats 1 in both orders
    rates, counts, unparseable = win_rates(3, judgments)
    assert rates == [pytest.approx(2.5 / 3), 0.0, pytest.approx(2.5 / 3)]
    assert counts == [3, 4, 3] and unparseable == 1
    assert win_rates(2, [(0, 1, None)])[0] == [None, None]


def test_judge_group_asks_both_orders_with_the_rubric_bundle():
    samples = [Sample(group_id=0, prompt="Say hi", prompt_ids=[1], reference="", response=r,
                      metadata={"rubrics": ["Greets the user."]}) for r in ("hi", "hello there", "no")]
    asked = []

    async def judge(text):  # prefers the longer response; fails on one request
        asked.append(text)
        first = text.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
        second = text.split("[Response B]\n")[1].split("\n\n")[0]
        if {first, second} == {"hi", "no"} and first == "no":
            raise TimeoutError("judge too slow")
        return "[[A]]" if len(first) > len(second) else "[[B]]" if len(second) > len(first) else "[[TIE]]"

    scores = asyncio.run(judge_group(judge, samples))
    assert len(asked) == 6 and all("Greets the user." in t and CORE_RUBRICS[0] in t for t in asked)
    # 1 wins all four; 0 and 2 tie once (0.5 of 3 parsed comparisons each); "no" vs "hi" failed
    assert [s for s, _ in scores] == [pytest.approx(1 / 6), 1.0, pytest.approx(1 / 6)]
    assert scores[0][1] == {"comparisons": 3.0, "unparseable": 1.0, "failed_requests": 1.0}
    assert len(rubric_bundle()) == 5 and "[Request]\nq" in judge_prompt("q", "a", "b", ["r"])


def test_critic_pairs_come_from_verified_groups_and_agreement_is_measured(tmp_path):
    from rewards.builtin.critic_data import append_jsonl, judge_pairs, verified_pairs

    def sample(group, response, reward):
        s = Sample(group_id=group, prompt=f"p{group}", prompt_ids=[1], reference="", response=response)
        s.task_reward = reward
        return s

    samples = [sample(0, "right", 1.0), sample(0, "wrong", 0.0), sample(0, "wrong too", 0.0),
               sample(1, "all right", 1.0), sample(1, "also right", 1.0)]  # group 1 has no wrong answer
    pairs = verified_pairs(samples, correct_threshold=1.0, max_pairs=10, step=7)
    assert sorted((p.chosen, p.rejected) for p in pairs) == [("right", "wrong"), ("right", "wrong too")]

    async def judge(text):  # always prefers the response shown first: agrees in one order of each pair
        return "[[A]]"

    metrics = asyncio.run(judge_pairs(judge, pairs))
    assert metrics == {"critic_agreement": 0.5, "critic_pairs": 2.0, "critic_unparseable": 0.0}
    path = tmp_path / "critic.jsonl"
    append_jsonl(pairs, str(path))
    import datasets

    rows = datasets.load_dataset("json", data_files=str(path), split="train")
    assert rows.num_rows == 2 and rows[0]["verdicts"] == ["A", "A"] and rows[0]["step"] == 7
