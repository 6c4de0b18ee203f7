"""Distributed checkpoints survive a change of tensor parallelism, and the HF export loads elsewhere.

One chain of spawned gloo worlds (shared by the tests below):
  A, TP=1: one train step, save checkpoint A; a second engine loads it (same layout: bitwise, RNG too);
           the original goes on for one more step ("continued").
  B, TP=2: load A; save checkpoint B; take the same step; export the new weights in HF format.
  D, PP=2: load B (TP=2 -> two pipeline stages); take the same step.
  C, TP=1: load B (written under TP=2); take the same step.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rl.algo.objectives import ObjectiveSettings
from tests.helpers import make_samples, pick_port

STEP_TOLERANCE = 1e-6  # a step under another TP layout reduces in another order: equal up to fp32 rounding
# Softmax ignores a bias added to every key, so the key bias's gradient is zero but for rounding; Adam divides
# that noise by its own size (plus eps), so the bias moves by up to ~lr * noise / eps and the layouts differ by
# as much. Measured 2.1e-6 on one CI machine and below 1e-6 on another: compare it only to the step's scale.
KEY_BIAS_TOLERANCE = 1e-4
# Each engine: lr must come from the checkpoint; no clipping, so the step compares the checkpointed state
# and not the clipping code.
ENGINE = dict(device="cpu", lr=0.5, grad_clip=1e9)


def _samples(model_path, responses, rewards):
    return make_samples(model_path, "12+34=", "46", responses, rewards)


def _first_batch(path):
    return _samples(path, ["46", "64", "7"], [1.0, 0.0, 0.0])


def _second_batch(path):
    return _samples(path, ["46", "4", "x6"], [1.0, 1.0, 0.0])


def _global_tensors(sharded_sd) -> dict:
    """Every ShardedTensor assembled to its full global shape, on every rank (layout-free comparison)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    apply_factories(sharded_sd)
    local = {}
    for st in nested_values(sharded_sd):
        if isinstance(st, ShardedTensor):
            full = local.setdefault(st.key, torch.zeros(st.global_shape, dtype=st.dtype))
            if is_main_replica(st.replica_id):
                full[st.global_slice()] = st.data.detach().cpu()
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, {k: (tuple(v.shape), v.dtype) for k, v in local.items()})
    out = {}
    for key in sorted(set().union(*shapes)):
        shape, dtype = next(s[key] for s in shapes if key in s)
        full = local.get(key, torch.zeros(shape, dtype=dtype))
        dist.all_reduce(full)  # each element is written by exactly one main replica
        out[key] = full
    return out


def _moments(engine) -> dict:
    from rl.trainer.checkpoint import model_sharded_state_dict, optimizer_sharded_state_dict

    sharded, _ = optimizer_sharded_state_dict(model_sharded_state_dict([engine.model]), engine.optimizer)
    return _global_tensors(sharded)


def _hf(engine):
    """A snapshot of the full HF weights (on CPU, `hf_state_dict` may alias the live parameters)."""
    state = engine.hf_state_dict()
    return None if state is None else {k: v.clone() for k, v in state.items()}


def _extra(engine, step):
    return {"step": step, "scheduler": engine.scheduler.state_dict(), "data_position": 3 * step}


