"""MuonClip (rl.trainer.optim.muon): Newton-Schulz, the Muon/AdamW step, TP=2 == TP=1 == HF-space reference,
the recorded attention logits and QK-Clip on the Megatron engine (gloo, spawned processes)."""
import copy
import math

import pytest
import torch
import torch.multiprocessing as mp

from rl.algo.objectives import ObjectiveSettings
from rl.trainer.optim.muon import MatrixLayout, Muon, muon_scale, newton_schulz
from tests.helpers import pick_port

LR, WD = 0.05, 0.1
SEQ = 16  # divisible by TP (sequence parallelism)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matrices: extra intra-op threads only contend with the other processes on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spectrum(shape, low, seed):
    """A random matrix whose singular values are log-spaced in [low, 1]."""
    g = torch.Generator().manual_seed(seed)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g))
    return u @ torch.diag(torch.logspace(math.log10(low), 0, k)) @ v.T


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (64, 64), (16, 256), (256, 64)])
def test_newton_schulz_is_nearly_orthogonal(shape):
    # Measured: the quintic (3.4445, -4.7750, 2.0315) x 5 steps maps singular values down to ~1e-2 of
    # the largest into [0.68, 1.21]: it trades exact convergence for speed. (Much smaller ones, e.g.
    # 1e-3, or those of a square Gaussian matrix, are not lifted that far in 5 steps.)
    matrices = [_spectrum(shape, 1e-2, 2)]
    if shape[0] != shape[1]:  # rectangular Gaussians are well conditioned
        matrices.append(torch.randn(*shape, generator=torch.Generator().manual_seed(1)))
    for matrix in matrices:
        s = torch.linalg.svdvals(newton_schulz(matrix))
        assert s.min() > 0.65 and s.max() < 1.22, (shape, s.min().item(), s.max().item())
    # The update direction agrees with the exact polar factor U V^T (cosine similarity).
    u, _, vt = torch.linalg.svd(matrix, full_matrices=False)
    exact = u @ vt
    cos = (newton_schulz(matrix) * exact).sum() / (newton_schulz(matrix).norm() * exact.norm())
    assert cos > 0.97


@pytest.mark.parametrize("shape", [(32, 96), (128, 48), (64, 64)])
def test_update_rms_is_adamw_like(shape):
    """0.2 * sqrt(max(n, m)) scales an orthogonal matrix (RMS 1/sqrt(max)) to RMS 0.2. NS's singular
    values sit in [0.68, 1.2], so the Muon update's RMS is a little lower (measured 0.16-0.18)."""
    p = torch.nn.Parameter(torch.zeros(shape))
    p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    Muon([p], lr=1.0, weight_decay=0.0).step()
    rms = p.detach().pow(2).mean().sqrt().item()
    assert 0.15 < rms < 0.2, rms
    u, _, vt = torch.linalg.svd(p.grad, full_matrices=False)
    assert math.isclose((muon_scale(*shape) * u @ vt).pow(2).mean().sqrt().item(), 0.2, rel_tol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_muon_step_formula(nesterov):
    torch.manual_seed(0)
    w0 = torch.randn(24, 40)
    grads = [torch.randn(24, 40) for _ in range(3)]
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.1, weight_decay=0.5, momentum=0.9, nesterov=nesterov)
    w, m = w0.clone(), torch.zeros_like(w0)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        m = 0.9 * m + g
        o = newton_schulz(g + 0.9 * m if nesterov else m) * 0.2 * math.sqrt(40)
        w = w - 0.1 * (o + 0.5 * w)
    assert torch.allclose(p.detach(), w, atol=1e-5)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(7, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ours = Muon([dict(params=[a], use_muon=False)], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([b], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), foreach=False)
    for _ in range(4):
        g = torch.randn(7, 3)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_split_blocks_are_orthogonalised_separately():
    """A fused [q | k | v] per group matrix updates like its separate q, k and v matrices."""
    torch.manual_seed(0)
    groups, q, d, cols = 2, 8, 4, 20
    g = torch.randn(groups * (q + 2 * d), cols)
    p = torch.nn.Parameter(torch.zeros_like(g))
    p.grad = g.clone()
    Muon([p], lr=1.0, layouts={p: MatrixLayout(split_rows=(q, d, d))}).step()
    units, got = g.view(groups, q + 2 * d, cols), (-p.detach()).view(groups, q + 2 * d, cols)
    for start, rows in ((0, q), (q, d), (q + d, d)):
        block = units[:, start:start + rows].reshape(-1, cols)
        expected = newton_schulz(block) * muon_scale(*block.shape)
        assert torch.allclose(got[:, start:start + rows].reshape(-1, cols), expected, atol=1e-6)
    assert not torch.allclose(-p.detach(), newton_schulz(g) * muon_scale(*g.shape), atol=1e-3)


def test_lambda_lr_state_dict_and_reset():
    torch.manual_seed(0)
    w, bias = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))
    opt = Muon([dict(params=[w]), dict(params=[bias], use_muon=False)], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for _ in range(2):
        w.grad, bias.grad = torch.randn(6, 5), torch.randn(5)
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.025, 0.025]
    clone_w, clone_b = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(bias.detach().clone())
    clone = Muon([dict(params=[clone_w]), dict(params=[clone_b], use_muon=False)], lr=0.1)
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved and loaded
    g_w, g_b = torch.randn(6, 5), torch.randn(5)
    for o, (pw, pb) in ((opt, (w, bias)), (clone, (clone_w, clone_b))):
        pw.grad, pb.grad = g_w.clone(), g_b.clone()
        o.step()
    assert torch.equal(w, clone_w) and torch.equal(bias, clone_b)
    opt.state.clear()
    opt.zero_grad(set_to_none=True)
    assert len(opt.state) == 0 and w.grad is None


