"""Objectives, advantages and loss aggregation against values computed by hand from the spec's formulas
(docs/kimi-methods.md §1), gradient checks, and GRPO against TRL's GRPOTrainer loss on the same inputs."""
import math

import pytest
import torch

from rl.algo.advantages import group_advantages, uniform_groups
from rl.algo.objectives import ObjectiveSettings, sample_losses, sample_weights, truncated_importance_weights
from rl.sample import Sample


def _sample(group, reward, length=1):
    return Sample(group_id=group, prompt="", prompt_ids=[0], reference="", reward=reward, response_ids=[1] * length)


def _loss(settings, logprobs, old, adv, mask, groups, rollout=None):
    weights = sample_weights(groups, mask.sum(-1).long().tolist(), settings.aggregation)
    terms = sample_losses(settings, logprobs, old, old if rollout is None else rollout, adv, mask)
    return (weights * terms).sum()


# --- advantages ------------------------------------------------------------------------------------
def test_group_mean_baseline_includes_the_sample_itself():
    samples = [_sample(0, 1.0), _sample(0, 0.0), _sample(0, 0.0), _sample(0, 1.0), _sample(1, 1.0), _sample(1, 0.0)]
    group_advantages(samples)
    assert [s.advantage for s in samples] == [0.5, -0.5, -0.5, 0.5, 0.5, -0.5]


def test_grpo_advantages_divide_by_the_unbiased_group_std():
    samples = [_sample(0, r) for r in (1.0, 0.0, 0.0, 0.0)] + [_sample(1, 1.0), _sample(1, 1.0)]
    group_advantages(samples, normalize_std=True)
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)  # sample std of (1, 0, 0, 0)
    assert [s.advantage for s in samples[:4]] == pytest.approx([0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3)
    assert [s.advantage for s in samples[4:]] == [0.0, 0.0]  # equal rewards: zero, not 0/0
    assert uniform_groups(samples) == {1}


# --- aggregation -----------------------------------------------------------------------------------
def test_sample_weights_for_each_aggregation():
    groups, lengths = [0, 0, 0, 1], [2, 4, 4, 10]
    assert sample_weights(groups, lengths, "group_mean").tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert sample_weights(groups, lengths, "sample_mean").tolist() == pytest.approx([0.25] * 4)
    assert sample_weights(groups, lengths, "token_mean").tolist() == pytest.approx([1 / 20] * 4)
    assert sample_weights(groups, lengths, "sequence_mean_token_mean").tolist() == pytest.approx(
        [1 / 8, 1 / 16, 1 / 16, 1 / 40])


# --- kimi_k2 ---------------------------------------------------------------------------------------
def _batch():
    # Two prompts, K = 2 responses each; per-token logprobs with padding masked out.
    logprobs = torch.tensor([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0], [-0.1, -0.2, -0.3], [-1.5, -0.5, 0.0]],
                            dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.6, -1.0, 0.0], [-1.0, 0.0, 0.0], [-0.1, -0.2, -0.3], [-1.0, -0.5, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    advantages = torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64)
    return logprobs, old, mask, advantages, [0, 0, 1, 1]


def test_kimi_k2_loss_matches_hand_computation():
    logprobs, old, mask, adv, groups = _batch()
    tau = 0.3
    logp, logp_old, a = [-1.5, -2.0, -0.6, -2.0], [-1.6, -1.0, -0.6, -1.5], [0.5, -0.5, -0.5, 0.5]
    term = [a[i] * logp[i] - tau / 2 * (logp[i] - logp_old[i]) ** 2 for i in range(4)]
    expected = -((term[0] + term[1]) / 2 + (term[2] + term[3]) / 2) / 2
    got = _loss(ObjectiveSettings("kimi_k2", tau=tau), logprobs, old, adv, mask, groups)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kimi_k2_gradient_is_k15_equation_3():
    """d loss / d logp_i = -(1/K) (A_i - tau * s_i) / #groups, with s_i = log(pi/pi_old) of the sequence."""
    logprobs, old, mask, adv, groups = _batch()
    tau = 0.3
    _loss(ObjectiveSettings("kimi_k2", tau=tau), logprobs, old, adv, mask, groups).backward()
    s = ((logprobs.detach() - old) * mask).sum(-1)
    assert torch.allclose(logprobs.grad, (-(adv - tau * s) / 2 / 2)[:, None] * mask)