def _leave(engine):
    """End this world so the process can join the next one (one process start serves three layouts)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    engine.shutdown()


def _round_a(model_path, port, ckpt, out):
    """TP=1: step, save A, step on; a twin engine loads A in the same layout and takes the same step."""
    from rl.trainer.checkpoint import load_checkpoint, save_checkpoint
    from tests.helpers import make_engine

    engine = make_engine(model_path, master_port=port, device="cpu", grad_clip=1e9)
    engine.train_step(_first_batch(model_path), ObjectiveSettings(tau=0.0))
    save_checkpoint(ckpt, [engine.model], engine.optimizer, _extra(engine, 1))
    after_save_draw = torch.rand(4)
    saved = {"hf": _hf(engine), "moments": _moments(engine)}
    continued = engine.train_step(_second_batch(model_path), ObjectiveSettings(tau=0.0))
    continued_hf = _hf(engine)

    twin = make_engine(model_path, master_port=port, **ENGINE)
    torch.rand(100)  # move the RNG: loading must restore it
    extra = load_checkpoint(ckpt, [twin.model], twin.optimizer)
    twin_draw = torch.rand(4)
    twin_loaded = {"hf": _hf(twin), "moments": _moments(twin)}
    twin.scheduler.load_state_dict(extra["scheduler"])
    twin_step = twin.train_step(_second_batch(model_path), ObjectiveSettings(tau=0.0))
    torch.save({"saved": saved, "continued": continued, "continued_hf": continued_hf, "extra": extra,
                "after_save_draw": after_save_draw, "twin_draw": twin_draw, "twin_loaded": twin_loaded,
                "twin_step": twin_step, "twin_hf": _hf(twin)}, out)
    _leave(engine)


def _round_load(rank, world, model_path, port, ckpt, out, save_to=None, export_to=None, pp=1):
    """TP=world/pp, PP=pp: load `ckpt`, optionally save it again, take the second step, optionally export."""
    from rl.trainer.checkpoint import load_checkpoint, save_checkpoint
    from rl.trainer.export import export_hf
    from tests.helpers import make_engine

    engine = make_engine(model_path, rank=rank, world_size=world, master_port=port,
                            tensor_parallel_size=world // pp, pipeline_parallel_size=pp, **ENGINE)
    extra = load_checkpoint(ckpt, [engine.model], engine.optimizer)
    engine.scheduler.load_state_dict(extra["scheduler"])
    loaded = {"hf": _hf(engine), "moments": _moments(engine)}
    if save_to:
        save_checkpoint(save_to, [engine.model], engine.optimizer, _extra(engine, extra["step"]))
    metrics = engine.train_step(_second_batch(model_path), ObjectiveSettings(tau=0.0))
    stepped = _hf(engine)
    if export_to and rank == 0:
        export_hf(export_to, stepped, model_path)
    if rank == 0:
        torch.save({"extra": extra, "loaded": loaded, "metrics": metrics, "hf": stepped}, out)
    _leave(engine)


def _chain(rank, model_path, ports, paths):
    if rank == 0:  # rank 1 meanwhile waits to join the TP=2 world
        _round_a(model_path, ports[0], paths["A"], paths["a.pt"])
    _round_load(rank, 2, model_path, ports[1], paths["A"], paths["b.pt"], save_to=paths["B"], export_to=paths["hf"])
    _round_load(rank, 2, model_path, ports[2], paths["B"], paths["d.pt"], pp=2)
    if rank == 0:
        _round_load(0, 1, model_path, ports[3], paths["B"], paths["c.pt"])


@pytest.fixture(scope="module")
def chain(random_model, tmp_path_factory):
    # The four rendezvous ports are picked before the chain starts and the last is bound a minute later:
    # an ephemeral port of the rounds before it can take it meanwhile. Then the chain runs again, on
    # other ports and in fresh directories.
    for attempt in range(3):
        root = tmp_path_factory.mktemp("ckpt")
        paths = {name: str(root / name) for name in ("A", "B", "hf", "a.pt", "b.pt", "c.pt", "d.pt")}
        ports = [pick_port() for _ in range(4)]
        try:
            mp.start_processes(_chain, args=(random_model, ports, paths), nprocs=2, join=True, start_method="spawn")
            break
        except mp.ProcessRaisedException as exc:
            if "EADDRINUSE" not in str(exc) or attempt == 2:
                raise
    return {"paths": paths, **{k: torch.load(paths[f"{k}.pt"], weights_only=False) for k in "abcd"}}


def _assert_bitwise(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _assert_close(got: dict, want: dict, tol=STEP_TOLERANCE):
    assert got.keys() == want.keys()
    for k in want:
        limit = KEY_BIAS_TOLERANCE if k.endswith("k_proj.bias") else tol
        assert (got[k] - want[k]).abs().max().item() <= limit, k


@pytest.mark.multiproc
def test_same_layout_load_is_exact_including_rng_and_extra_state(chain):
    a = chain["a"]
    assert a["saved"]["moments"] and all(k.startswith("optimizer.state.exp_avg") for k in a["saved"]["moments"])
    _assert_bitwise(a["twin_loaded"]["hf"], a["saved"]["hf"])
    _assert_bitwise(a["twin_loaded"]["moments"], a["saved"]["moments"])
    assert a["extra"]["step"] == 1 and a["extra"]["data_position"] == 3
    assert torch.equal(a["twin_draw"], a["after_save_draw"])
    assert a["twin_step"]["loss"] == a["continued"]["loss"] and a["twin_step"]["lr"] == a["continued"]["lr"]
    _assert_bitwise(a["twin_hf"], a["continued_hf"])


@pytest.mark.multiproc
def test_checkpoint_saved_at_tp1_loads_at_tp2(chain):
    a, b = chain["a"], chain["b"]
    _assert_bitwise(b["loaded"]["hf"], a["saved"]["hf"])
    _assert_bitwise(b["loaded"]["moments"], a["saved"]["moments"])
    assert b["extra"]["step"] == 1
    # One step after loading equals the step the TP=1 run took without the round trip.
    assert b["metrics"]["lr"] == a["continued"]["lr"]
    assert abs(b["metrics"]["loss"] - a["continued"]["loss"]) <= STEP_TOLERANCE
    _assert_close(b["hf"], a["continued_hf"])


@pytest.mark.multiproc
def test_checkpoint_saved_at_tp2_loads_at_tp1(chain):
    a, c = chain["a"], chain["c"]
    _assert_bitwise(c["loaded"]["hf"], a["saved"]["hf"])  # A -> TP=2 -> B -> TP=1 loses nothing
    _assert_bitwise(c["loaded"]["moments"], a["saved"]["moments"])
    _assert_bitwise(c["hf"], a["continued_hf"])  # same layout as the original run: the step is exact
    assert c["metrics"]["loss"] == a["continued"]["loss"]


@pytest.mark.multiproc
def test_checkpoint_saved_at_tp2_loads_at_pp2(chain):
    a, d = chain["a"], chain["d"]
    _assert_bitwise(d["loaded"]["hf"], a["saved"]["hf"])  # layers split over two stages by global number
    _assert_bitwise(d["loaded"]["moments"], a["saved"]["moments"])
    assert abs(d["metrics"]["loss"] - a["continued"]["loss"]) <= STEP_TOLERANCE
    _assert_close(d["hf"], a["continued_hf"])


@pytest.mark.multiproc
def test_incomplete_checkpoint_is_refused(chain, tmp_path):
    from rl.trainer.checkpoint import MARKER, load_checkpoint

    assert os.path.exists(os.path.join(chain["paths"]["A"], MARKER))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path), [], None)


def _hf_logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.multiproc
def test_hf_export_loads_in_transformers_with_the_trained_weights(chain, random_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, trained = chain["paths"]["hf"], chain["b"]["hf"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(os.listdir(out))
    exported, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    _assert_bitwise({k: v for k, v in exported.state_dict().items() if k in trained}, trained)
    text = "12+34="
    assert AutoTokenizer.from_pretrained(out).encode(text) == AutoTokenizer.from_pretrained(random_model).encode(text)

    source = AutoModelForCausalLM.from_pretrained(random_model, dtype=torch.float32).eval()
    ids = torch.randint(2, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    before = _hf_logits(source, ids)
    source.load_state_dict(trained)
    got = _hf_logits(exported.eval(), ids)
    assert torch.equal(got, _hf_logits(source, ids))
    assert not torch.allclose(got, before)  # the step changed the model: not a copy of the source


def _generate_with_sglang(model_dir, out_path):
    """In a child process: SGLang's CPU set-up (stand-ins on the path) must not leak into pytest's."""
    from rl.sample import Sample
    from rollout.config import RolloutConfig
    from rollout.sglang.engine import RolloutEngine

    engine = RolloutEngine(model_dir, RolloutConfig(max_total_tokens=1024), device="cpu", seed=0)
    try:
        samples = [Sample(group_id=i, prompt=p, prompt_ids=engine.tokenizer.encode(p), reference="")
                   for i, p in enumerate(["12+34=", "7+8="])]
        engine.generate(samples, max_new_tokens=6)  # each sample at its temperature, 1.0
    finally:
        engine.shutdown()
    torch.save(samples, out_path)


@pytest.mark.integration
def test_hf_export_loads_in_sglang(chain, stub_log, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.helpers import stub_calls

    out = chain["paths"]["hf"]
    proc = mp.get_context("spawn").Process(target=_generate_with_sglang, args=(out, str(tmp_path / "samples.pt")))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0
    samples = torch.load(tmp_path / "samples.pt", weights_only=False)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        logprobs = torch.log_softmax(_hf_logits(hf, ids)[0, :-1], dim=-1)
        expected = logprobs[len(s.prompt_ids) - 1:].gather(-1, ids[0, len(s.prompt_ids):, None])[:, 0]
        assert (torch.tensor(s.rollout_logprobs) - expected).abs().max().item() <= 1e-4
    assert stub_calls(stub_log) == []


def test_hf_export_in_shards_loads_in_transformers(random_model, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rl.trainer.export import export_hf

    state = load_file(f"{random_model}/model.safetensors")
    export_hf(str(tmp_path), state, random_model, max_shard_bytes=64 * 1024)
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    _assert_bitwise({k: v for k, v in model.state_dict().items() if k in state}, state)