# --- Megatron engine: TP=1 and TP=2 over gloo -----------------------------------------------------

def _gathered_records(model, tp):
    """Per layer, the full [heads] recorded max logits (TP ranks hold consecutive heads)."""
    import torch.distributed as dist

    out = []
    for layer in model.decoder.layers:
        local = layer.self_attention.core_attention.current_max_attn_logits.clone()
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local)
        out.append(torch.cat(parts))
    return out


def _copy(state):
    """A copy (at TP=1 the gathered tensors may alias the live parameters and grads)."""
    return None if state is None else {k: v.clone() for k, v in state.items()}


def _worker(rank, tp, model_path, port, inputs, out_path):
    from rl.sample import Sample
    from rl.trainer.optim.muon import build_optimizer
    from rl.trainer.optim.qk_clip import apply_qk_clip, reset_max_attn_logits
    from tests.helpers import make_engine

    torch.set_num_threads(1)  # three processes share two cores
    engine = make_engine(model_path, rank=rank, world_size=tp, master_port=port, tensor_parallel_size=tp,
                            device="cpu")
    model, config, result = engine.model, engine.model.config, {}
    config.qk_clip, config.qk_clip_threshold = True, 1e9

    # 1. Recorded max logits: one batch, then the running max over a second one.
    with torch.no_grad():
        engine.logits(inputs["a"])
        result["records_a"] = _gathered_records(model, tp)
        engine.logits(inputs["b"])
        result["records_ab"] = _gathered_records(model, tp)
    reset_max_attn_logits([model])

    # 2. One Muon step on the engine's gradients (main_grad copied into grad, as the engine does).
    optimizer = build_optimizer([model], "muon", lr=LR, weight_decay=WD, adam_betas=(0.9, 0.95))
    use_muon = {id(p): g["use_muon"] for g in optimizer.param_groups for p in g["params"]}
    result["muon_names"] = sorted(n for n, p in model.named_parameters() if use_muon[id(p)])
    result["adamw_names"] = sorted(n for n, p in model.named_parameters() if not use_muon[id(p)])
    samples = [Sample(group_id=i // 2, prompt="", prompt_ids=ids[:6].tolist(), reference="",
                      response_ids=ids[6:].tolist(), advantage=adv)
               for i, (ids, adv) in enumerate(zip(inputs["train"], [1.0, -1.0, 0.5, -0.5]))]
    result["before"] = _copy(engine.hf_state_dict())
    engine.compute_gradients(samples, ObjectiveSettings(tau=0.0))
    result["grads"] = _copy(engine.hf_grad_dict())
    for p in model.parameters():
        p.grad = p.main_grad
    optimizer.step()
    result["after"] = engine.hf_state_dict()
    reset_max_attn_logits([model])

    # 3. QK-Clip: blow up head 0 of layer 0 (its q rows and its group's k rows, weight and bias).
    attention = model.decoder.layers[0].self_attention
    d, heads = attention.hidden_size_per_attention_head, attention.num_attention_heads_per_partition
    groups = attention.num_query_groups_per_partition
    q_rows = heads // groups * d
    with torch.no_grad():
        if rank == 0:
            for t in (attention.linear_qkv.weight, attention.linear_qkv.bias):
                view = t.view(groups, q_rows + 2 * d, -1)
                view[0, :d] *= 4.0
                view[0, q_rows:q_rows + d] *= 4.0
        engine.logits(inputs["a"])
        pre = _gathered_records(model, tp)
        tau = pre[0][0].item() / 2
        config.qk_clip_threshold = tau
        snapshot = [{k: v.clone() for k, v in layer.self_attention.linear_qkv.named_parameters()}
                    for layer in model.decoder.layers]
        if tp == 1:  # Megatron's own SelfAttention.clip_qk (weights only) must agree with ours at TP=1
            record = attention.core_attention.current_max_attn_logits.clone()
            attention.clip_qk()
            result["megatron_clipped_weight"] = attention.linear_qkv.weight.detach().clone()
            attention.linear_qkv.weight.copy_(snapshot[0]["weight"])
            attention.core_attention.current_max_attn_logits = record
        result["returned_max"] = apply_qk_clip([model])
        result["cleared"] = all(layer.self_attention.core_attention.current_max_attn_logits is None
                                for layer in model.decoder.layers)
        result["qkv_before"] = snapshot
        result["qkv_after"] = [{k: v.detach().clone() for k, v in layer.self_attention.linear_qkv.named_parameters()}
                               for layer in model.decoder.layers]
        engine.logits(inputs["a"])
        post = _gathered_records(model, tp)
    result.update(pre=pre, post=post, tau=tau, groups=groups, q_rows=q_rows, d=d)
    torch.save(result, f"{out_path}.rank{rank}")
    engine.shutdown()