def test_kimi_k2_is_reinforce_on_the_first_minibatch():
    """With pi_theta == pi_old the regulariser vanishes: the loss is -mean_groups(mean_i A_i logp_i)."""
    logprobs, _, mask, adv, groups = _batch()
    loss = _loss(ObjectiveSettings("kimi_k2", tau=5.0), logprobs, logprobs.detach(), adv, mask, groups)
    assert torch.allclose(loss, -(adv * (logprobs * mask).sum(-1)).reshape(2, 2).mean(-1).mean())


# --- kimi_k25 --------------------------------------------------------------------------------------
def _k25_batch():
    # log-ratios 0, ln 3 (ratio 3 > beta: masked), ln 0.4 (ratio 0.4 < alpha: masked), 0.1; padding last.
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -0.3, 0.0]], dtype=torch.float64)
    l = torch.tensor([[0.0, math.log(3.0), math.log(0.4)], [0.1, 0.0, 0.0]], dtype=torch.float64)
    logprobs = (old + l).clone().requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    return logprobs, old, l, mask, torch.tensor([0.5, -0.5], dtype=torch.float64)


@pytest.mark.parametrize("mask_tau", [False, True])
def test_kimi_k25_token_loss_matches_hand_computation(mask_tau):
    logprobs, old, l, mask, adv = _k25_batch()
    tau, alpha, beta = 0.1, 0.5, 2.0
    settings = ObjectiveSettings("kimi_k25", tau=tau, ratio_low=alpha, ratio_high=beta, mask_tau=mask_tau)
    # token terms -(m * rho * A) + tau * l^2 (m = 0 drops the tau term too when mask_tau)
    pen = lambda x, keep: 0.0 if (mask_tau and not keep) else tau * x ** 2  # noqa: E731
    terms = [-(1 * 1.0 * 0.5) + pen(0.0, True), 0.0 + pen(math.log(3), False), 0.0 + pen(math.log(0.4), False),
             -(1 * math.exp(0.1) * -0.5) + pen(0.1, True), -(1 * 1.0 * -0.5) + pen(0.0, True)]
    expected = sum(terms) / 5  # N = 5 generated tokens
    assert _loss(settings, logprobs, old, adv, mask, [0, 0]).item() == pytest.approx(expected, rel=1e-6)


def test_kimi_k25_gradient_is_masked_policy_gradient_plus_the_tau_pull():
    """d/d logp_t = (-(m * rho * A) + 2 tau l) / N: masked tokens get only the tau term, whatever A's sign."""
    logprobs, old, l, mask, adv = _k25_batch()
    tau = 0.1
    _loss(ObjectiveSettings("kimi_k25", tau=tau), logprobs, old, adv, mask, [0, 0]).backward()
    rho = l.exp()
    keep = ((rho >= 0.5) & (rho <= 2.0)).double()
    expected = (-(keep * rho * adv[:, None]) + 2 * tau * l) * mask / 5
    assert torch.allclose(logprobs.grad, expected)
    assert torch.autograd.gradcheck(
        lambda lp: _loss(ObjectiveSettings("kimi_k25", tau=tau), lp, old, adv, mask, [0, 0]), (logprobs,))


def test_kimi_k25_can_take_pi_old_from_the_rollout_engine():
    logprobs, old, _, mask, adv = _k25_batch()
    rollout = old - 0.05
    trainer = _loss(ObjectiveSettings("kimi_k25", old_policy="trainer"), logprobs, old, adv, mask, [0, 0], rollout)
    engine = _loss(ObjectiveSettings("kimi_k25", old_policy="rollout"), logprobs, old, adv, mask, [0, 0], rollout)
    same = _loss(ObjectiveSettings("kimi_k25"), logprobs, rollout, adv, mask, [0, 0])
    assert engine.item() == pytest.approx(same.item()) and engine.item() != pytest.approx(trainer.item())


