"""The built-in verifiable rewards: answer matching (exact, normalised, math-verify) and the
instruction-following checks."""
import pytest

from rewards.builtin.instructions import check, instruction_following
from rewards.builtin.verifiable import math_verify_reward, normalize_answer, normalized_match_reward
from rl.sample import Sample


def sample(response, reference="", **metadata):
    return Sample(group_id=0, prompt="", prompt_ids=[1], reference=reference, response=response, metadata=metadata)


@pytest.mark.parametrize("response,reference,expected", [
    ("so the answer is $\\boxed{\\frac{1}{2}}$", "0.5", 1.0),
    ("The answer is \\boxed{x(x+2)}", "$x^2+2x$", 1.0),
    ("it must be 42", "42", 1.0),
    ("\\boxed{[1, 3)}", "$[1,3)$", 1.0),
    ("the answer is \\boxed{41}", "42", 0.0),
    ("\\boxed{(1, 3)}", "$[1,3)$", 0.0),
    ("I do not know", "42", 0.0),
])
def test_math_verify_decides_equivalence(response, reference, expected):
    assert math_verify_reward(sample(response, reference)) == expected


def test_normalized_match_ignores_case_punctuation_articles_and_spacing():
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalized_match_reward(sample("the Eiffel Tower.", "Eiffel tower")) == 1.0
    assert normalized_match_reward(sample("Eiffel", "Eiffel tower")) == 0.0


@pytest.mark.parametrize("spec,passing,failing", [
    ({"type": "max_words", "n": 3}, "one two three", "one two three four"),
    ({"type": "min_words", "n": 2}, "two words", "one"),
    ({"type": "max_chars", "n": 5}, "12345", "123456"),
    ({"type": "min_chars", "n": 3}, "abc", "ab"),
    ({"type": "required_words", "words": ["because", "Paris"]}, "Paris, because it is", "because London"),
    ({"type": "forbidden_words", "words": ["sorry"]}, "Sorryful is not a word", "I'm SORRY."),
    ({"type": "json"}, '```json\n{"a": [1, 2]}\n```', '{"a": [1, 2]'),
    ({"type": "regex", "pattern": r"^Answer: \d+$"}, "work\nAnswer: 12", "Answer: twelve"),
    ({"type": "starts_with", "text": "Yes"}, "  Yes, it is.", "No"),
    ({"type": "ends_with", "text": "?"}, "Really? ", "Really."),
])
def test_each_instruction_check_passes_and_fails(spec, passing, failing):
    assert check(passing, spec) is True
    assert check(failing, spec) is False


def test_instruction_following_scores_config_and_prompt_checks():
    s = sample('{"answer": 4}', instructions=[{"type": "max_words", "n": 1}])
    score, parts = instruction_following(s, checks=[{"type": "json"}])
    assert score == 0.5 and parts == {"0:json": 1.0, "1:max_words": 0.0}
    assert instruction_following(s, checks=[{"type": "json"}], strict=True)[0] == 0.0
    with pytest.raises(ValueError, match="unknown instruction check 'rhymes'"):
        instruction_following(sample("x"), checks=[{"type": "rhymes"}])
    with pytest.raises(ValueError, match="no instruction checks"):
        instruction_following(sample("x"))
