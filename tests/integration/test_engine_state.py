"""The engine's own state methods: offload/onload, save/load checkpoint, HF export, end to end."""
import pytest
import torch
import torch.multiprocessing as mp

from rl.algo.objectives import ObjectiveSettings
from tests.helpers import make_samples


def _worker(model_path, port, ckpt, export, out):
    from transformers import AutoModelForCausalLM

    from tests.helpers import make_engine

    engine = make_engine(model_path, master_port=port, device="cpu", lr=1e-3, lr_warmup_steps=4)
    samples = make_samples(model_path, "1+2=", "3", ["3", "4"], [1.0, 0.0])
    engine.train_step(samples, ObjectiveSettings(tau=0.0))
    saved = engine.hf_state_dict()
    engine.save_checkpoint(ckpt, extra={"step": 1})
    lr_at_save = engine.scheduler.get_last_lr()[0]
    engine.train_step(samples, ObjectiveSettings(tau=0.0))  # moves weights, moments and the lr schedule on
    moved = not torch.equal(engine.hf_state_dict()["lm_head.weight"], saved["lm_head.weight"])
    extra = engine.load_checkpoint(ckpt)
    restored = all(torch.equal(engine.hf_state_dict()[k], v) for k, v in saved.items())
    before = {k: v.clone() for k, v in engine.hf_state_dict().items()}
    off, on = engine.offload(), engine.onload()
    after = engine.hf_state_dict()
    engine.export_hf(export)
    exported = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).state_dict()
    torch.save({"moved": moved, "extra": extra, "restored": restored, "lr": (lr_at_save, engine.scheduler.get_last_lr()[0]),
                "offload": off, "onload": on, "bitwise": all(torch.equal(after[k], v) for k, v in before.items()),
                "export": all(torch.equal(exported[k], v) for k, v in after.items())}, out)
    engine.shutdown()


@pytest.mark.multiproc
def test_checkpoint_offload_and_export_through_the_engine(random_model, free_port, tmp_path):
    out = tmp_path / "result.pt"
    proc = mp.get_context("spawn").Process(target=_worker, args=(random_model, free_port, str(tmp_path / "ckpt"),
                                                                  str(tmp_path / "hf"), str(out)))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0
    r = torch.load(out)
    assert r["moved"] and r["restored"] and r["extra"]["step"] == 1
    assert r["lr"][0] == r["lr"][1]  # the lr schedule came back with the checkpoint
    assert sum(r["offload"]["device_bytes_after"].values()) == 0 and sum(r["offload"]["moved_bytes"].values()) > 0
    assert r["onload"]["moved_bytes"] == r["offload"]["moved_bytes"] and r["bitwise"]
    assert r["export"]
