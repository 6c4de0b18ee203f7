"""The training engine's optimizer step moves the policy the way the Kimi loss says, and its lr schedule."""
import math

import pytest
import torch
import torch.multiprocessing as mp

from rl.algo.advantages import group_advantages
from rl.algo.objectives import ObjectiveSettings
from rl.sample import Sample
from rl.trainer.setup import lr_factor


def _sgd_step(model_path, port, rewards, out_path):
    from transformers import AutoTokenizer

    from tests.helpers import make_engine

    engine = make_engine(model_path, master_port=port, device="cpu")
    engine.optimizer = torch.optim.SGD(engine.model.parameters(), lr=0.05)  # a step along the gradient itself
    tok = AutoTokenizer.from_pretrained(model_path)
    responses = ["64", "99", "1", "46"]
    samples = [Sample(group_id=0, prompt="12+34=", prompt_ids=tok.encode("12+34="), reference="64",
                      response_ids=tok.encode(r) + [tok.eos_token_id], reward=w) for r, w in zip(responses, rewards)]
    group_advantages(samples)
    before = engine.compute_logprobs(samples)
    for s, lp in zip(samples, before):
        s.old_logprobs = lp
    metrics = engine.train_step(samples, ObjectiveSettings(tau=0.0))
    after = engine.compute_logprobs(samples)
    torch.save({"before": before, "after": after, "metrics": metrics}, out_path)
    engine.shutdown()


def _reset_between_adam_steps(model_path, port, rewards, out_path):
    from transformers import AutoTokenizer

    from tests.helpers import make_engine

    engine = make_engine(model_path, master_port=port, device="cpu", lr=1e-3, lr_warmup_steps=4)
    tok = AutoTokenizer.from_pretrained(model_path)
    samples = [Sample(group_id=0, prompt="1+1=", prompt_ids=tok.encode("1+1="), reference="2",
                      response_ids=tok.encode(r) + [tok.eos_token_id], reward=w) for r, w in zip(["2", "3"], rewards)]
    group_advantages(samples)
    lrs = [engine.train_step(samples, ObjectiveSettings(tau=0.0))["lr"]]
    had_state = len(engine.optimizer.state) > 0
    engine.reset_optimizer_state()
    cleared = len(engine.optimizer.state) == 0
    lrs.append(engine.train_step(samples, ObjectiveSettings(tau=0.0))["lr"])
    torch.save({"lrs": lrs, "had_state": had_state, "cleared": cleared}, out_path)
    engine.shutdown()


def _ptx_terms(model_path, port, rewards, out_path):
    """The PTX loss and gradients: demonstrations alone, rollouts alone, and both in one minibatch."""
    from transformers import AutoTokenizer

    from tests.helpers import make_engine

    engine = make_engine(model_path, master_port=port, device="cpu")
    tok = AutoTokenizer.from_pretrained(model_path)
    rollouts = [Sample(group_id=0, prompt="3+4=", prompt_ids=tok.encode("3+4="), reference="7",
                       response_ids=tok.encode(r) + [tok.eos_token_id], reward=w) for r, w in zip(["7", "12"], rewards)]
    group_advantages(rollouts)
    demos = [Sample(group_id=-1 - i, prompt=p, prompt_ids=tok.encode(p), reference=a, ptx=True,
                    response_ids=tok.encode(a) + [tok.eos_token_id]) for i, (p, a) in enumerate([("12+34=", "64"),
                                                                                               ("5+5=", "01")])]
    objective = ObjectiveSettings(tau=0.0)
    out = {}
    for name, batch, coef in [("ptx", demos, 1.0), ("rl", rollouts, 0.0), ("both", rollouts + demos, 0.5)]:
        out[name] = engine.compute_gradients(batch, objective, ptx_coef=coef)
        out[name + "_grads"] = engine.hf_grad_dict()
    torch.save(out, out_path)
    engine.shutdown()