# --- ppo_clip / grpo / DAPO clip-higher, gspo, TIS -------------------------------------------------------
def test_ppo_clip_token_terms_by_hand_with_clip_higher():
    old = torch.zeros(1, 4, dtype=torch.float64)
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.25]], dtype=torch.float64)
    logprobs = ratios.log().requires_grad_(True)
    mask = torch.ones(1, 4, dtype=torch.float64)
    for low, high, adv, expected in [
        (0.2, 0.2, 1.0, [-1.2, -0.5, -1.1, -1.2]),  # A > 0: the ratio is capped at 1 + eps_high
        (0.2, 0.28, 1.0, [-1.28, -0.5, -1.1, -1.25]),  # DAPO's clip-higher lets 1.25 through
        (0.2, 0.2, -1.0, [1.5, 0.8, 1.1, 1.25]),  # A < 0: floored at 1 - eps_low, never capped
    ]:
        settings = ObjectiveSettings("ppo_clip", clip_low=low, clip_high=high, loss_aggregation="token_mean")
        got = _loss(settings, logprobs, old, torch.tensor([adv], dtype=torch.float64), mask, [0])
        assert got.item() == pytest.approx(sum(expected) / 4)


def test_ppo_clip_gradient_vanishes_on_clipped_tokens():
    old = torch.zeros(1, 3, dtype=torch.float64)
    logprobs = torch.tensor([[1.5, 0.5, 1.1]], dtype=torch.float64).log().requires_grad_(True)
    mask = torch.ones(1, 3, dtype=torch.float64)
    _loss(ObjectiveSettings("ppo_clip"), logprobs, old, torch.tensor([1.0], dtype=torch.float64), mask, [0]).backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -0.5, -1.1]], dtype=torch.float64) / 3)


