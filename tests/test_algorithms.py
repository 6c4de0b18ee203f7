"""The Kimi K2 objective and the group-mean baseline against values computed by hand from the spec."""
import math

import torch

from rl.algorithms import group_mean_advantages, kimi_k2_loss
from rl.sample import Sample


def _sample(group, reward):
    return Sample(group_id=group, prompt="", prompt_ids=[0], reference="", reward=reward)


def test_group_mean_baseline_includes_the_sample_itself():
    samples = [_sample(0, 1.0), _sample(0, 0.0), _sample(0, 0.0), _sample(0, 1.0), _sample(1, 1.0), _sample(1, 0.0)]
    group_mean_advantages(samples)
    assert [s.advantage for s in samples] == [0.5, -0.5, -0.5, 0.5, 0.5, -0.5]


def _batch():
    # Two prompts, K = 2 responses each; per-token logprobs with padding masked out.
    logprobs = torch.tensor([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0], [-0.1, -0.2, -0.3], [-1.5, -0.5, 0.0]],
                            requires_grad=True)
    old = torch.tensor([[-0.6, -1.0, 0.0], [-1.0, 0.0, 0.0], [-0.1, -0.2, -0.3], [-1.0, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    rewards = [1.0, 0.0, 0.0, 1.0]
    advantages = torch.tensor([0.5, -0.5, -0.5, 0.5])
    groups = torch.tensor([0, 0, 1, 1])
    return logprobs, old, mask, rewards, advantages, groups


def test_kimi_k2_loss_matches_hand_computation():
    logprobs, old, mask, _, adv, groups = _batch()
    tau = 0.3
    # By hand: sequence sums over unmasked tokens.
    logp = [-1.5, -2.0, -0.6, -2.0]
    logp_old = [-1.6, -1.0, -0.6, -1.5]
    a = [0.5, -0.5, -0.5, 0.5]
    term = [a[i] * logp[i] - tau / 2 * (logp[i] - logp_old[i]) ** 2 for i in range(4)]
    expected = -((term[0] + term[1]) / 2 + (term[2] + term[3]) / 2) / 2
    got = kimi_k2_loss(logprobs, old, adv, mask, groups, tau)
    assert math.isclose(got.item(), expected, rel_tol=1e-6), (got.item(), expected)


def test_kimi_k2_gradient_is_k15_equation_3():
    """d loss / d logp_i = -(1/K) (A_i - tau * s_i) / #groups, with s_i = log(pi/pi_old) of the sequence."""
    logprobs, old, mask, _, adv, groups = _batch()
    tau = 0.3
    kimi_k2_loss(logprobs, old, adv, mask, groups, tau).backward()
    s = ((logprobs.detach() - old) * mask).sum(-1)
    expected_per_token = (-(adv - tau * s) / 2 / 2)[:, None] * mask
    assert torch.allclose(logprobs.grad, expected_per_token, atol=1e-7)


def test_kimi_k2_is_reinforce_on_the_first_minibatch():
    """With pi_theta == pi_old the regulariser vanishes: the loss is -mean_groups(mean_i A_i logp_i)."""
    logprobs, _, mask, _, adv, groups = _batch()
    loss = kimi_k2_loss(logprobs, logprobs.detach(), adv, mask, groups, tau=5.0)
    seq = (logprobs * mask).sum(-1)
    assert torch.allclose(loss, -(adv * seq).reshape(2, 2).mean(-1).mean())