def _pi_old_from_the_forward(model_path, port, rewards, out_path):
    """pi_old given by a separate no-grad pass vs taken from the training forward itself: losses,
    gradients and the mismatch metric; and one train_step of two minibatches (the second needs the
    separate pass) with pi_old given vs computed by the step."""
    import dataclasses

    from transformers import AutoTokenizer

    from tests.helpers import make_engine

    engine = make_engine(model_path, master_port=port, device="cpu")
    engine.optimizer = torch.optim.SGD(engine.model.parameters(), lr=0.05)
    tok = AutoTokenizer.from_pretrained(model_path)
    groups = [("12+34=", ["64", "99", "1"]), ("5+5=", ["10", "01", "55"])]
    samples = [Sample(group_id=g, prompt=p, prompt_ids=tok.encode(p), reference=r[0], reward=float(i == 0),
                      response_ids=tok.encode(x) + [tok.eos_token_id], temperature=0.8)
               for g, (p, r) in enumerate(groups) for i, x in enumerate(r)]
    group_advantages(samples)
    exact = engine.compute_logprobs(samples)
    noise = torch.Generator().manual_seed(0)
    for s, lp in zip(samples, exact):  # a rollout engine's logprobs: near the trainer's, not equal
        s.rollout_logprobs = [x + 0.01 * torch.randn((), generator=noise).item() for x in lp]
        s.token_versions = [3] * len(lp)
    given = [dataclasses.replace(s, old_logprobs=lp) for s, lp in zip(samples, exact)]
    out = {"deltas": [b - a for s, lp in zip(samples, exact) for a, b in zip(s.rollout_logprobs, lp)]}
    for name, objective in [("kimi_k2", ObjectiveSettings(tau=0.5)),
                            ("ppo_clip", ObjectiveSettings(objective="ppo_clip", tis_cap=2.0))]:
        for source, batch in [("given", given), ("forward", samples)]:
            out[f"{name}/{source}"] = engine.compute_gradients(batch, objective, version=3)
            out[f"{name}/{source}/grads"] = engine.hf_grad_dict()
    start = engine.hf_state_dict()
    for source, batch in [("given", given), ("forward", samples)]:
        engine.load_hf_weights(start)
        out[f"two/{source}"] = engine.train_step(batch, ObjectiveSettings(tau=0.5), num_minibatches=2, version=3)
        out[f"two/{source}/weights"] = engine.hf_state_dict()
    torch.save(out, out_path)
    engine.shutdown()


def _run(model_path, port, rewards, tmp_path, target=_sgd_step):
    out = tmp_path / "result.pt"
    proc = mp.get_context("spawn").Process(target=target, args=(model_path, port, rewards, str(out)))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0
    return torch.load(out)


@pytest.mark.multiproc
def test_step_raises_the_rewarded_response_and_lowers_the_others(random_model, free_port, tmp_path):
    result = _run(random_model, free_port, [1.0, 0.0, 0.0, 0.0], tmp_path)
    change = [sum(a) - sum(b) for a, b in zip(result["after"], result["before"])]
    advantages = [0.75, -0.25, -0.25, -0.25]
    # A small step along the gradient raises the objective sum_i A_i * logp_i (first order) ...
    assert sum(a * c for a, c in zip(advantages, change)) > 0, change
    # ... here by raising the rewarded response and lowering the others in total. (One of them, "46",
    # shares every token with "64" and may rise a little with it.)
    assert change[0] > 0 and sum(change[1:]) < 0, change
    assert math.isfinite(result["metrics"]["loss"]) and result["metrics"]["grad_norm"] > 0


@pytest.mark.multiproc
def test_equal_rewards_give_no_gradient(random_model, free_port, tmp_path):
    result = _run(random_model, free_port, [1.0, 1.0, 1.0, 1.0], tmp_path)
    assert result["metrics"]["grad_norm"] == 0.0
    assert result["after"] == result["before"]