def test_gspo_clips_the_length_normalised_sequence_ratio():
    old = torch.zeros(2, 2, dtype=torch.float64)
    logprobs = torch.tensor([[0.0002, 0.0004], [0.01, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.float64)
    settings = ObjectiveSettings("gspo", gspo_clip_low=3e-4, gspo_clip_high=4e-4)
    loss = _loss(settings, logprobs, old, torch.tensor([1.0, 1.0], dtype=torch.float64), mask, [0, 0])
    s1 = math.exp(0.0003)  # inside (1 - 3e-4, 1 + 4e-4): kept
    s2 = 1 + 4e-4  # exp(0.01) is capped
    assert loss.item() == pytest.approx(-(s1 + s2) / 2, rel=1e-6)
    loss.backward()
    assert logprobs.grad[1].abs().sum() == 0 and logprobs.grad[0].abs().sum() > 0
    assert torch.autograd.gradcheck(
        lambda lp: _loss(settings, lp, old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask, [0, 0]), (logprobs,))


def test_truncated_importance_sampling_weights_tokens_by_the_capped_ratio():
    old = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)
    rollout = torch.tensor([[-1.0, -1.5, -0.5]], dtype=torch.float64)
    weights = truncated_importance_weights(old, rollout, cap=1.2)
    assert weights[0].tolist() == pytest.approx([1.0, 1.2, math.exp(-0.5)])
    logprobs = old.clone().requires_grad_(True)
    mask = torch.ones(1, 3, dtype=torch.float64)
    settings = ObjectiveSettings("ppo_clip", tis_cap=1.2)
    # at logprobs == old every ratio is 1: the loss is -A * mean(weights)
    loss = _loss(settings, logprobs, old, torch.tensor([2.0], dtype=torch.float64), mask, [0], rollout)
    assert loss.item() == pytest.approx(-2.0 * (1.0 + 1.2 + math.exp(-0.5)) / 3)


# --- GRPO against TRL -------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,aggregation", [("grpo", "sequence_mean_token_mean"), ("bnpo", "token_mean")])
def test_grpo_loss_equals_trl_grpo_trainer(random_model, tmp_path, loss_type, aggregation):
    """TRL's GRPOTrainer._compute_loss on a tiny model vs ours on the logprobs of the same model."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=5, report_to=[], use_cpu=True, bf16=False, loss_type=loss_type,
                          epsilon=0.2, epsilon_high=0.28, beta=0.0, logging_steps=1)
    model = AutoModelForCausalLM.from_pretrained(random_model, dtype=torch.float32)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": ["1+1=", "2+2="]}))
    trainer.model.eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (4, 3), generator=g)
    completion_ids = torch.randint(3, vocab, (4, 5), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    samples = [_sample(0, 1.0), _sample(0, 0.0), _sample(1, 0.0), _sample(1, 1.0)]
    group_advantages(samples, normalize_std=True)
    advantages = torch.tensor([s.advantage for s in samples])

    with torch.no_grad():  # our side: the same model's logprobs of the completion tokens
        logits = model(torch.cat([prompt_ids, completion_ids], 1)).logits[:, 2:-1]
        logprobs = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None])[..., 0]
    old = logprobs + 0.3 * torch.randn(logprobs.shape, generator=g)  # ratios well outside [0.8, 1.28]
    trl_loss = trainer._compute_loss(trainer.model, {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old})
    settings = ObjectiveSettings("grpo", clip_low=0.2, clip_high=0.28, loss_aggregation=aggregation)
    ours = _loss(settings, logprobs, old, advantages, completion_mask.double().float(), [0, 0, 1, 1])
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5)


# --- temperature decay ------------------------------------------------------------------------------
def test_temperature_schedules_by_hand():
    from rl.algo.schedules import temperature_at

    assert temperature_at(5, 1.0, None, "linear", 10) == 1.0  # no end: constant
    assert [temperature_at(s, 1.2, 0.8, "linear", 4) for s in (0, 1, 4, 9)] == pytest.approx([1.2, 1.1, 0.8, 0.8])
    assert temperature_at(2, 1.2, 0.8, "cosine", 4) == pytest.approx(1.0)  # half way: the midpoint
    assert temperature_at(1, 1.2, 0.8, "cosine", 4) == pytest.approx(0.8 + 0.4 * (1 + math.cos(math.pi / 4)) / 2)
    assert temperature_at(2, 1.6, 0.4, "exponential", 4) == pytest.approx(0.8)  # geometric mean half way


# --- budget control and length shaping (rl/algo/budget.py) ----------------------------------------------
def _responses(group, lengths, rewards, prompt="p", finish="stop"):
    return [Sample(group_id=group, prompt=prompt, prompt_ids=[0], reference="", response_ids=[1] * n,
                   task_reward=r, reward=r, finish_reason=finish) for n, r in zip(lengths, rewards)]


def test_k15_length_penalty_worked_example():
    """docs/kimi-methods.md §2.3: lengths 1k/2k/3k/5k give lambda 0.5/0.25/0/-0.5; wrong answers get min(0, lambda)."""
    from rl.algo.budget import apply_length_penalty, length_rewards

    assert length_rewards([1000, 2000, 3000, 5000], [True] * 4) == [0.5, 0.25, 0.0, -0.5]
    assert length_rewards([1000, 2000, 3000, 5000], [False] * 4) == [0.0, 0.0, 0.0, -0.5]
    assert length_rewards([7, 7, 7], [True, False, True]) == [0.0, 0.0, 0.0]  # equal lengths: no length reward
    samples = _responses(0, [1000, 2000, 3000, 5000], [1.0, 0.0, 1.0, 0.0])
    apply_length_penalty(samples, weight=0.2)
    assert [s.reward for s in samples] == pytest.approx([1.1, 0.0, 1.0, -0.1])
    assert [s.task_reward for s in samples] == [1.0, 0.0, 1.0, 0.0]  # the score itself is kept


def test_k2_truncated_responses_get_the_penalty_reward():
    from rl.algo.budget import apply_truncation_reward

    samples = _responses(0, [3, 8], [1.0, 1.0]) + _responses(0, [8], [1.0], finish="length")
    apply_truncation_reward(samples, -1.0)
    assert [s.reward for s in samples] == [1.0, 1.0, -1.0]


def test_toggle_phases_and_budget_by_hand():
    from rl.algo.budget import apply_toggle, estimate_budgets, toggle_budget_limited

    # m = 3: steps 0-2 budget-limited (Phase0), 3-5 standard (Phase1), 6-8 Phase0 again
    assert [toggle_budget_limited(t, 3) for t in range(9)] == [True] * 3 + [False] * 3 + [True] * 3
    # budgets from the initial policy: 50th percentile of each prompt's correct lengths (wrong ones ignored)
    initial = _responses(0, [4, 6, 8, 100], [1.0, 1.0, 1.0, 0.0], "a") + _responses(1, [5, 9], [0.0, 0.0], "b")
    budgets, overall = estimate_budgets(initial, percentile=50)
    assert budgets == {"a": 6} and overall == 6  # "b" has no correct response: no budget of its own

    def group():  # accuracy 3/4 >= lambda = 0.5: over-budget responses lose their reward in Phase0
        return _responses(0, [5, 6, 7, 12], [1.0, 1.0, 0.0, 1.0], "a")
    samples = group()
    assert apply_toggle(samples, 0, 3, 0.5, budgets) == 2
    assert [s.reward for s in samples] == [1.0, 1.0, 0.0, 0.0]
    samples = group()
    assert apply_toggle(samples, 4, 3, 0.5, budgets) == 0 and [s.reward for s in samples] == [1.0, 1.0, 0.0, 1.0]
    samples = group()  # a hard prompt (accuracy 3/4 < lambda = 0.8) keeps its rewards even in Phase0
    assert apply_toggle(samples, 0, 3, 0.8, budgets) == 0
    unknown = _responses(0, [5, 7], [1.0, 1.0], "c")  # no budget of its own: the overall one, else none
    assert apply_toggle(unknown, 0, 3, 0.5, budgets, default_budget=overall) == 1
    assert apply_toggle(_responses(0, [5, 7], [1.0, 1.0], "c"), 0, 3, 0.5, budgets) == 0


# --- what a sample carries into the micro-batch -------------------------------------------------------
def test_micro_batches_carry_token_masks_temperatures_and_ptx_rows():
    """Old segments of a partial rollout left out by `Sample.loss_mask`; each row's temperature and
    PTX flag; the rollout engine's logprobs beside the trainer's."""
    from rl.trainer.micro_batches import split_micro_batches

    partial = Sample(group_id=0, prompt="", prompt_ids=[5, 6], reference="", response_ids=[7, 8, 9],
                     token_versions=[3, 3, 4], loss_mask=[0.0, 0.0, 1.0], temperature=0.7,
                     rollout_logprobs=[-0.1, -0.2, -0.3], old_logprobs=[-0.4, -0.5, -0.6])
    demo = Sample(group_id=-1, prompt="", prompt_ids=[5], reference="", response_ids=[7, 2], ptx=True)
    batch, = split_micro_batches([partial, demo], None, dp_size=1, dp_rank=0, token_budget=100, version=4)
    assert batch.index.tolist() == [1, 0]  # rows by length (less padding), each with its minibatch index
    # next-token alignment: response token j of a prompt of length P sits at column P - 1 + j
    assert batch.loss_mask.tolist() == [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    assert batch.rollout_logprobs[1, 1:].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert batch.old_logprobs[1, 1:].tolist() == pytest.approx([-0.4, -0.5, -0.6])
    assert batch.temperature.tolist() == pytest.approx([1.0, 0.7]) and batch.ptx.tolist() == [1.0, 0.0]
    assert batch.old_given.tolist() == [1.0, 1.0]  # both bring pi_old: the demo needs none
    assert batch.fresh.tolist() == [[0.0] * 4, [0.0, 0.0, 0.0, 1.0]]  # trained tokens version 4 sampled
    assert batch.first == 0  # the demo's prompt has one token: its logits are needed from position 0
