"""The mismatch corrections and measures (rl/algo/mismatch.py) on hand-made ratios, and their settings."""
import math

import numpy as np
import pytest
import torch

from rl.algo.mismatch import correction_keep, mismatch_metrics, mismatch_sums
from rl.algo.objectives import ObjectiveSettings, sample_losses
from rl.config import ConfigError, load_config, validate
from rollout.sglang.routing import merge_segment_routing

# pi_old / pi_rollout per token: row 0 has one token far off (ratio 8), row 1 is close everywhere but
# leans low as a whole (geometric mean 0.6), row 2 is exact.
RATIOS = torch.tensor([[1.0, 8.0, 1.1, 0.9], [0.6, 0.6, 0.6, 0.6], [1.0, 1.0, 1.0, 1.0]])
ROLLOUT = torch.full((3, 4), -1.0)
OLD = ROLLOUT + RATIOS.log()
MASK = torch.ones(3, 4)


def test_no_correction_keeps_everything():
    assert correction_keep(OLD, ROLLOUT, MASK, ObjectiveSettings()) is None


def test_token_masking_drops_the_tokens_outside_the_band():
    keep = correction_keep(OLD, ROLLOUT, MASK, ObjectiveSettings(token_mask_low=0.5, token_mask_high=5.0))
    assert keep.tolist() == [[1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_sequence_rejection_drops_whole_samples_by_their_geometric_mean_ratio():
    keep = correction_keep(OLD, ROLLOUT, MASK, ObjectiveSettings(sequence_reject_low=0.8, sequence_reject_high=1.25))
    # row 0's geometric mean is (1 * 8 * 1.1 * 0.9) ** (1/4) = 1.679: rejected like row 1 (0.6)
    assert keep.tolist() == [[0] * 4, [0] * 4, [1] * 4]
    only_first_two = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])  # the mean is over loss tokens
    keep = correction_keep(OLD, ROLLOUT, only_first_two, ObjectiveSettings(sequence_reject_low=0.8,
                                                                           sequence_reject_high=1.25))
    assert keep[0].tolist() == [1] * 4


def test_a_dropped_token_leaves_the_loss():
    logprobs = OLD.clone().requires_grad_()
    settings = ObjectiveSettings(objective="ppo_clip", token_mask_low=0.5, token_mask_high=5.0)
    loss = sample_losses(settings, logprobs, OLD, ROLLOUT, torch.ones(3), MASK).sum()
    loss.backward()
    assert logprobs.grad[0, 1] == 0 and (logprobs.grad[0, [0, 2, 3]] != 0).all()


def test_measures_match_their_definitions():
    sums = mismatch_sums(OLD, ROLLOUT, MASK, None, tis_cap=2.0)
    r = RATIOS.flatten().double()
    metrics = mismatch_metrics({k: v.item() for k, v in sums.items()})
    assert metrics["logprob_mismatch_max"] == pytest.approx(math.log(8.0), rel=1e-6)
    assert metrics["logprob_mismatch_mean"] == pytest.approx(r.log().abs().mean().item(), rel=1e-6)
    assert metrics["mismatch_k3_kl"] == pytest.approx((r - 1 - r.log()).mean().item(), rel=1e-5)
    assert metrics["tis_weight_mean"] == pytest.approx(r.clamp(max=2.0).mean().item(), rel=1e-6)
    assert metrics["tis_truncated_share"] == pytest.approx(1 / 12)
    assert metrics["mismatch_masked_share"] == 0 and "routing_diff_share" not in metrics
    keep = correction_keep(OLD, ROLLOUT, MASK, ObjectiveSettings(sequence_reject_low=0.8, sequence_reject_high=1.25))
    sums = mismatch_sums(OLD, ROLLOUT, MASK, keep, tis_cap=None)
    assert sums["masked"] == 8 and sums["dropped_samples"] == 2 and sums["samples"] == 3


@pytest.mark.parametrize("overrides, field", [
    ({"algorithm.token_mask_low": 0.5}, "algorithm.token_mask_low"),
    ({"algorithm.sequence_reject_low": 1.1, "algorithm.sequence_reject_high": 2.0}, "algorithm.sequence_reject_low"),
    ({"algorithm.routing_replay": "rollout"}, "algorithm.routing_replay"),
    ({"algorithm.routing_replay": "sometimes"}, "algorithm.routing_replay"),
    ({"rollout.dtype": "int8"}, "rollout.dtype"),
    ({"rollout.return_routing": True}, "rollout.return_routing"),  # the dense demo model
    ({"algorithm.routing_replay": "trainer"}, "algorithm.routing_replay"),
])
def test_bad_settings_name_their_field(overrides, field):
    config = load_config({})
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        validate(config)


def test_partial_rollout_keeps_each_positions_first_routing():
    first = np.zeros((5, 2, 2), dtype=np.int16)
    latest = np.ones((9, 2, 2), dtype=np.int16)
    merged = merge_segment_routing(first, latest)
    assert merged.shape == (9, 2, 2) and (merged[:5] == 0).all() and (merged[5:] == 1).all()
    assert merge_segment_routing(None, latest) is latest