@pytest.mark.multiproc
def test_optimizer_reset_clears_adam_state_but_keeps_the_lr_schedule(random_model, free_port, tmp_path):
    result = _run(random_model, free_port, [1.0, 0.0], tmp_path, target=_reset_between_adam_steps)
    assert result["had_state"] and result["cleared"]
    assert result["lrs"] == pytest.approx([1e-3 * 1 / 4, 1e-3 * 2 / 4])  # warm-up continued, not restarted


@pytest.mark.multiproc
def test_ptx_loss_is_the_hf_token_mean_nll_and_adds_coef_times_its_gradient(random_model, free_port, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = _run(random_model, free_port, [1.0, 0.0], tmp_path, target=_ptx_terms)
    tok = AutoTokenizer.from_pretrained(random_model)
    hf = AutoModelForCausalLM.from_pretrained(random_model, dtype=torch.float32)
    nll, tokens = 0.0, 0
    for prompt, answer in [("12+34=", "64"), ("5+5=", "01")]:  # HF's NLL of the answer tokens and EOS
        ids, target = tok.encode(prompt), tok.encode(answer) + [tok.eos_token_id]
        with torch.no_grad():
            logits = hf(torch.tensor([ids + target])).logits[0, len(ids) - 1:-1]
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum").item()
        tokens += len(target)
    assert result["ptx"]["ptx_loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["ptx"]["loss"] == 0.0 and result["both"]["ptx_loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["both"]["loss"] == pytest.approx(result["rl"]["loss"], rel=1e-5)
    for name, both in result["both_grads"].items():  # grad(L_RL + 0.5 L_PTX) = grad L_RL + 0.5 grad L_PTX
        expected = result["rl_grads"][name] + 0.5 * result["ptx_grads"][name]
        assert torch.allclose(both, expected, atol=1e-6, rtol=1e-4), name
    assert any(g.abs().sum() > 0 for g in result["ptx_grads"].values())


@pytest.mark.multiproc
def test_pi_old_from_the_training_forward_leaves_loss_and_gradients_unchanged(random_model, free_port, tmp_path):
    result = _run(random_model, free_port, [], tmp_path, target=_pi_old_from_the_forward)
    deltas = torch.tensor(result["deltas"], dtype=torch.float64)  # pi_old - rollout per version-3 token, as made
    ratio = deltas.exp()
    want = {"abs_max": deltas.abs().max(), "abs_sum": deltas.abs().sum(), "k3_sum": (ratio - 1 - deltas).sum(),
            "tokens": len(deltas)}
    for name in ("kimi_k2", "ppo_clip"):
        given, forward = result[f"{name}/given"], result[f"{name}/forward"]
        assert forward["loss"] == pytest.approx(given["loss"], rel=1e-6, abs=1e-9), name
        for key, value in want.items():  # the mismatch measures, whichever way pi_old came
            assert forward["sums"][key] == pytest.approx(given["sums"][key], rel=1e-5, abs=1e-9), (name, key)
            assert given["sums"][key] == pytest.approx(float(value), rel=1e-3, abs=1e-9), (name, key)
        grads_given, grads_forward = result[f"{name}/given/grads"], result[f"{name}/forward/grads"]
        assert any(g.abs().sum() > 0 for g in grads_given.values())
        for key, g in grads_given.items():
            scale = g.abs().max().item()
            assert (grads_forward[key] - g).abs().max().item() <= 1e-6 * max(scale, 1e-6), (name, key)
    for key, w in result["two/given/weights"].items():  # the second minibatch's pi_old from the step's own pass
        assert torch.allclose(result["two/forward/weights"][key], w, rtol=1e-6, atol=1e-7), key
    assert result["two/forward"]["logprob_mismatch_max"] == pytest.approx(
        result["two/given"]["logprob_mismatch_max"], rel=1e-5)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    shape = dict(warmup=4, decay="cosine", total=14, min_ratio=0.1)
    factors = [lr_factor(step, **shape) for step in range(14)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert math.isclose(factors[-1], 0.1)
    assert lr_factor(100, warmup=0, decay="constant", total=0, min_ratio=0.1) == 1.0
