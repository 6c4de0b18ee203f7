"""What only a CUDA machine can show (scripts/gpu_check.sh runs these; without CUDA they skip):
NCCL weight pushes into every engine, each engine's workers seeing exactly their bundles' GPUs, and
rollout memory released while the trainer ranks on the same GPUs work, then resumed."""
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _config(demo_model, run_dir, gpus, transport):
    from rl.config import load_config

    return load_config({
        "steps": 2, "model": {"path": demo_model}, "cluster": {"device": "cuda"},
        "trainer": {"world_size": gpus}, "rollout": {"prompts_per_step": 8, "samples_per_prompt": 4,
                                                     "release_memory_during_train": True},
        "eval": {"every": 0}, "logging": {"wandb_mode": "disabled", "run_dir": str(run_dir)},
        "sync": {"transport": transport, "verify_full": True},
    })


@pytest.mark.parametrize("transport", ["broadcast", "shard"])
def test_nccl_push_reaches_every_engine_and_memory_is_released_around_training(demo_model, tmp_path, transport):
    import ray
    from transformers import AutoTokenizer

    from rl.actors import Actors
    from rl.loop import RLLoop

    gpus = torch.cuda.device_count()
    config = _config(demo_model, tmp_path, gpus, transport)
    actors = Actors.start(config, demo_model)
    try:
        for j, engine in enumerate(actors.rollout.engines):  # each engine's workers: exactly its GPU
            workers = ray.get(engine.worker_settings.remote(), timeout=120)
            assert {w["visible_devices"] for w in workers} == {",".join(actors.placement.engine_gpu_ids(j))}
        loop = RLLoop(config, actors, AutoTokenizer.from_pretrained(demo_model))
        free_before = torch.cuda.mem_get_info(0)[0]
        actors.rollout.call_all("release_memory")
        free_released = torch.cuda.mem_get_info(0)[0]
        actors.rollout.call_all("resume_memory")
        assert free_released > free_before  # SGLang's weights and KV cache left the GPU
        for _ in range(2):
            metrics = loop.step()  # verify_full: every engine equals the trainer after each NCCL push
            assert metrics["logprob_mismatch_max"] < 1e-2
            assert all(metrics[f"rollout_engine{j}_tokens"] > 0 for j in range(len(actors.rollout.engines)))
        loop.gateway.close()
    finally:
        actors.shutdown()
        ray.shutdown()
