"""Offloading the trainer's state to host memory and back is invisible to training.

Device memory is really released (every moved storage has size 0), every Parameter, `.grad`,
`main_grad` view and optimizer-state tensor survives as the same object, and training continues exactly
as on an engine that never offloaded.
"""

import pytest
import torch
import torch.multiprocessing as mp

from rl.algo.objectives import ObjectiveSettings
from rl.trainer.offload import CATEGORIES, Offloader
from tests.helpers import make_samples, pick_port


def _samples(model_path, responses, rewards):
    return make_samples(model_path, "5+6=", "11", responses, rewards)


def _grads(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        for attr in ("grad", "main_grad"):
            g = getattr(p, attr, None)
            if g is not None:
                out[f"{name}.{attr}"] = g.clone()
    return out


def _snapshot(engine) -> dict:
    return {"params": {n: p.detach().clone() for n, p in engine.model.named_parameters()},
            "grads": _grads(engine.model),
            "optimizer": {f"{id(p)}.{k}": v.clone() for p, st in engine.optimizer.state.items()
                          for k, v in st.items() if isinstance(v, torch.Tensor)}}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[c].keys() == b[c].keys() and all(torch.equal(a[c][k], b[c][k]) for k in a[c]) for c in a)


def _storage_sizes(engine) -> list[int]:
    tensors = list(engine.model.parameters())
    tensors += [getattr(p, a) for p in engine.model.parameters() for a in ("grad", "main_grad")
                if getattr(p, a, None) is not None]
    tensors += [v for st in engine.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return [t.untyped_storage().size() for t in tensors]


def _hf(engine):
    return {k: v.clone() for k, v in engine.hf_state_dict().items()}


def _train_equivalence(model_path, port, out_path):
    from tests.helpers import make_engine

    engine = make_engine(model_path, master_port=port, device="cpu")
    ref = make_engine(model_path, master_port=port, device="cpu")  # same seed and weights, never offloaded
    batches = [_samples(model_path, ["11", "12", "1"], [1.0, 0.0, 0.0]),
               _samples(model_path, ["11", "21"], [1.0, 0.0]),
               _samples(model_path, ["11", "2", "9"], [0.0, 1.0, 0.0])]
    result = {"metrics": [], "ref_metrics": []}
    result["metrics"].append(engine.train_step(batches[0], ObjectiveSettings(tau=0.0)))
    result["ref_metrics"].append(ref.train_step(batches[0], ObjectiveSettings(tau=0.0)))

    offloader = Offloader([getattr(engine, "ddp", None) or engine.model], engine.optimizer)
    objects = [id(p) for p in engine.model.parameters()] + [id(t) for st in engine.optimizer.state.values()
                                                           for t in st.values()]
    before = _snapshot(engine)
    result["held_before"] = offloader.device_bytes()
    result["offload"] = offloader.offload()
    result["sizes_offloaded"] = _storage_sizes(engine)
    result["offload_again"] = offloader.offload()
    result["onload"] = offloader.onload()
    result["onload_again"] = offloader.onload()
    result["restored_exactly"] = _equal(_snapshot(engine), before)
    result["same_objects"] = objects == [id(p) for p in engine.model.parameters()] + [
        id(t) for st in engine.optimizer.state.values() for t in st.values()]
    result["metrics"].append(engine.train_step(batches[1], ObjectiveSettings(tau=0.0)))
    result["ref_metrics"].append(ref.train_step(batches[1], ObjectiveSettings(tau=0.0)))
    result["step_after_onload_equal"] = _equal({"w": _hf(engine)}, {"w": _hf(ref)})

    host = [b.data_ptr() for bufs in offloader._pool.buffers.values() for b in bufs]
    result["second_offload"] = offloader.offload()
    result["host_reused"] = host == [b.data_ptr() for bufs in offloader._pool.buffers.values() for b in bufs]
    offloader.onload()
    result["metrics"].append(engine.train_step(batches[2], ObjectiveSettings(tau=0.0)))
    result["ref_metrics"].append(ref.train_step(batches[2], ObjectiveSettings(tau=0.0)))
    result["second_cycle_equal"] = _equal({"w": _hf(engine)}, {"w": _hf(ref)})
    result["ddp"] = _megatron_ddp_cycle(model_path, port)  # same process: one start-up for both checks
    torch.save(result, out_path)
    engine.shutdown()


@pytest.fixture(scope="module")
def engine_cycle(random_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("offload") / "result.pt"
    proc = mp.get_context("spawn").Process(target=_train_equivalence, args=(random_model, pick_port(), str(out)))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0
    return torch.load(out, weights_only=False)


@pytest.mark.multiproc
def test_offload_releases_every_device_storage(engine_cycle):
    r = engine_cycle
    assert all(r["held_before"][c] > 0 for c in CATEGORIES)
    assert r["offload"].moved_bytes == r["held_before"]
    assert r["offload"].device_bytes_after == {c: 0 for c in CATEGORIES}
    assert set(r["sizes_offloaded"]) == {0}


@pytest.mark.multiproc
def test_onload_restores_state_bitwise_and_keeps_every_object(engine_cycle):
    r = engine_cycle
    assert r["restored_exactly"] and r["same_objects"]
    assert r["onload"].moved_bytes == r["held_before"]
    assert r["onload"].device_bytes_after == r["held_before"]


@pytest.mark.multiproc
def test_repeated_offload_or_onload_is_harmless(engine_cycle):
    r = engine_cycle
    assert r["offload_again"].total_moved == 0 and r["onload_again"].total_moved == 0
    assert r["onload_again"].device_bytes_after == r["held_before"]


@pytest.mark.multiproc
def test_training_after_onload_equals_training_without_offload(engine_cycle):
    r = engine_cycle
    assert r["metrics"][1]["loss"] == r["ref_metrics"][1]["loss"]
    assert r["metrics"][1]["grad_norm"] == r["ref_metrics"][1]["grad_norm"]
    assert r["step_after_onload_equal"]
    assert r["second_offload"].total_moved == r["offload"].total_moved
    assert r["host_reused"]  # the host buffers of the first cycle serve the second
    assert r["second_cycle_equal"]


def _megatron_ddp_cycle(model_path, port):
    """Megatron DDP's contiguous grad buffer: main_grad views survive, and its backward hooks still fire."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from tests.helpers import make_engine

    def wrapped():
        engine = make_engine(model_path, master_port=port, device="cpu")
        ddp = getattr(engine, "ddp", None)
        if ddp is None:
            ddp = DistributedDataParallel(config=engine.model.config, module=engine.model,
                                          ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
        return engine, ddp

    def backward(ddp, seed):
        ids = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(seed))
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        ddp(input_ids=ids, position_ids=positions, attention_mask=None).float().pow(2).mean().backward()
        ddp.finish_grad_sync()

    (engine, ddp), (_, ref_ddp) = wrapped(), wrapped()
    for d in (ddp, ref_ddp):
        d.zero_grad_buffer()
        backward(d, seed=1)
    offloader = Offloader([ddp], engine.optimizer)
    buffers = ddp.buffers + ddp.expert_parallel_buffers
    before = _grads(engine.model)
    report = offloader.offload()
    released = all(b.grad_data.untyped_storage().size() == 0 for b in buffers)
    offloader.onload()
    storages = {b.grad_data.untyped_storage().data_ptr() for b in buffers}
    views_valid = all(p.main_grad.untyped_storage().data_ptr() in storages for p in engine.model.parameters())
    restored = _equal({"g": _grads(engine.model)}, {"g": before})
    for d in (ddp, ref_ddp):
        backward(d, seed=2)  # accumulates into main_grad through DDP's hooks
    accumulated_equal = _equal({"g": _grads(engine.model)}, {"g": _grads(ref_ddp.module)})
    return {"grad_bytes": report.moved_bytes["grads"], "released": released, "views_valid": views_valid,
            "restored": restored, "accumulated_equal": accumulated_equal, "n_buffers": len(buffers)}


@pytest.mark.multiproc
def test_megatron_ddp_grad_buffers_round_trip(engine_cycle):
    r = engine_cycle["ddp"]
    assert r["n_buffers"] >= 1 and r["grad_bytes"] > 0
    assert r["released"] and r["views_valid"] and r["restored"] and r["accumulated_equal"]


def _toy():
    """Two parameters viewing one flat storage (like a contiguous param buffer), with Adam state and grads."""
    torch.manual_seed(0)
    flat = torch.randn(30)
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(flat[:20].view(4, 5))
    model.b = torch.nn.Parameter(flat[20:])
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    (model.a.sum() * 2 + model.b.pow(2).sum()).backward()
    opt.step()
    return model, opt


def test_views_of_one_storage_move_once_and_come_back():
    model, opt = _toy()
    off = Offloader([model], opt)
    held = off.device_bytes()
    assert held["params"] == 30 * 4  # one shared storage, counted once
    a, b, exp_avg = model.a.detach().clone(), model.b.detach().clone(), opt.state[model.a]["exp_avg"].clone()
    off.offload()
    assert model.a.untyped_storage().size() == 0 and model.a.shape == (4, 5)
    off.onload()
    assert torch.equal(model.a, a) and torch.equal(model.b, b)
    assert torch.equal(opt.state[model.a]["exp_avg"], exp_avg)
    assert model.b.untyped_storage().data_ptr() == model.a.untyped_storage().data_ptr()  # still one storage


def test_discarded_grads_come_back_as_zeros():
    model, opt = _toy()
    off = Offloader([model], opt)
    report = off.offload(discard_grads=True)
    assert report.moved_bytes["grads"] == 0 and report.device_bytes_after["grads"] == 0
    off.onload()
    assert torch.count_nonzero(model.a.grad) == 0 and model.a.grad.shape == (4, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_frees_device_memory_into_pinned_buffers():
    model = torch.nn.Linear(256, 256).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 256, device="cuda")).sum().backward()
    opt.step()
    off = Offloader([model], opt)
    report = off.offload()
    assert report.cuda_allocated_before - report.cuda_allocated_after >= report.total_moved
    assert all(b.is_pinned() for bufs in off._pool.buffers.values() for b in bufs)
    back = off.onload()
    assert back.cuda_allocated_after == report.cuda_allocated_before