def _hf_max_logits(model_path, input_ids):
    """Per layer, per head: max over batch and causal (i, j) of q_i.k_j / sqrt(d), from HF's projections."""
    from transformers import Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    hf = Qwen2ForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    b, s = input_ids.shape
    positions = torch.arange(s).expand(b, s)
    out = []
    with torch.no_grad():
        hidden = hf(input_ids, output_hidden_states=True).hidden_states
        for i, layer in enumerate(hf.model.layers):
            x = layer.input_layernorm(hidden[i])
            attn = layer.self_attn
            q = attn.q_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
            cos, sin = hf.model.rotary_emb(x, positions)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            logits = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
            logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
            out.append(logits.amax(dim=(0, 2, 3)))
    return out


@pytest.fixture(scope="module")
def runs(random_model, tmp_path_factory):
    """The worker's results for TP=1 (rank 0) and TP=2 (ranks 0 and 1); both worlds run at once."""
    g = torch.Generator().manual_seed(0)
    inputs = {"a": torch.randint(2, 64, (2, SEQ), generator=g), "b": torch.randint(2, 64, (3, SEQ), generator=g),
              "train": torch.randint(2, 64, (4, SEQ), generator=g)}
    out = tmp_path_factory.mktemp("muon")
    contexts = [mp.start_processes(_worker, args=(tp, random_model, pick_port(), inputs, str(out / f"tp{tp}")),
                                   nprocs=tp, join=False, start_method="spawn") for tp in (1, 2)]
    hf_a, hf_b = _hf_max_logits(random_model, inputs["a"]), _hf_max_logits(random_model, inputs["b"])
    for ctx in contexts:
        while not ctx.join():
            pass
    load = lambda tp, rank: torch.load(out / f"tp{tp}.rank{rank}", weights_only=False)  # noqa: E731
    return {"tp1": load(1, 0), "tp2": [load(2, 0), load(2, 1)], "hf_a": hf_a, "hf_b": hf_b}


@pytest.mark.multiproc
def test_param_split_between_muon_and_adamw(runs):
    r = runs["tp1"]
    assert r["muon_names"] == sorted(f"decoder.layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"))
    assert r["adamw_names"] == sorted(
        ["embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"]
        + [f"decoder.layers.{i}.{m}" for i in range(2) for m in (
            "input_layernorm.weight", "pre_mlp_layernorm.weight", "self_attention.linear_qkv.bias")])


@pytest.mark.multiproc
def test_muon_step_tp2_equals_tp1_and_hf_reference(runs):
    tp1, tp2 = runs["tp1"], runs["tp2"][0]
    for name, g in tp1["grads"].items():  # same gradients in, so any difference is the optimizer's
        assert torch.allclose(tp2["grads"][name], g, atol=1e-5, rtol=1e-4), name
    moved = 0.0
    for name, w in tp1["after"].items():
        assert torch.allclose(tp2["after"][name], w, atol=2e-5), (name, (tp2["after"][name] - w).abs().max())
        moved = max(moved, (w - tp1["before"][name]).abs().max().item())
    assert moved > 1e-2  # the step is far above the tolerance
    # HF-space reference: separate q/k/v and gate/up matrices get Muon; the rest AdamW (first step).
    for name, w0 in tp1["before"].items():
        g = tp1["grads"][name]
        if w0.ndim == 2 and "layers" in name:
            expected = w0 - LR * (newton_schulz(g) * muon_scale(*g.shape) + WD * w0)
        else:
            expected = w0 * (1 - LR * WD) - LR * g / (g.abs() + 1e-8)
        assert torch.allclose(tp1["after"][name], expected, atol=2e-5), name


@pytest.mark.multiproc
def test_recorded_max_logits_match_hf(runs):
    for records in (runs["tp1"]["records_a"], runs["tp2"][0]["records_a"]):
        for got, want in zip(records, runs["hf_a"]):
            assert torch.allclose(got, want, atol=1e-4), (got, want)
    for got, a, b in zip(runs["tp1"]["records_ab"], runs["hf_a"], runs["hf_b"]):
        assert torch.allclose(got, torch.maximum(a, b), atol=1e-4)


@pytest.mark.multiproc
@pytest.mark.parametrize("tp", [1, 2])
def test_qk_clip_rescales_only_the_offending_group(runs, tp):
    ranks = [runs["tp1"]] if tp == 1 else runs["tp2"]
    r0 = ranks[0]
    pre, post, tau = r0["pre"], r0["post"], r0["tau"]
    groups, q_rows, d = r0["groups"], r0["q_rows"], r0["d"]
    heads_per_group = q_rows // d
    # The setup: layer 0's head 0 is the only head (of either layer) above tau.
    others = torch.cat([pre[0][heads_per_group:], pre[1]])
    assert pre[0][:heads_per_group].max() == pre[0][0] > tau > others.max()
    assert r0["returned_max"] == pytest.approx(pre[0][0].item(), rel=1e-6) and r0["cleared"]
    # After the clip, the group's largest logit is tau (q and k biases are scaled too, so exactly).
    assert post[0][0].item() == pytest.approx(tau, rel=1e-4)
    eta = tau / pre[0][0].item()
    assert torch.allclose(post[0][:heads_per_group], pre[0][:heads_per_group] * eta, rtol=1e-4)
    assert torch.allclose(post[0][heads_per_group:], pre[0][heads_per_group:], rtol=1e-6)
    # Weights: group 0 of layer 0 (on TP rank 0) scaled by sqrt(eta) in q and k; all else bit-identical.
    for rank, r in enumerate(ranks):
        for layer, (before, after) in enumerate(zip(r["qkv_before"], r["qkv_after"])):
            for kind in ("weight", "bias"):
                b = before[kind].view(groups, q_rows + 2 * d, -1)
                a = after[kind].view(groups, q_rows + 2 * d, -1)
                if layer == 0 and rank == 0:
                    assert torch.allclose(a[0, :q_rows + d], b[0, :q_rows + d] * math.sqrt(eta), rtol=1e-6)
                    assert torch.equal(a[0, q_rows + d:], b[0, q_rows + d:])
                    assert torch.equal(a[1:], b[1:])
                else:
                    assert torch.equal(a, b), (rank, layer, kind)
    if tp == 1:  # Megatron's clip_qk (which leaves the bias alone) scales the weight the same way
        assert torch.allclose(r0["megatron_clipped_weight"], r0["qkv_after"][0]["weight"], rtol=1e-6)
